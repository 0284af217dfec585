//! `precision:` of a training: what a student's matrix products compute in.
//!
//! `bf16-mixed` is PyTorch's bf16 autocast where it pays: the operands of every matrix product
//! (the linear layers, attention's scores and mixing, the patch embedding) are rounded to
//! bfloat16 and multiplied in bfloat16 (tensor cores on CUDA); the product is converted back to
//! f32 at once. Everything else stays f32: the weights and the optimiser's state (the "master"
//! copy), layer norms, softmax, residual sums, losses, and the gradients once they leave a
//! product. bf16 has f32's exponent range, so no loss scaling is needed; fp16, which would need
//! it, is not offered.
//!
//! Invariants: with [`Precision::Fp32`] every operation here is the plain f32 one (same calls,
//! same result); with [`Precision::Bf16Mixed`] a product's operands, bias included, are rounded
//! once each and its result (rounded to bf16 by the backend) is f32 again before anything else
//! sees it. `scripts/fixtures/clip.py` emulates exactly these rounding points in float64; the
//! CLIP parity tests check that the student departs from the exact reference as far as the
//! emulation does (not bit for bit: one rounding that falls the other way moves everything after
//! it by a fraction of a bf16 step, so bf16 outputs of two correct implementations differ in
//! their last bits).

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};
use serde::{Deserialize, Serialize};

/// `precision:` of a `train` stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    #[serde(rename = "fp32")]
    Fp32,
    /// Matrix products in bf16, the rest in f32.
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fp32 => "fp32",
            Self::Bf16Mixed => "bf16-mixed",
        })
    }
}

impl Precision {
    /// `a · b` (batched over the leading dimensions).
    pub fn matmul<B: Backend, const D: usize>(
        self,
        a: Tensor<B, D>,
        b: Tensor<B, D>,
    ) -> Tensor<B, D> {
        match self {
            Self::Fp32 => a.matmul(b),
            Self::Bf16Mixed => bf16(a).matmul(bf16(b)).cast(FloatDType::F32),
        }
    }

    /// `layer` applied to `x` (`x · W + b`).
    pub fn linear<B: Backend, const D: usize>(
        self,
        layer: &Linear<B>,
        x: Tensor<B, D>,
    ) -> Tensor<B, D> {
        match self {
            Self::Fp32 => layer.forward(x),
            Self::Bf16Mixed => burn::tensor::module::linear(
                bf16(x),
                bf16(layer.weight.val()),
                layer.bias.as_ref().map(|b| bf16(b.val())),
            )
            .cast(FloatDType::F32),
        }
    }
}

fn bf16<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    t.cast(FloatDType::BF16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::nn::LinearConfig;
    use burn::tensor::TensorData;

    type B = Flex;

    /// The nearest bf16 of an f32 (ties to even), as an f32.
    fn round_bf16(x: f32) -> f32 {
        half::bf16::from_f32(x).to_f32()
    }

    #[test]
    fn bf16_products_round_their_operands_and_their_result_once() {
        let device = Default::default();
        // 1 + 2⁻¹⁰ is not a bf16 (8 bits of mantissa): it rounds to 1.
        let a = Tensor::<B, 2>::from_data(
            TensorData::new(vec![1.0f32 + 1.0 / 1024.0, 3.0], [1, 2]),
            &device,
        );
        let b =
            Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, 1.0 / 3.0], [2, 1]), &device);
        let f32_product = Precision::Fp32.matmul(a.clone(), b.clone());
        let bf16_product = Precision::Bf16Mixed.matmul(a, b);
        assert_eq!(bf16_product.dtype(), burn::tensor::DType::F32);
        let want = round_bf16(1.0 + 3.0 * round_bf16(1.0 / 3.0));
        assert_eq!(
            bf16_product.into_data().to_vec::<f32>().unwrap(),
            vec![want]
        );
        let exact = f32_product.into_data().to_vec::<f32>().unwrap()[0];
        assert!((exact - (1.0 + 1.0 / 1024.0 + 1.0)).abs() < 1e-6);
        assert_ne!(exact, want);
    }

    #[test]
    fn fp32_linear_is_the_layer_itself_and_bf16_is_close_to_it() {
        let device = Default::default();
        let layer = LinearConfig::new(16, 8).init::<B>(&device);
        let x = Tensor::<B, 3>::random(
            [2, 3, 16],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let plain = layer
            .forward(x.clone())
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let fp32 = Precision::Fp32
            .linear(&layer, x.clone())
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(plain, fp32);
        let mixed = Precision::Bf16Mixed
            .linear(&layer, x)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let worst = plain
            .iter()
            .zip(&mixed)
            .map(|(p, m)| (p - m).abs() / p.abs().max(1.0))
            .fold(0.0f32, f32::max);
        assert!(worst > 0.0 && worst < 2e-2, "bf16 off by {worst}");
    }
}
