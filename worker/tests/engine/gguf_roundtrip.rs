//! GGUF and safetensors holding the same weights give the same logits.
//!
//! The GGUF files are written here from the tiny safetensors fixtures the way llama.cpp's
//! `convert_hf_to_gguf.py` writes them (its tensor names, its q/k row permutation for the
//! `llama` architecture, GPT-2's transposed Conv1D weights, Llama 3's RoPE factors as a
//! tensor), so the loader's inverse transformations are checked against the converter's
//! definitions rather than against themselves.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use worker::models::rope::RopeScaling;
use worker::models::{ModelConfig, llama};
use worker::{LoadOptions, Logits, load_model};

use crate::util::{fixture, ids, logits, max_abs_diff, random_rows};

/// GPT-2's byte-level alphabet in byte order (`bytes_to_unicode`): the tiny models' 256
/// tokens. Printable bytes stand for themselves, the others for U+0100 onwards.
fn byte_alphabet() -> Vec<String> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).expect("char").to_string()
        })
        .collect()
}

/// convert_hf_to_gguf.py's `LlamaModel.permute`.
fn llama_cpp_permute(w: &Tensor, n_head: usize) -> Tensor {
    let dims = w.dims().to_vec();
    let mut split = vec![n_head, 2, dims[0] / n_head / 2];
    split.extend_from_slice(&dims[1..]);
    w.reshape(split)
        .and_then(|t| t.transpose(1, 2))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape(dims))
        .expect("permute")
}

/// convert_hf_to_gguf.py's Llama 3 `rope_freqs` (computed in double precision there too).
fn llama3_rope_factors(cfg: &serde_json::Value, head_dim: usize) -> Vec<f32> {
    let p = &cfg["rope_parameters"];
    let base = p["rope_theta"].as_f64().expect("theta");
    let factor = p["factor"].as_f64().expect("factor");
    let (low, high) = (
        p["low_freq_factor"].as_f64().expect("low"),
        p["high_freq_factor"].as_f64().expect("high"),
    );
    let old = p["original_max_position_embeddings"].as_f64().expect("old");
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor as f32
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

pub fn write_gguf(hf_dir: &Path, out: &Path) {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf_dir.join("config.json")).expect("config"))
            .expect("json");
    let tensors = candle_core::safetensors::load(hf_dir.join("model.safetensors"), &Device::Cpu)
        .expect("weights");
    let model_type = cfg["model_type"].as_str().expect("model_type");
    let u = |k: &str| cfg[k].as_u64().expect(k) as u32;
    let mut meta: Vec<(String, Value)> =
        vec![("general.architecture".into(), Value::String(model_type.into()))];
    let mut gguf: HashMap<String, Tensor> = HashMap::new();
    match model_type {
        "gpt2" => {
            for (k, v) in [
                ("embedding_length", u("n_embd")),
                ("block_count", u("n_layer")),
                ("attention.head_count", u("n_head")),
                ("context_length", u("n_positions")),
                ("feed_forward_length", 4 * u("n_embd")),
            ] {
                meta.push((format!("gpt2.{k}"), Value::U32(v)));
            }
            meta.push(("gpt2.attention.layer_norm_epsilon".into(), Value::F32(1e-5)));
            for (name, t) in &tensors {
                let name = name.strip_prefix("transformer.").unwrap_or(name);
                let Some(rest) = name.strip_prefix("h.") else {
                    let g = match name {
                        "wte.weight" => "token_embd.weight",
                        "wpe.weight" => "position_embd.weight",
                        "ln_f.weight" => "output_norm.weight",
                        "ln_f.bias" => "output_norm.bias",
                        _ => continue,
                    };
                    gguf.insert(g.into(), t.clone());
                    continue;
                };
                let (layer, part) = rest.split_once('.').expect("layer");
                let (g, conv1d) = match part.rsplit_once('.').expect("suffix").0 {
                    "ln_1" => ("attn_norm", false),
                    "ln_2" => ("ffn_norm", false),
                    "attn.c_attn" => ("attn_qkv", true),
                    "attn.c_proj" => ("attn_output", true),
                    "mlp.c_fc" => ("ffn_up", true),
                    "mlp.c_proj" => ("ffn_down", true),
                    _ => continue,
                };
                let suffix = part.rsplit_once('.').expect("suffix").1;
                let t = if conv1d && suffix == "weight" {
                    t.t().and_then(|t| t.contiguous()).expect("t")
                } else {
                    t.clone()
                };
                gguf.insert(format!("blk.{layer}.{g}.{suffix}"), t);
            }
        }
        "llama" | "qwen2" => {
            let n_head = u("num_attention_heads") as usize;
            let n_kv = u("num_key_value_heads") as usize;
            let head_dim =
                cfg["head_dim"].as_u64().map_or(u("hidden_size") as usize / n_head, |h| h as usize);
            for (k, v) in [
                ("embedding_length", u("hidden_size")),
                ("block_count", u("num_hidden_layers")),
                ("feed_forward_length", u("intermediate_size")),
                ("attention.head_count", n_head as u32),
                ("attention.head_count_kv", n_kv as u32),
                ("context_length", u("max_position_embeddings")),
                ("attention.key_length", head_dim as u32),
            ] {
                meta.push((format!("{model_type}.{k}"), Value::U32(v)));
            }
            meta.push((
                format!("{model_type}.attention.layer_norm_rms_epsilon"),
                Value::F32(cfg["rms_norm_eps"].as_f64().expect("eps") as f32),
            ));
            meta.push((
                format!("{model_type}.rope.freq_base"),
                Value::F32(cfg["rope_parameters"]["rope_theta"].as_f64().expect("theta") as f32),
            ));
            if cfg["rope_parameters"]["rope_type"] == "llama3" {
                let factors = llama3_rope_factors(&cfg, head_dim);
                gguf.insert(
                    "rope_freqs.weight".into(),
                    Tensor::new(factors, &Device::Cpu).expect("factors"),
                );
            }
            for (name, t) in &tensors {
                let g = match name.as_str() {
                    "model.embed_tokens.weight" => "token_embd.weight".to_string(),
                    "model.norm.weight" => "output_norm.weight".to_string(),
                    "lm_head.weight" => "output.weight".to_string(),
                    _ => {
                        let rest = name.strip_prefix("model.layers.").expect("layer tensor");
                        let (layer, part) = rest.split_once('.').expect("layer");
                        let (part, suffix) = part.rsplit_once('.').expect("suffix");
                        let g = match part {
                            "input_layernorm" => "attn_norm",
                            "post_attention_layernorm" => "ffn_norm",
                            "self_attn.q_proj" => "attn_q",
                            "self_attn.k_proj" => "attn_k",
                            "self_attn.v_proj" => "attn_v",
                            "self_attn.o_proj" => "attn_output",
                            "mlp.gate_proj" => "ffn_gate",
                            "mlp.up_proj" => "ffn_up",
                            "mlp.down_proj" => "ffn_down",
                            other => panic!("unexpected tensor {other}"),
                        };
                        format!("blk.{layer}.{g}.{suffix}")
                    }
                };
                // Only the `llama` architecture is permuted by the converter.
                let t = match (model_type, g.contains(".attn_q."), g.contains(".attn_k.")) {
                    ("llama", true, _) => llama_cpp_permute(t, n_head),
                    ("llama", _, true) => llama_cpp_permute(t, n_kv),
                    _ => t.clone(),
                };
                gguf.insert(g, t);
            }
        }
        other => panic!("no GGUF writer for {other}"),
    }
    meta.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
    meta.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
    meta.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(byte_alphabet().into_iter().map(Value::String).collect()),
    ));
    meta.push(("tokenizer.ggml.merges".into(), Value::Array(vec![])));

    let q: Vec<(String, QTensor)> = gguf
        .into_iter()
        .map(|(n, t)| {
            (
                n,
                QTensor::quantize(&t.to_dtype(DType::F32).expect("f32"), GgmlDType::F32)
                    .expect("quantize"),
            )
        })
        .collect();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(out).expect("create gguf");
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).expect("write gguf");
}

/// The configuration, RoPE scaling aside (a formula in config.json, a tensor in GGUF).
fn without_rope_scaling(cfg: &ModelConfig) -> ModelConfig {
    match cfg {
        ModelConfig::Llama(c) => {
            ModelConfig::Llama(llama::Config { rope_scaling: RopeScaling::Default, ..c.clone() })
        }
        other => other.clone(),
    }
}

/// Same weights, same logits: bit for bit where the files hold the same f32 values; within
/// 1e-5 for Llama 3 scaling, whose RoPE divisors come from the converter's formula in double
/// precision instead of transformers' f32 one (an ulp of the angle, times positions ≤ 12).
#[test]
fn gguf_and_safetensors_give_the_same_logits() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, tolerance) in [("gpt2", 0.0), ("qwen2", 0.0), ("llama", 1e-5)] {
        let hf_dir = fixture(&format!("tiny/{name}"));
        let gguf_path = dir.path().join(format!("{name}.gguf"));
        write_gguf(&hf_dir, &gguf_path);
        let from_hf = load_model(&hf_dir, &LoadOptions::default()).expect("safetensors");
        let from_gguf = load_model(&gguf_path, &LoadOptions::default()).expect("gguf");
        assert_eq!(
            without_rope_scaling(&from_hf.config),
            without_rope_scaling(&from_gguf.config),
            "{name}: configs differ"
        );
        let x = ids(&random_rows(2, 12, 256, 11));
        let a = logits(&from_hf.model, &x, Logits::All);
        let b = logits(&from_gguf.model, &x, Logits::All);
        let diff = max_abs_diff(&a, &b);
        assert!(diff <= tolerance, "{name}: GGUF and safetensors differ by {diff}");
        // The byte-level tokenizer built from the metadata round-trips text.
        let tok = from_gguf.tokenizer().expect("tokenizer");
        let text = "Beats Music is owned by";
        assert_eq!(tok.decode(&tok.encode(text).expect("encode")).expect("decode"), text);
    }
}
