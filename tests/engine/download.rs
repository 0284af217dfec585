//! The download stage against a real HTTP server on loopback, and pip against a local index.

use std::io::Write;

use crate::support::{HttpServer, Project, Reply, bytes, sha256_hex};

fn download_project(url: &str, extra: &str) -> Project {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        &format!("version: 1\nstages:\n  fetch:\n    kind: download\n    with:\n      url: {url}\n      retries: 2\n      backoff_ms: 20\n{extra}"),
    );
    p
}

#[test]
fn a_pinned_download_is_verified_committed_and_then_cached() {
    let body = bytes(300_000, 1);
    let server = HttpServer::start(vec![(
        "/models/model.onnx",
        vec![Reply::Body(body.clone())],
    )]);
    let p = download_project(
        &server.url("/models/model.onnx"),
        &format!("      sha256: {}\n", sha256_hex(&body)),
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read(p.output("fetch").join("model.onnx")).unwrap(),
        body
    );
    let r = p.run(&["run", "--json"]);
    assert_eq!(
        Project::outcomes(&r.stdout),
        vec![("fetch".into(), "cached".into())]
    );
    assert_eq!(
        server.requests().len(),
        1,
        "a cached download is not fetched again"
    );
}

#[test]
fn an_unpinned_download_reports_its_digest_to_pin() {
    let body = bytes(1000, 2);
    let server = HttpServer::start(vec![("/a.bin", vec![Reply::Body(body.clone())])]);
    let p = download_project(&server.url("/a.bin"), "");
    let r = p.run(&["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let want = format!(
        "note: a.bin: sha256 {0} (not pinned: add `sha256: {0}`)",
        sha256_hex(&body)
    );
    assert!(r.stderr.contains(&want), "{}", r.stderr);
}

#[test]
fn not_found_fails_at_once_with_a_clear_message() {
    let server = HttpServer::start(vec![]);
    let p = download_project(&server.url("/missing.bin"), "");
    let r = p.run(&["run"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(&format!(
            "failed  fetch  {} was not found (HTTP 404)",
            server.url("/missing.bin")
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("help: check the URL in the pipeline file"),
        "{}",
        r.stderr
    );
    assert_eq!(server.requests().len(), 1, "a 404 is not retried");
}

#[test]
fn a_wrong_checksum_fails_and_keeps_nothing() {
    let body = bytes(5000, 3);
    let server = HttpServer::start(vec![("/a.bin", vec![Reply::Body(body)])]);
    let wrong = "0".repeat(64);
    let p = download_project(&server.url("/a.bin"), &format!("      sha256: {wrong}\n"));
    let r = p.run(&["run"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(&format!(
            "checksum mismatch for a.bin: expected sha256 {wrong}, got "
        )),
        "{}",
        r.stderr
    );
    assert!(
        p.run(&["status"])
            .stdout
            .contains("stale  fetch  no record")
    );
    assert_eq!(p.run(&["cache", "verify"]).code, 0);
}

#[test]
fn server_errors_are_retried() {
    let body = bytes(2000, 4);
    let server = HttpServer::start(vec![(
        "/a.bin",
        vec![Reply::Status(503), Reply::Body(body.clone())],
    )]);
    let p = download_project(
        &server.url("/a.bin"),
        &format!("      sha256: {}\n", sha256_hex(&body)),
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(server.requests(), vec!["GET /a.bin", "GET /a.bin"]);
}

#[test]
fn a_truncated_transfer_resumes_with_a_range_request() {
    let body = bytes(1_000_000, 5);
    let server = HttpServer::start(vec![(
        "/big.bin",
        vec![Reply::Cut(body.clone(), 400_000), Reply::Body(body.clone())],
    )]);
    let p = download_project(
        &server.url("/big.bin"),
        &format!("      sha256: {}\n", sha256_hex(&body)),
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        server.requests(),
        vec!["GET /big.bin", "GET /big.bin range=400000-"]
    );
    assert!(
        r.stderr.contains("note: big.bin: resumed at byte 400000"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read(p.output("fetch").join("big.bin")).unwrap(),
        body
    );
}

#[test]
fn a_server_dying_mid_file_fails_keeps_the_part_and_the_next_run_resumes() {
    let body = bytes(800_000, 6);
    let server = HttpServer::start(vec![(
        "/big.bin",
        vec![Reply::CutAndDie(body.clone(), 300_000)],
    )]);
    let url = server.url("/big.bin");
    let p = download_project(&url, &format!("      sha256: {}\n", sha256_hex(&body)));
    let r = p.run(&["run"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "could not download {url} after 3 attempts: connection failed"
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("help: 300000 bytes are kept; run again to resume from there"),
        "{}",
        r.stderr
    );
    server.wait_stopped();

    // The server comes back on the same address.
    let again = HttpServer::start_on(
        &server.addr.to_string(),
        vec![("/big.bin", vec![Reply::Body(body.clone())])],
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(again.requests(), vec!["GET /big.bin range=300000-"]);
    assert_eq!(
        std::fs::read(p.output("fetch").join("big.bin")).unwrap(),
        body
    );
}

#[test]
fn a_local_file_source_is_hashed_and_a_change_reruns_it() {
    let p = Project::new();
    p.write("data/captions.csv", "image,caption\na.jpg,a dog\n");
    p.write("pipeline.yaml", "version: 1\nstages:\n  annotations:\n    kind: download\n    with:\n      file: data/captions.csv\n");
    assert_eq!(p.run(&["run"]).code, 0);
    assert_eq!(
        std::fs::read_to_string(p.output("annotations").join("captions.csv")).unwrap(),
        "image,caption\na.jpg,a dog\n"
    );
    p.write("data/captions.csv", "image,caption\na.jpg,a cat\n");
    let r = p.run(&["status"]);
    assert_eq!(
        r.stdout.trim(),
        "stale  annotations  input `file` changed (data/captions.csv)"
    );
}

/// A wheel (a zip) holding `demo_pkg/data/weights.bin`.
fn wheel(payload: &[u8]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default();
        zip.start_file("demo_pkg/__init__.py", opts).unwrap();
        zip.start_file("demo_pkg/data/weights.bin", opts).unwrap();
        zip.write_all(payload).unwrap();
        zip.start_file("demo_pkg-1.0.dist-info/METADATA", opts)
            .unwrap();
        zip.write_all(b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n")
            .unwrap();
        zip.start_file("demo_pkg-1.0.dist-info/WHEEL", opts)
            .unwrap();
        zip.write_all(
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        .unwrap();
        zip.start_file("demo_pkg-1.0.dist-info/RECORD", opts)
            .unwrap();
        zip.finish().unwrap();
    }
    buf.into_inner()
}

#[test]
fn a_pip_source_extracts_a_member_from_a_wheel_of_a_local_index() {
    let payload = bytes(10_000, 7);
    let whl = wheel(&payload);
    let name = "demo_pkg-1.0-py3-none-any.whl";
    let page = format!(
        "<!DOCTYPE html><html><body><a href=\"/files/{name}#sha256={}\">{name}</a></body></html>",
        sha256_hex(&whl)
    );
    let server = HttpServer::start(vec![
        ("/simple/demo-pkg/", vec![Reply::Body(page.into_bytes())]),
        (&format!("/files/{name}"), vec![Reply::Body(whl)]),
    ]);
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        &format!(
            "version: 1\nstages:\n  weights:\n    kind: download\n    with:\n      pip: demo-pkg==1.0\n      index_url: {}\n      member: demo_pkg/data/weights.bin\n      sha256: {}\n",
            server.url("/simple/"),
            sha256_hex(&payload)
        ),
    );
    let r = p.run(&["run"]);
    assert_eq!(
        r.code,
        0,
        "{}\n{}",
        r.stderr,
        std::fs::read_to_string(p.path().join("cache/logs-v1")).unwrap_or_default()
    );
    let out = p.output("weights");
    assert_eq!(std::fs::read(out.join("weights.bin")).unwrap(), payload);
    let entries: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, vec!["weights.bin"], "only the member is kept");

    // A member that is not in the wheel: named, with the closest real one suggested.
    let yaml = p
        .read("pipeline.yaml")
        .replace("demo_pkg/data/weights.bin", "demo_pkg/data/weight.bin")
        .replace(&sha256_hex(&payload), &"ab".repeat(32));
    p.write("pipeline.yaml", &yaml);
    let r = p.run(&["run"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("`demo_pkg/data/weight.bin` is not in demo_pkg-1.0-py3-none-any.whl"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("help: did you mean `demo_pkg/data/weights.bin`?"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_tls_failure_is_not_retried_and_says_what_to_check() {
    // An https URL on a plain-HTTP server: the TLS handshake cannot succeed.
    let server = HttpServer::start(vec![]);
    let url = format!("https://{}/a.bin", server.addr);
    let p = download_project(&url, "");
    let r = p.run(&["run"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("TLS error"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("help: the secure connection failed (certificate, or not a TLS server)"),
        "{}",
        r.stderr
    );
    assert!(
        server.requests().len() <= 1,
        "a TLS failure is not retried: {:?}",
        server.requests()
    );
}
