//! The losses against a float64 numpy implementation of METHOD.md with finite-difference
//! gradients (`scripts/fixtures/losses.py` → `fixtures/losses.json`): values and gradients with
//! respect to every embedding and temperature, on a batch with duplicate images, in f64 and in
//! the f32 the CPU backend trains with. The comparison is the one `cusa-pipe bench gpu` runs on a
//! GPU ([`loss_parity_within`]); here every row must hold.

use std::path::Path;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use cusa_stages::train::device_check::loss_parity_within;

/// Computes every case of the fixture on backend `B` and compares within `tol`.
fn check<B: AutodiffBackend>(tol: f64) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/losses.json");
    let rows = loss_parity_within::<B>(&fixture, &Default::default(), tol).unwrap();
    let checks: Vec<&str> = rows.iter().map(|r| r.check.as_str()).collect();
    // The soft labels, the diagnostic, seven cases (CSA and USA both ways) with their values
    // and gradients.
    for expected in [
        "soft labels (image)",
        "infonce_reference d/dtau",
        "infonce_mean d/df_t",
        "vse d/df_i",
        "csa d/dtau_c",
        "usa d/dtau_ut",
        "csa_reverse d/df_t",
        "usa_reverse d/dtau_ui",
        "diagnostic: log_softmax(sᵀ) vs log_softmax(own product), largest",
    ] {
        assert!(
            checks.contains(&expected),
            "{expected} is compared: {checks:?}"
        );
    }
    assert_eq!(rows.len(), 32, "{checks:?}");
    let failed: Vec<_> = rows.iter().filter(|r| !r.passed()).collect();
    assert!(failed.is_empty(), "out of bounds: {failed:#?}");
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
