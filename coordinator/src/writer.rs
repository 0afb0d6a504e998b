//! Buffers result rows and flushes them as Parquet files plus one journal commit.
//!
//! Rows accumulate in memory (a job counts as done there, but only a commit makes it so for
//! a restarted coordinator). A flush writes one file per table (and per kind for `traces`),
//! sized by the flush policy rather than per fact, so DuckDB reads a handful of files.

use std::collections::BTreeMap;
use std::sync::Mutex;

use common::settings::Kind;
use common::storage::Location;
use common::tables::{
    ErrorRow, FactRow, TraceRow, errors_batch, facts_batch, traces_batch, write_parquet,
};

use crate::journal::{self, Calibration, Commit, Totals};

/// Rows and jobs not yet committed.
#[derive(Debug, Default)]
pub struct Buffer {
    /// `facts` rows.
    pub facts: Vec<FactRow>,
    /// `traces` rows, per kind.
    pub traces: BTreeMap<Kind, Vec<TraceRow>>,
    /// `errors` rows.
    pub errors: Vec<ErrorRow>,
    /// Jobs whose rows are above.
    pub jobs: Vec<String>,
    /// A calibration result to commit.
    pub calibration: Option<Calibration>,
}

impl Buffer {
    /// Buffered `traces` rows.
    pub fn trace_rows(&self) -> usize {
        self.traces.values().map(Vec::len).sum()
    }

    /// Whether there is nothing to commit.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.errors.is_empty() && self.calibration.is_none()
    }

    fn merge_back(&mut self, mut older: Buffer) {
        older.facts.append(&mut self.facts);
        for (kind, mut rows) in std::mem::take(&mut self.traces) {
            older.traces.entry(kind).or_default().append(&mut rows);
        }
        older.errors.append(&mut self.errors);
        older.jobs.append(&mut self.jobs);
        older.calibration = older.calibration.or(self.calibration);
        *self = older;
    }
}

/// The single writer of a sweep's tables.
#[derive(Debug)]
pub struct Writer {
    out: Location,
    buffer: Mutex<Buffer>,
    /// Serialises flushes and holds the next commit number.
    next_seq: tokio::sync::Mutex<u64>,
    totals: Mutex<Totals>,
    n_layers: Mutex<Option<u32>>,
    last_seq: std::sync::atomic::AtomicU64,
}

impl Writer {
    /// A writer that continues the journal after commit `last_seq`.
    pub fn new(out: Location, last_seq: u64, totals: Totals) -> Self {
        Self {
            out,
            buffer: Mutex::new(Buffer::default()),
            next_seq: tokio::sync::Mutex::new(last_seq + 1),
            totals: Mutex::new(totals),
            n_layers: Mutex::new(None),
            last_seq: std::sync::atomic::AtomicU64::new(last_seq),
        }
    }

    /// Adds rows under the buffer's lock.
    pub fn with_buffer<R>(&self, f: impl FnOnce(&mut Buffer) -> R) -> R {
        let mut guard = self.buffer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// Records the model's layer count in the next commit.
    pub fn set_n_layers(&self, n: u32) {
        *self.n_layers.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(n);
    }

    /// Commits in the journal so far.
    pub fn commits(&self) -> u64 {
        self.last_seq.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts over everything committed.
    pub fn totals(&self) -> Totals {
        self.totals.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Commits the buffer; returns the commit, or `None` when there was nothing to commit.
    /// On a storage error the rows go back into the buffer for the next try.
    pub async fn flush(&self) -> anyhow::Result<Option<Commit>> {
        let mut seq = self.next_seq.lock().await;
        let taken = self.with_buffer(std::mem::take);
        if taken.is_empty() {
            return Ok(None);
        }
        let n_layers = *self.n_layers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match self.write(*seq, &taken, n_layers).await {
            Ok(commit) => {
                self.last_seq.store(*seq, std::sync::atomic::Ordering::Relaxed);
                *seq += 1;
                self.totals
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .add(&commit.counts);
                Ok(Some(commit))
            }
            Err(e) => {
                self.with_buffer(|b| b.merge_back(taken));
                Err(e)
            }
        }
    }

    async fn write(
        &self,
        seq: u64,
        buffer: &Buffer,
        n_layers: Option<u32>,
    ) -> anyhow::Result<Commit> {
        let mut commit = Commit {
            seq,
            jobs: buffer.jobs.clone(),
            calibration: buffer.calibration,
            n_layers,
            ..Commit::default()
        };
        let part = format!("part-{seq:08}.parquet");
        if !buffer.facts.is_empty() {
            let name = format!("facts/{part}");
            let bytes = write_parquet(&facts_batch(&buffer.facts)?, &name)?;
            self.out.write(&name, bytes).await?;
            commit.files.push(name);
            commit.counts.facts = buffer.facts.len() as u64;
            commit.counts.facts_traced = buffer.facts.iter().filter(|f| f.traced).count() as u64;
        }
        for (kind, rows) in &buffer.traces {
            if rows.is_empty() {
                continue;
            }
            let name = format!("traces/kind={kind}/{part}");
            let bytes = write_parquet(&traces_batch(rows)?, &name)?;
            self.out.write(&name, bytes).await?;
            commit.files.push(name);
            commit.counts.trace_rows.insert(kind.name().to_string(), rows.len() as u64);
        }
        if !buffer.errors.is_empty() {
            let name = format!("errors/{part}");
            let bytes = write_parquet(&errors_batch(&buffer.errors)?, &name)?;
            self.out.write(&name, bytes).await?;
            commit.files.push(name);
            commit.counts.errors = buffer.errors.len() as u64;
        }
        journal::append(&self.out, &commit).await?;
        Ok(commit)
    }
}
