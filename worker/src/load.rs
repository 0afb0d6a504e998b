//! Loading a model and its tokenizer from a Hugging Face folder or a GGUF file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, GgufSource};
use crate::models::{Model, ModelConfig};
use crate::tokenizer::Tokenizer;
use crate::weights::{SafetensorsSource, TensorSource, Weights};

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where the model runs.
    pub device: Device,
    /// The dtype of weights and activations (f32 by default; f16/bf16 for big models).
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32 }
    }
}

/// A model ready to run, with its tokenizer when the source has one.
pub struct LoadedModel {
    /// The transformer.
    pub model: Model,
    /// Its configuration.
    pub config: ModelConfig,
    /// Its tokenizer; `None` for a folder without tokenizer files.
    pub tokenizer: Option<Tokenizer>,
    /// Where it was loaded from.
    pub source: PathBuf,
}

impl LoadedModel {
    /// The tokenizer, or an error naming the model that has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::MissingFile {
            path: self.source.join("tokenizer.json"),
            why: "this model has no tokenizer (tokenizer.json, or vocab.json and merges.txt)"
                .into(),
        })
    }
}

/// Loads from a folder (config.json, safetensors, tokenizer) or a `.gguf` file.
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            why: "the model path does not exist".into(),
        });
    }
    if path.is_dir() { load_hf_folder(path, opts) } else { load_gguf(path, opts) }
}

fn load_hf_folder(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::MissingFile {
            path: config_path,
            why: "a model folder needs config.json".into(),
        });
    }
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| Error::Io { path: config_path.clone(), source: e })?;
    let config = ModelConfig::from_hf_json(&text, &config_path.display().to_string())?;
    let source = SafetensorsSource::open(&SafetensorsSource::files_in(dir)?)?;
    let model = build(config.clone(), Box::new(source), opts)?;
    let tokenizer = folder_tokenizer(dir)?;
    Ok(LoadedModel { model, config, tokenizer, source: dir.to_path_buf() })
}

/// `tokenizer.json`, else GPT-2 style `vocab.json` + `merges.txt`, else none.
fn folder_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    let json = dir.join("tokenizer.json");
    if json.is_file() {
        return Tokenizer::from_file(&json).map(Some);
    }
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if vocab.is_file() && merges.is_file() {
        return Tokenizer::gpt2_from_files(&vocab, &merges).map(Some);
    }
    Ok(None)
}

fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let config = file.model_config()?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let source = GgufSource::new(file, &config)?;
    let model = build(config.clone(), Box::new(source), opts)?;
    Ok(LoadedModel { model, config, tokenizer: Some(tokenizer), source: path.to_path_buf() })
}

fn build(config: ModelConfig, source: Box<dyn TensorSource>, opts: &LoadOptions) -> Result<Model> {
    let weights = Weights::new(source, opts.dtype, opts.device.clone());
    Model::new(config, &weights)
}
