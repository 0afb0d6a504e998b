//! The `worker` command line: argument types and the commands behind them.

mod predict;
mod serve;
mod trace;

use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

pub use predict::{PredictArgs, run_predict};
pub use serve::{ServeArgs, run_serve};
pub use trace::{NoiseLevelArgs, TraceArgs, run_noise_level, run_trace};

use crate::load::{LoadOptions, LoadedModel, load_model};

/// The causal-tracing worker.
#[derive(Debug, Parser)]
#[command(name = "worker", version, about)]
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
    /// Print the most likely next tokens of a prompt.
    Predict(PredictArgs),
    /// Causal trace of one fact: how much of p(answer) restoring each state brings back.
    Trace(TraceArgs),
    /// Print the `sK` noise level of a model over the subjects of a knowns file.
    NoiseLevel(NoiseLevelArgs),
    /// Work for a sweep coordinator: lease jobs, compute them, hand in the results.
    Serve(ServeArgs),
}

/// Where and how to run a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A Hugging Face model folder (config.json, safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a worker built with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights and activations: `f32`, `f16` or `bf16`.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// On CUDA, let f32 matmuls round their inputs to TF32 on the tensor cores: several times
    /// faster, not exact (docs/performance.md measures how far from f32). No effect on a CPU.
    #[arg(long)]
    pub tf32: bool,
}

impl ModelArgs {
    /// The load options these arguments describe.
    pub fn load_options(&self) -> anyhow::Result<LoadOptions> {
        Ok(LoadOptions { device: parse_device(&self.device)?, dtype: parse_dtype(&self.dtype)? })
    }

    /// Loads the model these arguments name.
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let opts = self.load_options()?;
        // cuBLAS's math mode is process-wide in candle, so it is set once, before any matmul.
        candle_core::cuda::set_gemm_reduced_precision_f32(self.tf32);
        load_model(&self.model, &opts).with_context(|| format!("loading {}", self.model.display()))
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).context("cannot open CUDA device 0"),
        _ => match s.strip_prefix("cuda:") {
            Some(n) => {
                let n: usize =
                    n.parse().with_context(|| format!("--device {s}: bad device number"))?;
                Device::new_cuda(n).with_context(|| format!("cannot open CUDA device {n}"))
            }
            None => bail!("--device {s}: expected cpu, cuda or cuda:N"),
        },
    }
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => bail!("--dtype {s}: expected f32, f16 or bf16"),
    }
}
