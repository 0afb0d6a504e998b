//! `manifest.json`: a sweep's configuration, sources, counts and state, rewritten after every
//! commit. It is a summary for people and tools; the journal is what resume trusts.

use anyhow::Context;
use bytes::Bytes;
use common::storage::Location;
use common::sweep::SweepSettings;
use serde::{Deserialize, Serialize};

use crate::journal::Totals;

/// The manifest's name in the sweep folder.
pub const MANIFEST: &str = "manifest.json";

/// The noise the sweep uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseInfo {
    /// The rule as given (`s3`, `0.1`, `u2`).
    pub spec: String,
    /// The level, once known.
    pub level: Option<f64>,
    /// The embeddings' std, for `sK`.
    pub std: Option<f64>,
}

/// What the dataset held.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Valid facts.
    pub valid: u64,
    /// Broken records (in `errors` with stage `dataset`).
    pub invalid: u64,
    /// Facts in this sweep (after `--limit`).
    pub in_sweep: u64,
}

/// Jobs and their fate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobsInfo {
    /// All jobs (calibration included).
    pub total: u64,
    /// Done.
    pub done: u64,
    /// Given up (in `errors`).
    pub failed: u64,
    /// Tries that failed or whose lease expired, queued again (this run).
    pub retries: u64,
}

/// The manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The sweep id.
    pub sweep_id: String,
    /// `running`, `finished` or `failed`.
    pub state: String,
    /// Everything that decides the numbers.
    pub settings: SweepSettings,
    /// The dataset as given.
    pub knowns: String,
    /// The model as given.
    pub model: String,
    /// The model's layer count, once a worker reported it.
    pub n_layers: Option<u32>,
    /// The noise.
    pub noise: NoiseInfo,
    /// The dataset.
    pub dataset: DatasetInfo,
    /// The jobs.
    pub jobs: JobsInfo,
    /// Rows committed.
    pub rows: Totals,
    /// Commits in the journal.
    pub commits: u64,
    /// When the sweep was first started and last written (Unix seconds).
    pub created_unix: u64,
    /// See `created_unix`.
    pub updated_unix: u64,
    /// The coordinator that wrote it.
    pub coordinator_version: String,
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Reads the manifest of a sweep folder, if there is one.
pub async fn read(out: &Location) -> anyhow::Result<Option<Manifest>> {
    if !out.exists(MANIFEST).await? {
        return Ok(None);
    }
    let bytes = out.read_child(MANIFEST).await?;
    let manifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("{MANIFEST} in {} is not a sweep manifest", out.display))?;
    Ok(Some(manifest))
}

/// Writes the manifest.
pub async fn write(out: &Location, manifest: &Manifest) -> anyhow::Result<()> {
    out.write(MANIFEST, Bytes::from(serde_json::to_vec_pretty(manifest)?)).await?;
    Ok(())
}
