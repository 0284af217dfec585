//! Scheduling: independent stages run in parallel within `-j`; GPU slots are respected; two
//! processes on one cache never execute the same stage twice.

use std::time::Duration;

use crate::support::{Project, wait_child};

/// Two independent stages that record when they ran.
fn two_sleepers() -> Project {
    let p = Project::new();
    let stage = |name: &str| {
        format!(
            "  {name}:\n    kind: command\n    with:\n      run: |\n        echo {name} > ${{out}}/name\n        python3 -c \"import time; print(time.time())\" > ${{out}}/start\n        sleep 0.6\n        python3 -c \"import time; print(time.time())\" > ${{out}}/end\n"
        )
    };
    p.write(
        "pipeline.yaml",
        &format!("version: 1\nstages:\n{}{}", stage("left"), stage("right")),
    );
    p
}

#[test]
fn identical_stages_share_one_execution() {
    // The stage name is not part of the key: two stages doing the same work run it once.
    let p = Project::new();
    let stage = |name: &str| {
        format!(
            "  {name}:\n    kind: command\n    with:\n      run: echo same >> runs.log; echo same > ${{out}}/x\n"
        )
    };
    p.write(
        "pipeline.yaml",
        &format!("version: 1\nstages:\n{}{}", stage("one"), stage("two")),
    );
    let r = p.run(&["run", "-j", "2", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut outcomes: Vec<String> = Project::outcomes(&r.stdout)
        .into_iter()
        .map(|(_, o)| o)
        .collect();
    outcomes.sort();
    assert_eq!(outcomes, vec!["cached", "ran"]);
    assert_eq!(p.read("runs.log"), "same\n");
}

fn span(p: &Project, stage: &str) -> (f64, f64) {
    let dir = p.output(stage);
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .unwrap()
            .trim()
            .parse::<f64>()
            .unwrap()
    };
    (read("start"), read("end"))
}

#[test]
fn independent_stages_overlap_with_two_jobs_and_not_with_one() {
    let p = two_sleepers();
    assert_eq!(p.run(&["run", "-j", "2"]).code, 0);
    let (l, r) = (span(&p, "left"), span(&p, "right"));
    assert!(
        l.0 < r.1 && r.0 < l.1,
        "with -j 2 the stages must overlap: {l:?} {r:?}"
    );

    assert_eq!(p.run(&["run", "-j", "1", "--force-all"]).code, 0);
    let (l, r) = (span(&p, "left"), span(&p, "right"));
    assert!(
        l.1 <= r.0 || r.1 <= l.0,
        "with -j 1 the stages must not overlap: {l:?} {r:?}"
    );
}

#[test]
fn gpu_slots_are_never_exceeded_and_are_passed_to_the_stage() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  train:\n    kind: command\n    resources: {gpu: 1}\n    with:\n      run: sleep 0.3; echo \"$CUDA_VISIBLE_DEVICES\" > ${out}/gpus.txt; echo one\n  train2:\n    kind: command\n    resources: {gpu: 1}\n    with:\n      run: sleep 0.3; echo \"$CUDA_VISIBLE_DEVICES\" > ${out}/gpus.txt\n",
    );
    let r = p.run(&["run", "--gpus", "0", "train"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("failed  train   needs 1 GPU(s); 0 available"),
        "{}",
        r.stderr
    );
    let r = p.run(&["run", "--gpus", "2", "-j", "2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut got: Vec<String> = ["train", "train2"]
        .iter()
        .map(|s| {
            std::fs::read_to_string(p.output(s).join("gpus.txt"))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    got.sort();
    assert_eq!(got, vec!["0", "1"], "each stage gets its own GPU");
}

#[test]
fn two_concurrent_runs_both_succeed_and_execute_each_stage_once() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  first:\n    kind: command\n    with:\n      run: echo first >> executions.log; sleep 0.5; echo 1 > ${out}/one\n  second:\n    kind: command\n    inputs: {first: \"${first}\"}\n    with:\n      run: echo second >> executions.log; sleep 0.5; cat ${inputs.first}/one > ${out}/two\n",
    );
    let a = p.spawn(&["run", "--json"]);
    std::thread::sleep(Duration::from_millis(50));
    let b = p.spawn(&["run", "--json"]);
    let (ra, rb) = (wait_child(a), wait_child(b));
    assert_eq!((ra.code, rb.code), (0, 0), "{}\n{}", ra.stderr, rb.stderr);
    let log = p.read("executions.log");
    assert_eq!(log, "first\nsecond\n", "each stage executed exactly once");
    let all: Vec<(String, String)> = Project::outcomes(&ra.stdout)
        .into_iter()
        .chain(Project::outcomes(&rb.stdout))
        .collect();
    assert_eq!(all.iter().filter(|(_, o)| o == "ran").count(), 2, "{all:?}");
    assert_eq!(
        all.iter().filter(|(_, o)| o == "cached").count(),
        2,
        "{all:?}"
    );
    assert!(
        ra.stderr.contains("waiting") || rb.stderr.contains("waiting"),
        "one run waited for the other"
    );
    assert_eq!(p.run(&["cache", "verify"]).code, 0);
}

#[test]
fn gc_waits_for_a_running_run_and_says_so() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  slow:\n    kind: command\n    with:\n      run: touch started; sleep 1; echo x > ${out}/x\n",
    );
    let run = p.spawn(&["run"]);
    crate::support::wait_for(&p.path().join("started"), Duration::from_secs(30));
    let gc = p.run(&["cache", "gc"]);
    assert_eq!(gc.code, 0, "{}", gc.stderr);
    assert!(
        gc.stderr
            .contains("waiting  for running cusa-pipe processes to finish"),
        "{}",
        gc.stderr
    );
    let r = wait_child(run);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // gc ran after the run committed: the result survived.
    assert!(gc.stdout.contains("kept 1 result(s)"), "{}", gc.stdout);
    assert_eq!(
        p.run(&["status"]).stdout.split_whitespace().next(),
        Some("fresh")
    );
}

#[test]
fn commands_get_their_env_and_can_run_without_a_shell() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  direct:\n    kind: command\n    with:\n      shell: false\n      env: {GREETING: \"hello world\"}\n      run: python3 -c \"import os, sys; open(sys.argv[1] + '/g.txt', 'w').write(os.environ['GREETING'] + ' ' + os.environ['CUSA_PIPE_STAGE'])\" ${out}\n",
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(p.output("direct").join("g.txt")).unwrap(),
        "hello world direct"
    );
    // The environment is part of the key: changing it reruns and says so.
    let yaml = p.read("pipeline.yaml").replace("hello world", "bonjour");
    p.write("pipeline.yaml", &yaml);
    assert_eq!(
        p.run(&["status"]).stdout.trim(),
        r#"stale  direct  with.env.GREETING "hello world" → "bonjour""#
    );
}
