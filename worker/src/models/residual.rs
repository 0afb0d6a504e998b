//! The residual stream's adds, on rayon's threads.
//!
//! candle's binary ops on the CPU run on candle's own small thread pool (a barrier pool whose
//! threads spin while they wait), not on rayon's: on two cores a block's two residual adds
//! ran on the calling thread and candle's while rayon's two slept, which with the spinning
//! came to ~2% of a fast trace's samples (2-core Xeon, `perf`). Here the sum is filled in
//! parallel chunks by rayon's threads. Adding two f32 is one rounded operation whatever
//! the order of the elements, so the result equals candle's bit for bit (tested).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::ops::{contiguous_f32, filled};
use crate::error::Result;

/// Elements per parallel chunk: 64 KiB of each operand.
const CHUNK: usize = 1 << 14;

/// `a + b` for tensors of one shape.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if cpu_f32(a) && cpu_f32(b) && a.dims() == b.dims() {
        return Ok(a.apply_op2_no_bwd(b, &Add)?);
    }
    add_reference(a, b)
}

/// candle's add: what [`add`] computes, and what it runs off the CPU, for other dtypes and
/// for strided views. Shapes that differ are an error, as with candle's.
pub(crate) fn add_reference(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.add(b)?)
}

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "residual-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(s1, l1, "residual-add")?;
        let b = contiguous_f32(s2, l2, "residual-add")?;
        if l1.dims() != l2.dims() || a.len() != b.len() {
            candle_core::bail!("residual-add: {:?} + {:?}", l1.dims(), l2.dims());
        }
        let sum = filled(a.len(), CHUNK, |i, o| add_chunk(&a[i * CHUNK..], &b[i * CHUNK..], o));
        Ok((CpuStorage::F32(sum), l1.shape().clone()))
    }
}

/// `o = a + b` over `o`'s length: 8 or 16 lanes where the CPU has them (the baseline
/// x86-64 build has 4).
fn add_chunk(a: &[f32], b: &[f32], o: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the feature the function is compiled for.
        return unsafe { add_chunk_avx512(a, b, o) };
    } else if std::is_x86_feature_detected!("avx2") {
        // SAFETY: as above.
        return unsafe { add_chunk_avx2(a, b, o) };
    }
    add_chunk_plain(a, b, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_chunk_avx512(a: &[f32], b: &[f32], o: &mut [MaybeUninit<f32>]) {
    add_chunk_plain(a, b, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_chunk_avx2(a: &[f32], b: &[f32], o: &mut [MaybeUninit<f32>]) {
    add_chunk_plain(a, b, o)
}

#[inline(always)]
fn add_chunk_plain(a: &[f32], b: &[f32], o: &mut [MaybeUninit<f32>]) {
    for ((o, x), y) in o.iter_mut().zip(a).zip(b) {
        o.write(x + y);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;

    #[test]
    fn equals_candles_add_bit_for_bit() -> Result<()> {
        let dev = &Device::Cpu;
        let bits = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        // One chunk, several with a short last one (past the serial threshold), a narrowed
        // operand (contiguous, offset into its buffer), a strided view.
        let big = Tensor::randn(0f32, 1.0, (3, 7, 2 * CHUNK + 5), dev)?;
        let cases = [
            (Tensor::randn(0f32, 1.0, (2, 3, 5), dev)?, Tensor::randn(0f32, 1.0, (2, 3, 5), dev)?),
            (big.clone(), (big.clone() * -0.75)?),
            (big.i(1..3)?, big.i(0..2)?),
            (big.i(1)?.t()?, big.i(2)?.t()?),
        ];
        for (a, b) in cases {
            let fast = add(&a, &b)?;
            let plain = add_reference(&a, &b)?;
            assert_eq!(fast.dims(), plain.dims());
            assert_eq!(bits(&fast)?, bits(&plain)?, "{:?} + {:?}", a.dims(), b.dims());
        }
        // Shapes that differ are an error; f64 goes to candle.
        let row = Tensor::randn(0f32, 1.0, (1, 2 * CHUNK + 5), dev)?;
        assert!(add(&big.i(0)?, &row).is_err());
        let d = Tensor::ones((2, 2), DType::F64, dev)?;
        assert_eq!(add(&d, &d)?.to_vec2::<f64>()?, vec![vec![2.0; 2]; 2]);
        Ok(())
    }
}
