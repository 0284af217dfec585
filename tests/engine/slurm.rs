//! `executor: slurm` against a real one-node Slurm (`scripts/slurm/up.sh`, which `.ci/run`
//! starts): every stage a job, results byte-identical to a local run, concurrent jobs, a
//! failing job's log tail, Ctrl-C cancelling every job, a job cancelled from outside
//! resubmitted and its training resumed, and jobs without a shared cache going through the
//! team remote. Job ids are checked in Slurm's own records (`squeue --states=all`: the test
//! cluster keeps no accounting database, finished jobs stay listed for `MinJobAge`).
//!
//! `CUSA_TEST_SLURM=1` (set by `.ci/run`) makes a missing Slurm a failure; without it these
//! tests say they are skipped when `sinfo` does not answer.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{Project, sha256_hex, wait_child};

/// Whether a Slurm controller answers here (see the module doc).
fn slurm() -> bool {
    let required = std::env::var("CUSA_TEST_SLURM").is_ok_and(|v| v == "1");
    let ok = Command::new("sinfo")
        .args(["--noheader", "--format=%t"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && {
                // Any state of a usable node (idle, mix, alloc, comp…), not down or drained.
                let s = String::from_utf8_lossy(&o.stdout);
                let state = s.trim();
                !state.is_empty()
                    && !["down", "drain", "fail", "unk", "maint"]
                        .iter()
                        .any(|bad| state.starts_with(bad))
            }
        });
    assert!(
        ok || !required,
        "CUSA_TEST_SLURM=1 but Slurm does not answer (run scripts/slurm/up.sh)"
    );
    if !ok {
        eprintln!("skipped: no Slurm here (scripts/slurm/up.sh starts one; CUSA_TEST_SLURM=1)");
    }
    ok
}

/// Polling fast enough for tests, within what the settings allow.
const FAST: &str = "poll_interval: 200ms, poll_max: 1s";

/// Slurm's record of job `id`: (state, node), from `squeue --states=all`.
fn slurm_record(id: &str) -> Option<(String, String)> {
    let out = Command::new("squeue")
        .args([
            &format!("--jobs={id}"),
            "--states=all",
            "--noheader",
            "-O",
            "JobID:|,State:|,NodeList:|",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.split('|').next() == Some(id))?;
    let f: Vec<&str> = line.split('|').collect();
    Some((f[1].trim().to_string(), f[2].trim().to_string()))
}

/// (id, state) of the jobs of project `p` (by their log's folder) still pending or running
/// whose name contains `part`: tests share the cluster.
fn active_jobs(p: &Project, part: &str) -> Vec<(String, String)> {
    let out = Command::new("squeue")
        .args(["--noheader", "-O", "JobID:|,Name:|,State:|,STDOUT:|"])
        .output()
        .expect("squeue runs");
    let ours = p.path().display().to_string();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').map(str::trim).collect();
            (f.len() >= 4 && f[1].contains(part) && f[3].starts_with(&ours))
                .then(|| (f[0].to_string(), f[2].to_string()))
        })
        .collect()
}

/// `run --json`'s stages: name → (outcome, slurm job id if any).
fn ran(json: &str) -> BTreeMap<String, (String, Option<String>)> {
    Project::stages(json)
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                (
                    s["outcome"].as_str().unwrap().to_string(),
                    s["ran_on"]["job"].as_str().map(str::to_string),
                ),
            )
        })
        .collect()
}

/// Every file of a stage's output: relative path → sha256; a training's `log.jsonl` by its
/// lines without the wall-clock keys (`seconds`, `pairs_per_second`: they measure the run).
fn tree(dir: &Path) -> BTreeMap<String, String> {
    walk(dir, dir)
}

fn content(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    if path.file_name().is_some_and(|n| n == "log.jsonl") {
        let lines: Vec<serde_json::Value> = String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let o = v.as_object_mut().unwrap();
                assert!(o.remove("seconds").is_some(), "{l}");
                o.remove("pairs_per_second");
                v
            })
            .collect();
        return serde_json::to_vec(&lines).unwrap();
    }
    bytes
}

fn walk(root: &Path, dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(root, &p));
        } else {
            out.insert(
                p.strip_prefix(root).unwrap().display().to_string(),
                sha256_hex(&content(&p)),
            );
        }
    }
    out
}

/// Adds `executor: VALUE` at the top of the project's pipeline file.
fn with_executor(p: &Project, executor: &str) {
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&p.read("pipeline.yaml")).unwrap();
    doc["executor"] = serde_yaml_ng::from_str(executor).unwrap();
    p.write("pipeline.yaml", &serde_yaml_ng::to_string(&doc).unwrap());
}

#[test]
fn every_stage_runs_as_a_slurm_job_with_the_bytes_of_a_local_run() {
    if !slurm() {
        return;
    }
    // Downloads, both teachers, soft labels and a training, plus two independent command
    // stages that record when they ran.
    let p = crate::train::project("    epochs: 3\n");
    let spans = p.path().join("spans");
    std::fs::create_dir_all(&spans).unwrap();
    p.add_stages(&format!(
        r#"
left:
  kind: command
  with:
    run: date +%s.%N > {s}/left.start; sleep 3; echo left > ${{out}}/left.txt; date +%s.%N > {s}/left.end
right:
  kind: command
  with:
    run: date +%s.%N > {s}/right.start; sleep 3; echo right > ${{out}}/right.txt; date +%s.%N > {s}/right.end
"#,
        s = spans.display()
    ));
    with_executor(&p, &format!("{{kind: slurm, {FAST}}}"));

    let r = p.run(&["run", "-j", "12", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let first = ran(&r.stdout);
    assert_eq!(first.len(), 11, "{first:?}");
    for (stage, (outcome, job)) in &first {
        assert_eq!(outcome, "ran", "{stage}");
        let job = job
            .as_ref()
            .unwrap_or_else(|| panic!("{stage} ran on no job"));
        let (state, node) = slurm_record(job).unwrap_or_else(|| panic!("job {job} unknown"));
        assert_eq!(state, "COMPLETED", "{stage}: job {job}");
        assert!(
            r.stderr.contains(&format!("slurm job {job}")),
            "{}",
            r.stderr
        );
        assert!(!node.is_empty());
    }
    // The two independent stages' jobs ran at the same time.
    let t = |f: &str| -> f64 {
        std::fs::read_to_string(spans.join(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert!(
        t("left.start") < t("right.end") && t("right.start") < t("left.end"),
        "left and right did not overlap"
    );
    // `status` says where each result was computed.
    let s = p.run(&["status"]);
    assert!(
        s.stdout.contains(&format!(
            "ran on slurm job {}",
            first["train"].1.as_ref().unwrap()
        )),
        "{}",
        s.stdout
    );

    // A second run submits nothing.
    let r = p.run(&["run", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        ran(&r.stdout).values().all(|(o, _)| o == "cached"),
        "{}",
        r.stdout
    );
    assert!(!r.stderr.contains("submitted"), "{}", r.stderr);

    // The same pipeline run locally into another cache: the same keys and the same bytes.
    let slurm_trees: BTreeMap<String, _> = first
        .keys()
        .map(|s| (s.clone(), tree(&p.output(s))))
        .collect();
    let r = p.run(&[
        "--cache-dir",
        "local-cache",
        "run",
        "--executor",
        "local",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("submitted"), "{}", r.stderr);
    for (stage, (outcome, job)) in ran(&r.stdout) {
        assert_eq!((outcome.as_str(), job), ("ran", None), "{stage}");
        let local = p.run(&["--cache-dir", "local-cache", "path", &stage]);
        let local = tree(Path::new(local.stdout.trim()));
        assert_eq!(
            local, slurm_trees[&stage],
            "{stage}: local and Slurm bytes differ"
        );
    }
}

#[test]
fn a_failing_job_reports_its_id_exit_code_and_log_tail() {
    if !slurm() {
        return;
    }
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        &format!(
            r#"version: 1
executor: {{kind: slurm, {FAST}}}
stages:
  broken:
    kind: command
    with:
      run: echo reading the shards; echo "shard 7 is truncated" >&2; exit 3
"#
        ),
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let job = r
        .stderr
        .split("submitted  broken  slurm job ")
        .nth(1)
        .and_then(|s| s.lines().next())
        .unwrap_or_else(|| panic!("no job id: {}", r.stderr))
        .to_string();
    assert_eq!(slurm_record(&job).unwrap().0, "FAILED");
    assert!(
        r.stderr
            .contains(&format!("failed  broken  slurm job {job} FAILED on "))
            && r.stderr.contains("with exit code 1"),
        "{}",
        r.stderr
    );
    // The job's log tail: the stage's own failure (its command's exit code and stderr).
    assert!(r.stderr.contains("exited with code 3"), "{}", r.stderr);
    assert!(r.stderr.contains("shard 7 is truncated"), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("-broken-{job}.log")),
        "{}",
        r.stderr
    );
    assert!(
        !p.run(&["status"]).stdout.contains("fresh"),
        "nothing committed"
    );
}

#[test]
fn ctrl_c_cancels_every_job_of_the_run_and_the_next_run_completes() {
    if !slurm() {
        return;
    }
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        &format!(
            r#"version: 1
executor: {{kind: slurm, {FAST}}}
stages:
  one:
    kind: command
    with:
      run: if [ -f slow ]; then sleep 120; fi; echo one > ${{out}}/one.txt
  two:
    kind: command
    with:
      run: if [ -f slow ]; then sleep 120; fi; echo two > ${{out}}/two.txt
"#
        ),
    );
    p.write("slow", "");
    let child = p.spawn(&["run", "-j", "2"]);
    let started = Instant::now();
    let tag = |s: &str| format!("-{s}");
    while active_jobs(&p, &tag("one"))
        .iter()
        .chain(&active_jobs(&p, &tag("two")))
        .filter(|(_, st)| st == "RUNNING")
        .count()
        < 2
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the jobs did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ids: Vec<String> = active_jobs(&p, "-one")
        .into_iter()
        .chain(active_jobs(&p, "-two"))
        .map(|(id, _)| id)
        .collect();
    // SAFETY: plain signal delivery to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let r = wait_child(child);
    assert_eq!(r.code, 130, "{}", r.stderr);
    assert!(
        r.stderr.contains("cancelled 2 slurm job(s)"),
        "{}",
        r.stderr
    );
    for id in &ids {
        let (state, _) = slurm_record(id).unwrap();
        assert_eq!(state, "CANCELLED", "job {id}");
    }
    assert!(
        active_jobs(&p, "-one").is_empty() && active_jobs(&p, "-two").is_empty(),
        "a job is left in squeue"
    );
    assert!(
        !p.run(&["status"]).stdout.contains("fresh"),
        "nothing committed"
    );

    std::fs::remove_file(p.path().join("slow")).unwrap();
    let r = p.run(&["run", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        ran(&r.stdout)
            .values()
            .all(|(o, j)| o == "ran" && j.is_some()),
        "{}",
        r.stdout
    );
}

#[test]
fn a_training_job_cancelled_from_outside_is_resubmitted_and_resumes_to_the_same_bytes() {
    if !slurm() {
        return;
    }
    // Only the training runs on Slurm.
    let p = crate::train::project("    epochs: 40\n");
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&p.read("pipeline.yaml")).unwrap();
    doc["stages"]["train"]["executor"] =
        serde_yaml_ng::from_str(&format!("{{kind: slurm, {FAST}}}")).unwrap();
    p.write("pipeline.yaml", &serde_yaml_ng::to_string(&doc).unwrap());
    let r = p.run(&["run", "softlabels"]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let child = p.spawn(&["run", "--json", "train"]);
    // Once the job's checkpoint holds two epochs, cancel it as an admin would.
    let (_, state) = crate::train::wait_for_checkpoint(&p, 2);
    assert!(
        state["epochs_done"].as_u64().unwrap() < 40,
        "cancelled before the end"
    );
    let first = active_jobs(&p, "-train");
    assert_eq!(first.len(), 1, "{first:?}");
    let status = Command::new("scancel").arg(&first[0].0).status().unwrap();
    assert!(status.success());

    let r = wait_child(child);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("slurm job {} CANCELLED", first[0].0))
            && r.stderr.contains("submitted again (1 of 3 resubmissions)"),
        "{}",
        r.stderr
    );
    let second = ran(&r.stdout)["train"].1.clone().expect("a job id");
    assert_ne!(second, first[0].0, "a new job");
    assert_eq!(slurm_record(&first[0].0).unwrap().0, "CANCELLED");
    assert_eq!(slurm_record(&second).unwrap().0, "COMPLETED");
    let log = p.latest_log("train");
    assert!(log.contains("resuming after epoch"), "{log}");
    let resumed = sha256_hex(&std::fs::read(p.output("train").join("model.mpk")).unwrap());

    // An uninterrupted local training of the same key: the same bytes.
    let r = p.run(&["run", "--executor", "local", "--force", "train", "train"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let local = sha256_hex(&std::fs::read(p.output("train").join("model.mpk")).unwrap());
    assert_eq!(
        resumed, local,
        "resumed on Slurm and uninterrupted locally agree"
    );
}

#[test]
fn jobs_without_a_shared_cache_restore_their_inputs_from_the_remote() {
    if !slurm() {
        return;
    }
    let p = Project::new();
    let remote = p.path().join("team-remote");
    let node_cache = p.path().join("node-cache");
    std::fs::create_dir_all(&remote).unwrap();
    p.write(
        "pipeline.yaml",
        &format!(
            r#"version: 1
remote: file://{remote}
executor: {{kind: slurm, cache: remote, job_cache: "{node}", {FAST}}}
stages:
  words:
    kind: command
    executor: local
    with:
      run: printf 'a cat on a mat\n' > ${{out}}/words.txt
  counted:
    kind: command
    with:
      run: wc -w < ${{words}}/words.txt > ${{out}}/count.txt
  doubled:
    kind: command
    with:
      run: cat ${{counted}}/count.txt ${{counted}}/count.txt > ${{out}}/twice.txt
"#,
            remote = remote.display(),
            node = node_cache.display()
        ),
    );
    let r = p.run(&["run", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let outcome = ran(&r.stdout);
    assert_eq!(outcome["words"], ("ran".to_string(), None));
    for s in ["counted", "doubled"] {
        assert_eq!(outcome[s].0, "ran", "{s}");
        assert!(outcome[s].1.is_some(), "{s} ran on a job");
    }
    assert_eq!(
        std::fs::read_to_string(p.output("doubled").join("twice.txt")).unwrap(),
        "5\n5\n"
    );
    // The jobs read their inputs from the remote into their own cache, never from ours.
    let logs = p.path().join("cache/logs-v1/slurm");
    let job_log = |stage: &str| {
        let f = std::fs::read_dir(&logs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|f| {
                f.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .contains(&format!("-{stage}-"))
            })
            .unwrap();
        std::fs::read_to_string(f).unwrap()
    };
    assert!(
        job_log("counted").contains("restored  words"),
        "{}",
        job_log("counted")
    );
    assert!(
        job_log("doubled").contains("cached  counted")
            || job_log("doubled").contains("restored  counted")
    );
    assert!(
        node_cache.join("runs-v1").is_dir(),
        "the node's own cache was used"
    );
    // Our cache got the jobs' results from the remote.
    let s = p.run(&["status"]);
    assert!(
        s.stdout.contains("fresh  doubled") && s.stdout.contains("ran on slurm job"),
        "{}",
        s.stdout
    );
}

#[test]
fn executor_settings_are_checked_before_anything_is_submitted() {
    // No Slurm needed: these fail at load time.
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "version: 1\nexecutor: {kind: slurm, time: soon}\nstages:\n  a:\n    kind: command\n    with:\n      run: 'true'\n",
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("pipeline.yaml:2:")
            && r.stderr.contains("`soon` is not a Slurm time limit"),
        "{}",
        r.stderr
    );

    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  a:\n    kind: command\n    executor: {kind: slurm, partiton: gpu}\n    resources: {memory: lots}\n    with:\n      run: 'true'\n",
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("pipeline.yaml:5:") && r.stderr.contains("partition"),
        "{}",
        r.stderr
    );

    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  a:\n    kind: command\n    resources: {memory: lots}\n    with:\n      run: 'true'\n",
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("pipeline.yaml:5:")
            && r.stderr.contains("`lots` is not an amount of memory"),
        "{}",
        r.stderr
    );

    p.write(
        "pipeline.yaml",
        "version: 1\nexecutor: {kind: slurm, cache: remote}\nstages:\n  a:\n    kind: command\n    with:\n      run: 'true'\n",
    );
    let r = p.run(&["run"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("no team remote is configured"),
        "{}",
        r.stderr
    );
    // `--executor local` needs no cluster at all.
    let r = p.run(&["run", "--executor", "local"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}
