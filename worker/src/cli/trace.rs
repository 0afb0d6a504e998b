//! `worker trace` and `worker noise-level`.

use std::io::Write;
use std::path::{Path as FsPath, PathBuf};

use anyhow::Context;
use clap::Args;
use common::dataset::{KnownFact, read_knowns_file};
use common::donor::{Candidate, candidates};
use common::experiment::Resolved;
use common::flags::ExperimentFlags;

use super::ModelArgs;
use crate::load::LoadedModel;
use crate::trace::noise::embedding_std;
use crate::trace::{FactInput, FactTrace, Path, TraceOptions, geometry, trace_fact};

/// `worker trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt whose continuation is traced (or --knowns with --known-id).
    #[arg(long, required_unless_present = "knowns", requires = "subject")]
    pub prompt: Option<String>,
    /// The subject, as it occurs in the prompt: its embeddings are corrupted.
    #[arg(long, requires = "prompt")]
    pub subject: Option<String>,
    /// The expected attribute (e.g. "Berlin"), for the correctness check.
    #[arg(long, requires = "prompt")]
    pub expect: Option<String>,
    /// Trace the fact --known-id of this knowns file (its prompt, subject and attribute);
    /// its subjects also give sK noise's std unless --noise-subjects says otherwise.
    #[arg(long, conflicts_with = "prompt", requires = "known_id")]
    pub knowns: Option<PathBuf>,
    /// The experiment.
    #[command(flatten)]
    pub experiment: ExperimentFlags,
    /// Knowns file whose subjects define the embedding std for sK noise.
    #[arg(long)]
    pub noise_subjects: Option<PathBuf>,
    /// The fact's id: which fact of --knowns, and the seed of --seed-mode per-fact
    /// (default 0).
    #[arg(long)]
    pub known_id: Option<u64>,
    /// Compute the tables ROME's way (slow; the reference for the fast path).
    #[arg(long)]
    pub naive: bool,
    /// Fast path memory bound: (row × token) states per batched forward (default: 8192 on a
    /// CPU, 131072 on a GPU).
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// Fast path: traced tokens whose cells share one batched forward (default: 1 on a CPU,
    /// all on a GPU). More means fewer, larger layer calls and some recomputed tokens.
    #[arg(long)]
    pub tokens_per_batch: Option<usize>,
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

/// The fact `known_id` of a knowns file and its STR donor candidates, or an error that says
/// why it cannot be traced.
fn known_fact(path: &FsPath, known_id: u64) -> anyhow::Result<(KnownFact, Vec<Candidate>)> {
    let mut knowns = read_knowns_file(path)?;
    if let Some(i) = knowns.facts.iter().position(|f| f.known_id == known_id) {
        let candidates = candidates(&knowns.facts, i);
        return Ok((knowns.facts.swap_remove(i), candidates));
    }
    match knowns.errors.iter().find(|e| e.known_id == Some(known_id)) {
        Some(err) => anyhow::bail!("{}: {err}", path.display()),
        None => anyhow::bail!(
            "{}: no fact has known_id {known_id} ({} valid records)",
            path.display(),
            knowns.facts.len()
        ),
    }
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
    let experiment = args.experiment.experiment()?;
    let loaded = args.model.load()?;
    experiment.check_model(geometry(&loaded.model))?;
    let (known, candidates) = match &args.knowns {
        Some(path) => {
            let (fact, candidates) = known_fact(path, args.known_id.unwrap_or(0))?;
            (Some(fact), candidates)
        }
        None if experiment.is_str() => anyhow::bail!(
            "--corruption str chooses a donor among the dataset's facts: give --knowns FILE --known-id N"
        ),
        None => (None, Vec::new()),
    };
    let noise = match experiment.noise() {
        Some(rule) if rule.needs_calibration() => {
            let path =
                args.noise_subjects.as_deref().or(args.knowns.as_deref()).with_context(|| {
                    format!(
                        "--noise {} needs --noise-subjects <KNOWNS FILE> (ROME uses the dataset's subjects), or give a level such as --noise 0.1",
                        rule.noise
                    )
                })?;
            Some(rule.resolve(Some(subjects_std(&loaded, path)?))?)
        }
        Some(rule) => Some(rule.resolve(None)?),
        None => None,
    };
    let exp = Resolved::new(experiment, noise)?;
    let opts = TraceOptions::for_device(
        loaded.model.device(),
        args.max_batch_tokens,
        args.tokens_per_batch,
    );
    let fact = match &known {
        Some(f) => FactInput {
            known_id: f.known_id,
            prompt: &f.prompt,
            subject: &f.subject,
            expect: Some(&f.attribute),
            candidates: &candidates,
        },
        // clap requires --prompt and --subject without --knowns.
        None => FactInput {
            known_id: args.known_id.unwrap_or(0),
            prompt: args.prompt.as_deref().context("--prompt is required")?,
            subject: args.subject.as_deref().context("--subject is required")?,
            expect: args.expect.as_deref(),
            candidates: &[],
        },
    };
    let path = if args.naive { Path::Naive } else { Path::Fast };
    let started = std::time::Instant::now();
    let trace = trace_fact(&loaded.model, loaded.tokenizer()?, &fact, &exp, &opts, path)?;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "traced");
    let window = exp.experiment.window as usize;
    if let Some(dir) = &args.plot {
        let written = crate::plot::write_heatmaps(&trace, window, &model_name(&loaded), dir)?;
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
    match &trace.donor {
        Some(d) => writeln!(
            out,
            "high_score {:.4}  low_score {:.4}  donor: known_id {} ({:?}): {:?}",
            trace.high_score, trace.low_score, d.known_id, d.subject, d.prompt
        )?,
        None => writeln!(
            out,
            "high_score {:.4}  low_score {:.4}  noise level {:.4}",
            trace.high_score,
            trace.low_score,
            trace.noise_level.unwrap_or(f64::NAN)
        )?,
    }
    let run = |m: &common::metric::MetricValues| {
        format!(
            "prob {:.4}, logprob {:.3}, logit_diff {:.3}, kl {:.4}",
            m.prob, m.logprob, m.logit_diff, m.kl
        )
    };
    writeln!(out, "foil: {:?} (id {})", trace.foil, trace.foil_id)?;
    writeln!(out, "clean: {}\ncorrupted: {}", run(&trace.clean), run(&trace.corrupted))?;
    if !trace.traced() {
        writeln!(out, "not traced: the model does not predict the expected attribute")?;
        return Ok(());
    }
    for (kind, table) in &trace.scores {
        let per_head = if table.n_heads > 1 { ", the best head of each layer" } else { "" };
        writeln!(
            out,
            "\n{kind}: p({}) with the state restored, tokens down, layers across{per_head}",
            trace.answer.trim()
        )?;
        for &t in &trace.traced_tokens {
            let star = if (b..e).contains(&t) { "*" } else { "" };
            let label = format!("{}{star}", trace.tokens[t]);
            let cells: String = table
                .row(t)
                .chunks(table.n_heads)
                .map(|heads| heads.iter().copied().fold(f32::NEG_INFINITY, f32::max))
                .map(|s| format!("{:>4.0}", s * 100.0))
                .collect();
            writeln!(out, "{label:>16} {cells}")?;
        }
        let best = table.computed().max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((cell, s)) = best {
            let head =
                if table.n_heads > 1 { format!(", head {}", cell.head) } else { String::new() };
            writeln!(
                out,
                "{:>16} best: token {} ({:?}), layer {}{head}: {s:.4} (×100 above)",
                "", cell.token, trace.tokens[cell.token], cell.layer
            )?;
        }
    }
    Ok(())
}
