//! The `worker` command line: argument types and the commands behind them.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use crate::load::{LoadOptions, load_model};
use crate::predict::predict;

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
}

impl ModelArgs {
    /// The load options these arguments describe.
    pub fn load_options(&self) -> anyhow::Result<LoadOptions> {
        Ok(LoadOptions { device: parse_device(&self.device)?, dtype: parse_dtype(&self.dtype)? })
    }
}

/// `worker predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt to continue.
    #[arg(long)]
    pub prompt: String,
    /// How many candidates to print.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Print one JSON object: {"tokens": [...], "top": [{"id", "token", "prob"}, ...]}.
    #[arg(long)]
    pub json: bool,
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

/// Runs `worker predict`, writing to `out`.
pub fn run_predict(args: &PredictArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let opts = args.model.load_options()?;
    let loaded = load_model(&args.model.model, &opts)
        .with_context(|| format!("loading {}", args.model.model.display()))?;
    let prediction = predict(&loaded, &args.prompt, args.top_k)?;
    if args.json {
        serde_json::to_writer(&mut *out, &prediction)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "prompt tokens ({}): {:?}", prediction.tokens.len(), prediction.tokens)?;
    writeln!(out, "{:>4}  {:>8}  {:>9}  token", "rank", "id", "prob")?;
    for (rank, t) in prediction.top.iter().enumerate() {
        writeln!(out, "{:>4}  {:>8}  {:>9.6}  {:?}", rank + 1, t.id, t.prob, t.token)?;
    }
    Ok(())
}
