//! The gRPC service: registration, leases, heartbeats, results and failures, over the shared
//! sweep state. Handlers take the scheduler's lock briefly and never across an await.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::dataset::KnownFact;
use common::donor::{Candidate, Relations};
use common::experiment::Noise;
use common::kinds::Geometry;
use common::sweep::{CALIBRATION_JOB, SweepSettings, layer_ranges, trace_job_id};
use common::tables::ErrorRow;
use proto::coordinator_server::Coordinator;
use proto::{job, lease_reply};
use tonic::{Request, Response, Status};

use crate::journal::Calibration;
use crate::metrics::Metrics;
use crate::results::{JobContext, job_rows};
use crate::scheduler::{Completion, Failure, GivenUp, JobSpec, LeaseOutcome, Scheduler, Work};
use crate::writer::Writer;

/// The most layers a worker may report.
const MAX_LAYERS: u32 = 1024;
/// The most heads per layer a worker may report.
const MAX_HEADS: u32 = 1024;

/// Why a worker's model cannot serve this sweep.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SweepError {
    /// Another worker (or the journal) reported another shape.
    #[error("the sweep's model has {known} {what}, this worker's {reported}")]
    ShapeDiffers {
        /// `layers` or `heads per layer`.
        what: &'static str,
        /// Known before.
        known: u32,
        /// Reported now.
        reported: u32,
    },
    /// The experiment does not fit the model (a window wider than the model).
    #[error("{0}")]
    DoesNotFit(String),
}

/// Where the sweep stands, as `coordinator status` and the progress line say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No worker has registered (or all have gone).
    WaitingForWorkers,
    /// The calibration job runs; trace jobs wait for its level.
    Calibrating,
    /// Trace jobs run.
    Running,
    /// Every job is done or given up.
    Finished,
}

impl Phase {
    /// The name `coordinator status` prints.
    pub fn name(self) -> &'static str {
        match self {
            Phase::WaitingForWorkers => "waiting for workers",
            Phase::Calibrating => "calibrating",
            Phase::Running => "running",
            Phase::Finished => "finished",
        }
    }
}
/// The longest failure message and stage name kept, in bytes.
const MAX_MESSAGE: usize = 4096;
const MAX_STAGE: usize = 64;

/// Cuts `s` to at most `max` bytes, at a character boundary, saying so.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(" [cut]");
    }
}

/// What does not change during a sweep.
#[derive(Debug)]
pub struct Sweep {
    /// The sweep id.
    pub id: String,
    /// Its settings.
    pub settings: SweepSettings,
    /// The facts it traces.
    pub facts: Vec<KnownFact>,
    /// Every valid subject of the dataset: ROME measures the `sK` level over all of them.
    pub subjects: Vec<String>,
    /// Every valid fact of the dataset, in file order (`facts` is its first part): STR
    /// chooses donors among all of them, whatever `--limit` says.
    pub dataset: Vec<KnownFact>,
    /// `dataset`'s facts by relation (empty unless the corruption is STR).
    pub relations: Relations,
    /// The model's name, for the `model` column.
    pub model_name: String,
    /// Where the tables go, for messages.
    pub out_display: String,
}

/// The state the service and the run loop share.
#[derive(Debug)]
pub struct Shared {
    /// Fixed facts about the sweep.
    pub sweep: Sweep,
    /// Jobs and leases.
    pub sched: Mutex<Scheduler>,
    /// The tables' writer.
    pub writer: Writer,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The model's layer count, from the first worker (or the journal).
    pub n_layers: OnceLock<u32>,
    /// The model's query heads per layer, from the first worker.
    pub n_heads: OnceLock<u32>,
    /// The calibration, once known.
    pub calibration: OnceLock<Calibration>,
    /// Jobs committed by earlier runs.
    pub committed: HashSet<String>,
    /// Of those, the ones given up.
    pub failed_before: HashSet<String>,
    /// When this run started.
    pub started: Instant,
    /// Lease length.
    pub lease: Duration,
    /// Wakes the run loop to flush at once (after the calibration).
    pub flush_now: tokio::sync::Notify,
    /// Set when the sweep cannot go on (e.g. its settings do not fit the model).
    pub fatal: OnceLock<String>,
    /// Set once the last commit of a finished sweep is in storage: only then are workers
    /// told "finished". Before it, a coordinator that dies between its last job and its last
    /// commit would have sent its workers home, leaving the run that resumes it without any.
    pub committed_all: OnceLock<()>,
}

/// The reply to a lease of a sweep with every job done: "finished" once the last commit is
/// in storage, else "wait" (the run loop is committing; if it dies first, the run that
/// resumes the sweep finds these workers still there).
fn finished_reply(committed_all: bool) -> lease_reply::Reply {
    if committed_all {
        lease_reply::Reply::Finished(proto::Finished {})
    } else {
        lease_reply::Reply::Wait(proto::Wait { retry_ms: 250 })
    }
}

fn lock(m: &Mutex<Scheduler>) -> std::sync::MutexGuard<'_, Scheduler> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// The scheduler, locked (briefly, and never across an await).
    pub fn sched(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        lock(&self.sched)
    }

    /// Records the model's shape from a registration: the first one creates the trace jobs,
    /// later ones must agree.
    pub fn set_model(&self, n_layers: u32, n_heads: u32) -> Result<(), SweepError> {
        if let Some(&known) = self.n_heads.get()
            && known != n_heads
        {
            let what = "heads per layer";
            return Err(SweepError::ShapeDiffers { what, known, reported: n_heads });
        }
        self.set_n_layers(n_layers)?;
        let geometry = Geometry { n_layers: n_layers as usize, n_heads: n_heads as usize };
        if let Err(e) = self.sweep.settings.experiment.check_model(geometry) {
            let message = e.to_string();
            let _ = self.fatal.set(message.clone());
            return Err(SweepError::DoesNotFit(message));
        }
        let _ = self.n_heads.set(n_heads);
        Ok(())
    }

    /// Creates the trace jobs once the layer count is known (from a registration, or the
    /// journal at start-up).
    pub fn set_n_layers(&self, n_layers: u32) -> Result<(), SweepError> {
        if let Some(&known) = self.n_layers.get() {
            return if known == n_layers {
                Ok(())
            } else {
                Err(SweepError::ShapeDiffers { what: "layers", known, reported: n_layers })
            };
        }
        let window = self.sweep.settings.experiment.window;
        if window > n_layers {
            let message = format!("--window {window} is more than the model's {n_layers} layers");
            let _ = self.fatal.set(message.clone());
            return Err(SweepError::DoesNotFit(message));
        }
        if self.n_layers.set(n_layers).is_err() {
            return Ok(()); // another registration won the race with the same fingerprint
        }
        self.writer.set_n_layers(n_layers);
        let ranges = layer_ranges(n_layers, self.sweep.settings.layers_per_job);
        let specs = self.sweep.facts.iter().enumerate().flat_map(|(i, fact)| {
            ranges.iter().map(move |layers| JobSpec {
                id: trace_job_id(fact.known_id, layers),
                work: Work::Trace { fact: i, layers: layers.clone() },
            })
        });
        let mut sched = lock(&self.sched);
        sched.add(specs, |id| self.committed.contains(id));
        sched.mark_given_up(&self.failed_before);
        Ok(())
    }

    /// The noise the trace jobs add, once its level is known: the one place a sweep resolves
    /// it (from the rule, or from the calibration's std for `sK`).
    pub fn noise(&self) -> Option<Noise> {
        let std = self.calibration.get().map(|c| c.std);
        self.sweep.settings.experiment.noise()?.resolve(std).ok()
    }

    /// STR's donor candidates of fact `fact` of the sweep (none for noise).
    pub fn candidates(&self, fact: usize) -> Vec<Candidate> {
        self.sweep.relations.candidates(&self.sweep.dataset, fact)
    }

    /// The model's shape, once a worker has registered.
    fn geometry(&self) -> Option<Geometry> {
        let n_layers = *self.n_layers.get()? as usize;
        Some(Geometry { n_layers, n_heads: *self.n_heads.get()? as usize })
    }

    fn job_message(&self, spec: &JobSpec, lease_id: u64) -> Option<proto::Job> {
        let work = match &spec.work {
            Work::Calibration => {
                job::Work::Calibration(proto::Calibration { subjects: self.sweep.subjects.clone() })
            }
            Work::Trace { fact: index, layers } => {
                // Noise waits for its level (the calibration); STR has none.
                let noise = match self.sweep.settings.experiment.noise() {
                    Some(_) => Some(proto::Noise::from(&self.noise()?)),
                    None => None,
                };
                let fact = &self.sweep.facts[*index];
                job::Work::Trace(proto::TraceJob {
                    fact: Some(proto::Fact {
                        known_id: fact.known_id,
                        prompt: fact.prompt.clone(),
                        subject: fact.subject.clone(),
                        attribute: fact.attribute.clone(),
                    }),
                    layer_start: layers.start,
                    layer_end: layers.end,
                    experiment: Some(proto::Experiment::from(&self.sweep.settings.experiment)),
                    noise,
                    candidates: self
                        .candidates(*index)
                        .iter()
                        .map(proto::DonorCandidate::from)
                        .collect(),
                })
            }
        };
        Some(proto::Job { job_id: spec.id.clone(), lease_id, work: Some(work) })
    }

    /// Records jobs given up as `errors` rows.
    pub fn record_given_up(&self, given_up: Vec<GivenUp>) {
        if given_up.is_empty() {
            return;
        }
        self.writer.with_buffer(|b| {
            for g in given_up {
                let known_id = match g.spec.work {
                    Work::Trace { fact, .. } => Some(self.sweep.facts[fact].known_id),
                    Work::Calibration => None,
                };
                tracing::warn!(job = g.spec.id, stage = g.stage, "given up: {}", g.message);
                b.errors.push(ErrorRow {
                    known_id,
                    record: None,
                    job: Some(g.spec.id.clone()),
                    stage: g.stage,
                    message: g.message,
                });
                b.failed.push(g.spec.id.clone());
                b.jobs.push(g.spec.id);
            }
        });
    }

    fn check_worker(&self, worker: &str) -> Result<(), Status> {
        if lock(&self.sched).knows(worker, Instant::now()) {
            Ok(())
        } else {
            Err(Status::not_found(format!("unknown worker {worker}: register again")))
        }
    }

    /// Where the sweep stands.
    pub fn phase(&self) -> Phase {
        let sched = lock(&self.sched);
        let c = sched.counts(Instant::now());
        if sched.finished() && (self.sweep.facts.is_empty() || self.n_layers.get().is_some()) {
            Phase::Finished
        } else if c.workers == 0 {
            Phase::WaitingForWorkers
        } else if sched.calibrating() {
            Phase::Calibrating
        } else {
            Phase::Running
        }
    }

    /// The live state, for `coordinator status` and the progress line.
    pub fn status(&self) -> proto::StatusReply {
        let phase = self.phase();
        let c = lock(&self.sched).counts(Instant::now());
        let per_fact = self
            .n_layers
            .get()
            .map_or(1, |&n| layer_ranges(n, self.sweep.settings.layers_per_job).len() as u64);
        let calibrates = self.sweep.settings.experiment.needs_calibration();
        let trace_jobs_ended = (c.done + c.failed).saturating_sub(u64::from(calibrates));
        let totals = self.writer.totals();
        proto::StatusReply {
            sweep_id: self.sweep.id.clone(),
            state: phase.name().into(),
            facts_total: self.sweep.facts.len() as u64,
            facts_done: if self.n_layers.get().is_some() { trace_jobs_ended / per_fact } else { 0 },
            jobs_total: c.total,
            jobs_queued: c.queued,
            jobs_leased: c.leased,
            jobs_done: c.done,
            jobs_failed: c.failed,
            retries: c.retries,
            workers: c.workers,
            rows_written: totals.trace_rows_total() + totals.facts + totals.errors,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            out: self.sweep.out_display.clone(),
        }
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Service(pub Arc<Shared>);

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterReply>, Status> {
        let r = request.into_inner();
        let shared = &self.0;
        let settings = &shared.sweep.settings;
        if r.model_fingerprint != settings.model_fingerprint {
            tracing::warn!(
                worker = r.name,
                "refused: model {} is not the sweep's",
                r.model_fingerprint
            );
            return Err(Status::failed_precondition(format!(
                "this worker's model ({}) is not the sweep's ({}): start it with the sweep's model",
                r.model_fingerprint, settings.model_fingerprint
            )));
        }
        let caps = r.capabilities.unwrap_or_default();
        if caps.dtype != settings.dtype {
            return Err(Status::failed_precondition(format!(
                "this worker runs {}, the sweep {}: start it with --dtype {}",
                caps.dtype, settings.dtype, settings.dtype
            )));
        }
        // The first worker's layer count sizes the job table: bound it, so that a wrong
        // one cannot make billions of jobs (the largest models have about a hundred).
        if caps.n_layers == 0 || caps.n_layers > MAX_LAYERS {
            return Err(Status::invalid_argument(format!(
                "capabilities.n_layers is {}: expected 1 to {MAX_LAYERS}",
                caps.n_layers
            )));
        }
        if caps.n_heads == 0 || caps.n_heads > MAX_HEADS {
            return Err(Status::invalid_argument(format!(
                "capabilities.n_heads is {}: expected 1 to {MAX_HEADS}",
                caps.n_heads
            )));
        }
        shared
            .set_model(caps.n_layers, caps.n_heads)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let worker_id = lock(&shared.sched).register(&r.name, Instant::now());
        tracing::info!(worker = worker_id, name = r.name, device = caps.device, "registered");
        let lease_ms = shared.lease.as_millis() as u64;
        Ok(Response::new(proto::RegisterReply {
            worker_id,
            sweep_id: shared.sweep.id.clone(),
            heartbeat_ms: (lease_ms / 3).max(1),
            lease_ms,
            dtype: settings.dtype.clone(),
        }))
    }

    async fn lease(
        &self,
        request: Request<proto::LeaseRequest>,
    ) -> Result<Response<proto::LeaseReply>, Status> {
        let worker = request.into_inner().worker_id;
        let shared = &self.0;
        shared.check_worker(&worker)?;
        let outcome = lock(&shared.sched).lease(&worker, Instant::now());
        let reply = match outcome {
            LeaseOutcome::Job(lease) => match shared.job_message(&lease.spec, lease.lease_id) {
                Some(job) => lease_reply::Reply::Job(job),
                None => {
                    // No noise level (the calibration was given up): hand it back and wait.
                    let release =
                        Failure { stage: "lease", message: "", release: true, permanent: false };
                    lock(&shared.sched).fail(&worker, &lease.spec.id, lease.lease_id, release);
                    lease_reply::Reply::Wait(proto::Wait { retry_ms: 1000 })
                }
            },
            LeaseOutcome::Wait => lease_reply::Reply::Wait(proto::Wait { retry_ms: 250 }),
            LeaseOutcome::Finished => finished_reply(shared.committed_all.get().is_some()),
        };
        Ok(Response::new(proto::LeaseReply { reply: Some(reply) }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let r = request.into_inner();
        self.0.check_worker(&r.worker_id)?;
        let keep_going =
            lock(&self.0.sched).heartbeat(&r.worker_id, &r.job_id, r.lease_id, Instant::now());
        Ok(Response::new(proto::HeartbeatReply { keep_going }))
    }

    async fn complete(
        &self,
        request: Request<proto::CompleteRequest>,
    ) -> Result<Response<proto::CompleteReply>, Status> {
        let r = request.into_inner();
        let shared = &self.0;
        shared.check_worker(&r.worker_id)?;
        let accepted = match r.result {
            Some(proto::complete_request::Result::Calibration(c)) => {
                accept_calibration(shared, &r.worker_id, &r.job_id, r.lease_id, c)
            }
            Some(proto::complete_request::Result::Trace(t)) => {
                accept_trace(shared, &r.worker_id, &r.job_id, r.lease_id, &t)
            }
            None => return Err(Status::invalid_argument("a completion needs a result")),
        };
        if accepted {
            shared.metrics.completions.inc();
            shared.metrics.job_seconds.observe(r.seconds);
        }
        Ok(Response::new(proto::CompleteReply { accepted }))
    }

    async fn fail(
        &self,
        request: Request<proto::FailRequest>,
    ) -> Result<Response<proto::FailReply>, Status> {
        let mut r = request.into_inner();
        let shared = &self.0;
        shared.check_worker(&r.worker_id)?;
        // A failure's text goes into the log and the errors table: keep it to a size a
        // person reads, whatever a worker sends.
        truncate(&mut r.message, MAX_MESSAGE);
        truncate(&mut r.stage, MAX_STAGE);
        if !r.release {
            tracing::warn!(
                worker = r.worker_id,
                job = r.job_id,
                stage = r.stage,
                "failed: {}",
                r.message
            );
        }
        let failure = Failure {
            stage: &r.stage,
            message: &r.message,
            release: r.release,
            permanent: r.permanent,
        };
        let given_up = lock(&shared.sched).fail(&r.worker_id, &r.job_id, r.lease_id, failure);
        shared.record_given_up(given_up.into_iter().collect());
        Ok(Response::new(proto::FailReply {}))
    }

    async fn status(
        &self,
        _request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        Ok(Response::new(self.0.status()))
    }
}

fn accept_calibration(
    shared: &Shared,
    worker: &str,
    job_id: &str,
    lease_id: u64,
    c: proto::CalibrationResult,
) -> bool {
    let std = Some(c.std).filter(|s| s.is_finite() && *s >= 0.0);
    let rule = shared.sweep.settings.experiment.noise();
    let level = std.and_then(|std| rule?.resolve(Some(std)).ok());
    let (Some(std), Some(noise)) = (std, level) else {
        tracing::warn!(worker, job = job_id, "refused an invalid calibration result");
        return false;
    };
    if job_id != CALIBRATION_JOB {
        tracing::warn!(worker, job = job_id, "refused a calibration result for another job");
        return false;
    }
    let completion = lock(&shared.sched).complete(worker, job_id, lease_id, Instant::now());
    if !accepted(completion, worker, job_id) {
        return false;
    }
    let calibration = Calibration { std, level: noise.level, subjects: c.subjects };
    tracing::info!(std, level = noise.level, "calibrated the noise level");
    let _ = shared.calibration.set(calibration);
    shared.writer.with_buffer(|b| {
        b.calibration = Some(calibration);
        b.jobs.push(job_id.to_string());
    });
    shared.flush_now.notify_one();
    true
}

fn accept_trace(
    shared: &Shared,
    worker: &str,
    job_id: &str,
    lease_id: u64,
    result: &proto::TraceResult,
) -> bool {
    // Check the result against its job before it counts.
    let Some(spec) = lock(&shared.sched).spec(job_id) else { return false };
    let Work::Trace { fact, layers } = &spec.work else { return false };
    // Only registered workers hand in results, and the first registration set the shape.
    let Some(geometry) = shared.geometry() else { return false };
    let experiment = &shared.sweep.settings.experiment;
    let candidates = shared.candidates(*fact);
    let ctx = JobContext {
        fact: &shared.sweep.facts[*fact],
        layers,
        experiment,
        geometry,
        samples: experiment.samples() as u32,
        candidates: &candidates,
        model: &shared.sweep.model_name,
    };
    let rows = match job_rows(&ctx, result) {
        Ok(rows) => rows,
        Err(e) => {
            let message = e.to_string();
            let failure =
                Failure { stage: "result", message: &message, release: false, permanent: false };
            let given_up = lock(&shared.sched).fail(worker, job_id, lease_id, failure);
            shared.record_given_up(given_up.into_iter().collect());
            return false;
        }
    };
    // Buffer the rows under the scheduler's lock so that a flush never sees a job marked done
    // without its rows.
    let mut sched = lock(&shared.sched);
    if !accepted(sched.complete(worker, job_id, lease_id, Instant::now()), worker, job_id) {
        return false;
    }
    shared.writer.with_buffer(|b| {
        if let Some(row) = rows.fact {
            b.facts.push(row);
        }
        for row in rows.traces {
            b.traces.entry(row.kind).or_default().push(row);
        }
        b.jobs.push(job_id.to_string());
    });
    drop(sched);
    true
}

/// Whether a completion counts; refusals are logged (a worker handing in what it does not
/// hold is either slow, its lease having expired, or not to be trusted).
fn accepted(completion: Completion, worker: &str, job: &str) -> bool {
    match completion {
        Completion::Accepted => true,
        Completion::AlreadyDone => false,
        Completion::NotHeld => {
            tracing::warn!(worker, job, "refused a result: the worker holds no live lease on it");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_hear_finished_only_after_the_last_commit() {
        assert!(matches!(finished_reply(false), lease_reply::Reply::Wait(_)));
        assert!(matches!(finished_reply(true), lease_reply::Reply::Finished(_)));
    }
}
