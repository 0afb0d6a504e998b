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
/// The most tokens a result may have: far beyond any prompt of a knowns dataset, and a
/// bound on the rows one result can make.
pub const MAX_TOKENS: usize = 4096;

pub fn job_rows(
    fact: &KnownFact,
    layers: &Range<u32>,
    settings: &SweepSettings,
    model: &str,
    result: &proto::TraceResult,
) -> Result<JobRows, String> {
    let t_len = result.tokens.len();
    if t_len > MAX_TOKENS {
        return Err(format!("{t_len} tokens: more than the {MAX_TOKENS} a result may hold"));
    }
    let probability = |p: f32| (0.0..=1.0).contains(&p);
    if !probability(result.high_score) || !probability(result.low_score) {
        return Err(format!(
            "high_score {} and low_score {} must be probabilities",
            result.high_score, result.low_score
        ));
    }
    if !(result.noise_level.is_finite() && result.noise_level >= 0.0) {
        return Err(format!("noise_level {} is not a level", result.noise_level));
    }
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
            if result.scores.iter().filter(|t| t.kind == table.kind).count() > 1 {
                return Err(format!("kind {kind} twice"));
            }
            if table.scores.len() != t_len * width {
                return Err(format!(
                    "{kind}: {} scores for {t_len} tokens × {width} layers",
                    table.scores.len()
                ));
            }
            for (i, &score) in table.scores.iter().enumerate() {
                if !probability(score) {
                    return Err(format!("{kind}: score {i} is {score}, not a probability"));
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

#[cfg(test)]
mod tests {
    use common::settings::{Correctness, NoiseSpec, SeedMode};

    use super::*;

    fn settings() -> SweepSettings {
        SweepSettings {
            dataset_digest: "d".into(),
            model_fingerprint: "m".into(),
            kinds: vec![Kind::Hidden, Kind::Mlp],
            samples: 2,
            window: 3,
            noise: NoiseSpec::Level(0.1),
            replace: false,
            seed_mode: SeedMode::Rome,
            seed: 0,
            correctness: Correctness::None,
            layers_per_job: Some(2),
            limit: None,
            dtype: "f32".into(),
        }
    }

    fn fact() -> KnownFact {
        KnownFact {
            known_id: 5,
            subject: "A".into(),
            attribute: "B".into(),
            prompt: "A is".into(),
            template: None,
            prediction: None,
            relation_id: Some("P1".into()),
        }
    }

    fn result(width: usize) -> proto::TraceResult {
        let table = |kind: &str| proto::KindScores {
            kind: kind.into(),
            scores: (0..3 * width).map(|i| i as f32 / 10.0).collect(),
        };
        proto::TraceResult {
            tokens: vec!["A".into(), " is".into(), " it".into()],
            token_ids: vec![1, 2, 3],
            subject_start: 0,
            subject_end: 1,
            traced: true,
            scores: vec![table("hidden"), table("mlp")],
            ..proto::TraceResult::default()
        }
    }

    #[test]
    fn rows_cover_the_jobs_layers_and_only_layer_zero_writes_the_fact() {
        let rows = job_rows(&fact(), &(2..4), &settings(), "m", &result(2)).expect("valid");
        assert!(rows.fact.is_none());
        assert_eq!(rows.traces.len(), 3 * 2 * 2);
        let r = rows.traces[3];
        assert_eq!((r.kind, r.token, r.layer, r.score), (Kind::Hidden, 1, 3, 0.3));
        assert_eq!(r.category, TokenCategory::FirstSubsequent);
        let first = job_rows(&fact(), &(0..2), &settings(), "m", &result(2)).expect("valid");
        assert_eq!(first.fact.expect("fact row").relation_id.as_deref(), Some("P1"));
    }

    /// One defect a hostile or broken worker could put into a well-formed result.
    fn spoil(r: &mut proto::TraceResult, defect: usize, n_tokens: usize) {
        // An earlier defect may have emptied a table: then the bad score is appended.
        let set_first = |scores: &mut Vec<f32>, bad: f32| match scores.first_mut() {
            Some(first) => *first = bad,
            None => scores.push(bad),
        };
        match defect {
            0 => set_first(&mut r.scores[0].scores, f32::NAN),
            1 => set_first(&mut r.scores[1].scores, 1.5),
            2 => drop(r.scores[0].scores.pop()),
            3 => r.scores[1].kind = r.scores[0].kind.clone(),
            4 => r.scores[0].kind = "resid".into(),
            5 => r.subject_end = n_tokens as u32 + 1,
            6 => r.token_ids.push(0),
            7 => r.high_score = f32::NAN,
            8 => r.traced = false,
            9 => r.scores.push(r.scores[0].clone()),
            _ => r.noise_level = -1.0,
        }
    }

    proptest::proptest! {
        // 3000 cases in CI (bounded time: about a second); CT_FUZZ_CASES runs more.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("CT_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(3000)
        ))]
        /// Fuzzing the result check: a well-formed result for any job shape passes and
        /// makes exactly one probability per (kind, token, layer); the same result with any
        /// defects never passes, and nothing panics.
        #[test]
        fn only_well_formed_results_pass(
            n_tokens in 1usize..7,
            subject in (0usize..7, 0usize..7),
            layer_start in 0u32..4,
            width in 1u32..4,
            swap_kinds in proptest::prelude::any::<bool>(),
            values in proptest::collection::vec(0f32..=1.0, 2 * 6 * 3),
            defects in proptest::collection::vec(0usize..11, 0..3),
        ) {
            let s0 = subject.0 % n_tokens;
            let s1 = s0 + 1 + subject.1 % (n_tokens - s0);
            let per_kind = n_tokens * width as usize;
            let mut kinds = ["hidden", "mlp"];
            if swap_kinds {
                kinds.swap(0, 1);
            }
            let mut result = proto::TraceResult {
                tokens: (0..n_tokens).map(|t| format!("t{t}")).collect(),
                token_ids: (0..n_tokens as u32).collect(),
                subject_start: s0 as u32,
                subject_end: s1 as u32,
                traced: true,
                high_score: values[0],
                low_score: values[1],
                scores: kinds.iter().enumerate().map(|(k, kind)| proto::KindScores {
                    kind: (*kind).into(),
                    scores: values[k * per_kind..(k + 1) * per_kind].to_vec(),
                }).collect(),
                ..proto::TraceResult::default()
            };
            for &d in &defects {
                spoil(&mut result, d, n_tokens);
            }
            let layers = layer_start..layer_start + width;
            match job_rows(&fact(), &layers, &settings(), "m", &result) {
                Ok(rows) => {
                    proptest::prop_assert!(defects.is_empty(), "a spoiled result passed: {defects:?}");
                    let mut seen = std::collections::HashSet::new();
                    for r in &rows.traces {
                        proptest::prop_assert!((0.0..=1.0).contains(&r.score));
                        proptest::prop_assert!(layers.contains(&r.layer));
                        proptest::prop_assert!((r.token as usize) < n_tokens);
                        proptest::prop_assert!(seen.insert((r.kind, r.token, r.layer)));
                    }
                    proptest::prop_assert_eq!(rows.traces.len(), 2 * per_kind);
                }
                Err(_) => proptest::prop_assert!(!defects.is_empty(), "a well-formed result failed"),
            }
        }
    }

    #[test]
    fn results_that_do_not_fit_their_job_are_refused() {
        let s = settings();
        assert!(job_rows(&fact(), &(0..3), &s, "m", &result(2)).is_err(), "wrong width");
        let mut r = result(2);
        r.scores.pop();
        assert!(job_rows(&fact(), &(0..2), &s, "m", &r).is_err(), "missing kind");
        let mut r = result(2);
        r.scores[0].scores[1] = f32::NAN;
        assert!(job_rows(&fact(), &(0..2), &s, "m", &r).expect_err("NaN").contains("NaN"));
        let mut r = result(2);
        r.subject_end = 4;
        assert!(job_rows(&fact(), &(0..2), &s, "m", &r).is_err(), "subject outside");
        let mut r = result(2);
        r.scores[1].kind = "hidden".into();
        assert!(job_rows(&fact(), &(0..2), &s, "m", &r).expect_err("twice").contains("twice"));
        let mut r = result(2);
        r.scores[0].scores[0] = 1.5;
        assert!(job_rows(&fact(), &(0..2), &s, "m", &r).is_err(), "not a probability");
        let mut r = result(2);
        r.high_score = f32::INFINITY;
        assert!(job_rows(&fact(), &(0..2), &s, "m", &r).is_err(), "high score");
        let mut r = result(2);
        r.tokens = vec!["t".into(); MAX_TOKENS + 1];
        r.token_ids = vec![0; MAX_TOKENS + 1];
        assert!(job_rows(&fact(), &(0..2), &s, "m", &r).is_err(), "too many tokens");
        let mut r = result(2);
        r.traced = false;
        assert!(job_rows(&fact(), &(0..2), &s, "m", &r).is_err(), "scores without a trace");
        r.scores.clear();
        assert!(job_rows(&fact(), &(0..2), &s, "m", &r).expect("untraced").traces.is_empty());
    }
}
