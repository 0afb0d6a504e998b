//! Causal attention on the CPU in one parallel pass, its heads written merged.
//!
//! candle computes a batch of attention as two batched matmuls, a mask, a softmax and a copy
//! that merges the heads. In a fast trace the batch is thousands of rows of a few tokens
//! each, so each matmul is thousands of tiny gemm calls made one after another on the calling
//! thread while the other cores wait: about 3% of a fast trace on two cores (Zen 3), with the
//! merge another 0.6%. Here each (row, key/value head) is one task, run in parallel: for each
//! of its queries the scores (dot products over `head_dim`, eight partial sums that the
//! compiler vectorises), the scale, the soft-cap, the causal and sliding-window masks and the
//! softmax as candle computes them (max, exp(s − max) with libm's exp, the sum, a division),
//! then the weighted sum of the values, written straight into the merged `(b, t, heads ·
//! head_dim)` layout.
//!
//! The dot products and the weighted sums round in another order than gemm's, so the result
//! differs from [`attention_merged_reference`] (`nn::causal_attention_capped` and the merge)
//! within their rounding (tested).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::nn::{causal_attention_capped, merge_heads};
use super::ops::for_each_task;
use super::packed::Out;
use crate::error::Result;
use crate::forward::LayerKv;

/// Attention of `q` `(b, n_heads, t_q, head_dim)` at positions `pos0..` over `kv`, as
/// `nn::causal_attention_capped` computes it, with the heads merged: `(b, t_q, n_heads ·
/// head_dim)`.
pub(crate) fn attention_merged(
    q: &Tensor,
    kv: &LayerKv,
    pos0: usize,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if f32_cpu(q) && f32_cpu(&kv.k) && f32_cpu(&kv.v) {
        let op =
            Attention { pos0, scale: scale as f32, window, softcap: softcap.map(|c| c as f32) };
        return Ok(q.contiguous()?.apply_op3_no_bwd(
            &kv.k.contiguous()?,
            &kv.v.contiguous()?,
            &op,
        )?);
    }
    attention_merged_reference(q, kv, pos0, scale, window, softcap)
}

/// The composition: what [`attention_merged`] computes.
pub(crate) fn attention_merged_reference(
    q: &Tensor,
    kv: &LayerKv,
    pos0: usize,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Result<Tensor> {
    merge_heads(&causal_attention_capped(q, kv, pos0, scale, window, softcap)?)
}

struct Attention {
    pos0: usize,
    scale: f32,
    window: Option<usize>,
    softcap: Option<f32>,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention-merged"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (s1, s2, s3) else {
            candle_core::bail!("attention: f32 only")
        };
        let slice = |data: &'_ [f32], l: &Layout| -> candle_core::Result<Vec<usize>> {
            match l.contiguous_offsets() {
                Some((a, b)) if b <= data.len() => Ok(vec![a, b]),
                _ => candle_core::bail!("attention: contiguous operands only"),
            }
        };
        let (qo, ko, vo) = (slice(q, l1)?, slice(k, l2)?, slice(v, l3)?);
        let (q, k, v) = (&q[qo[0]..qo[1]], &k[ko[0]..ko[1]], &v[vo[0]..vo[1]]);
        let (&[b, n_heads, t_q, hd], &[b2, n_kv, t_k, hd2]) = (l1.dims(), l2.dims()) else {
            candle_core::bail!("attention: rank-4 operands only")
        };
        if b2 != b || hd2 != hd || l3.dims() != l2.dims() || n_kv == 0 || n_heads % n_kv != 0 {
            candle_core::bail!(
                "attention: q {:?} against k {:?}, v {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        if t_k != self.pos0 + t_q {
            candle_core::bail!(
                "attention: {t_k} keys for queries at {}..{}",
                self.pos0,
                self.pos0 + t_q
            );
        }
        let mut dst: Vec<f32> = Vec::with_capacity(b * t_q * n_heads * hd);
        let out = Out(dst.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        let dims = Dims { n_heads, n_kv, t_q, t_k, hd };
        for_each_task(b * n_kv, b * n_heads * t_q * t_k * hd, |task| {
            // SAFETY: the task's heads of the output are its own (see `task_avx2`).
            unsafe { self.task(q, k, v, &dims, task / n_kv, task % n_kv, &out) }
        });
        // SAFETY: the tasks cover every (row, head) and write every query's hd floats.
        unsafe { dst.set_len(b * t_q * n_heads * hd) };
        Ok((CpuStorage::F32(dst), Shape::from((b, t_q, n_heads * hd))))
    }
}

/// The operands' sizes.
#[derive(Clone, Copy)]
struct Dims {
    n_heads: usize,
    n_kv: usize,
    t_q: usize,
    t_k: usize,
    hd: usize,
}

impl Attention {
    /// Every query of the heads sharing key/value head `g` in batch row `row`, into the
    /// merged output; under AVX2 and FMA where the CPU has them.
    ///
    /// # Safety
    /// `out` holds b × t_q × n_heads × hd floats, q, k and v the operands' (checked by the
    /// caller), and no other task writes the heads of (row, g).
    #[allow(clippy::too_many_arguments)]
    unsafe fn task(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: &Dims,
        row: usize,
        g: usize,
        out: &Out,
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features; the rest is the caller's contract.
            return unsafe { self.task_avx2(q, k, v, d, row, g, out) };
        }
        // SAFETY: the caller's contract.
        unsafe { self.task_plain(q, k, v, d, row, g, out) }
    }

    /// # Safety
    /// As [`Self::task`], on a CPU with AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn task_avx2(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: &Dims,
        row: usize,
        g: usize,
        out: &Out,
    ) {
        // SAFETY: the caller's contract.
        unsafe { self.task_plain(q, k, v, d, row, g, out) }
    }

    /// The task's arithmetic; inlined into the AVX2 copy so that its fused multiply-adds
    /// are instructions there (elsewhere they are libm's `fmaf`, slower but the same sums).
    ///
    /// # Safety
    /// As [`Self::task`].
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn task_plain(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: &Dims,
        row: usize,
        g: usize,
        out: &Out,
    ) {
        let Dims { n_heads, n_kv, t_q, t_k, hd } = *d;
        let n_rep = n_heads / n_kv;
        let keys = &k[(row * n_kv + g) * t_k * hd..][..t_k * hd];
        let values = &v[(row * n_kv + g) * t_k * hd..][..t_k * hd];
        let mut scores = vec![0f32; t_k];
        let mut acc = vec![0f32; hd];
        for h in g * n_rep..(g + 1) * n_rep {
            for i in 0..t_q {
                let query = &q[((row * n_heads + h) * t_q + i) * hd..][..hd];
                self.weights(query, keys, i, &mut scores);
                acc.fill(0.0);
                for (p, value) in scores.iter().zip(values.chunks_exact(hd)) {
                    for (a, &x) in acc.iter_mut().zip(value) {
                        *a = p.mul_add(x, *a);
                    }
                }
                // SAFETY: (row, i, h) is inside the b × t_q × n_heads output rows of hd
                // floats, and head h of row `row` belongs to this task alone.
                unsafe {
                    let o = out.0.add(((row * t_q + i) * n_heads + h) * hd);
                    std::ptr::copy_nonoverlapping(acc.as_ptr(), o, hd);
                }
            }
        }
    }

    /// The softmax weights of query `i` over the keys, into `scores` (one per key).
    #[inline(always)]
    fn weights(&self, query: &[f32], keys: &[f32], i: usize, scores: &mut [f32]) {
        let hd = query.len();
        let q_pos = self.pos0 + i;
        let mut max = f32::NEG_INFINITY;
        for (j, (s, key)) in scores.iter_mut().zip(keys.chunks_exact(hd)).enumerate() {
            // transformers' sliding window keeps keys with q_pos − j < window.
            let hidden = j > q_pos || self.window.is_some_and(|w| q_pos >= j + w);
            *s = match hidden {
                true => f32::NEG_INFINITY,
                false => {
                    let x = dot(query, key) * self.scale;
                    match self.softcap {
                        Some(cap) => (x / cap).tanh() * cap,
                        None => x,
                    }
                }
            };
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        for s in scores.iter_mut() {
            *s /= sum;
        }
    }
}

/// Σ a·b with eight partial sums, which the compiler vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut sums = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            sums[l] = x[l].mul_add(y[l], sums[l]);
        }
    }
    sums.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn equals_the_composition_within_rounding() -> Result<()> {
        let dev = &Device::Cpu;
        // (b, heads, kv heads, t_q, pos0, head_dim, window, softcap): one query and many,
        // a prefix, grouped queries, a window that bites, Gemma 2's soft-cap, odd head_dim.
        let cases = [
            (3, 4, 4, 1, 0, 16, None, None),
            (2, 9, 3, 5, 0, 64, None, None),
            (4, 9, 3, 3, 6, 64, None, None),
            (2, 6, 2, 4, 5, 24, Some(3), None),
            (2, 4, 1, 6, 2, 13, None, Some(50.0)),
            (1, 2, 2, 1, 7, 8, Some(4), None),
            // Enough work to run in parallel (the cases above run on the calling thread).
            (64, 9, 3, 4, 4, 64, None, None),
        ];
        for (b, heads, kv_heads, t_q, pos0, hd, window, softcap) in cases {
            let q = Tensor::randn(0f32, 1.0, (b, heads, t_q, hd), dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, kv_heads, pos0 + t_q, hd), dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, kv_heads, pos0 + t_q, hd), dev)?;
            let kv = LayerKv { k, v };
            let scale = 1.0 / (hd as f64).sqrt();
            let fast = attention_merged(&q, &kv, pos0, scale, window, softcap)?;
            let plain = attention_merged_reference(&q, &kv, pos0, scale, window, softcap)?;
            assert_eq!(fast.dims(), plain.dims());
            let (fast, plain) =
                (fast.flatten_all()?.to_vec1::<f32>()?, plain.flatten_all()?.to_vec1::<f32>()?);
            // A score is a head_dim-term dot product: the two orders differ by at most
            // 2·γ_hd·Σ|q_i k_i|·scale ≈ 2·64·6e−8·64·0.8/8 ≈ 5e−5 here (γ_n ≈ n·u, u = 2⁻²⁴,
            // |q|, |k| ~ N(0, 1)); softmax turns an error δ in the scores into a relative
            // error of at most 2δ in the weights, and the weighted sum of values |v| ≲ 4
            // adds its own rounding. 4e−4 bounds it.
            for (i, (f, p)) in fast.iter().zip(&plain).enumerate() {
                assert!(
                    (f - p).abs() <= 4e-4,
                    "{b}x{heads}/{kv_heads}x{t_q}@{pos0}, {i}: {f} vs {p}"
                );
            }
        }
        Ok(())
    }
}
