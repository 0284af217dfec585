//! Results over seeds: what a reviewer asks of an ablation table. Each variant's runs (one per
//! seed) summarised as mean ± sample standard deviation and n, and each variant compared with
//! the baseline **seed by seed**: the paired differences' mean with a 95 % confidence interval
//! from Student's t over those differences (n − 1 degrees of freedom), marked when it excludes
//! 0. `cusa-pipe metrics` and the export's report print the same table from this module.
//!
//! Invariants: only seeds measured for both the variant and the baseline enter a paired
//! difference (never a mean against a mean); with fewer than two pairs there is no interval
//! (and no mark), with one run there is no standard deviation — shown as such, never as 0.
//! Checked against scipy (`scripts/fixtures/seed_stats.py` → `tests/fixtures/seed_stats.json`).

use std::collections::BTreeMap;

use statrs::distribution::{ContinuousCDF, StudentsT};

/// The confidence level of the intervals.
pub const LEVEL: f64 = 0.95;

/// Mean, sample standard deviation (n − 1; none for one value) and n.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub sd: Option<f64>,
}

/// Summarises `xs` (not empty).
pub fn summary(xs: &[f64]) -> Summary {
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n as f64;
    let sd = (n > 1).then(|| {
        let ss: f64 = xs.iter().map(|x| (x - mean) * (x - mean)).sum();
        (ss / (n - 1) as f64).sqrt()
    });
    Summary { n, mean, sd }
}

/// Paired differences (variant − baseline, seed by seed): their summary and, from two pairs
/// on, the [`LEVEL`] confidence interval of their mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paired {
    pub diff: Summary,
    pub ci: Option<(f64, f64)>,
}

impl Paired {
    /// Whether the interval excludes 0 (the difference is unlikely to be seed noise).
    pub fn excludes_zero(&self) -> bool {
        self.ci.is_some_and(|(lo, hi)| lo > 0.0 || hi < 0.0)
    }
}

/// The two-sided critical value of Student's t with `df` degrees of freedom.
pub fn t_critical(df: usize) -> f64 {
    StudentsT::new(0.0, 1.0, df as f64)
        .expect("df >= 1 is a valid Student t")
        .inverse_cdf(1.0 - (1.0 - LEVEL) / 2.0)
}

/// Paired comparison of `diffs` (not empty).
pub fn paired(diffs: &[f64]) -> Paired {
    let diff = summary(diffs);
    let ci = diff.sd.map(|sd| {
        let half = t_critical(diff.n - 1) * sd / (diff.n as f64).sqrt();
        (diff.mean - half, diff.mean + half)
    });
    Paired { diff, ci }
}

/// One measured run: its group (variant), seed and numbers by column.
#[derive(Debug, Clone)]
pub struct Run {
    pub group: String,
    pub seed: String,
    pub values: BTreeMap<String, f64>,
}

/// One row of the table: a group over its seeds, and its paired deltas to the baseline.
#[derive(Debug, Clone)]
pub struct Row {
    pub group: String,
    /// The seeds measured, in the order given.
    pub seeds: Vec<String>,
    /// Per column (in the order asked), the summary over seeds (absent: never measured).
    pub columns: Vec<Option<Summary>>,
    /// Per column, the paired comparison to the baseline (none for the baseline itself, or
    /// when no seed was measured for both).
    pub deltas: Vec<Option<Paired>>,
    /// The seeds both this group and the baseline measured.
    pub paired_seeds: usize,
}

/// Groups `runs` (in the order of `groups`) and compares each with `baseline` seed by seed.
pub fn compare(runs: &[Run], groups: &[String], baseline: &str, columns: &[String]) -> Vec<Row> {
    fn of<'a>(runs: &'a [Run], g: &'a str) -> impl Iterator<Item = &'a Run> {
        runs.iter().filter(move |r| r.group == g)
    }
    let base: BTreeMap<&str, &Run> = of(runs, baseline).map(|r| (r.seed.as_str(), r)).collect();
    groups
        .iter()
        .map(|g| {
            let seeds: Vec<String> = of(runs, g).map(|r| r.seed.clone()).collect();
            let col = |c: &String| -> Option<Summary> {
                let xs: Vec<f64> = of(runs, g)
                    .filter_map(|r| r.values.get(c).copied())
                    .collect();
                (!xs.is_empty()).then(|| summary(&xs))
            };
            let delta = |c: &String| -> Option<Paired> {
                if g == baseline {
                    return None;
                }
                let diffs: Vec<f64> = of(runs, g)
                    .filter_map(|r| {
                        Some(r.values.get(c)? - base.get(r.seed.as_str())?.values.get(c)?)
                    })
                    .collect();
                (!diffs.is_empty()).then(|| paired(&diffs))
            };
            Row {
                group: g.clone(),
                paired_seeds: seeds
                    .iter()
                    .filter(|s| base.contains_key(s.as_str()))
                    .count(),
                seeds,
                columns: columns.iter().map(col).collect(),
                deltas: columns.iter().map(delta).collect(),
            }
        })
        .collect()
}

/// `299.9 ± 1.2` (one decimal, the precision of the percentages compared), `299.9` for one run.
pub fn show_summary(s: &Summary) -> String {
    match s.sd {
        Some(sd) => format!("{:.1} ± {sd:.1}", s.mean),
        None => format!("{:.1}", s.mean),
    }
}

/// `+4.2 [-1.0, 9.4]`, with `*` when the interval excludes 0; `+4.2` without an interval.
pub fn show_paired(p: &Paired) -> String {
    match p.ci {
        Some((lo, hi)) => format!(
            "{:+.1} [{lo:.1}, {hi:.1}]{}",
            p.diff.mean,
            if p.excludes_zero() { "*" } else { "" }
        ),
        None => format!("{:+.1}", p.diff.mean),
    }
}

/// The table as aligned text lines: a header (`first` names the row column), per group its
/// `mean ± sd` row and, below each non-baseline group, its `Δ vs baseline` row; a legend.
pub fn render(rows: &[Row], columns: &[String], baseline: &str, first: &str) -> Vec<String> {
    let mut table: Vec<Vec<String>> = Vec::new();
    let mut header = vec![first.to_string(), "n".to_string()];
    header.extend(columns.iter().cloned());
    table.push(header);
    for r in rows {
        let mut line = vec![r.group.clone(), r.seeds.len().to_string()];
        line.extend(
            r.columns
                .iter()
                .map(|c| c.as_ref().map(show_summary).unwrap_or_else(|| "-".into())),
        );
        table.push(line);
        if r.group != baseline {
            let mut line = vec![format!("  Δ vs {baseline}"), r.paired_seeds.to_string()];
            line.extend(
                r.deltas
                    .iter()
                    .map(|d| d.as_ref().map(show_paired).unwrap_or_default()),
            );
            table.push(line);
        }
    }
    let mut out = align(&table);
    let intervals = rows
        .iter()
        .flat_map(|r| &r.deltas)
        .flatten()
        .any(|d| d.ci.is_some());
    out.push(if intervals {
        format!(
            "mean ± sd over seeds (n); Δ: mean paired difference to {baseline}, seed by seed, [{:.0} % CI, Student t]; * the interval excludes 0",
            LEVEL * 100.0
        )
    } else {
        format!(
            "Δ: difference to {baseline}, seed by seed; a spread and an interval need two seeds or more"
        )
    });
    out
}

/// Lines of a table: the first column left-aligned, the others right-aligned, two spaces
/// apart, each as wide as its widest cell.
pub fn align(table: &[Vec<String>]) -> Vec<String> {
    let columns = table.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|j| {
            table
                .iter()
                .filter_map(|l| l.get(j))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    table
        .iter()
        .map(|line| {
            let mut text = String::new();
            for (j, c) in line.iter().enumerate() {
                let pad = " ".repeat(widths[j] - c.chars().count());
                if j == 0 {
                    text.push_str(c);
                    text.push_str(&pad);
                } else {
                    text.push_str("  ");
                    text.push_str(&pad);
                    text.push_str(c);
                }
            }
            text.trim_end().to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_run_has_no_spread_and_one_pair_no_interval() {
        let s = summary(&[3.0]);
        assert_eq!((s.n, s.mean, s.sd), (1, 3.0, None));
        let p = paired(&[2.0]);
        assert_eq!(p.ci, None);
        assert!(!p.excludes_zero());
        assert_eq!(show_paired(&p), "+2.0");
    }

    #[test]
    fn deltas_pair_seeds_and_skip_unmatched_ones() {
        let run = |g: &str, seed: &str, x: f64| Run {
            group: g.into(),
            seed: seed.into(),
            values: BTreeMap::from([("rsum".to_string(), x)]),
        };
        let runs = [
            run("base", "0", 10.0),
            run("base", "1", 20.0),
            run("cusa", "0", 12.0),
            run("cusa", "1", 23.0),
            run("cusa", "2", 100.0),
        ];
        let rows = compare(
            &runs,
            &["base".into(), "cusa".into()],
            "base",
            &["rsum".into()],
        );
        assert_eq!(rows[1].seeds, ["0", "1", "2"]);
        assert_eq!(rows[1].paired_seeds, 2);
        let d = rows[1].deltas[0].unwrap();
        assert_eq!(d.diff.n, 2);
        assert!((d.diff.mean - 2.5).abs() < 1e-12);
        assert!(rows[0].deltas[0].is_none());
        let lines = render(&rows, &["rsum".into()], "base", "variant");
        assert_eq!(lines[0], "variant      n              rsum");
        assert!(lines[2].starts_with("cusa"), "{lines:?}");
        assert!(lines[3].starts_with("  Δ vs base  2"), "{lines:?}");
        assert!(lines[4].contains("[95 % CI, Student t]"), "{lines:?}");
    }
}
