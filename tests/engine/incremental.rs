//! Incremental runs: what reruns after which edit, and the words that say why.

use insta::assert_snapshot;

use crate::support::Project;

const GEN: &str = "import sys\nn, out = int(sys.argv[1]), sys.argv[2]\nopen(out, 'w').write(''.join(f'{i}\\n' for i in range(n)))\n";
const SUM: &str = "import sys\nt = sum(int(l) for l in open(sys.argv[1]))\nopen(sys.argv[2], 'w').write(f'{t}\\n')\n";

/// numbers → total, plus an unrelated `other` stage.
pub fn numbers_project() -> Project {
    let p = Project::new();
    p.write("gen.py", GEN);
    p.write("sum.py", SUM);
    p.write(
        "pipeline.yaml",
        r#"version: 1
params:
  n: 1000
  greeting: hello
stages:
  numbers:
    kind: command
    inputs:
      script: gen.py
    with:
      run: python3 ${inputs.script} ${params.n} ${out}/numbers.txt
  total:
    kind: command
    inputs:
      script: sum.py
      numbers: ${numbers}
    with:
      run: python3 ${inputs.script} ${inputs.numbers}/numbers.txt ${out}/total.txt
  other:
    kind: command
    with:
      run: echo ${params.greeting} > ${out}/greeting.txt
"#,
    );
    p
}

#[test]
fn second_run_is_all_cached() {
    let p = numbers_project();
    assert_snapshot!(p.transcript(&["run", "-j", "1"]), @r"
    $ cusa-pipe run -j 1
          run  numbers  no record (never ran)
          ran  numbers  [TIME]  [HASH]
          run  total    no record (never ran)
          ran  total    [TIME]  [HASH]
          run  other    no record (never ran)
          ran  other    [TIME]  [HASH]
    done: 3 ran in [TIME]
    [exit 0]
    ");
    assert_eq!(
        std::fs::read_to_string(p.output("total").join("total.txt")).unwrap(),
        "499500\n"
    );
    assert_snapshot!(p.transcript(&["run", "-j", "1"]), @r"
    $ cusa-pipe run -j 1
       cached  numbers  [HASH]
       cached  total    [HASH]
       cached  other    [HASH]
    done: 3 cached in [TIME]
    [exit 0]
    ");
}

#[test]
fn a_param_edit_reruns_exactly_the_dependent_stages() {
    let p = numbers_project();
    assert_eq!(p.run(&["run"]).code, 0);
    let yaml = p.read("pipeline.yaml").replace("n: 1000", "n: 2000");
    p.write("pipeline.yaml", &yaml);
    assert_snapshot!(p.transcript(&["status"]), @r"
    $ cusa-pipe status
    stale  numbers  param `n` 1000 → 2000
    stale  total    upstream `numbers` must run first
    fresh  other    [HASH]
    [exit 0]
    ");
    assert_snapshot!(p.transcript(&["run", "-j", "1"]), @r"
    $ cusa-pipe run -j 1
          run  numbers  param `n` 1000 → 2000
          ran  numbers  [TIME]  [HASH]
          run  total    upstream `numbers` output changed
          ran  total    [TIME]  [HASH]
       cached  other    [HASH]
    done: 2 ran, 1 cached in [TIME]
    [exit 0]
    ");
    assert_eq!(
        std::fs::read_to_string(p.output("total").join("total.txt")).unwrap(),
        "1999000\n"
    );
}

#[test]
fn a_comment_edit_reruns_the_script_stage_but_not_its_dependents() {
    let p = numbers_project();
    assert_eq!(p.run(&["run"]).code, 0);
    p.write("gen.py", &format!("# writes 0..n-1\n{GEN}"));
    assert_snapshot!(p.transcript(&["run", "-j", "1", "total"]), @r"
    $ cusa-pipe run -j 1 total
          run  numbers  input `script` changed (gen.py)
          ran  numbers  [TIME]  [HASH]
       cached  total    [HASH]
    done: 1 ran, 1 cached in [TIME]
    [exit 0]
    ");
}

#[test]
fn reverting_an_edit_restores_the_earlier_result_without_running() {
    let p = numbers_project();
    assert_eq!(p.run(&["run"]).code, 0);
    let r = p.run(&["run", "--set", "params.n=5", "--json"]);
    assert_eq!(
        crate::support::Project::outcomes(&r.stdout)[0],
        ("numbers".into(), "ran".into())
    );
    // Back to n=1000: the first result is still in the store.
    let r = p.run(&["run", "--json"]);
    let outcomes = crate::support::Project::outcomes(&r.stdout);
    assert!(outcomes.iter().all(|(_, o)| o == "cached"), "{outcomes:?}");
}

#[test]
fn a_value_written_out_in_place_of_its_parameter_keeps_the_cached_result() {
    let p = numbers_project();
    assert_eq!(p.run(&["run"]).code, 0);
    // `${params.n}` is 1000: the command with 1000 written out is the same computation.
    let yaml = p
        .read("pipeline.yaml")
        .replace("${params.n} ${out}", "1000 ${out}");
    p.write("pipeline.yaml", &yaml);
    assert_snapshot!(p.transcript(&["status"]), @r"
    $ cusa-pipe status
    fresh  numbers  [HASH]
    fresh  total    [HASH]
    fresh  other    [HASH]
    [exit 0]
    ");
    // A different value written out is a change, explained by the text it changed.
    assert_snapshot!(p.transcript(&["status", "--set", "numbers.with.run=python3 ${inputs.script} 999 ${out}/numbers.txt"]), @r#"
    $ cusa-pipe status --set numbers.with.run=python3 ${inputs.script} 999 ${out}/numbers.txt
    stale  numbers  with.run "…uts.script} ${params.n} ${out}/numb…" → "…uts.script} 999 ${out}/numb…"
    stale  total    upstream `numbers` must run first
    fresh  other    [HASH]
    [exit 0]
    "#);
}

#[test]
fn a_default_spelt_out_keeps_the_cached_result_and_another_value_is_explained() {
    let p = numbers_project();
    assert_eq!(p.run(&["run"]).code, 0);
    // `shell: true` and `env: {}` are the defaults: the normalised config, hence the key, is
    // the same.
    assert_snapshot!(p.transcript(&["status", "--set", "other.with.shell=true", "--set", "other.with.env={}"]), @r"
    $ cusa-pipe status --set other.with.shell=true --set other.with.env={}
    fresh  numbers  [HASH]
    fresh  total    [HASH]
    fresh  other    [HASH]
    [exit 0]
    ");
    assert_snapshot!(p.transcript(&["status", "--set", "other.with.shell=false"]), @r"
    $ cusa-pipe status --set other.with.shell=false
    fresh  numbers  [HASH]
    fresh  total    [HASH]
    stale  other    with.shell (unset) → false
    [exit 0]
    ");
}

#[test]
fn set_overrides_apply_to_one_run_and_are_explained() {
    let p = numbers_project();
    assert_eq!(p.run(&["run"]).code, 0);
    assert_snapshot!(p.transcript(&["run", "-j", "1", "--set", "params.greeting=bonjour", "--set", "total.with.run=python3 ${inputs.script} ${inputs.numbers}/numbers.txt ${out}/sum.txt", "--dry-run"]), @r#"
    $ cusa-pipe run -j 1 --set params.greeting=bonjour --set total.with.run=python3 ${inputs.script} ${inputs.numbers}/numbers.txt ${out}/sum.txt --dry-run
       cached  numbers  [HASH]
    would run  total    with.run "….txt ${out}/total.txt" → "….txt ${out}/sum.txt"
    would run  other    param `greeting` "hello" → "bonjour"
    done: 1 cached, 2 would run in [TIME]
    [exit 0]
    "#);
    assert!(
        p.read("pipeline.yaml").contains("greeting: hello"),
        "--set must not edit the file"
    );
}

#[test]
fn force_reruns_the_named_stages_only() {
    let p = numbers_project();
    assert_eq!(p.run(&["run"]).code, 0);
    assert_snapshot!(p.transcript(&["run", "-j", "1", "--force", "numbers"]), @r"
    $ cusa-pipe run -j 1 --force numbers
          run  numbers  forced
          ran  numbers  [TIME]  [HASH]
       cached  total    [HASH]
       cached  other    [HASH]
    done: 1 ran, 2 cached in [TIME]
    [exit 0]
    ");
    let r = p.run(&["run", "--force-all", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let outcomes = Project::outcomes(&r.stdout);
    assert!(outcomes.iter().all(|(_, o)| o == "ran"), "{outcomes:?}");
}

#[test]
fn run_and_status_speak_json() {
    let p = numbers_project();
    let r = p.run(&["run", "--json", "total"]);
    assert_eq!(r.code, 0);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let names: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["numbers", "total"],
        "only `total` and what it needs"
    );
    assert!(v["stages"][0]["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(v["stages"][0]["reasons"][0], "no record (never ran)");

    p.write("gen.py", &format!("{GEN}\n"));
    let r = p.run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["stages"][0]["name"], "numbers");
    assert_eq!(v["stages"][0]["state"], "stale");
    assert_eq!(
        v["stages"][0]["reasons"][0],
        "input `script` changed (gen.py)"
    );
    assert_eq!(v["stages"][2]["reasons"][0], "no record (never ran)");
}

#[test]
fn dry_run_executes_nothing() {
    let p = numbers_project();
    let r = p.run(&["run", "--dry-run", "--json"]);
    assert_eq!(r.code, 0);
    assert!(
        Project::outcomes(&r.stdout)
            .iter()
            .all(|(_, o)| o == "would_run")
    );
    assert!(
        !p.path()
            .join("cache/runs-v1")
            .read_dir()
            .unwrap()
            .any(|e| e.unwrap().path().is_dir())
    );
}

#[test]
fn dag_renders_text_dot_and_mermaid() {
    let p = numbers_project();
    assert_snapshot!(p.transcript(&["dag"]), @r"
    $ cusa-pipe dag
    numbers  command
    total    command  ← numbers
    other    command
    [exit 0]
    ");
    assert_snapshot!(p.transcript(&["dag", "pipeline.yaml", "--format", "mermaid"]), @r#"
    $ cusa-pipe dag pipeline.yaml --format mermaid
    flowchart LR
      numbers["numbers (command)"]
      total["total (command)"]
      other["other (command)"]
      numbers --> total
    [exit 0]
    "#);
    let dot = p.run(&["dag", "--format", "dot"]).stdout;
    assert!(
        dot.starts_with("digraph pipeline {") && dot.contains("\"numbers\" -> \"total\";"),
        "{dot}"
    );
}

#[test]
fn path_points_at_fresh_outputs_only() {
    let p = numbers_project();
    let r = p.run(&["path", "total/total.txt"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("stage `total` has no up-to-date output"),
        "{}",
        r.stderr
    );
    assert_eq!(p.run(&["run"]).code, 0);
    let r = p.run(&["path", "total/total.txt"]);
    assert_eq!(r.code, 0);
    assert_eq!(
        std::fs::read_to_string(r.stdout.trim()).unwrap(),
        "499500\n"
    );
    let r = p.run(&["path", "total/nope.txt"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("`nope.txt` is not in the output of `total`")
    );
}
