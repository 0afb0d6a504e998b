//! A worker's result checked and turned into table rows. A result whose shape does not match
//! its job (wrong token count, a missing kind, a table that does not fit its kind's axes, a
//! non-finite score) is refused as a failed try rather than written: a table row is either
//! right or absent.

use std::ops::Range;

use common::dataset::KnownFact;
use common::donor::Candidate;
use common::experiment::Experiment;
use common::kinds::{Geometry, Kind};
use common::metric::{Metric, MetricValues};
use common::tables::{FactRow, TokenCategory, TraceRow};

/// The most tokens a result may have: far beyond any prompt of a knowns dataset, and a
/// bound on the rows one result can make.
pub const MAX_TOKENS: usize = 4096;

/// Why a result does not fit its job. A refused result is a failed try of the job.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ResultError {
    /// More tokens than any prompt has.
    #[error("{0} tokens: more than the {MAX_TOKENS} a result may hold")]
    TooManyTokens(usize),
    /// A probability outside [0, 1] (or NaN).
    #[error("{what} is {value}, not a probability")]
    NotAProbability {
        /// Which number.
        what: String,
        /// Its value.
        value: f32,
    },
    /// A noise level that is not one, or one where the corruption has none.
    #[error("noise_level {0}")]
    NoiseLevel(String),
    /// STR's donor missing, not one of the job's candidates, or sent without STR.
    #[error("donor: {0}")]
    Donor(String),
    /// Token strings and ids disagree, or there are none.
    #[error("{tokens} tokens and {ids} token ids")]
    Tokens {
        /// Token strings.
        tokens: usize,
        /// Token ids.
        ids: usize,
    },
    /// The subject range does not lie in the prompt.
    #[error("subject range {start}..{end} outside {t_len} tokens")]
    Subject {
        /// Its start.
        start: u32,
        /// Its end.
        end: u32,
        /// The prompt's tokens.
        t_len: usize,
    },
    /// A kind the experiment does not have, an unknown one, or one twice.
    #[error("kind {0}")]
    Kind(String),
    /// Not one table per kind.
    #[error("{tables} score tables for {kinds} kinds")]
    Tables {
        /// Tables sent.
        tables: usize,
        /// Kinds asked for.
        kinds: usize,
    },
    /// The traced tokens are not the experiment's selector applied to this prompt.
    #[error("{kind}: traced tokens {got:?}, expected {expected:?}")]
    TracedTokens {
        /// The kind.
        kind: Kind,
        /// Sent.
        got: Vec<u32>,
        /// Expected.
        expected: Vec<u32>,
    },
    /// A table of the wrong size for its axes.
    #[error("{kind}: {got} scores for {tokens} tokens × {layers} layers × {heads} heads")]
    Shape {
        /// The kind.
        kind: Kind,
        /// Scores sent.
        got: usize,
        /// Traced tokens.
        tokens: usize,
        /// The job's layers.
        layers: usize,
        /// Heads per layer along the kind's axes (1 without a head axis).
        heads: usize,
    },
    /// Scores for a fact the worker did not trace.
    #[error("scores for a fact that was not traced")]
    ScoresUntraced,
    /// A metric missing, outside its range, or disagreeing with another number.
    #[error("metric: {0}")]
    Metric(String),
}

/// The rows of one trace job.
#[derive(Debug, Default)]
pub struct JobRows {
    /// The fact's row: from the job holding layer 0, so each fact has one.
    pub fact: Option<FactRow>,
    /// `traces` rows: traced tokens × layers (× heads) per kind.
    pub traces: Vec<TraceRow>,
}

/// What a result is checked against.
#[derive(Debug, Clone, Copy)]
pub struct JobContext<'a> {
    /// The fact.
    pub fact: &'a KnownFact,
    /// The job's layers.
    pub layers: &'a Range<u32>,
    /// The experiment.
    pub experiment: &'a Experiment,
    /// The model's layers and heads.
    pub geometry: Geometry,
    /// Noise samples, for the `facts` row.
    pub samples: u32,
    /// STR's donor candidates of this fact (empty for noise).
    pub candidates: &'a [Candidate],
    /// The model's name, for the `facts` row.
    pub model: &'a str,
}

fn probability(what: impl FnOnce() -> String, value: f32) -> Result<(), ResultError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(ResultError::NotAProbability { what: what(), value })
    }
}

/// Checks `result` against its job and makes its rows. The shape of every table comes
/// from its kind's axes and the experiment's token selector.
pub fn job_rows(ctx: &JobContext<'_>, result: &proto::TraceResult) -> Result<JobRows, ResultError> {
    let t_len = result.tokens.len();
    if t_len > MAX_TOKENS {
        return Err(ResultError::TooManyTokens(t_len));
    }
    probability(|| "high_score".into(), result.high_score)?;
    probability(|| "low_score".into(), result.low_score)?;
    check_corruption(ctx, result)?;
    let (clean, corrupted) = check_metrics(ctx, result)?;
    if t_len == 0 || result.token_ids.len() != t_len {
        return Err(ResultError::Tokens { tokens: t_len, ids: result.token_ids.len() });
    }
    let (start, end) = (result.subject_start, result.subject_end);
    if start >= end || end as usize > t_len {
        return Err(ResultError::Subject { start, end, t_len });
    }
    let subject = (start as usize, end as usize);
    let expected_tokens: Vec<u32> =
        ctx.experiment.tokens.select(subject, t_len).into_iter().map(|t| t as u32).collect();
    let width = (ctx.layers.end - ctx.layers.start) as usize;
    let kinds = &ctx.experiment.kinds;
    let mut traces = Vec::new();
    if result.traced {
        if result.scores.len() != kinds.len() {
            return Err(ResultError::Tables { tables: result.scores.len(), kinds: kinds.len() });
        }
        let mut seen = Vec::with_capacity(kinds.len());
        for table in &result.scores {
            let kind = proto::convert::kind(table.kind)
                .ok_or_else(|| ResultError::Kind(format!("{} is unknown", table.kind)))?;
            if !kinds.contains(&kind) {
                return Err(ResultError::Kind(format!("{kind} was not asked for")));
            }
            if seen.contains(&kind) {
                return Err(ResultError::Kind(format!("{kind} twice")));
            }
            seen.push(kind);
            if table.tokens != expected_tokens {
                return Err(ResultError::TracedTokens {
                    kind,
                    got: table.tokens.clone(),
                    expected: expected_tokens.clone(),
                });
            }
            let heads = kind.heads(ctx.geometry);
            let per_token = width * heads;
            if table.scores.len() != expected_tokens.len() * per_token {
                return Err(ResultError::Shape {
                    kind,
                    got: table.scores.len(),
                    tokens: expected_tokens.len(),
                    layers: width,
                    heads,
                });
            }
            let columns = [&table.logprob, &table.logit_diff, &table.kl];
            if let Some(column) = columns.iter().find(|c| c.len() != table.scores.len()) {
                return Err(ResultError::Metric(format!(
                    "{kind}: {} values of a metric for {} scores",
                    column.len(),
                    table.scores.len()
                )));
            }
            traces.reserve(table.scores.len());
            for (i, &score) in table.scores.iter().enumerate() {
                probability(|| format!("{kind} score {i}"), score)?;
                let (logprob, logit_diff, kl) =
                    (table.logprob[i], table.logit_diff[i], table.kl[i]);
                for (metric, v) in
                    [(Metric::Logprob, logprob), (Metric::LogitDiff, logit_diff), (Metric::Kl, kl)]
                {
                    if !metric.admits(f64::from(v)) {
                        return Err(ResultError::Metric(format!("{kind} {metric} {i} is {v}")));
                    }
                }
                let t = expected_tokens[i / per_token];
                let (l, h) = ((i % per_token) / heads, i % heads);
                traces.push(TraceRow {
                    known_id: ctx.fact.known_id,
                    kind,
                    layer: ctx.layers.start + l as u32,
                    token: t,
                    head: kind.has_heads().then_some(h as u32),
                    category: TokenCategory::of(t as usize, subject, t_len),
                    score,
                    logprob,
                    logit_diff,
                    kl,
                });
            }
        }
    } else if !result.scores.is_empty() {
        return Err(ResultError::ScoresUntraced);
    }
    let fact = ctx.fact;
    let fact_row = (ctx.layers.start == 0).then(|| FactRow {
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
        traced_tokens: if result.traced { expected_tokens } else { Vec::new() },
        n_layers: ctx.geometry.n_layers as u32,
        n_heads: ctx.geometry.n_heads as u32,
        noise_level: result.noise_level,
        samples: ctx.samples,
        model: ctx.model.to_string(),
        donor_known_id: result.donor.as_ref().map(|d| d.known_id),
        donor_subject: result.donor.as_ref().map(|d| d.subject.clone()),
        donor_prompt: result.donor.as_ref().map(|d| d.prompt.clone()),
        foil_id: result.foil_id,
        foil: result.foil.clone(),
        clean,
        corrupted,
    });
    Ok(JobRows { fact: fact_row, traces })
}

/// The clean and corrupted runs' metrics: present, each in its range, `prob` equal to
/// high_score and low_score (the worker stores those as the f32 of the same values), and a
/// foil that is not the answer (STR's: the donor's).
fn check_metrics(
    ctx: &JobContext<'_>,
    result: &proto::TraceResult,
) -> Result<(MetricValues, MetricValues), ResultError> {
    let read = |run: &str, m: Option<&proto::MetricValues>| {
        let m = m.ok_or_else(|| ResultError::Metric(format!("{run} run's metrics missing")))?;
        let values =
            MetricValues { prob: m.prob, logprob: m.logprob, logit_diff: m.logit_diff, kl: m.kl };
        if let Some((metric, v)) = values.invalid() {
            return Err(ResultError::Metric(format!("{run} {metric} is {v}")));
        }
        Ok(values)
    };
    let clean = read("clean", result.clean.as_ref())?;
    let corrupted = read("corrupted", result.corrupted.as_ref())?;
    for (run, prob, score) in
        [("clean", clean.prob, result.high_score), ("corrupted", corrupted.prob, result.low_score)]
    {
        if prob as f32 != score {
            return Err(ResultError::Metric(format!("{run} prob {prob} against score {score}")));
        }
    }
    if result.foil_id == result.answer_id {
        return Err(ResultError::Metric(format!("foil {} is the answer", result.foil_id)));
    }
    if ctx.experiment.is_str()
        && let Some(d) = result.donor.as_ref().filter(|d| d.foil_id != result.foil_id)
    {
        return Err(ResultError::Metric(format!(
            "foil {} is not the donor's {}",
            result.foil_id, d.foil_id
        )));
    }
    Ok((clean, corrupted))
}

/// The noise level and the donor fit the corruption: noise has a level and no donor; STR
/// a donor among the job's candidates (with its subject) and no level.
fn check_corruption(ctx: &JobContext<'_>, result: &proto::TraceResult) -> Result<(), ResultError> {
    let level = result.noise_level;
    match (ctx.experiment.is_str(), level, &result.donor) {
        (false, Some(l), None) if l.is_finite() && l >= 0.0 => Ok(()),
        (false, Some(l), None) => Err(ResultError::NoiseLevel(format!("{l} is not a level"))),
        (false, None, _) => Err(ResultError::NoiseLevel("missing".into())),
        (false, Some(_), Some(_)) => Err(ResultError::Donor("sent for a noise corruption".into())),
        (true, Some(l), _) => Err(ResultError::NoiseLevel(format!("{l} sent for STR"))),
        (true, None, None) => Err(ResultError::Donor("missing".into())),
        (true, None, Some(d)) => {
            let known = ctx.candidates.iter().find(|c| c.known_id == d.known_id);
            match known {
                Some(c) if c.subject == d.subject && !d.prompt.is_empty() => Ok(()),
                Some(_) => {
                    Err(ResultError::Donor(format!("fact {} has another subject", d.known_id)))
                }
                None => Err(ResultError::Donor(format!(
                    "fact {} is not a candidate of this fact",
                    d.known_id
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use common::experiment::{TokenRole, Tokens};

    use super::*;

    const G: Geometry = Geometry { n_layers: 4, n_heads: 2 };

    fn experiment(kinds: &[Kind], tokens: Tokens) -> Experiment {
        Experiment { kinds: kinds.to_vec(), tokens, ..Experiment::rome() }
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

    fn ctx<'a>(e: &'a Experiment, layers: &'a Range<u32>, f: &'a KnownFact) -> JobContext<'a> {
        JobContext {
            fact: f,
            layers,
            experiment: e,
            geometry: G,
            samples: 2,
            candidates: &[],
            model: "m",
        }
    }

    /// A well-formed result of a 3-token fact with subject [0, 1) for `e` over `width` layers.
    fn result(e: &Experiment, width: usize) -> proto::TraceResult {
        let tokens: Vec<u32> = e.tokens.select((0, 1), 3).into_iter().map(|t| t as u32).collect();
        let table = |kind: Kind| {
            tables(
                kind,
                &tokens,
                (0..tokens.len() * width * kind.heads(G)).map(|i| i as f32 / 100.0).collect(),
            )
        };
        proto::TraceResult {
            tokens: vec!["A".into(), " is".into(), " it".into()],
            token_ids: vec![1, 2, 3],
            subject_start: 0,
            subject_end: 1,
            traced: true,
            scores: e.kinds.iter().map(|&k| table(k)).collect(),
            noise_level: Some(0.1),
            ..metrics(0.5, 0.25)
        }
    }

    /// A kind's tables with `prob` values `scores` and the other metrics made from them.
    fn tables(kind: Kind, tokens: &[u32], scores: Vec<f32>) -> proto::KindScores {
        proto::KindScores {
            kind: proto::Kind::from(kind) as i32,
            tokens: tokens.to_vec(),
            logprob: scores.iter().map(|p| -p).collect(),
            logit_diff: scores.iter().map(|p| 10.0 * p - 5.0).collect(),
            kl: scores.clone(),
            scores,
        }
    }

    /// A result with the clean and corrupted runs' metrics of p = `high` and `low`, foil 4.
    fn metrics(high: f32, low: f32) -> proto::TraceResult {
        let run = |p: f32| proto::MetricValues {
            prob: f64::from(p),
            logprob: -1.0,
            logit_diff: 2.0,
            kl: 0.5,
        };
        proto::TraceResult {
            high_score: high,
            low_score: low,
            foil_id: 4,
            foil: " x".into(),
            clean: Some(run(high)),
            corrupted: Some(run(low)),
            ..proto::TraceResult::default()
        }
    }

    /// STR: a donor among the candidates and no noise level; anything else is refused.
    #[test]
    fn str_results_carry_a_candidate_donor() {
        let noise = experiment(&[Kind::Hidden], Tokens::all());
        let e = Experiment { corruption: common::experiment::Corruption::Str, ..noise.clone() };
        let f = fact();
        let pool = [Candidate { known_id: 8, subject: "C".into(), attribute: "D".into() }];
        let with_pool = JobContext { candidates: &pool, ..ctx(&e, &(0..2), &f) };
        let donor =
            proto::Donor { known_id: 8, subject: "C".into(), prompt: "C is".into(), foil_id: 4 };
        let good =
            proto::TraceResult { noise_level: None, donor: Some(donor.clone()), ..result(&e, 2) };
        let row = job_rows(&with_pool, &good).expect("valid").fact.expect("fact row");
        assert_eq!((row.donor_known_id, row.noise_level), (Some(8), None));
        assert_eq!(row.donor_prompt.as_deref(), Some("C is"));
        let refused =
            |r: proto::TraceResult| job_rows(&with_pool, &r).expect_err("refused").to_string();
        let stranger = proto::Donor { known_id: 9, ..donor.clone() };
        assert!(
            refused(proto::TraceResult { donor: Some(stranger), ..good.clone() })
                .contains("not a candidate")
        );
        let renamed = proto::Donor { subject: "E".into(), ..donor.clone() };
        assert!(
            refused(proto::TraceResult { donor: Some(renamed), ..good.clone() })
                .contains("another subject")
        );
        assert!(refused(proto::TraceResult { donor: None, ..good.clone() }).contains("missing"));
        let other_foil = proto::Donor { foil_id: 5, ..donor.clone() };
        assert!(
            refused(proto::TraceResult { donor: Some(other_foil), ..good.clone() })
                .contains("not the donor's")
        );
        assert!(
            refused(proto::TraceResult { noise_level: Some(0.1), ..good.clone() })
                .contains("sent for STR")
        );
        // And the noise experiment refuses a donor.
        let noisy = proto::TraceResult { noise_level: Some(0.1), ..good };
        let err = job_rows(&ctx(&noise, &(0..2), &f), &noisy).expect_err("donor").to_string();
        assert!(err.contains("noise corruption"), "{err}");
    }

    #[test]
    fn rows_cover_the_jobs_layers_and_only_layer_zero_writes_the_fact() {
        let (e, f) = (experiment(&[Kind::Hidden, Kind::Mlp], Tokens::all()), fact());
        let rows = job_rows(&ctx(&e, &(2..4), &f), &result(&e, 2)).expect("valid");
        assert!(rows.fact.is_none());
        assert_eq!(rows.traces.len(), 3 * 2 * 2);
        let r = rows.traces[3];
        assert_eq!((r.kind, r.token, r.layer, r.head, r.score), (Kind::Hidden, 1, 3, None, 0.03));
        assert_eq!(r.category, TokenCategory::FirstSubsequent);
        let first = job_rows(&ctx(&e, &(0..2), &f), &result(&e, 2)).expect("valid");
        let row = first.fact.expect("fact row");
        assert_eq!(row.relation_id.as_deref(), Some("P1"));
        assert_eq!((row.traced_tokens, row.n_layers, row.n_heads), (vec![0, 1, 2], 4, 2));
    }

    #[test]
    fn heads_and_token_selectors_shape_the_rows() {
        let tokens = Tokens(vec![TokenRole::LastSubject, TokenRole::Last]);
        let (e, f) = (experiment(&[Kind::Head], tokens), fact());
        let rows = job_rows(&ctx(&e, &(1..3), &f), &result(&e, 2)).expect("valid");
        // Tokens 0 (the one-token subject) and 2 (the last), 2 layers, 2 heads.
        assert_eq!(rows.traces.len(), 2 * 2 * 2);
        let r = rows.traces[5];
        assert_eq!((r.token, r.layer, r.head), (2, 1, Some(1)));
        assert_eq!(r.score, 0.05);
        let mut wrong = result(&e, 2);
        wrong.scores[0].tokens = vec![0, 1, 2];
        let err = job_rows(&ctx(&e, &(1..3), &f), &wrong).expect_err("all tokens");
        assert!(matches!(err, ResultError::TracedTokens { .. }), "{err}");
        let mut short = result(&e, 2);
        short.scores[0].scores.truncate(4);
        let err = job_rows(&ctx(&e, &(1..3), &f), &short).expect_err("one head");
        assert!(err.to_string().contains("2 heads"), "{err}");
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
            3 => r.scores[1].kind = r.scores[0].kind,
            4 => r.scores[0].kind = 99,
            5 => r.subject_end = n_tokens as u32 + 1,
            6 => r.token_ids.push(0),
            7 => r.high_score = f32::NAN,
            8 => r.traced = false,
            9 => r.scores.push(r.scores[0].clone()),
            10 => r.scores[1].tokens.push(n_tokens as u32),
            11 => r.noise_level = Some(-1.0),
            12 => r.noise_level = None,
            14 => set_first(&mut r.scores[0].logprob, 0.5),
            15 => set_first(&mut r.scores[1].kl, -1.0),
            16 => drop(r.scores[1].logit_diff.pop()),
            17 => r.clean = None,
            18 => r.foil_id = r.answer_id,
            19 => r.corrupted = Some(proto::MetricValues { prob: 2.0, ..Default::default() }),
            20 => set_first(&mut r.scores[0].logit_diff, f32::INFINITY),
            _ => {
                r.donor = Some(proto::Donor {
                    known_id: 1,
                    subject: "x".into(),
                    prompt: "x".into(),
                    foil_id: 0,
                })
            }
        }
    }

    proptest::proptest! {
        // 3000 cases in CI (bounded time: about a second); CT_FUZZ_CASES runs more.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("CT_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(3000)
        ))]
        /// Fuzzing the result check: a well-formed result for any job shape (kinds with and
        /// without a head axis, any token selector) passes and makes exactly one probability
        /// per (kind, token, layer, head); the same result with any defects never passes, and
        /// nothing panics.
        #[test]
        fn only_well_formed_results_pass(
            n_tokens in 1usize..7,
            subject in (0usize..7, 0usize..7),
            layer_start in 0u32..4,
            width in 1u32..4,
            swap_kinds in proptest::prelude::any::<bool>(),
            only_some_tokens in proptest::prelude::any::<bool>(),
            values in proptest::collection::vec(0f32..=1.0, 2 + 6 * 3 * 2 * 2),
            defects in proptest::collection::vec(0usize..21, 0..3),
        ) {
            let s0 = subject.0 % n_tokens;
            let s1 = s0 + 1 + subject.1 % (n_tokens - s0);
            let mut kinds = [Kind::Hidden, Kind::Head];
            if swap_kinds {
                kinds.swap(0, 1);
            }
            let tokens = if only_some_tokens {
                Tokens(vec![TokenRole::LastSubject, TokenRole::Last])
            } else {
                Tokens::all()
            };
            let e = experiment(&kinds, tokens);
            let traced: Vec<u32> =
                e.tokens.select((s0, s1), n_tokens).into_iter().map(|t| t as u32).collect();
            let mut next = 2;
            let mut result = proto::TraceResult {
                tokens: (0..n_tokens).map(|t| format!("t{t}")).collect(),
                token_ids: (0..n_tokens as u32).collect(),
                subject_start: s0 as u32,
                subject_end: s1 as u32,
                traced: true,
                noise_level: Some(0.25),
                scores: kinds.iter().map(|&kind| {
                    let n = traced.len() * width as usize * kind.heads(G);
                    next += n;
                    tables(kind, &traced, values[next - n..next].to_vec())
                }).collect(),
                ..metrics(values[0], values[1])
            };
            for &d in &defects {
                spoil(&mut result, d, n_tokens);
            }
            let (layers, f) = (layer_start..layer_start + width, fact());
            match job_rows(&ctx(&e, &layers, &f), &result) {
                Ok(rows) => {
                    proptest::prop_assert!(defects.is_empty(), "a spoiled result passed: {defects:?}");
                    let mut seen = std::collections::HashSet::new();
                    for r in &rows.traces {
                        proptest::prop_assert!((0.0..=1.0).contains(&r.score));
                        proptest::prop_assert!(layers.contains(&r.layer));
                        proptest::prop_assert!(traced.contains(&r.token));
                        proptest::prop_assert_eq!(r.head.is_some(), r.kind == Kind::Head);
                        proptest::prop_assert!(seen.insert((r.kind, r.token, r.layer, r.head)));
                    }
                    let per_token = width as usize * (1 + G.n_heads);
                    proptest::prop_assert_eq!(rows.traces.len(), traced.len() * per_token);
                }
                Err(_) => proptest::prop_assert!(!defects.is_empty(), "a well-formed result failed"),
            }
        }
    }

    #[test]
    fn results_that_do_not_fit_their_job_are_refused() {
        let (e, f) = (experiment(&[Kind::Hidden, Kind::Mlp], Tokens::all()), fact());
        let c = ctx(&e, &(0..2), &f);
        let wide = ctx(&e, &(0..3), &f);
        assert!(job_rows(&wide, &result(&e, 2)).is_err(), "wrong width");
        let mut r = result(&e, 2);
        r.scores.pop();
        assert!(job_rows(&c, &r).is_err(), "missing kind");
        let mut r = result(&e, 2);
        r.scores[0].scores[1] = f32::NAN;
        assert!(job_rows(&c, &r).expect_err("NaN").to_string().contains("NaN"));
        let mut r = result(&e, 2);
        r.subject_end = 4;
        assert!(job_rows(&c, &r).is_err(), "subject outside");
        let mut r = result(&e, 2);
        r.scores[1].kind = r.scores[0].kind;
        assert!(job_rows(&c, &r).expect_err("twice").to_string().contains("twice"));
        let mut r = result(&e, 2);
        r.scores[0].scores[0] = 1.5;
        assert!(job_rows(&c, &r).is_err(), "not a probability");
        let mut r = result(&e, 2);
        r.high_score = f32::INFINITY;
        assert!(job_rows(&c, &r).is_err(), "high score");
        let mut r = result(&e, 2);
        r.tokens = vec!["t".into(); MAX_TOKENS + 1];
        r.token_ids = vec![0; MAX_TOKENS + 1];
        assert_eq!(job_rows(&c, &r).expect_err("long"), ResultError::TooManyTokens(MAX_TOKENS + 1));
        let mut r = result(&e, 2);
        r.traced = false;
        assert_eq!(job_rows(&c, &r).expect_err("untraced"), ResultError::ScoresUntraced);
        r.scores.clear();
        let untraced = job_rows(&c, &r).expect("untraced");
        assert!(untraced.traces.is_empty());
        assert!(untraced.fact.expect("fact").traced_tokens.is_empty());
    }
}
