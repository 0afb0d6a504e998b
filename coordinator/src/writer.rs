//! Buffers result rows and flushes them as Parquet files plus one journal commit.
//!
//! Rows accumulate in memory (a job counts as done there, but only a commit makes it so for
//! a restarted coordinator). A flush writes one file per table (and per kind for `traces`),
//! sized by the flush policy rather than per fact, so DuckDB reads a handful of files.
//!
//! A commit that fails is sealed: it is retried with exactly the same rows, files and
//! journal record, and rows that arrive meanwhile wait for the next commit. A store can fail
//! after it did the write (the reply was lost); the retry then finds its own record already
//! there, byte for byte, and counts it as done. Were the retry to carry more rows than the
//! first try, files named by a landed record would hold rows of jobs it does not name, and a
//! resume would compute those jobs again: duplicates.

use std::collections::BTreeMap;
use std::sync::Mutex;

use common::kinds::Kind;
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
    /// Of `jobs`, those given up.
    pub failed: Vec<String>,
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
}

/// A commit that failed, to be retried unchanged.
#[derive(Debug)]
struct Sealed {
    buffer: Buffer,
    n_layers: Option<u32>,
}

#[derive(Debug)]
struct Commits {
    next_seq: u64,
    sealed: Option<Sealed>,
}

/// The single writer of a sweep's tables.
#[derive(Debug)]
pub struct Writer {
    out: Location,
    buffer: Mutex<Buffer>,
    /// Serialises flushes; holds the next commit number and a commit that failed.
    commits: tokio::sync::Mutex<Commits>,
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
            commits: tokio::sync::Mutex::new(Commits { next_seq: last_seq + 1, sealed: None }),
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

    /// Commits a sealed commit left by a failed flush, if any, then the buffer; returns the
    /// last commit, or `None` when there was nothing to commit. On a storage error what was
    /// being committed is sealed for the next try.
    pub async fn flush(&self) -> anyhow::Result<Option<Commit>> {
        let mut commits = self.commits.lock().await;
        let mut last = None;
        if let Some(sealed) = commits.sealed.take() {
            last = Some(self.commit(&mut commits, sealed).await?);
        }
        let buffer = self.with_buffer(std::mem::take);
        if buffer.is_empty() {
            return Ok(last);
        }
        let n_layers = *self.n_layers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.commit(&mut commits, Sealed { buffer, n_layers }).await.map(Some)
    }

    /// Writes `sealed` as the next commit; on failure keeps it sealed for the next try.
    async fn commit(&self, commits: &mut Commits, sealed: Sealed) -> anyhow::Result<Commit> {
        let seq = commits.next_seq;
        match self.write(seq, &sealed.buffer, sealed.n_layers).await {
            Ok(commit) => {
                self.last_seq.store(seq, std::sync::atomic::Ordering::Relaxed);
                commits.next_seq += 1;
                self.totals
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .add(&commit.counts);
                Ok(commit)
            }
            Err(e) => {
                commits.sealed = Some(sealed);
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
            failed: buffer.failed.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    fn add_jobs(writer: &Writer, ids: std::ops::Range<u64>) {
        writer.with_buffer(|b| {
            for i in ids {
                b.errors.push(ErrorRow {
                    known_id: Some(i),
                    record: None,
                    job: Some(format!("{i}:0-1")),
                    stage: "trace".into(),
                    message: "m".into(),
                });
                b.jobs.push(format!("{i}:0-1"));
            }
        });
    }

    /// The store writes a commit's journal record but the reply is lost, and reading it
    /// back fails too, so the flush fails; more rows arrive before the next flush. The retry
    /// must commit the same rows under the same record, or the landed record would name
    /// files holding rows of jobs it does not name (duplicated by a resume).
    #[tokio::test]
    async fn a_commit_whose_reply_was_lost_is_retried_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = Location::open(&dir.path().display().to_string(), true).expect("open");
        // Operation 0 writes the errors file; 1, the record, lands and fails; 2, its retry,
        // finds it; 3 to 6, reading it back, fail. Then the store heals.
        let plan = "1,after=1,lost=1,max=6".parse().expect("plan");
        let out = base.clone().with_faults(plan, Arc::new(AtomicU64::new(0)));
        let writer = Writer::new(out, 0, Totals::default());
        add_jobs(&writer, 0..3);
        writer.flush().await.expect_err("the reply was lost and the record cannot be read");
        assert!(base.exists(&journal::commit_name(1)).await.expect("exists"), "it landed");
        add_jobs(&writer, 3..5);
        let last = writer.flush().await.expect("the sealed commit, then the new rows");
        assert_eq!(last.map(|c| c.seq), Some(2));

        let replayed = journal::replay(&base).await.expect("replay");
        assert_eq!((replayed.last_seq, replayed.done.len()), (2, 5));
        for seq in 1..=2 {
            let record = base.read_child(&journal::commit_name(seq)).await.expect("record");
            let commit: Commit = serde_json::from_slice(&record).expect("commit");
            let mut in_files = Vec::new();
            for file in &commit.files {
                let bytes = base.read_child(file).await.expect("file");
                let rows = common::tables::read_errors(&bytes).expect("errors file");
                in_files.extend(rows.into_iter().filter_map(|r| r.job));
            }
            assert_eq!(in_files, commit.jobs, "commit {seq} names exactly its files' rows");
        }
    }
}
