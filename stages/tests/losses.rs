//! The losses against a float64 numpy implementation of METHOD.md with finite-difference
//! gradients (`scripts/fixtures/losses.py` → `fixtures/losses.json`): values and gradients with
//! respect to every embedding and temperature, on a batch with duplicate images, in f64 and in
//! the f32 the CPU backend trains with, each loss in both of its forms ([`Where`]). The
//! comparison is the one `cusa-pipe bench gpu` runs on a GPU ([`loss_parity_within`]); here
//! every row must hold.

use std::path::Path;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use cusa_stages::ml::Where;
use cusa_stages::train::device_check::loss_parity_within;

/// Computes every case of the fixture on backend `B`, written for `place`, and compares within
/// `tol`.
fn check<B: AutodiffBackend>(tol: f64, place: Where) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/losses.json");
    let rows = loss_parity_within::<B>(&fixture, &Default::default(), tol, place).unwrap();
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
    // The diagnostic is reported, not judged; here it must hold as well.
    let failed: Vec<_> = rows.iter().filter(|r| !r.within_bounds()).collect();
    assert!(failed.is_empty(), "out of bounds: {failed:#?}");
    assert_eq!(rows.iter().filter(|r| !r.judged).count(), 1);
}

#[test]
fn losses_and_gradients_match_float64_numpy_in_f64() {
    // Finite differences themselves are accurate to ~1e-7 here. Both forms of the caption
    // direction: a transposed view (the CPU's) and its own product (a GPU's).
    check::<Autodiff<NdArray<f64>>>(1e-6, Where::Host);
    check::<Autodiff<NdArray<f64>>>(1e-6, Where::Device);
}

#[test]
fn losses_and_gradients_match_float64_numpy_in_f32() {
    check::<Autodiff<NdArray<f32>>>(1e-5, Where::Host);
    check::<Autodiff<NdArray<f32>>>(1e-5, Where::Device);
}
