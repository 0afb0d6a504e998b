//! The three sums the scorer takes over a row of logits (docs/science.md §5): the maximum,
//! Σ exp(z − max) and Σ w·z (KL's dot product with the clean distribution), all in f64.
//!
//! Written plainly, each is a chain of dependent additions (or maxima) over the 49k–262k
//! tokens of a vocabulary, and the exponentials are one libm call per token: scoring was
//! about a tenth of a fast trace on the CPU. Where the CPU has AVX2 and FMA (every x86 CPU
//! this runs on in practice), [`row_sums`] keeps eight partial sums per chain and computes
//! exp in the loop (Cody–Waite reduction by ln 2, a degree-13 Taylor polynomial, and the
//! power of two from the exponent bits), so the compiler vectorises all of it.
//! [`row_sums_plain`] is the reference, and the path on other CPUs: the tests hold the two
//! within the rounding bound of an n-term sum on random rows.

/// What the scorer needs of one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowSums {
    /// max z.
    pub max: f64,
    /// Σ exp(z − max).
    pub sum_exp: f64,
    /// Σ w·z.
    pub dot: f64,
}

/// The sums of `z` (weights `w`, as long), vectorised where the CPU allows.
pub(crate) fn row_sums(z: &[f32], w: &[f64]) -> RowSums {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { row_sums_avx2(z, w) };
    }
    row_sums_plain(z, w)
}

/// The sums by their definitions, in order, with libm's exp.
pub(crate) fn row_sums_plain(z: &[f32], w: &[f64]) -> RowSums {
    let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let sum_exp = z.iter().map(|&v| (f64::from(v) - max).exp()).sum::<f64>();
    let dot = w.iter().zip(z).map(|(p, &v)| p * f64::from(v)).sum();
    RowSums { max, sum_exp, dot }
}

/// Lanes of partial sums: two AVX2 registers of f64, enough to hide the adds' latency.
const LANES: usize = 8;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_sums_avx2(z: &[f32], w: &[f64]) -> RowSums {
    let n = z.len().min(w.len());
    let (z, w) = (&z[..n], &w[..n]);
    let mut maxes = [f64::NEG_INFINITY; LANES];
    let mut dots = [0f64; LANES];
    for (zc, wc) in z.chunks_exact(LANES).zip(w.chunks_exact(LANES)) {
        for i in 0..LANES {
            let v = f64::from(zc[i]);
            // As f64::max in the plain fold, a NaN is passed over here; it makes the row
            // NaN through its exponential below.
            maxes[i] = if v > maxes[i] { v } else { maxes[i] };
            dots[i] = wc[i].mul_add(v, dots[i]);
        }
    }
    let tail = n - n % LANES;
    let mut max = maxes.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    let mut dot: f64 = dots.iter().sum();
    for (&v, &p) in z[tail..].iter().zip(&w[tail..]) {
        max = max.max(f64::from(v));
        dot = p.mul_add(f64::from(v), dot);
    }
    let mut sums = [0f64; LANES];
    for zc in z.chunks_exact(LANES) {
        for i in 0..LANES {
            sums[i] += exp_nonpositive(f64::from(zc[i]) - max);
        }
    }
    let mut sum_exp: f64 = sums.iter().sum();
    for &v in &z[tail..] {
        sum_exp += exp_nonpositive(f64::from(v) - max);
    }
    RowSums { max, sum_exp, dot }
}

/// exp(x) for x ≤ 0 (a logit minus the row's maximum) to about 1 ulp, in straight-line
/// arithmetic the compiler vectorises. Below −708 it returns exp(−708) ≈ 3e−308: such a
/// term is 0 beside the 1 that the maximum's own term adds to the sum.
#[inline(always)]
fn exp_nonpositive(x: f64) -> f64 {
    const LOG2_E: f64 = std::f64::consts::LOG2_E;
    // fdlibm's split of ln 2 (its bit patterns): k·LN2_HI is exact for |k| < 2^11.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    // 1.5·2^52: adding it rounds to an integer, which lands in the low mantissa bits.
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    let x = if x < -708.0 { -708.0 } else { x };
    let kf = x.mul_add(LOG2_E, SHIFT);
    let k = kf - SHIFT;
    let r = k.mul_add(-LN2_LO, k.mul_add(-LN2_HI, x));
    // Taylor to r^13/13! on |r| ≤ ln2/2: the first term left out is below 2e−17 relative.
    let mut p: f64 = 1.0 / 6_227_020_800.0;
    for c in [
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    // 2^k from kf's low bits: (k + 1023) shifted into the exponent field; k is in
    // −1022..=0 here, so the field stays normal and the sign bit 0.
    let scale = f64::from_bits(kf.to_bits().wrapping_add(1023) << 52);
    p * scale
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    #[test]
    fn exp_is_libms_to_two_ulp() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut xs: Vec<f64> = (0..200_000).map(|_| -rng.random::<f64>() * 750.0).collect();
        xs.extend([0.0, -0.0, -1e-300, -0.5 * std::f64::consts::LN_2, -1.0, -700.0, -708.0]);
        for x in xs {
            let (got, want) = (exp_nonpositive(x), x.max(-708.0).exp());
            assert!(close(got, want, 4.5e-16), "exp({x}) = {got}, libm {want}");
        }
    }

    #[test]
    fn vectorised_sums_equal_the_plain_ones() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // Lengths around the lane count and a vocabulary's; logits as wide as real ones.
        for n in [1usize, 7, 8, 9, 31, 4099, 49_152] {
            for scale in [0.1f32, 5.0, 40.0] {
                let z: Vec<f32> =
                    (0..n).map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0)).collect();
                let w: Vec<f64> = (0..n).map(|_| rng.random::<f64>() / n as f64).collect();
                let (fast, plain) = (row_sums(&z, &w), row_sums_plain(&z, &w));
                assert_eq!(fast.max, plain.max);
                // A sum of n terms in order is off by at most (n − 1)·ε of the sum of their
                // magnitudes (the plain one's bound; eight partial sums do better), and
                // each exp by 2 ulp: the two may differ by (n + 2)·ε of it.
                let bound = (n + 2) as f64 * f64::EPSILON;
                assert!(close(fast.sum_exp, plain.sum_exp, bound), "{fast:?} {plain:?}");
                let mag: f64 = w.iter().zip(&z).map(|(p, &v)| (p * f64::from(v)).abs()).sum();
                assert!((fast.dot - plain.dot).abs() <= bound * mag, "{fast:?} {plain:?}");
            }
        }
    }

    #[test]
    fn a_nan_logit_makes_the_row_nan() {
        let mut z = vec![1.0f32; 20];
        z[13] = f32::NAN;
        let w = vec![0.05; 20];
        assert!(row_sums(&z, &w).sum_exp.is_nan());
        assert!(row_sums_plain(&z, &w).sum_exp.is_nan());
    }
}
