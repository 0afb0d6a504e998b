//! Rotary position embeddings (Su et al., "RoFormer", 2021), computed the way Hugging Face
//! transformers computes them (`modeling_rope_utils.py`): inverse frequencies in f32,
//! `cos`/`sin` tables in f32, applied by rotating halves (`rotate_half`), not interleaved pairs.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// How the inverse frequencies are scaled for long contexts (`rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (inverse frequencies divided by `factor`).
    Linear {
        /// The divisor.
        factor: f32,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f32,
        /// Wavelengths above `original / low_freq_factor` are divided by `factor`.
        low_freq_factor: f32,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// The pre-training context length.
        original_max_position_embeddings: f32,
    },
    /// Per-frequency divisors given as a tensor (GGUF's `rope_freqs.weight`, how llama.cpp
    /// stores Llama 3.1's scaling).
    Factors(Vec<f32>),
}

/// Precomputed `cos` and `sin` tables, `(max_positions, head_dim / 2)`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// The inverse frequencies, as `_compute_default_rope_parameters` and its scaled variants
/// compute them (f32 throughout, like transformers).
pub fn inv_freq(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Result<Vec<f32>> {
    let half = head_dim / 2;
    let base: Vec<f32> =
        (0..half).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
    Ok(match scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Factors(factors) => {
            if factors.len() != half {
                return Err(Error::Request(format!(
                    "rope frequency factors have {} entries, expected {half}",
                    factors.len()
                )));
            }
            base.iter().zip(factors).map(|(f, d)| f / d).collect()
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let low_wavelen = original_max_position_embeddings / low_freq_factor;
            let high_wavelen = original_max_position_embeddings / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    // transformers: ~(wavelen < high) * ~(wavelen > low); wavelengths are finite.
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    })
}

impl Rope {
    /// Tables for positions `0..max_positions`.
    pub fn new(
        head_dim: usize,
        theta: f32,
        scaling: &RopeScaling,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv_freq = inv_freq(head_dim, theta, scaling)?;
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in &inv_freq {
                // transformers multiplies the f32 position by the f32 inverse frequency.
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// Rotates `xs` `(b, heads, seq_len, head_dim)` whose first token is at `pos0`.
    pub fn apply(&self, xs: &Tensor, pos0: usize) -> Result<Tensor> {
        let (_, _, seq_len, _) = xs.dims4()?;
        let cos = self.cos.narrow(0, pos0, seq_len)?;
        let sin = self.sin.narrow(0, pos0, seq_len)?;
        Ok(candle_nn::rotary_emb::rope(&xs.contiguous()?, &cos, &sin)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1's factors, head_dim 128, theta 500000: the three regimes of
    /// `_compute_llama3_parameters` (kept, interpolated, divided). Exact values against
    /// transformers are covered by the golden tiny-Llama fixture, which uses this scaling.
    #[test]
    fn llama3_scaling_matches_transformers() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let f = inv_freq(128, 500000.0, &scaling).expect("inv_freq");
        let plain = inv_freq(128, 500000.0, &RopeScaling::Default).expect("inv_freq");
        assert_eq!(f[0], 1.0);
        assert_eq!(f[20], plain[20], "high frequencies are kept");
        assert_eq!(f[63], plain[63] / 8.0, "low frequencies are divided by the factor");
        // Between the two wavelengths the frequency is interpolated, strictly inside.
        let medium = (0..64).find(|&i| f[i] != plain[i] && f[i] != plain[i] / 8.0);
        let i = medium.expect("a medium frequency exists");
        assert!(f[i] < plain[i] && f[i] > plain[i] / 8.0);
    }

    #[test]
    fn rope_at_position_zero_is_identity() -> Result<()> {
        let device = Device::Cpu;
        let rope = Rope::new(8, 10000.0, &RopeScaling::Default, 4, DType::F32, &device)?;
        let xs = Tensor::arange(0f32, 16.0, &device)?.reshape((1, 2, 1, 8))?;
        let ys = rope.apply(&xs, 0)?;
        assert_eq!(ys.flatten_all()?.to_vec1::<f32>()?, xs.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}
