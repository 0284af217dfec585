//! The losses against a float64 numpy implementation of METHOD.md with finite-difference
//! gradients (`scripts/fixtures/losses.py` → `fixtures/losses.json`): values and gradients with
//! respect to every embedding and temperature, on a batch with duplicate images, in f64 and in
//! the f32 the CPU backend trains with.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use cusa_stages::ml::loss::{self, Reduction};
use serde_json::Value;

mod common;
use common::{flat, relative, values};

fn fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/losses.json")).unwrap()
}

fn matrix<B: Backend>(v: &Value, device: &B::Device) -> Tensor<B, 2> {
    let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
    let (n, d) = (rows.len(), rows[0].len());
    let flat: Vec<f64> = rows.concat();
    Tensor::from_data(
        TensorData::new(flat, [n, d]).convert::<B::FloatElem>(),
        device,
    )
}

fn scalar<B: Backend>(v: f64, device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(
        TensorData::new(vec![v], [1]).convert::<B::FloatElem>(),
        device,
    )
}

/// Computes every case of the fixture on backend `B` and compares within `tol`.
fn check<B: AutodiffBackend>(tol: f64) {
    let device = B::Device::default();
    let f = fixture();
    let inputs = &f["inputs"];
    let temps = &f["temperatures"];
    let ids: Vec<u64> = serde_json::from_value(f["image_ids"].clone()).unwrap();
    let leaf = |name: &str| matrix::<B>(&inputs[name], &device).require_grad();
    let temp = |name: &str| scalar::<B>(temps[name].as_f64().unwrap(), &device).require_grad();
    let u = matrix::<B>(&inputs["u"], &device);
    let v = matrix::<B>(&inputs["v"], &device);
    let p_image = loss::soft_labels(u, 1.0);
    let p_text = loss::soft_labels(v, 1.0);
    assert!(
        relative(&values(p_image.clone()), &flat(&f["soft_labels"]["image"])) < tol,
        "image soft labels"
    );
    assert!(
        relative(&values(p_text.clone()), &flat(&f["soft_labels"]["text"])) < tol,
        "text soft labels"
    );

    for case in ["infonce_reference", "infonce_mean", "vse", "csa", "usa"] {
        let expected = &f["cases"][case];
        let (f_i, f_t, g_i, g_t) = (leaf("f_i"), leaf("f_t"), leaf("g_i"), leaf("g_t"));
        let (tau, tau_c, tau_ui, tau_ut) =
            (temp("tau"), temp("tau_c"), temp("tau_ui"), temp("tau_ut"));
        let value = match case {
            "infonce_reference" | "infonce_mean" => {
                let reduction = if case.ends_with("reference") {
                    Reduction::Reference
                } else {
                    Reduction::Mean
                };
                let targets = loss::multi_positive_targets::<B>(&ids, &device);
                loss::infonce(f_i.clone(), f_t.clone(), tau.clone(), targets, reduction)
            }
            "vse" => loss::vse_hardest(
                f_i.clone(),
                f_t.clone(),
                loss::same_image::<B>(&ids, &device),
                0.2,
            ),
            "csa" => loss::csa(
                f_i.clone(),
                f_t.clone(),
                tau_c.clone(),
                p_image.clone(),
                p_text.clone(),
            ),
            _ => loss::usa(
                g_i.clone(),
                g_t.clone(),
                tau_ui.clone(),
                tau_ut.clone(),
                p_image.clone(),
                p_text.clone(),
            ),
        };
        let got = values(value.clone())[0];
        let want = expected["value"].as_f64().unwrap();
        assert!(
            ((got - want) / want).abs() < tol,
            "{case}: value {got} vs {want}"
        );
        let grads = value.backward();
        let named: [(&str, Option<Vec<f64>>); 8] = [
            ("f_i", f_i.grad(&grads).map(values)),
            ("f_t", f_t.grad(&grads).map(values)),
            ("g_i", g_i.grad(&grads).map(values)),
            ("g_t", g_t.grad(&grads).map(values)),
            ("tau", tau.grad(&grads).map(values)),
            ("tau_c", tau_c.grad(&grads).map(values)),
            ("tau_ui", tau_ui.grad(&grads).map(values)),
            ("tau_ut", tau_ut.grad(&grads).map(values)),
        ];
        let wanted = expected["grad"].as_object().unwrap();
        for (name, grad) in named {
            match (wanted.get(name), grad) {
                (Some(w), Some(g)) => {
                    let err = relative(&g, &flat(w));
                    assert!(err < tol, "{case}: d/d{name} relative error {err:e}");
                }
                (Some(_), None) => panic!("{case}: no gradient for {name}"),
                (None, Some(g)) => assert!(
                    g.iter().all(|x| *x == 0.0),
                    "{case}: {name} must not influence the loss"
                ),
                (None, None) => {}
            }
        }
    }
}

#[test]
fn losses_and_gradients_match_float64_numpy_in_f64() {
    // Finite differences themselves are accurate to ~1e-7 here.
    check::<Autodiff<NdArray<f64>>>(1e-6);
}

#[test]
fn losses_and_gradients_match_float64_numpy_in_f32() {
    check::<Autodiff<NdArray<f32>>>(1e-5);
}
