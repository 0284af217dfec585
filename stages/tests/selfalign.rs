//! SelfAlign's terms against a float64 numpy implementation with finite-difference gradients
//! (`scripts/fixtures/selfalign.py` → `fixtures/selfalign.json`): Sinkhorn, LCA (through the
//! objective, prototypes trained and frozen), CRA (through the objective: both guides, hardest
//! negatives, padding, repeated images) and the guide's batch norm in training and eval mode,
//! in f64 and in the f32 the CPU backend trains with. The comparison is the one
//! `cusa-pipe bench gpu` runs on a GPU ([`selfalign_parity_within`]); here every row must hold.

use std::path::Path;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use cusa_stages::ml::Where;
use cusa_stages::train::device_check::selfalign_parity_within;

fn check<B: AutodiffBackend>(tol: f64, place: Where) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/selfalign.json");
    let rows = selfalign_parity_within::<B>(&fixture, &Default::default(), tol, place).unwrap();
    let checks: Vec<&str> = rows.iter().map(|r| r.check.as_str()).collect();
    // Sinkhorn; LCA value, words, detached regions and prototypes, trained and frozen; CRA value
    // and four gradients; the guide in training (output, statistics, four gradients, none for
    // the running statistics) and eval mode; the momentum update.
    assert_eq!(rows.len(), 25, "{checks:?}");
    for expected in [
        "selfalign sinkhorn",
        "lca (frozen prototypes) d/dprototypes (zero), largest",
        "lca (trained prototypes) d/dprototypes",
        "cra d/dwt_weight",
        "guide (train) d/dgamma",
        "guide (eval) output",
    ] {
        assert!(checks.contains(&expected), "{expected}: {checks:?}");
    }
    let failed: Vec<_> = rows.iter().filter(|r| !r.passed()).collect();
    assert!(failed.is_empty(), "out of bounds: {failed:#?}");
}

// Both places SelfAlign's no-gradient parts can run: host loops (what CPU training uses) and
// tensor operations (what a GPU uses), each on its own against the same fixture.
#[test]
fn selfalign_terms_and_gradients_match_float64_numpy_in_f64() {
    check::<Autodiff<NdArray<f64>>>(1e-6, Where::Host);
    check::<Autodiff<NdArray<f64>>>(1e-6, Where::Device);
}

#[test]
fn selfalign_terms_and_gradients_match_float64_numpy_in_f32() {
    check::<Autodiff<NdArray<f32>>>(2e-5, Where::Host);
    check::<Autodiff<NdArray<f32>>>(2e-5, Where::Device);
}
