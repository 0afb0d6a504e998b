//! The configuration of the Llama-style decoders (`super::llama`): which of the family's
//! variations a `config.json` asks for, resolved once so the model code reads plain fields.
//!
//! One decoder serves Llama 2/3, SmolLM2, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3 and OLMo 2:
//! they share RMSNorm, rotary positions, grouped-query attention and a gated MLP, and differ
//! in where the norms sit ([`NormPlacement`]), how norm weights apply (Gemma's `1 + w`), q/k
//! norms ([`QkNorm`]), the gate's activation, Gemma's embedding scale, query scale and
//! soft-capping, per-layer sliding windows and RoPE bases.

use serde::Deserialize;

use super::rope::{RopeConfig, RopeFields, RopeScaling, rope_from_config};
use crate::error::{Error, Result};

/// The `model_type` values this decoder reads.
pub const MODEL_TYPES: &[&str] =
    &["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2"];

/// `config.json` of a Llama-style model, with transformers' field names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    /// One of [`MODEL_TYPES`].
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
    /// transformers 5's RoPE description (`rope_type`, `rope_theta`, scaling factors), for
    /// Gemma 3 one per layer type (`full_attention`, `sliding_attention`).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Fraction of each head that is rotated (Phi-3 family; transformers 5 may keep it in
    /// `rope_parameters`).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// Phi-3's pre-training length for LongRoPE, outside `rope_scaling` (it wins there).
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// Gemma 3 in transformers 4: the RoPE base of the sliding-window layers.
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    /// Trained context length.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Whether the LM head is the embedding matrix (Gemma's default is tied).
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Biases on q/k/v/o (Llama); Qwen2 always has q/k/v biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Activation of the gate (Llama's name).
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Activation of the gate (Gemma's name, which wins when both are present).
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// Mistral / Qwen2 / Gemma sliding attention window.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2/3: whether the window is used at all.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Qwen2/3: layers from this index on use the window.
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// Gemma 3 in transformers 4: every `n`-th layer is global, the others slide.
    #[serde(default, alias = "_sliding_window_pattern")]
    pub sliding_window_pattern: Option<usize>,
    /// transformers 5: `full_attention` or `sliding_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 2/3: queries are scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim`'s.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2: attention scores become `c · tanh(s / c)`.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: logits become `c · tanh(z / c)`.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}

/// Where a block's norms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// Before each sublayer (Llama): `input_layernorm`, `post_attention_layernorm`.
    Pre,
    /// Before and after each sublayer (Gemma 2/3): `input_layernorm`,
    /// `post_attention_layernorm`, `pre_feedforward_layernorm`, `post_feedforward_layernorm`.
    Sandwich,
    /// After each sublayer only (OLMo 2): `post_attention_layernorm`,
    /// `post_feedforward_layernorm`.
    Post,
}

/// Norms on the queries and keys before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// None (Llama, Mistral, Qwen2, Gemma 1/2, Phi-3).
    None,
    /// RMSNorm over each head's `head_dim` (Qwen3, Gemma 3).
    PerHead,
    /// RMSNorm over all heads' projection at once (OLMo 2).
    Whole,
}

/// The gate's activation in the gated MLP `act(gate) · up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateActivation {
    /// SwiGLU.
    Silu,
    /// GeGLU with the tanh approximation (`gelu_pytorch_tanh`, Gemma).
    GeluTanh,
}

/// A resolved Llama-style configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The `model_type` it was read as.
    pub model_type: String,
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
    /// RoPE base (of the global layers where they differ).
    pub rope_theta: f32,
    /// RoPE scaling (of the global layers where they differ).
    pub rope_scaling: RopeScaling,
    /// The rotated width of each head (`head_dim` unless `partial_rotary_factor` says less).
    pub rotary_dim: usize,
    /// Gemma 3: the RoPE base and scaling of the sliding-window layers.
    pub local_rope: Option<(f32, RopeScaling)>,
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
    /// Where the norms sit.
    pub norms: NormPlacement,
    /// Gemma: norm weights are stored zero-centred and applied as `1 + w`.
    pub norm_plus_one: bool,
    /// Norms on queries and keys.
    pub qk_norm: QkNorm,
    /// The gate's activation.
    pub activation: GateActivation,
    /// Gemma: embeddings are multiplied by √hidden_size (in the model's dtype).
    pub embed_scale: Option<f32>,
    /// The factor on `q · k`.
    pub attn_scale: f64,
    /// Gemma 2's attention soft-cap.
    pub attn_softcap: Option<f64>,
    /// Gemma 2's logit soft-cap.
    pub final_softcap: Option<f64>,
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
        if !MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(err("model_type", format!("{model_type:?} is not a Llama-style model")));
        }
        let gemma = model_type.starts_with("gemma");
        let (act_field, act) = match (&self.hidden_activation, &self.hidden_act) {
            (Some(a), _) => ("hidden_activation", a.clone()),
            (None, Some(a)) => ("hidden_act", a.clone()),
            // Gemma's default is the tanh GELU (transformers ignores Gemma 1's "gelu").
            (None, None) if gemma => ("hidden_activation", "gelu_pytorch_tanh".into()),
            (None, None) => ("hidden_act", "silu".into()),
        };
        let activation = match act.as_str() {
            "silu" | "swish" => GateActivation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => GateActivation::GeluTanh,
            // transformers' Gemma 1 runs gelu_pytorch_tanh whatever hidden_act says.
            "gelu" if model_type == "gemma" => GateActivation::GeluTanh,
            other => {
                return Err(err(
                    act_field,
                    format!("{other:?} is not implemented (silu, gelu_pytorch_tanh)"),
                ));
            }
        };
        let n_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if self.num_attention_heads == 0
            || n_kv_heads == 0
            || !self.num_attention_heads.is_multiple_of(n_kv_heads)
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
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(err("head_dim", format!("{head_dim} is not a positive even number")));
        }
        let (global, local_rope) = self.ropes(&model_type, head_dim, source)?;
        let rotary_dim = global.rotary_dim(head_dim);
        if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > head_dim {
            return Err(err(
                "partial_rotary_factor",
                format!("rotates {rotary_dim} of {head_dim} dimensions: not a positive even width"),
            ));
        }
        let windows = self.layer_windows(&model_type);
        let norms = match model_type.as_str() {
            "gemma2" | "gemma3_text" => NormPlacement::Sandwich,
            "olmo2" => NormPlacement::Post,
            _ => NormPlacement::Pre,
        };
        let qk_norm = match model_type.as_str() {
            "qwen3" | "gemma3_text" => QkNorm::PerHead,
            "olmo2" => QkNorm::Whole,
            _ => QkNorm::None,
        };
        let attn_scale = match self.query_pre_attn_scalar {
            Some(s) if model_type == "gemma2" || model_type == "gemma3_text" => {
                if s <= 0.0 {
                    return Err(err("query_pre_attn_scalar", format!("{s} is not positive")));
                }
                s.powf(-0.5)
            }
            _ => (head_dim as f64).powf(-0.5),
        };
        let softcap = |field: &str, v: Option<f64>| -> Result<Option<f64>> {
            match v {
                Some(c) if c <= 0.0 => Err(err(field, format!("{c} is not positive"))),
                _ => Ok(v),
            }
        };
        Ok(Config {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            n_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps as f32,
            rope_theta: global.theta,
            // Dynamic NTK exists to run past the trained length.
            max_positions: global.scaling.max_positions(self.max_position_embeddings),
            rope_scaling: global.scaling,
            rotary_dim,
            local_rope,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias: self.attention_bias || model_type == "qwen2",
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            windows,
            norms,
            norm_plus_one: gemma,
            qk_norm,
            activation,
            // transformers: torch.tensor(hidden_size ** 0.5) (f32), cast to the weights' dtype.
            embed_scale: gemma.then(|| (self.hidden_size as f64).sqrt() as f32),
            attn_scale,
            attn_softcap: softcap("attn_logit_softcapping", self.attn_logit_softcapping)?,
            final_softcap: softcap("final_logit_softcapping", self.final_logit_softcapping)?,
            model_type,
        })
    }

    /// The RoPE of the global layers and, for Gemma 3, of the sliding ones. transformers 5
    /// nests Gemma 3's per layer type; transformers 4 has `rope_local_base_freq`.
    fn ropes(
        &self,
        model_type: &str,
        head_dim: usize,
        source: &str,
    ) -> Result<(RopeConfig, Option<(f32, RopeScaling)>)> {
        let fields = RopeFields {
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.as_ref(),
            rope_parameters: self.rope_parameters.as_ref(),
            partial_rotary_factor: self.partial_rotary_factor,
            max_position_embeddings: self.max_position_embeddings,
            original_max_position_embeddings: self.original_max_position_embeddings,
            head_dim: Some(head_dim),
        };
        let gemma3 = model_type == "gemma3_text";
        let global = rope_from_config(&fields, gemma3.then_some("full_attention"), source)?;
        if !gemma3 {
            return Ok((global, None));
        }
        let nested = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("sliding_attention"))
            .is_some_and(serde_json::Value::is_object);
        let local = if nested {
            let local = rope_from_config(&fields, Some("sliding_attention"), source)?;
            (local.theta, local.scaling)
        } else {
            (self.rope_local_base_freq.unwrap_or(10000.0) as f32, RopeScaling::Default)
        };
        Ok((global, Some(local)))
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
        let window_if = |slides: bool| if slides { self.sliding_window } else { None };
        match model_type {
            "mistral" | "phi3" => vec![self.sliding_window; n],
            "qwen2" | "qwen3" if self.use_sliding_window == Some(true) => {
                let from = self.max_window_layers.unwrap_or(28);
                (0..n).map(|i| window_if(i >= from)).collect()
            }
            // transformers 4's Gemma 2: even layers slide.
            "gemma2" => (0..n).map(|i| window_if(i % 2 == 0)).collect(),
            // transformers 4's Gemma 3: every `pattern`-th layer is global.
            "gemma3_text" => {
                let pattern = self.sliding_window_pattern.unwrap_or(6).max(1);
                (0..n).map(|i| window_if((i + 1) % pattern != 0)).collect()
            }
            _ => vec![None; n],
        }
    }
}
