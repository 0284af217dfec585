//! A failing stage: its dependents are skipped, other branches finish and stay committed.

use insta::assert_snapshot;

use crate::support::Project;

fn branching_project() -> Project {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"version: 1
stages:
  good:
    kind: command
    with:
      run: echo good > ${out}/good.txt
  after_good:
    kind: command
    inputs: {good: "${good}"}
    with:
      run: cat ${inputs.good}/good.txt > ${out}/copy.txt
  broken:
    kind: command
    with:
      run: |
        for i in $(seq 1 25); do echo "progress line $i"; done
        echo "ValueError: the data is bad" >&2
        exit 3
  after_broken:
    kind: command
    inputs: {broken: "${broken}"}
    with:
      run: echo never > ${out}/never.txt
"#,
    );
    p
}

#[test]
fn a_failure_skips_dependents_and_lets_other_branches_commit() {
    let p = branching_project();
    let t = p.transcript(&["run", "-j", "1"]);
    assert_snapshot!(t, @r#"
    $ cusa-pipe run -j 1
          run  good          no record (never ran)
          ran  good          [TIME]  [HASH]
          run  after_good    no record (never ran)
          ran  after_good    [TIME]  [HASH]
          run  broken        no record (never ran)
       failed  broken        `for i in $(seq 1 25); do echo "progress line $i"; done …` exited with code 3
               │ progress line 7
               │ progress line 8
               │ progress line 9
               │ progress line 10
               │ progress line 11
               │ progress line 12
               │ progress line 13
               │ progress line 14
               │ progress line 15
               │ progress line 16
               │ progress line 17
               │ progress line 18
               │ progress line 19
               │ progress line 20
               │ progress line 21
               │ progress line 22
               │ progress line 23
               │ progress line 24
               │ progress line 25
               │ ValueError: the data is bad
               log: [PROJECT]/cache/logs-v1/broken/[LOG]
      skipped  after_broken  upstream `broken` did not finish
    done: 2 ran, 1 failed, 1 skipped in [TIME]
    [exit 1]
    "#);
    // The good branch is committed: a rerun finds it cached and retries only the failure.
    let r = p.run(&["run", "--json"]);
    assert_eq!(r.code, 1);
    let outcomes = Project::outcomes(&r.stdout);
    assert_eq!(
        outcomes,
        vec![
            ("good".to_string(), "cached".to_string()),
            ("after_good".to_string(), "cached".to_string()),
            ("broken".to_string(), "failed".to_string()),
            ("after_broken".to_string(), "skipped".to_string()),
        ]
    );
}

#[test]
fn parallel_branches_finish_when_one_fails() {
    let p = branching_project();
    let r = p.run(&["run", "-j", "4", "--json"]);
    assert_eq!(r.code, 1);
    let outcomes = Project::outcomes(&r.stdout);
    assert!(
        outcomes.contains(&("after_good".into(), "ran".into())),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&("after_broken".into(), "skipped".into())),
        "{outcomes:?}"
    );
    assert_eq!(
        std::fs::read_to_string(p.output("after_good").join("copy.txt")).unwrap(),
        "good\n"
    );
}

#[test]
fn a_missing_input_file_is_an_invalid_pipeline_with_its_location() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  numbers:\n    kind: command\n    inputs:\n      script: gen.py\n    with:\n      run: python3 ${inputs.script}\n",
    );
    assert_snapshot!(p.transcript(&["run"]), @r"
    $ cusa-pipe run
    error: input `script`: gen.py does not exist (stage `numbers`)
      --> pipeline.yaml:6:15
      |
    6 |       script: gen.py
      |               ^
      = help: create it, or fix the path (relative to pipeline.yaml)
    [exit 2]
    ");
    // `status` still explains it per stage, without failing the whole listing.
    let status = p.run(&["status"]);
    assert!(
        status.stdout.contains("gen.py does not exist"),
        "{}",
        status.stdout
    );
}

#[test]
fn a_stage_reading_a_missing_upstream_path_fails_clearly() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  a:\n    kind: command\n    with:\n      run: echo x > ${out}/x.txt\n  b:\n    kind: command\n    inputs:\n      y: ${a/y.txt}\n    with:\n      run: cat ${inputs.y}\n",
    );
    let r = p.run(&["run", "-j", "1"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("`${a/y.txt}`: `y.txt` is not in the output of `a`"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("help: `a` wrote: x.txt"), "{}", r.stderr);
}

#[test]
fn a_symlink_in_an_output_is_refused_and_nothing_is_committed() {
    let p = Project::new();
    p.write("pipeline.yaml", "version: 1\nstages:\n  a:\n    kind: command\n    with:\n      run: ln -s /etc/passwd ${out}/pw\n");
    let r = p.run(&["run"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("is a symbolic link; stage outputs must be regular files and folders"),
        "{}",
        r.stderr
    );
    assert_eq!(
        p.run(&["status"]).stdout.trim(),
        "stale  a  no record (never ran)"
    );
}
