//! Llama-style decoders: Llama 2/3, SmolLM2, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2.
//!
//! Touvron et al., "LLaMA: Open and Efficient Foundation Language Models" (2023); reference
//! implementations: transformers' `models/{llama,mistral,qwen2,qwen3,gemma,gemma2,gemma3,
//! phi3,olmo2}/modeling_*.py`. RMSNorm, rotary position embeddings, grouped-query attention
//! and a gated MLP, with a tied or untied LM head; the variations between these families are
//! resolved in `llama_config.rs` and read here as plain fields.

use candle_core::{DType, Tensor};

use super::attention::attention_merged;
use super::nn::{Linear, TokenTable, embed, extend_kv, split_heads};
use super::ops::{gelu_mul, rms_norm, silu_mul};
use super::rope::{Rope, RopeScaling};
use crate::error::Result;
use crate::forward::{Decoder, Dims, LayerKv};
use crate::weights::Weights;

pub use super::llama_config::{
    Config, GateActivation, MODEL_TYPES, NormPlacement, QkNorm, RawConfig,
};

/// q, k and v share one matmul: their weights are stacked at load time (Phi-3 stores them
/// stacked already).
struct Attention {
    qkv: Linear,
    o: Linear,
    /// Qwen3, Gemma 3 (`(head_dim)`), OLMo 2 (`(heads × head_dim)`).
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

/// gate and up share one matmul; `act(gate) * up` is one fused pass over its output.
struct Mlp {
    gate_up: Linear,
    down: Linear,
}

/// A block's norm weights, `None` where the family has no norm at that place
/// ([`NormPlacement`]). Gemma's are stored as `1 + w`, ready for a plain RMSNorm.
struct DecoderLayer {
    attn_norm: Option<Tensor>,
    attn: Attention,
    attn_post_norm: Option<Tensor>,
    mlp_norm: Option<Tensor>,
    mlp: Mlp,
    mlp_post_norm: Option<Tensor>,
    /// Index into `Llama::ropes`: the sliding layers' RoPE differs in Gemma 3.
    rope: usize,
    span: tracing::Span,
}

/// A Llama-style causal language model.
pub struct Llama {
    cfg: Config,
    dims: Dims,
    embed: TokenTable,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `(vocab, hidden)`: the embedding matrix when tied.
    lm_head: Linear,
    ropes: Vec<Rope>,
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

/// Linear layers with the same input stacked into one: `(Σ out, in)`; or the checkpoint's
/// own stacked layer `fused` (Phi-3's `qkv_proj`, `gate_up_proj`, in the same order).
fn stacked(
    w: &Weights,
    fused: &str,
    parts: &[(String, usize)],
    in_dim: usize,
    bias: bool,
) -> Result<Linear> {
    if w.contains(&format!("{fused}.weight")) {
        let out_dim = parts.iter().map(|(_, d)| d).sum();
        return linear(w, fused, out_dim, in_dim, bias);
    }
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
        // Gemma applies `1 + w`; adding the 1 once here is what its RMSNorm computes per call
        // (in f32, like transformers).
        let norm = |name: &str, len: usize| -> Result<Tensor> {
            let t = w.get(name, &[len])?;
            Ok(if cfg.norm_plus_one { (t + 1.0)? } else { t })
        };
        let (q_dim, kv_dim) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            let (q_norm, k_norm) = match cfg.qk_norm {
                QkNorm::None => (None, None),
                QkNorm::PerHead => (
                    Some(norm(&format!("{p}.self_attn.q_norm.weight"), hd)?),
                    Some(norm(&format!("{p}.self_attn.k_norm.weight"), hd)?),
                ),
                QkNorm::Whole => (
                    Some(norm(&format!("{p}.self_attn.q_norm.weight"), q_dim)?),
                    Some(norm(&format!("{p}.self_attn.k_norm.weight"), kv_dim)?),
                ),
            };
            let attn = Attention {
                qkv: stacked(
                    w,
                    &format!("{p}.self_attn.qkv_proj"),
                    &[
                        (format!("{p}.self_attn.q_proj"), q_dim),
                        (format!("{p}.self_attn.k_proj"), kv_dim),
                        (format!("{p}.self_attn.v_proj"), kv_dim),
                    ],
                    d,
                    cfg.qkv_bias,
                )?,
                o: linear(w, &format!("{p}.self_attn.o_proj"), d, q_dim, cfg.o_bias)?,
                q_norm,
                k_norm,
            };
            let mlp = Mlp {
                gate_up: stacked(
                    w,
                    &format!("{p}.mlp.gate_up_proj"),
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
            let named = |n: &str| norm(&format!("{p}.{n}.weight"), d);
            let (attn_norm, attn_post_norm, mlp_norm, mlp_post_norm) = match cfg.norms {
                NormPlacement::Pre => (
                    Some(named("input_layernorm")?),
                    None,
                    Some(named("post_attention_layernorm")?),
                    None,
                ),
                NormPlacement::Sandwich => (
                    Some(named("input_layernorm")?),
                    Some(named("post_attention_layernorm")?),
                    Some(named("pre_feedforward_layernorm")?),
                    Some(named("post_feedforward_layernorm")?),
                ),
                NormPlacement::Post => (
                    None,
                    Some(named("post_attention_layernorm")?),
                    None,
                    Some(named("post_feedforward_layernorm")?),
                ),
            };
            let sliding = cfg.windows.get(i).copied().flatten().is_some();
            layers.push(DecoderLayer {
                attn_norm,
                attn,
                attn_post_norm,
                mlp_norm,
                mlp,
                mlp_post_norm,
                rope: usize::from(sliding && cfg.local_rope.is_some()),
                span: tracing::trace_span!("layer", layer_idx = i),
            });
        }
        let final_norm = norm("model.norm.weight", d)?;
        let tied = cfg.tie_word_embeddings || !w.contains("lm_head.weight");
        let dtype = embed.dtype();
        let (embed, lm_head) = match tied {
            true => Linear::tied(embed, None, "lm_head")?,
            false => {
                let head = w.get("lm_head.weight", &[cfg.vocab_size, d])?;
                (embed.into(), Linear::from_out_in(head, None, "lm_head")?)
            }
        };
        let rope = |theta: f32, scaling: &RopeScaling| {
            Rope::new(cfg.rotary_dim, theta, scaling, cfg.max_positions, dtype, w.device())
        };
        let mut ropes = vec![rope(cfg.rope_theta, &cfg.rope_scaling)?];
        if let Some((theta, scaling)) = &cfg.local_rope {
            ropes.push(rope(*theta, scaling)?);
        }
        let dims = Dims {
            n_layers: cfg.n_layers,
            d_model: d,
            n_heads: cfg.n_heads,
            head_dim: hd,
            vocab_size: cfg.vocab_size,
            max_positions: cfg.max_positions,
        };
        Ok(Self { cfg, dims, embed, layers, norm: final_norm, lm_head, ropes })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn rms_norm(&self, xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
        rms_norm(xs, weight, self.cfg.rms_norm_eps)
    }

    fn maybe_norm(&self, xs: Tensor, weight: Option<&Tensor>) -> Result<Tensor> {
        match weight {
            Some(w) => self.rms_norm(&xs, w),
            None => Ok(xs),
        }
    }
}

/// `c · tanh(x / c)`: Gemma 2's soft-capping.
pub(crate) fn softcap(xs: &Tensor, cap: f64) -> Result<Tensor> {
    Ok(((xs / cap)?.tanh()? * cap)?)
}

impl Decoder for Llama {
    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let xs = embed(&self.embed, ids)?;
        Ok(match self.cfg.embed_scale {
            Some(scale) => (xs * f64::from(scale))?,
            None => xs,
        })
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
        let h = self.maybe_norm(xs.clone(), l.attn_norm.as_ref())?;
        let qkv = l.attn.qkv.forward(&h)?;
        let (q_dim, kv_dim) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        let (q, k) = (qkv.narrow(2, 0, q_dim)?, qkv.narrow(2, q_dim, kv_dim)?);
        let (q, k) = match cfg.qk_norm {
            QkNorm::Whole => (
                self.maybe_norm(q, l.attn.q_norm.as_ref())?,
                self.maybe_norm(k, l.attn.k_norm.as_ref())?,
            ),
            QkNorm::None | QkNorm::PerHead => (q, k),
        };
        let q = split_heads(&q, cfg.n_heads, cfg.head_dim)?;
        let k = split_heads(&k, cfg.n_kv_heads, cfg.head_dim)?;
        let v = split_heads(&qkv.narrow(2, q_dim + kv_dim, kv_dim)?, cfg.n_kv_heads, cfg.head_dim)?;
        let (q, k) = match cfg.qk_norm {
            QkNorm::PerHead => (
                self.maybe_norm(q, l.attn.q_norm.as_ref())?,
                self.maybe_norm(k, l.attn.k_norm.as_ref())?,
            ),
            QkNorm::None | QkNorm::Whole => (q, k),
        };
        let rope = &self.ropes[l.rope];
        let q = rope.apply(&q, pos0)?;
        let k = rope.apply(&k, pos0)?;
        let kv = extend_kv(past, k, v)?;
        let heads =
            attention_merged(&q, &kv, pos0, cfg.attn_scale, cfg.windows[layer], cfg.attn_softcap)?;
        Ok((heads, kv))
    }

    fn attn_out(&self, layer: usize, heads: &Tensor) -> Result<Tensor> {
        let l = &self.layers[layer];
        let _enter = l.span.enter();
        l.attn.o.forward(heads)
    }

    fn mlp(&self, layer: usize, xs: &Tensor) -> Result<Tensor> {
        let l = &self.layers[layer];
        let _enter = l.span.enter();
        let h = self.maybe_norm(xs.clone(), l.mlp_norm.as_ref())?;
        let half = self.cfg.intermediate_size;
        let gated = match self.cfg.activation {
            GateActivation::Silu => match l.mlp.gate_up.forward_silu_mul(&h, half)? {
                Some(gated) => gated,
                None => silu_mul(&l.mlp.gate_up.forward(&h)?, half)?,
            },
            GateActivation::GeluTanh => gelu_mul(&l.mlp.gate_up.forward(&h)?, half)?,
        };
        l.mlp.down.forward(&gated)
    }

    fn post_attn(&self, layer: usize, attn: Tensor) -> Result<Tensor> {
        self.maybe_norm(attn, self.layers[layer].attn_post_norm.as_ref())
    }

    fn post_mlp(&self, layer: usize, mlp: Tensor) -> Result<Tensor> {
        self.maybe_norm(mlp, self.layers[layer].mlp_post_norm.as_ref())
    }

    fn head(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.rms_norm(xs, &self.norm)?;
        let logits = self.lm_head.forward(&h)?.to_dtype(DType::F32)?;
        match self.cfg.final_softcap {
            Some(cap) => softcap(&logits, cap),
            None => Ok(logits),
        }
    }
}
