//! `worker predict`.

use std::io::Write;

use clap::Args;

use super::ModelArgs;
use crate::predict::predict;

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

/// Runs `worker predict`, writing to `out`.
pub fn run_predict(args: &PredictArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
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
