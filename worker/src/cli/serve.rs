//! `worker serve`: the worker of a distributed sweep.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use common::fingerprint::model_fingerprint;
use common::storage::Location;

use crate::load::load_model;
use crate::serve::{ServeOptions, fetch::local_model, serve};
use crate::trace::TraceOptions;

/// `worker serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The coordinator's gRPC URL, e.g. http://coordinator:50051.
    #[arg(long, env = "CT_COORDINATOR")]
    pub coordinator: String,
    /// The model: a Hugging Face folder or a .gguf file, as a path or an s3://, gs://, az://
    /// or https:// URL (copied into --cache once).
    #[arg(long, env = "CT_MODEL")]
    pub model: String,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights and activations: must be the sweep's.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// A name for the coordinator's logs (default: host name and process id).
    #[arg(long)]
    pub name: Option<String>,
    /// A file holding the coordinator's token (else `$CT_TOKEN`, if set).
    #[arg(long, env = "CT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// TLS to an https:// coordinator.
    #[command(flatten)]
    pub tls: common::flags::ClientTlsFlags,
    /// Where models named by URL are cached.
    #[arg(long, env = "CT_MODEL_CACHE")]
    pub cache: Option<PathBuf>,
    /// On SIGTERM, seconds a job in progress may take to finish before it is released.
    #[arg(long, default_value_t = 20.0)]
    pub grace_secs: f64,
    /// Exit with an error after the coordinator has been unreachable this long (seconds).
    #[arg(long, default_value_t = 600.0)]
    pub give_up_secs: f64,
    /// Fast path memory bound: (row × token) states per batched forward (default: 8192 on a
    /// CPU, 131072 on a GPU).
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// Fast path: traced tokens whose cells share one batched forward (default: 1 on a CPU,
    /// all on a GPU). More means fewer, larger layer calls and some recomputed tokens.
    #[arg(long)]
    pub tokens_per_batch: Option<usize>,
    /// Fault-injection tests: hold every job this long before computing it, so that a test
    /// can kill a worker or the coordinator while jobs are in flight.
    #[arg(long, default_value_t = 0, hide = true)]
    pub job_delay_ms: u64,
}

/// Runs `worker serve`.
pub fn run_serve(args: &ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let token = proto::auth::Token::configured(args.token_file.as_deref())?;
    let (ca, cert, key) = args.tls.paths();
    let tls = proto::tls::client_config_if(ca, cert, key)?;
    // Made now, so that a bad URL or TLS file fails before the model loads.
    let coordinator = proto::tls::endpoint(&args.coordinator, tls).map_err(anyhow::Error::msg)?;
    let result = runtime.block_on(async {
        let cache = args.cache.clone().unwrap_or_else(default_cache);
        let path = local_model(&args.model, &cache).await?;
        let at = Location::open(&path.display().to_string(), false)?;
        let fingerprint =
            model_fingerprint(&at).await.with_context(|| format!("--model {}", args.model))?;
        let model_args = super::ModelArgs {
            model: path.clone(),
            device: args.device.clone(),
            dtype: args.dtype.clone(),
            tf32: false,
        };
        let opts = model_args.load_options()?;
        let loaded = tokio::task::spawn_blocking(move || load_model(&path, &opts))
            .await?
            .with_context(|| format!("loading {}", args.model))?;
        let dims = loaded.model.dims();
        let capabilities = proto::Capabilities {
            device: args.device.clone(),
            dtype: args.dtype.clone(),
            threads: candle_core::utils::get_num_threads() as u32,
            n_layers: dims.n_layers as u32,
            d_model: dims.d_model as u32,
            n_heads: dims.n_heads as u32,
            family: loaded.model.family().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let name = args.name.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
            format!("{host}-{}", std::process::id())
        });
        let batching = TraceOptions::for_device(
            loaded.model.device(),
            args.max_batch_tokens,
            args.tokens_per_batch,
        );
        tracing::info!(
            name = name.as_str(),
            model = %args.model,
            family = capabilities.family.as_str(),
            layers = dims.n_layers,
            device = args.device.as_str(),
            dtype = args.dtype.as_str(),
            threads = capabilities.threads,
            max_batch_tokens = batching.max_batch_tokens,
            "worker {name} ready: {} ({}, {} layers) on {} in {}, {} threads; serving {}",
            args.model,
            capabilities.family,
            dims.n_layers,
            args.device,
            args.dtype,
            capabilities.threads,
            args.coordinator
        );
        let opts = ServeOptions {
            coordinator,
            token,
            name,
            fingerprint,
            capabilities,
            grace: Duration::from_secs_f64(args.grace_secs.max(0.0)),
            give_up: Duration::from_secs_f64(args.give_up_secs.max(0.0)),
            batching,
            job_delay: Duration::from_millis(args.job_delay_ms),
        };
        serve(Arc::new(loaded), opts).await
    });
    // A released job may still be computing on a blocking thread: do not wait for it.
    runtime.shutdown_background();
    result
}

/// `$XDG_CACHE_HOME/causal-trace/models` or `~/.cache/causal-trace/models`.
fn default_cache() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("causal-trace").join("models")
}
