//! GPT-2, the model of the ROME paper (gpt2 … gpt2-xl).
//!
//! Radford et al., "Language Models are Unsupervised Multitask Learners" (2019); reference
//! implementation: transformers' `models/gpt2/modeling_gpt2.py`. Learned position embeddings,
//! pre-norm LayerNorm blocks, a fused `c_attn` projection and `Conv1D` layers whose weights are
//! stored `(in, out)`, GELU with the tanh approximation (`gelu_new`), and an LM head tied to
//! the token embeddings.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::nn::{Linear, TokenTable, causal_attention, embed, extend_kv, merge_heads, split_qkv};
use crate::error::{Error, Result};
use crate::forward::{Decoder, Dims, LayerKv};
use crate::weights::Weights;

/// `config.json` of a GPT-2 model, with transformers' field names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    /// Vocabulary size.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Position embeddings.
    #[serde(default = "default_positions")]
    pub n_positions: usize,
    /// Width of the residual stream.
    #[serde(default = "default_embd")]
    pub n_embd: usize,
    /// Number of blocks.
    #[serde(default = "default_layers")]
    pub n_layer: usize,
    /// Attention heads.
    #[serde(default = "default_heads")]
    pub n_head: usize,
    /// MLP width; `None` means `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// `gelu_new` (the tanh approximation) for every released GPT-2.
    #[serde(default = "default_act")]
    pub activation_function: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Divide attention scores by sqrt(head_dim).
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Also divide them by the layer number (1-based).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
}

fn default_vocab() -> usize {
    50257
}
fn default_positions() -> usize {
    1024
}
fn default_embd() -> usize {
    768
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_act() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    GeluErf,
    /// `relu`.
    Relu,
}

/// A resolved GPT-2 configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Position embeddings.
    pub n_positions: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// MLP width.
    pub n_inner: usize,
    /// The MLP's activation.
    pub activation: Activation,
    /// LayerNorm epsilon, in f32 as the kernel applies it (so a GGUF's f32 copy compares
    /// equal to config.json's value).
    pub layer_norm_epsilon: f32,
    /// Divide attention scores by sqrt(head_dim).
    pub scale_attn_weights: bool,
    /// Also divide them by the layer number.
    pub scale_attn_by_inverse_layer_idx: bool,
}

impl RawConfig {
    /// Resolves defaults and checks the fields; `source` names config.json in errors.
    pub fn into_config(self, source: &str) -> Result<Config> {
        let err = |field: &str, message: String| Error::Config {
            source_name: source.to_string(),
            field: field.to_string(),
            message,
        };
        let activation = match self.activation_function.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            "relu" => Activation::Relu,
            other => {
                return Err(err("activation_function", format!("{other:?} is not implemented")));
            }
        };
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(err(
                "n_head",
                format!("{} heads do not divide n_embd {}", self.n_head, self.n_embd),
            ));
        }
        Ok(Config {
            vocab_size: self.vocab_size,
            n_positions: self.n_positions,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_inner: self.n_inner.unwrap_or(4 * self.n_embd),
            activation,
            layer_norm_epsilon: self.layer_norm_epsilon as f32,
            scale_attn_weights: self.scale_attn_weights,
            scale_attn_by_inverse_layer_idx: self.scale_attn_by_inverse_layer_idx,
        })
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_c_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_c_proj: Linear,
    span: tracing::Span,
}

/// GPT-2 with its LM head.
pub struct Gpt2 {
    cfg: Config,
    dims: Dims,
    wte: TokenTable,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
}

fn layer_norm(w: &Weights, prefix: &str, d: usize) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: w.get(&format!("{prefix}.weight"), &[d])?,
        bias: w.get(&format!("{prefix}.bias"), &[d])?,
    })
}

fn conv1d(w: &Weights, prefix: &str, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let weight = w.get(&format!("{prefix}.weight"), &[in_dim, out_dim])?;
    let bias = w.get(&format!("{prefix}.bias"), &[out_dim])?;
    Linear::from_in_out(weight, Some(bias), prefix)
}

impl Gpt2 {
    /// Builds the model from Hugging Face-named weights (with or without the `transformer.`
    /// prefix that `GPT2LMHeadModel` checkpoints carry).
    pub(crate) fn new(cfg: Config, w: &Weights) -> Result<Self> {
        let p = if w.contains("transformer.wte.weight") { "transformer." } else { "" };
        let d = cfg.n_embd;
        let wte = w.get(&format!("{p}wte.weight"), &[cfg.vocab_size, d])?;
        let wpe = w.get(&format!("{p}wpe.weight"), &[cfg.n_positions, d])?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let b = format!("{p}h.{i}");
            blocks.push(Block {
                ln_1: layer_norm(w, &format!("{b}.ln_1"), d)?,
                c_attn: conv1d(w, &format!("{b}.attn.c_attn"), d, 3 * d)?,
                attn_c_proj: conv1d(w, &format!("{b}.attn.c_proj"), d, d)?,
                ln_2: layer_norm(w, &format!("{b}.ln_2"), d)?,
                c_fc: conv1d(w, &format!("{b}.mlp.c_fc"), d, cfg.n_inner)?,
                mlp_c_proj: conv1d(w, &format!("{b}.mlp.c_proj"), cfg.n_inner, d)?,
                span: tracing::trace_span!("layer", layer_idx = i),
            });
        }
        let ln_f = layer_norm(w, &format!("{p}ln_f"), d)?;
        let (wte, lm_head) = Linear::tied(wte, None, "lm_head")?;
        let dims = Dims {
            n_layers: cfg.n_layer,
            d_model: d,
            n_heads: cfg.n_head,
            head_dim: d / cfg.n_head,
            vocab_size: cfg.vocab_size,
            max_positions: cfg.n_positions,
        };
        Ok(Self { cfg, dims, wte, wpe, blocks, ln_f, lm_head })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn layer_norm(&self, xs: &Tensor, ln: &LayerNorm) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            &xs.contiguous()?,
            &ln.weight,
            &ln.bias,
            self.cfg.layer_norm_epsilon,
        )?)
    }
}

impl Decoder for Gpt2 {
    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        embed(&self.wte, ids)
    }

    fn add_positions(&self, xs: Tensor, pos0: usize) -> Result<Tensor> {
        let (_, seq_len, _) = xs.dims3()?;
        Ok(xs.broadcast_add(&self.wpe.narrow(0, pos0, seq_len)?)?)
    }

    fn attn(
        &self,
        layer: usize,
        xs: &Tensor,
        pos0: usize,
        past: Option<&LayerKv>,
    ) -> Result<(Tensor, LayerKv)> {
        let b = &self.blocks[layer];
        let _enter = b.span.enter();
        let (d, n_head) = (self.cfg.n_embd, self.cfg.n_head);
        let head_dim = d / n_head;
        let qkv = b.c_attn.forward(&self.layer_norm(xs, &b.ln_1)?)?;
        let (q, k, v) = split_qkv(&qkv, n_head, head_dim)?;
        let kv = extend_kv(past, k, v)?;
        let mut scale =
            if self.cfg.scale_attn_weights { 1.0 / (head_dim as f64).sqrt() } else { 1.0 };
        if self.cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        let out = causal_attention(&q, &kv, pos0, scale, None)?;
        Ok((merge_heads(&out)?, kv))
    }

    fn attn_out(&self, layer: usize, heads: &Tensor) -> Result<Tensor> {
        let b = &self.blocks[layer];
        let _enter = b.span.enter();
        b.attn_c_proj.forward(heads)
    }

    fn mlp(&self, layer: usize, xs: &Tensor) -> Result<Tensor> {
        let b = &self.blocks[layer];
        let _enter = b.span.enter();
        let h = b.c_fc.forward(&self.layer_norm(xs, &b.ln_2)?)?;
        let h = match self.cfg.activation {
            Activation::GeluTanh => h.gelu()?,
            Activation::GeluErf => h.gelu_erf()?,
            Activation::Relu => h.relu()?,
        };
        b.mlp_c_proj.forward(&h)
    }

    fn head(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm(xs, &self.ln_f)?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }
}
