//! GPT-NeoX: GPT-NeoX-20B and the Pythia suite.
//!
//! Black et al., "GPT-NeoX-20B: An Open-Source Autoregressive Language Model" (2022);
//! Biderman et al., "Pythia" (2023); reference implementation: transformers'
//! `models/gpt_neox/modeling_gpt_neox.py`. LayerNorm blocks, parallel
//! (`use_parallel_residual`: `x + attn(ln1 x) + mlp(ln2 x)`) or sequential, a fused
//! `query_key_value` projection whose rows are grouped per head (`[q_h, k_h, v_h]` for each
//! head h), rotary positions on the first `rotary_pct` of each head (halves, not interleaved),
//! a GELU MLP and an untied LM head (`embed_out`).

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::gpt2::Activation;
use super::nn::{
    ACTIVATIONS, LayerNorm, Linear, TokenTable, activate, activation, causal_attention, embed,
    extend_kv, merge_heads, split_qkv,
};
use super::rope::{Rope, RopeConfig, RopeFields, rope_from_config};
use crate::error::{Error, Result};
use crate::forward::{Decoder, Dims, LayerKv, Residual};
use crate::weights::Weights;

/// `config.json` of a GPT-NeoX model, with transformers' field names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    /// Vocabulary size.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Width of the residual stream.
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    /// Number of blocks.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads.
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Width of the MLP.
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    /// The MLP's activation (`gelu`, the erf form, for Pythia).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// transformers 4: fraction of each head that is rotated (transformers 5 moves it into
    /// `rope_parameters.partial_rotary_factor`); 0.25 when neither names it.
    #[serde(default)]
    pub rotary_pct: Option<f64>,
    /// transformers 4: the RoPE base (transformers 5: `rope_parameters.rope_theta`).
    #[serde(default)]
    pub rotary_emb_base: Option<f64>,
    /// transformers 4's RoPE scaling.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5's RoPE description.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Trained context length.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Whether `embed_out` is the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// `x + attn(ln1 x) + mlp(ln2 x)` instead of two residual adds in sequence.
    #[serde(default = "default_true")]
    pub use_parallel_residual: bool,
    /// Biases on `query_key_value` and `dense`.
    #[serde(default = "default_true")]
    pub attention_bias: bool,
}

fn default_vocab() -> usize {
    50432
}
fn default_hidden() -> usize {
    6144
}
fn default_layers() -> usize {
    44
}
fn default_heads() -> usize {
    64
}
fn default_intermediate() -> usize {
    24576
}
fn default_act() -> String {
    "gelu".into()
}
fn default_max_positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// A resolved GPT-NeoX configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Per-head width, `hidden_size / n_heads`.
    pub head_dim: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// The MLP's activation.
    pub activation: Activation,
    /// LayerNorm epsilon, in f32 as the kernel applies it.
    pub layer_norm_eps: f32,
    /// RoPE base, scaling and partial factor.
    pub rope: RopeConfig,
    /// Rotated features per head, `int(head_dim * partial_rotary_factor)` (even).
    pub rotary_dim: usize,
    /// The config's `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// The longest sequence accepted: `max_position_embeddings`, stretched by dynamic NTK.
    pub max_positions: usize,
    /// Parallel residual.
    pub parallel_residual: bool,
    /// Biases on `query_key_value` and `dense`.
    pub attention_bias: bool,
    /// Whether `embed_out` is the embedding matrix (also when the weights have none).
    pub tie_word_embeddings: bool,
}

impl RawConfig {
    /// Resolves defaults and checks the fields; `source` names config.json in errors.
    pub fn into_config(self, source: &str) -> Result<Config> {
        let err = |field: &str, message: String| Error::Config {
            source_name: source.to_string(),
            field: field.to_string(),
            message,
        };
        let activation = activation(&self.hidden_act).ok_or_else(|| {
            err("hidden_act", format!("{:?} is not implemented ({ACTIVATIONS})", self.hidden_act))
        })?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(err(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        let head_dim = self.hidden_size / self.num_attention_heads;
        // transformers 5's GPTNeoXConfig: `rotary_emb_base` and `rotary_pct` (default 0.25) are
        // the defaults of `rope_parameters`' `rope_theta` and `partial_rotary_factor`; a
        // top-level `rope_theta` is not read.
        let fields = RopeFields {
            rope_theta: Some(self.rotary_emb_base.unwrap_or(10000.0)),
            rope_scaling: self.rope_scaling.as_ref(),
            rope_parameters: self.rope_parameters.as_ref(),
            partial_rotary_factor: Some(self.rotary_pct.unwrap_or(0.25)),
            max_position_embeddings: self.max_position_embeddings,
            original_max_position_embeddings: None,
            head_dim: Some(head_dim),
        };
        let rope = rope_from_config(&fields, None, source)?;
        let rotary_dim = rope.rotary_dim(head_dim);
        if rotary_dim == 0 || rotary_dim % 2 != 0 {
            return Err(err(
                "rotary_pct",
                format!(
                    "rotates {rotary_dim} of {head_dim} features per head; only a positive even \
                     width is implemented"
                ),
            ));
        }
        let max_positions = rope.scaling.max_positions(self.max_position_embeddings);
        Ok(Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            head_dim,
            intermediate_size: self.intermediate_size,
            activation,
            layer_norm_eps: self.layer_norm_eps as f32,
            rope,
            rotary_dim,
            max_position_embeddings: self.max_position_embeddings,
            max_positions,
            parallel_residual: self.use_parallel_residual,
            attention_bias: self.attention_bias,
            tie_word_embeddings: self.tie_word_embeddings,
        })
    }
}

struct Layer {
    input_layernorm: LayerNorm,
    /// Rows reordered at load time from per-head `[q_h, k_h, v_h]` to `[q; k; v]`.
    qkv: Linear,
    dense: Linear,
    post_attention_layernorm: LayerNorm,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    span: tracing::Span,
}

/// GPT-NeoX with its LM head.
pub struct GptNeoX {
    cfg: Config,
    dims: Dims,
    embed_in: TokenTable,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    embed_out: Linear,
    rope: Rope,
}

fn linear(w: &Weights, prefix: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
    let weight = w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
    let bias = if bias { Some(w.get(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
    Linear::from_out_in(weight, bias, prefix)
}

/// `query_key_value` with its rows regrouped from per head to per projection. transformers
/// views the output as `(…, n_heads, 3 · head_dim)` and chunks each head's slice into q, k
/// and v; after this the output is `[q (all heads); k; v]`, as the shared helpers split it.
fn fused_qkv(w: &Weights, prefix: &str, cfg: &Config) -> Result<Linear> {
    let (d, n, hd) = (cfg.hidden_size, cfg.n_heads, cfg.head_dim);
    let regroup = |t: Tensor, rest: &[usize]| -> Result<Tensor> {
        let mut by_head = vec![n, 3, hd];
        by_head.extend_from_slice(rest);
        let mut flat = vec![3 * d];
        flat.extend_from_slice(rest);
        Ok(t.reshape(by_head)?.transpose(0, 1)?.contiguous()?.reshape(flat)?)
    };
    let weight = regroup(w.get(&format!("{prefix}.weight"), &[3 * d, d])?, &[d])?;
    let bias = if cfg.attention_bias {
        Some(regroup(w.get(&format!("{prefix}.bias"), &[3 * d])?, &[])?)
    } else {
        None
    };
    Linear::from_out_in(weight, bias, prefix)
}

impl GptNeoX {
    /// Builds the model from Hugging Face-named weights.
    pub(crate) fn new(cfg: Config, w: &Weights) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let embed_in = w.get("gpt_neox.embed_in.weight", &[cfg.vocab_size, d])?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("gpt_neox.layers.{i}");
            let inner = cfg.intermediate_size;
            layers.push(Layer {
                input_layernorm: LayerNorm::load(w, &format!("{p}.input_layernorm"), d, eps)?,
                qkv: fused_qkv(w, &format!("{p}.attention.query_key_value"), &cfg)?,
                dense: linear(w, &format!("{p}.attention.dense"), d, d, cfg.attention_bias)?,
                post_attention_layernorm: LayerNorm::load(
                    w,
                    &format!("{p}.post_attention_layernorm"),
                    d,
                    eps,
                )?,
                dense_h_to_4h: linear(w, &format!("{p}.mlp.dense_h_to_4h"), inner, d, true)?,
                dense_4h_to_h: linear(w, &format!("{p}.mlp.dense_4h_to_h"), d, inner, true)?,
                span: tracing::trace_span!("layer", layer_idx = i),
            });
        }
        let final_layer_norm = LayerNorm::load(w, "gpt_neox.final_layer_norm", d, eps)?;
        let dtype = embed_in.dtype();
        let (embed_in, embed_out) = if cfg.tie_word_embeddings || !w.contains("embed_out.weight") {
            Linear::tied(embed_in, None, "embed_out")?
        } else {
            let weight = w.get("embed_out.weight", &[cfg.vocab_size, d])?;
            (embed_in.into(), Linear::from_out_in(weight, None, "embed_out")?)
        };
        // Tables up to the trained length; longer calls (dynamic NTK) compute their own.
        let rope = Rope::new(
            cfg.rotary_dim,
            cfg.rope.theta,
            &cfg.rope.scaling,
            cfg.max_position_embeddings,
            dtype,
            w.device(),
        )?;
        let dims = Dims {
            n_layers: cfg.n_layers,
            d_model: d,
            n_heads: cfg.n_heads,
            head_dim: cfg.head_dim,
            vocab_size: cfg.vocab_size,
            max_positions: cfg.max_positions,
        };
        Ok(Self { cfg, dims, embed_in, layers, final_layer_norm, embed_out, rope })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

impl Decoder for GptNeoX {
    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        embed(&self.embed_in, ids)
    }

    fn attn(
        &self,
        layer: usize,
        xs: &Tensor,
        pos0: usize,
        past: Option<&LayerKv>,
    ) -> Result<(Tensor, LayerKv)> {
        let l = &self.layers[layer];
        let _enter = l.span.enter();
        let (n_heads, head_dim) = (self.cfg.n_heads, self.cfg.head_dim);
        let qkv = l.qkv.forward(&l.input_layernorm.forward(xs)?)?;
        let (q, k, v) = split_qkv(&qkv, n_heads, head_dim)?;
        let q = self.rope.apply(&q, pos0)?;
        let k = self.rope.apply(&k, pos0)?;
        let kv = extend_kv(past, k, v)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let out = causal_attention(&q, &kv, pos0, scale, None)?;
        Ok((merge_heads(&out)?, kv))
    }

    fn attn_out(&self, layer: usize, heads: &Tensor) -> Result<Tensor> {
        let l = &self.layers[layer];
        let _enter = l.span.enter();
        l.dense.forward(heads)
    }

    fn mlp(&self, layer: usize, xs: &Tensor) -> Result<Tensor> {
        let l = &self.layers[layer];
        let _enter = l.span.enter();
        let h = l.dense_h_to_4h.forward(&l.post_attention_layernorm.forward(xs)?)?;
        l.dense_4h_to_h.forward(&activate(&h, self.cfg.activation)?)
    }

    fn residual(&self, _layer: usize) -> Residual {
        if self.cfg.parallel_residual { Residual::Parallel } else { Residual::Sequential }
    }

    fn head(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.final_layer_norm.forward(xs)?;
        Ok(self.embed_out.forward(&h)?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::rope::RopeScaling;

    fn parse(json: &str) -> Result<Config> {
        let raw: RawConfig = serde_json::from_str(json).expect("json");
        raw.into_config("config.json")
    }

    /// Pythia's transformers 4 config and the same model as transformers 5 writes it.
    #[test]
    fn pythia_configs_of_both_transformers_agree() -> Result<()> {
        let t4 = parse(
            r#"{"hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048,
                "num_hidden_layers": 6, "rotary_pct": 0.25, "rotary_emb_base": 10000,
                "rope_scaling": null, "use_parallel_residual": true, "hidden_act": "gelu"}"#,
        )?;
        let t5 = parse(
            r#"{"hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048,
                "num_hidden_layers": 6, "rope_parameters": {"rope_type": "default",
                "rope_theta": 10000.0, "partial_rotary_factor": 0.25}}"#,
        )?;
        assert_eq!(t4, t5);
        assert_eq!((t4.head_dim, t4.rotary_dim, t4.rope.theta), (64, 16, 10000.0));
        assert_eq!(t4.activation, Activation::GeluErf);
        assert!(t4.parallel_residual && t4.attention_bias && !t4.tie_word_embeddings);
        Ok(())
    }

    #[test]
    fn dynamic_ntk_stretches_the_accepted_length() -> Result<()> {
        let cfg = parse(
            r#"{"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 100,
                "rope_scaling": {"type": "dynamic", "factor": 2.5}}"#,
        )?;
        assert_eq!(
            cfg.rope.scaling,
            RopeScaling::Dynamic { factor: 2.5, max_position_embeddings: 100 }
        );
        assert_eq!(cfg.max_positions, 250);
        Ok(())
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (r#"{"hidden_size": 64, "num_attention_heads": 4, "rotary_pct": 0.1}"#, "rotary_pct"),
            (r#"{"hidden_size": 64, "num_attention_heads": 5}"#, "num_attention_heads"),
            (r#"{"hidden_act": "swiglu"}"#, "hidden_act"),
            (r#"{"rope_scaling": {"type": "su", "factor": 2.0}}"#, "rope_scaling.rope_type"),
        ];
        for (json, want) in cases {
            match parse(json) {
                Err(Error::Config { field, .. }) => assert_eq!(field, want, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
    }
}
