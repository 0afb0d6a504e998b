//! A model's fingerprint: blake3 over the files that define it, so that a coordinator can
//! refuse workers whose model differs from the sweep's (different weights, tokenizer or
//! config give different numbers). Both sides compute it with this one function: the
//! coordinator on `--model` (a path or an object-store URL), a worker on its local copy.

use crate::error::{Error, Result};
use object_store::ObjectStoreExt;

use crate::storage::Location;

/// Whether a file in a model folder defines the model (weights, config or tokenizer).
pub fn is_model_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".gguf")
        || matches!(
            name,
            "config.json"
                | "tokenizer.json"
                | "model.safetensors.index.json"
                | "vocab.json"
                | "merges.txt"
        )
}

/// `blake3:<hex>` of a model: a single file's bytes, or, for a folder, each model file's name,
/// length and bytes in name order. Files are streamed, never held whole in memory.
pub async fn model_fingerprint(model: &Location) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    // A file is an object at the prefix; anything else (a local folder answers `head` with
    // an error) is treated as a folder of model files.
    let single = if model.prefix.as_ref().is_empty() {
        None
    } else {
        model.store.head(&model.prefix).await.ok()
    };
    if let Some(meta) = single {
        model
            .stream_into(&meta.location, |chunk| {
                hasher.update(chunk);
            })
            .await?;
        return Ok(format!("blake3:{}", hasher.finalize().to_hex()));
    }
    let files: Vec<(String, u64)> = model
        .list("")
        .await?
        .into_iter()
        .filter(|(name, _)| !name.contains('/') && is_model_file(name))
        .collect();
    if files.is_empty() {
        return Err(Error::Storage(format!(
            "{}: no model files (config.json, *.safetensors, tokenizer.json or *.gguf)",
            model.display
        )));
    }
    for (name, len) in files {
        hasher.update(name.as_bytes());
        hasher.update(&len.to_le_bytes());
        model
            .stream_into(&model.path(&name), |chunk| {
                hasher.update(chunk);
            })
            .await?;
    }
    Ok(format!("blake3:{}", hasher.finalize().to_hex()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_and_folders_fingerprint_by_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        std::fs::create_dir_all(&a).expect("mkdir");
        std::fs::write(a.join("config.json"), b"{}").expect("write");
        std::fs::write(a.join("model.safetensors"), b"weights").expect("write");
        std::fs::write(a.join("README.md"), b"ignored").expect("write");
        let open =
            |p: &std::path::Path| Location::open(&p.display().to_string(), false).expect("open");
        let folder = model_fingerprint(&open(&a)).await.expect("folder");
        std::fs::write(a.join("README.md"), b"changed").expect("write");
        assert_eq!(model_fingerprint(&open(&a)).await.expect("folder"), folder);
        std::fs::write(a.join("model.safetensors"), b"weightz").expect("write");
        assert_ne!(model_fingerprint(&open(&a)).await.expect("folder"), folder);

        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"gguf bytes").expect("write");
        let one = model_fingerprint(&open(&file)).await.expect("file");
        assert_eq!(one, format!("blake3:{}", blake3::hash(b"gguf bytes").to_hex()));
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).expect("mkdir");
        assert!(model_fingerprint(&open(&empty)).await.is_err());
    }
}
