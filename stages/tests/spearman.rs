//! Spearman's correlation (the STS metric) against `scipy.stats.spearmanr`
//! (`scripts/fixtures/spearman.py` → `fixtures/spearman.json`), ties included.

use cusa_stages::ml::stats::spearman;
use serde_json::Value;

#[test]
fn spearman_equals_scipy_with_and_without_ties() {
    let fixture: Value = serde_json::from_str(include_str!("fixtures/spearman.json")).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let v = |k: &str| -> Vec<f64> { serde_json::from_value(case[k].clone()).unwrap() };
        let got = spearman(&v("a"), &v("b"));
        let want = case["spearman"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-12,
            "{}: {got} vs scipy {want}",
            case["name"]
        );
    }
}
