//! The GPU check kit rehearsed on the CPU: `scripts/gpu/check.sh --dry-run` runs every part of
//! `cusa-pipe bench gpu` (parity in f32 and in f64, train, step) with the tiny CLIP on burn's
//! ndarray backend (and the PyTorch peer when torch is installed), so the script, the binary's
//! parts and the summary cannot rot between GPU leases; and a fixture that disagrees with the
//! model is reported, not passed.

use std::path::Path;
use std::process::Command;

use crate::support::BIN;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn gpu_check_dry_run_passes_every_part_on_the_cpu() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(repo().join("scripts/gpu/check.sh"))
        .arg("--dry-run")
        .env("OUT", out.path())
        .env("CUSA_PIPE", BIN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("all burn parts passed"), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("gpu-check.json")).unwrap()).unwrap();
    assert_eq!(summary["passed"], true);

    let parity = &summary["parts"]["parity"]["result"];
    assert_eq!(parity["device"], "cpu");
    let rows = parity["outcome"]["parity"].as_array().unwrap();
    let checks: Vec<&str> = rows.iter().map(|r| r["check"].as_str().unwrap()).collect();
    for expected in [
        "clip-tiny image_embeds fp32, worst error",
        "clip-tiny text_embeds fp32, worst error",
        "infonce_mean d/df_i",
        "csa d/dtau_c",
        "usa d/dg_t",
        "vse value",
        "cra d/dv",
        "guide (eval) output",
    ] {
        assert!(
            checks.contains(&expected),
            "{expected} is checked: {checks:?}"
        );
    }
    for r in rows {
        let v = r["value"].as_f64().unwrap();
        assert!(v <= r["high"].as_f64().unwrap(), "{r}");
    }
    // Judged on the CPU's IEEE f32, all but the diagnostic.
    let reported: Vec<&str> = rows
        .iter()
        .filter(|r| r["judged"] == false)
        .map(|r| r["check"].as_str().unwrap())
        .collect();
    assert_eq!(
        reported,
        ["diagnostic: log_softmax(sᵀ) vs log_softmax(own product), largest"]
    );

    // The same in f64, within the f64 bounds.
    let f64_parity = &summary["parts"]["parity-f64"]["result"];
    assert_eq!(f64_parity["passed"], true);
    let rows = f64_parity["outcome"]["parity"].as_array().unwrap();
    let checks: Vec<&str> = rows.iter().map(|r| r["check"].as_str().unwrap()).collect();
    for (expected, bound) in [
        ("clip-tiny image_embeds f64, worst error", 1e-6),
        ("infonce_mean d/df_i", 1e-6),
        ("csa value", 1e-6),
        ("cra d/dv", 1e-6),
    ] {
        let row = rows.iter().find(|r| r["check"] == expected);
        let row = row.unwrap_or_else(|| panic!("{expected} is checked in f64: {checks:?}"));
        assert_eq!(row["high"].as_f64().unwrap(), bound, "{row}");
        assert!(row["value"].as_f64().unwrap() <= bound, "{row}");
    }

    let train = &summary["parts"]["train"]["result"]["outcome"]["train"];
    let losses: Vec<f64> = serde_json::from_value(train["losses"].clone()).unwrap();
    assert_eq!(losses.len(), 12);
    assert!(losses[11] < losses[0], "the loss falls: {losses:?}");
    assert_eq!(train["reload_difference"], 0.0);

    // One timed row per loss at fp32 (ndarray has no bf16), with the peer's when torch is here.
    let steps = summary["steps"].as_array().unwrap();
    let configs: Vec<(&str, &str)> = steps
        .iter()
        .map(|s| {
            (
                s["precision"].as_str().unwrap(),
                s["loss"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(configs, [("fp32", "base"), ("fp32", "cusa")]);
    for s in steps {
        let burn = &s["burn"];
        assert_eq!(burn["batch"], 16);
        assert!(burn["images_per_s"].as_f64().unwrap() > 0.0, "{s}");
        assert!(burn["last_loss"].as_f64().unwrap().is_finite(), "{s}");
        if !s["torch"].is_null() {
            assert!(s["burn_over_torch"].as_f64().unwrap() > 0.0, "{s}");
        }
    }
}

#[test]
fn a_fixture_that_disagrees_is_reported_out_of_bounds() {
    let fixtures = tempfile::tempdir().unwrap();
    let tests = fixtures.path().join("tests/fixtures");
    std::fs::create_dir_all(&tests).unwrap();
    let clip_tiny = repo().join("tests/fixtures/clip-tiny");
    std::fs::create_dir_all(tests.join("clip-tiny")).unwrap();
    for f in std::fs::read_dir(&clip_tiny).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tests.join("clip-tiny").join(f.file_name().unwrap())).unwrap();
    }
    // The reference's first text embedding moved by 0.01 in one coordinate.
    let mut reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo().join("tests/fixtures/clip_tiny.json")).unwrap(),
    )
    .unwrap();
    let x = reference["text_embeds"][0][0].as_f64().unwrap();
    reference["text_embeds"][0][0] = (x + 0.01).into();
    std::fs::write(tests.join("clip_tiny.json"), reference.to_string()).unwrap();
    let losses = fixtures.path().join("stages/tests/fixtures");
    std::fs::create_dir_all(&losses).unwrap();
    for f in ["losses.json", "selfalign.json"] {
        std::fs::copy(repo().join("stages/tests/fixtures").join(f), losses.join(f)).unwrap();
    }

    let json = fixtures.path().join("parity.json");
    let run = Command::new(BIN)
        .args([
            "bench",
            "gpu",
            "--device",
            "cpu",
            "--part",
            "parity",
            "--fixtures",
        ])
        .arg(&tests)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(1), "{stdout}");
    let failing: Vec<&str> = stdout.lines().filter(|l| l.ends_with("NO")).collect();
    assert_eq!(failing.len(), 1, "{stdout}");
    assert!(
        failing[0].starts_with("clip-tiny text_embeds fp32, worst error"),
        "{stdout}"
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(doc["passed"], false);
    let moved = doc["outcome"]["parity"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["check"] == "clip-tiny text_embeds fp32, worst error")
        .unwrap();
    let worst = moved["value"].as_f64().unwrap();
    assert!(
        (0.009..0.011).contains(&worst),
        "the moved entry is the worst: {worst}"
    );
}
