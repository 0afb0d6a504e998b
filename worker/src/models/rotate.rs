//! Rotary position embeddings (the half-split form of Llama, Gemma and GPT-NeoX) applied on
//! the CPU in parallel chunks with vectorised rows.
//!
//! candle_nn's `rope` computes each element with scalar f32 multiplies, and with one token
//! per call, as a fast trace's batches have, runs on the calling thread over a zeroed output
//! while the other cores wait: ~1.8% of fact 6's samples on a 2-core Xeon. Here the same
//! expressions, `x1·cos − x2·sin` and `x1·sin + x2·cos`, are evaluated per element in the same
//! order (Rust never fuses a multiply and an add on its own), so the result is candle's bit
//! for bit (tested); only the lanes and the threads differ.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::ops::{contiguous_f32, filled};
use crate::error::Result;

/// Elements per parallel chunk, at least: whole heads are grouped up to this size.
const CHUNK: usize = 1 << 13;

/// Rotates `x` `(b, heads, t, d)` by `cos` and `sin` `(t, d / 2)`: feature `i < d / 2` pairs
/// with `i + d / 2`.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if cpu_f32(x) && cpu_f32(cos) && cpu_f32(sin) && x.rank() == 4 && cos.rank() == 2 {
        let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
        return Ok(x.contiguous()?.apply_op3_no_bwd(&cos, &sin, &HalfSplit)?);
    }
    rope_reference(x, cos, sin)
}

/// candle_nn's: what [`rope`] computes, and what it runs off the CPU and for other dtypes.
pub(crate) fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?)
}

struct HalfSplit;

impl CustomOp3 for HalfSplit {
    fn name(&self) -> &'static str {
        "rope-half-split"
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
        let x = contiguous_f32(s1, l1, "rope")?;
        let (cos, sin) = (contiguous_f32(s2, l2, "rope")?, contiguous_f32(s3, l3, "rope")?);
        let (_, _, t, d) = l1.shape().dims4()?;
        if d % 2 != 0 || l2.dims() != [t, d / 2] || l3.dims() != [t, d / 2] {
            candle_core::bail!("rope: x {:?}, cos {:?}, sin {:?}", l1.dims(), l2.dims(), l3.dims());
        }
        let head = t * d;
        if head == 0 {
            return Ok((CpuStorage::F32(Vec::new()), l1.shape().clone()));
        }
        let chunk = head * CHUNK.div_ceil(head);
        let out = filled(x.len(), chunk, |i, o| rotate_heads(&x[i * chunk..], cos, sin, d, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Whole heads of `x`, `o.len()` elements of rows of `d` whose positions follow `cos` and
/// `sin` `(t, d / 2)`, restarting at each head. The CPU's features are looked up once here,
/// not per row.
fn rotate_heads(x: &[f32], cos: &[f32], sin: &[f32], d: usize, o: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has the feature the function is compiled for.
        return unsafe { rotate_heads_avx2(x, cos, sin, d, o) };
    }
    rotate_heads_plain(x, cos, sin, d, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rotate_heads_avx2(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    d: usize,
    o: &mut [MaybeUninit<f32>],
) {
    rotate_heads_plain(x, cos, sin, d, o)
}

#[inline(always)]
fn rotate_heads_plain(x: &[f32], cos: &[f32], sin: &[f32], d: usize, o: &mut [MaybeUninit<f32>]) {
    let half = d / 2;
    let positions = cos.len() / half.max(1);
    for (r, (o, x)) in o.chunks_mut(d).zip(x.chunks(d)).enumerate() {
        let p = (r % positions.max(1)) * half;
        let (cos, sin) = (&cos[p..p + half], &sin[p..p + half]);
        let ((x1, x2), (o1, o2)) = (x.split_at(half), o.split_at_mut(half));
        for i in 0..half {
            o1[i].write(x1[i] * cos[i] - x2[i] * sin[i]);
            o2[i].write(x1[i] * sin[i] + x2[i] * cos[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn equals_candles_rope_bit_for_bit() -> Result<()> {
        let dev = &Device::Cpu;
        let bits = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        // One token (a fast trace's batches) and several; heads smaller and larger than a
        // chunk, many of them (past the serial threshold); a strided input.
        for (b, h, t, d) in
            [(1, 1, 1, 2), (3, 4, 1, 64), (2, 3, 7, 6), (700, 9, 1, 64), (2, 2, 300, 32)]
        {
            let x = Tensor::randn(0f32, 3.0, (b, h, t, d), dev)?;
            let angles = Tensor::randn(0f32, 2.0, (t, d / 2), dev)?;
            let (cos, sin) = (angles.cos()?, angles.sin()?);
            let fast = rope(&x, &cos, &sin)?;
            assert_eq!(fast.dims(), x.dims());
            assert_eq!(bits(&fast)?, bits(&rope_reference(&x, &cos, &sin)?)?, "{b}x{h}x{t}x{d}");
            // A strided view `(b, t, h, d)`: h positions of t heads.
            let view = x.transpose(1, 2)?;
            let angles = Tensor::randn(0f32, 2.0, (h, d / 2), dev)?;
            let (cos, sin) = (angles.cos()?, angles.sin()?);
            let fast = rope(&view, &cos, &sin)?;
            assert_eq!(bits(&fast)?, bits(&rope_reference(&view, &cos, &sin)?)?);
        }
        // Tables that do not match the input are an error.
        let x = Tensor::zeros((1, 1, 3, 4), DType::F32, dev)?;
        let short = Tensor::zeros((2, 2), DType::F32, dev)?;
        assert!(rope(&x, &short, &short).is_err());
        Ok(())
    }
}
