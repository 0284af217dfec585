//! Interrupts and crashes: nothing partial is ever committed.

use std::time::Duration;

use crate::support::{Project, wait_child, wait_for};

/// A stage that marks that it started, writes a partial output, then waits for a long time
/// while `slow` exists.
fn slow_project() -> Project {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
stages:
  slow:
    kind: command
    with:
      run: |
        echo partial > ${out}/part.txt
        echo $$ > child.pid
        touch started
        if [ -f slow ]; then sleep 60; fi
        echo done > ${out}/done.txt
"#,
    );
    p.write("slow", "");
    p
}

/// Whether a process is running (a zombie — dead, not yet reaped — is not).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or("");
            !matches!(state, "Z" | "X")
        }
        Err(_) => false,
    }
}

#[test]
fn ctrl_c_stops_running_stages_commits_nothing_and_exits_130() {
    let p = slow_project();
    let child = p.spawn(&["run"]);
    let pid = child.id() as i32;
    wait_for(&p.path().join("started"), Duration::from_secs(30));
    let stage_pid: i32 = p.read("child.pid").trim().parse().unwrap();
    // SAFETY: plain signal delivery to our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let r = wait_child(child);
    assert_eq!(r.code, 130, "{}", r.stderr);
    assert!(
        r.stderr.contains("interrupted: stopping running stages"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("failed  slow  interrupted: nothing committed"),
        "{}",
        r.stderr
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(!alive(stage_pid), "the stage's process must be stopped");
    assert_eq!(
        p.run(&["status"]).stdout.trim(),
        "stale  slow  no record (never ran)"
    );
    let v = p.run(&["cache", "verify"]);
    assert_eq!(v.code, 0, "{}", v.stdout);
}

#[test]
fn kill_9_leaves_only_sweepable_leftovers_and_the_stage_reruns() {
    let p = slow_project();
    let mut child = p.spawn(&["run"]);
    wait_for(&p.path().join("started"), Duration::from_secs(30));
    let stage_pid: i32 = p.read("child.pid").trim().parse().unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !alive(stage_pid),
        "the stage's shell dies with cusa-pipe (PR_SET_PDEATHSIG)"
    );

    let v = p.run(&["cache", "verify"]);
    assert_eq!(v.code, 0, "{}", v.stdout);
    assert!(
        v.stdout
            .contains("1 staging folder(s) from interrupted runs"),
        "{}",
        v.stdout
    );
    assert_eq!(
        p.run(&["status"]).stdout.trim(),
        "stale  slow  no record (never ran)"
    );

    std::fs::remove_file(p.path().join("slow")).unwrap();
    let r = p.run(&["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("cleaned  1 staging folder(s) left by an interrupted run"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("ran  slow"), "{}", r.stderr);
    let out = p.output("slow");
    assert_eq!(
        std::fs::read_to_string(out.join("done.txt")).unwrap(),
        "done\n"
    );
    let v = p.run(&["cache", "verify"]);
    assert_eq!(v.code, 0, "{}", v.stdout);
    assert!(
        v.stdout.contains("cache is intact") && !v.stdout.contains("staging"),
        "{}",
        v.stdout
    );
}
