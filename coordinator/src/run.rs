//! `coordinator run`: the whole sweep, from the dataset to the committed tables.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::dataset_formats::parse_knowns;
use common::fingerprint::model_fingerprint;
use common::retry::{self, retry};
use common::storage::Location;
use common::sweep::{CALIBRATION_JOB, SweepSettings};
use common::tables::ErrorRow;
use tokio::net::TcpListener;

use crate::cli::RunArgs;
use crate::journal::{self, Totals};
use crate::local::{LocalWorkers, WorkerCommand, find_worker_bin};
use crate::manifest::{self, DatasetInfo, JobsInfo, Manifest, NoiseInfo};
use crate::metrics::Metrics;
use crate::progress::Progress;
use crate::scheduler::{JobSpec, Scheduler, Work};
use crate::service::{Service, Shared, Sweep};
use crate::writer::Writer;

/// The pseudo-job whose commit holds the dataset's broken records.
const DATASET_JOB: &str = "dataset";

fn check_args(args: &RunArgs) -> anyhow::Result<()> {
    args.trace.check().map_err(anyhow::Error::msg)?;
    if !["f32", "f16", "bf16"].contains(&args.dtype.as_str()) {
        bail!("--dtype {}: expected f32, f16 or bf16", args.dtype);
    }
    if args.layers_per_job == Some(0) {
        bail!("--layers-per-job must be at least 1");
    }
    if !(args.lease_secs > 0.0 && args.flush_secs > 0.0 && args.linger_secs >= 0.0) {
        bail!("--lease-secs and --flush-secs must be positive, --linger-secs not negative");
    }
    if args.storage_give_up_secs.is_nan() || args.storage_give_up_secs < 0.0 {
        bail!("--storage-give-up-secs must not be negative");
    }
    if let Some(id) = &args.sweep_id {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            bail!("--sweep-id {id:?}: use letters, digits, '.', '_' and '-'");
        }
    }
    Ok(())
}

/// Runs or resumes a sweep.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    let started = Instant::now();
    let listen = args.listen.unwrap_or_else(|| {
        if args.local_workers.is_some() { "127.0.0.1:0" } else { "0.0.0.0:50051" }
            .parse()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
    });
    let token = proto::auth::Token::configured(args.token_file.as_deref())?;
    let tls = proto::tls::server_config(
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.tls_client_ca.as_deref(),
    )?;
    if tls.is_some() && args.local_workers.is_some_and(|n| n > 0) {
        bail!(
            "--tls-cert with --local-workers: local workers talk to the coordinator over \
             loopback, without TLS; use TLS for remote workers"
        );
    }
    let server = crate::server::builder(tls)?;
    if token.is_none() && !listen.ip().is_loopback() && !args.insecure_no_auth {
        bail!(
            "--listen {listen} is reachable beyond this machine, but no token is set: give one \
             in CT_TOKEN or --token-file (workers need the same), or pass --insecure-no-auth \
             on a network where every peer is trusted"
        );
    }

    // Start-up reads wait out a failing store like commits do (`--storage-give-up-secs`):
    // a coordinator restarted during an outage should not crash-loop.
    let give_up = Duration::try_from_secs_f64(args.storage_give_up_secs).unwrap_or(Duration::MAX);
    let knowns_at =
        Location::open(&args.knowns, false).with_context(|| format!("--knowns {}", args.knowns))?;
    let bytes = retry("reading the dataset", give_up, || async { Ok(knowns_at.read().await?) })
        .await
        .with_context(|| format!("--knowns {}", args.knowns))?;
    let dataset_digest = format!("blake3:{}", blake3_hex(&bytes));
    let knowns = parse_knowns(&args.knowns, &bytes)?;
    let subjects: Vec<String> = knowns.facts.iter().map(|f| f.subject.clone()).collect();
    let mut facts = knowns.facts;
    let valid = facts.len() as u64;
    if let Some(limit) = args.limit {
        facts.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    for err in &knowns.errors {
        tracing::warn!("{}: {err}", args.knowns);
    }

    let model_at =
        Location::open(&args.model, false).with_context(|| format!("--model {}", args.model))?;
    let model_fingerprint =
        retry("reading the model", give_up, || async { Ok(model_fingerprint(&model_at).await?) })
            .await
            .with_context(|| format!("--model {}", args.model))?;
    let settings = SweepSettings {
        dataset_digest,
        model_fingerprint,
        kinds: args.trace.kinds.clone(),
        samples: args.trace.samples,
        window: args.trace.window,
        noise: args.trace.noise,
        replace: args.trace.replace,
        seed_mode: args.trace.seed_mode,
        seed: args.trace.seed,
        correctness: args.trace.correctness,
        layers_per_job: args.layers_per_job,
        limit: args.limit,
        dtype: args.dtype.clone(),
    };
    let sweep_id = args.sweep_id.clone().unwrap_or_else(|| settings.default_sweep_id());
    let root = Location::open(&args.out, true).with_context(|| format!("--out {}", args.out))?;
    let mut out = root.child(&sweep_id);
    let injected = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if let Some(plan) = args.inject_storage_faults {
        tracing::warn!(?plan, "injecting storage faults");
        out = out.with_faults(plan, injected.clone());
    }

    let previous = retry("reading the manifest", give_up, || manifest::read(&out)).await?;
    if let Some(m) = &previous {
        let differences = m.settings.differences(&settings);
        if !differences.is_empty() {
            bail!(
                "sweep {sweep_id} in {} was started with other settings ({}); use another --sweep-id or --out",
                out.display,
                differences.join("; ")
            );
        }
        // With `--linger-secs inf` (Kubernetes) a finished sweep still serves its status
        // until it is stopped, instead of exiting into a restart loop.
        if m.state == "finished" && args.linger_secs.is_finite() {
            println!("sweep {sweep_id} is already finished: nothing to do");
            print_summary(m, &out.display, None);
            return Ok(());
        }
        tracing::info!("resuming sweep {sweep_id}");
    }
    // Replay only reads and deletes uncommitted files, so it can be repeated.
    let replayed = retry("replaying the journal", give_up, || journal::replay(&out)).await?;
    if replayed.last_seq > 0 {
        eprintln!(
            "resuming sweep {sweep_id}: {} jobs committed in {} commits{}",
            replayed.done.len(),
            replayed.last_seq,
            if replayed.orphans_deleted > 0 {
                format!(", {} uncommitted files deleted", replayed.orphans_deleted)
            } else {
                String::new()
            }
        );
    }

    let model_name = model_name(&args.model);
    let shared = Arc::new(Shared {
        sweep: Sweep {
            id: sweep_id.clone(),
            settings: settings.clone(),
            facts,
            subjects,
            model_name,
            out_display: out.display.clone(),
        },
        sched: Mutex::new(Scheduler::new(
            Duration::from_secs_f64(args.lease_secs),
            args.max_attempts,
        )),
        writer: Writer::new(out.clone(), replayed.last_seq, replayed.totals.clone()),
        metrics: Arc::new(Metrics::default()),
        n_layers: OnceLock::new(),
        calibration: OnceLock::new(),
        committed: replayed.done.iter().cloned().collect::<HashSet<_>>(),
        failed_before: replayed.failed.clone(),
        started,
        lease: Duration::from_secs_f64(args.lease_secs),
        flush_now: tokio::sync::Notify::new(),
        fatal: OnceLock::new(),
    });
    if let Some(c) = replayed.calibration {
        let _ = shared.calibration.set(c);
    }
    if settings.noise.needs_calibration() && !shared.sweep.facts.is_empty() {
        let calibration = JobSpec { id: CALIBRATION_JOB.into(), work: Work::Calibration };
        let done = replayed.calibration.is_some();
        lock_sched(&shared).add([calibration], |_| done);
    }
    if let Some(n) = replayed.n_layers {
        shared.set_n_layers(n).map_err(anyhow::Error::msg)?;
    }
    if !knowns.errors.is_empty() && !replayed.done.contains(DATASET_JOB) {
        shared.writer.with_buffer(|b| {
            for e in &knowns.errors {
                b.errors.push(ErrorRow {
                    known_id: e.known_id,
                    record: Some(e.index as u64),
                    job: None,
                    stage: "dataset".into(),
                    message: e.message.clone(),
                });
            }
            b.jobs.push(DATASET_JOB.into());
        });
    }
    let mut info = ManifestInfo {
        args: &args,
        created: previous.as_ref().map_or_else(manifest::now_unix, |m| m.created_unix),
        dataset: DatasetInfo {
            valid,
            invalid: knowns.errors.len() as u64,
            in_sweep: shared.sweep.facts.len() as u64,
        },
    };
    let running = info.manifest(&shared, "running");
    retry("writing the manifest", give_up, || manifest::write(&out, &running)).await?;

    // Servers: gRPC (with health) for workers, HTTP for metrics.
    let listener = TcpListener::bind(listen).await.with_context(|| format!("--listen {listen}"))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grpc = tokio::spawn(crate::server::serve_grpc(
        server,
        listener,
        Service(shared.clone()),
        token,
        stop_rx.clone(),
    ));
    if let Some(metrics_addr) = args.metrics_listen {
        let http = TcpListener::bind(metrics_addr)
            .await
            .with_context(|| format!("--metrics-listen {metrics_addr}"))?;
        let mut rx = stop_rx.clone();
        let metrics = shared.metrics.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = crate::metrics::serve(http, metrics, stopped).await {
                tracing::error!("metrics server: {e}");
            }
        });
    }
    eprintln!(
        "sweep {sweep_id}: {} facts, listening on {addr}, writing to {}",
        shared.sweep.facts.len(),
        out.display
    );

    let mut local = match args.local_workers {
        Some(n) if n > 0 => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let command = WorkerCommand {
                bin: find_worker_bin(args.worker_bin.as_deref()),
                coordinator: format!("http://{addr}"),
                model: args.model.clone(),
                threads: args.worker_threads.unwrap_or((cores / n).max(1)),
                dtype: args.dtype.clone(),
                device: args.worker_device.clone(),
                // A token from $CT_TOKEN reaches the children through the environment.
                token_file: args.token_file.clone(),
            };
            Some(LocalWorkers::start(command, n)?)
        }
        _ => None,
    };

    let outcome = drive(&shared, &args, &out, &mut info, local.as_mut()).await;
    let state = match &outcome {
        Ok(true) => "finished",
        Ok(false) => "running",
        Err(_) => "failed",
    };
    // Last commit, then the manifest; rows that cannot be written are lost only with a
    // storage failure, and then the jobs are simply redone by the next run.
    let flushed = flush_with_retries(&shared, &out, &mut info, state, &args).await;
    if args.inject_storage_faults.is_some() {
        eprintln!(
            "storage faults injected: {}",
            injected.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    if state == "finished" && args.linger_secs > 0.0 {
        // `inf` lingers until SIGTERM; any linger ends early on one.
        let linger = async {
            match Duration::try_from_secs_f64(args.linger_secs) {
                Ok(d) => tokio::time::sleep(d).await,
                Err(_) => std::future::pending().await,
            }
        };
        let mut signals = Signals::new()?;
        tokio::select! {
            () = linger => {}
            () = signals.recv() => {}
        }
    }
    let _ = stop_tx.send(true);
    if let Some(local) = local {
        local.stop(Duration::from_secs(10)).await;
    }
    // Graceful shutdown waits for clients to hang up; a stuck one must not hold us here.
    let _ = tokio::time::timeout(Duration::from_secs(5), grpc).await;
    flushed?;
    let finished = outcome?;
    let m = info.manifest(&shared, state);
    if finished {
        print_summary(&m, &out.display, Some(started.elapsed()));
        Ok(())
    } else {
        bail!("interrupted; run the same command again to resume sweep {sweep_id}")
    }
}

/// The run loop: expires leases, flushes, reports progress. `Ok(true)` when the sweep
/// finished, `Ok(false)` when interrupted.
async fn drive(
    shared: &Arc<Shared>,
    args: &RunArgs,
    out: &Location,
    info: &mut ManifestInfo<'_>,
    mut local: Option<&mut LocalWorkers>,
) -> anyhow::Result<bool> {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let flush_every = Duration::from_secs_f64(args.flush_secs);
    let mut last_flush = Instant::now();
    let mut progress = Progress::new();
    let mut signals = Signals::new()?;
    let mut storage = StorageHealth::new(args.storage_give_up_secs);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.flush_now.notified() => {}
            () = signals.recv() => {
                progress.finish();
                eprintln!("stopping: committing what is done");
                return Ok(false);
            }
        }
        let given_up = lock_sched(shared).expire(Instant::now());
        shared.record_given_up(given_up);
        let status = shared.status();
        shared.metrics.set_counts(&lock_sched(shared).counts(Instant::now()));
        progress.update(&status);
        if let Some(local) = local.as_deref_mut() {
            // Workers that cannot start (a broken model, a bad device) die at once, however
            // often they are restarted: say so instead of waiting for workers forever.
            if local.watch() == 0 && status.state != "finished" {
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
        let due = buffered >= args.flush_rows || last_flush.elapsed() >= flush_every;
        if (due || calibrated_now) && storage.may_try() {
            match flush(shared, out, info, "running").await {
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
        if lock_sched(shared).calibration_failed() {
            progress.finish();
            bail!(
                "the calibration job failed on every try (see the errors table); the sweep cannot go on"
            );
        }
        if status.state == "finished" {
            progress.finish();
            return Ok(true);
        }
    }
}

async fn flush(
    shared: &Shared,
    out: &Location,
    info: &mut ManifestInfo<'_>,
    state: &str,
) -> anyhow::Result<()> {
    let before = shared.writer.totals();
    let commit = shared.writer.flush().await?;
    if let Some(commit) = &commit {
        let rows = |t: &Totals| t.trace_rows_total() + t.facts + t.errors;
        shared.metrics.rows_written.inc_by(rows(&shared.writer.totals()) - rows(&before));
        tracing::debug!(seq = commit.seq, jobs = commit.jobs.len(), "committed");
    }
    if commit.is_some() || state != "running" {
        manifest::write(out, &info.manifest(shared, state)).await?;
    }
    Ok(())
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

/// The last commit, retried like any other.
async fn flush_with_retries(
    shared: &Shared,
    out: &Location,
    info: &mut ManifestInfo<'_>,
    state: &str,
    args: &RunArgs,
) -> anyhow::Result<()> {
    let mut storage = StorageHealth::new(args.storage_give_up_secs);
    loop {
        match flush(shared, out, info, state).await {
            Ok(()) => return Ok(()),
            Err(e) => storage.failed(e)?,
        }
        tokio::time::sleep_until(storage.next_try.into()).await;
    }
}

/// What the manifest needs besides the shared state.
struct ManifestInfo<'a> {
    args: &'a RunArgs,
    created: u64,
    dataset: DatasetInfo,
}

impl ManifestInfo<'_> {
    fn manifest(&mut self, shared: &Shared, state: &str) -> Manifest {
        let c = lock_sched(shared).counts(Instant::now());
        let calibration = shared.calibration.get();
        let level = match shared.sweep.settings.noise {
            common::settings::NoiseSpec::Level(l) => Some(l),
            common::settings::NoiseSpec::Uniform(k) => Some(k),
            common::settings::NoiseSpec::StdMultiple(_) => calibration.map(|c| c.level),
        };
        let totals = shared.writer.totals();
        Manifest {
            sweep_id: shared.sweep.id.clone(),
            state: state.into(),
            settings: shared.sweep.settings.clone(),
            knowns: self.args.knowns.clone(),
            model: self.args.model.clone(),
            n_layers: shared.n_layers.get().copied(),
            noise: NoiseInfo {
                spec: shared.sweep.settings.noise.to_string(),
                level,
                std: calibration.map(|c| c.std),
            },
            dataset: self.dataset.clone(),
            jobs: JobsInfo { total: c.total, done: c.done, failed: c.failed, retries: c.retries },
            commits: totals_commits(shared),
            rows: totals,
            created_unix: self.created,
            updated_unix: manifest::now_unix(),
            coordinator_version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

fn totals_commits(shared: &Shared) -> u64 {
    shared.writer.commits()
}

fn print_summary(m: &Manifest, out: &str, elapsed: Option<Duration>) {
    let took = elapsed.map_or(String::new(), |d| format!(" in {:.1} s", d.as_secs_f64()));
    println!("sweep {} {}{took}", m.sweep_id, m.state);
    println!(
        "  facts: {} in the sweep, {} traced, {} not traced (not predicted); {} broken records",
        m.dataset.in_sweep,
        m.rows.facts_traced,
        m.rows.facts - m.rows.facts_traced,
        m.dataset.invalid
    );
    let per_kind: Vec<String> = m.rows.trace_rows.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "  rows: traces {} ({}), facts {}, errors {}; jobs {} done, {} given up",
        m.rows.trace_rows_total(),
        per_kind.join(", "),
        m.rows.facts,
        m.rows.errors,
        m.jobs.done,
        m.jobs.failed
    );
    if let Some(level) = m.noise.level {
        println!("  noise: {} (level {level})", m.noise.spec);
    }
    println!("  output: {out}/ (facts/, traces/kind=*/, errors/, manifest.json)");
}

fn lock_sched(shared: &Shared) -> std::sync::MutexGuard<'_, Scheduler> {
    shared.sched.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// A short model name for the `model` column: the file or folder name.
fn model_name(model: &str) -> String {
    let trimmed = model.trim_end_matches('/');
    let last = trimmed.rsplit('/').next().unwrap_or(trimmed);
    last.strip_suffix(".gguf").unwrap_or(last).to_string()
}

/// SIGTERM and Ctrl-C.
struct Signals {
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        Ok(Self { term })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
}
