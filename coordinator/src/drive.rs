//! The run loop of `coordinator run`: expire leases, commit results, report progress, and
//! decide when the sweep is finished, interrupted or cannot go on. Commits that fail are
//! retried with backoff while workers go on, up to `--storage-give-up-secs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use common::retry;
use common::storage::Location;

use crate::journal::Totals;
use crate::local::LocalWorkers;
use crate::manifest::{self, SweepState};
use crate::progress::Progress;
use crate::run::ManifestInfo;
use crate::service::{Phase, Shared};

/// How the run loop ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Every job is committed.
    Finished,
    /// A signal stopped it: the same command resumes it.
    Interrupted,
}

/// When to commit.
#[derive(Debug, Clone, Copy)]
pub struct FlushPolicy {
    /// Commit at least this often.
    pub every: Duration,
    /// Commit as soon as this many trace rows are buffered.
    pub rows: usize,
    /// How long commits may keep failing before the sweep stops (seconds).
    pub give_up_secs: f64,
}

/// The run loop: expires leases, flushes, reports progress.
pub async fn drive(
    shared: &Arc<Shared>,
    policy: FlushPolicy,
    out: &Location,
    info: &mut ManifestInfo<'_>,
    mut local: Option<&mut LocalWorkers>,
) -> anyhow::Result<Ending> {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_flush = Instant::now();
    let mut progress = Progress::new();
    let mut signals = Signals::new()?;
    let mut storage = StorageHealth::new(policy.give_up_secs);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.flush_now.notified() => {}
            () = signals.recv() => {
                progress.finish();
                eprintln!("stopping: committing what is done");
                return Ok(Ending::Interrupted);
            }
        }
        let given_up = shared.sched().expire(Instant::now());
        shared.record_given_up(given_up);
        let phase = shared.phase();
        shared.metrics.set_counts(&shared.sched().counts(Instant::now()));
        progress.update(&shared.status());
        if let Some(local) = local.as_deref_mut() {
            // Workers that cannot start (a broken model, a bad device) die at once, however
            // often they are restarted: say so instead of waiting for workers forever.
            if local.watch() == 0 && phase != Phase::Finished {
                progress.finish();
                bail!(
                    "every local worker has stopped, each after {} starts; their errors are \
                     above. Everything committed is safe: fix the cause and run the same \
                     command again to resume",
                    crate::local::MAX_RESTARTS + 1
                );
            }
        }
        let buffered = shared.writer.with_buffer(|b| b.trace_rows());
        let calibrated_now = shared.writer.with_buffer(|b| b.calibration.is_some());
        let due = buffered >= policy.rows || last_flush.elapsed() >= policy.every;
        if (due || calibrated_now) && storage.may_try() {
            match flush(shared, out, info, SweepState::Running).await {
                Ok(()) => {
                    storage.succeeded();
                    last_flush = Instant::now();
                }
                Err(e) => {
                    if let Err(stop) = storage.failed(e) {
                        progress.finish();
                        return Err(stop);
                    }
                }
            }
        }
        if let Some(message) = shared.fatal.get() {
            progress.finish();
            bail!("{message}");
        }
        if shared.sched().calibration_failed() {
            progress.finish();
            bail!(
                "the calibration job failed on every try (see the errors table); the sweep cannot go on"
            );
        }
        if phase == Phase::Finished {
            progress.finish();
            return Ok(Ending::Finished);
        }
    }
}

/// Commits the buffer; rewrites the manifest after a commit, and always when the sweep
/// stops.
async fn flush(
    shared: &Shared,
    out: &Location,
    info: &mut ManifestInfo<'_>,
    state: SweepState,
) -> anyhow::Result<()> {
    let before = shared.writer.totals();
    let commit = shared.writer.flush().await?;
    if let Some(commit) = &commit {
        let rows = |t: &Totals| t.trace_rows_total() + t.facts + t.errors;
        shared.metrics.rows_written.inc_by(rows(&shared.writer.totals()) - rows(&before));
        tracing::debug!(seq = commit.seq, jobs = commit.jobs.len(), "committed");
    }
    if commit.is_some() || state != SweepState::Running {
        manifest::write(out, &info.manifest(shared, state)).await?;
    }
    Ok(())
}

/// The last commit, retried like any other.
pub async fn flush_with_retries(
    shared: &Shared,
    out: &Location,
    info: &mut ManifestInfo<'_>,
    state: SweepState,
    give_up_secs: f64,
) -> anyhow::Result<()> {
    let mut storage = StorageHealth::new(give_up_secs);
    loop {
        match flush(shared, out, info, state).await {
            Ok(()) => return Ok(()),
            Err(e) => storage.failed(e)?,
        }
        tokio::time::sleep_until(storage.next_try.into()).await;
    }
}

/// Commits retried with backoff while the store fails; results wait in the buffer (and
/// workers keep working) until the failure has lasted `give_up`.
struct StorageHealth {
    give_up: Duration,
    failing_since: Option<Instant>,
    delay: Duration,
    next_try: Instant,
}

impl StorageHealth {
    const FIRST_DELAY: Duration = retry::FIRST_DELAY;
    const MAX_DELAY: Duration = retry::MAX_DELAY;

    fn new(give_up_secs: f64) -> Self {
        Self {
            give_up: Duration::try_from_secs_f64(give_up_secs).unwrap_or(Duration::MAX),
            failing_since: None,
            delay: Self::FIRST_DELAY,
            next_try: Instant::now(),
        }
    }

    fn may_try(&self) -> bool {
        Instant::now() >= self.next_try
    }

    fn succeeded(&mut self) {
        if let Some(since) = self.failing_since.take() {
            tracing::info!("storage works again after {:.1} s", since.elapsed().as_secs_f64());
        }
        self.delay = Self::FIRST_DELAY;
    }

    /// Records a failed commit; an error once failures have lasted too long, or at once for
    /// one that another try cannot fix (refused, or another coordinator on this sweep).
    fn failed(&mut self, e: anyhow::Error) -> anyhow::Result<()> {
        if !retry::is_transient(&e) {
            return Err(e.context(
                "committing results failed; everything committed before is safe: fix the \
                 cause and run the same command again to resume",
            ));
        }
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.give_up {
            return Err(e.context(format!(
                "committing results has failed for {:.0} s (--storage-give-up-secs); everything \
                 committed before is safe: run the same command again to resume",
                since.elapsed().as_secs_f64()
            )));
        }
        tracing::warn!("committing failed, retrying in {:?}: {e:#}", self.delay);
        self.next_try = Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(Self::MAX_DELAY);
        Ok(())
    }
}

/// SIGTERM and Ctrl-C.
pub struct Signals {
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Listens from now on.
    pub fn new() -> anyhow::Result<Self> {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        Ok(Self { term })
    }

    /// The next signal.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
}
