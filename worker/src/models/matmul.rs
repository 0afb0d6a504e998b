//! `x W` on the CPU in f32 with the same gemm call candle makes, into an output that is not
//! zeroed first.
//!
//! candle's CPU matmul allocates its output with `vec![0; m·n]`. With freed activations
//! kept by the allocator (`cpu::keep_freed_memory`), that is a memset of every projection's
//! output (tens of MB per batched layer call) on the calling thread while the other cores
//! wait: the largest serial piece left in a fast trace on two cores. gemm overwrites the
//! whole output when it does not read it (`read_dst = false`), so the zeroing is wasted.
//! The call is otherwise candle's own (same strides, same parallelism), so the products are
//! equal bit for bit; [`matmul_reference`] is candle's matmul, and a test holds them equal.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::error::Result;

/// `xs (m, k) · w (k, n)` for 2-d f32 CPU tensors; candle's matmul otherwise.
pub(crate) fn matmul(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    let fits = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 2;
    if fits(xs) && fits(w) {
        return Ok(xs.apply_op2_no_bwd(w, &Gemm)?);
    }
    matmul_reference(xs, w)
}

/// candle's matmul: what [`matmul`] computes.
pub(crate) fn matmul_reference(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(xs.matmul(w)?)
}

struct Gemm;

impl CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        "gemm-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(lhs), CpuStorage::F32(rhs)) = (s1, s2) else {
            candle_core::bail!("gemm-f32: f32 operands only")
        };
        let (&[m, k], &[k2, n]) = (l1.dims(), l2.dims()) else {
            candle_core::bail!("gemm-f32: 2-d operands only")
        };
        if k != k2 {
            candle_core::bail!("gemm-f32: ({m}, {k}) x ({k2}, {n})");
        }
        let (&[lhs_rs, lhs_cs], &[rhs_rs, rhs_cs]) = (l1.stride(), l2.stride()) else {
            candle_core::bail!("gemm-f32: 2-d strides only")
        };
        let lhs = &lhs[l1.start_offset()..];
        let rhs = &rhs[l2.start_offset()..];
        // The last elements the strides reach must be inside the buffers.
        let reach = |rows: usize, cols: usize, rs: usize, cs: usize| {
            if rows > 0 && cols > 0 { (rows - 1) * rs + (cols - 1) * cs + 1 } else { 0 }
        };
        if reach(m, k, lhs_rs, lhs_cs) > lhs.len() || reach(k, n, rhs_rs, rhs_cs) > rhs.len() {
            candle_core::bail!("gemm-f32: a layout outside its buffer");
        }
        if m == 0 || n == 0 || k == 0 {
            // gemm would leave the output unwritten when k = 0: the sum of nothing is 0.
            return Ok((CpuStorage::F32(vec![0f32; m * n]), Shape::from((m, n))));
        }
        let mut dst: Vec<f32> = Vec::with_capacity(m * n);
        let out: &mut [MaybeUninit<f32>] = &mut dst.spare_capacity_mut()[..m * n];
        let threads = candle_core::utils::get_num_threads();
        let parallelism = match threads {
            0 | 1 => gemm::Parallelism::None,
            n => gemm::Parallelism::Rayon(n),
        };
        // SAFETY: the operands' strides stay inside their buffers (checked above); `out` holds
        // m·n elements written row-major (column stride 1, row stride n); with
        // `read_dst = false` gemm writes every element of it and reads none, so all m·n are
        // initialised when it returns. The arguments are those of candle's CPU matmul.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr().cast::<f32>(),
                1,
                n as isize,
                false,
                lhs.as_ptr(),
                lhs_cs as isize,
                lhs_rs as isize,
                rhs.as_ptr(),
                rhs_cs as isize,
                rhs_rs as isize,
                0f32,
                1f32,
                false,
                false,
                false,
                parallelism,
            );
            dst.set_len(m * n);
        }
        Ok((CpuStorage::F32(dst), Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn equals_candles_matmul_bit_for_bit() -> Result<()> {
        let dev = &Device::Cpu;
        let bits = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        // A Hugging Face weight (out, in) used as its transposed view, as `Linear` keeps it;
        // a row-major weight; a narrowed input; shapes around gemm's blocking.
        for (m, k, n) in [(1, 7, 5), (37, 64, 96), (300, 576, 192), (129, 33, 1)] {
            let x = Tensor::randn(0f32, 1.0, (m + 2, k), dev)?.narrow(0, 1, m)?;
            let w_out_in = Tensor::randn(0f32, 1.0, (n, k), dev)?;
            for w in [w_out_in.t()?, w_out_in.t()?.contiguous()?] {
                let fast = matmul(&x, &w)?;
                assert_eq!(fast.dims(), &[m, n]);
                assert_eq!(bits(&fast)?, bits(&matmul_reference(&x, &w)?)?);
            }
        }
        // Mismatched inner dimensions are an error, not a read past the buffer.
        let (a, b) =
            (Tensor::zeros((2, 3), DType::F32, dev)?, Tensor::zeros((4, 2), DType::F32, dev)?);
        assert!(matmul(&a, &b).is_err());
        Ok(())
    }
}
