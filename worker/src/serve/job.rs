//! One leased job computed: the calibration (the embeddings' std for `sK` noise) or a fact's
//! trace over a layer range, turned into the protocol's result.

use crate::error::Error;
use crate::load::LoadedModel;
use crate::trace::noise::embedding_std;
use common::metric::{Metric, MetricValues};

use crate::trace::{FactInput, FactTrace, KindTable, Path, TraceOptions, trace_fact};

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
    batching: &TraceOptions,
) -> Result<proto::complete_request::Result, JobError> {
    match work {
        proto::job::Work::Calibration(c) => {
            let tokenizer = loaded.tokenizer().map_err(|e| JobError::new("calibration", &e))?;
            let subjects: Vec<&str> = c.subjects.iter().map(String::as_str).collect();
            let std = embedding_std(&loaded.model, tokenizer, &subjects)
                .map_err(|e| JobError::new("calibration", &e))?;
            // The coordinator turns the std into the level (the one place levels are
            // resolved: `NoiseCorruption::resolve`).
            Ok(proto::complete_request::Result::Calibration(proto::CalibrationResult {
                std,
                subjects: subjects.len() as u64,
            }))
        }
        proto::job::Work::Trace(job) => {
            let fact = job.fact.as_ref().ok_or_else(|| JobError::settings("no fact".into()))?;
            let exp =
                proto::convert::resolved(job).map_err(|e| JobError::settings(e.to_string()))?;
            let layers = job.layer_start as usize..job.layer_end as usize;
            let opts = TraceOptions { layers: Some(layers.clone()), ..batching.clone() };
            let tokenizer = loaded.tokenizer().map_err(|e| JobError::new("trace", &e))?;
            let candidates = proto::convert::candidates(job);
            let input = FactInput {
                known_id: fact.known_id,
                prompt: &fact.prompt,
                subject: &fact.subject,
                expect: Some(&fact.attribute),
                candidates: &candidates,
            };
            let trace = trace_fact(&loaded.model, tokenizer, &input, &exp, &opts, Path::Fast)
                .map_err(|e| JobError::new("trace", &e))?;
            Ok(proto::complete_request::Result::Trace(to_result(&trace, &layers)))
        }
    }
}

/// A trace as the protocol carries it: each kind's cells of every metric over the traced
/// tokens and `layers` (and heads), token-major.
pub fn to_result(trace: &FactTrace, layers: &std::ops::Range<usize>) -> proto::TraceResult {
    let cells = |table: &KindTable| -> Vec<f32> {
        let heads = table.n_heads;
        trace
            .traced_tokens
            .iter()
            .flat_map(|&t| table.row(t)[layers.start * heads..layers.end * heads].iter().copied())
            .collect()
    };
    let scores = trace
        .metrics
        .iter()
        .map(|(&kind, by)| {
            let of = |m: Metric| by.get(&m).map(&cells).unwrap_or_default();
            proto::KindScores {
                kind: proto::Kind::from(kind) as i32,
                tokens: trace.traced_tokens.iter().map(|&t| t as u32).collect(),
                scores: of(Metric::Prob),
                logprob: of(Metric::Logprob),
                logit_diff: of(Metric::LogitDiff),
                kl: of(Metric::Kl),
            }
        })
        .collect();
    let values = |m: &MetricValues| proto::MetricValues {
        prob: m.prob,
        logprob: m.logprob,
        logit_diff: m.logit_diff,
        kl: m.kl,
    };
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
        donor: trace.donor.as_ref().map(|d| proto::Donor {
            known_id: d.known_id,
            subject: d.subject.clone(),
            prompt: d.prompt.clone(),
            foil_id: d.foil_id,
        }),
        foil_id: trace.foil_id,
        foil: trace.foil.clone(),
        clean: Some(values(&trace.clean)),
        corrupted: Some(values(&trace.corrupted)),
    }
}
