//! The seed statistics of `cusa-pipe metrics` and the export's report against scipy
//! (`scripts/fixtures/seed_stats.py` → `fixtures/seed_stats.json`): mean and sample standard
//! deviation per variant, and the paired difference's mean and 95 % interval as
//! `scipy.stats.ttest_rel(...).confidence_interval(0.95)` reports them.

use std::collections::BTreeMap;

use cusa_stages::seeds::{Run, compare, summary, t_critical};
use serde_json::Value;

#[test]
fn seed_statistics_equal_scipy() {
    let fixture: Value = serde_json::from_str(include_str!("fixtures/seed_stats.json")).unwrap();
    let close = |got: f64, want: &Value, what: &str, case: &Value| {
        let want = want.as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-9 * want.abs().max(1.0),
            "{} {what}: {got} vs scipy {want}",
            case["name"]
        );
    };
    for case in fixture["cases"].as_array().unwrap() {
        let xs = |k: &str| -> Vec<f64> { serde_json::from_value(case[k].clone()).unwrap() };
        let (base, variant) = (xs("base"), xs("variant"));
        let b = summary(&base);
        close(b.mean, &case["base_mean"], "base mean", case);
        close(b.sd.unwrap(), &case["base_sd"], "base sd", case);
        close(t_critical(base.len() - 1), &case["t_critical"], "t", case);
        // Through the table code, seeds in a shuffled order for the variant.
        let mut runs = Vec::new();
        for (i, x) in base.iter().enumerate() {
            runs.push(Run {
                group: "base".into(),
                seed: i.to_string(),
                values: BTreeMap::from([("rsum".to_string(), *x)]),
            });
        }
        for (i, x) in variant.iter().enumerate().rev() {
            runs.push(Run {
                group: "cusa".into(),
                seed: i.to_string(),
                values: BTreeMap::from([("rsum".to_string(), *x)]),
            });
        }
        let rows = compare(
            &runs,
            &["base".into(), "cusa".into()],
            "base",
            &["rsum".into()],
        );
        let v = rows[1].columns[0].unwrap();
        close(v.mean, &case["variant_mean"], "variant mean", case);
        close(v.sd.unwrap(), &case["variant_sd"], "variant sd", case);
        let d = rows[1].deltas[0].unwrap();
        close(d.diff.mean, &case["diff_mean"], "paired mean", case);
        close(d.diff.sd.unwrap(), &case["diff_sd"], "paired sd", case);
        let (lo, hi) = d.ci.unwrap();
        close(lo, &case["ci_low"], "CI low", case);
        close(hi, &case["ci_high"], "CI high", case);
        let want_mark =
            case["ci_low"].as_f64().unwrap() > 0.0 || case["ci_high"].as_f64().unwrap() < 0.0;
        assert_eq!(d.excludes_zero(), want_mark, "{}", case["name"]);
    }
}
