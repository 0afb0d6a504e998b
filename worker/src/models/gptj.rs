//! GPT-J (EleutherAI's GPT-J-6B, and the models trained with its code).
//!
//! Wang and Komatsuzaki, "GPT-J-6B: A 6 Billion Parameter Autoregressive Language Model"
//! (2021); reference implementation: transformers' `models/gptj/modeling_gptj.py`. A parallel
//! block (one `ln_1` feeds both attention and MLP, and both add to the block's input), q/k/v
//! projections without biases, rotary positions on the first `rotary_dim` features of each
//! head with interleaved pairs (`rotate_every_two`) and a fixed base of 10000, a GELU MLP,
//! and an untied LM head with a bias.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::gpt2::Activation;
use super::nn::{
    ACTIVATIONS, LayerNorm, Linear, TokenTable, activate, activation, causal_attention, embed,
    extend_kv, merge_heads, split_qkv,
};
use super::rope::{Rope, RopeScaling};
use crate::error::{Error, Result};
use crate::forward::{Decoder, Dims, LayerKv, Residual};
use crate::weights::Weights;

/// `config.json` of a GPT-J model, with transformers' field names (and the generic names its
/// `attribute_map` accepts) and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    /// Vocabulary size.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Trained context length (the sin/cos table's length in transformers).
    #[serde(default = "default_positions", alias = "max_position_embeddings")]
    pub n_positions: usize,
    /// Width of the residual stream.
    #[serde(default = "default_embd", alias = "hidden_size")]
    pub n_embd: usize,
    /// Number of blocks.
    #[serde(default = "default_layers", alias = "num_hidden_layers")]
    pub n_layer: usize,
    /// Attention heads.
    #[serde(default = "default_heads", alias = "num_attention_heads")]
    pub n_head: usize,
    /// Rotated features per head; `null` rotates `n_embd` features (one head only).
    #[serde(default = "default_rotary_dim")]
    pub rotary_dim: Option<usize>,
    /// MLP width; `None` means `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// The MLP's activation (`gelu_new` for GPT-J-6B).
    #[serde(default = "default_act")]
    pub activation_function: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Whether the LM head's weight is the embedding matrix (its bias stays its own).
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_vocab() -> usize {
    50400
}
fn default_positions() -> usize {
    2048
}
fn default_embd() -> usize {
    4096
}
fn default_layers() -> usize {
    28
}
fn default_heads() -> usize {
    16
}
fn default_rotary_dim() -> Option<usize> {
    Some(64)
}
fn default_act() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}

/// GPT-J's RoPE base: fixed in `create_sinusoidal_positions`, not read from the config.
const ROPE_THETA: f32 = 10000.0;

/// A resolved GPT-J configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Trained context length.
    pub n_positions: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Per-head width, `n_embd / n_head`.
    pub head_dim: usize,
    /// Rotated features per head (even, at most `head_dim`).
    pub rotary_dim: usize,
    /// MLP width.
    pub n_inner: usize,
    /// The MLP's activation.
    pub activation: Activation,
    /// LayerNorm epsilon, in f32 as the kernel applies it.
    pub layer_norm_epsilon: f32,
    /// Whether the LM head's weight is the embedding matrix.
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
        let activation = activation(&self.activation_function).ok_or_else(|| {
            err(
                "activation_function",
                format!("{:?} is not implemented ({ACTIVATIONS})", self.activation_function),
            )
        })?;
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(err(
                "n_head",
                format!("{} heads do not divide n_embd {}", self.n_head, self.n_embd),
            ));
        }
        let head_dim = self.n_embd / self.n_head;
        // transformers builds the table over `rotary_dim or n_embd` features and applies it to
        // each head: without rotary_dim that only fits a single head.
        let rotary_dim = self.rotary_dim.unwrap_or(self.n_embd);
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(err(
                "rotary_dim",
                format!(
                    "{rotary_dim} is not a positive even width within a head of {head_dim}{}",
                    if self.rotary_dim.is_none() { " (null means n_embd)" } else { "" }
                ),
            ));
        }
        Ok(Config {
            vocab_size: self.vocab_size,
            n_positions: self.n_positions,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            head_dim,
            rotary_dim,
            n_inner: self.n_inner.unwrap_or(4 * self.n_embd),
            activation,
            layer_norm_epsilon: self.layer_norm_epsilon as f32,
            tie_word_embeddings: self.tie_word_embeddings,
        })
    }
}

struct Block {
    ln_1: LayerNorm,
    /// q, k and v stacked into one matmul at load time.
    qkv: Linear,
    out_proj: Linear,
    fc_in: Linear,
    fc_out: Linear,
    span: tracing::Span,
}

/// GPT-J with its LM head.
pub struct GptJ {
    cfg: Config,
    dims: Dims,
    wte: TokenTable,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    rope: Rope,
}

fn linear(w: &Weights, prefix: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
    let weight = w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
    let bias = if bias { Some(w.get(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
    Linear::from_out_in(weight, bias, prefix)
}

impl GptJ {
    /// Builds the model from Hugging Face-named weights (with or without the `transformer.`
    /// prefix of `GPTJForCausalLM` checkpoints).
    pub(crate) fn new(cfg: Config, w: &Weights) -> Result<Self> {
        let p = if w.contains("transformer.wte.weight") { "transformer." } else { "" };
        let (d, eps) = (cfg.n_embd, cfg.layer_norm_epsilon);
        let wte = w.get(&format!("{p}wte.weight"), &[cfg.vocab_size, d])?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let b = format!("{p}h.{i}");
            let proj = |name: &str| w.get(&format!("{b}.attn.{name}.weight"), &[d, d]);
            let qkv = Tensor::cat(&[proj("q_proj")?, proj("k_proj")?, proj("v_proj")?], 0)?;
            blocks.push(Block {
                ln_1: LayerNorm::load(w, &format!("{b}.ln_1"), d, eps)?,
                qkv: Linear::from_out_in(qkv, None, &format!("{b}.attn.qkv"))?,
                out_proj: linear(w, &format!("{b}.attn.out_proj"), d, d, false)?,
                fc_in: linear(w, &format!("{b}.mlp.fc_in"), cfg.n_inner, d, true)?,
                fc_out: linear(w, &format!("{b}.mlp.fc_out"), d, cfg.n_inner, true)?,
                span: tracing::trace_span!("layer", layer_idx = i),
            });
        }
        let ln_f = LayerNorm::load(w, &format!("{p}ln_f"), d, eps)?;
        let head_bias = w.get("lm_head.bias", &[cfg.vocab_size])?;
        let dtype = wte.dtype();
        let (wte, lm_head) = if cfg.tie_word_embeddings || !w.contains("lm_head.weight") {
            Linear::tied(wte, Some(head_bias), "lm_head")?
        } else {
            let weight = w.get("lm_head.weight", &[cfg.vocab_size, d])?;
            (wte.into(), Linear::from_out_in(weight, Some(head_bias), "lm_head")?)
        };
        let rope = Rope::new(
            cfg.rotary_dim,
            ROPE_THETA,
            &RopeScaling::Default,
            cfg.n_positions,
            dtype,
            w.device(),
        )?
        .interleaved();
        let dims = Dims {
            n_layers: cfg.n_layer,
            d_model: d,
            n_heads: cfg.n_head,
            head_dim: cfg.head_dim,
            vocab_size: cfg.vocab_size,
            max_positions: cfg.n_positions,
        };
        Ok(Self { cfg, dims, wte, blocks, ln_f, lm_head, rope })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

impl Decoder for GptJ {
    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        embed(&self.wte, ids)
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
        let (n_head, head_dim) = (self.cfg.n_head, self.cfg.head_dim);
        // `ln_1` also feeds the MLP; computing it twice costs O(d) per token and keeps the
        // sublayers independent, as the intervention sites need.
        let qkv = b.qkv.forward(&b.ln_1.forward(xs)?)?;
        let (q, k, v) = split_qkv(&qkv, n_head, head_dim)?;
        let q = self.rope.apply(&q, pos0)?;
        let k = self.rope.apply(&k, pos0)?;
        let kv = extend_kv(past, k, v)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        // transformers' GPT-J upcasts queries and keys to f32 before the scores (the values
        // stay in the model's dtype); a no-op for f32 weights.
        let out = if q.dtype() == DType::F32 {
            causal_attention(&q, &kv, pos0, scale, None)?
        } else {
            let kv32 = LayerKv { k: kv.k.to_dtype(DType::F32)?, v: kv.v.clone() };
            causal_attention(&q.to_dtype(DType::F32)?, &kv32, pos0, scale, None)?
        };
        Ok((merge_heads(&out)?, kv))
    }

    fn attn_out(&self, layer: usize, heads: &Tensor) -> Result<Tensor> {
        let b = &self.blocks[layer];
        let _enter = b.span.enter();
        b.out_proj.forward(heads)
    }

    fn mlp(&self, layer: usize, xs: &Tensor) -> Result<Tensor> {
        let b = &self.blocks[layer];
        let _enter = b.span.enter();
        let h = b.fc_in.forward(&b.ln_1.forward(xs)?)?;
        b.fc_out.forward(&activate(&h, self.cfg.activation)?)
    }

    fn residual(&self, _layer: usize) -> Residual {
        Residual::Parallel
    }

    fn head(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.ln_f.forward(xs)?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config> {
        let raw: RawConfig = serde_json::from_str(json).expect("json");
        raw.into_config("config.json")
    }

    #[test]
    fn defaults_are_gpt_j_6b() -> Result<()> {
        let cfg = parse("{}")?;
        assert_eq!((cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.rotary_dim), (4096, 16, 256, 64));
        assert_eq!((cfg.n_inner, cfg.activation), (16384, Activation::GeluTanh));
        Ok(())
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (r#"{"n_embd": 64, "n_head": 4, "rotary_dim": 32}"#, "rotary_dim"),
            (r#"{"n_embd": 64, "n_head": 4, "rotary_dim": null}"#, "rotary_dim"),
            (r#"{"n_embd": 64, "n_head": 4, "rotary_dim": 5}"#, "rotary_dim"),
            (r#"{"n_embd": 64, "n_head": 5}"#, "n_head"),
            (r#"{"activation_function": "swish"}"#, "activation_function"),
        ];
        for (json, want) in cases {
            match parse(json) {
                Err(Error::Config { field, .. }) => assert_eq!(field, want, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
    }
}
