//! The teacher-signal diagnostics of the softlabel stage against a float64 numpy
//! implementation written independently (`scripts/fixtures/teacher_signal.py` →
//! `fixtures/teacher_signal.json`: ranks with averaged ties for the AUC, whole-matrix softmaxes,
//! lexsorted neighbours), on vectors with planted concepts, images with one to three captions,
//! explicit batches, τ_s 0.5 and k 3.

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
        ("positives_per_row", got.positives_per_row),
        ("precision_at_k", got.precision_at_k),
        ("precision_random", got.precision_random),
    ] {
        let w = want[name].as_f64().unwrap();
        assert!((g - w).abs() <= 1e-9, "{what} {name}: {g} vs numpy {w}");
    }
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
}
