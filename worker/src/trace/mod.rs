//! Causal tracing of one fact (Meng et al., NeurIPS 2022; ROME's `calculate_hidden_flow`, and
//! `trace_with_repatch` for the severed kinds): docs/science.md defines every quantity.
//!
//! Clean run → answer and `high_score`; correctness; S corrupted runs (noise on the subject's
//! embeddings) → `low_score`; then for each kind of the experiment a table over the kind's
//! axes: the mean p(answer) over the samples with one cell's states restored to their clean
//! values (and the kind's frozen states held at a corrupted run's). Two implementations
//! compute the tables: [`naive`], ROME's algorithm as ROME runs it, and [`fast`], which
//! reuses corrupted prefixes and batches the suffixes. Both take every kind-specific decision
//! from the kind itself (`common::kinds`). Tests prove they agree.

pub mod cost;
pub mod fast;
pub mod naive;
pub mod noise;
pub mod rng;
pub(crate) mod row_sums;
pub(crate) mod score;
pub mod table;
pub mod tokens;

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::Tensor;
use common::donor::{self, Candidate};
use common::experiment::Resolved;
use common::kinds::{Axis, Geometry, Kind};
use common::metric::{Metric, MetricValues};
use serde::Serialize;

pub use common::experiment::{Experiment, Noise};
pub use common::settings::{Correctness, Distribution, NoiseSpec, SeedMode};
pub use table::{KindTable, MetricTables};

use crate::error::{Error, Result};
use crate::forward::{ForwardRequest, Logits, Start};
use crate::intervene::{EmbedEdit, EmbedOp, Interventions, Site};
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
    /// STR's donor candidates, in the rule's order (`common::donor::candidates`); empty for
    /// noise.
    pub candidates: &'a [Candidate],
}

/// Which implementation computes the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// ROME's algorithm as ROME runs it.
    Naive,
    /// Clean run once, corrupted prefixes reused, suffixes batched.
    Fast,
}

/// How the engine runs an experiment: settings that change no number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceOptions {
    /// Fast path memory bound: at most this many (row × token) states in one batched forward.
    pub max_batch_tokens: usize,
    /// Fast path: how many traced tokens' cells share a batched forward (see
    /// [`fast`]'s module docs): 1 wastes no FLOPs, more make fewer, larger layer calls.
    pub tokens_per_batch: usize,
    /// Compute only these layers' cells (a sweep job's share of the fact); the others stay
    /// NaN. `None`: every layer.
    pub layers: Option<Range<usize>>,
}

impl Default for TraceOptions {
    fn default() -> Self {
        Self { max_batch_tokens: 8192, tokens_per_batch: 1, layers: None }
    }
}

/// Batches of a GPU: large enough that one layer call's kernels outlast their launches
/// (SmolLM2's whole fact, ~60k states, is a few hundred MB of activations), small enough
/// for a GPT-2 XL-sized model's MLP activations (~6 GB) on a 40 GB card.
const GPU_MAX_BATCH_TOKENS: usize = 1 << 17;

impl TraceOptions {
    /// The batching a device runs best, unless given: on a CPU one token's cells at a time
    /// in batches of at most 8192 states (no padded work, bounded memory); on a GPU every
    /// traced token of a fact together in batches of up to 131,072 states (a GPU's time on
    /// these models goes to kernel launches, not arithmetic: docs/performance.md).
    pub fn for_device(
        device: &candle_core::Device,
        max_batch_tokens: Option<usize>,
        tokens_per_batch: Option<usize>,
    ) -> Self {
        let (batch, tokens) = match device.is_cpu() {
            true => (8192, 1),
            false => (GPU_MAX_BATCH_TOKENS, usize::MAX),
        };
        Self {
            max_batch_tokens: max_batch_tokens.unwrap_or(batch).max(1),
            tokens_per_batch: tokens_per_batch.unwrap_or(tokens).max(1),
            layers: None,
        }
    }

    /// Whether the cells of `layer` are asked for.
    pub fn wants_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|r| r.contains(&layer))
    }
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
    /// The foil of `logit_diff`: STR's counterfactual answer, or the corrupted run's most
    /// probable token other than the answer (docs/science.md §5).
    pub foil: String,
    /// Its id.
    pub foil_id: u32,
    /// Every metric of the clean run (`prob` is `high_score`).
    pub clean: MetricValues,
    /// Every metric of the corrupted run, averaged over the samples (`prob` is `low_score`).
    pub corrupted: MetricValues,
    /// The noise level used; `None` (null) without noise.
    pub noise_level: Option<f64>,
    /// STR's donor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub donor: Option<DonorInfo>,
    /// Whether the model predicts the attribute (`None` without one).
    pub correct: Option<bool>,
    /// The tokens whose rows were computed (the experiment's selector); empty when the fact
    /// was not traced.
    pub traced_tokens: Vec<usize>,
    /// Per kind, its table of p(answer) (T × L, or T × L × H); empty when the fact was not
    /// traced.
    pub scores: BTreeMap<Kind, KindTable>,
    /// Per kind, its table of every metric (`prob`'s is `scores`'); empty when not traced.
    pub metrics: BTreeMap<Kind, BTreeMap<Metric, KindTable>>,
    /// Per kind, the axes of its table, outermost first.
    pub axes: BTreeMap<Kind, &'static [Axis]>,
}

/// The fact whose subject replaced this fact's (STR).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DonorInfo {
    /// Its id.
    pub known_id: u64,
    /// Its subject.
    pub subject: String,
    /// The corrupted prompt: this fact's with the donor's subject.
    pub prompt: String,
    /// The first token of `" " + donor's attribute`: the counterfactual answer.
    pub foil_id: u32,
}

impl FactTrace {
    /// Whether the tables were computed.
    pub fn traced(&self) -> bool {
        !self.scores.is_empty()
    }
}

/// The model's extent along the axes a kind may have.
pub fn geometry(model: &Model) -> Geometry {
    let dims = model.dims();
    Geometry { n_layers: dims.n_layers, n_heads: dims.n_heads }
}

/// A fact ready to run: its tokens, subject range and traced tokens.
pub(crate) struct Prepared {
    pub(crate) ids: Vec<u32>,
    pub(crate) tokens: Vec<String>,
    pub(crate) subject: (usize, usize),
    /// The experiment's token selector applied to this prompt.
    pub(crate) traced_tokens: Vec<usize>,
}

/// How the corrupted run changes the subject's embeddings: noise, or the donor's (§3).
pub(crate) struct Corrupted {
    /// `(S, e − b, d)`: the noise (f64, already multiplied by the level: the stream's first
    /// `S × (e − b) × d` values), or the donor's embeddings (S = 1). It gives `low_score`,
    /// and the severed kinds freeze states at the values of the run it corrupts.
    values: Tensor,
    /// The noise of the severed kinds' measured run in ROME's seed mode: the stream's next
    /// `S × (e − b) × d` values (`trace_with_repatch` draws twice from one `RandomState(1)`).
    /// `None` otherwise, where the measured run is the corrupted run itself.
    second: Option<Tensor>,
    op: EmbedOp,
    noise_level: Option<f64>,
    donor: Option<DonorInfo>,
}

impl Corrupted {
    /// The corrupted run's edit of `rows`.
    pub(crate) fn edit(&self, rows: Vec<usize>, subject: (usize, usize)) -> EmbedEdit {
        self.edit_with(rows, subject, &self.values)
    }

    /// The edit of the runs whose states are measured while others are frozen.
    pub(crate) fn measured_edit(&self, rows: Vec<usize>, subject: (usize, usize)) -> EmbedEdit {
        self.edit_with(rows, subject, self.second.as_ref().unwrap_or(&self.values))
    }

    /// Whether the measured run differs from the corrupted one (ROME's two draws).
    pub(crate) fn two_draws(&self) -> bool {
        self.second.is_some()
    }

    fn edit_with(&self, rows: Vec<usize>, subject: (usize, usize), values: &Tensor) -> EmbedEdit {
        EmbedEdit { rows, tokens: subject.0..subject.1, op: self.op, values: values.clone() }
    }
}

impl Prepared {
    pub(crate) fn new(
        model: &Model,
        tokenizer: &Tokenizer,
        fact: &FactInput<'_>,
        exp: &Resolved,
        opts: &TraceOptions,
    ) -> Result<Self> {
        let e = &exp.experiment;
        e.check_model(geometry(model)).map_err(|err| Error::Trace(err.to_string()))?;
        if let Some(layers) = &opts.layers {
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
        let traced_tokens = e.tokens.select(subject, ids.len());
        Ok(Self { ids, tokens, subject, traced_tokens })
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// The corrupted run's change to the subject's embeddings. STR's donor depends on the
    /// clean run's answer; the noise depends on the fact only.
    pub(crate) fn corrupt(
        &self,
        model: &Model,
        tokenizer: &Tokenizer,
        fact: &FactInput<'_>,
        exp: &Resolved,
        answer_id: u32,
    ) -> Result<Corrupted> {
        let e = &exp.experiment;
        let (width, d) = (self.subject.1 - self.subject.0, model.dims().d_model);
        let (Some(corruption), Some(level)) = (e.noise(), exp.noise) else {
            return self.donate(model, tokenizer, fact, answer_id);
        };
        let samples = e.samples();
        let n = samples * width * d;
        let seed = noise::fact_seed(corruption.seed_mode, corruption.seed, fact.known_id);
        let two_draws = e.two_draws();
        let unit = noise::draw(seed, level.distribution, if two_draws { 2 * n } else { n });
        // ROME's noise_fn(x) = level * x, in f64.
        let scaled = |values: &[f64]| -> Result<Tensor> {
            let v: Vec<f64> = values.iter().map(|x| level.level * x).collect();
            Ok(Tensor::from_vec(v, (samples, width, d), model.device())?)
        };
        Ok(Corrupted {
            values: scaled(&unit[..n])?,
            second: if two_draws { Some(scaled(&unit[n..])?) } else { None },
            op: if level.replace { EmbedOp::Replace } else { EmbedOp::Add },
            noise_level: Some(level.level),
            donor: None,
        })
    }

    /// STR: the donor's subject embeddings in place of this fact's (the donor's prompt has
    /// this prompt's tokens outside the subject, so the run is the donor prompt's).
    fn donate(
        &self,
        model: &Model,
        tokenizer: &Tokenizer,
        fact: &FactInput<'_>,
        answer_id: u32,
    ) -> Result<Corrupted> {
        let (b, e) = self.subject;
        let attribute = fact.expect.ok_or_else(|| {
            Error::Trace(
                "--corruption str needs the fact's attribute (its donor's must differ)".into(),
            )
        })?;
        let recipient = donor::Recipient {
            prompt: fact.prompt,
            subject: fact.subject,
            attribute,
            ids: &self.ids,
            range: self.subject,
            answer_id,
        };
        let chosen = donor::choose(tokenizer, &recipient, fact.candidates)?
            .map_err(|why| Error::Trace(format!("--corruption str: {why}")))?;
        let ids = Tensor::new(chosen.ids.as_slice(), model.device())?.unsqueeze(0)?;
        let mut iv = Interventions::none();
        let slot = iv.capture(Site::Embed, (b..e).collect());
        let req = ForwardRequest {
            start: Start::Tokens(&ids),
            interventions: &iv,
            logits: Logits::None,
            keep_kv: false,
        };
        let values = model.forward(&req)?.captures.swap_remove(slot);
        Ok(Corrupted {
            values,
            second: None,
            op: EmbedOp::Replace,
            noise_level: None,
            donor: Some(DonorInfo {
                known_id: chosen.candidate.known_id,
                subject: chosen.candidate.subject,
                prompt: chosen.prompt,
                foil_id: chosen.foil_id,
            }),
        })
    }

    /// The trace of this fact.
    pub(crate) fn finish(
        self,
        tokenizer: &Tokenizer,
        outcome: Outcome,
        runs: Runs,
        corrupted: Corrupted,
        tables: BTreeMap<Kind, MetricTables>,
    ) -> Result<FactTrace> {
        let axes = tables.keys().map(|&k| (k, k.axes())).collect();
        let traced_tokens = if tables.is_empty() { Vec::new() } else { self.traced_tokens };
        let metrics: BTreeMap<Kind, BTreeMap<Metric, KindTable>> =
            tables.into_iter().map(|(k, t)| (k, t.into_map())).collect();
        let scores = metrics
            .iter()
            .filter_map(|(&k, by)| by.get(&Metric::Prob).map(|t| (k, t.clone())))
            .collect();
        let low_score = runs.corrupted.prob as f32;
        Ok(FactTrace {
            tokens: self.tokens,
            token_ids: self.ids,
            subject_range: self.subject,
            answer: outcome.answer,
            answer_id: outcome.answer_id,
            high_score: outcome.high_score,
            low_score,
            foil: tokenizer.decode(&[runs.foil_id])?,
            foil_id: runs.foil_id,
            clean: MetricValues { prob: f64::from(outcome.high_score), ..runs.clean },
            corrupted: runs.corrupted,
            noise_level: corrupted.noise_level,
            donor: corrupted.donor,
            correct: outcome.correct,
            traced_tokens,
            scores,
            metrics,
            axes,
        })
    }
}

/// The clean and corrupted runs' metrics, and the foil they compare the answer with.
pub(crate) struct Runs {
    pub(crate) foil_id: u32,
    pub(crate) clean: MetricValues,
    pub(crate) corrupted: MetricValues,
}

impl Runs {
    /// The foil (STR's donor's, or the corrupted run's best other token), the scorer built on
    /// it and the two runs' metrics, from the clean logits `(1, vocab)` and the corrupted
    /// run's `(S, vocab)`.
    pub(crate) fn score(
        clean_logits: &Tensor,
        corrupted_logits: &Tensor,
        corruption: &Corrupted,
        answer_id: u32,
    ) -> Result<(Self, score::Scorer)> {
        let foil_id = match &corruption.donor {
            Some(donor) => donor.foil_id,
            None => score::top_other(corrupted_logits, answer_id)?,
        };
        let scorer = score::Scorer::new(clean_logits, answer_id, foil_id)?;
        let first = |v: Vec<MetricValues>| {
            v.into_iter().next().ok_or_else(|| Error::Trace("a run without rows".into()))
        };
        // KL(p_clean ‖ p_clean) is 0 by definition; the scorer's rearranged sums would leave
        // ~1e-15 of rounding.
        let clean = MetricValues { kl: 0.0, ..first(scorer.score(clean_logits, 1)?)? };
        let (samples, _) = corrupted_logits.dims2()?;
        let corrupted = first(scorer.score(corrupted_logits, samples)?)?;
        Ok((Self { foil_id, clean, corrupted }, scorer))
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
        correctness: Correctness,
        probs: &[f32],
    ) -> Result<Self> {
        let (answer_id, high_score) = crate::predict::top_k(probs, 1)
            .first()
            .copied()
            .ok_or_else(|| Error::Trace("the model has an empty vocabulary".into()))?;
        let answer = tokenizer.decode(&[answer_id])?;
        let (correct, traced) = judge(tokenizer, fact.expect, &answer, answer_id, correctness)?;
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

/// p(answer) of each row of `logits` `(rows, vocab)` by candle's f32 softmax: the reference
/// the scorer's fused rows are tested against.
#[cfg(test)]
pub(crate) fn answer_probs(logits: &Tensor, answer_id: u32) -> Result<Vec<f32>> {
    let probs = crate::forward::probabilities(logits)?;
    Ok(probs
        .narrow(1, answer_id as usize, 1)?
        .squeeze(1)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
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
    exp: &Resolved,
    opts: &TraceOptions,
    path: Path,
) -> Result<FactTrace> {
    match path {
        Path::Naive => naive::trace(model, tokenizer, fact, exp, opts, None),
        Path::Fast => fast::trace(model, tokenizer, fact, exp, opts),
    }
}
