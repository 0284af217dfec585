//! Matrix stages through the binary: expansion, per-element caching and explanations, command
//! line patterns, fan-in lists, and references written in `with:` keyed like declared inputs.

use crate::support::Project;

const PIPELINE: &str = r#"version: 1
params:
  seeds: [0, 1]
stages:
  data:
    kind: command
    with:
      run: echo data > ${out}/d.txt
  train:
    kind: command
    matrix:
      variant: {base: 1, cusa: 2}
      seed: ${params.seeds}
    with:
      run: echo ${matrix.variant:name} seed=${matrix.seed} w=${matrix.variant} $(cat ${data/d.txt}) > ${out}/m.txt
  eval:
    kind: command
    matrix:
      variant: [base, cusa]
      seed: ${params.seeds}
    with:
      run: cat ${train}/m.txt > ${out}/e.txt
  report:
    kind: command
    with:
      run: cat ${eval@*/e.txt} > ${out}/all.txt
"#;

fn ran(p: &Project, args: &[&str]) -> Vec<String> {
    let mut all = vec!["run", "--json"];
    all.extend_from_slice(args);
    let r = p.run(&all);
    assert_eq!(r.code, 0, "{}", r.stderr);
    Project::outcomes(&r.stdout)
        .into_iter()
        .filter(|(_, o)| o == "ran")
        .map(|(n, _)| n)
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn names(v: &[&str]) -> Vec<String> {
    sorted(v.iter().map(|s| s.to_string()).collect())
}

#[test]
fn a_matrix_expands_runs_each_element_once_and_reruns_only_what_changed() {
    let p = Project::new();
    p.write("pipeline.yaml", PIPELINE);
    let first = ran(&p, &[]);
    assert_eq!(first.len(), 10, "{first:?}");
    assert!(first.contains(&"train@variant=cusa,seed=1".to_string()));
    // The fan-in list is in matrix order (first axis outermost), whatever ran first.
    let report = std::fs::read_to_string(p.output("report").join("all.txt")).unwrap();
    assert_eq!(
        report,
        "base seed=0 w=1 data\nbase seed=1 w=1 data\ncusa seed=0 w=2 data\ncusa seed=1 w=2 data\n"
    );
    assert!(ran(&p, &[]).is_empty(), "a second run is all cached");

    // One axis value edited: only its elements (and what reads them) are stale, and say why.
    p.write("pipeline.yaml", &PIPELINE.replace("cusa: 2}", "cusa: 3}"));
    let r = p.run(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let stale: Vec<String> = status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "stale")
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        sorted(stale),
        names(&[
            "eval@variant=cusa,seed=0",
            "eval@variant=cusa,seed=1",
            "report",
            "train@variant=cusa,seed=0",
            "train@variant=cusa,seed=1",
        ])
    );
    let text = p.run(&["status"]).stdout;
    let line = text
        .lines()
        .find(|l| l.contains("train@variant=cusa,seed=0"))
        .unwrap();
    assert!(line.contains("w=2") && line.contains("w=3"), "{text}");
    let element = &status["stages"][3];
    assert_eq!(element["name"], "train@variant=cusa,seed=0");
    assert_eq!(
        element["matrix"],
        serde_json::json!({"stage": "train", "labels": {"variant": "cusa", "seed": "0"}})
    );
    assert_eq!(
        sorted(ran(&p, &[])),
        names(&[
            "eval@variant=cusa,seed=0",
            "eval@variant=cusa,seed=1",
            "report",
            "train@variant=cusa,seed=0",
            "train@variant=cusa,seed=1",
        ])
    );

    // A seed added: only the new elements run (and the fan-in that lists them).
    assert_eq!(
        sorted(ran(&p, &["--set", "params.seeds=[0, 1, 2]"])),
        names(&[
            "eval@variant=base,seed=2",
            "eval@variant=cusa,seed=2",
            "report",
            "train@variant=base,seed=2",
            "train@variant=cusa,seed=2",
        ])
    );
}

#[test]
fn elements_are_named_on_the_command_line_one_at_a_time_or_by_pattern() {
    let p = Project::new();
    p.write("pipeline.yaml", PIPELINE);
    // Labels in any order; the upstream element comes along.
    assert_eq!(
        sorted(ran(&p, &["eval@seed=1,variant=cusa"])),
        names(&[
            "data",
            "eval@variant=cusa,seed=1",
            "train@variant=cusa,seed=1"
        ])
    );
    assert_eq!(
        sorted(ran(&p, &["train@variant=base"])),
        names(&["train@variant=base,seed=0", "train@variant=base,seed=1"])
    );
    assert_eq!(
        sorted(ran(&p, &["train@*"])),
        names(&["train@variant=cusa,seed=0"])
    );
    // `run --json` says which element each report is.
    let r = p.run(&["run", "--json", "train@variant=base,seed=1"]);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let last = doc["stages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["name"], "train@variant=base,seed=1");
    assert_eq!(last["outcome"], "cached");
    assert_eq!(last["matrix"]["labels"]["seed"], "1");
    assert!(
        doc["stages"][0].get("matrix").is_none(),
        "`data` is no element"
    );
    // `path` wants one element.
    let r = p.run(&["path", "train/m.txt"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("`train` names 4 stages; pick one"),
        "{}",
        r.stderr
    );
    let out = p.output("train@seed=0,variant=cusa");
    assert_eq!(
        std::fs::read_to_string(out.join("m.txt")).unwrap(),
        "cusa seed=0 w=2 data\n"
    );
    // `dag` draws elements, or one node per matrix with its axes.
    let dag = p.run(&["dag", "--collapse"]).stdout;
    assert_eq!(
        dag,
        "data    command\n\
         train   command  [variant (base, cusa) × seed (0, 1)]  ← data\n\
         eval    command  [variant (base, cusa) × seed (0, 1)]  ← train\n\
         report  command  ← eval\n"
    );
    let mermaid = p.run(&["dag", "--format", "mermaid"]).stdout;
    assert!(
        mermaid.contains("  n1[\"train@variant=base,seed=0 (command)\"]"),
        "{mermaid}"
    );
    assert!(!mermaid.contains("@variant=base,seed=0 -->"), "{mermaid}");
}

#[test]
fn a_reference_written_in_with_is_the_same_key_as_a_declared_input() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  data:\n    kind: command\n    with:\n      run: echo 1 > ${out}/d.txt\n  \
         use:\n    kind: command\n    inputs: {d: \"${data/d.txt}\", script: s.sh}\n    with:\n      run: sh ${inputs.script} ${inputs.d} > ${out}/x\n",
    );
    p.write("s.sh", "cat \"$1\"\n");
    assert_eq!(ran(&p, &[]).len(), 2);
    let key = |p: &Project| -> String {
        let s: serde_json::Value =
            serde_json::from_str(&p.run(&["status", "--json"]).stdout).unwrap();
        s["stages"][1]["fingerprint"].as_str().unwrap().to_string()
    };
    let declared = key(&p);
    p.write(
        "pipeline.yaml",
        "version: 1\nstages:\n  data:\n    kind: command\n    with:\n      run: echo 1 > ${out}/d.txt\n  \
         use:\n    kind: command\n    inputs: {script: s.sh}\n    with:\n      run: sh ${inputs.script} ${data/d.txt} > ${out}/x\n",
    );
    assert_eq!(key(&p), declared);
    assert!(ran(&p, &[]).is_empty(), "the cached result is reused");
    // The upstream is an upstream: its change reruns the reader.
    p.write(
        "pipeline.yaml",
        &p.read("pipeline.yaml").replace("echo 1", "echo 2"),
    );
    assert_eq!(sorted(ran(&p, &[])), names(&["data", "use"]));
    assert_eq!(
        std::fs::read_to_string(p.output("use").join("x")).unwrap(),
        "2\n"
    );
}
