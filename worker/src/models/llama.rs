//! Llama-style decoders: Llama 2/3, SmolLM2, Mistral and Qwen2.
//!
//! Touvron et al., "LLaMA: Open and Efficient Foundation Language Models" (2023); reference
//! implementation: transformers' `models/llama/modeling_llama.py` (Mistral and Qwen2 differ
//! only in the options this file reads: sliding windows, and Qwen2's q/k/v biases).
//! RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU MLP, with a
//! tied or untied LM head.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::nn::{Linear, causal_attention, extend_kv, merge_heads, split_heads};
use super::ops::silu_mul;
use super::rope::{Rope, RopeScaling};
use crate::error::{Error, Result};
use crate::forward::{Decoder, Dims, LayerKv};
use crate::weights::Weights;

/// `config.json` of a Llama-style model, with transformers' field names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    /// `llama`, `mistral` or `qwen2`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4 writes it here; transformers 5 in `rope_parameters`).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 4's RoPE scaling.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5's RoPE description (`rope_type`, `rope_theta`, scaling factors).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Trained context length.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Whether the LM head is the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o (Llama); Qwen2 always has q/k/v biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Activation of the gate; only `silu` is implemented.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Mistral / Qwen2 sliding attention window.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether the window is used at all.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Qwen2: layers from this index on use the window.
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// transformers 5: `full_attention` or `sliding_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

/// A resolved Llama-style configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; divides `n_heads`.
    pub n_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon, in f32 as the kernel applies it.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Trained context length.
    pub max_positions: usize,
    /// Whether the LM head is the embedding matrix (also when the weights have no head).
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v.
    pub qkv_bias: bool,
    /// Bias on o.
    pub o_bias: bool,
    /// Biases on the MLP.
    pub mlp_bias: bool,
    /// Sliding window of each layer, `None` for full attention.
    pub windows: Vec<Option<usize>>,
}

impl RawConfig {
    /// Resolves defaults and checks the fields; `source` names config.json in errors.
    pub fn into_config(self, source: &str) -> Result<Config> {
        let err = |field: &str, message: String| Error::Config {
            source_name: source.to_string(),
            field: field.to_string(),
            message,
        };
        let model_type = self.model_type.clone().unwrap_or_else(|| "llama".into());
        if self.hidden_act != "silu" {
            return Err(err(
                "hidden_act",
                format!("{:?} is not implemented (only silu)", self.hidden_act),
            ));
        }
        let n_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if self.num_attention_heads == 0
            || n_kv_heads == 0
            || self.num_attention_heads % n_kv_heads != 0
        {
            return Err(err(
                "num_key_value_heads",
                format!(
                    "{n_kv_heads} key/value heads do not divide {} query heads",
                    self.num_attention_heads
                ),
            ));
        }
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(err("head_dim", format!("{head_dim} is not a positive even number")));
        }
        let (rope_theta, rope_scaling) = rope_from_config(&self, source)?;
        let windows = self.layer_windows(&model_type);
        Ok(Config {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            n_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps as f32,
            rope_theta,
            rope_scaling,
            max_positions: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: self.attention_bias || model_type == "qwen2",
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            windows,
        })
    }

    /// The attention window of every layer, as transformers decides it per family.
    fn layer_windows(&self, model_type: &str) -> Vec<Option<usize>> {
        let n = self.num_hidden_layers;
        if let Some(types) = &self.layer_types {
            return types
                .iter()
                .map(|t| if t == "sliding_attention" { self.sliding_window } else { None })
                .collect();
        }
        match model_type {
            "mistral" => vec![self.sliding_window; n],
            "qwen2" if self.use_sliding_window == Some(true) => {
                let from = self.max_window_layers.unwrap_or(28);
                (0..n).map(|i| if i >= from { self.sliding_window } else { None }).collect()
            }
            _ => vec![None; n],
        }
    }
}

/// Reads the RoPE base and scaling from either transformers 4 or 5 fields.
fn rope_from_config(raw: &RawConfig, source: &str) -> Result<(f32, RopeScaling)> {
    let err = |field: &str, message: String| Error::Config {
        source_name: source.to_string(),
        field: field.to_string(),
        message,
    };
    let params =
        raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref()).filter(|v| !v.is_null());
    let field_name = if raw.rope_parameters.is_some() { "rope_parameters" } else { "rope_scaling" };
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(serde_json::Value::as_f64)
        .or(raw.rope_theta)
        .unwrap_or(10000.0);
    let Some(params) = params else { return Ok((theta as f32, RopeScaling::Default)) };
    let kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num =
        |key: &str| -> Result<f32> {
            params.get(key).and_then(serde_json::Value::as_f64).map(|v| v as f32).ok_or_else(|| {
                err(&format!("{field_name}.{key}"), "missing or not a number".into())
            })
        };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(err(
                &format!("{field_name}.rope_type"),
                format!("{other:?} is not implemented (default, linear, llama3)"),
            ));
        }
    };
    Ok((theta as f32, scaling))
}

/// q, k and v share one matmul: their weights are stacked at load time.
struct Attention {
    qkv: Linear,
    o: Linear,
}

/// gate and up share one matmul; `silu(gate) * up` is one fused pass over its output.
struct Mlp {
    gate_up: Linear,
    down: Linear,
}

struct DecoderLayer {
    input_norm: Tensor,
    attn: Attention,
    post_attn_norm: Tensor,
    mlp: Mlp,
    span: tracing::Span,
}

/// A Llama-style causal language model.
pub struct Llama {
    cfg: Config,
    dims: Dims,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `(vocab, hidden)`: the embedding matrix when tied.
    lm_head: Linear,
    rope: Rope,
}

fn linear(w: &Weights, prefix: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
    let (weight, bias) = weight_and_bias(w, prefix, out_dim, in_dim, bias)?;
    Linear::from_out_in(weight, bias, prefix)
}

fn weight_and_bias(
    w: &Weights,
    prefix: &str,
    out_dim: usize,
    in_dim: usize,
    bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let weight = w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
    let bias = if bias { Some(w.get(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
    Ok((weight, bias))
}

/// Linear layers with the same input stacked into one: `(Σ out, in)`.
fn stacked(w: &Weights, parts: &[(String, usize)], in_dim: usize, bias: bool) -> Result<Linear> {
    let mut weights = Vec::with_capacity(parts.len());
    let mut biases = Vec::with_capacity(parts.len());
    for (prefix, out_dim) in parts {
        let (weight, b) = weight_and_bias(w, prefix, *out_dim, in_dim, bias)?;
        weights.push(weight);
        biases.extend(b);
    }
    let bias = if bias { Some(Tensor::cat(&biases, 0)?) } else { None };
    let name = parts.first().map_or("stacked", |(p, _)| p.as_str());
    Linear::from_out_in(Tensor::cat(&weights, 0)?, bias, name)
}

impl Llama {
    /// Builds the model from Hugging Face-named weights.
    pub(crate) fn new(cfg: Config, w: &Weights) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let embed = w.get("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            let attn = Attention {
                qkv: stacked(
                    w,
                    &[
                        (format!("{p}.self_attn.q_proj"), cfg.n_heads * hd),
                        (format!("{p}.self_attn.k_proj"), cfg.n_kv_heads * hd),
                        (format!("{p}.self_attn.v_proj"), cfg.n_kv_heads * hd),
                    ],
                    d,
                    cfg.qkv_bias,
                )?,
                o: linear(w, &format!("{p}.self_attn.o_proj"), d, cfg.n_heads * hd, cfg.o_bias)?,
            };
            let mlp = Mlp {
                gate_up: stacked(
                    w,
                    &[
                        (format!("{p}.mlp.gate_proj"), cfg.intermediate_size),
                        (format!("{p}.mlp.up_proj"), cfg.intermediate_size),
                    ],
                    d,
                    cfg.mlp_bias,
                )?,
                down: linear(
                    w,
                    &format!("{p}.mlp.down_proj"),
                    d,
                    cfg.intermediate_size,
                    cfg.mlp_bias,
                )?,
            };
            layers.push(DecoderLayer {
                input_norm: w.get(&format!("{p}.input_layernorm.weight"), &[d])?,
                attn,
                post_attn_norm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                mlp,
                span: tracing::trace_span!("layer", layer_idx = i),
            });
        }
        let norm = w.get("model.norm.weight", &[d])?;
        let tied = cfg.tie_word_embeddings || !w.contains("lm_head.weight");
        let head_weight =
            if tied { embed.clone() } else { w.get("lm_head.weight", &[cfg.vocab_size, d])? };
        let lm_head = Linear::from_out_in(head_weight, None, "lm_head")?;
        let rope = Rope::new(
            hd,
            cfg.rope_theta,
            &cfg.rope_scaling,
            cfg.max_positions,
            embed.dtype(),
            w.device(),
        )?;
        let dims = Dims {
            n_layers: cfg.n_layers,
            d_model: d,
            n_heads: cfg.n_heads,
            head_dim: hd,
            vocab_size: cfg.vocab_size,
            max_positions: cfg.max_positions,
        };
        Ok(Self { cfg, dims, embed, layers, norm, lm_head, rope })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    fn rms_norm(&self, xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&xs.contiguous()?, weight, self.cfg.rms_norm_eps)?)
    }
}

impl Decoder for Llama {
    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (b_sz, seq_len) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        Ok(self.embed.index_select(&flat, 0)?.reshape((b_sz, seq_len, self.cfg.hidden_size))?)
    }

    fn add_positions(&self, xs: Tensor, _pos0: usize) -> Result<Tensor> {
        Ok(xs)
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
        let cfg = &self.cfg;
        let h = self.rms_norm(xs, &l.input_norm)?;
        let qkv = l.attn.qkv.forward(&h)?;
        let (q_dim, kv_dim) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        let q = split_heads(&qkv.narrow(2, 0, q_dim)?, cfg.n_heads, cfg.head_dim)?;
        let k = split_heads(&qkv.narrow(2, q_dim, kv_dim)?, cfg.n_kv_heads, cfg.head_dim)?;
        let v = split_heads(&qkv.narrow(2, q_dim + kv_dim, kv_dim)?, cfg.n_kv_heads, cfg.head_dim)?;
        let q = self.rope.apply(&q, pos0)?;
        let k = self.rope.apply(&k, pos0)?;
        let kv = extend_kv(past, k, v)?;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let out = causal_attention(&q, &kv, pos0, scale, cfg.windows[layer])?;
        Ok((merge_heads(&out)?, kv))
    }

    fn attn_out(&self, layer: usize, heads: &Tensor) -> Result<Tensor> {
        let l = &self.layers[layer];
        let _enter = l.span.enter();
        l.attn.o.forward(heads)
    }

    fn mlp(&self, layer: usize, xs: &Tensor) -> Result<Tensor> {
        let l = &self.layers[layer];
        let _enter = l.span.enter();
        let h = self.rms_norm(xs, &l.post_attn_norm)?;
        let gated = silu_mul(&l.mlp.gate_up.forward(&h)?, self.cfg.intermediate_size)?;
        l.mlp.down.forward(&gated)
    }

    fn head(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.rms_norm(xs, &self.norm)?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }
}
