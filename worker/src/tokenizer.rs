//! Tokenizers: from a `tokenizer.json`, from GPT-2's `vocab.json` + `merges.txt`, or rebuilt
//! from a GGUF file's metadata.
//!
//! Every tokenizer is a Hugging Face `tokenizers::Tokenizer`; the GGUF and vocab/merges
//! builders write the `tokenizer.json` that the original model repository would carry, so the
//! same library code runs in every case. For GGUF the pre-tokenizer is chosen by
//! `tokenizer.ggml.pre` the way llama.cpp chooses it (e.g. SmolLM splits digits one by one),
//! and BOS is added only when `tokenizer.ggml.add_bos_token` says so. SentencePiece
//! vocabularies (`tokenizer.ggml.model = "llama"`, Gemma's) are rebuilt in `tokenizer/spm.rs`.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

mod spm;

/// Llama 3's split pattern (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split pattern (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A text ↔ token-id mapping.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("source", &self.source).finish_non_exhaustive()
    }
}

impl Tokenizer {
    fn from_json(json: &Value, source: String) -> Result<Self> {
        let text = json.to_string();
        let inner = text.parse::<tokenizers::Tokenizer>().map_err(|e| Error::Tokenizer {
            source_name: source.clone(),
            message: e.to_string(),
        })?;
        Ok(Self { inner, source })
    }

    /// Reads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            source_name: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self { inner, source: path.display().to_string() })
    }

    /// GPT-2's byte-level BPE from `vocab.json` (`encoder.json`) and `merges.txt`
    /// (`vocab.bpe`), with `<|endoftext|>` as a special token.
    pub fn gpt2_from_files(vocab_path: &Path, merges_path: &Path) -> Result<Self> {
        let source = vocab_path.display().to_string();
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| Error::Io { path: p.to_path_buf(), source: e })
        };
        let vocab: serde_json::Map<String, Value> = serde_json::from_str(&read(vocab_path)?)
            .map_err(|e| Error::CorruptFile {
                path: vocab_path.to_path_buf(),
                format: "JSON",
                message: e.to_string(),
            })?;
        let merges: Vec<Value> = read(merges_path)?
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| {
                let (a, b) = l.split_once(' ').unwrap_or((l, ""));
                json!([a, b])
            })
            .collect();
        let added = vocab
            .get("<|endoftext|>")
            .and_then(Value::as_u64)
            .map(|id| vec![added_token(id, "<|endoftext|>", true)])
            .unwrap_or_default();
        let json =
            byte_level_bpe(Value::Object(vocab), merges, byte_level_pre(true), added, Value::Null);
        Self::from_json(&json, source)
    }

    /// The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let source = file.path().display().to_string();
        let err = |field: &str, message: String| Error::Config {
            source_name: source.clone(),
            field: field.into(),
            message,
        };
        let model = file.str_opt("tokenizer.ggml.model")?.unwrap_or("gpt2");
        match model {
            "gpt2" => {}
            "llama" => return Self::sentencepiece_from_gguf(file),
            _ => {
                return Err(err(
                    "tokenizer.ggml.model",
                    format!(
                        "{model:?} tokenizers are not implemented (byte-level BPE, \"gpt2\", and Gemma's SentencePiece, \"llama\"); load the model's Hugging Face folder with its tokenizer.json instead"
                    ),
                ));
            }
        }
        let tokens = file.strings("tokenizer.ggml.tokens")?;
        let merges: Vec<Value> = file
            .strings("tokenizer.ggml.merges")?
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').unwrap_or((m.as_str(), ""));
                json!([a, b])
            })
            .collect();
        let types = file.ints_opt("tokenizer.ggml.token_type")?.unwrap_or_default();
        let pre = file.str_opt("tokenizer.ggml.pre")?.unwrap_or("default");
        let pre_tokenizer = pre_tokenizer_for(pre).ok_or_else(|| {
            err("tokenizer.ggml.pre", format!("pre-tokenizer {pre:?} is not implemented (default, gpt2, smollm, llama-bpe, llama3, qwen2)"))
        })?;

        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, token) in tokens.iter().enumerate() {
            vocab.insert(token.clone(), json!(id));
            // Control tokens are matched whole and special, user-defined ones whole, as
            // transformers' GGUF loader and llama.cpp do. A control token spelled outside the
            // byte-level alphabet is a mislabel that both skip.
            match types.get(id).copied() {
                Some(TOKEN_TYPE_CONTROL) if token.chars().all(in_byte_alphabet) => {
                    added.push(added_token(id as u64, token, true))
                }
                Some(TOKEN_TYPE_USER_DEFINED) => added.push(added_token(id as u64, token, false)),
                _ => {}
            }
        }
        let post = gguf_post_processor(file, &tokens, false)?;
        Self::from_json(
            &byte_level_bpe(Value::Object(vocab), merges, pre_tokenizer, added, post),
            source,
        )
    }

    /// A SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`), as transformers builds it
    /// for the file's architecture; only Gemma's is implemented. BOS is added unless
    /// `tokenizer.ggml.add_bos_token` is false: llama.cpp and transformers both default it to
    /// true for SentencePiece files.
    ///
    /// The BPE model is built directly rather than through a `tokenizer.json`: with 262,144
    /// pieces and 514,906 merges, writing and parsing the JSON took about five times as long
    /// as the builder (2.8 s against 0.5 s for Gemma 3). The smaller parts are still described
    /// in `tokenizer.json`'s own terms.
    fn sentencepiece_from_gguf(file: &GgufFile) -> Result<Self> {
        let source = file.path().display().to_string();
        let architecture = file.architecture()?;
        if !spm::GEMMA_ARCHITECTURES.contains(&architecture) {
            return Err(Error::Config {
                source_name: source,
                field: "tokenizer.ggml.model".into(),
                message: format!(
                    "SentencePiece (\"llama\") tokenizers are implemented for Gemma ({}) only, and this file's architecture is {architecture:?}; load the model's Hugging Face folder with its tokenizer.json instead",
                    spm::GEMMA_ARCHITECTURES.join(", ")
                ),
            });
        }
        let tokens = file.strings("tokenizer.ggml.tokens")?;
        let types = file.ints_opt("tokenizer.ggml.token_type")?.unwrap_or_default();
        let mut named = Vec::new();
        for key in [
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.padding_token_id",
        ] {
            named.extend(special_token(file, &tokens, key)?.map(|(id, _)| id as usize));
        }
        let tokenizer_error =
            |message: String| Error::Tokenizer { source_name: source.clone(), message };
        let parts = spm::gemma(&tokens, &types, &named).map_err(tokenizer_error)?;
        let post = gguf_post_processor(file, &tokens, true)?;

        let mut inner = tokenizers::Tokenizer::new(parts.model);
        inner
            .with_normalizer(Some(parts.normalizer))
            .map_err(|e| tokenizer_error(e.to_string()))?;
        inner.with_pre_tokenizer(Some(parts.pre_tokenizer));
        inner.with_decoder(Some(parts.decoder));
        if !post.is_null() {
            let post: tokenizers::PostProcessorWrapper =
                serde_json::from_value(post).map_err(|e| tokenizer_error(e.to_string()))?;
            inner.with_post_processor(Some(post));
        }
        // Control pieces first, then user-defined ones, in file order, as transformers adds
        // them; every one is already a piece, so each keeps its id.
        inner.add_special_tokens(parts.special).map_err(|e| tokenizer_error(e.to_string()))?;
        inner.add_tokens(parts.user_defined).map_err(|e| tokenizer_error(e.to_string()))?;
        Ok(Self { inner, source })
    }

    /// Token ids of `text`, with the special tokens the tokenizer adds (BOS where it does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| Error::Tokenizer {
            source_name: self.source.clone(),
            message: e.to_string(),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` alone, without BOS or other added special tokens.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer {
            source_name: self.source.clone(),
            message: e.to_string(),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer {
            source_name: self.source.clone(),
            message: e.to_string(),
        })
    }

    /// Each token decoded on its own, as ROME's `decode_tokens` does: `" Berlin"`, not
    /// `"ĠBerlin"`. A token holding part of a UTF-8 character decodes to U+FFFD.
    pub fn token_strings(&self, ids: &[u32]) -> Result<Vec<String>> {
        ids.iter().map(|&id| self.decode(&[id])).collect()
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// What symmetric token replacement's donor rule reads of the tokenizer.
impl common::donor::Encode for Tokenizer {
    type Error = Error;

    fn prompt_ids(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text)
    }

    fn first_answer_token(&self, attribute: &str) -> Result<Option<u32>> {
        Ok(self.encode_plain(&format!(" {attribute}"))?.first().copied())
    }
}

/// Whether `c` is one of the 256 characters GPT-2's byte-level alphabet uses.
fn in_byte_alphabet(c: char) -> bool {
    let c = c as u32;
    (0x21..=0x7E).contains(&c)
        || (0xA1..=0xAC).contains(&c)
        || (0xAE..=0xFF).contains(&c)
        || (0x100..=0x143).contains(&c)
}

fn added_token(id: u64, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

fn byte_level_pre(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_bytes(pattern: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        byte_level_pre(false),
    ]})
}

/// The pre-tokenizer for a GGUF `tokenizer.ggml.pre` value, as llama.cpp maps them.
fn pre_tokenizer_for(pre: &str) -> Option<Value> {
    Some(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level_pre(true),
        // SmolLM's tokenizer.json: Digits(individual) then ByteLevel with GPT-2's pattern.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level_pre(true),
        ]}),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "dbrx" | "falcon3" => {
            split_then_bytes(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" => split_then_bytes(QWEN2_SPLIT),
        _ => return None,
    })
}

/// The id and piece a GGUF metadata key (`tokenizer.ggml.bos_token_id`, …) names, if present.
fn special_token(file: &GgufFile, tokens: &[String], key: &str) -> Result<Option<(u64, String)>> {
    let Some(id) = file.usize_opt(key)? else { return Ok(None) };
    let token = tokens.get(id).ok_or_else(|| Error::Config {
        source_name: file.path().display().to_string(),
        field: key.into(),
        message: format!("id {id} is outside the vocabulary ({} tokens)", tokens.len()),
    })?;
    Ok(Some((id as u64, token.clone())))
}

/// The post-processor adding BOS and EOS as `tokenizer.ggml.add_bos_token` and
/// `add_eos_token` say; `bos_by_default` is what a file without the flag gets.
fn gguf_post_processor(file: &GgufFile, tokens: &[String], bos_by_default: bool) -> Result<Value> {
    let bos = if file.bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(bos_by_default) {
        special_token(file, tokens, "tokenizer.ggml.bos_token_id")?
    } else {
        None
    };
    let eos = if file.bool_opt("tokenizer.ggml.add_eos_token")?.unwrap_or(false) {
        special_token(file, tokens, "tokenizer.ggml.eos_token_id")?
    } else {
        None
    };
    Ok(template_processing(bos, eos))
}

fn template_processing(bos: Option<(u64, String)>, eos: Option<(u64, String)>) -> Value {
    if bos.is_none() && eos.is_none() {
        return Value::Null;
    }
    let mut single = Vec::new();
    let mut special_tokens = serde_json::Map::new();
    if let Some((id, token)) = &bos {
        single.push(json!({"SpecialToken": {"id": token, "type_id": 0}}));
        special_tokens.insert(token.clone(), json!({"id": token, "ids": [id], "tokens": [token]}));
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let Some((id, token)) = &eos {
        single.push(json!({"SpecialToken": {"id": token, "type_id": 0}}));
        special_tokens.insert(token.clone(), json!({"id": token, "ids": [id], "tokens": [token]}));
    }
    // transformers' pair template repeats BOS and EOS around the second sequence.
    let mut pair = single.clone();
    if let Some((_, token)) = &bos {
        pair.push(json!({"SpecialToken": {"id": token, "type_id": 1}}));
    }
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    if let Some((_, token)) = &eos {
        pair.push(json!({"SpecialToken": {"id": token, "type_id": 1}}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens})
}

fn byte_level_bpe(
    vocab: Value,
    merges: Vec<Value>,
    pre_tokenizer: Value,
    added: Vec<Value>,
    post: Value,
) -> Value {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_has_256_characters() {
        let n = (0u32..0x200).filter_map(char::from_u32).filter(|&c| in_byte_alphabet(c)).count();
        assert_eq!(n, 256);
    }

    /// A miniature vocabulary: merges apply in rank order, BOS is added only when asked, and
    /// SmolLM's pre-tokenizer splits digits one by one.
    #[test]
    fn builds_a_working_byte_level_bpe() -> Result<()> {
        let vocab =
            json!({"<s>": 0, "a": 1, "b": 2, "ab": 3, "Ġ": 4, "Ġab": 5, "1": 6, "2": 7, "12": 8});
        let merges = vec![json!(["a", "b"]), json!(["Ġ", "ab"]), json!(["1", "2"])];
        let plain = byte_level_bpe(
            vocab.clone(),
            merges.clone(),
            byte_level_pre(true),
            vec![],
            Value::Null,
        );
        let tok = Tokenizer::from_json(&plain, "test".into())?;
        assert_eq!(tok.encode("ab ab")?, vec![3, 5]);
        assert_eq!(tok.encode("12")?, vec![8]);
        assert_eq!(tok.token_strings(&[3, 5])?, vec!["ab", " ab"]);

        let bos = template_processing(Some((0, "<s>".into())), None);
        let smollm = pre_tokenizer_for("smollm").expect("known");
        let tok = Tokenizer::from_json(
            &byte_level_bpe(vocab, merges, smollm, vec![added_token(0, "<s>", true)], bos),
            "test".into(),
        )?;
        assert_eq!(tok.encode("12")?, vec![0, 6, 7]);
        Ok(())
    }

    #[test]
    fn unknown_pre_tokenizers_are_refused() {
        assert!(pre_tokenizer_for("some-new-model").is_none());
        assert!(pre_tokenizer_for("smollm").is_some());
    }
}
