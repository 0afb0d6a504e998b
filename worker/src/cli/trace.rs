//! `worker trace` and `worker noise-level`.

use std::io::Write;
use std::path::{Path as FsPath, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use common::dataset::read_knowns_file;

use super::ModelArgs;
use crate::load::LoadedModel;
use crate::trace::noise::{embedding_std, resolve};
use crate::trace::{
    Correctness, FactInput, FactTrace, Kind, NoiseSpec, Path, SeedMode, TraceConfig, trace_fact,
};

/// `worker trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt whose continuation is traced.
    #[arg(long)]
    pub prompt: String,
    /// The subject, as it occurs in the prompt: its embeddings are corrupted.
    #[arg(long)]
    pub subject: String,
    /// The expected attribute (e.g. "Berlin"), for the correctness check.
    #[arg(long)]
    pub expect: Option<String>,
    /// Which states to restore: hidden, mlp, attn.
    #[arg(long, value_delimiter = ',', default_value = "hidden,mlp,attn")]
    pub kinds: Vec<Kind>,
    /// Noise samples per restored state.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
    /// Layers restored together for mlp and attn.
    #[arg(long, default_value_t = 10)]
    pub window: usize,
    /// A level (e.g. 0.1), sK (K × the subjects' embedding std; needs --noise-subjects) or uK
    /// (uniform noise in [-1, 1) × K).
    #[arg(long, default_value = "s3")]
    pub noise: NoiseSpec,
    /// Knowns file whose subjects define the embedding std for sK noise.
    #[arg(long)]
    pub noise_subjects: Option<PathBuf>,
    /// Replace the subject's embeddings with the noise instead of adding it.
    #[arg(long)]
    pub replace: bool,
    /// rome: numpy RandomState(1) for every fact, as ROME; per-fact: seeded by --seed and --known-id.
    #[arg(long, default_value = "rome")]
    pub seed_mode: SeedMode,
    /// The sweep seed for --seed-mode per-fact.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The fact's id, for --seed-mode per-fact.
    #[arg(long, default_value_t = 0)]
    pub known_id: u64,
    /// With --expect: strict (ROME), first-token, or none (trace anyway).
    #[arg(long, default_value = "first-token")]
    pub correctness: Correctness,
    /// Compute the tables ROME's way (slow; the reference for the fast path).
    #[arg(long)]
    pub naive: bool,
    /// Fast path memory bound: (row × token) states per batched forward.
    #[arg(long, default_value_t = 8192)]
    pub max_batch_tokens: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Write one heatmap per kind (PNG and SVG) into this folder.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// `worker noise-level`.
#[derive(Debug, Args)]
pub struct NoiseLevelArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Knowns file (JSON array of records with a `subject`).
    #[arg(long)]
    pub knowns: PathBuf,
    /// K of sK: the level is K × the embedding std.
    #[arg(long, default_value_t = 3.0)]
    pub factor: f64,
}

/// The std of the embeddings of every subject of a knowns file.
fn subjects_std(loaded: &LoadedModel, knowns: &FsPath) -> anyhow::Result<f64> {
    let knowns = read_knowns_file(knowns)?;
    for err in &knowns.errors {
        tracing::warn!("{}: skipping {err}", "knowns");
    }
    let subjects: Vec<&str> = knowns.facts.iter().map(|f| f.subject.as_str()).collect();
    Ok(embedding_std(&loaded.model, loaded.tokenizer()?, &subjects)?)
}

/// Runs `worker noise-level`: prints the level.
pub fn run_noise_level(args: &NoiseLevelArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let std = subjects_std(&loaded, &args.knowns)?;
    tracing::info!(std, factor = args.factor, "embedding std");
    writeln!(out, "{}", args.factor * std)?;
    Ok(())
}

/// Runs `worker trace`.
pub fn run_trace(args: &TraceArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if args.kinds.is_empty() {
        bail!("--kinds needs at least one of hidden, mlp, attn");
    }
    let loaded = args.model.load()?;
    let n_layers = loaded.model.dims().n_layers;
    if args.window == 0 || args.window > n_layers {
        bail!("--window {} must be between 1 and the model's {n_layers} layers", args.window);
    }
    let std = match args.noise {
        NoiseSpec::StdMultiple(_) => {
            let path = args.noise_subjects.as_deref().with_context(|| {
                format!(
                    "--noise {} needs --noise-subjects <KNOWNS FILE> (ROME uses the dataset's subjects), or give a level such as --noise 0.1",
                    args.noise
                )
            })?;
            Some(subjects_std(&loaded, path)?)
        }
        _ => None,
    };
    let noise = resolve(args.noise, args.replace, std)?;
    let cfg = TraceConfig {
        kinds: args.kinds.clone(),
        samples: args.samples,
        window: args.window,
        noise,
        seed_mode: args.seed_mode,
        seed: args.seed,
        correctness: args.correctness,
        max_batch_tokens: args.max_batch_tokens,
        layers: None,
    };
    let fact = FactInput {
        known_id: args.known_id,
        prompt: &args.prompt,
        subject: &args.subject,
        expect: args.expect.as_deref(),
    };
    let path = if args.naive { Path::Naive } else { Path::Fast };
    let started = std::time::Instant::now();
    let trace = trace_fact(&loaded.model, loaded.tokenizer()?, &fact, &cfg, path)?;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "traced");
    if let Some(dir) = &args.plot {
        let written = crate::plot::write_heatmaps(&trace, cfg.window, &model_name(&loaded), dir)?;
        for file in written {
            tracing::info!("wrote {}", file.display());
        }
    }
    if args.json {
        serde_json::to_writer(&mut *out, &trace)?;
        writeln!(out)?;
    } else {
        print_trace(&trace, out)?;
    }
    Ok(())
}

/// A short name for plot labels: the model file or folder name.
fn model_name(loaded: &LoadedModel) -> String {
    loaded
        .source
        .file_stem()
        .map_or_else(|| "the model".into(), |s| s.to_string_lossy().into_owned())
}

fn print_trace(trace: &FactTrace, out: &mut dyn Write) -> anyhow::Result<()> {
    let (b, e) = trace.subject_range;
    writeln!(out, "tokens: {:?} (subject {b}..{e})", trace.tokens)?;
    let correct = trace.correct.map_or("unchecked".into(), |c| c.to_string());
    writeln!(out, "answer: {:?} (id {}), correct: {correct}", trace.answer, trace.answer_id)?;
    writeln!(
        out,
        "high_score {:.4}  low_score {:.4}  noise level {:.4}",
        trace.high_score, trace.low_score, trace.noise_level
    )?;
    if !trace.traced() {
        writeln!(out, "not traced: the model does not predict the expected attribute")?;
        return Ok(());
    }
    for (kind, table) in &trace.scores {
        writeln!(
            out,
            "\n{kind}: p({}) with the state restored, tokens down, layers across",
            trace.answer.trim()
        )?;
        for (t, row) in table.iter().enumerate() {
            let star = if (b..e).contains(&t) { "*" } else { "" };
            let label = format!("{}{star}", trace.tokens[t]);
            let cells: String = row.iter().map(|s| format!("{:>4.0}", s * 100.0)).collect();
            writeln!(out, "{label:>16} {cells}")?;
        }
        let best = table
            .iter()
            .enumerate()
            .flat_map(|(t, row)| row.iter().enumerate().map(move |(l, s)| (t, l, *s)))
            .max_by(|a, b| a.2.total_cmp(&b.2));
        if let Some((t, l, s)) = best {
            writeln!(
                out,
                "{:>16} best: token {t} ({:?}), layer {l}: {s:.4} (×100 above)",
                "", trace.tokens[t]
            )?;
        }
    }
    Ok(())
}
