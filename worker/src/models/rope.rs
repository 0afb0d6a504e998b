//! Rotary position embeddings (Su et al., "RoFormer", 2021), computed the way Hugging Face
//! transformers 5 computes them (`modeling_rope_utils.py`): inverse frequencies in f32, `cos`
//! and `sin` tables in f32 scaled by the attention factor, applied by rotating halves
//! (`rotate_half`) or, for GPT-J, interleaved pairs (`rotate_every_two`), to the first
//! `rotary_dim` features of each head (partial rotary: GPT-J, GPT-NeoX, Phi) while the rest
//! pass through.
//!
//! The scalings are transformers' `ROPE_INIT_FUNCTIONS`: `linear`, `llama3`, `yarn`,
//! `longrope` and `dynamic` (NTK). The last two depend on the sequence length: transformers
//! recomputes them in `dynamic_rope_update` from the largest position of the call. Here a call
//! over positions `pos0..pos0 + seq_len` uses the frequencies of length `pos0 + seq_len`. The
//! engine's passes either cover a whole prompt or resume a prefix whose keys were computed by a
//! pass over the same total length, so prefix and suffix always agree, and the result is
//! transformers' forward over the whole prompt (without its state carried between calls).

use std::sync::{Arc, Mutex};

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
    /// YaRN (Peng et al., 2023; `_compute_yarn_parameters`): high frequencies kept, low ones
    /// divided by `factor`, a linear ramp between, and `cos`/`sin` scaled by the attention
    /// factor.
    Yarn {
        /// Context extension ratio (config's `factor`, else `max / original` positions).
        factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: f64,
        /// Rotations per original context above which a frequency is kept (default 32).
        beta_fast: f64,
        /// Rotations below which a frequency is divided (default 1).
        beta_slow: f64,
        /// Whether the ramp's bounds are rounded outwards to whole dimensions.
        truncate: bool,
        /// The factor on `cos` and `sin`, resolved from `attention_factor`, `mscale` and
        /// `mscale_all_dim` as transformers does.
        attention_factor: f64,
    },
    /// LongRoPE (Phi-3; `_compute_longrope_parameters`): per-frequency divisors, the long set
    /// when a call spans more than the original context.
    LongRope {
        /// Divisors for calls of at most `original_max_position_embeddings` positions.
        short_factor: Vec<f32>,
        /// Divisors for longer calls.
        long_factor: Vec<f32>,
        /// The pre-training context length.
        original_max_position_embeddings: usize,
        /// The factor on `cos` and `sin` (the same for both sets).
        attention_factor: f64,
    },
    /// Dynamic NTK scaling (`_compute_dynamic_ntk_parameters`): plain RoPE up to
    /// `max_position_embeddings`, a larger base for longer calls.
    Dynamic {
        /// The scaling factor.
        factor: f64,
        /// The config's `max_position_embeddings`: the length beyond which the base grows.
        max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// The call length beyond which the frequencies differ from those at initialisation.
    fn recompute_above(&self) -> Option<usize> {
        match self {
            Self::LongRope { original_max_position_embeddings, .. } => {
                Some(*original_max_position_embeddings)
            }
            Self::Dynamic { max_position_embeddings, .. } => Some(*max_position_embeddings),
            _ => None,
        }
    }

    /// The longest sequence a model with this scaling is meant for, given its config's
    /// `max_position_embeddings`. Only dynamic NTK reaches beyond it: its point is to stretch
    /// the trained length `factor` times (transformers sets no limit at all).
    pub fn max_positions(&self, max_position_embeddings: usize) -> usize {
        match self {
            Self::Dynamic { factor, .. } if *factor > 1.0 => {
                ((max_position_embeddings as f64 * factor).floor() as usize)
                    .max(max_position_embeddings)
            }
            _ => max_position_embeddings,
        }
    }
}

pub use super::rope_config::{RopeConfig, RopeFields, rope_from_config, rotary_dim};

/// The inverse frequencies at initialisation (no sequence length), as
/// `_compute_default_rope_parameters` and its scaled variants compute them for a rotated
/// width `dim` (f32 throughout, like transformers).
pub fn inv_freq(dim: usize, theta: f32, scaling: &RopeScaling) -> Result<Vec<f32>> {
    Ok(rope_parameters(dim, theta, scaling, None)?.0)
}

/// The inverse frequencies and the attention factor (on `cos` and `sin`) of a rotated width
/// `dim`, as transformers' `ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=…)` returns them
/// for a forward whose largest position is `seq_len - 1` (`None`: at initialisation). The
/// arithmetic follows transformers' dtypes: f32 tensors, Python floats (f64) for scalars.
pub fn rope_parameters(
    dim: usize,
    theta: f32,
    scaling: &RopeScaling,
    seq_len: Option<usize>,
) -> Result<(Vec<f32>, f64)> {
    if dim == 0 || !dim.is_multiple_of(2) {
        return Err(Error::Request(format!("rotary width {dim} is not a positive even number")));
    }
    let half = dim / 2;
    // `base ** (torch.arange(0, dim, 2).float() / dim)`, in f32.
    let powers = |base: f32| -> Vec<f32> {
        (0..half).map(|i| base.powf((2 * i) as f32 / dim as f32)).collect()
    };
    let plain: Vec<f32> = powers(theta).iter().map(|p| 1.0 / p).collect();
    let check_len = |what: &str, factors: &[f32]| -> Result<()> {
        if factors.len() == half {
            Ok(())
        } else {
            Err(Error::Request(format!(
                "rope {what} have {} entries, expected {half}",
                factors.len()
            )))
        }
    };
    Ok(match scaling {
        RopeScaling::Default => (plain, 1.0),
        RopeScaling::Linear { factor } => (plain.iter().map(|f| f / factor).collect(), 1.0),
        RopeScaling::Factors(factors) => {
            check_len("frequency factors", factors)?;
            (plain.iter().zip(factors).map(|(f, d)| f / d).collect(), 1.0)
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let low_wavelen = original_max_position_embeddings / low_freq_factor;
            let high_wavelen = original_max_position_embeddings / high_freq_factor;
            let freqs = plain
                .iter()
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
                .collect();
            (freqs, 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast,
            beta_slow,
            truncate,
            attention_factor,
        } => {
            let base = f64::from(theta);
            // The ramp's bounds in Python floats: the dimension index at which a frequency
            // makes `rotations` turns over the original context.
            let correction_dim = |rotations: f64| {
                dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * base.ln())
            };
            let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
            if *truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let low = low.max(0.0);
            let mut high = high.min((dim - 1) as f64);
            if low == high {
                high += 0.001; // transformers: "prevent singularity"
            }
            let pos_freqs = powers(theta);
            let factor32 = *factor as f32;
            let freqs = pos_freqs
                .iter()
                .enumerate()
                .map(|(i, &p)| {
                    let extrapolation = 1.0 / p;
                    let interpolation = 1.0 / (factor32 * p);
                    // `(arange(dim // 2) - low) / (high - low)`, clamped to [0, 1], in f32.
                    let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                    let extrapolation_factor = 1.0 - ramp;
                    interpolation * (1.0 - extrapolation_factor)
                        + extrapolation * extrapolation_factor
                })
                .collect();
            (freqs, *attention_factor)
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        } => {
            let long = seq_len.is_some_and(|s| s > *original_max_position_embeddings);
            let (what, factors) =
                if long { ("long factors", long_factor) } else { ("short factors", short_factor) };
            check_len(what, factors)?;
            // `1.0 / (ext_factors * base ** shape)`.
            let freqs = powers(theta).iter().zip(factors).map(|(p, e)| 1.0 / (e * p)).collect();
            (freqs, *attention_factor)
        }
        RopeScaling::Dynamic { factor, max_position_embeddings } => match seq_len {
            // At initialisation the base is `base * 1.0`: plain RoPE.
            Some(len) if len > *max_position_embeddings => {
                if dim <= 2 {
                    return Err(Error::Request(format!(
                        "dynamic RoPE needs a rotary width above 2, not {dim}"
                    )));
                }
                // In the forward pass `seq_len` is a tensor, so transformers computes the new
                // base in f32: `base * ((factor * seq_len / max) - (factor - 1)) ** (dim / (dim - 2))`.
                let stretch = (*factor as f32) * len as f32 / *max_position_embeddings as f32
                    - (factor - 1.0) as f32;
                let exponent = (dim as f64 / (dim - 2) as f64) as f32;
                let new_base = theta * stretch.powf(exponent);
                (powers(new_base).iter().map(|p| 1.0 / p).collect(), 1.0)
            }
            _ => (plain, 1.0),
        },
    })
}

/// `cos` and `sin` tables `(positions, dim / 2)` of `inv_freq`, times the attention factor.
fn tables(
    inv_freq: &[f32],
    attention_factor: f64,
    positions: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    // transformers: `emb.cos() * attention_scaling` on f32 tensors.
    let scale = attention_factor as f32;
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for pos in 0..positions {
        for &f in inv_freq {
            // transformers multiplies the f32 position by the f32 inverse frequency.
            let angle = pos as f32 * f;
            cos.push(angle.cos() * scale);
            sin.push(angle.sin() * scale);
        }
    }
    let cos = Tensor::from_vec(cos, (positions, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (positions, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// `cos` and `sin` tables computed for one call length (LongRoPE's long set, dynamic NTK).
type LengthTables = Option<(usize, Tensor, Tensor)>;

/// RoPE for one rotated width: precomputed `cos` and `sin` tables `(max_positions, dim / 2)`
/// of the initial frequencies, and the frequencies of longer calls where the scaling depends
/// on the length.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// The rotated width of each head.
    dim: usize,
    /// GPT-J's `rotate_every_two` instead of `rotate_half`.
    interleaved: bool,
    theta: f32,
    scaling: RopeScaling,
    /// The tables of the last call longer than [`RopeScaling::recompute_above`], shared by
    /// the layers (and clones) of one model.
    by_length: Arc<Mutex<LengthTables>>,
}

impl Rope {
    /// Tables for positions `0..max_positions` of a rotated width `dim` (the head's width, or
    /// `rotary_dim` for partial rotary: [`Rope::apply`] passes the rest of a head through).
    pub fn new(
        dim: usize,
        theta: f32,
        scaling: &RopeScaling,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (inv_freq, attention_factor) = rope_parameters(dim, theta, scaling, None)?;
        let (cos, sin) = tables(&inv_freq, attention_factor, max_positions, dtype, device)?;
        Ok(Self {
            cos,
            sin,
            dim,
            interleaved: false,
            theta,
            scaling: scaling.clone(),
            by_length: Arc::new(Mutex::new(None)),
        })
    }

    /// Rotates interleaved pairs `(x[2i], x[2i+1])` (GPT-J's `rotate_every_two`) instead of
    /// the halves' pairs `(x[i], x[i + dim/2])`.
    pub fn interleaved(mut self) -> Self {
        self.interleaved = true;
        self
    }

    /// The rotated width of each head.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The tables covering positions `0..len` for a call of total length `len`.
    fn tables_for(&self, len: usize) -> Result<(Tensor, Tensor)> {
        let Some(threshold) = self.scaling.recompute_above().filter(|&t| len > t) else {
            return Ok((self.cos.clone(), self.sin.clone()));
        };
        // A poisoned lock only means another thread panicked while filling it: the value is
        // either the old tables or the new ones, both valid for their length.
        let mut cached = self.by_length.lock().unwrap_or_else(|e| e.into_inner());
        // LongRoPE's long set is the same for every length above the threshold; dynamic NTK's
        // frequencies depend on the exact length.
        let reusable = |cached_len: usize| match self.scaling {
            RopeScaling::LongRope { .. } => cached_len >= len,
            _ => cached_len == len,
        };
        if let Some((cached_len, cos, sin)) = cached.as_ref()
            && reusable(*cached_len)
        {
            return Ok((cos.clone(), sin.clone()));
        }
        debug_assert!(len > threshold);
        let (inv_freq, attention_factor) =
            rope_parameters(self.dim, self.theta, &self.scaling, Some(len))?;
        let (cos, sin) =
            tables(&inv_freq, attention_factor, len, self.cos.dtype(), self.cos.device())?;
        *cached = Some((len, cos.clone(), sin.clone()));
        Ok((cos, sin))
    }

    /// Rotates the first [`Rope::dim`] features of each head of `xs`
    /// `(b, heads, seq_len, head_dim)` whose first token is at `pos0`; the other features pass
    /// through unchanged.
    pub fn apply(&self, xs: &Tensor, pos0: usize) -> Result<Tensor> {
        let (_, _, seq_len, head_dim) = xs.dims4()?;
        if head_dim < self.dim {
            return Err(Error::Request(format!(
                "heads of width {head_dim} are narrower than the rotary width {}",
                self.dim
            )));
        }
        let (cos, sin) = self.tables_for(pos0 + seq_len)?;
        let cos = cos.narrow(0, pos0, seq_len)?;
        let sin = sin.narrow(0, pos0, seq_len)?;
        let rotate = |x: &Tensor| -> Result<Tensor> {
            Ok(if self.interleaved {
                candle_nn::rotary_emb::rope_i(x, &cos, &sin)?
            } else {
                super::rotate::rope(x, &cos, &sin)?
            })
        };
        let xs = xs.contiguous()?;
        if head_dim == self.dim {
            return rotate(&xs);
        }
        let rotated = rotate(&xs.narrow(3, 0, self.dim)?.contiguous()?)?;
        let passed = xs.narrow(3, self.dim, head_dim - self.dim)?;
        // A contiguous input may still carry odd strides on a dimension of size 1 (one token
        // after `split_heads`'s transpose), which sends `cat` through a transposed copy: make
        // the keys contiguous again, as `extend_kv` and the attention matmul need them.
        Ok(Tensor::cat(&[&rotated, &passed], 3)?.contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// Llama 3.1's factors, head_dim 128, theta 500000: the three regimes of
    /// `_compute_llama3_parameters` (kept, interpolated, divided). Exact values against
    /// transformers are covered by `matches_transformers_reference` and the golden tiny-Llama
    /// fixture, which uses this scaling.
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

    /// Partial interleaved rotary is GPT-J's formula written out: pairs `(2i, 2i+1)` of the
    /// first `dim` features turn by `pos · inv_freq[i]`, the rest is untouched.
    #[test]
    fn partial_interleaved_rotates_pairs_of_the_first_features() -> Result<()> {
        let device = Device::Cpu;
        let (dim, head_dim, pos0) = (4, 6, 3);
        let rope =
            Rope::new(dim, 10000.0, &RopeScaling::Default, 8, DType::F32, &device)?.interleaved();
        let xs = Tensor::arange(1f32, 13.0, &device)?.reshape((1, 1, 2, head_dim))?;
        let ys = rope.apply(&xs, pos0)?.flatten_all()?.to_vec1::<f32>()?;
        let x = xs.flatten_all()?.to_vec1::<f32>()?;
        let freqs = inv_freq(dim, 10000.0, &RopeScaling::Default)?;
        for t in 0..2 {
            let row = &x[t * head_dim..(t + 1) * head_dim];
            let out = &ys[t * head_dim..(t + 1) * head_dim];
            for (i, f) in freqs.iter().enumerate() {
                let angle = (pos0 + t) as f32 * f;
                let (a, b) = (row[2 * i], row[2 * i + 1]);
                let want = [a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()];
                assert!((out[2 * i] - want[0]).abs() < 1e-5, "{t} {i}");
                assert!((out[2 * i + 1] - want[1]).abs() < 1e-5, "{t} {i}");
            }
            assert_eq!(&out[dim..], &row[dim..], "features beyond rotary_dim pass through");
        }
        Ok(())
    }

    /// Halves: feature `i` pairs with `i + dim/2` inside the rotated part.
    #[test]
    fn partial_halves_rotate_within_the_first_features() -> Result<()> {
        let device = Device::Cpu;
        let rope = Rope::new(4, 100.0, &RopeScaling::Default, 4, DType::F32, &device)?;
        let xs = Tensor::arange(1f32, 9.0, &device)?.reshape((1, 1, 1, 8))?;
        let ys = rope.apply(&xs, 2)?.flatten_all()?.to_vec1::<f32>()?;
        let freqs = inv_freq(4, 100.0, &RopeScaling::Default)?;
        for (i, f) in freqs.iter().enumerate() {
            let angle = 2.0 * f;
            let (a, b) = (i as f32 + 1.0, i as f32 + 3.0);
            assert!((ys[i] - (a * angle.cos() - b * angle.sin())).abs() < 1e-5);
            assert!((ys[i + 2] - (b * angle.cos() + a * angle.sin())).abs() < 1e-5);
        }
        assert_eq!(&ys[4..], &[5.0, 6.0, 7.0, 8.0]);
        Ok(())
    }

    /// One token's heads come out of `split_heads` contiguous but with the strides of a
    /// transpose on the size-1 token axis; the partial rotation must still return canonical
    /// strides, or appending the keys to a past makes a layout the attention matmul refuses.
    #[test]
    fn partial_rotation_of_one_token_is_canonically_laid_out() -> Result<()> {
        let device = Device::Cpu;
        let rope = Rope::new(8, 10000.0, &RopeScaling::Default, 32, DType::F32, &device)?;
        let xs = Tensor::randn(0f32, 1.0, (4, 1, 4, 16), &device)?.transpose(1, 2)?;
        assert!(xs.is_contiguous() && xs.stride() != [64, 16, 16, 1]);
        let ys = rope.apply(&xs, 22)?;
        assert_eq!(ys.stride(), [64, 16, 16, 1]);
        Ok(())
    }

    /// LongRoPE and dynamic NTK pick their frequencies from the call's total length: a
    /// resumed suffix sees the tables of the full pass.
    #[test]
    fn length_dependent_tables_follow_the_total_length() -> Result<()> {
        let device = Device::Cpu;
        let scaling = RopeScaling::Dynamic { factor: 2.0, max_position_embeddings: 4 };
        let rope = Rope::new(8, 10000.0, &scaling, 4, DType::F32, &device)?;
        let xs = Tensor::randn(0f32, 1.0, (1, 2, 10, 8), &device)?;
        let full = rope.apply(&xs, 0)?;
        let suffix = rope.apply(&xs.narrow(2, 6, 4)?, 6)?;
        let diff = (full.narrow(2, 6, 4)? - suffix)?.abs()?.flatten_all()?.max(0)?;
        assert_eq!(diff.to_scalar::<f32>()?, 0.0);
        // Within the original length, plain RoPE.
        let short = rope.apply(&xs.narrow(2, 0, 4)?, 0)?;
        let plain = Rope::new(8, 10000.0, &RopeScaling::Default, 4, DType::F32, &device)?;
        let diff = (short - plain.apply(&xs.narrow(2, 0, 4)?, 0)?)?.abs()?.flatten_all()?.max(0)?;
        assert_eq!(diff.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    fn parse(json: &str) -> Result<RopeConfig> {
        let v: Value = serde_json::from_str(json).expect("json");
        let fields = RopeFields {
            rope_theta: v.get("rope_theta").and_then(Value::as_f64),
            rope_scaling: v.get("rope_scaling"),
            rope_parameters: v.get("rope_parameters"),
            partial_rotary_factor: v.get("partial_rotary_factor").and_then(Value::as_f64),
            max_position_embeddings: 4096,
            original_max_position_embeddings: None,
            head_dim: Some(8),
        };
        rope_from_config(&fields, None, "config.json")
    }

    #[test]
    fn unknown_or_bad_fields_are_clear_errors() {
        let cases = [
            (
                r#"{"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}}"#,
                "rope_parameters.rope_type",
                "yarn, longrope, dynamic",
            ),
            (r#"{"rope_scaling": {"type": "dynamic"}}"#, "rope_scaling.factor", "missing"),
            (
                r#"{"rope_scaling": {"type": "longrope", "short_factor": [1, 1], "long_factor": [1, 1, 1, 1]}}"#,
                "rope_scaling.short_factor",
                "expected rotary_dim / 2 = 4",
            ),
            (
                r#"{"rope_parameters": {"full_attention": {"rope_type": "default"}}}"#,
                "rope_parameters",
                "nested per layer type",
            ),
            (r#"{"partial_rotary_factor": 1.5}"#, "partial_rotary_factor", "(0, 1]"),
        ];
        for (json, field, message) in cases {
            match parse(json) {
                Err(Error::Config { field: f, message: m, .. }) => {
                    assert_eq!(f, field, "{json}");
                    assert!(m.contains(message), "{json}: {m}");
                }
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn nested_entries_are_read_by_layer_type() -> Result<()> {
        let v: Value = serde_json::from_str(
            r#"{"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}"#,
        )
        .expect("json");
        let fields = RopeFields { rope_parameters: Some(&v), ..RopeFields::default() };
        let full = rope_from_config(&fields, Some("full_attention"), "c")?;
        assert_eq!((full.theta, full.scaling), (1e6, RopeScaling::Linear { factor: 8.0 }));
        let local = rope_from_config(&fields, Some("sliding_attention"), "c")?;
        assert_eq!((local.theta, local.scaling), (1e4, RopeScaling::Default));
        // A flat description applies to every layer type.
        let flat: Value = serde_json::from_str(r#"{"rope_theta": 500.0}"#).expect("json");
        let fields = RopeFields { rope_parameters: Some(&flat), ..RopeFields::default() };
        assert_eq!(rope_from_config(&fields, Some("sliding_attention"), "c")?.theta, 500.0);
        Ok(())
    }

    /// Inverse frequencies and attention factors against transformers' `ROPE_INIT_FUNCTIONS`
    /// (tools/rope_reference.py writes tests/fixtures/rope/*.json from real checkpoints'
    /// settings), for each case's sequence length.
    ///
    /// Tolerance: relative 2e-6 on each frequency, 1e-12 on the attention factor. Both sides
    /// use the same f32 operations in the same order, but `powf` comes from different libms
    /// (glibc's here, SLEEF's or glibc's in PyTorch), each within 1 ulp (6e-8 relative) of the
    /// exact power, and yarn's and dynamic NTK's formulas chain up to four f32 roundings
    /// after it; 2e-6 is ~16 ulp, while any wrong regime, bound or base moves a frequency by
    /// 1e-3 or more. Measured: bit-equal except a few yarn and LongRoPE entries (1 ulp) and
    /// dynamic NTK's (up to 3e-7, a power of a rounded power). The attention factors are f64
    /// on both sides.
    #[test]
    fn matches_transformers_reference() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/rope");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("tests/fixtures/rope exists")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        assert!(files.len() >= 8, "{} fixtures", files.len());
        let mut kinds = std::collections::BTreeSet::new();
        for path in files {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(&path).expect("fixture");
            let fx: Value = serde_json::from_str(&text).expect("fixture json");
            let cfg = &fx["config"];
            let fields = RopeFields {
                rope_theta: cfg.get("rope_theta").and_then(Value::as_f64),
                rope_scaling: cfg.get("rope_scaling"),
                rope_parameters: cfg.get("rope_parameters"),
                partial_rotary_factor: cfg.get("partial_rotary_factor").and_then(Value::as_f64),
                max_position_embeddings: cfg["max_position_embeddings"].as_u64().expect("max")
                    as usize,
                original_max_position_embeddings: cfg
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_u64)
                    .map(|v| v as usize),
                head_dim: Some(fx["head_dim"].as_u64().expect("head_dim") as usize),
            };
            let rope = rope_from_config(&fields, None, &name).expect("parses");
            let dim = rope.rotary_dim(fx["head_dim"].as_u64().expect("head_dim") as usize);
            assert_eq!(dim as u64, fx["dim"].as_u64().expect("dim"), "{name}");
            kinds.insert(fx["rope_type"].as_str().expect("rope_type").to_string());
            for case in fx["cases"].as_array().expect("cases") {
                let seq_len = case["seq_len"].as_u64().map(|v| v as usize);
                let (freqs, factor) =
                    rope_parameters(dim, rope.theta, &rope.scaling, seq_len).expect("params");
                let want: Vec<f64> = case["inv_freq"]
                    .as_array()
                    .expect("inv_freq")
                    .iter()
                    .map(|v| v.as_f64().expect("number"))
                    .collect();
                assert_eq!(freqs.len(), want.len(), "{name} {seq_len:?}");
                for (i, (&got, &want)) in freqs.iter().zip(&want).enumerate() {
                    let rel = (f64::from(got) - want).abs() / want.abs();
                    assert!(rel <= 2e-6, "{name} seq_len {seq_len:?} [{i}]: {got} vs {want}");
                }
                let want_factor = case["attention_factor"].as_f64().expect("attention_factor");
                assert!((factor - want_factor).abs() <= 1e-12, "{name}: {factor} vs {want_factor}");
            }
        }
        for kind in ["default", "linear", "llama3", "yarn", "longrope", "dynamic"] {
            assert!(kinds.contains(kind), "no fixture of rope_type {kind}");
        }
    }
}
