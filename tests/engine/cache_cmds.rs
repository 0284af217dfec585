//! The store under damage and maintenance: verify, repair, gc, du.

use std::os::unix::fs::PermissionsExt;

use crate::incremental::numbers_project;
use crate::support::Project;

/// Flips one byte of a committed file (the object and the tree share the inode).
fn flip_byte(path: &std::path::Path) {
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    perms.set_mode(0o644);
    std::fs::set_permissions(path, perms).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_flipped_byte_is_detected_by_verify_and_by_the_next_run() {
    let p = numbers_project();
    assert_eq!(p.run(&["run"]).code, 0);
    flip_byte(&p.output("numbers").join("numbers.txt"));

    let v = p.run(&["cache", "verify"]);
    assert_eq!(v.code, 1, "{}", v.stdout);
    assert!(v.stdout.contains("damaged  object "), "{}", v.stdout);
    assert!(
        v.stdout.contains("problem  stage `numbers`"),
        "{}",
        v.stdout
    );

    // The next run must not use the damaged result: it reruns `numbers` and says why, and
    // early cutoff keeps `total` (the recomputed bytes equal the original ones).
    let r = p.run(&["run", "-j", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "run  numbers  cached output is damaged (`numbers.txt` does not match its digest)"
        ),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("cached  total"), "{}", r.stderr);
    let v = p.run(&["cache", "verify"]);
    assert_eq!(v.code, 0, "{}", v.stdout);
    assert!(
        p.path()
            .join("cache/quarantine-v1")
            .read_dir()
            .unwrap()
            .count()
            >= 1,
        "the damaged object is kept aside"
    );
}

#[test]
fn verify_repair_drops_damaged_results_so_they_are_recomputed() {
    let p = numbers_project();
    assert_eq!(p.run(&["run"]).code, 0);
    flip_byte(&p.output("total").join("total.txt"));
    let v = p.run(&["cache", "verify", "--repair"]);
    assert_eq!(v.code, 0, "{}", v.stdout);
    assert!(
        v.stdout.contains("repaired removed record: stage `total`"),
        "{}",
        v.stdout
    );
    assert!(
        p.run(&["status"])
            .stdout
            .contains("stale  total    cached result was removed")
    );
    assert_eq!(p.run(&["run"]).code, 0);
    assert_eq!(
        std::fs::read_to_string(p.output("total").join("total.txt")).unwrap(),
        "499500\n"
    );
    assert_eq!(p.run(&["cache", "verify"]).code, 0);
}

#[test]
fn gc_keeps_the_current_results_and_removes_the_rest() {
    let p = numbers_project();
    assert_eq!(p.run(&["run"]).code, 0);
    assert_eq!(p.run(&["run", "--set", "params.n=10"]).code, 0);
    assert_eq!(p.run(&["run"]).code, 0);

    // The last run used only current results; keeping one run removes the n=10 ones.
    let dry = p.run(&["cache", "gc", "--dry-run", "--keep-runs", "1"]);
    assert_eq!(dry.code, 0);
    assert!(
        dry.stdout.contains("would remove: numbers ("),
        "{}",
        dry.stdout
    );
    assert!(
        dry.stdout.contains("would remove: total ("),
        "{}",
        dry.stdout
    );
    assert!(
        dry.stdout.contains("would remove 2 result(s)"),
        "{}",
        dry.stdout
    );
    let before = p.run(&["cache", "du"]).stdout;

    let gc = p.run(&["cache", "gc", "--keep-runs", "1"]);
    assert!(gc.stdout.contains("removed 2 result(s)"), "{}", gc.stdout);
    assert!(gc.stdout.contains("kept 3 result(s)"), "{}", gc.stdout);
    assert_ne!(before, p.run(&["cache", "du"]).stdout);
    let r = p.run(&["run", "--json"]);
    assert!(
        Project::outcomes(&r.stdout)
            .iter()
            .all(|(_, o)| o == "cached")
    );
    assert_eq!(p.run(&["cache", "verify"]).code, 0);
    // With --keep-runs 5 the n=10 results would have stayed: they are gone now.
    let r = p.run(&["run", "--set", "params.n=10", "--json", "numbers"]);
    assert_eq!(
        Project::outcomes(&r.stdout),
        vec![("numbers".to_string(), "ran".to_string())]
    );
}

#[test]
fn du_lists_stage_sizes() {
    let p = numbers_project();
    assert_eq!(p.run(&["run"]).code, 0);
    let du = p.run(&["cache", "du"]).stdout;
    assert!(du.contains("objects"), "{du}");
    assert!(
        du.lines()
            .any(|l| l.trim_start().starts_with("numbers") && l.contains("KiB")),
        "{du}"
    );
}

#[test]
fn the_cache_can_live_elsewhere() {
    let p = numbers_project();
    let other = tempfile::tempdir().unwrap();
    let dir = other.path().to_str().unwrap();
    assert_eq!(p.run(&["--cache-dir", dir, "run"]).code, 0);
    assert!(!p.path().join("cache").exists());
    assert!(other.path().join("CACHEDIR.TAG").exists());
    let r = p
        .command(&["status", "--json"])
        .env("CUSA_PIPE_CACHE", dir)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&r.stdout)
            .matches("\"fresh\"")
            .count()
            == 3
    );
}
