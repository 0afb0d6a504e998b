//! A worker's result checked and turned into table rows. A result whose shape does not match
//! its job (wrong token count, missing kind, non-finite score) is refused as a failed try
//! rather than written: a table row is either right or absent.

use std::ops::Range;

use common::dataset::KnownFact;
use common::settings::Kind;
use common::sweep::SweepSettings;
use common::tables::{FactRow, TokenCategory, TraceRow};

/// The rows of one trace job.
#[derive(Debug, Default)]
pub struct JobRows {
    /// The fact's row: from the job holding layer 0, so each fact has one.
    pub fact: Option<FactRow>,
    /// `traces` rows, T × layers per kind.
    pub traces: Vec<TraceRow>,
}

/// Checks `result` against its job and makes its rows.
pub fn job_rows(
    fact: &KnownFact,
    layers: &Range<u32>,
    settings: &SweepSettings,
    model: &str,
    result: &proto::TraceResult,
) -> Result<JobRows, String> {
    let t_len = result.tokens.len();
    if t_len == 0 || result.token_ids.len() != t_len {
        return Err(format!(
            "{} tokens and {} token ids",
            result.tokens.len(),
            result.token_ids.len()
        ));
    }
    let subject = (result.subject_start as usize, result.subject_end as usize);
    if subject.0 >= subject.1 || subject.1 > t_len {
        return Err(format!("subject range {}..{} outside {t_len} tokens", subject.0, subject.1));
    }
    let width = (layers.end - layers.start) as usize;
    let mut traces = Vec::new();
    if result.traced {
        if result.scores.len() != settings.kinds.len() {
            return Err(format!(
                "{} score tables for {} kinds",
                result.scores.len(),
                settings.kinds.len()
            ));
        }
        traces.reserve(t_len * width * settings.kinds.len());
        for table in &result.scores {
            let kind: Kind = table.kind.parse()?;
            if !settings.kinds.contains(&kind) {
                return Err(format!("kind {kind} was not asked for"));
            }
            if table.scores.len() != t_len * width {
                return Err(format!(
                    "{kind}: {} scores for {t_len} tokens × {width} layers",
                    table.scores.len()
                ));
            }
            for (i, &score) in table.scores.iter().enumerate() {
                if !score.is_finite() {
                    return Err(format!("{kind}: score {i} is {score}"));
                }
                let (t, l) = (i / width, i % width);
                traces.push(TraceRow {
                    known_id: fact.known_id,
                    kind,
                    layer: layers.start + l as u32,
                    token: t as u32,
                    category: TokenCategory::of(t, subject, t_len),
                    score,
                });
            }
        }
    } else if !result.scores.is_empty() {
        return Err("scores for a fact that was not traced".into());
    }
    let fact_row = (layers.start == 0).then(|| FactRow {
        known_id: fact.known_id,
        relation_id: fact.relation_id.clone(),
        prompt: fact.prompt.clone(),
        subject: fact.subject.clone(),
        attribute: fact.attribute.clone(),
        tokens: result.tokens.clone(),
        token_ids: result.token_ids.clone(),
        subject_start: result.subject_start,
        subject_end: result.subject_end,
        answer: result.answer.clone(),
        answer_id: result.answer_id,
        high_score: result.high_score,
        low_score: result.low_score,
        correct: result.correct,
        traced: result.traced,
        noise_level: result.noise_level,
        samples: settings.samples,
        model: model.to_string(),
    });
    Ok(JobRows { fact: fact_row, traces })
}
