//! `coordinator run`: the whole sweep, from the dataset to the committed tables, as the
//! steps of [`run`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::dataset::KnownFact;
use common::dataset_formats::parse_knowns;
use common::donor::Relations;
use common::experiment::Experiment;
use common::fingerprint::model_fingerprint;
use common::retry::retry;
use common::storage::Location;
use common::sweep::{CALIBRATION_JOB, SCHEMA, SweepSettings};
use common::tables::ErrorRow;
use tokio::net::TcpListener;

use crate::cli::RunArgs;
use crate::drive::{Ending, FlushPolicy, Signals, drive, flush_with_retries};
use crate::journal::{self, Replayed};
use crate::local::{LocalWorkers, WorkerCommand, find_worker_bin};
use crate::manifest::{self, DatasetInfo, JobsInfo, Manifest, NoiseInfo, SweepState};
use crate::metrics::Metrics;
use crate::scheduler::{JobSpec, Scheduler, Work};
use crate::service::{Service, Shared, Sweep};
use crate::writer::Writer;

/// The pseudo-job whose commit holds the dataset's broken records.
const DATASET_JOB: &str = "dataset";

/// Runs or resumes a sweep.
pub async fn run(args: RunArgs, log_json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let experiment = args.experiment.experiment()?;
    check_args(&args)?;
    let network = Network::configure(&args)?;
    let give_up = Duration::try_from_secs_f64(args.storage_give_up_secs).unwrap_or(Duration::MAX);
    let inputs = read_inputs(&args, give_up).await?;
    let settings = SweepSettings {
        schema: SCHEMA,
        dataset_digest: inputs.dataset_digest.clone(),
        model_fingerprint: inputs.model_fingerprint.clone(),
        experiment,
        layers_per_job: args.layers_per_job,
        limit: args.limit,
        dtype: args.dtype.clone(),
    };
    let sweep_id = args.sweep_id.clone().unwrap_or_else(|| settings.default_sweep_id());
    let (out, injected) = open_output(&args, &sweep_id)?;
    let previous = retry("reading the manifest", give_up, || manifest::read(&out)).await?;
    if let Some(m) = &previous
        && !resume_allowed(m, &settings, &out, &args)?
    {
        return Ok(());
    }
    // Replay only reads and deletes uncommitted files, so it can be repeated.
    let replayed = retry("replaying the journal", give_up, || journal::replay(&out)).await?;
    report_replay(&sweep_id, &replayed);

    let shared = Arc::new(shared_state(
        &args,
        sweep_id.clone(),
        settings,
        &inputs,
        &out,
        &replayed,
        started,
    ));
    queue_first_jobs(&shared, &replayed, &inputs)?;
    let mut info = ManifestInfo {
        args: &args,
        created: previous.as_ref().map_or_else(manifest::now_unix, |m| m.created_unix),
        dataset: inputs.dataset_info(shared.sweep.facts.len()),
    };
    let running = info.manifest(&shared, SweepState::Running);
    retry("writing the manifest", give_up, || manifest::write(&out, &running)).await?;

    let servers = network.serve(&shared, args.metrics_listen).await?;
    eprintln!(
        "sweep {sweep_id}: {} facts, listening on {}, writing to {}",
        shared.sweep.facts.len(),
        servers.addr,
        out.display
    );
    let mut local = start_local_workers(&args, servers.addr, log_json)?;

    let policy = FlushPolicy {
        every: Duration::from_secs_f64(args.flush_secs),
        rows: args.flush_rows,
        give_up_secs: args.storage_give_up_secs,
    };
    let outcome = drive(&shared, policy, &out, &mut info, local.as_mut()).await;
    let state = match &outcome {
        Ok(Ending::Finished) => SweepState::Finished,
        Ok(Ending::Interrupted) => SweepState::Running,
        Err(_) => SweepState::Failed,
    };
    // Last commit, then the manifest; rows that cannot be written are lost only with a
    // storage failure, and then the jobs are simply redone by the next run.
    let flushed =
        flush_with_retries(&shared, &out, &mut info, state, args.storage_give_up_secs).await;
    if args.inject_storage_faults.is_some() {
        eprintln!(
            "storage faults injected: {}",
            injected.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    if state == SweepState::Finished && flushed.is_ok() {
        // Everything is in storage: workers may now be told the sweep is finished, which
        // the linger leaves them time to hear.
        let _ = shared.committed_all.set(());
        linger(args.linger_secs).await?;
    }
    servers.stop(local).await;
    flushed?;
    match outcome? {
        Ending::Finished => {
            print_summary(&info.manifest(&shared, state), &out.display, Some(started.elapsed()));
            Ok(())
        }
        Ending::Interrupted => {
            bail!("interrupted; run the same command again to resume sweep {sweep_id}")
        }
    }
}

fn check_args(args: &RunArgs) -> anyhow::Result<()> {
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
    if let Some(id) = &args.sweep_id
        && (id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)))
    {
        bail!("--sweep-id {id:?}: use letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// Where and how workers reach the coordinator: checked before anything is read or written.
struct Network {
    listen: SocketAddr,
    token: Option<proto::auth::Token>,
    server: tonic::transport::Server,
}

impl Network {
    fn configure(args: &RunArgs) -> anyhow::Result<Self> {
        let listen = args.listen.unwrap_or_else(|| {
            let default =
                if args.local_workers.is_some() { "127.0.0.1:0" } else { "0.0.0.0:50051" };
            default.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
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
        Ok(Self { listen, token, server })
    }

    /// Binds the gRPC server (and the metrics server) and serves until [`Servers::stop`].
    async fn serve(
        self,
        shared: &Arc<Shared>,
        metrics_listen: Option<SocketAddr>,
    ) -> anyhow::Result<Servers> {
        let listener = TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("--listen {}", self.listen))?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let grpc = tokio::spawn(crate::server::serve_grpc(
            self.server,
            listener,
            Service(shared.clone()),
            self.token,
            stop_rx.clone(),
        ));
        if let Some(metrics_addr) = metrics_listen {
            let http = TcpListener::bind(metrics_addr)
                .await
                .with_context(|| format!("--metrics-listen {metrics_addr}"))?;
            let mut rx = stop_rx;
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
        Ok(Servers { addr, stop_tx, grpc })
    }
}

/// The running servers.
struct Servers {
    addr: SocketAddr,
    stop_tx: tokio::sync::watch::Sender<bool>,
    grpc: tokio::task::JoinHandle<()>,
}

impl Servers {
    /// Stops serving, and the local workers.
    async fn stop(self, local: Option<LocalWorkers>) {
        let _ = self.stop_tx.send(true);
        if let Some(local) = local {
            local.stop(Duration::from_secs(10)).await;
        }
        // Graceful shutdown waits for clients to hang up; a stuck one must not hold us here.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.grpc).await;
    }
}

/// What the sweep reads before it starts: the dataset and the model's fingerprint.
struct Inputs {
    dataset_digest: String,
    model_fingerprint: String,
    facts: Vec<KnownFact>,
    /// Every valid subject (the calibration measures all of them, whatever `--limit` says).
    subjects: Vec<String>,
    /// Every valid fact (STR's donors come from all of them).
    dataset: Vec<KnownFact>,
    valid: u64,
    errors: Vec<common::dataset::RecordError>,
}

impl Inputs {
    fn dataset_info(&self, in_sweep: usize) -> DatasetInfo {
        DatasetInfo {
            valid: self.valid,
            invalid: self.errors.len() as u64,
            in_sweep: in_sweep as u64,
        }
    }
}

/// Reads the dataset and fingerprints the model, waiting out a failing store like commits
/// do (`--storage-give-up-secs`): a coordinator restarted during an outage should not
/// crash-loop.
async fn read_inputs(args: &RunArgs, give_up: Duration) -> anyhow::Result<Inputs> {
    let knowns_at =
        Location::open(&args.knowns, false).with_context(|| format!("--knowns {}", args.knowns))?;
    let bytes = retry("reading the dataset", give_up, || async { Ok(knowns_at.read().await?) })
        .await
        .with_context(|| format!("--knowns {}", args.knowns))?;
    let dataset_digest = format!("blake3:{}", blake3::hash(&bytes).to_hex());
    let knowns = parse_knowns(&args.knowns, &bytes)?;
    for err in &knowns.errors {
        tracing::warn!("{}: {err}", args.knowns);
    }
    let subjects: Vec<String> = knowns.facts.iter().map(|f| f.subject.clone()).collect();
    let valid = knowns.facts.len() as u64;
    let dataset = knowns.facts.clone();
    let mut facts = knowns.facts;
    if let Some(limit) = args.limit {
        facts.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    let model_at =
        Location::open(&args.model, false).with_context(|| format!("--model {}", args.model))?;
    let model_fingerprint =
        retry("reading the model", give_up, || async { Ok(model_fingerprint(&model_at).await?) })
            .await
            .with_context(|| format!("--model {}", args.model))?;
    Ok(Inputs {
        dataset_digest,
        model_fingerprint,
        facts,
        subjects,
        dataset,
        valid,
        errors: knowns.errors,
    })
}

/// The sweep's folder, with injected storage faults in drills.
fn open_output(
    args: &RunArgs,
    sweep_id: &str,
) -> anyhow::Result<(Location, Arc<std::sync::atomic::AtomicU64>)> {
    let root = Location::open(&args.out, true).with_context(|| format!("--out {}", args.out))?;
    let mut out = root.child(sweep_id);
    let injected = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if let Some(plan) = args.inject_storage_faults {
        tracing::warn!(?plan, "injecting storage faults");
        out = out.with_faults(plan, injected.clone());
    }
    Ok((out, injected))
}

/// Whether an existing sweep of this id is to be continued: refused under other settings;
/// `false` (nothing to do) when it is finished, unless it lingers for Kubernetes.
fn resume_allowed(
    m: &Manifest,
    settings: &SweepSettings,
    out: &Location,
    args: &RunArgs,
) -> anyhow::Result<bool> {
    let differences = m.settings.differences(settings);
    if !differences.is_empty() {
        bail!(
            "sweep {} in {} was started with other settings ({}); use another --sweep-id or --out",
            m.sweep_id,
            out.display,
            differences.join("; ")
        );
    }
    // With `--linger-secs inf` (Kubernetes) a finished sweep still serves its status until
    // it is stopped, instead of exiting into a restart loop.
    if m.state == SweepState::Finished && args.linger_secs.is_finite() {
        println!("sweep {} is already finished: nothing to do", m.sweep_id);
        print_summary(m, &out.display, None);
        return Ok(false);
    }
    tracing::info!("resuming sweep {}", m.sweep_id);
    Ok(true)
}

fn report_replay(sweep_id: &str, replayed: &Replayed) {
    if replayed.last_seq == 0 {
        return;
    }
    let deleted = if replayed.orphans_deleted > 0 {
        format!(", {} uncommitted files deleted", replayed.orphans_deleted)
    } else {
        String::new()
    };
    eprintln!(
        "resuming sweep {sweep_id}: {} jobs committed in {} commits{deleted}",
        replayed.done.len(),
        replayed.last_seq,
    );
}

fn shared_state(
    args: &RunArgs,
    id: String,
    settings: SweepSettings,
    inputs: &Inputs,
    out: &Location,
    replayed: &Replayed,
    started: Instant,
) -> Shared {
    // STR's donor candidates come from every fact of the dataset; noise needs no index.
    let relations = match settings.experiment.is_str() {
        true => Relations::new(&inputs.dataset),
        false => Relations::default(),
    };
    Shared {
        sweep: Sweep {
            id,
            settings,
            facts: inputs.facts.clone(),
            subjects: inputs.subjects.clone(),
            dataset: inputs.dataset.clone(),
            relations,
            model_name: model_name(&args.model),
            out_display: out.display.clone(),
        },
        sched: Mutex::new(Scheduler::new(
            Duration::from_secs_f64(args.lease_secs),
            args.max_attempts,
        )),
        writer: Writer::new(out.clone(), replayed.last_seq, replayed.totals.clone()),
        metrics: Arc::new(Metrics::default()),
        n_layers: OnceLock::new(),
        n_heads: OnceLock::new(),
        calibration: replayed.calibration.map(OnceLock::from).unwrap_or_default(),
        committed: replayed.done.iter().cloned().collect::<HashSet<_>>(),
        failed_before: replayed.failed.clone(),
        started,
        lease: Duration::from_secs_f64(args.lease_secs),
        flush_now: tokio::sync::Notify::new(),
        fatal: OnceLock::new(),
        committed_all: OnceLock::new(),
    }
}

/// The calibration (first, when the noise rule needs one), the trace jobs when the journal
/// knows the model's layers, and the dataset's broken records as `errors` rows.
fn queue_first_jobs(shared: &Shared, replayed: &Replayed, inputs: &Inputs) -> anyhow::Result<()> {
    let experiment: &Experiment = &shared.sweep.settings.experiment;
    if experiment.needs_calibration() && !shared.sweep.facts.is_empty() {
        let calibration = JobSpec { id: CALIBRATION_JOB.into(), work: Work::Calibration };
        let done = replayed.calibration.is_some();
        shared.sched().add([calibration], |_| done);
    }
    if let Some(n) = replayed.n_layers {
        shared.set_n_layers(n)?;
    }
    if !inputs.errors.is_empty() && !replayed.done.contains(DATASET_JOB) {
        shared.writer.with_buffer(|b| {
            for e in &inputs.errors {
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
    Ok(())
}

fn start_local_workers(
    args: &RunArgs,
    addr: SocketAddr,
    log_json: bool,
) -> anyhow::Result<Option<LocalWorkers>> {
    let Some(n) = args.local_workers.filter(|&n| n > 0) else { return Ok(None) };
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
        // They log into the same stream, in the same format.
        log_json,
    };
    Ok(Some(LocalWorkers::start(command, n)?))
}

/// After a finished sweep, keep answering "finished" to workers for `secs`; `inf` until
/// SIGTERM. Any linger ends early on a signal.
async fn linger(secs: f64) -> anyhow::Result<()> {
    if secs <= 0.0 {
        return Ok(());
    }
    let wait = async {
        match Duration::try_from_secs_f64(secs) {
            Ok(d) => tokio::time::sleep(d).await,
            Err(_) => std::future::pending().await,
        }
    };
    let mut signals = Signals::new()?;
    tokio::select! {
        () = wait => {}
        () = signals.recv() => {}
    }
    Ok(())
}

/// What the manifest needs besides the shared state.
pub struct ManifestInfo<'a> {
    args: &'a RunArgs,
    created: u64,
    dataset: DatasetInfo,
}

impl ManifestInfo<'_> {
    /// The manifest as things stand.
    pub fn manifest(&mut self, shared: &Shared, state: SweepState) -> Manifest {
        let c = shared.sched().counts(Instant::now());
        let calibration = shared.calibration.get();
        let settings = &shared.sweep.settings;
        Manifest {
            sweep_id: shared.sweep.id.clone(),
            state,
            settings: settings.clone(),
            experiment_digest: settings.experiment.digest(),
            knowns: self.args.knowns.clone(),
            model: self.args.model.clone(),
            n_layers: shared.n_layers.get().copied(),
            n_heads: shared.n_heads.get().copied(),
            noise: NoiseInfo {
                spec: settings.experiment.noise().map(|n| n.noise.to_string()),
                level: shared.noise().map(|n| n.level),
                std: calibration.map(|c| c.std),
            },
            dataset: self.dataset.clone(),
            jobs: JobsInfo { total: c.total, done: c.done, failed: c.failed, retries: c.retries },
            commits: shared.writer.commits(),
            rows: shared.writer.totals(),
            created_unix: self.created,
            updated_unix: manifest::now_unix(),
            coordinator_version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

fn print_summary(m: &Manifest, out: &str, elapsed: Option<Duration>) {
    let took = elapsed.map_or(String::new(), |d| format!(" in {:.1} s", d.as_secs_f64()));
    println!("sweep {} {}{took}", m.sweep_id, m.state.name());
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
    match (&m.noise.spec, m.noise.level) {
        (Some(spec), Some(level)) => println!("  noise: {spec} (level {level})"),
        (None, _) => println!("  corruption: STR (the donors are in facts/)"),
        (Some(_), None) => {}
    }
    println!(
        "  direction: {}; metrics: prob, logprob, logit_diff, kl (traces columns score, \
         logprob, logit_diff, kl)",
        m.settings.experiment.direction
    );
    println!("  output: {out}/ (facts/, traces/kind=*/, errors/, manifest.json)");
}

/// A short model name for the `model` column: the file or folder name.
fn model_name(model: &str) -> String {
    let trimmed = model.trim_end_matches('/');
    let last = trimmed.rsplit('/').next().unwrap_or(trimmed);
    last.strip_suffix(".gguf").unwrap_or(last).to_string()
}
