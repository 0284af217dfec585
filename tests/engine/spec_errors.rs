//! Malformed pipelines: exit code 2, file:line:column, the stage and key, and a suggestion.

use crate::support::{Project, render};

/// Each case: a name, the pipeline file, and extra arguments.
const CASES: &[(&str, &str, &[&str])] = &[
    (
        "yaml syntax",
        "version: 1\nstages:\n  a:\n    kind: command\n   with: {run: x}\n",
        &[],
    ),
    (
        "unknown top-level key",
        "version: 1\nstage:\n  a: {kind: command}\n",
        &[],
    ),
    (
        "unknown stage key",
        "version: 1\nstages:\n  total:\n    kind: command\n    inptus:\n      x: a.txt\n    with: {run: x}\n",
        &[],
    ),
    (
        "unknown kind",
        "version: 1\nstages:\n  a:\n    kind: comand\n    with: {run: x}\n",
        &[],
    ),
    (
        "wrong type",
        "version: 1\nstages:\n  a:\n    kind: command\n    resources: {gpu: two}\n    with: {run: x}\n",
        &[],
    ),
    (
        "unknown stage reference",
        "version: 1\nstages:\n  numbers:\n    kind: command\n    with: {run: x}\n  total:\n    kind: command\n    inputs:\n      n: ${numbrs}\n    with: {run: x}\n",
        &[],
    ),
    (
        "undeclared input",
        "version: 1\nstages:\n  a:\n    kind: command\n    inputs: {script: gen.py}\n    with:\n      run: python3 ${inputs.scrpt}\n",
        &[],
    ),
    (
        "unknown stage referenced inside with",
        "version: 1\nstages:\n  a:\n    kind: command\n    with: {run: x}\n  b:\n    kind: command\n    with:\n      run: cat ${aa}/x.txt\n",
        &[],
    ),
    (
        "matrix: mismatched axes",
        "version: 1\nstages:\n  train:\n    kind: command\n    matrix: {variant: [base, cusa], seed: [0, 1]}\n    with:\n      run: echo ${matrix.variant} ${matrix.seed} > ${out}/m.txt\n  eval:\n    kind: command\n    matrix: {variant: [base, cusa]}\n    with:\n      run: cat ${train}/m.txt\n",
        &[],
    ),
    (
        "matrix: an element that does not exist",
        "version: 1\nstages:\n  train:\n    kind: command\n    matrix: {variant: [base, cusa], seed: [0, 1]}\n    with:\n      run: echo ${matrix.variant} ${matrix.seed} > ${out}/m.txt\n  eval:\n    kind: command\n    matrix: {variant: [base, csa], seed: [0, 1]}\n    with:\n      run: cat ${train}/m.txt\n",
        &[],
    ),
    (
        "matrix: a picked label that does not exist",
        "version: 1\nstages:\n  train:\n    kind: command\n    matrix: {variant: [base, cusa], seed: [0, 1]}\n    with:\n      run: echo ${matrix.variant} ${matrix.seed} > ${out}/m.txt\n  report:\n    kind: command\n    with: {run: \"cat ${train@variant=usa,seed=0/m.txt}\"}\n",
        &[],
    ),
    (
        "matrix: an empty axis",
        "version: 1\nstages:\n  train:\n    kind: command\n    matrix: {variant: [base, cusa], seed: []}\n    with: {run: x}\n",
        &[],
    ),
    (
        "matrix: a name clash",
        "version: 1\nstages:\n  train:\n    kind: command\n    matrix: {seed: [1, \"1\"]}\n    with: {run: x}\n",
        &[],
    ),
    (
        "matrix: a list of elements inside text",
        "version: 1\nstages:\n  train:\n    kind: command\n    matrix: {variant: [base, cusa], seed: [0, 1]}\n    with:\n      run: echo ${matrix.variant} ${matrix.seed} > ${out}/m.txt\n  report:\n    kind: download\n    with: {file: \"${train@*}/m.txt\"}\n",
        &[],
    ),
    (
        "matrix: a list of elements as an input",
        "version: 1\nstages:\n  train:\n    kind: command\n    matrix: {variant: [base, cusa], seed: [0, 1]}\n    with:\n      run: echo ${matrix.variant} ${matrix.seed} > ${out}/m.txt\n  report:\n    kind: command\n    inputs: {all: \"${train@*}\"}\n    with: {run: x}\n",
        &[],
    ),
    (
        "matrix: an axis the stage does not have",
        "version: 1\nstages:\n  train:\n    kind: command\n    matrix: {seed: [0]}\n    with:\n      run: echo ${matrix.sed}\n",
        &[],
    ),
    (
        "matrix: a list item pairing different elements",
        "version: 1\nstages:\n  train:\n    kind: command\n    matrix: {variant: [base, cusa], seed: [0, 1]}\n    with:\n      run: echo ${matrix.variant} ${matrix.seed} > ${out}/m.txt\n  eval:\n    kind: command\n    matrix: {variant: [base]}\n    with: {run: x}\n  export:\n    kind: command\n    with:\n      run: x\n      env:\n        - {a: \"${train@*}\", b: \"${eval@*}\"}\n",
        &[],
    ),
    (
        "matrix: an unknown element on the command line",
        "version: 1\nstages:\n  train:\n    kind: command\n    matrix: {variant: [base, cusa], seed: [0, 1]}\n    with:\n      run: echo ${matrix.variant} ${matrix.seed} > ${out}/m.txt\n",
        &["train@seed=7"],
    ),
    (
        "unknown parameter",
        "version: 1\nparams: {n: 3}\nstages:\n  a:\n    kind: command\n    with:\n      run: echo ${params.m}\n",
        &[],
    ),
    (
        "cycle",
        "version: 1\nstages:\n  a:\n    kind: command\n    inputs: {c: \"${c}\"}\n    with: {run: x}\n  b:\n    kind: command\n    inputs: {a: \"${a}\"}\n    with: {run: x}\n  c:\n    kind: command\n    inputs: {b: \"${b}\"}\n    with: {run: x}\n",
        &[],
    ),
    (
        "duplicate stage",
        "version: 1\nstages:\n  a:\n    kind: command\n    with: {run: x}\n  a:\n    kind: command\n    with: {run: y}\n",
        &[],
    ),
    (
        "bad stage name",
        "version: 1\nstages:\n  Train-Model:\n    kind: command\n    with: {run: x}\n",
        &[],
    ),
    (
        "unknown key of a kind",
        "version: 1\nstages:\n  a:\n    kind: command\n    with:\n      rn: echo hi\n",
        &[],
    ),
    (
        "missing key of a kind",
        "version: 1\nstages:\n  a:\n    kind: command\n    with:\n      env: {A: b}\n",
        &[],
    ),
    (
        "unsupported version",
        "version: 2\nstages:\n  a:\n    kind: command\n    with: {run: x}\n",
        &[],
    ),
    (
        "two download sources",
        "version: 1\nstages:\n  d:\n    kind: download\n    with:\n      url: https://example.org/a.bin\n      file: a.bin\n",
        &[],
    ),
    (
        "bad sha256",
        "version: 1\nstages:\n  d:\n    kind: download\n    with:\n      url: https://example.org/a.bin\n      sha256: abc123\n",
        &[],
    ),
    (
        "a digest read as a number",
        "version: 1\nstages:\n  d:\n    kind: download\n    with:\n      url: https://example.org/a.bin\n      sha256: 1111111111111111111111111111111111111111111111111111111111111111\n",
        &[],
    ),
    (
        "unpinned pip requirement",
        "version: 1\nstages:\n  d:\n    kind: download\n    with:\n      pip: onnxruntime>=1.20\n",
        &[],
    ),
    (
        "--set of an unknown stage",
        "version: 1\nstages:\n  total:\n    kind: command\n    with: {run: x}\n",
        &["--set", "totl.with.run=y"],
    ),
    (
        "--set of an unknown parameter",
        "version: 1\nparams: {n: 1}\nstages:\n  total:\n    kind: command\n    with: {run: x}\n",
        &["--set", "params.m=2"],
    ),
    (
        "unknown stage on the command line",
        "version: 1\nstages:\n  total:\n    kind: command\n    with: {run: x}\n",
        &["totl"],
    ),
    ("missing pipeline file", "", &["missing.yaml"]),
];

#[test]
fn every_malformed_pipeline_is_refused_with_exit_2_and_a_location() {
    let mut transcript = String::new();
    for (name, yaml, extra) in CASES {
        let p = Project::new();
        if !yaml.is_empty() {
            p.write("pipeline.yaml", yaml);
        }
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        let r = p.run(&args);
        assert_eq!(r.code, 2, "case `{name}`: {}", r.stderr);
        if !yaml.is_empty() && !extra.iter().any(|a| *a == "--set" || !a.starts_with('-')) {
            assert!(
                r.stderr.contains("pipeline.yaml:"),
                "case `{name}` has no line:column: {}",
                r.stderr
            );
        }
        assert!(
            !p.path().join("cache/runs-v1").exists()
                || p.path().join("cache/runs-v1").read_dir().unwrap().count() == 0
        );
        transcript.push_str(&format!("## {name}\n{}\n", render(&args, &r, p.path())));
    }
    insta::assert_snapshot!(transcript);
}
