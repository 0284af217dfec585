//! Trust boundaries, tried as an attacker and as a careless user would: a team remote (or a
//! shared cache folder) is untrusted input, parameters never become shell syntax, a dataset
//! neither loses nor borrows files, a resumed download never splices two versions, and the
//! command line behaves on a closed pipe or a read-only cache. One test per defect; each failed
//! before its fix.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::dataset::{column, images};
use crate::support::*;

/// One command stage pushed to a `file://` remote.
fn remote_project(shared: &Path) -> String {
    format!(
        "version: 1\nremote: file://{}\nstages:\n  numbers:\n    kind: command\n    with:\n      run: echo ran >> executions.log; seq 1 100 > ${{out}}/numbers.txt\n",
        shared.display()
    )
}

fn clone_of(text: &str) -> Project {
    let p = Project::new();
    p.write("pipeline.yaml", text);
    p
}

/// Every file below `dir`, sorted.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

/// The only run record under `root/runs-v1`.
fn only_record(root: &Path) -> PathBuf {
    let found = files_below(&root.join("runs-v1"));
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

/// The outcome of the one stage `numbers` in a `run --json`.
fn numbers_outcome(r: &Run) -> String {
    let outcomes = Project::outcomes(&r.stdout);
    assert_eq!(outcomes.len(), 1, "{}", r.stderr);
    outcomes[0].1.clone()
}

/// Writes `bytes` as an object of the remote (named by their sha256); returns the digest.
fn put_object(shared: &Path, bytes: &[u8]) -> String {
    let digest = sha256_hex(bytes);
    let path = shared
        .join("objects-v1")
        .join(&digest[..2])
        .join(&digest[2..]);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    digest
}

/// Edits the remote's run record (as someone with write access to the team cache would).
fn tamper_record(shared: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = only_record(shared);
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut record);
    std::fs::write(&path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
}

fn assert_verified(p: &Project) {
    let v = p.run(&["cache", "verify"]);
    assert_eq!(v.code, 0, "cache verify: {}{}", v.stdout, v.stderr);
    assert!(v.stdout.contains("cache is intact"), "{}", v.stdout);
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

/// Defect 1: A manifest or a record from the remote that names paths outside the cache: nothing is
/// written there, by `run` or `pull`; the stage runs locally after a warning.
#[test]
fn remote_entries_naming_paths_outside_the_cache_write_nothing_there() {
    let victim = tempfile::tempdir().unwrap();
    let evil: [(&str, String); 4] = [
        (
            "parent",
            format!(
                "../../../../../../../../..{}/parent.txt",
                victim.path().display()
            ),
        ),
        (
            "absolute",
            format!("{}/absolute.txt", victim.path().display()),
        ),
        ("inner dots", "a/../../../../../../escape.txt".to_string()),
        ("empty component", "a//b.txt".to_string()),
    ];
    for (case, path) in evil {
        let shared = tempfile::tempdir().unwrap();
        let text = remote_project(shared.path());
        let first = clone_of(&text);
        assert_eq!(first.run(&["run"]).code, 0);
        let payload = put_object(shared.path(), b"pwned\n");
        let manifest = serde_json::json!({"entries": [
            {"path": path, "sha256": payload, "size": 6, "type": "file"}
        ]});
        let manifest = put_object(shared.path(), &serde_json::to_vec(&manifest).unwrap());
        tamper_record(shared.path(), |r| r["output"] = manifest.clone().into());

        // `pull` refuses it and writes nothing.
        let puller = clone_of(&text);
        let pulled = puller.run(&["pull"]);
        assert_eq!(pulled.code, 1, "{case}: {}", pulled.stderr);
        assert!(
            pulled.stderr.contains("is refused"),
            "{case}: {}",
            pulled.stderr
        );
        // `run` refuses it, runs the stage, and its push replaces the bad record.
        let runner = clone_of(&text);
        let r = runner.run(&["run", "--json"]);
        assert_eq!(r.code, 0, "{case}: {}", r.stderr);
        assert_eq!(numbers_outcome(&r), "ran", "{case}: {}", r.stderr);
        assert!(
            r.stderr.contains("warning: remote") && r.stderr.contains("is refused"),
            "{case}: {}",
            r.stderr
        );
        assert!(r.stderr.contains("record replaced"), "{case}: {}", r.stderr);
        assert!(
            is_empty_dir(victim.path()),
            "{case}: something was written outside the cache"
        );
        for p in [&puller, &runner] {
            assert!(!p.path().join("escape.txt").exists(), "{case}");
            assert!(!p.path().join("cache/escape.txt").exists(), "{case}");
            assert_verified(p);
        }
        // The next teammate restores the good result.
        let next = clone_of(&text);
        let r = next.run(&["run", "--json"]);
        assert_eq!(numbers_outcome(&r), "restored", "{case}: {}", r.stderr);
    }
}

/// Defect 1: A record whose log path leaves the cache: neither written on restore nor read on push.
#[test]
fn a_remote_record_whose_log_leaves_the_cache_is_refused() {
    let victim = tempfile::tempdir().unwrap();
    for log in [
        format!(
            "logs-v1/../../../../../../../..{}/x.log",
            victim.path().display()
        ),
        format!("{}/x.log", victim.path().display()),
        "logs-v1/numbers/x.txt".to_string(),
    ] {
        let shared = tempfile::tempdir().unwrap();
        let text = remote_project(shared.path());
        assert_eq!(clone_of(&text).run(&["run"]).code, 0);
        tamper_record(shared.path(), |r| r["log"] = log.clone().into());
        let second = clone_of(&text);
        let r = second.run(&["run", "--json"]);
        assert_eq!(r.code, 0, "{log}: {}", r.stderr);
        assert_eq!(numbers_outcome(&r), "ran", "{log}: {}", r.stderr);
        assert!(r.stderr.contains("is unreadable"), "{log}: {}", r.stderr);
        assert!(is_empty_dir(victim.path()), "{log}");
    }
}

/// Defect 5: A flipped byte in a remote object, a garbled remote record: the next push that has the
/// good result repairs it (`run` after the failed restore, `run --force`, `push --verify`).
#[test]
fn a_corrupt_remote_entry_is_repaired_by_the_next_push_that_has_the_good_one() {
    let shared = tempfile::tempdir().unwrap();
    let text = remote_project(shared.path());
    let first = clone_of(&text);
    assert_eq!(first.run(&["run"]).code, 0);
    let numbers = std::fs::read(first.output("numbers").join("numbers.txt")).unwrap();
    let object = {
        let d = sha256_hex(&numbers);
        shared.path().join("objects-v1").join(&d[..2]).join(&d[2..])
    };
    let flip = || {
        let mut b = std::fs::read(&object).unwrap();
        b[3] ^= 1;
        std::fs::write(&object, b).unwrap();
    };
    let restores = |why: &str| {
        let p = clone_of(&text);
        let r = p.run(&["run", "--json"]);
        assert_eq!(r.code, 0, "{why}: {}", r.stderr);
        assert_eq!(numbers_outcome(&r), "restored", "{why}: {}", r.stderr);
        assert_eq!(
            std::fs::read(p.output("numbers").join("numbers.txt")).unwrap(),
            numbers
        );
    };

    // A teammate's restore fails on the flipped byte; its run pushes the good copy back.
    flip();
    let second = clone_of(&text);
    let r = second.run(&["run", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("does not match its digest"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("repaired  `numbers`"), "{}", r.stderr);
    restores("after a run repaired it");

    // `push` trusts a record that is there; `push --verify` checks and repairs.
    flip();
    let push = first.run(&["push"]);
    assert!(
        push.stderr.contains("already on the remote"),
        "{}",
        push.stderr
    );
    let verify = first.run(&["push", "--verify"]);
    assert_eq!(verify.code, 0, "{}", verify.stderr);
    assert!(verify.stderr.contains("repaired"), "{}", verify.stderr);
    restores("after push --verify");

    // `run --force` distrusts the remote's copy too.
    flip();
    let forced = first.run(&["run", "--force", "numbers"]);
    assert_eq!(forced.code, 0, "{}", forced.stderr);
    assert!(
        forced.stderr.contains("repaired  `numbers`"),
        "{}",
        forced.stderr
    );
    restores("after run --force");

    // A garbled record is replaced.
    std::fs::write(only_record(shared.path()), b"{ not a record").unwrap();
    let third = clone_of(&text);
    let r = third.run(&["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("record replaced"), "{}", r.stderr);
    restores("after the record was replaced");
}

/// Defect 7: A `file://` remote that cannot be created is one warning and a local run (as every
/// other remote failure of a run); `push` fails with exit 1.
#[test]
fn a_folder_remote_that_cannot_be_created_is_a_warning_and_a_local_run() {
    let text = "version: 1\nremote: file:///proc/cusa-pipe-no-such-remote/cache\nstages:\n  numbers:\n    kind: command\n    with:\n      run: seq 1 10 > ${out}/numbers.txt\n";
    let p = clone_of(text);
    let r = p.run(&["run", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stderr.matches("warning: remote").count(),
        1,
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("going on without it"), "{}", r.stderr);
    assert_eq!(numbers_outcome(&r), "ran");
    let push = p.run(&["push"]);
    assert_eq!(push.code, 1, "{}", push.stderr);
    assert!(
        push.stderr.contains("/proc/cusa-pipe-no-such-remote"),
        "{}",
        push.stderr
    );
}

/// Defect 2: Parameter values are substituted into `run:` as literal text, never as shell syntax,
/// bare, in double or in single quotes, with `shell: true` or `false`; `:raw` opts out.
#[test]
fn parameters_cannot_inject_commands() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
params:
  name: "x; touch pwned"
stages:
  greet:
    kind: command
    with:
      run: printf '%s\n' ${params.name} > ${out}/bare.txt; printf '%s\n' "${params.name}" > ${out}/double.txt; printf '%s\n' '${params.name}' > ${out}/single.txt
  split:
    kind: command
    with:
      shell: false
      run: python3 -c "import sys, json; open(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))" ${out}/args.json ${params.name} "${params.name}"
"#,
    );
    let nasty = [
        "x; touch pwned",
        "$(touch pwned)",
        "`touch pwned`",
        "it's'; touch pwned; echo '",
        "say \"hi\"; touch pwned; echo \"",
        "a\\\" ; touch pwned",
    ];
    for value in nasty {
        let set = format!("params.name={value}");
        let r = p.run(&["run", "--set", &set]);
        assert_eq!(r.code, 0, "{value}: {}", r.stderr);
        assert!(
            !p.path().join("pwned").exists(),
            "{value}: a command was injected"
        );
        let out = |stage: &str, f: &str| {
            let dir = PathBuf::from(
                p.run(&["path", stage, "--set", &set])
                    .stdout
                    .trim()
                    .to_string(),
            );
            std::fs::read_to_string(dir.join(f)).unwrap()
        };
        for f in ["bare.txt", "double.txt", "single.txt"] {
            assert_eq!(out("greet", f), format!("{value}\n"), "{value}: {f}");
        }
        let args: Vec<String> = serde_json::from_str(&out("split", "args.json")).unwrap();
        assert_eq!(args, [value, value], "{value}");
    }
}

/// `${params.KEY:raw}` is the explicit way to paste shell syntax (several flags).
#[test]
fn a_raw_parameter_is_pasted_as_shell_syntax() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "version: 1\nparams:\n  flags: \"-a -b\"\nstages:\n  flags:\n    kind: command\n    with:\n      run: printf '[%s]' ${params.flags:raw} > ${out}/raw.txt; printf '[%s]' ${params.flags} > ${out}/quoted.txt\n",
    );
    assert_eq!(p.run(&["run"]).code, 0);
    let out = p.output("flags");
    assert_eq!(
        std::fs::read_to_string(out.join("raw.txt")).unwrap(),
        "[-a][-b]"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("quoted.txt")).unwrap(),
        "[-a -b]"
    );
}

/// Defect 3: Two files under one image id: an error naming both rows, never a silent merge.
#[test]
fn an_image_id_given_to_two_files_is_an_error() {
    let p = Project::new();
    images(&p, &["x/1.png", "x/2.png"]);
    p.write(
        "t.csv",
        "file,caption,id\nx/1.png,a dog,7\nx/1.png,a puppy,7\nx/2.png,a cat,7\n",
    );
    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  d:\n    kind: dataset\n    inputs: {t: t.csv, images: images}\n    with:\n      format: table\n      annotations: ${inputs.t}\n      images: ${inputs.images}\n      on_error: skip\n      columns: {image: file, caption: caption, image_id: id}\n",
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("row 3: image id `7` names two files: `x/1.png` (row 1) and `x/2.png`"),
        "{}",
        r.stderr
    );
    assert!(
        !p.path()
            .join("cache/runs-v1")
            .read_dir()
            .unwrap()
            .any(|e| { e.unwrap().path().read_dir().unwrap().next().is_some() })
    );
}

/// Defect 4: Image paths that leave the `images:` root are refused (or, with `on_error: skip`,
/// dropped and reported), never read.
#[test]
fn image_paths_outside_the_images_root_are_refused() {
    let p = Project::new();
    images(&p, &["x/1.png"]);
    // Files that exist, outside the root.
    let outside = p.path().join("outside.png");
    std::fs::copy(p.path().join("images/x/1.png"), &outside).unwrap();
    p.write(
        "t.csv",
        &format!(
            "file,caption\nx/1.png,a dog\n../outside.png,a cat\n{},a bird\nx/./1.png,a fish\n",
            outside.display()
        ),
    );
    let pipeline = |on_error: &str| {
        format!(
            "version: 1\nstages:\n  d:\n    kind: dataset\n    inputs: {{t: t.csv, images: images}}\n    with:\n      format: table\n      annotations: ${{inputs.t}}\n      images: ${{inputs.images}}\n      on_error: {on_error}\n      columns: {{image: file, caption: caption}}\n"
        )
    };
    p.write("pipeline.yaml", &pipeline("fail"));
    let r = p.run(&["run"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("3 × image path not below the images root"),
        "{}",
        r.stderr
    );
    p.write("pipeline.yaml", &pipeline("skip"));
    let r = p.run(&["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = p.output("d");
    assert_eq!(column(&out.join("images.parquet"), "path"), ["x/1.png"]);
    let report = std::fs::read_to_string(out.join("report.json")).unwrap();
    assert!(
        report.contains("image path not below the images root"),
        "{report}"
    );
}

/// A download stage of `/data.bin` from a server without validators that cuts the first transfer of
/// `first` at 250,000 bytes, then serves `then`; returns the server, the project and the run.
fn cut_without_validator(first: &[u8], then: &[u8], extra: &str) -> (HttpServer, Project, Run) {
    let server = HttpServer::start(vec![(
        "/data.bin",
        vec![
            Reply::CutNoValidator(first.to_vec(), 250_000),
            Reply::NoValidator(then.to_vec()),
        ],
    )]);
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        &format!(
            "version: 1\nstages:\n  fetch:\n    kind: download\n    with:\n      url: {}\n      retries: 2\n      backoff_ms: 20\n{extra}",
            server.url("/data.bin")
        ),
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    (server, p, r)
}

/// Defect 6: An unpinned download cut off mid-transfer by a server that gives no validator restarts
/// from zero: the file changed meanwhile, and a resume would splice the two versions.
#[test]
fn a_download_without_a_validator_restarts_instead_of_splicing_two_versions() {
    let (v1, v2) = (bytes(600_000, 11), bytes(600_000, 12));
    let (server, p, _) = cut_without_validator(&v1, &v2, "");
    assert_eq!(server.requests(), ["GET /data.bin", "GET /data.bin"]);
    assert_eq!(
        std::fs::read(p.output("fetch").join("data.bin")).unwrap(),
        v2
    );
    assert!(p.latest_log("fetch").contains("restarting from zero"));
}

/// A pinned digest makes a resume safe even without a validator (the whole file is checked).
#[test]
fn a_pinned_download_without_a_validator_still_resumes() {
    let body = bytes(600_000, 13);
    let pin = format!("      sha256: {}\n", sha256_hex(&body));
    let (server, p, _) = cut_without_validator(&body, &body, &pin);
    assert_eq!(
        server.requests(),
        ["GET /data.bin", "GET /data.bin range=250000-"]
    );
    assert_eq!(
        std::fs::read(p.output("fetch").join("data.bin")).unwrap(),
        body
    );
}

/// Two stages whose outputs share one object (`f.txt`, same content).
fn shared_object_project() -> Project {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  a:\n    kind: command\n    with:\n      run: echo same > ${out}/f.txt\n  b:\n    kind: command\n    with:\n      run: echo same > ${out}/f.txt; echo b > ${out}/g.txt\n",
    );
    assert_eq!(p.run(&["run"]).code, 0);
    p
}

fn make_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Defect 8: A file replaced inside one tree (a new inode) leaves the shared object intact: the
/// tree is rebuilt from it, nothing is quarantined, and verify stays consistent for both stages.
#[test]
fn a_file_replaced_in_a_tree_rebuilds_that_tree_and_keeps_the_shared_object() {
    let p = shared_object_project();
    let tree = p.output("a");
    make_writable(&tree);
    std::fs::remove_file(tree.join("f.txt")).unwrap();
    std::fs::write(tree.join("f.txt"), "edited\n").unwrap();
    let r = p.run(&["run", "a", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        Project::outcomes(&r.stdout),
        [("a".to_string(), "cached".to_string())]
    );
    assert_eq!(
        std::fs::read_to_string(p.output("a").join("f.txt")).unwrap(),
        "same\n"
    );
    assert_verified(&p);
    let r = p.run(&["run", "--json"]);
    assert_eq!(
        Project::outcomes(&r.stdout),
        [
            ("a".to_string(), "cached".to_string()),
            ("b".to_string(), "cached".to_string())
        ]
    );
}

/// Defect 8: A shared object damaged in place and recovered by one stage's run: verify names the
/// other stage's stale tree, and `--repair` rebuilds it from the recovered object instead of
/// dropping a valid result.
#[test]
fn verify_after_a_recovery_rebuilds_the_other_tree_instead_of_dropping_its_result() {
    use std::os::unix::fs::PermissionsExt;
    let p = shared_object_project();
    let file = p.output("a").join("f.txt");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&file, "damaged\n").unwrap();
    let r = p.run(&["run", "a", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        Project::outcomes(&r.stdout),
        [("a".to_string(), "ran".to_string())]
    );
    let v = p.run(&["cache", "verify"]);
    assert_eq!(v.code, 1, "{}", v.stdout);
    assert!(
        v.stdout.contains("stage `b`") && v.stdout.contains("--repair rebuilds the tree"),
        "{}",
        v.stdout
    );
    let repair = p.run(&["cache", "verify", "--repair"]);
    assert_eq!(repair.code, 0, "{}", repair.stdout);
    assert!(repair.stdout.contains("rebuilt tree"), "{}", repair.stdout);
    assert!(
        !repair.stdout.contains("removed record"),
        "{}",
        repair.stdout
    );
    let r = p.run(&["run", "--json"]);
    assert_eq!(
        Project::outcomes(&r.stdout),
        [
            ("a".to_string(), "cached".to_string()),
            ("b".to_string(), "cached".to_string())
        ],
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read_to_string(p.output("b").join("f.txt")).unwrap(),
        "same\n"
    );
    assert_verified(&p);
}

/// Defect 9: A closed standard output (`cusa-pipe status | head -1`) is a quiet exit, not a panic.
#[test]
fn a_closed_stdout_is_a_quiet_exit() {
    let p = shared_object_project();
    for args in [
        &["status"][..],
        &["dag"],
        &["path", "a"],
        &["cache", "verify"],
        &["run", "--json"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = p
            .command(args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
    }
}

/// Runs the binary in a private mount namespace where the project's cache is a read-only bind
/// mount: a real read-only file system ("Read-only file system"), even for root.
fn read_only_cache_run(p: &Project, args: &[&str]) -> Run {
    let script = format!(
        "mount --bind -o ro '{0}' '{0}' && exec \"$@\"",
        p.path().join("cache").display()
    );
    let out = p
        .command_under("unshare", &["-rm", "sh", "-c", &script, "sh"], args)
        .output()
        .expect("unshare runs (util-linux)");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Defect 10: A read-only cache (a team's shared folder): `status`, `path`, `metrics`, `cache
/// verify` and `cache du` read it; `run` says in one clear line that it must write.
#[test]
fn a_read_only_cache_is_readable_and_a_writing_command_says_why_it_cannot() {
    let p = shared_object_project();
    let status = read_only_cache_run(&p, &["status"]);
    assert_eq!(status.code, 0, "{}", status.stderr);
    assert!(status.stdout.contains("fresh"), "{}", status.stdout);
    let path = read_only_cache_run(&p, &["path", "a"]);
    assert_eq!(path.code, 0, "{}", path.stderr);
    assert_eq!(path.stdout.trim(), p.output("a").display().to_string());
    for args in [&["cache", "verify"][..], &["cache", "du"], &["metrics"]] {
        let r = read_only_cache_run(&p, args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
    }
    let run = read_only_cache_run(&p, &["run", "--force-all"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("is read-only"), "{}", run.stderr);
    assert!(run.stderr.contains("--cache-dir"), "{}", run.stderr);
    assert_eq!(
        run.stderr.matches("Read-only file system").count(),
        1,
        "the cause once: {}",
        run.stderr
    );
}

/// Defect 11: Messages: each names the file, the key (or the `--set`) and what to do; a mistake in
/// the pipeline is exit 2.
#[test]
fn careless_inputs_get_clear_messages() {
    let mut transcript = String::new();
    let cases: &[(&str, &[u8], &[&str])] = &[
        ("empty pipeline file", b"", &["run"]),
        ("comments only", b"# nothing yet\n", &["status"]),
        ("not a mapping", b"- a\n- b\n", &["run"]),
        (
            "not UTF-8",
            b"version: 1\nstages:\n  a:\n    kind: command\n    with: {run: \"caf\xe9\"}\n",
            &["run"],
        ),
        (
            "a stage named ..",
            b"version: 1\nstages:\n  \"..\":\n    kind: command\n    with: {run: x}\n",
            &["run"],
        ),
        (
            "a --set of the wrong type",
            b"version: 1\nstages:\n  a:\n    kind: command\n    with: {run: x}\n",
            &["run", "--set", "a.with.run=[1, 2]"],
        ),
        (
            "a missing input",
            b"version: 1\nstages:\n  a:\n    kind: command\n    inputs: {script: gen.py}\n    with:\n      run: python3 ${inputs.script}\n",
            &["run"],
        ),
        (
            "a bad filename",
            b"version: 1\nstages:\n  d:\n    kind: download\n    with:\n      url: http://127.0.0.1:9/a.bin\n      filename: ../a.bin\n",
            &["run"],
        ),
        (
            "a URL that names no file",
            b"version: 1\nstages:\n  d:\n    kind: download\n    with:\n      url: http://127.0.0.1:9/a/..\n",
            &["run"],
        ),
    ];
    for (name, yaml, args) in cases {
        let p = Project::new();
        std::fs::write(p.path().join("pipeline.yaml"), yaml).unwrap();
        let r = p.run(args);
        assert_eq!(r.code, 2, "{name}: {}", r.stderr);
        assert!(!r.stderr.contains("(stage ``)"), "{name}: {}", r.stderr);
        transcript.push_str(&format!("## {name}\n{}\n", render(args, &r, p.path())));
    }
    insta::assert_snapshot!(transcript);
}

/// Defect 11: A folder input holding a dangling symbolic link names the link, not "does not exist".
#[test]
fn a_dangling_link_inside_an_input_folder_is_named() {
    let p = Project::new();
    p.write("data/a.txt", "a\n");
    std::os::unix::fs::symlink("no-such-target", p.path().join("data/broken")).unwrap();
    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  a:\n    kind: command\n    inputs: {data: data}\n    with:\n      run: ls ${inputs.data} > ${out}/ls.txt\n",
    );
    let r = p.run(&["run"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains("`broken` inside data is a symbolic link whose target does not exist"),
        "{}",
        r.stderr
    );
}

/// Defect 11: `cache verify` names the unreadable record it found.
#[test]
fn verify_names_an_unreadable_record() {
    let p = shared_object_project();
    let record = only_record_of(&p.path().join("cache"), "a");
    std::fs::write(&record, b"{}").unwrap();
    let v = p.run(&["cache", "verify"]);
    assert_eq!(v.code, 1);
    let rel = record
        .strip_prefix(p.path().join("cache"))
        .unwrap()
        .display()
        .to_string();
    assert!(
        v.stdout.contains(&format!("unreadable run record {rel}")),
        "{}",
        v.stdout
    );
}

fn only_record_of(cache: &Path, stage: &str) -> PathBuf {
    files_below(&cache.join("runs-v1"))
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(p).is_ok_and(|t| t.contains(&format!("\"stage\": \"{stage}\"")))
        })
        .unwrap()
}
