//! `worker serve`: register with a coordinator, then lease, compute and hand in jobs until
//! the sweep is finished.
//!
//! - Heartbeats run beside the computation (which runs on a blocking thread), so a long job
//!   keeps its lease.
//! - When the coordinator cannot be reached, every call is retried with exponential backoff
//!   on the same channel (it reconnects by itself), as the same worker, so a dropped
//!   connection costs nothing: the lease is still held and the result is kept. A coordinator
//!   that restarted no longer knows this worker (NOT_FOUND), so it registers again; a result
//!   finished under the old registration is dropped (its lease died with the old
//!   coordinator, which queues the job again).
//! - SIGTERM (or Ctrl-C): a job in progress gets `--grace-secs` to finish and be handed in;
//!   otherwise it is released (given back without counting as a failure). Then it exits.

pub mod fetch;
pub mod job;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tonic::{Code, Status};

use crate::load::LoadedModel;
use crate::trace::TraceOptions;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The coordinator: its URL, with TLS when it is https://.
    pub coordinator: tonic::transport::Endpoint,
    /// The token sent with every request.
    pub token: Option<proto::auth::Token>,
    /// For the coordinator's logs.
    pub name: String,
    /// The model's fingerprint.
    pub fingerprint: String,
    /// What the worker reports about itself.
    pub capabilities: proto::Capabilities,
    /// Seconds a job may take to finish after SIGTERM before it is released.
    pub grace: Duration,
    /// Give up when the coordinator has been unreachable this long.
    pub give_up: Duration,
    /// The fast path's batching (its `layers` are each job's own).
    pub batching: TraceOptions,
    /// Held before each job (fault-injection tests only).
    pub job_delay: Duration,
}

/// A registered session with the coordinator.
struct Session {
    client: proto::auth::Client,
    worker_id: String,
    heartbeat: Duration,
}

/// Why the serve loop stopped talking to the coordinator for a moment.
enum Interrupt {
    /// The coordinator does not know us (it restarted): register again.
    Reregister,
    /// It cannot be reached: back off, then reconnect.
    Unreachable(Status),
}

fn classify(status: Status) -> anyhow::Result<Interrupt> {
    match status.code() {
        Code::NotFound => Ok(Interrupt::Reregister),
        Code::Unavailable
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::Internal => Ok(Interrupt::Unreachable(status)),
        _ => bail!("the coordinator refused: {}", status.message()),
    }
}

/// Exponential backoff between 200 ms and 5 s, and the give-up clock.
struct Backoff {
    delay: Duration,
    since: Option<Instant>,
    give_up: Duration,
}

impl Backoff {
    fn new(give_up: Duration) -> Self {
        Self { delay: Duration::from_millis(200), since: None, give_up }
    }

    async fn wait(&mut self, why: &str) -> anyhow::Result<()> {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() > self.give_up {
            bail!(
                "the coordinator has been unreachable for {:.0} s ({why}); giving up",
                since.elapsed().as_secs_f64()
            );
        }
        tracing::warn!("coordinator unreachable ({why}); retrying in {:?}", self.delay);
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        Ok(())
    }

    fn reset(&mut self) {
        self.delay = Duration::from_millis(200);
        self.since = None;
    }
}

/// A finished job's result, until the coordinator has it.
struct Finished {
    job_id: String,
    lease_id: u64,
    result: proto::complete_request::Result,
    seconds: f64,
}

/// Serves until the sweep is finished or a signal arrives.
pub async fn serve(loaded: Arc<LoadedModel>, opts: ServeOptions) -> anyhow::Result<()> {
    let mut shutdown = Shutdown::new()?;
    let mut backoff = Backoff::new(opts.give_up);
    'session: loop {
        if shutdown.requested() {
            return Ok(());
        }
        let mut session = match register(&opts).await {
            Ok(session) => session,
            Err(RegisterError::Refused(e)) => return Err(e),
            Err(RegisterError::Unreachable(why)) => {
                backoff.wait(&why).await?;
                continue;
            }
        };
        backoff.reset();
        loop {
            if shutdown.requested() {
                return Ok(());
            }
            let reply = session
                .client
                .lease(proto::LeaseRequest { worker_id: session.worker_id.clone() })
                .await;
            let reply = match reply {
                Ok(r) => {
                    backoff.reset();
                    r.into_inner()
                }
                Err(status) => match classify(status)? {
                    Interrupt::Reregister => continue 'session,
                    // The channel reconnects by itself: ask again on it, as the same worker
                    // (a lease granted in a reply that was lost is granted again).
                    Interrupt::Unreachable(s) => {
                        backoff.wait(s.message()).await?;
                        continue;
                    }
                },
            };
            match reply.reply {
                Some(proto::lease_reply::Reply::Job(job)) => {
                    let outcome = run_job(&loaded, &opts, &mut session, &job, &mut shutdown).await;
                    match outcome {
                        JobOutcome::Done(result, seconds) => {
                            let finished = Finished {
                                job_id: job.job_id.clone(),
                                lease_id: job.lease_id,
                                result: *result,
                                seconds,
                            };
                            if !hand_in(&session, &finished, &mut backoff).await? {
                                // Its lease died with the coordinator's memory of this
                                // worker: the job is queued again and computed anew.
                                tracing::info!(
                                    job = finished.job_id,
                                    "the coordinator restarted; this result is no longer wanted"
                                );
                                continue 'session;
                            }
                            tracing::info!(
                                job = finished.job_id,
                                seconds = finished.seconds,
                                "handed in"
                            );
                        }
                        JobOutcome::Failed(e) => {
                            tracing::warn!(
                                job = job.job_id,
                                stage = e.stage,
                                "failed: {}",
                                e.message
                            );
                            let request = proto::FailRequest {
                                worker_id: session.worker_id.clone(),
                                job_id: job.job_id.clone(),
                                lease_id: job.lease_id,
                                stage: e.stage.into(),
                                message: e.message,
                                release: false,
                                permanent: e.permanent,
                            };
                            // A lost failure report costs only a lease expiry.
                            let _ = session.client.fail(request).await;
                        }
                        JobOutcome::Released => {
                            tracing::info!(job = job.job_id, "released: shutting down");
                            let request = proto::FailRequest {
                                worker_id: session.worker_id.clone(),
                                job_id: job.job_id.clone(),
                                lease_id: job.lease_id,
                                stage: "shutdown".into(),
                                message: "the worker is shutting down".into(),
                                release: true,
                                permanent: false,
                            };
                            let _ = session.client.fail(request).await;
                            return Ok(());
                        }
                    }
                }
                Some(proto::lease_reply::Reply::Wait(w)) => {
                    let wait = Duration::from_millis(w.retry_ms.clamp(10, 10_000));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.wait() => {}
                    }
                }
                Some(proto::lease_reply::Reply::Finished(_)) => {
                    tracing::info!("the sweep is finished");
                    return Ok(());
                }
                None => bail!("the coordinator sent an empty lease reply"),
            }
        }
    }
}

enum RegisterError {
    Refused(anyhow::Error),
    Unreachable(String),
}

async fn register(opts: &ServeOptions) -> Result<Session, RegisterError> {
    let endpoint =
        opts.coordinator.clone().connect_timeout(Duration::from_secs(5)).tcp_nodelay(true);
    let channel =
        endpoint.connect().await.map_err(|e| RegisterError::Unreachable(e.to_string()))?;
    let mut client = proto::auth::client(channel, opts.token.clone());
    let request = proto::RegisterRequest {
        name: opts.name.clone(),
        model_fingerprint: opts.fingerprint.clone(),
        capabilities: Some(opts.capabilities.clone()),
    };
    match client.register(request).await {
        Ok(reply) => {
            let reply = reply.into_inner();
            tracing::info!(worker = reply.worker_id, sweep = reply.sweep_id, "registered");
            Ok(Session {
                client,
                worker_id: reply.worker_id,
                heartbeat: Duration::from_millis(reply.heartbeat_ms.max(10)),
            })
        }
        Err(status) => match classify(status) {
            Ok(Interrupt::Unreachable(s)) => {
                Err(RegisterError::Unreachable(s.message().to_string()))
            }
            Ok(Interrupt::Reregister) => Err(RegisterError::Unreachable("not found".into())),
            Err(e) => Err(RegisterError::Refused(e)),
        },
    }
}

/// Hands in a result, waiting out an unreachable coordinator on the same connection (it
/// reconnects by itself, and this worker's lease is still good when it comes back); `false`
/// when the coordinator no longer knows this worker (it restarted): register again.
async fn hand_in(
    session: &Session,
    finished: &Finished,
    backoff: &mut Backoff,
) -> anyhow::Result<bool> {
    loop {
        let request = proto::CompleteRequest {
            worker_id: session.worker_id.clone(),
            job_id: finished.job_id.clone(),
            lease_id: finished.lease_id,
            seconds: finished.seconds,
            result: Some(finished.result.clone()),
        };
        match session.client.clone().complete(request).await {
            Ok(reply) => {
                backoff.reset();
                if !reply.into_inner().accepted {
                    tracing::info!(
                        job = finished.job_id,
                        "result not kept (done by another worker, or this lease expired)"
                    );
                }
                return Ok(true);
            }
            Err(status) => match classify(status)? {
                Interrupt::Reregister => return Ok(false),
                Interrupt::Unreachable(s) => backoff.wait(s.message()).await?,
            },
        }
    }
}

enum JobOutcome {
    // Boxed: a trace result (with its metrics) is far larger than the other outcomes.
    Done(Box<proto::complete_request::Result>, f64),
    Failed(job::JobError),
    Released,
}

/// Computes a job on a blocking thread while heartbeating; on shutdown waits up to the grace
/// period, then releases it.
async fn run_job(
    loaded: &Arc<LoadedModel>,
    opts: &ServeOptions,
    session: &mut Session,
    job: &proto::Job,
    shutdown: &mut Shutdown,
) -> JobOutcome {
    let Some(work) = job.work.clone() else {
        return JobOutcome::Failed(job::JobError {
            stage: "lease",
            message: "a job without work".into(),
            permanent: true,
        });
    };
    let started = Instant::now();
    let model = loaded.clone();
    let (batching, delay) = (opts.batching.clone(), opts.job_delay);
    // The fault-injection tests read this line to know a job is in flight.
    let what = match &work {
        proto::job::Work::Calibration(c) => {
            format!("noise calibration over {} subjects", c.subjects.len())
        }
        proto::job::Work::Trace(t) => match &t.fact {
            Some(f) => format!(
                "fact {} ({:?}), layers {}..{}",
                f.known_id, f.subject, t.layer_start, t.layer_end
            ),
            None => "a trace without a fact".into(),
        },
    };
    tracing::info!(job = job.job_id, lease = job.lease_id, "computing: {what}");
    let mut task = tokio::task::spawn_blocking(move || {
        // Holding the job (tests only) keeps it in flight long enough to kill a process
        // while it is; heartbeats go on meanwhile, as for a slow job.
        std::thread::sleep(delay);
        job::compute(&model, &work, &batching)
    });
    let mut beat = tokio::time::interval(session.heartbeat);
    beat.tick().await;
    let mut grace_deadline: Option<tokio::time::Instant> = None;
    loop {
        let grace = async {
            match grace_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            joined = &mut task => {
                let seconds = started.elapsed().as_secs_f64();
                return match joined {
                    Ok(Ok(result)) => JobOutcome::Done(Box::new(result), seconds),
                    Ok(Err(e)) => JobOutcome::Failed(e),
                    Err(e) => JobOutcome::Failed(job::JobError {
                        stage: "trace",
                        message: format!("the computation panicked: {e}"),
                        permanent: false,
                    }),
                };
            }
            _ = beat.tick() => {
                let request = proto::HeartbeatRequest {
                    worker_id: session.worker_id.clone(),
                    job_id: job.job_id.clone(),
                    lease_id: job.lease_id,
                };
                match session.client.heartbeat(request).await {
                    Ok(reply) if !reply.get_ref().keep_going => {
                        tracing::info!(job = job.job_id, "lease lost; finishing anyway (the result may still be first)");
                    }
                    Ok(_) => {}
                    Err(status) => tracing::debug!("heartbeat failed: {}", status.message()),
                }
            }
            () = shutdown.wait(), if grace_deadline.is_none() => {
                tracing::info!(job = job.job_id, "shutting down: {:?} to finish the job", opts.grace);
                grace_deadline = Some(tokio::time::Instant::now() + opts.grace);
            }
            () = grace => {
                return JobOutcome::Released;
            }
        }
    }
}

/// SIGTERM and Ctrl-C, remembered once seen.
struct Shutdown {
    term: tokio::signal::unix::Signal,
    seen: bool,
}

impl Shutdown {
    fn new() -> anyhow::Result<Self> {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot listen for SIGTERM")?;
        Ok(Self { term, seen: false })
    }

    fn requested(&mut self) -> bool {
        // Polls without waiting: a pending signal is taken now.
        use std::task::Context as TaskContext;
        if !self.seen {
            let waker = futures::task::noop_waker();
            let mut cx = TaskContext::from_waker(&waker);
            if self.term.poll_recv(&mut cx).is_ready() {
                self.seen = true;
            }
        }
        self.seen
    }

    async fn wait(&mut self) {
        if self.seen {
            return;
        }
        tokio::select! {
            _ = self.term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        self.seen = true;
    }
}
