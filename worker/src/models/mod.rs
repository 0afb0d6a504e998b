//! The model families, one file each, behind one [`Model`] type.

pub(crate) mod attention;
pub(crate) mod copies;
pub mod gpt2;
pub mod gptj;
pub mod llama;
pub mod llama_config;
pub mod matmul;
pub mod neox;
pub(crate) mod nn;
pub(crate) mod ops;
pub mod packed;
pub(crate) mod packed_kernels;
pub(crate) mod residual;
pub mod rope;
pub mod rope_config;
pub(crate) mod rotate;

use crate::error::{Error, Result};
use candle_core::Tensor;

use crate::forward::{self, Decoder, Dims, ForwardOutput, ForwardRequest, LayerKv};
use crate::intervene::Interventions;
use crate::weights::Weights;

/// The architectures the engine implements, as config.json's `model_type` names them.
pub const SUPPORTED: &str =
    "gpt2, llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, olmo2, gptj, gpt_neox";

/// A family's resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// GPT-2.
    Gpt2(gpt2::Config),
    /// Llama, SmolLM2, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2.
    Llama(llama::Config),
    /// GPT-J.
    GptJ(gptj::Config),
    /// GPT-NeoX, Pythia.
    GptNeoX(neox::Config),
}

impl ModelConfig {
    /// The family's `model_type`.
    pub fn family(&self) -> &str {
        match self {
            Self::Gpt2(_) => "gpt2",
            Self::Llama(c) => &c.model_type,
            Self::GptJ(_) => "gptj",
            Self::GptNeoX(_) => "gpt_neox",
        }
    }

    /// Reads a Hugging Face `config.json`; `source` names it in errors.
    pub fn from_hf_json(text: &str, source: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            Error::CorruptFile { path: source.into(), format: "JSON", message: e.to_string() }
        })?;
        let model_type =
            value.get("model_type").and_then(|v| v.as_str()).unwrap_or_default().to_string();
        match model_type.as_str() {
            "gpt2" => {
                Ok(Self::Gpt2(deserialize::<gpt2::RawConfig>(value, source)?.into_config(source)?))
            }
            t if llama::MODEL_TYPES.contains(&t) => Ok(Self::Llama(
                deserialize::<llama::RawConfig>(value, source)?.into_config(source)?,
            )),
            "gptj" => {
                Ok(Self::GptJ(deserialize::<gptj::RawConfig>(value, source)?.into_config(source)?))
            }
            "gpt_neox" => Ok(Self::GptNeoX(
                deserialize::<neox::RawConfig>(value, source)?.into_config(source)?,
            )),
            _ => Err(Error::UnknownArchitecture {
                source_name: source.to_string(),
                name: model_type,
                supported: SUPPORTED,
            }),
        }
    }
}

/// Deserializes a config, naming the field that is missing or has the wrong type.
fn deserialize<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    source: &str,
) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // A missing field is reported at its parent ("."), with the name only in the message.
        let field = match path.as_str() {
            "." => inner.to_string().split('`').nth(1).unwrap_or("?").to_string(),
            _ => path,
        };
        Error::Config { source_name: source.to_string(), field, message: inner.to_string() }
    })
}

/// A loaded transformer with intervention points: a family's [`Decoder`] behind the one
/// forward pass of [`crate::forward`].
pub struct Model {
    decoder: Box<dyn Decoder + Send + Sync>,
    config: ModelConfig,
    device: candle_core::Device,
}

impl Model {
    /// Builds the model of `cfg` from `weights`. The only place that names each family's
    /// model type; everything else reaches it through [`Decoder`].
    pub(crate) fn new(cfg: ModelConfig, weights: &Weights) -> Result<Self> {
        let decoder: Box<dyn Decoder + Send + Sync> = match cfg.clone() {
            ModelConfig::Gpt2(c) => Box::new(gpt2::Gpt2::new(c, weights)?),
            ModelConfig::Llama(c) => Box::new(llama::Llama::new(c, weights)?),
            ModelConfig::GptJ(c) => Box::new(gptj::GptJ::new(c, weights)?),
            ModelConfig::GptNeoX(c) => Box::new(neox::GptNeoX::new(c, weights)?),
        };
        Ok(Self { decoder, config: cfg, device: weights.device().clone() })
    }

    fn decoder(&self) -> &dyn Decoder {
        self.decoder.as_ref()
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The model's sizes.
    pub fn dims(&self) -> &Dims {
        self.decoder().dims()
    }

    /// Runs one forward pass; see [`crate::forward`].
    pub fn forward(&self, req: &ForwardRequest<'_>) -> Result<ForwardOutput> {
        forward::run(self.decoder(), req)
    }

    /// One block on the residual stream `xs` `(b, t, d)` whose first token is at `pos0`,
    /// attending to `past` (keys/values of tokens `< pos0`), with the patches and row copies of
    /// `iv` at this layer's sites. For callers that drive layers themselves, such as tracing's
    /// fast path, where rows join a batch at different layers. Captures belong in [`Model::forward`].
    pub fn run_layer(
        &self,
        layer: usize,
        xs: Tensor,
        pos0: usize,
        past: Option<&LayerKv>,
        iv: &Interventions,
    ) -> Result<(Tensor, LayerKv)> {
        if layer >= self.dims().n_layers {
            return Err(Error::Request(format!(
                "layer {layer} is beyond the model's {} layers",
                self.dims().n_layers
            )));
        }
        if !iv.captures.is_empty() || !iv.embed.is_empty() {
            return Err(Error::Request("run_layer takes patches and row copies only".into()));
        }
        if let Some(kv) = past.filter(|kv| kv.len() != pos0) {
            return Err(Error::Request(format!("past holds {} tokens, expected {pos0}", kv.len())));
        }
        forward::layer_step(self.decoder(), layer, xs, pos0, past, iv, &mut [])
    }

    /// Logits `(b, vocab)` at the last position of the final residual stream `xs` `(b, t, d)`.
    pub fn last_position_logits(&self, xs: &Tensor) -> Result<Tensor> {
        forward::last_position_logits(self.decoder(), xs)
    }

    /// The device the weights are on.
    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// The family's `model_type` (the Llama-style decoder's own, e.g. `gemma3_text`).
    pub fn family(&self) -> &str {
        self.config.family()
    }
}
