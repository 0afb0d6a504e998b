//! GGUF files (llama.cpp's format): the configuration from the metadata, and the tensors,
//! dequantized to f32 and renamed and re-laid-out to what the Hugging Face checkpoint of the
//! same model holds, so the model code reads one naming scheme.
//!
//! Two layout differences are undone, as transformers' GGUF loader does:
//! - llama.cpp's converter permutes the rows of Llama's `q_proj`/`k_proj` so that its RoPE can
//!   rotate interleaved pairs; the inverse permutation restores transformers' halves layout.
//! - GPT-2's `Conv1D` weights are stored transposed (`(out, in)` like `Linear`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::models::rope::RopeScaling;
use crate::models::{ModelConfig, SUPPORTED, gpt2, llama};
use crate::weights::{TensorSource, innermost};

/// An open GGUF file: its metadata and a handle to read tensors.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    file: Mutex<File>,
}

impl GgufFile {
    /// Reads the header and metadata; a truncated or corrupt file is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file =
            File::open(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        let content = Content::read(&mut file).map_err(|e| Error::CorruptFile {
            path: path.to_path_buf(),
            format: "GGUF",
            message: innermost(&e),
        })?;
        Ok(Self { path: path.to_path_buf(), content, file: Mutex::new(file) })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error::Config {
            source_name: self.path.display().to_string(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// A metadata value, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A required integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    /// An optional integer.
    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        let Some(value) = self.get(key) else { return Ok(None) };
        let n = match value {
            Value::U8(v) => Some(u64::from(*v)),
            Value::U16(v) => Some(u64::from(*v)),
            Value::U32(v) => Some(u64::from(*v)),
            Value::U64(v) => Some(*v),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        };
        let n = n
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(key, "not a non-negative integer"))?;
        Ok(Some(n))
    }

    /// An optional float.
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(f64::from(*v))),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(_) => Err(self.err(key, "not a float")),
        }
    }

    /// An optional string.
    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.err(key, "not a string")),
        }
    }

    /// An optional boolean.
    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.err(key, "not a boolean")),
        }
    }

    /// A required array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            None => Err(self.err(key, "missing")),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(self.err(key, "an element is not a string")),
                })
                .collect(),
            Some(_) => Err(self.err(key, "not an array")),
        }
    }

    /// An optional array of integers.
    pub fn ints_opt(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(i64::from(*x)),
                    Value::U32(x) => Ok(i64::from(*x)),
                    Value::I8(x) => Ok(i64::from(*x)),
                    Value::U8(x) => Ok(i64::from(*x)),
                    Value::I64(x) => Ok(*x),
                    _ => Err(self.err(key, "an element is not an integer")),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.err(key, "not an array")),
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.str_opt("general.architecture")?
            .ok_or_else(|| self.err("general.architecture", "missing"))
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads and dequantizes a tensor by its GGUF name, on the CPU so that the values are the
    /// same whatever device the model runs on.
    fn read_f32(&self, name: &str) -> Result<Option<Tensor>> {
        if !self.has_tensor(name) {
            return Ok(None);
        }
        let mut file =
            self.file.lock().map_err(|_| self.err(name, "file handle poisoned by a panic"))?;
        let corrupt = |e: candle_core::Error| Error::CorruptFile {
            path: self.path.clone(),
            format: "GGUF",
            message: format!("tensor `{name}`: {}", innermost(&e)),
        };
        let q = self.content.tensor(&mut *file, name, &Device::Cpu).map_err(corrupt)?;
        Ok(Some(q.dequantize(&Device::Cpu).map_err(corrupt)?))
    }

    /// The model configuration the metadata describes.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        match arch.as_str() {
            "llama" | "qwen2" | "gemma3" => {
                let hidden = self.usize(&key("embedding_length"))?;
                let n_heads = self.usize(&key("attention.head_count"))?;
                if n_heads == 0 {
                    return Err(self.err(&key("attention.head_count"), "must be positive"));
                }
                let n_kv_heads =
                    self.usize_opt(&key("attention.head_count_kv"))?.unwrap_or(n_heads);
                let head_dim =
                    self.usize_opt(&key("attention.key_length"))?.unwrap_or(hidden / n_heads);
                let vocab_size = match self.usize_opt(&key("vocab_size"))? {
                    Some(v) => v,
                    None => self.strings("tokenizer.ggml.tokens")?.len(),
                };
                let rope_scaling = self.rope_scaling(&arch, head_dim)?;
                let gemma3 = arch == "gemma3";
                let n_layers = self.usize(&key("block_count"))?;
                // Gemma 3: five sliding-window layers, then a global one (llama.cpp's and
                // transformers' default when the file does not say).
                let layer_types =
                    gemma3.then(|| {
                        (0..n_layers)
                            .map(|i| {
                                if (i + 1) % 6 == 0 {
                                    "full_attention"
                                } else {
                                    "sliding_attention"
                                }
                            })
                            .map(String::from)
                            .collect()
                    });
                let raw = llama::RawConfig {
                    model_type: Some(if gemma3 { "gemma3_text".into() } else { arch.clone() }),
                    hidden_size: hidden,
                    intermediate_size: self.usize(&key("feed_forward_length"))?,
                    num_hidden_layers: n_layers,
                    num_attention_heads: n_heads,
                    num_key_value_heads: Some(n_kv_heads),
                    head_dim: Some(head_dim),
                    vocab_size,
                    rms_norm_eps: self
                        .f64_opt(&key("attention.layer_norm_rms_epsilon"))?
                        .unwrap_or(1e-5),
                    rope_theta: Some(self.f64_opt(&key("rope.freq_base"))?.unwrap_or(10000.0)),
                    rope_scaling: None,
                    rope_parameters: None,
                    partial_rotary_factor: None,
                    original_max_position_embeddings: None,
                    rope_local_base_freq: gemma3.then_some(10000.0),
                    max_position_embeddings: self
                        .usize_opt(&key("context_length"))?
                        .unwrap_or(2048),
                    tie_word_embeddings: Some(!self.has_tensor("output.weight")),
                    attention_bias: false,
                    mlp_bias: false,
                    hidden_act: None,
                    hidden_activation: None,
                    sliding_window: self.usize_opt(&key("attention.sliding_window"))?,
                    use_sliding_window: None,
                    max_window_layers: None,
                    sliding_window_pattern: None,
                    layer_types,
                    // transformers' GGUF loader: Gemma 3 scales queries by head_dim^-1/2.
                    query_pre_attn_scalar: gemma3.then_some(head_dim as f64),
                    attn_logit_softcapping: None,
                    final_logit_softcapping: None,
                };
                let mut cfg = raw.into_config(&self.path.display().to_string())?;
                cfg.rope_scaling = rope_scaling;
                cfg.qkv_bias = self.has_tensor("blk.0.attn_q.bias");
                cfg.o_bias = self.has_tensor("blk.0.attn_output.bias");
                Ok(ModelConfig::Llama(cfg))
            }
            "gpt2" => {
                let n_embd = self.usize(&key("embedding_length"))?;
                let raw = gpt2::RawConfig {
                    vocab_size: self.strings("tokenizer.ggml.tokens")?.len(),
                    n_positions: self.usize(&key("context_length"))?,
                    n_embd,
                    n_layer: self.usize(&key("block_count"))?,
                    n_head: self.usize(&key("attention.head_count"))?,
                    n_inner: self.usize_opt(&key("feed_forward_length"))?,
                    activation_function: "gelu_new".into(),
                    layer_norm_epsilon: self
                        .f64_opt(&key("attention.layer_norm_epsilon"))?
                        .unwrap_or(1e-5),
                    scale_attn_weights: true,
                    scale_attn_by_inverse_layer_idx: false,
                };
                Ok(ModelConfig::Gpt2(raw.into_config(&self.path.display().to_string())?))
            }
            _ => Err(Error::UnknownArchitecture {
                source_name: self.path.display().to_string(),
                name: arch,
                supported: SUPPORTED,
            }),
        }
    }

    /// RoPE scaling: llama.cpp keeps Llama 3.1's per-frequency divisors as a tensor
    /// (`rope_freqs.weight`) and linear scaling in the metadata.
    fn rope_scaling(&self, arch: &str, head_dim: usize) -> Result<RopeScaling> {
        if let Some(factors) = self.read_f32("rope_freqs.weight")? {
            let factors = factors.flatten_all()?.to_vec1::<f32>()?;
            if factors.len() != head_dim / 2 {
                return Err(self.err(
                    "rope_freqs.weight",
                    format!("{} factors, expected {}", factors.len(), head_dim / 2),
                ));
            }
            return Ok(RopeScaling::Factors(factors));
        }
        let kind_key = format!("{arch}.rope.scaling.type");
        match self.str_opt(&kind_key)? {
            None | Some("none") => Ok(RopeScaling::Default),
            Some("linear") => {
                let factor_key = format!("{arch}.rope.scaling.factor");
                let factor =
                    self.f64_opt(&factor_key)?.ok_or_else(|| self.err(&factor_key, "missing"))?;
                Ok(RopeScaling::Linear { factor: factor as f32 })
            }
            Some(other) => {
                Err(self.err(&kind_key, format!("{other:?} is not implemented (none, linear)")))
            }
        }
    }
}

/// How a GGUF tensor differs from its Hugging Face counterpart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relayout {
    /// Same layout.
    Same,
    /// Rows permuted for interleaved RoPE, with this many heads.
    RopeRows(usize),
    /// Transposed (GPT-2 `Conv1D`).
    Transpose,
    /// Minus one (Gemma's norm weights, which llama.cpp stores as `1 + w`).
    MinusOne,
}

/// A GGUF file as a source of Hugging Face-named tensors.
pub(crate) struct GgufSource {
    file: GgufFile,
    arch: String,
    n_heads: usize,
    n_kv_heads: usize,
}

impl GgufSource {
    pub(crate) fn new(file: GgufFile, cfg: &ModelConfig) -> Result<Self> {
        let arch = file.architecture()?.to_string();
        // The head counts only steer llama.cpp's q/k permutation, which is Llama's alone.
        let (n_heads, n_kv_heads) = match cfg {
            ModelConfig::Llama(c) => (c.n_heads, c.n_kv_heads),
            _ => (0, 0),
        };
        Ok(Self { file, arch, n_heads, n_kv_heads })
    }

    /// The GGUF name of a Hugging Face tensor, and how its layout differs.
    fn translate(&self, hf: &str) -> Option<(String, Relayout)> {
        match self.arch.as_str() {
            "gpt2" => gpt2_name(hf),
            // llama.cpp permutes q/k for its "llama" architecture only; Qwen2 uses NeoX RoPE
            // there and is stored as is.
            "llama" => llama_name(hf, Some((self.n_heads, self.n_kv_heads)), false),
            // llama.cpp's converter adds 1 to Gemma's norm weights, which transformers'
            // checkpoint holds zero-centred: subtract it again.
            "gemma3" => llama_name(hf, None, true).map(|(name, relayout)| {
                if name.ends_with("norm.weight") {
                    (name, Relayout::MinusOne)
                } else {
                    (name, relayout)
                }
            }),
            _ => llama_name(hf, None, false),
        }
    }
}

fn llama_name(
    hf: &str,
    permute: Option<(usize, usize)>,
    sandwich: bool,
) -> Option<(String, Relayout)> {
    let same = |s: &str| Some((s.to_string(), Relayout::Same));
    match hf {
        "model.embed_tokens.weight" => return same("token_embd.weight"),
        "model.norm.weight" => return same("output_norm.weight"),
        "lm_head.weight" => return same("output.weight"),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let (part, suffix) = name.rsplit_once('.')?;
    let gguf = match part {
        "input_layernorm" => "attn_norm",
        // Gemma's sandwich norms (llama.cpp's names for gemma2/gemma3).
        "post_attention_layernorm" if sandwich => "post_attention_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    let relayout = match (gguf, permute) {
        ("attn_q", Some((n_heads, _))) => Relayout::RopeRows(n_heads),
        ("attn_k", Some((_, n_kv_heads))) => Relayout::RopeRows(n_kv_heads),
        _ => Relayout::Same,
    };
    Some((format!("blk.{layer}.{gguf}.{suffix}"), relayout))
}

fn gpt2_name(hf: &str) -> Option<(String, Relayout)> {
    let hf = hf.strip_prefix("transformer.").unwrap_or(hf);
    let same = |s: &str| Some((s.to_string(), Relayout::Same));
    match hf {
        "wte.weight" => return same("token_embd.weight"),
        "wpe.weight" => return same("position_embd.weight"),
        "ln_f.weight" => return same("output_norm.weight"),
        "ln_f.bias" => return same("output_norm.bias"),
        _ => {}
    }
    let rest = hf.strip_prefix("h.")?;
    let (layer, name) = rest.split_once('.')?;
    let (part, suffix) = name.rsplit_once('.')?;
    let (gguf, conv1d) = match part {
        "ln_1" => ("attn_norm", false),
        "ln_2" => ("ffn_norm", false),
        "attn.c_attn" => ("attn_qkv", true),
        "attn.c_proj" => ("attn_output", true),
        "mlp.c_fc" => ("ffn_up", true),
        "mlp.c_proj" => ("ffn_down", true),
        _ => return None,
    };
    let relayout = if conv1d && suffix == "weight" { Relayout::Transpose } else { Relayout::Same };
    Some((format!("blk.{layer}.{gguf}.{suffix}"), relayout))
}

/// Undoes llama.cpp's `permute`: `(n_head, 2, d/2, …)` back from `(n_head, d/2, 2, …)`, as
/// transformers' `_reverse_permute_weights` does.
fn unpermute_rope_rows(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let half = rows / n_head / 2;
    let mut split = vec![n_head, half, 2];
    split.extend_from_slice(&dims[1..]);
    Ok(t.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

impl TensorSource for GgufSource {
    fn source_name(&self) -> String {
        self.file.path.display().to_string()
    }

    fn contains(&self, name: &str) -> bool {
        self.translate(name).is_some_and(|(g, _)| self.file.has_tensor(&g))
    }

    fn load(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some((gguf, relayout)) = self.translate(name) else { return Ok(None) };
        let Some(t) = self.file.read_f32(&gguf)? else { return Ok(None) };
        let t = match relayout {
            Relayout::Same => t,
            Relayout::Transpose => t.t()?.contiguous()?,
            Relayout::MinusOne => (t - 1.0)?,
            Relayout::RopeRows(n_head) => {
                if n_head == 0 || t.dims()[0] % (2 * n_head) != 0 {
                    return Err(Error::ShapeMismatch {
                        source_name: self.source_name(),
                        tensor: gguf,
                        expected: vec![2 * n_head],
                        actual: t.dims().to_vec(),
                    });
                }
                unpermute_rope_rows(&t, n_head)?
            }
        };
        Ok(Some(t.to_device(device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        let check = |hf: &str, gguf: &str, relayout: Relayout| {
            assert_eq!(
                llama_name(hf, Some((9, 3)), false),
                Some((gguf.to_string(), relayout)),
                "{hf}"
            );
        };
        check("model.embed_tokens.weight", "token_embd.weight", Relayout::Same);
        check(
            "model.layers.7.self_attn.q_proj.weight",
            "blk.7.attn_q.weight",
            Relayout::RopeRows(9),
        );
        check(
            "model.layers.7.self_attn.k_proj.weight",
            "blk.7.attn_k.weight",
            Relayout::RopeRows(3),
        );
        check("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", Relayout::Same);
        assert_eq!(
            llama_name("model.layers.0.self_attn.q_proj.weight", None, false).map(|x| x.1),
            Some(Relayout::Same)
        );
        assert_eq!(
            gpt2_name("h.3.attn.c_attn.weight"),
            Some(("blk.3.attn_qkv.weight".into(), Relayout::Transpose))
        );
        assert_eq!(
            gpt2_name("transformer.h.3.attn.c_attn.bias"),
            Some(("blk.3.attn_qkv.bias".into(), Relayout::Same))
        );
        assert_eq!(gpt2_name("h.0.attn.bias"), None);
    }

    /// llama.cpp's `permute` followed by ours is the identity.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        let (n_head, head_dim, cols) = (3, 4, 2);
        let w = Tensor::arange(0f32, (n_head * head_dim * cols) as f32, &Device::Cpu)?
            .reshape((n_head * head_dim, cols))?;
        // convert_hf_to_gguf.py: w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(shape)
        let permuted = w
            .reshape((n_head, 2, head_dim / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n_head * head_dim, cols))?;
        assert_ne!(permuted.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        assert_eq!(unpermute_rope_rows(&permuted, n_head)?.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }
}
