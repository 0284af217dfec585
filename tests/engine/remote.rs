//! The team cache, against a real S3-compatible server (moto's, from PyPI, started on loopback
//! by each test: the S3 REST API over HTTP, spoken by the same `object_store` client users
//! run) and against a `file://` folder remote: restore on a fresh clone, push/pull, concurrent
//! pushes, a server down or killed mid-push, a flipped byte, gc with a concurrent push, and two
//! clones sharing one cache folder.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::support::*;

/// A Python with moto's server and boto3: the system's when it has them, else a venv made
/// once under the target folder with pip.
fn python() -> &'static PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let has = |py: &Path| {
            Command::new(py)
                .args([
                    "-c",
                    "from moto.server import ThreadedMotoServer; import boto3",
                ])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let system = PathBuf::from("python3");
        if has(&system) {
            return system;
        }
        let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("s3-server-venv");
        let py = venv.join("bin/python");
        if !has(&py) {
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .is_ok_and(|s| s.success())
                && Command::new(&py)
                    .args(["-m", "pip", "install", "--quiet", "moto[server]==5.2.1"])
                    .status()
                    .is_ok_and(|s| s.success());
            assert!(
                ok,
                "could not install moto[server] from PyPI into {}",
                venv.display()
            );
        }
        py
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// moto's S3 server with one bucket, `cache`; killed on drop.
struct S3Server {
    child: Option<Child>,
    port: u16,
}

impl S3Server {
    fn start() -> S3Server {
        S3Server::start_with(&[])
    }

    /// With environment variables for moto (e.g. turning its credential checks on).
    fn start_with(env: &[(&str, &str)]) -> S3Server {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tests/s3_server.py");
        let port = free_port();
        let mut child = Command::new(python())
            .arg(script)
            .arg(port.to_string())
            .arg("cache")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("ready") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the S3 server is ready within a minute");
        S3Server {
            child: Some(child),
            port,
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `remote:` of a pipeline using this server under `prefix`.
    fn remote_yaml(&self, prefix: &str) -> String {
        remote_yaml_on(self.port, prefix)
    }
}

fn remote_yaml_on(port: u16, prefix: &str) -> String {
    format!(
        "remote:\n  url: s3://cache/{prefix}\n  options: {{endpoint: \"http://127.0.0.1:{port}\", allow_http: true, region: us-east-1}}\n"
    )
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two stages; each appends its name to `executions.log` when it executes.
fn pipeline(remote: &str, extra_run: &str) -> String {
    format!(
        "version: 1\n{remote}params:\n  n: 1000\nstages:\n  numbers:\n    kind: command\n    with:\n      run: echo numbers >> executions.log; seq 1 ${{params.n}} > ${{out}}/numbers.txt{extra_run}\n  total:\n    kind: command\n    inputs:\n      numbers: ${{numbers}}\n    with:\n      run: echo total >> executions.log; awk '{{s+=$1}} END {{print s}}' ${{inputs.numbers}}/numbers.txt > ${{out}}/total.txt\n"
    )
}

fn clone_with(text: &str) -> Project {
    let p = Project::new();
    p.write("pipeline.yaml", text);
    p
}

const AWS: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
];

fn run(p: &Project, args: &[&str]) -> Run {
    let out = p.command(args).envs(AWS).output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn transcript(p: &Project, args: &[&str]) -> String {
    render(args, &run(p, args), p.path())
}

/// The outcomes of `numbers` and `total` in a `run --json`.
fn assert_outcomes(r: &Run, want: [&str; 2]) {
    assert_eq!(
        Project::outcomes(&r.stdout),
        [
            ("numbers".to_string(), want[0].to_string()),
            ("total".to_string(), want[1].to_string())
        ],
        "{}",
        r.stderr
    );
}

/// A run that succeeded without the remote: both stages ran, after exactly one warning.
fn assert_ran_locally_after_one_warning(r: &Run) {
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_outcomes(r, ["ran", "ran"]);
    assert_eq!(
        r.stderr.matches("warning: remote").count(),
        1,
        "one warning, then the remote is left alone: {}",
        r.stderr
    );
}

fn executions(p: &Project) -> String {
    std::fs::read_to_string(p.path().join("executions.log")).unwrap_or_default()
}

fn assert_intact(p: &Project) {
    let v = run(p, &["cache", "verify"]);
    assert_eq!(v.code, 0, "cache verify: {}{}", v.stdout, v.stderr);
}

#[test]
fn a_fresh_clone_restores_every_stage_from_s3_instead_of_running_it() {
    let server = S3Server::start();
    let text = pipeline(&server.remote_yaml("team"), "; sleep 1");
    let first = clone_with(&text);
    let ran = run(&first, &["run"]);
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(ran.stderr.contains("pushed  2 result(s)"), "{}", ran.stderr);

    let second = clone_with(&text);
    insta::assert_snapshot!(transcript(&second, &["run", "--dry-run"]), @r"
    $ cusa-pipe run --dry-run
    would run  numbers  no record (never ran)
               note: on remote `s3://cache/team`: would be restored
    would run  total    upstream `numbers` must run first
    done: 2 would run in [TIME]
    [exit 0]
    ");
    insta::assert_snapshot!(transcript(&second, &["run"]), @r"
    $ cusa-pipe run
     restored  numbers  saved [TIME]  [HASH]
     restored  total    saved [TIME]  [HASH]
    done: 2 restored in [TIME]
    [exit 0]
    ");
    assert_eq!(
        executions(&second),
        "",
        "nothing executed on the second clone"
    );
    assert_eq!(
        std::fs::read_to_string(second.output("total").join("total.txt")).unwrap(),
        "500500\n"
    );
    // The restored records carry the original duration and log.
    let json = run(&second, &["run", "--json"]);
    assert_outcomes(&json, ["cached", "cached"]);
    assert!(second.latest_log("numbers").contains("# committed output"));
    assert_intact(&second);

    // `--no-remote` runs locally; the JSON vocabulary says `restored` for a third clone.
    let third = clone_with(&text);
    let local = run(&third, &["run", "--no-remote", "--json"]);
    assert_outcomes(&local, ["ran", "ran"]);
    let fourth = clone_with(&text);
    let restored = run(&fourth, &["run", "--json"]);
    assert_outcomes(&restored, ["restored", "restored"]);
    let v: serde_json::Value = serde_json::from_str(&restored.stdout).unwrap();
    assert!(
        v["stages"][0]["seconds"].as_f64().unwrap() >= 1.0,
        "a restored stage reports the time it saved (the recorded duration): {v}"
    );
}

#[test]
fn push_and_pull_move_results_explicitly() {
    let server = S3Server::start();
    let text = pipeline(&server.remote_yaml("explicit"), "");
    // Results made with no remote, pushed afterwards.
    let first = clone_with(&text);
    assert_eq!(run(&first, &["run", "--no-remote"]).code, 0);
    insta::assert_snapshot!(transcript(&first, &["push"]), @"
    $ cusa-pipe push
       pushed  numbers  2 object(s), 3.9 KiB
       pushed  total    2 object(s), 140 B
    pushed 2 result(s) (4 object(s), 4.1 KiB) to remote `s3://cache/explicit`
    [exit 0]
    ");
    insta::assert_snapshot!(transcript(&first, &["push", "total"]), @r"
    $ cusa-pipe push total
      present  total    already on the remote
    pushed 0 result(s) (0 object(s), 0 B) to remote `s3://cache/explicit`
    [exit 0]
    ");
    let second = clone_with(&text);
    insta::assert_snapshot!(transcript(&second, &["pull"]), @"
    $ cusa-pipe pull
     restored  numbers  2 object(s), 3.9 KiB (saves [TIME])
     restored  total    2 object(s), 140 B (saves [TIME])
    restored 2 result(s) (4 object(s), 4.1 KiB) from remote `s3://cache/explicit`; 0 already local, 0 missing
    [exit 0]
    ");
    let again = run(&second, &["run", "--json"]);
    assert_outcomes(&again, ["cached", "cached"]);
    assert_eq!(executions(&second), "");
    // A configuration nobody ran is missing, and its dependents cannot even be named.
    let third = clone_with(&text);
    insta::assert_snapshot!(transcript(&third, &["pull", "--set", "params.n=7"]), @r"
    $ cusa-pipe pull --set params.n=7
      missing  numbers  not on the remote
      missing  total    its inputs are not all known locally (pull or run upstream stages first)
    restored 0 result(s) (0 object(s), 0 B) from remote `s3://cache/explicit`; 0 already local, 2 missing
    [exit 0]
    ");
}

#[test]
fn two_clones_pushing_the_same_stage_at_once_both_succeed_and_the_remote_stays_whole() {
    let server = S3Server::start();
    let text = pipeline(&server.remote_yaml("race"), "; sleep 1");
    let clones: Vec<Project> = (0..3).map(|_| clone_with(&text)).collect();
    let children: Vec<Child> = clones
        .iter()
        .map(|p| {
            p.command(&["run", "--json"])
                .envs(AWS)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let r = wait_child(c);
        assert_eq!(r.code, 0, "clone {i}: {}", r.stderr);
        assert!(!r.stderr.contains("warning"), "clone {i}: {}", r.stderr);
    }
    let fresh = clone_with(&text);
    let r = run(&fresh, &["run", "--json"]);
    assert_outcomes(&r, ["restored", "restored"]);
    assert_intact(&fresh);
    assert_eq!(
        std::fs::read_to_string(fresh.output("total").join("total.txt")).unwrap(),
        "500500\n"
    );
}

#[test]
fn a_server_that_is_down_gives_one_warning_and_a_local_run() {
    let port = free_port(); // nothing listens there
    let p = clone_with(&pipeline(&remote_yaml_on(port, "down"), ""));
    let r = run(&p, &["run", "--json"]);
    assert_ran_locally_after_one_warning(&r);
    assert!(
        r.stderr
            .contains("going on without it (stages run locally)"),
        "{}",
        r.stderr
    );
    assert_intact(&p);
    // Asking for the remote explicitly is an error.
    let push = run(&p, &["push"]);
    assert_eq!(push.code, 1, "{}", push.stderr);
    assert!(push.stderr.contains("failed"), "{}", push.stderr);
}

/// A pipeline whose `numbers` stage writes 600 files of 16 KiB (a push that takes a while)
/// and then touches `pushed-soon`; returns the project and its running `run`.
fn start_a_long_push(
    remote: &str,
    args: &[&str],
    out: Stdio,
    err: Stdio,
) -> (Project, String, Child) {
    let text = pipeline(
        remote,
        "; for i in $(seq 1 600); do head -c 16384 /dev/urandom > ${out}/blob$i; done; touch pushed-soon",
    );
    let p = clone_with(&text);
    let child = p
        .command(args)
        .envs(AWS)
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    wait_for(&p.path().join("pushed-soon"), Duration::from_secs(60));
    (p, text, child)
}

#[test]
fn a_server_killed_mid_push_leaves_the_run_successful_and_the_cache_intact() {
    let mut server = S3Server::start();
    let (p, text, child) = start_a_long_push(
        &server.remote_yaml("killed"),
        &["run", "--json", "-j", "1"],
        Stdio::piped(),
        Stdio::piped(),
    );
    std::thread::sleep(Duration::from_millis(300));
    server.kill();
    let r = wait_child(child);
    assert_ran_locally_after_one_warning(&r);
    assert_intact(&p);
    // A later clone against the dead server runs locally too.
    let q = clone_with(&text);
    let r = run(&q, &["run", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_outcomes(&r, ["ran", "ran"]);
}

#[test]
fn a_client_killed_mid_push_never_leaves_a_record_without_its_objects() {
    let server = S3Server::start();
    let (_p, text, mut child) = start_a_long_push(
        &server.remote_yaml("client-killed"),
        &["run", "-j", "1"],
        Stdio::null(),
        Stdio::null(),
    );
    std::thread::sleep(Duration::from_millis(200));
    let _ = child.kill(); // SIGKILL: no clean-up at all
    let _ = child.wait();
    // Whatever made it to the remote, a fresh clone either restores whole results or runs.
    let q = clone_with(&text);
    let r = run(&q, &["run", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    assert_intact(&q);
    assert_eq!(
        std::fs::read_to_string(q.output("total").join("total.txt")).unwrap(),
        "500500\n"
    );
    let files = std::fs::read_dir(q.output("numbers")).unwrap().count();
    assert_eq!(files, 601, "numbers.txt and 600 blobs");
}

/// A `file://` remote in a folder beside the clones (a shared disk).
fn folder_remote(dir: &Path) -> String {
    format!("remote: file://{}\n", dir.display())
}

#[test]
fn a_flipped_byte_in_a_remote_object_is_caught_and_the_stage_runs_locally() {
    let shared = tempfile::tempdir().unwrap();
    let text = pipeline(&folder_remote(shared.path()), "");
    let first = clone_with(&text);
    assert_eq!(run(&first, &["run"]).code, 0);
    // The object holding numbers.txt, on the remote.
    let numbers = std::fs::read(first.output("numbers").join("numbers.txt")).unwrap();
    let digest = sha256_hex(&numbers);
    let object = shared
        .path()
        .join("objects-v1")
        .join(&digest[..2])
        .join(&digest[2..]);
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[10] ^= 0x01;
    std::fs::write(&object, &bytes).unwrap();
    a_clone_runs_numbers_and_restores_total(&text, &numbers);
}

#[test]
fn a_flipped_byte_in_an_s3_object_is_caught_and_the_stage_runs_locally() {
    let server = S3Server::start();
    let text = pipeline(&server.remote_yaml("flipped"), "");
    let first = clone_with(&text);
    assert_eq!(run(&first, &["run"]).code, 0);
    let numbers = std::fs::read(first.output("numbers").join("numbers.txt")).unwrap();
    let digest = sha256_hex(&numbers);
    // Rewritten on the server with one bit changed (boto3, as another client would).
    let flip = format!(
        "import boto3\n\
         s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', region_name='us-east-1',\n\
             aws_access_key_id='testing', aws_secret_access_key='testing')\n\
         key = 'flipped/objects-v1/{}/{}'\n\
         b = bytearray(s3.get_object(Bucket='cache', Key=key)['Body'].read())\n\
         b[10] ^= 1\n\
         s3.put_object(Bucket='cache', Key=key, Body=bytes(b))\n",
        server.port,
        &digest[..2],
        &digest[2..]
    );
    let status = Command::new(python()).args(["-c", &flip]).status().unwrap();
    assert!(status.success());
    a_clone_runs_numbers_and_restores_total(&text, &numbers);
}

#[test]
fn refused_credentials_give_one_warning_and_a_local_run() {
    // moto checks credentials after its first action (the bucket's creation); ours are unknown.
    let server = S3Server::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "1")]);
    let p = clone_with(&pipeline(&server.remote_yaml("auth"), ""));
    let r = run(&p, &["run", "--json"]);
    assert_ran_locally_after_one_warning(&r);
    assert!(
        r.stderr.contains("403"),
        "the server's refusal is shown: {}",
        r.stderr
    );
    assert_intact(&p);
}

/// A fresh clone: `numbers` (whose remote object is corrupt) runs, `total` is restored.
fn a_clone_runs_numbers_and_restores_total(text: &str, numbers: &[u8]) {
    let second = clone_with(text);
    let r = run(&second, &["run", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_outcomes(&r, ["ran", "restored"]);
    assert!(
        r.stderr.contains("does not match its digest"),
        "the corrupt object is named: {}",
        r.stderr
    );
    assert_intact(&second);
    assert_eq!(
        std::fs::read(second.output("numbers").join("numbers.txt")).unwrap(),
        numbers
    );
}

#[test]
fn remote_gc_keeps_the_current_results_and_what_a_concurrent_push_just_wrote() {
    let shared = tempfile::tempdir().unwrap();
    let text = pipeline(&folder_remote(shared.path()), "");
    let first = clone_with(&text);
    assert_eq!(run(&first, &["run"]).code, 0);
    assert_eq!(run(&first, &["run", "--set", "params.n=2000"]).code, 0);

    // Dry run by default; with no grace the n=2000 results (not the pipeline's now) would go.
    let dry = run(
        &first,
        &[
            "cache",
            "gc",
            "--remote",
            "--grace",
            "0s",
            "--keep-runs",
            "0",
        ],
    );
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(
        dry.stdout.contains("would delete: numbers"),
        "{}",
        dry.stdout
    );
    assert!(dry.stdout.contains("would delete: total"), "{}", dry.stdout);
    assert!(
        dry.stdout.contains("dry run: nothing deleted"),
        "{}",
        dry.stdout
    );
    let check = clone_with(&text);
    let r = run(&check, &["run", "--set", "params.n=2000", "--json"]);
    // A dry run deletes nothing.
    assert_outcomes(&r, ["restored", "restored"]);

    // The last runs that pushed are roots: n=2000 was pushed by the newest run.
    let kept = run(
        &first,
        &["cache", "gc", "--remote", "--grace", "0s", "--delete"],
    );
    assert!(
        kept.stdout.contains("deleted 0 result(s)"),
        "{}",
        kept.stdout
    );

    // A teammate's push of another pipeline moments ago, unknown to this one: young, kept.
    let teammate = clone_with(&pipeline(&folder_remote(shared.path()), "; echo other"));
    assert_eq!(run(&teammate, &["run"]).code, 0);
    let swept = run(
        &first,
        &["cache", "gc", "--remote", "--keep-runs", "0", "--delete"],
    );
    assert_eq!(swept.code, 0, "{}", swept.stderr);
    assert!(
        swept.stdout.contains("deleted 0 result(s)"),
        "{}",
        swept.stdout
    );

    // Past the grace period and with no run roots, only the current results survive.
    let old = run(
        &first,
        &[
            "cache",
            "gc",
            "--remote",
            "--grace",
            "0s",
            "--keep-runs",
            "0",
            "--delete",
        ],
    );
    assert_eq!(old.code, 0, "{}", old.stderr);
    // n=2000's two results and the teammate's `numbers` (its `total` is the current one:
    // same input bytes, same key).
    assert!(old.stdout.contains("deleted 3 result(s)"), "{}", old.stdout);
    let current = clone_with(&text);
    let r = run(&current, &["run", "--json"]);
    assert_outcomes(&r, ["restored", "restored"]);
    let gone = clone_with(&text);
    let r = run(&gone, &["run", "--set", "params.n=2000", "--json"]);
    assert_outcomes(&r, ["ran", "ran"]);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
}

#[test]
fn two_clones_sharing_one_cache_folder_run_at_once_and_keep_it_consistent() {
    // Two checkouts (two machines) with `--cache-dir` on one shared disk.
    let cache = tempfile::tempdir().unwrap();
    let text = pipeline("", "; sleep 1");
    let clones: Vec<Project> = (0..2).map(|_| clone_with(&text)).collect();
    let dir = cache.path().to_str().unwrap().to_string();
    let children: Vec<Child> = clones
        .iter()
        .map(|p| p.spawn(&["--cache-dir", &dir, "run", "--json"]))
        .collect();
    let mut executed = 0;
    for (c, p) in children.into_iter().zip(&clones) {
        let r = wait_child(c);
        assert_eq!(r.code, 0, "{}", r.stderr);
        executed += executions(p).lines().count();
        assert_eq!(
            std::fs::read_to_string(
                PathBuf::from(p.run(&["--cache-dir", &dir, "path", "total"]).stdout.trim())
                    .join("total.txt")
            )
            .unwrap(),
            "500500\n"
        );
    }
    assert_eq!(executed, 2, "each stage executed once across both clones");
    let v = clones[0].run(&["--cache-dir", &dir, "cache", "verify"]);
    assert_eq!(v.code, 0, "{}", v.stdout);
}

#[test]
fn remote_mistakes_are_located_and_explained() {
    let p = clone_with(&pipeline("remote:\n  url: ftp://example.org/cache\n", ""));
    insta::assert_snapshot!(transcript(&p, &["run"]), @"
    $ cusa-pipe run
    error: `ftp://` is not a remote this build can reach; use s3://, gs://, az://, http(s):// or file://
      --> pipeline.yaml:3:8
      |
    3 |   url: ftp://example.org/cache
      |        ^
      = help: e.g. `remote: s3://bucket/prefix`, or a name from ~/.config/cusa-pipe/config.yaml
    [exit 2]
    ");
    let q = clone_with(&pipeline("remote: team\n", ""));
    insta::assert_snapshot!(transcript(&q, &["run"]), @"
    $ cusa-pipe run
    error: the pipeline's `remote:` names remote `team`, which [PROJECT]/.cusa-pipe-user.yaml does not declare (it declares none: add it under `remotes:`, or give a URL)
    [exit 2]
    ");
    let r = clone_with(&pipeline(
        "remote:\n  url: s3://cache/x\n  options: {endpoint_urll: \"http://127.0.0.1:9\"}\n",
        "",
    ));
    insta::assert_snapshot!(transcript(&r, &["run"]), @r#"
    $ cusa-pipe run
    error: option `endpoint_urll`: not an option of s3 stores (see object_store's config keys, e.g. `endpoint`, `region`, `allow_http`)
      --> pipeline.yaml:4:28
      |
    4 |   options: {endpoint_urll: "http://127.0.0.1:[PORT]"}
      |                            ^
      = help: e.g. `remote: s3://bucket/prefix`, or a name from ~/.config/cusa-pipe/config.yaml
    [exit 2]
    "#);
    let s = clone_with(&pipeline("", ""));
    insta::assert_snapshot!(transcript(&s, &["push"]), @"
    $ cusa-pipe push
    error: no remote: pipeline.yaml has no `remote:`, no `--remote NAME|URL` was given and the user config has no `default`
    [exit 2]
    ");
}

#[test]
fn a_remote_named_in_the_user_config_is_used_by_default() {
    let shared = tempfile::tempdir().unwrap();
    let text = pipeline("", "");
    let first = clone_with(&text);
    let user = format!(
        "remotes:\n  team:\n    url: file://{}\ndefault: team\n",
        shared.path().display()
    );
    first.write(".cusa-pipe-user.yaml", &user);
    let r = run(&first, &["run"]);
    assert!(r.stderr.contains("to remote `team`"), "{}", r.stderr);
    let second = clone_with(&text);
    second.write(".cusa-pipe-user.yaml", &user.replace("default: team\n", ""));
    let r = run(&second, &["run", "--json"]);
    // No default, no remote.
    assert_outcomes(&r, ["ran", "ran"]);
    let third = clone_with(&text);
    third.write(".cusa-pipe-user.yaml", &user.replace("default: team\n", ""));
    let r = run(&third, &["run", "--remote", "team", "--json"]);
    assert_outcomes(&r, ["restored", "restored"]);
}

#[test]
fn a_large_object_goes_up_in_parts_and_comes_back_in_ranges_byte_for_byte() {
    let server = S3Server::start();
    // 40 MiB + 3 bytes: above the multipart threshold, not a whole number of parts.
    let text = format!(
        "version: 1\n{}stages:\n  big:\n    kind: command\n    with:\n      run: head -c 41943043 /dev/urandom > ${{out}}/weights.bin\n",
        server.remote_yaml("large")
    );
    let first = clone_with(&text);
    let r = run(&first, &["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("pushed  1 result(s), 40.0 MiB"),
        "{}",
        r.stderr
    );
    let second = clone_with(&text);
    let r = run(&second, &["run", "--json"]);
    assert_eq!(
        Project::outcomes(&r.stdout),
        [("big".into(), "restored".into())],
        "{}",
        r.stderr
    );
    let a = std::fs::read(first.output("big").join("weights.bin")).unwrap();
    let b = std::fs::read(second.output("big").join("weights.bin")).unwrap();
    assert_eq!(a.len(), 41_943_043);
    assert!(a == b, "the restored file differs");
    assert_intact(&second);
}
