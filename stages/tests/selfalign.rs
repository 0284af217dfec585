//! SelfAlign's terms against a float64 numpy implementation with finite-difference gradients
//! (`scripts/fixtures/selfalign.py` → `fixtures/selfalign.json`): Sinkhorn, LCA (through the
//! objective, prototypes trained and frozen), CRA (through the objective: both guides, hardest
//! negatives, padding, repeated images) and the guide's batch norm in training and eval mode,
//! in f64 and in the f32 the CPU backend trains with.

use burn::backend::{Autodiff, NdArray};
use burn::module::Param;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use cusa_stages::ml::objective::{BatchTargets, Objective, Term};
use cusa_stages::ml::selfalign::{
    self, CraConfig, Guide, LcaConfig, Locals, SelfAlign, l2_normalize3,
};
use cusa_stages::ml::student::{Embeddings, Encoded, Temperatures};
use serde_json::Value;

mod common;
use common::{flat, relative, values};

fn fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/selfalign.json")).unwrap()
}

fn tensor<B: Backend, const D: usize>(
    v: &Value,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(
        TensorData::new(flat(v), shape).convert::<B::FloatElem>(),
        device,
    )
}

const B_: usize = 6;
const R: usize = 4;
const L: usize = 5;
const D: usize = 5;
const K: usize = 7;

fn guide<B: Backend>(g: &Value, device: &B::Device) -> Guide<B> {
    let mut guide = Guide::new(D, device);
    guide.linear.weight = Param::from_tensor(tensor(&g["weight"], [D, D], device));
    guide.linear.bias = Some(Param::from_tensor(tensor(&g["bias"], [D], device)));
    guide.gamma = Param::from_tensor(tensor(&g["gamma"], [D], device));
    guide.beta = Param::from_tensor(tensor(&g["beta"], [D], device));
    guide.running_mean =
        Param::from_tensor(tensor(&g["running_mean"], [D], device)).set_require_grad(false);
    guide.running_var =
        Param::from_tensor(tensor(&g["running_var"], [D], device)).set_require_grad(false);
    guide
}

fn embeddings<B: Backend>(v: Tensor<B, 3>, t: Tensor<B, 3>, lengths: &[usize]) -> Embeddings<B> {
    let device = v.device();
    let valid: Vec<f32> = lengths
        .iter()
        .flat_map(|&n| (0..L).map(move |j| if j < n { 1.0 } else { 0.0 }))
        .collect();
    let valid = Tensor::from_data(
        TensorData::new(valid, [B_, L]).convert::<B::FloatElem>(),
        &device,
    );
    let cross = || Tensor::zeros([B_, 2], &device);
    Embeddings {
        image: Encoded {
            cross: cross(),
            uni: None,
            locals: Some(Locals::dense(v)),
        },
        text: Encoded {
            cross: cross(),
            uni: None,
            locals: Some(Locals { states: t, valid }),
        },
    }
}

fn check<B: AutodiffBackend>(tol: f64) {
    let device = B::Device::default();
    let f = fixture();
    let inputs = &f["inputs"];
    let s = &f["settings"];
    let setting = |k: &str| s[k].as_f64().unwrap();
    let ids: Vec<u64> = serde_json::from_value(f["image_ids"].clone()).unwrap();
    let lengths: Vec<usize> = serde_json::from_value(f["lengths"].clone()).unwrap();
    let targets = |epoch| BatchTargets::<B> {
        image_ids: ids.clone(),
        soft_labels: None,
        epoch,
    };
    let temps = Temperatures::<B>::new(&device);
    let leaf_v = || tensor::<B, 3>(&inputs["v"], [B_, R, D], &device).require_grad();
    let leaf_t = || tensor::<B, 3>(&inputs["t"], [B_, L, D], &device).require_grad();
    let prototypes = || tensor::<B, 2>(&inputs["prototypes"], [K, D], &device);

    // Sinkhorn over all regions of the batch.
    let v = tensor::<B, 3>(&inputs["v"], [B_, R, D], &device);
    let q = selfalign::sinkhorn(
        l2_normalize3(v)
            .reshape([B_ * R, D])
            .matmul(prototypes().transpose()),
        setting("epsilon"),
        setting("sinkhorn_iterations") as usize,
    );
    let err = relative(&values(q), &flat(&f["sinkhorn"]));
    assert!(err < tol, "sinkhorn relative error {err:e}");

    // LCA through the objective, prototypes trained (epoch ≥ freeze_epochs) and frozen.
    let lca = LcaConfig {
        weight: 1.0,
        prototypes: K,
        epsilon: setting("epsilon"),
        sinkhorn_iterations: setting("sinkhorn_iterations") as usize,
        temperature: setting("lca_temperature"),
        freeze_epochs: 1,
    };
    let objective = Objective {
        terms: vec![Term::Lca(lca)],
    };
    let want = &f["cases"]["lca"];
    for epoch in [1, 0] {
        let (v, t) = (leaf_v(), leaf_t());
        let params = SelfAlign {
            prototypes: Some(Param::from_tensor(prototypes())),
            image_guide: None,
            text_guide: None,
        };
        let e = embeddings(v.clone(), t.clone(), &lengths);
        let out = objective
            .evaluate(&e, &temps, Some(&params), &targets(epoch))
            .unwrap();
        assert_eq!(out.values[0].0, "lca");
        let got = values(out.total.clone())[0];
        let w = want["value"].as_f64().unwrap();
        assert!(((got - w) / w).abs() < tol, "lca value {got} vs {w}");
        let grads = out.total.backward();
        let err = relative(&values(t.grad(&grads).unwrap()), &flat(&want["grad"]["t"]));
        assert!(err < tol, "lca d/dt relative error {err:e}");
        assert!(
            v.grad(&grads)
                .is_none_or(|g| values(g).iter().all(|x| *x == 0.0)),
            "the image side is detached"
        );
        let c_grad = params.prototypes.as_ref().unwrap().val().grad(&grads);
        if epoch == 0 {
            assert!(
                c_grad.is_none_or(|g| values(g).iter().all(|x| *x == 0.0)),
                "frozen prototypes get no gradient"
            );
        } else {
            let err = relative(
                &values(c_grad.expect("trained prototypes")),
                &flat(&want["grad"]["c"]),
            );
            assert!(err < tol, "lca d/dprototypes relative error {err:e}");
        }
    }

    // CRA through the objective: both guides in training mode, both directions.
    let cra = CraConfig {
        weight: 1.0,
        temperature: setting("cra_temperature"),
        hardest: setting("hardest") as usize,
    };
    let objective = Objective {
        terms: vec![Term::Cra(cra)],
    };
    let (v, t) = (leaf_v(), leaf_t());
    let params = SelfAlign {
        prototypes: None,
        image_guide: Some(guide(&inputs["guides"]["image"], &device)),
        text_guide: Some(guide(&inputs["guides"]["text"], &device)),
    };
    let e = embeddings(v.clone(), t.clone(), &lengths);
    let out = objective
        .evaluate(&e, &temps, Some(&params), &targets(0))
        .unwrap();
    let want = &f["cases"]["cra"];
    let got = values(out.total.clone())[0];
    let w = want["value"].as_f64().unwrap();
    assert!(((got - w) / w).abs() < tol, "cra value {got} vs {w}");
    let (image_stats, text_stats) = out.guide_stats.clone().expect("guide statistics");
    assert_eq!(image_stats.mean.len(), D);
    let grads = out.total.backward();
    for (name, grad) in [
        ("v", v.grad(&grads).map(values)),
        ("t", t.grad(&grads).map(values)),
        (
            "wi_weight",
            params
                .image_guide
                .as_ref()
                .unwrap()
                .linear
                .weight
                .val()
                .grad(&grads)
                .map(values),
        ),
        (
            "wt_weight",
            params
                .text_guide
                .as_ref()
                .unwrap()
                .linear
                .weight
                .val()
                .grad(&grads)
                .map(values),
        ),
    ] {
        let err = relative(&grad.expect("a gradient"), &flat(&want["grad"][name]));
        assert!(err < tol, "cra d/d{name} relative error {err:e}");
    }

    // The text guide alone, training mode: output, batch statistics, gradients.
    let want = &f["cases"]["guide_train"];
    let g = guide::<B>(&inputs["guides"]["text"], &device);
    let x = Locals {
        states: tensor::<B, 3>(&inputs["t"], [B_, L, D], &device),
        valid: e.text.locals.as_ref().unwrap().valid.clone(),
    }
    .mean()
    .detach()
    .require_grad();
    let (out, stats) = g.forward_train(x.clone());
    let err = relative(&values(out.clone()), &flat(&want["output"]));
    assert!(err < tol, "guide (train) output relative error {err:e}");
    let stats64 = |v: &[f32]| v.iter().map(|x| *x as f64).collect::<Vec<_>>();
    assert!(relative(&stats64(&stats.mean), &flat(&want["batch_mean"])) < 1e-5);
    assert!(relative(&stats64(&stats.var), &flat(&want["batch_var_unbiased"])) < 1e-5);
    assert_eq!(
        stats, text_stats,
        "the objective reports the guide's statistics"
    );
    let mix = tensor::<B, 2>(&want["mix"], [B_, D], &device);
    let grads = (out * mix).sum().backward();
    for (name, grad) in [
        ("x", x.grad(&grads).map(values)),
        ("weight", g.linear.weight.val().grad(&grads).map(values)),
        ("gamma", g.gamma.val().grad(&grads).map(values)),
        ("beta", g.beta.val().grad(&grads).map(values)),
    ] {
        let err = relative(&grad.expect("a gradient"), &flat(&want["grad"][name]));
        assert!(err < tol, "guide d/d{name} relative error {err:e}");
    }
    assert!(
        g.running_mean.val().grad(&grads).is_none(),
        "running statistics are not trained"
    );

    // Eval mode: the running statistics, not the batch's.
    let out = g.forward_eval(x.detach());
    let err = relative(&values(out), &flat(&f["cases"]["guide_eval"]["output"]));
    assert!(err < tol, "guide (eval) output relative error {err:e}");

    // The running statistics move by momentum 0.1 towards the batch's.
    let before = values(g.running_mean.val());
    let moved = values(g.clone().update_running(&stats).running_mean.val());
    for ((b, m), n) in before.iter().zip(&moved).zip(&stats.mean) {
        assert!((m - (0.9 * b + 0.1 * *n as f64)).abs() < 1e-5);
    }
}

#[test]
fn selfalign_terms_and_gradients_match_float64_numpy_in_f64() {
    check::<Autodiff<NdArray<f64>>>(1e-6);
}

#[test]
fn selfalign_terms_and_gradients_match_float64_numpy_in_f32() {
    check::<Autodiff<NdArray<f32>>>(2e-5);
}
