//! Where a model's tensors come from: safetensors files (one or sharded) or a GGUF file.
//!
//! Models ask for tensors by their Hugging Face names with the shape their configuration
//! implies; the source finds, converts and checks them, so that every error names the file
//! and the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A store of named tensors in their stored dtype.
pub(crate) trait TensorSource: Send + Sync {
    /// The file (or files) for error messages.
    fn source_name(&self) -> String;
    /// Whether the store has the tensor.
    fn contains(&self, name: &str) -> bool;
    /// Loads the tensor onto `device`; `Ok(None)` if absent.
    fn load(&self, name: &str, device: &Device) -> Result<Option<Tensor>>;
}

/// Tensors for a model, converted to the engine's dtype on its device.
pub(crate) struct Weights {
    source: Box<dyn TensorSource>,
    dtype: DType,
    device: Device,
}

impl Weights {
    pub(crate) fn new(source: Box<dyn TensorSource>, dtype: DType, device: Device) -> Self {
        Self { source, dtype, device }
    }

    /// The device tensors are loaded onto.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the tensor exists.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.source.contains(name)
    }

    /// The tensor `name`, which must have `shape`.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_opt(name, shape)?.ok_or_else(|| Error::MissingTensor {
            source_name: self.source.source_name(),
            tensor: name.to_string(),
        })
    }

    /// The tensor `name` if present, which must then have `shape`.
    pub(crate) fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(tensor) = self.source.load(name, &self.device)? else { return Ok(None) };
        if tensor.dims() != shape {
            return Err(Error::ShapeMismatch {
                source_name: self.source.source_name(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                actual: tensor.dims().to_vec(),
            });
        }
        Ok(Some(tensor.to_dtype(self.dtype)?))
    }
}

/// One or more memory-mapped safetensors files with a name → file routing table.
pub(crate) struct SafetensorsSource {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
}

impl SafetensorsSource {
    /// Maps the files and indexes their tensors. A truncated or corrupt file is an error that
    /// names it.
    pub(crate) fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            if !path.is_file() {
                return Err(Error::MissingFile {
                    path: path.clone(),
                    why: "listed weights file".into(),
                });
            }
            // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on
            // nobody truncating a model file while it is in use.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::CorruptFile {
                path: path.clone(),
                format: "safetensors",
                message: innermost(&e),
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, index);
            }
            files.push((path.clone(), st));
        }
        Ok(Self { files, routing })
    }

    /// The weights files of a Hugging Face folder: `model.safetensors`, or the shards that
    /// `model.safetensors.index.json` lists.
    pub(crate) fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join("model.safetensors.index.json");
        if !index.is_file() {
            return Err(Error::MissingFile {
                path: single,
                why: "a model folder needs model.safetensors or model.safetensors.index.json"
                    .into(),
            });
        }
        let text = std::fs::read_to_string(&index)
            .map_err(|e| Error::Io { path: index.clone(), source: e })?;
        let parsed: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::CorruptFile { path: index.clone(), format: "JSON", message: e.to_string() }
        })?;
        let map =
            parsed.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Config {
                source_name: index.display().to_string(),
                field: "weight_map".into(),
                message: "missing or not an object".into(),
            })?;
        let mut shards: Vec<PathBuf> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| Error::Config {
                source_name: index.display().to_string(),
                field: format!("weight_map.{tensor}"),
                message: "not a file name".into(),
            })?;
            let path = dir.join(file);
            if !shards.contains(&path) {
                shards.push(path);
            }
        }
        shards.sort();
        Ok(shards)
    }
}

impl TensorSource for SafetensorsSource {
    fn source_name(&self) -> String {
        match self.files.as_slice() {
            [(path, _)] => path.display().to_string(),
            files => {
                let dir =
                    files.first().and_then(|(p, _)| p.parent()).map(|p| p.display().to_string());
                format!("{} ({} safetensors shards)", dir.unwrap_or_default(), files.len())
            }
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    fn load(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some(&index) = self.routing.get(name) else { return Ok(None) };
        let (path, st) = &self.files[index];
        let tensor = st.load(name, device).map_err(|e| Error::CorruptFile {
            path: path.clone(),
            format: "safetensors",
            message: format!("tensor `{name}`: {}", innermost(&e)),
        })?;
        Ok(Some(tensor))
    }
}

/// The message of the innermost error, without candle's backtrace noise.
pub(crate) fn innermost(e: &candle_core::Error) -> String {
    let mut current: &dyn std::error::Error = e;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}
