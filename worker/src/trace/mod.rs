//! Causal tracing of one fact (Meng et al., NeurIPS 2022; ROME's `calculate_hidden_flow`).
//!
//! Clean run → answer and `high_score`; correctness; S corrupted runs (noise on the subject's
//! embeddings) → `low_score`; then for each kind a T × L table: the mean p(answer) over the
//! samples with state (t, l) restored to its clean value. Two implementations compute the
//! tables: [`naive`], ROME's algorithm as ROME runs it, and [`fast`], which reuses the
//! corrupted prefix and batches the suffixes. Tests prove they agree.

pub mod config;
pub mod cost;
pub mod fast;
pub mod naive;
pub mod noise;
pub mod rng;
pub mod tokens;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde::Serialize;

pub use config::{Correctness, Distribution, Kind, Noise, NoiseSpec, Path, SeedMode, TraceConfig};

use crate::error::{Error, Result};
use crate::models::Model;
use crate::tokenizer::Tokenizer;

/// One fact to trace.
#[derive(Debug, Clone, Copy)]
pub struct FactInput<'a> {
    /// The fact's id (seeds its noise in per-fact mode).
    pub known_id: u64,
    /// The prompt.
    pub prompt: &'a str,
    /// The subject, as it occurs in the prompt.
    pub subject: &'a str,
    /// The expected attribute, for the correctness check.
    pub expect: Option<&'a str>,
}

/// What a trace computes for one fact (the JSON of `worker trace`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FactTrace {
    /// The prompt's tokens, each decoded alone.
    pub tokens: Vec<String>,
    /// The prompt's token ids.
    #[serde(skip)]
    pub token_ids: Vec<u32>,
    /// The subject's tokens `[b, e)`.
    pub subject_range: (usize, usize),
    /// The clean run's most likely next token.
    pub answer: String,
    /// Its id.
    pub answer_id: u32,
    /// p(answer) in the clean run.
    pub high_score: f32,
    /// Mean p(answer) over the corrupted samples.
    pub low_score: f32,
    /// The noise level used.
    pub noise_level: f64,
    /// Whether the model predicts the attribute (`None` without one).
    pub correct: Option<bool>,
    /// Per kind, T rows of L scores; empty when the fact was not traced (not predicted).
    pub scores: BTreeMap<Kind, Vec<Vec<f32>>>,
}

impl FactTrace {
    /// Whether the tables were computed.
    pub fn traced(&self) -> bool {
        !self.scores.is_empty()
    }
}

/// A fact ready to run: its tokens, subject range and noise.
pub(crate) struct Prepared {
    pub(crate) ids: Vec<u32>,
    pub(crate) tokens: Vec<String>,
    pub(crate) subject: (usize, usize),
    /// `(S, e - b, d)` in f64, already multiplied by the level.
    pub(crate) noise: Tensor,
}

impl Prepared {
    pub(crate) fn new(
        model: &Model,
        tokenizer: &Tokenizer,
        fact: &FactInput<'_>,
        cfg: &TraceConfig,
    ) -> Result<Self> {
        if cfg.samples == 0 {
            return Err(Error::Trace("samples must be at least 1".into()));
        }
        if cfg.window == 0 {
            return Err(Error::Trace("window must be at least 1".into()));
        }
        if let Some(layers) = &cfg.layers {
            let n_layers = model.dims().n_layers;
            if layers.start >= layers.end || layers.end > n_layers {
                return Err(Error::Trace(format!(
                    "layers {}..{} are not a range inside the model's {n_layers} layers",
                    layers.start, layers.end
                )));
            }
        }
        let ids = tokenizer.encode(fact.prompt)?;
        if ids.is_empty() {
            return Err(Error::Trace("the prompt has no tokens".into()));
        }
        let tokens = tokenizer.token_strings(&ids)?;
        let subject = tokens::find_token_range(&tokens, fact.subject).ok_or_else(|| {
            Error::Trace(format!(
                "subject {:?} is not in the prompt {:?}",
                fact.subject, fact.prompt
            ))
        })?;
        let d = model.dims().d_model;
        let n = cfg.samples * (subject.1 - subject.0) * d;
        let seed = config::fact_seed(cfg.seed_mode, cfg.seed, fact.known_id);
        let unit = noise::draw(seed, cfg.noise.distribution, n);
        // ROME's noise_fn(x) = level * x, in f64.
        let scaled: Vec<f64> = unit.into_iter().map(|x| cfg.noise.level * x).collect();
        let noise =
            Tensor::from_vec(scaled, (cfg.samples, subject.1 - subject.0, d), model.device())?;
        Ok(Self { ids, tokens, subject, noise })
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// The trace of this fact.
    pub(crate) fn finish(
        self,
        outcome: Outcome,
        low_score: f32,
        noise_level: f64,
        scores: BTreeMap<Kind, Vec<Vec<f32>>>,
    ) -> FactTrace {
        FactTrace {
            tokens: self.tokens,
            token_ids: self.ids,
            subject_range: self.subject,
            answer: outcome.answer,
            answer_id: outcome.answer_id,
            high_score: outcome.high_score,
            low_score,
            noise_level,
            correct: outcome.correct,
            scores,
        }
    }
}

/// What the clean run decides: the answer, its probability, and whether the fact is traced.
pub(crate) struct Outcome {
    pub(crate) answer: String,
    pub(crate) answer_id: u32,
    pub(crate) high_score: f32,
    pub(crate) correct: Option<bool>,
    pub(crate) traced: bool,
}

impl Outcome {
    /// From the clean next-token distribution (ROME's `predict_from_input`: the argmax).
    pub(crate) fn new(
        tokenizer: &Tokenizer,
        fact: &FactInput<'_>,
        cfg: &TraceConfig,
        probs: &[f32],
    ) -> Result<Self> {
        let (answer_id, high_score) = crate::predict::top_k(probs, 1)
            .first()
            .copied()
            .ok_or_else(|| Error::Trace("the model has an empty vocabulary".into()))?;
        let answer = tokenizer.decode(&[answer_id])?;
        let (correct, traced) = judge(tokenizer, fact.expect, &answer, answer_id, cfg.correctness)?;
        Ok(Self { answer, answer_id, high_score, correct, traced })
    }
}

/// Whether the fact counts as predicted, and whether it gets traced.
fn judge(
    tokenizer: &Tokenizer,
    expect: Option<&str>,
    answer: &str,
    answer_id: u32,
    mode: Correctness,
) -> Result<(Option<bool>, bool)> {
    let Some(attribute) = expect else { return Ok((None, true)) };
    let first_token = || -> Result<bool> {
        let ids = tokenizer.encode_plain(&format!(" {attribute}"))?;
        Ok(ids.first() == Some(&answer_id))
    };
    Ok(match mode {
        // ROME: `answer.strip() != expect` → not traced.
        Correctness::Strict => {
            let ok = answer.trim() == attribute;
            (Some(ok), ok)
        }
        Correctness::FirstToken => {
            let ok = first_token()?;
            (Some(ok), ok)
        }
        Correctness::None => (Some(first_token()?), true),
    })
}

/// p(answer) of each row of `logits` `(rows, vocab)`, softmax in f32.
pub(crate) fn answer_probs(logits: &Tensor, answer_id: u32) -> Result<Vec<f32>> {
    let probs = crate::forward::probabilities(logits)?;
    Ok(probs.narrow(1, answer_id as usize, 1)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec1()?)
}

/// The mean of `values`, summed in order in f32 (the samples of one restored state).
pub(crate) fn mean(values: &[f32]) -> f32 {
    values.iter().sum::<f32>() / values.len() as f32
}

/// Traces one fact with the chosen implementation.
pub fn trace_fact(
    model: &Model,
    tokenizer: &Tokenizer,
    fact: &FactInput<'_>,
    cfg: &TraceConfig,
    path: Path,
) -> Result<FactTrace> {
    match path {
        Path::Naive => naive::trace(model, tokenizer, fact, cfg, None),
        Path::Fast => fast::trace(model, tokenizer, fact, cfg),
    }
}
