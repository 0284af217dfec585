//! The retrieval metrics against independent references (`scripts/fixtures/retrieval.py` →
//! `fixtures/retrieval.json`): R@K and RSUM against float64 numpy from the definitions, and
//! mAP@R / R-Precision / R@1 against the eccv-caption package's own implementation, on random
//! embeddings and on embeddings full of exact ties with duplicated images and captions.

use cusa_stages::ml::retrieval::{self, Matrix};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn lists(v: &Value) -> Vec<Vec<usize>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < 1e-9, "{what}: {a} vs reference {b}");
}

#[test]
fn metrics_equal_numpy_and_eccv_caption_on_random_and_tied_embeddings() {
    let fixture: Value = serde_json::from_str(include_str!("fixtures/retrieval.json")).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let dim = case["dim"].as_u64().unwrap() as usize;
        let (images, captions) = (floats(&case["images"]), floats(&case["captions"]));
        let image_of: Vec<usize> = serde_json::from_value(case["image_of"].clone()).unwrap();
        let im = Matrix { data: &images, dim };
        let cap = Matrix {
            data: &captions,
            dim,
        };
        let ranks = retrieval::ranks(&im, &cap, &image_of);
        let want_i2t: Vec<usize> = serde_json::from_value(case["ranks_i2t"].clone()).unwrap();
        let want_t2i: Vec<usize> = serde_json::from_value(case["ranks_t2i"].clone()).unwrap();
        assert_eq!(ranks.i2t, want_i2t, "{name}: i2t ranks");
        assert_eq!(ranks.t2i, want_t2i, "{name}: t2i ranks");
        let r = ranks.recalls();
        let want: Vec<f64> = serde_json::from_value(case["recalls"].clone()).unwrap();
        let got = [r.i2t_r1, r.i2t_r5, r.i2t_r10, r.t2i_r1, r.t2i_r5, r.t2i_r10];
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            close(*g, *w, &format!("{name}: recall {k}"));
        }
        close(
            r.rsum,
            case["rsum"].as_f64().unwrap(),
            &format!("{name}: rsum"),
        );
        for (direction, q, g, positives) in [
            ("i2t", &im, &cap, lists(&case["positives_i2t"])),
            ("t2i", &cap, &im, lists(&case["positives_t2i"])),
        ] {
            let e = retrieval::extended(q, g, &positives);
            let want = &case[format!("extended_{direction}")];
            let what = |m: &str| format!("{name}: {direction} {m}");
            close(e.map_at_r, want["mAP@R"].as_f64().unwrap(), &what("mAP@R"));
            close(e.r_precision, want["R-P"].as_f64().unwrap(), &what("R-P"));
            close(e.r1, want["R@1"].as_f64().unwrap(), &what("R@1"));
            assert_eq!(e.queries as u64, want["queries"].as_u64().unwrap());
        }
    }
}

#[test]
fn label_r1_equals_numpy_with_unlabelled_rows_singleton_classes_and_ties() {
    let fixture: Value = serde_json::from_str(include_str!("fixtures/retrieval.json")).unwrap();
    for case in fixture["label_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let dim = case["dim"].as_u64().unwrap() as usize;
        let rows = floats(&case["rows"]);
        let labels: Vec<Option<u32>> = serde_json::from_value(case["labels"].clone()).unwrap();
        let (r1, queries) = retrieval::label_r1(&Matrix { data: &rows, dim }, &labels);
        close(
            r1,
            case["label_r1"].as_f64().unwrap(),
            &format!("{name}: label R@1"),
        );
        assert_eq!(queries as u64, case["queries"].as_u64().unwrap(), "{name}");
    }
}
