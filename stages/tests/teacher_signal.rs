//! The teacher-signal diagnostics of the softlabel stage against a float64 numpy
//! implementation written independently (`scripts/fixtures/teacher_signal.py` →
//! `fixtures/teacher_signal.json`: ranks with averaged ties for the AUC, whole-matrix softmaxes,
//! lexsorted neighbours), on vectors with planted concepts, images with one to three captions,
//! explicit batches, τ_s 0.5 and k 3; the mass split (own / true positives / negatives) at
//! every temperature of the sweep.

use std::collections::HashSet;
use std::path::Path;

use cusa_stages::softlabel::signal::{Direction, Inputs, measure};
use serde_json::Value;

fn flat(v: &Value) -> (Vec<f32>, usize) {
    let rows = v.as_array().unwrap();
    let dim = rows[0].as_array().unwrap().len();
    let data = rows
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    (data, dim)
}

fn close(got: &Direction, want: &Value, what: &str) {
    for (name, g) in [
        ("auc", got.auc),
        ("mass_on_positives", got.mass_on_positives),
        ("mass_uniform", got.mass_uniform),
        ("mass_on_own", got.mass_on_own),
        ("positives_per_row", got.positives_per_row),
        ("precision_at_k", got.precision_at_k),
        ("precision_random", got.precision_random),
    ] {
        let w = want[name].as_f64().unwrap();
        assert!((g - w).abs() <= 1e-9, "{what} {name}: {g} vs numpy {w}");
    }
    let sweep = want["by_temperature"].as_array().unwrap();
    assert_eq!(
        got.by_temperature.len(),
        sweep.len(),
        "{what}: the sweep's length"
    );
    for (g, w) in got.by_temperature.iter().zip(sweep) {
        let tau = g.temperature;
        for (name, g) in [
            ("temperature", g.temperature),
            ("own", g.own),
            ("positives", g.positives),
            ("negatives", g.negatives),
        ] {
            let w = w[name].as_f64().unwrap();
            assert!(
                (g - w).abs() <= 1e-9,
                "{what} τ {tau} {name}: {g} vs numpy {w}"
            );
        }
        let total = g.own + g.positives + g.negatives;
        assert!(
            (total - 1.0).abs() < 1e-12,
            "{what}: the mass adds to {total}"
        );
    }
    // The configured temperature (0.5) is also in the sweep: the same figures.
    let at = got
        .by_temperature
        .iter()
        .find(|m| m.temperature == 0.5)
        .unwrap();
    assert_eq!(
        (at.own, at.positives),
        (got.mass_on_own, got.mass_on_positives)
    );
}

#[test]
fn diagnostics_equal_the_float64_reference() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/teacher_signal.json");
    let f: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (images, dim_i) = flat(&f["images"]);
    let (captions, dim_t) = flat(&f["captions"]);
    let caption_image: Vec<u32> = f["caption_image"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let positives: HashSet<(u32, u32)> = f["positives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_u64().unwrap() as u32))
        .collect();
    let batches: Vec<Vec<u32>> = f["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let inputs = Inputs {
        images: &images,
        dim_i,
        captions: &captions,
        dim_t,
        caption_image: &caption_image,
        positives: &positives,
    };
    let s = measure(
        &inputs,
        &batches,
        f["temperature"].as_f64().unwrap(),
        f["k"].as_u64().unwrap() as usize,
    );
    close(&s.i2t, &f["i2t"], "i2t");
    close(&s.t2i, &f["t2i"], "t2i");
    // The planted concepts are visible to both teachers: a signal well above chance.
    assert!(s.i2t.auc > 0.6 && s.t2i.auc > 0.6, "{s:?}");
    assert!(s.i2t.mass_on_positives > s.i2t.mass_uniform, "{s:?}");
    // Sharper soft labels move mass off the negatives, onto the own pair first.
    let own: Vec<f64> = s.i2t.by_temperature.iter().map(|m| m.own).collect();
    assert!(own.windows(2).all(|w| w[1] > w[0]), "{own:?}");
    // A τ_s outside the sweep: the same sweep, and its own figures between its neighbours'
    // (0.5 and 0.2).
    let k = f["k"].as_u64().unwrap() as usize;
    let off = measure(&inputs, &batches, 0.3, k);
    assert_eq!(off.i2t.by_temperature, s.i2t.by_temperature);
    assert_eq!(off.i2t.auc, s.i2t.auc);
    assert!(
        own[1] < off.i2t.mass_on_own && off.i2t.mass_on_own < own[2],
        "{} not within {own:?}",
        off.i2t.mass_on_own
    );
}
