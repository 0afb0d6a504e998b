//! `x W` on the CPU in f32 with the same gemm call candle makes, into an output that is not
//! zeroed first.
//!
//! candle's CPU matmul allocates its output with `vec![0; m·n]`. With freed activations
//! kept by the allocator (`cpu::keep_freed_memory`), that is a memset of every projection's
//! output (tens of MB per batched layer call) on the calling thread while the other cores
//! wait: the largest serial piece left in a fast trace on two cores. gemm overwrites the
//! whole output when it does not read it (`read_dst = false`), so the zeroing is wasted.
//!
//! Tall products are split by rows: blocks of a few hundred rows, each one single-threaded
//! gemm call, run in parallel. gemm's own threading splits one call's blocks between threads
//! and synchronises them at every block; on a 2-core AMD EPYC (Zen 3, AVX2) the row blocks
//! ran the fast path's projections (1000–8000 rows, k = 576 or 1536) at 105–115 GFLOP/s
//! against 90–105 for one threaded call, on a par with PyTorch's MKL (docs/performance.md).
//! A row of the product depends only on its row of `x` and on `k` (gemm's blocking of the
//! sum depends on k, not on m), so the split changes no bit. The call is otherwise candle's
//! own (same strides, same kernels), so the products are equal bit for bit;
//! [`matmul_reference`] is candle's matmul, and a test holds them equal.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// `xs (m, k) · w (k, n)` for 2-d f32 CPU tensors; candle's matmul otherwise.
pub fn matmul(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    let fits = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 2;
    if fits(xs) && fits(w) {
        let threads = candle_core::utils::get_num_threads();
        return Ok(xs.apply_op2_no_bwd(w, &Gemm { threads })?);
    }
    matmul_reference(xs, w)
}

/// candle's matmul: what [`matmul`] computes.
pub fn matmul_reference(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(xs.matmul(w)?)
}

/// The product on `threads` threads.
struct Gemm {
    threads: usize,
}

/// Rows per single-threaded gemm call when a product of `m` rows is split by rows, or `None`
/// for one call threaded by gemm. Below 256 rows a thread, a block's packing and the calls'
/// imbalance cost more than gemm's synchronisation; above, blocks of at most ~512 rows keep
/// a block's output and packed rows in a core's L2 cache, and their number is a multiple of
/// the threads so that none waits on a last odd block. Rows come in multiples of 16, gemm's
/// AVX2 row tile.
fn row_block(m: usize, threads: usize) -> Option<usize> {
    const MIN_ROWS_PER_THREAD: usize = 256;
    const MAX_BLOCK: usize = 512;
    if threads < 2 || m < MIN_ROWS_PER_THREAD * threads {
        return None;
    }
    let blocks = m.div_ceil(MAX_BLOCK).next_multiple_of(threads);
    Some(m.div_ceil(blocks).next_multiple_of(16))
}

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
        // One gemm call for rows `r0..r0 + rows` into their output `out` (rows × n).
        // SAFETY (of the calls below): the operands' strides stay inside their buffers
        // (checked above for all m rows, so for any of them); `out` holds rows·n elements
        // written row-major (column stride 1, row stride n); with `read_dst = false` gemm
        // writes every element of it and reads none. The arguments are those of candle's
        // CPU matmul, offset to the block's first row.
        let call = |r0: usize, out: &mut [MaybeUninit<f32>], parallelism| unsafe {
            let rows = out.len() / n;
            gemm::gemm(
                rows,
                n,
                k,
                out.as_mut_ptr().cast::<f32>(),
                1,
                n as isize,
                false,
                lhs.as_ptr().add(r0 * lhs_rs),
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
        };
        match (row_block(m, self.threads), self.threads) {
            (Some(rows), _) => out.par_chunks_mut(rows * n).enumerate().for_each(|(i, block)| {
                call(i * rows, block, gemm::Parallelism::None);
            }),
            (None, 0 | 1) => call(0, out, gemm::Parallelism::None),
            (None, threads) => call(0, out, gemm::Parallelism::Rayon(threads)),
        }
        // SAFETY: every block of the m·n elements was written by its gemm call (above).
        unsafe { dst.set_len(m * n) };
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
        // Tall ones are split by rows (into blocks of unequal size when m is not a multiple),
        // on 2 and 3 threads whatever this machine has; short ones make one call.
        for (m, k, n) in
            [(1, 7, 5), (37, 64, 96), (300, 576, 192), (129, 33, 1), (1100, 576, 40), (1543, 96, 7)]
        {
            let x = Tensor::randn(0f32, 1.0, (m + 2, k), dev)?.narrow(0, 1, m)?;
            let w_out_in = Tensor::randn(0f32, 1.0, (n, k), dev)?;
            for w in [w_out_in.t()?, w_out_in.t()?.contiguous()?] {
                let reference = bits(&matmul_reference(&x, &w)?)?;
                let fast = matmul(&x, &w)?;
                assert_eq!(fast.dims(), &[m, n]);
                assert_eq!(bits(&fast)?, reference);
                for threads in [1, 2, 3] {
                    let split = x.apply_op2_no_bwd(&w, &Gemm { threads })?;
                    assert_eq!(bits(&split)?, reference, "{m}x{k}x{n} on {threads} threads");
                }
            }
        }
        // Mismatched inner dimensions are an error, not a read past the buffer.
        let (a, b) =
            (Tensor::zeros((2, 3), DType::F32, dev)?, Tensor::zeros((4, 2), DType::F32, dev)?);
        assert!(matmul(&a, &b).is_err());
        Ok(())
    }

    #[test]
    fn row_blocks_cover_the_rows_in_balanced_multiples_of_the_tile() {
        assert_eq!(row_block(5000, 1), None);
        assert_eq!(row_block(511, 2), None);
        for threads in [2usize, 3, 4, 16] {
            for m in (256 * threads..20_000).step_by(97) {
                let rows = row_block(m, threads).expect("tall enough to split");
                let blocks = m.div_ceil(rows);
                assert_eq!(rows % 16, 0);
                assert!(rows <= 512 + 15, "{m} rows on {threads}: blocks of {rows}");
                // Every thread gets a block; the last may be short.
                assert!(blocks >= threads, "{m} rows on {threads}: {blocks} blocks");
            }
        }
    }
}
