//! Fused element-wise kernels for the hot path, each with the plain candle composition as its
//! reference (used off the CPU and for other dtypes, and by the tests).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// `silu(x[..., :half]) * x[..., half:]` for `x` of shape `(…, 2·half)`: SwiGLU on the output
/// of a fused gate/up projection.
pub(crate) fn silu_mul(x: &Tensor, half: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous() {
        return Ok(x.apply_op1_no_bwd(&SiluMul { half })?);
    }
    silu_mul_reference(x, half)
}

/// The plain composition: what `silu_mul` computes.
pub(crate) fn silu_mul_reference(x: &Tensor, half: usize) -> Result<Tensor> {
    let last = x.rank() - 1;
    let gate = x.narrow(last, 0, half)?;
    let up = x.narrow(last, half, half)?;
    Ok((candle_nn::ops::silu(&gate.contiguous()?)? * up)?)
}

/// RMSNorm over the last axis, `x / sqrt(mean(x²) + eps) · w`, as candle's `rms_norm`
/// computes it. candle's allocates its output zeroed (a memset on the calling thread while
/// the other cores wait) and sums each row's squares in one chain of dependent f32 adds,
/// which does not vectorise: together about 2% of a fast trace on two cores. Here the output
/// is filled in parallel unzeroed, and the sum keeps eight partial sums, which the compiler
/// vectorises; the rest is candle's formula. The sum's rounding differs, so the result
/// differs from [`rms_norm_reference`] within a sum's rounding (tested).
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if f32_cpu(x) && f32_cpu(w) && w.rank() == 1 {
        return Ok(x.contiguous()?.apply_op2_no_bwd(w, &RmsNorm { eps })?);
    }
    rms_norm_reference(x, w, eps)
}

/// candle's RMSNorm: what [`rms_norm`] computes.
pub(crate) fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?)
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (contiguous_f32(s1, l1, "rms-norm")?, contiguous_f32(s2, l2, "rms-norm")?);
        let d = l1.dims().last().copied().unwrap_or(0);
        if d != w.len() {
            candle_core::bail!("rms-norm: rows of {d} against a weight of {}", w.len());
        }
        let eps = self.eps;
        let out = filled(x.len(), d, |r, o| rms_norm_row(&x[r * d..(r + 1) * d], w, eps, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// One row of [`rms_norm`].
fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, o: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { rms_norm_row_avx2(x, w, eps, o) };
    }
    rms_norm_row_plain(x, w, eps, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_norm_row_avx2(x: &[f32], w: &[f32], eps: f32, o: &mut [MaybeUninit<f32>]) {
    rms_norm_row_plain(x, w, eps, o)
}

#[inline(always)]
fn rms_norm_row_plain(x: &[f32], w: &[f32], eps: f32, o: &mut [MaybeUninit<f32>]) {
    const LANES: usize = 8;
    let mut sums = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for i in 0..LANES {
            sums[i] += c[i] * c[i];
        }
    }
    let sum2 = sums.iter().sum::<f32>() + tail;
    // candle's formula from here on: the mean, eps, the root, then x / m · w.
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    for ((o, &v), &a) in o.iter_mut().zip(x).zip(w) {
        o.write(v / m * a);
    }
}

/// `gelu(x[..., :half]) * x[..., half:]` with GELU's tanh approximation (`gelu_pytorch_tanh`):
/// GeGLU, Gemma's gated MLP. The plain candle composition on every device: the MLP's matmuls
/// dominate Gemma's time, not this.
pub(crate) fn gelu_mul(x: &Tensor, half: usize) -> Result<Tensor> {
    let last = x.rank() - 1;
    let gate = x.narrow(last, 0, half)?;
    let up = x.narrow(last, half, half)?;
    Ok((gate.contiguous()?.gelu()? * up)?)
}

/// `xs` `(b, x, y, z)` with axes 1 and 2 swapped, `(b, y, x, z)`, contiguous: merging heads
/// back. candle's strided copy runs on one thread, which made this and [`split_heads`] a
/// few percent of a fast trace on two cores with the other core idle; here the output's rows
/// are filled in parallel.
pub(crate) fn swap_axes_12(xs: &Tensor) -> Result<Tensor> {
    let fits = xs.rank() == 4 && xs.stride().get(3) == Some(&1);
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && fits {
        return Ok(xs.apply_op1_no_bwd(&SwapAxes12 { split: None })?);
    }
    Ok(xs.transpose(1, 2)?.contiguous()?)
}

/// `xs` `(b, t, n_heads · head_dim)` as `(b, n_heads, t, head_dim)`, contiguous. The input
/// may be a view whose last axis is contiguous (a narrow of a fused q/k/v projection): it is
/// read in place, where a reshape would first copy it on one thread.
pub(crate) fn split_heads(xs: &Tensor, n_heads: usize, head_dim: usize) -> Result<Tensor> {
    let fits = xs.rank() == 3 && xs.stride().get(2) == Some(&1);
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && fits && xs.dim(2)? == n_heads * head_dim
    {
        return Ok(xs.apply_op1_no_bwd(&SwapAxes12 { split: Some(n_heads) })?);
    }
    split_heads_reference(xs, n_heads, head_dim)
}

/// The plain composition: what [`split_heads`] computes.
pub(crate) fn split_heads_reference(
    xs: &Tensor,
    n_heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    let (b_sz, seq_len, _) = xs.dims3()?;
    Ok(xs.reshape((b_sz, seq_len, n_heads, head_dim))?.transpose(1, 2)?.contiguous()?)
}

/// Swaps axes 1 and 2 of a rank-4 input, or of a rank-3 input whose last axis is split into
/// `split` heads.
struct SwapAxes12 {
    split: Option<usize>,
}

impl CustomOp1 for SwapAxes12 {
    fn name(&self) -> &'static str {
        "swap-axes-12"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("swap-axes-12: f32 only") };
        // (b, x, y, z) and the input's strides of b, x and y; z's is 1.
        let ((b, x, y, z), (s0, s1, s2)) = match (self.split, layout.dims(), layout.stride()) {
            (None, &[b, x, y, z], &[s0, s1, s2, 1]) => ((b, x, y, z), (s0, s1, s2)),
            (Some(heads), &[b, t, w], &[s0, s1, 1]) if heads > 0 && w % heads == 0 => {
                ((b, t, heads, w / heads), (s0, s1, w / heads))
            }
            _ => candle_core::bail!("swap-axes-12: unexpected layout {layout:?}"),
        };
        let start = layout.start_offset();
        let n = b * x * y * z;
        let reach = (n > 0).then(|| start + (b - 1) * s0 + (x - 1) * s1 + (y - 1) * s2 + z);
        if reach.is_some_and(|r| r > data.len()) {
            candle_core::bail!("swap-axes-12: a layout outside its buffer");
        }
        let out = filled(n, x * z, |ij, block| {
            // Output row (i, j, k) of z values is input row (i, k, j).
            let (i, j) = (ij / y, ij % y);
            for (k, row) in block.chunks_mut(z).enumerate() {
                let from = start + i * s0 + k * s1 + j * s2;
                for (o, &v) in row.iter_mut().zip(&data[from..from + z]) {
                    o.write(v);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, y, x, z))))
    }
}

/// The elements of a custom op's f32 operand whose layout is contiguous, or an error that
/// names the op.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: f32 only") };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous operands only")
    };
    Ok(&data[start..end])
}

/// A vector of `n` elements whose chunks of `chunk` are written in parallel by
/// `fill(chunk index, chunk)`, which must write every element of its chunk. Not zeroed first:
/// with freed activations kept by the allocator, zeroing is a memset of the whole output on
/// the calling thread.
pub(crate) fn filled(
    n: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(n);
    if n == 0 || chunk == 0 {
        return out;
    }
    let out_chunks = &mut out.spare_capacity_mut()[..n];
    if n < SERIAL_BELOW {
        out_chunks.chunks_mut(chunk).enumerate().for_each(|(i, c)| fill(i, c));
    } else {
        out_chunks.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| fill(i, c));
    }
    // SAFETY: every chunk of the first n elements was written by `fill` (its contract; the
    // callers write each element of their chunk exactly once).
    unsafe { out.set_len(n) };
    out
}

/// Below this many elements (or multiply-adds, for the products) an operation runs on the
/// calling thread: waking the pool costs more than it saves, and a tiny model's worker that
/// woke it for every small operation kept both cores of a 2-core machine busy with spinning
/// threads (the chaos test's several workers then ran twice as slow).
pub(crate) const SERIAL_BELOW: usize = 1 << 15;

/// Runs `f` on tasks `0..tasks`, in parallel when the work they share (in elements or
/// multiply-adds) is at least [`SERIAL_BELOW`].
pub(crate) fn for_each_task(tasks: usize, work: usize, f: impl Fn(usize) + Sync + Send) {
    if work < SERIAL_BELOW {
        (0..tasks).for_each(f);
    } else {
        (0..tasks).into_par_iter().for_each(f);
    }
}

struct SiluMul {
    half: usize,
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let half = self.half;
        let data = contiguous_f32(storage, layout, "silu-mul")?;
        let mut dims = layout.shape().dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == 2 * half => *last = half,
            _ => candle_core::bail!("silu-mul: last dimension must be {}", 2 * half),
        }
        // Rows in parallel: candle's own unary ops run on one thread, which made SiLU a tenth of
        // an MLP's time on two cores.
        let out = filled(data.len() / 2, half, |r, o| {
            let (gate, up) = data[2 * half * r..2 * half * (r + 1)].split_at(half);
            silu_mul_row(gate, up, o);
        });
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `o = silu(gate) · up` for one row: candle's and PyTorch's silu, x / (1 + exp(−x)).
///
/// libm's `expf` is one call per element and was 3% of a fast trace on the CPU. Where the CPU
/// has AVX2 and FMA, the row is computed with [`exp_f32`] inline, which the compiler
/// vectorises eight lanes wide, sixteen with AVX-512 (the same operations lane by lane, so
/// the same bits: tested); elsewhere with libm.
pub(crate) fn silu_mul_row(gate: &[f32], up: &[f32], o: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { silu_mul_row_avx512(gate, up, o) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { silu_mul_row_avx2(gate, up, o) };
    }
    for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
        o.write(g / (1.0 + (-g).exp()) * u);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_row_avx2(gate: &[f32], up: &[f32], o: &mut [MaybeUninit<f32>]) {
    for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
        o.write(g / (1.0 + exp_f32(-g)) * u);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_row_avx512(gate: &[f32], up: &[f32], o: &mut [MaybeUninit<f32>]) {
    for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
        o.write(g / (1.0 + exp_f32(-g)) * u);
    }
}

/// [`exp_f32`]'s constants.
pub(crate) mod exp_consts {
    pub(crate) const CLAMP_LO: f32 = -87.3;
    pub(crate) const CLAMP_HI: f32 = 88.0;
    pub(crate) const LOG2_E: f32 = std::f32::consts::LOG2_E;
    /// Cephes' split of ln 2: k·LN2_HI is exact for the k here.
    pub(crate) const LN2_HI: f32 = 0.693_359_4;
    pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
    /// 1.5·2^23: adding it rounds to an integer.
    pub(crate) const SHIFT: f32 = 12_582_912.0;
    /// Cephes' polynomial for exp(r), highest degree first.
    pub(crate) const POLY: [f32; 6] =
        [1.987_569_2e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
}

/// exp(x) in f32 within 2 ulp of libm's `expf` on [−87, 88], in straight-line arithmetic
/// the compiler vectorises: Cody–Waite reduction x = k·ln 2 + r with |r| ≤ ln 2 / 2, Cephes'
/// degree-7 polynomial for exp(r), and 2^k written into the exponent bits. The argument is
/// clamped to [−87.3, 88]: exp(88) ≈ 1.7e38 stands for libm's overflow to infinity, where
/// silu's x / (1 + exp(−x)) is then ≈ x · 6e−39 instead of −0, and exp(−87.3) ≈ 1.2e−38
/// for its underflow, where 1 + exp(−x) is 1 either way. A NaN stays NaN.
/// `packed_kernels.rs` computes the same steps with AVX-512 intrinsics, from these constants.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    use exp_consts::*;
    let x = x.clamp(CLAMP_LO, CLAMP_HI);
    let kf = x.mul_add(LOG2_E, SHIFT);
    let k = kf - SHIFT;
    let r = k.mul_add(-LN2_LO, k.mul_add(-LN2_HI, x));
    let mut p: f32 = POLY[0];
    for c in &POLY[1..] {
        p = p.mul_add(r, *c);
    }
    let p = p.mul_add(r * r, r) + 1.0;
    // 2^k from kf's low bits, (k + 127) shifted into the exponent field (a float-to-int
    // cast would not vectorise: Rust's saturates); k is in −126..=127 here, so the field
    // stays normal and the sign bit 0.
    let scale = f32::from_bits(kf.to_bits().wrapping_add(127) << 23);
    p * scale
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn head_layout_copies_equal_the_reference() -> Result<()> {
        let bits = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        let qkv = Tensor::randn(0f32, 1.0, (3, 5, (4 + 2 + 2) * 7), &Device::Cpu)?;
        // A fused projection's parts are narrowed views; one token; the whole.
        for (xs, heads) in [
            (qkv.narrow(2, 0, 28)?, 4),
            (qkv.narrow(2, 28, 14)?, 2),
            (qkv.narrow(1, 4, 1)?.narrow(2, 42, 14)?, 2),
            (qkv.clone(), 8),
        ] {
            let fast = split_heads(&xs, heads, 7)?;
            let plain = split_heads_reference(&xs, heads, 7)?;
            assert_eq!(fast.dims(), plain.dims());
            assert!(fast.is_contiguous());
            // A copy: equal bit for bit.
            assert_eq!(bits(&fast)?, bits(&plain)?);
            let merged = swap_axes_12(&fast)?;
            assert_eq!(bits(&merged)?, bits(&plain.transpose(1, 2)?.contiguous()?)?);
            assert_eq!(bits(&merged)?, bits(&xs.contiguous()?)?);
        }
        // A strided rank-4 view.
        let view = qkv.reshape((3, 5, 8, 7))?.narrow(2, 1, 3)?;
        assert_eq!(bits(&swap_axes_12(&view)?)?, bits(&view.transpose(1, 2)?.contiguous()?)?);
        Ok(())
    }

    #[test]
    fn rms_norm_equals_candles_within_a_sums_rounding() -> Result<()> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // Row lengths with and without a tail past the eight lanes; scales far apart.
        for d in [1usize, 7, 8, 64, 576, 1003] {
            // 40 × 3 rows: serial for short rows, in parallel from d = 576 on.
            let n = 40 * 3 * d;
            let xs: Vec<f32> = (0..n)
                .map(|i| (rng.random::<f32>() - 0.5) * 10f32.powi((i % 7) as i32 - 3))
                .collect();
            let ws: Vec<f32> = (0..d).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect();
            let x = Tensor::from_vec(xs, (40, 3, d), &Device::Cpu)?;
            let w = Tensor::from_vec(ws, d, &Device::Cpu)?;
            // A view whose rows are not contiguous is copied first.
            let x_t = x.transpose(0, 1)?;
            for x in [&x, &x_t] {
                let fast = rms_norm(x, &w, 1e-5)?;
                assert_eq!(fast.dims(), x.dims());
                let fast = fast.flatten_all()?.to_vec1::<f32>()?;
                let plain = rms_norm_reference(x, &w, 1e-5)?.flatten_all()?.to_vec1::<f32>()?;
                // A d-term sum of squares is within γ_d ≈ d·u of its value in either order
                // (u = 2⁻²⁴), the root halves that, and the mean, root, divide and multiply
                // round to half an ulp each: (d/2 + 4)·u relative bounds each result's error
                // from the exact one, and twice that the distance between the two.
                let u = f32::EPSILON / 2.0;
                let bound = 2.0 * (d as f32 / 2.0 + 4.0) * u;
                for (i, (f, p)) in fast.iter().zip(&plain).enumerate() {
                    assert!((f - p).abs() <= bound * p.abs(), "d = {d}, {i}: {f} vs {p}");
                }
            }
        }
        // A weight of the wrong length is an error.
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
        assert!(rms_norm(&x, &Tensor::zeros(3, DType::F32, &Device::Cpu)?, 1e-5).is_err());
        Ok(())
    }

    #[test]
    fn exp_is_libms_to_two_ulp() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut xs: Vec<f32> = (0..200_000).map(|_| rng.random::<f32>() * 175.0 - 87.0).collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 0.5 * std::f32::consts::LN_2, 1.0, -1.0, 88.0]);
        for x in xs {
            let (got, want) = (exp_f32(x), x.exp());
            assert!(
                (got - want).abs() <= 2.0 * f32::EPSILON * want,
                "exp({x}) = {got}, libm {want}"
            );
        }
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn fused_equals_reference() -> Result<()> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        // Gates across silu's whole range, both tails and exp's clamps included.
        let mut gates: Vec<f32> =
            (0..5 * 7 * 37).map(|_| rng.random::<f32>() * 40.0 - 20.0).collect();
        gates[..8].copy_from_slice(&[0.0, -0.0, 87.5, 100.0, -87.5, -88.5, -100.0, 1e-20]);
        let ups: Vec<f32> = (0..gates.len()).map(|_| rng.random::<f32>() * 6.0 - 3.0).collect();
        let (gate, up) = (
            Tensor::from_vec(gates, (5, 7, 37), &Device::Cpu)?,
            Tensor::from_vec(ups, (5, 7, 37), &Device::Cpu)?,
        );
        let x = Tensor::cat(&[&gate, &up], 2)?;
        let fused = silu_mul(&x, 37)?.flatten_all()?.to_vec1::<f32>()?;
        let plain = silu_mul_reference(&x, 37)?.flatten_all()?.to_vec1::<f32>()?;
        // exp within 2 ulp; its relative error reaches silu damped by exp(−x) / (1 + exp(−x))
        // < 1, and the add, divide and multiply round each result to half an ulp: 4 ulp of
        // the result bound both. Where libm's exp overflows (x < −88.7) silu is −0 there and
        // ±6e−39·|x·up| here: an absolute 1e−35 covers it.
        for (i, (f, p)) in fused.iter().zip(&plain).enumerate() {
            assert!((f - p).abs() <= 4.0 * f32::EPSILON * p.abs() + 1e-35, "{i}: {f} vs {p}");
        }
        // Eight lanes and sixteen compute the same operations on each element: the same bits
        // (rows with tails past both widths).
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
        {
            let values = |t: Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
            let (gate, up) = (values(gate)?, values(up)?);
            let run = |f: unsafe fn(&[f32], &[f32], &mut [MaybeUninit<f32>])| {
                let mut o = vec![MaybeUninit::new(f32::NAN); gate.len()];
                // SAFETY: the CPU has both functions' features (checked above).
                unsafe { f(&gate, &up, &mut o) };
                // SAFETY: every element was initialised (to NaN) before the call.
                o.iter().map(|v| unsafe { v.assume_init() }.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(run(silu_mul_row_avx512), run(silu_mul_row_avx2));
        }
        Ok(())
    }
}
