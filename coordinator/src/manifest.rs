//! `manifest.json`: a sweep's configuration, sources, counts and state, rewritten after every
//! commit. It is a summary for people and tools; the journal is what resume trusts.

use anyhow::Context;
use bytes::Bytes;
use common::storage::Location;
use common::sweep::{SCHEMA, SweepSettings};
use serde::{Deserialize, Serialize};

use crate::journal::Totals;

/// The manifest's name in the sweep folder.
pub const MANIFEST: &str = "manifest.json";

/// The noise the sweep uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseInfo {
    /// The rule as given (`s3`, `0.1`, `u2`); `None` without noise (STR).
    pub spec: Option<String>,
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

/// Where a sweep stands, as its manifest records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SweepState {
    /// Started and not finished: the same command resumes it.
    Running,
    /// Every job is committed (done or given up).
    Finished,
    /// Stopped by an error; the same command resumes it.
    Failed,
}

impl SweepState {
    /// The name the manifest and the summary use.
    pub fn name(self) -> &'static str {
        match self {
            SweepState::Running => "running",
            SweepState::Finished => "finished",
            SweepState::Failed => "failed",
        }
    }
}

/// The manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The sweep id.
    pub sweep_id: String,
    /// Where it stands.
    pub state: SweepState,
    /// Everything that decides the numbers.
    pub settings: SweepSettings,
    /// The digest of `settings.experiment` (part of the default sweep id).
    pub experiment_digest: String,
    /// The dataset as given.
    pub knowns: String,
    /// The model as given.
    pub model: String,
    /// The model's layer count, once a worker reported it.
    pub n_layers: Option<u32>,
    /// The model's query heads per layer, once a worker reported it.
    pub n_heads: Option<u32>,
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

/// A manifest of another schema: a sweep this coordinator cannot continue.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "{MANIFEST} in {folder} was written with table schema {found} (this coordinator writes \
     schema {SCHEMA}: {what}); its tables cannot be continued in the new schema. Finish it \
     with the coordinator version that started it ({version}), or start a new sweep with \
     another --sweep-id or --out"
)]
pub struct OtherSchema {
    /// The sweep folder.
    pub folder: String,
    /// The schema found (1 before versions were recorded).
    pub found: u64,
    /// What changed since.
    pub what: &'static str,
    /// The coordinator that wrote it.
    pub version: String,
}

/// Reads the manifest of a sweep folder, if there is one. A manifest of another table
/// schema is an [`OtherSchema`] error.
pub async fn read(out: &Location) -> anyhow::Result<Option<Manifest>> {
    if !out.exists(MANIFEST).await? {
        return Ok(None);
    }
    let bytes = out.read_child(MANIFEST).await?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{MANIFEST} in {} is not JSON", out.display))?;
    let found = value["settings"]["schema"].as_u64().unwrap_or(1);
    if found != u64::from(SCHEMA) {
        return Err(OtherSchema {
            folder: out.display.clone(),
            found,
            what: common::sweep::SCHEMA_CHANGES,
            version: value["coordinator_version"].as_str().unwrap_or("unknown").to_string(),
        }
        .into());
    }
    let manifest = serde_json::from_value(value)
        .with_context(|| format!("{MANIFEST} in {} is not a sweep manifest", out.display))?;
    Ok(Some(manifest))
}

/// Writes the manifest.
pub async fn write(out: &Location, manifest: &Manifest) -> anyhow::Result<()> {
    out.write(MANIFEST, Bytes::from(serde_json::to_vec_pretty(manifest)?)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep of the first schema (before experiments: `kinds` and `samples` at the top of
    /// the settings) is refused with the reason and the way out.
    #[tokio::test]
    async fn a_sweep_of_another_schema_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Location::open(&dir.path().display().to_string(), true).expect("open");
        let old = serde_json::json!({
            "sweep_id": "sweep-0123", "state": "running", "coordinator_version": "0.0.0",
            "settings": {"dataset_digest": "d", "kinds": ["hidden"], "samples": 10},
        });
        out.write(MANIFEST, Bytes::from(old.to_string())).await.expect("write");
        let err = read(&out).await.expect_err("schema 1");
        let text = err.to_string();
        assert!(err.downcast_ref::<OtherSchema>().is_some(), "{text}");
        assert!(text.contains("schema 1") && text.contains("--sweep-id"), "{text}");
    }
}
