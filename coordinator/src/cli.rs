//! The `coordinator` command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use common::flags::{ClientTlsFlags, ExperimentFlags};

/// The causal-tracing sweep coordinator.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run (or resume) a sweep: shard the dataset, lease jobs to workers, write the tables.
    Run(Box<RunArgs>),
    /// Print the live state of a running sweep.
    Status(StatusArgs),
    /// Average a sweep's traces into ROME's Figure 2: summary tables and plots.
    Aggregate(crate::aggregate::AggregateArgs),
}

/// `coordinator run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The knowns dataset: a JSON array, JSON Lines (.jsonl) or Parquet file; a path or a
    /// file://, https://, s3://, gs:// or az:// URL.
    #[arg(long)]
    pub knowns: String,
    /// The model: a Hugging Face folder or a .gguf file, as a path or URL. Workers must run
    /// the same model (checked by fingerprint).
    #[arg(long)]
    pub model: String,
    /// Where the sweep's folder goes: a path or an object-store URL.
    #[arg(long)]
    pub out: String,
    /// Start this many worker processes here; without it, wait for remote workers.
    #[arg(long)]
    pub local_workers: Option<usize>,
    /// Threads per local worker (default: the cores shared out among them).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// The device of each local worker: `cpu`, `cuda` or `cuda:N` (a worker built with
    /// `--features cuda`). Several workers may share one GPU.
    #[arg(long, default_value = "cpu")]
    pub worker_device: String,
    /// The worker binary for --local-workers (default: `worker` beside this binary, then PATH).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// The gRPC address workers connect to (default 127.0.0.1:0 with --local-workers,
    /// 0.0.0.0:50051 without).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Serve Prometheus metrics and /healthz here.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// A file holding the token every worker must present (else `$CT_TOKEN`, if set).
    #[arg(long, env = "CT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Listen beyond loopback without a token: only on a network where every peer is trusted.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Serve gRPC over TLS with this certificate (PEM; with --tls-key).
    #[arg(long, env = "CT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "CT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Demand a client certificate issued by this CA from every worker (mTLS; PEM).
    #[arg(long, env = "CT_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// The sweep's id (default: a digest of its settings, so the same command resumes it).
    #[arg(long)]
    pub sweep_id: Option<String>,
    /// Trace only the first N valid facts of the dataset.
    #[arg(long)]
    pub limit: Option<u64>,
    /// The experiment: what is corrupted, restored and measured.
    #[command(flatten)]
    pub experiment: ExperimentFlags,
    /// Layers per job (default: all layers of a fact in one job).
    #[arg(long)]
    pub layers_per_job: Option<u32>,
    /// Weights and activations on the workers: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Seconds a lease lasts without a heartbeat.
    #[arg(long, default_value_t = 30.0)]
    pub lease_secs: f64,
    /// Tries of a job before it is recorded as an error.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// Commit buffered rows at least this often (seconds).
    #[arg(long, default_value_t = 30.0)]
    pub flush_secs: f64,
    /// Commit as soon as this many trace rows are buffered.
    #[arg(long, default_value_t = 2_000_000)]
    pub flush_rows: usize,
    /// How long commits may keep failing (retried with backoff; results stay buffered)
    /// before the sweep stops, committed results intact, to be resumed (seconds).
    #[arg(long, default_value_t = 600.0)]
    pub storage_give_up_secs: f64,
    /// Drills and tests: fail this share of the results store's operations
    /// (`RATE[,after=N][,seed=S]`).
    #[arg(long, hide = true)]
    pub inject_storage_faults: Option<common::faults::FaultPlan>,
    /// After the sweep finishes, keep answering "finished" to workers this long (seconds);
    /// `inf` serves status, health and metrics until SIGTERM (a Kubernetes Deployment).
    #[arg(long, default_value_t = 2.0)]
    pub linger_secs: f64,
}

/// `coordinator status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The coordinator's gRPC URL, e.g. http://127.0.0.1:50051.
    #[arg(long)]
    pub coordinator: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// A file holding the sweep's token (else `$CT_TOKEN`, if set).
    #[arg(long, env = "CT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// TLS to an https:// coordinator.
    #[command(flatten)]
    pub tls: ClientTlsFlags,
}
