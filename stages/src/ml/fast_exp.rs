//! e^x over f32 slices for the host loops of SelfAlign's terms (Sinkhorn's kernel, LCA's word
//! softmax): millions of exponentials a step, which glibc computes one call at a time.
//!
//! Why it exists: one formula — Cody–Waite range reduction by ln 2, Cephes' degree-6
//! polynomial on [−ln2/2, ln2/2] (its last coefficient, 0.50000001, is 0.5 in f32), the power
//! of two set by integer arithmetic — written with plain additions, multiplications and
//! selects, so the compiler runs it 8 lanes at a time.
//! The crate is built for baseline x86-64; the AVX2 build of the same loop is chosen at run
//! time ([`exp_shifted`]); [`exp1`] itself is inlined into other loops built the same way
//! (LCA's word rows in `selfalign_host`).
//!
//! Invariants:
//! * the same bits on every CPU and every lane width: each lane computes the same rounded
//!   operations in the same order (Rust never fuses a multiply and an add on its own, and no
//!   FMA is enabled), so the AVX2 build and the plain one agree bit for bit (tested);
//! * within 2 ulp of the correctly rounded e^x for normal results (tested against f64 `exp`
//!   over the whole range), subnormal results from the same formula, 0 below −103.97, +∞
//!   above 88.72, NaN for NaN.

/// 1/ln 2.
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts: the first with few significant bits (n·HI is exact for |n| ≤ 2^9).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2^23: adding it rounds a float below 2^22 in magnitude to an integer in its low bits.
const ROUND: f32 = 12_582_912.0;
/// Largest x with e^x finite in f32, and smallest with e^x above 0 (the least subnormal).
const HIGHEST: f32 = 88.722_83;
const LOWEST: f32 = -103.972_08;

/// e^x, the formula every lane runs (inlined wherever it is called, so a caller built for
/// AVX2 runs it 8 lanes at a time).
#[inline(always)]
pub(crate) fn exp1(x: f32) -> f32 {
    let c = x.clamp(LOWEST, HIGHEST);
    let t = c * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer, read from t's low bits (t = 1.5·2^23 + n).
    let k = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (c - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    // 2^k as two normal powers (k ∈ [−150, 128]): y·2^(k/2) is exact, the second product
    // rounds only into the subnormals.
    let half = k >> 1;
    let pow = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let out = y * pow(half) * pow(k - half);
    if x > HIGHEST {
        f32::INFINITY
    } else if x < LOWEST {
        0.0
    } else {
        out
    }
}

#[inline(always)]
fn exp_shifted_plain(xs: &mut [f32], shift: f32, scale: f32) {
    for x in xs {
        *x = exp1((*x - shift) * scale);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn exp_shifted_avx2(xs: &mut [f32], shift: f32, scale: f32) {
    exp_shifted_plain(xs, shift, scale)
}

/// Each x replaced by e^((x − shift)·scale) (the difference and the product rounded to f32
/// first), 8 lanes at a time where the CPU has AVX2.
pub(crate) fn exp_shifted(xs: &mut [f32], shift: f32, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { exp_shifted_avx2(xs, shift, scale) };
        return;
    }
    exp_shifted_plain(xs, shift, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite non-negative f32.
    fn ulps(a: f32, b: f32) -> u32 {
        a.to_bits().abs_diff(b.to_bits())
    }

    #[test]
    fn within_two_ulp_of_the_exponential_over_its_range() {
        let mut worst = (0, 0.0f32);
        // Two million points evenly over the range, and both signs of 10^(−k/100) down to 1e-40.
        let n = 2_000_000;
        let mut xs: Vec<f32> = (0..=n)
            .map(|i| LOWEST + (HIGHEST - LOWEST) * (i as f32 / n as f32))
            .collect();
        for k in 0..4000 {
            let x = 10f64.powf(-k as f64 / 100.0) as f32;
            xs.extend([x, -x]);
        }
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 0.5, -0.5]);
        let mut got = xs.clone();
        exp_shifted(&mut got, 0.0, 1.0);
        for (&x, &y) in xs.iter().zip(&got) {
            let truth = (x as f64).exp() as f32;
            if truth >= f32::MIN_POSITIVE {
                let d = ulps(y, truth);
                if d > worst.0 {
                    worst = (d, x);
                }
            } else {
                // Subnormal results: within 2 of the least subnormal.
                assert!(
                    (y as f64 - (x as f64).exp()).abs() <= 2.0 * 1.4e-45,
                    "{x}: {y}"
                );
            }
        }
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn edges_and_the_shift() {
        let mut xs = vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            89.0,
            -104.0,
            -1e30,
            HIGHEST,
        ];
        exp_shifted(&mut xs, 0.0, 1.0);
        assert!(xs[0].is_nan());
        assert_eq!(&xs[1..6], &[f32::INFINITY, 0.0, f32::INFINITY, 0.0, 0.0]);
        assert!(xs[6].is_finite() && xs[6] > 3.4e38);
        let mut ys = vec![0.3f32, 0.25, -0.7];
        exp_shifted(&mut ys, 0.3, 20.0);
        for (y, x) in ys.iter().zip([0.3f32, 0.25, -0.7]) {
            let truth = (((x - 0.3) * 20.0) as f64).exp() as f32;
            assert!(ulps(*y, truth) <= 2, "{y} vs {truth}");
        }
    }

    /// The AVX2 build and the plain one give the same bits, on lengths that leave tails (on a
    /// CPU without AVX2 there is only the plain build, and the test says so).
    #[test]
    fn every_lane_width_gives_the_same_bits() {
        #[cfg(target_arch = "x86_64")]
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("no AVX2 on this CPU: only the plain build runs here");
        }
        let xs: Vec<f32> = (0..40_003)
            .map(|i| ((i * 7919) % 20_011) as f32 / 100.0 - 110.0)
            .collect();
        let mut plain = xs.clone();
        exp_shifted_plain(&mut plain, 0.5, 1.25);
        let mut dispatched = xs;
        exp_shifted(&mut dispatched, 0.5, 1.25);
        assert!(
            plain
                .iter()
                .zip(&dispatched)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }
}
