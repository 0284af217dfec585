//! Helpers shared by the tests that compare against the float64 numpy fixtures.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde_json::Value;

/// A tensor's values as f64.
pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}

/// ‖a − b‖ / ‖b‖.
pub fn relative(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "the same number of values");
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

/// Every number of a (nested) JSON array, in order.
pub fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Number(n) => vec![n.as_f64().unwrap()],
        Value::Array(rows) => rows.iter().flat_map(flat).collect(),
        _ => panic!("not numeric: {v}"),
    }
}
