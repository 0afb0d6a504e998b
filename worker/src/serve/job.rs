//! One leased job computed: the calibration (the `sK` noise level) or a fact's trace over a
//! layer range, turned into the protocol's result.

use common::settings::{Correctness, Distribution, Kind, SeedMode};

use crate::error::Error;
use crate::load::LoadedModel;
use crate::trace::noise::embedding_std;
use crate::trace::{FactInput, FactTrace, Noise, Path, TraceConfig, trace_fact};

/// Why a job failed, as the coordinator wants it.
#[derive(Debug)]
pub struct JobError {
    /// Where: `calibration`, `settings`, `trace`.
    pub stage: &'static str,
    /// Why.
    pub message: String,
    /// Whether retrying cannot help (the input itself is bad).
    pub permanent: bool,
}

impl JobError {
    fn new(stage: &'static str, err: &Error) -> Self {
        let permanent =
            matches!(err, Error::Trace(_) | Error::Tokenizer { .. } | Error::Request(_));
        Self { stage, message: err.to_string(), permanent }
    }

    fn settings(message: String) -> Self {
        Self { stage: "settings", message, permanent: true }
    }
}

/// Computes a job.
pub fn compute(
    loaded: &LoadedModel,
    work: &proto::job::Work,
    max_batch_tokens: usize,
) -> Result<proto::complete_request::Result, JobError> {
    match work {
        proto::job::Work::Calibration(c) => {
            let tokenizer = loaded.tokenizer().map_err(|e| JobError::new("calibration", &e))?;
            let subjects: Vec<&str> = c.subjects.iter().map(String::as_str).collect();
            let std = embedding_std(&loaded.model, tokenizer, &subjects)
                .map_err(|e| JobError::new("calibration", &e))?;
            Ok(proto::complete_request::Result::Calibration(proto::CalibrationResult {
                std,
                // ROME: noise_level = factor * std, a float product (as `noise::resolve`).
                level: c.factor * std,
                subjects: subjects.len() as u64,
            }))
        }
        proto::job::Work::Trace(job) => {
            let fact = job.fact.as_ref().ok_or_else(|| JobError::settings("no fact".into()))?;
            let settings =
                job.settings.as_ref().ok_or_else(|| JobError::settings("no settings".into()))?;
            let mut cfg = trace_config(settings, max_batch_tokens).map_err(JobError::settings)?;
            let layers = job.layer_start as usize..job.layer_end as usize;
            cfg.layers = Some(layers.clone());
            let tokenizer = loaded.tokenizer().map_err(|e| JobError::new("trace", &e))?;
            let input = FactInput {
                known_id: fact.known_id,
                prompt: &fact.prompt,
                subject: &fact.subject,
                expect: Some(&fact.attribute),
            };
            let trace = trace_fact(&loaded.model, tokenizer, &input, &cfg, Path::Fast)
                .map_err(|e| JobError::new("trace", &e))?;
            Ok(proto::complete_request::Result::Trace(to_result(&trace, &layers)))
        }
    }
}

/// The trace configuration a job's settings describe.
pub fn trace_config(
    s: &proto::TraceSettings,
    max_batch_tokens: usize,
) -> Result<TraceConfig, String> {
    let kinds = s.kinds.iter().map(|k| k.parse::<Kind>()).collect::<Result<Vec<_>, _>>()?;
    let distribution: Distribution = s.distribution.parse()?;
    let seed_mode: SeedMode = s.seed_mode.parse()?;
    let correctness: Correctness = s.correctness.parse()?;
    if kinds.is_empty() || s.samples == 0 || s.window == 0 {
        return Err("kinds, samples and window must be set".into());
    }
    Ok(TraceConfig {
        kinds,
        samples: s.samples as usize,
        window: s.window as usize,
        noise: Noise { level: s.noise_level, distribution, replace: s.replace },
        seed_mode,
        seed: s.seed,
        correctness,
        max_batch_tokens,
        layers: None,
    })
}

/// A trace as the protocol carries it: each kind's scores over `layers`, token-major.
pub fn to_result(trace: &FactTrace, layers: &std::ops::Range<usize>) -> proto::TraceResult {
    let scores = trace
        .scores
        .iter()
        .map(|(kind, table)| proto::KindScores {
            kind: kind.name().to_string(),
            scores: table.iter().flat_map(|row| row[layers.clone()].iter().copied()).collect(),
        })
        .collect();
    proto::TraceResult {
        tokens: trace.tokens.clone(),
        token_ids: trace.token_ids.clone(),
        subject_start: trace.subject_range.0 as u32,
        subject_end: trace.subject_range.1 as u32,
        answer: trace.answer.clone(),
        answer_id: trace.answer_id,
        high_score: trace.high_score,
        low_score: trace.low_score,
        correct: trace.correct,
        traced: trace.traced(),
        noise_level: trace.noise_level,
        scores,
    }
}
