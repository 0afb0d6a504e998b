//! Fused element-wise kernels for the hot path, each with the plain candle composition as its
//! reference (used off the CPU and for other dtypes, and by the tests).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
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

/// A vector of `n` elements whose chunks of `chunk` are written in parallel by
/// `fill(chunk index, chunk)`, which must write every element of its chunk. Not zeroed first:
/// with freed activations kept by the allocator, zeroing is a memset of the whole output on
/// the calling thread.
fn filled(
    n: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(n);
    if n == 0 || chunk == 0 {
        return out;
    }
    out.spare_capacity_mut()[..n].par_chunks_mut(chunk).enumerate().for_each(|(i, c)| fill(i, c));
    // SAFETY: every chunk of the first n elements was written by `fill` (its contract; the
    // callers write each element of their chunk exactly once).
    unsafe { out.set_len(n) };
    out
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
        let CpuStorage::F32(data) = storage else { candle_core::bail!("silu-mul: f32 only") };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("silu-mul: contiguous input only")
        };
        let data = &data[start..end];
        let mut dims = layout.shape().dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == 2 * half => *last = half,
            _ => candle_core::bail!("silu-mul: last dimension must be {}", 2 * half),
        }
        // Rows in parallel: candle's own unary ops run on one thread, which made SiLU a tenth of
        // an MLP's time on two cores.
        let out = filled(data.len() / 2, half, |r, o| {
            let (gate, up) = data[2 * half * r..2 * half * (r + 1)].split_at(half);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                // candle's and PyTorch's silu: x / (1 + exp(-x)), x · sigmoid(x).
                o.write(g / (1.0 + (-g).exp()) * u);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

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
    fn fused_equals_reference() -> Result<()> {
        let x = Tensor::randn(0f32, 3.0, (3, 5, 2 * 37), &Device::Cpu)?;
        let fused = silu_mul(&x, 37)?;
        let plain = silu_mul_reference(&x, 37)?;
        assert_eq!(fused.dims(), &[3, 5, 37]);
        let diff = (fused - plain)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        // Same formula, same f32 operations: equal up to exp's last bit.
        assert!(diff <= 1e-6, "{diff}");
        Ok(())
    }
}
