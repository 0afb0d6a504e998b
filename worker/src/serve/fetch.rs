//! A model named by URL, copied once into a local cache (workers load from local files).

use std::path::{Path, PathBuf};

use anyhow::Context;
use common::fingerprint::is_model_file;
use common::storage::{Location, is_url};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use tokio::io::AsyncWriteExt;

/// The local path of `model`: itself when it is a path, else a cached copy of the URL's
/// file or folder (its model files only) under `cache`.
pub async fn local_model(model: &str, cache: &Path) -> anyhow::Result<PathBuf> {
    if !is_url(model) {
        return Ok(PathBuf::from(model));
    }
    if let Some(path) = model.strip_prefix("file://") {
        return Ok(PathBuf::from(path));
    }
    let at = Location::open(model, false)?;
    let key = blake3::hash(model.as_bytes()).to_hex();
    let dir = cache.join(format!("url-{}", &key.as_str()[..16]));
    tokio::fs::create_dir_all(&dir).await.with_context(|| format!("creating {}", dir.display()))?;
    match at.store.head(&at.prefix).await {
        Ok(meta) => {
            let name = meta.location.filename().unwrap_or("model.gguf").to_string();
            let path = dir.join(&name);
            download(&at, &meta.location, meta.size, &path).await?;
            Ok(path)
        }
        Err(_) => {
            for (name, size) in at.list("").await? {
                if name.contains('/') || !is_model_file(&name) {
                    continue;
                }
                download(&at, &at.path(&name), size, &dir.join(&name)).await?;
            }
            Ok(dir)
        }
    }
}

async fn download(
    at: &Location,
    from: &object_store::path::Path,
    size: u64,
    to: &Path,
) -> anyhow::Result<()> {
    if tokio::fs::metadata(to).await.is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    tracing::info!("downloading {} ({size} bytes) to {}", at.display, to.display());
    // Into a temporary name first, so that a crash never leaves a truncated "cached" copy.
    let partial = to.with_extension("partial");
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("creating {}", partial.display()))?;
    let mut stream =
        at.store.get(from).await.with_context(|| format!("reading {}", at.display))?.into_stream();
    while let Some(chunk) =
        stream.try_next().await.with_context(|| format!("reading {}", at.display))?
    {
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    tokio::fs::rename(&partial, to).await?;
    Ok(())
}
