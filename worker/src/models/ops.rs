//! Fused element-wise kernels for the hot path, each with the plain candle composition as its
//! reference (used off the CPU and for other dtypes, and by the tests).

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
        let mut out = vec![0f32; data.len() / 2];
        // Rows in parallel: candle's own unary ops run on one thread, which made SiLU a tenth of
        // an MLP's time on two cores.
        out.par_chunks_mut(half).zip(data.par_chunks(2 * half)).for_each(|(o, row)| {
            let (gate, up) = row.split_at(half);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                // candle's and PyTorch's silu: x / (1 + exp(-x)), x · sigmoid(x).
                *o = g / (1.0 + (-g).exp()) * u;
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
