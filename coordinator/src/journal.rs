//! The commit journal: the single source of truth of what a sweep has written.
//!
//! The coordinator is the only writer. A flush writes its Parquet files first, then creates
//! `_journal/<seq>.json` naming the files and the jobs whose rows they hold; creation is
//! exclusive (`PutMode::Create`), so two coordinators on one sweep cannot both commit. On
//! start-up the journal is replayed: committed jobs are done, and data files no commit names
//! (written by a flush that crashed before its commit) are deleted. Every row is therefore in
//! exactly one committed file, whatever process died when.

use std::collections::{BTreeMap, HashSet};

use anyhow::{Context, bail};
use bytes::Bytes;
use common::storage::Location;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// Journal records read at once during replay.
const READ_AHEAD: usize = 16;

/// The folder of commit records.
pub const JOURNAL_DIR: &str = "_journal";
/// The data tables, each a folder of Parquet files.
pub const TABLES: [&str; 3] = ["facts", "traces", "errors"];

/// The noise level the calibration job found.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The embeddings' std.
    pub std: f64,
    /// The level: factor × std.
    pub level: f64,
    /// How many subjects it was measured on.
    pub subjects: u64,
}

/// One commit: files written and the jobs whose rows they hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    /// Position in the journal, from 1.
    pub seq: u64,
    /// Job ids whose results are in `files` (including the pseudo-job `dataset`).
    pub jobs: Vec<String>,
    /// Of `jobs`, those given up (their result is an `errors` row).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
    /// Data files, relative to the sweep folder.
    pub files: Vec<String>,
    /// Rows written.
    pub counts: Totals,
    /// Set by the commit that holds the calibration result.
    pub calibration: Option<Calibration>,
    /// The model's layer count, once known.
    pub n_layers: Option<u32>,
}

/// Row and fact counts, per commit and summed over the journal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// `facts` rows.
    pub facts: u64,
    /// Of which traced.
    pub facts_traced: u64,
    /// `traces` rows per kind.
    pub trace_rows: BTreeMap<String, u64>,
    /// `errors` rows.
    pub errors: u64,
}

impl Totals {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Totals) {
        self.facts += other.facts;
        self.facts_traced += other.facts_traced;
        self.errors += other.errors;
        for (kind, n) in &other.trace_rows {
            *self.trace_rows.entry(kind.clone()).or_default() += n;
        }
    }

    /// All `traces` rows.
    pub fn trace_rows_total(&self) -> u64 {
        self.trace_rows.values().sum()
    }
}

/// What the journal says at start-up.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Committed jobs.
    pub done: HashSet<String>,
    /// Of those, the ones given up.
    pub failed: HashSet<String>,
    /// The calibration, if committed.
    pub calibration: Option<Calibration>,
    /// The model's layer count, if known.
    pub n_layers: Option<u32>,
    /// The last commit's number (0: none).
    pub last_seq: u64,
    /// Counts over all commits.
    pub totals: Totals,
    /// Uncommitted data files deleted.
    pub orphans_deleted: usize,
}

/// The journal record name of commit `seq`.
pub fn commit_name(seq: u64) -> String {
    format!("{JOURNAL_DIR}/{seq:08}.json")
}

/// Replays the journal under `out` and deletes uncommitted data files.
pub async fn replay(out: &Location) -> anyhow::Result<Replayed> {
    let mut replayed = Replayed::default();
    let mut committed_files: HashSet<String> = HashSet::new();
    read_records(out, |name, commit: Commit| {
        if commit.seq != replayed.last_seq + 1 {
            bail!(
                "journal of {} jumps from commit {} to {} ({name})",
                out.display,
                replayed.last_seq,
                commit.seq
            );
        }
        replayed.last_seq = commit.seq;
        replayed.done.extend(commit.jobs.iter().cloned());
        replayed.failed.extend(commit.failed.iter().cloned());
        committed_files.extend(commit.files.iter().cloned());
        replayed.totals.add(&commit.counts);
        if commit.calibration.is_some() {
            replayed.calibration = commit.calibration;
        }
        if commit.n_layers.is_some() {
            replayed.n_layers = commit.n_layers;
        }
        Ok(())
    })
    .await?;
    for table in TABLES {
        for (name, _) in out.list(table).await? {
            if !committed_files.contains(&name) {
                tracing::warn!("deleting {name}: written by a flush that never committed");
                out.delete(&name).await?;
                replayed.orphans_deleted += 1;
            }
        }
    }
    Ok(replayed)
}

/// The data files the journal's commits name: all a reader may read of a sweep that may be
/// running, or may have crashed between a flush's files and its commit (`replay`, which
/// deletes such files, runs only when a coordinator starts).
pub async fn committed_files(out: &Location) -> anyhow::Result<HashSet<String>> {
    /// The one field a reader needs, so that records of any version parse.
    #[derive(Deserialize)]
    struct Files {
        #[serde(default)]
        files: Vec<String>,
    }
    let mut files = HashSet::new();
    read_records(out, |_, record: Files| {
        files.extend(record.files);
        Ok(())
    })
    .await?;
    Ok(files)
}

/// Reads every journal record of `out` in order, parsed as `T`, and hands each to `each`
/// with its name. A long sweep has thousands of records: they are read many at a time (a
/// remote store answers each in tens of milliseconds), still in order.
async fn read_records<T: serde::de::DeserializeOwned>(
    out: &Location,
    mut each: impl FnMut(&str, T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let names: Vec<String> = out.list(JOURNAL_DIR).await?.into_iter().map(|(n, _)| n).collect();
    let mut records = futures::stream::iter(names.iter())
        .map(|name| async move { out.read_child(name).await.map(|bytes| (name, bytes)) })
        .buffered(READ_AHEAD);
    while let Some(record) = records.next().await {
        let (name, bytes) = record?;
        let record: T = serde_json::from_slice(&bytes)
            .with_context(|| format!("journal record {name} in {} is corrupt", out.display))?;
        each(name, record)?;
    }
    Ok(())
}

/// Appends `commit`; fails if another record holds its number (another coordinator writes
/// this sweep). The same record already there is this commit's own earlier try, which the
/// store wrote but whose reply was lost: that counts as appended.
pub async fn append(out: &Location, commit: &Commit) -> anyhow::Result<()> {
    let name = commit_name(commit.seq);
    let bytes = Bytes::from(serde_json::to_vec_pretty(commit)?);
    if !out.create(&name, bytes.clone()).await? {
        if out.read_child(&name).await? == bytes {
            tracing::info!("{name} was written by an earlier try whose reply was lost");
            return Ok(());
        }
        bail!(
            "{name} already exists in {}: another coordinator is writing this sweep; run one coordinator per sweep",
            out.display
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replay_keeps_committed_and_deletes_orphans() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Location::open(&dir.path().display().to_string(), true).expect("open");
        out.write("facts/part-00000001.parquet", Bytes::from_static(b"a")).await.expect("w");
        out.write("traces/kind=mlp/part-00000002.parquet", Bytes::from_static(b"b"))
            .await
            .expect("w");
        let mut counts = Totals { facts: 1, ..Totals::default() };
        counts.trace_rows.insert("mlp".into(), 5);
        let commit = Commit {
            seq: 1,
            jobs: vec!["1:0-2".into()],
            failed: Vec::new(),
            files: vec!["facts/part-00000001.parquet".into()],
            counts,
            calibration: None,
            n_layers: Some(2),
        };
        append(&out, &commit).await.expect("append");
        append(&out, &commit).await.expect("the same record again: a retry whose first try landed");
        let other = Commit { jobs: vec!["2:0-2".into()], ..commit.clone() };
        let refused = append(&out, &other).await.expect_err("a second writer is refused");
        assert!(refused.to_string().contains("another coordinator"), "{refused}");
        // A reader sees the committed file only, the orphan still there.
        let files = committed_files(&out).await.expect("files");
        assert_eq!(files, HashSet::from(["facts/part-00000001.parquet".to_string()]));
        let replayed = replay(&out).await.expect("replay");
        assert_eq!(replayed.last_seq, 1);
        assert!(replayed.done.contains("1:0-2"));
        assert_eq!(replayed.n_layers, Some(2));
        assert_eq!(replayed.totals.trace_rows_total(), 5);
        assert_eq!(replayed.orphans_deleted, 1);
        assert!(!out.exists("traces/kind=mlp/part-00000002.parquet").await.expect("exists"));
        assert!(out.exists("facts/part-00000001.parquet").await.expect("exists"));
    }
}
