//! The protocol's experiment messages to and from `common`'s domain types, in one place.
//! Prost types stay at the edge: the coordinator builds a job from a
//! [`common::experiment::Resolved`], a worker turns the job back into one, and every field it
//! cannot read is an error naming the field.

use common::donor::Candidate;
use common::experiment::{
    Corruption, Direction, Experiment, Metric, Noise, NoiseCorruption, Resolved, TokenRole, Tokens,
};
use common::kinds::Kind;
use common::settings::{Correctness, Distribution, NoiseSpec, SeedMode};

use crate::v1 as pb;

/// A message field a worker cannot read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("job field {field}: {message}")]
pub struct FieldError {
    /// The field, dotted.
    pub field: String,
    /// Why.
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> FieldError {
    FieldError { field: field.into(), message: message.into() }
}

/// An enum value: unknown and unspecified values are refused.
fn known<T>(field: &str, value: i32, f: impl FnOnce(i32) -> Option<T>) -> Result<T, FieldError> {
    f(value).ok_or_else(|| bad(field, format!("{value} is not a known value")))
}

impl From<Kind> for pb::Kind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Hidden => pb::Kind::Hidden,
            Kind::Mlp => pb::Kind::Mlp,
            Kind::Attn => pb::Kind::Attn,
            Kind::SeveredMlp => pb::Kind::SeveredMlp,
            Kind::SeveredAttn => pb::Kind::SeveredAttn,
            Kind::Head => pb::Kind::Head,
        }
    }
}

/// The kind of a protocol enum value (`None`: unspecified or unknown).
pub fn kind(value: i32) -> Option<Kind> {
    Some(match pb::Kind::try_from(value).ok()? {
        pb::Kind::Unspecified => return None,
        pb::Kind::Hidden => Kind::Hidden,
        pb::Kind::Mlp => Kind::Mlp,
        pb::Kind::Attn => Kind::Attn,
        pb::Kind::SeveredMlp => Kind::SeveredMlp,
        pb::Kind::SeveredAttn => Kind::SeveredAttn,
        pb::Kind::Head => Kind::Head,
    })
}

fn role_to(r: TokenRole) -> pb::TokenRole {
    match r {
        TokenRole::All => pb::TokenRole::All,
        TokenRole::FirstSubject => pb::TokenRole::FirstSubject,
        TokenRole::MiddleSubject => pb::TokenRole::MiddleSubject,
        TokenRole::LastSubject => pb::TokenRole::LastSubject,
        TokenRole::FirstSubsequent => pb::TokenRole::FirstSubsequent,
        TokenRole::Further => pb::TokenRole::Further,
        TokenRole::Last => pb::TokenRole::Last,
    }
}

fn role_from(value: i32) -> Option<TokenRole> {
    Some(match pb::TokenRole::try_from(value).ok()? {
        pb::TokenRole::Unspecified => return None,
        pb::TokenRole::All => TokenRole::All,
        pb::TokenRole::FirstSubject => TokenRole::FirstSubject,
        pb::TokenRole::MiddleSubject => TokenRole::MiddleSubject,
        pb::TokenRole::LastSubject => TokenRole::LastSubject,
        pb::TokenRole::FirstSubsequent => TokenRole::FirstSubsequent,
        pb::TokenRole::Further => TokenRole::Further,
        pb::TokenRole::Last => TokenRole::Last,
    })
}

fn seed_mode_from(value: i32) -> Option<SeedMode> {
    match pb::SeedMode::try_from(value).ok()? {
        pb::SeedMode::Unspecified => None,
        pb::SeedMode::Rome => Some(SeedMode::Rome),
        pb::SeedMode::PerFact => Some(SeedMode::PerFact),
    }
}

fn correctness_from(value: i32) -> Option<Correctness> {
    match pb::Correctness::try_from(value).ok()? {
        pb::Correctness::Unspecified => None,
        pb::Correctness::Strict => Some(Correctness::Strict),
        pb::Correctness::FirstToken => Some(Correctness::FirstToken),
        pb::Correctness::None => Some(Correctness::None),
    }
}

fn distribution_from(value: i32) -> Option<Distribution> {
    match pb::Distribution::try_from(value).ok()? {
        pb::Distribution::Unspecified => None,
        pb::Distribution::Normal => Some(Distribution::Normal),
        pb::Distribution::Uniform => Some(Distribution::Uniform),
    }
}

impl From<&Experiment> for pb::Experiment {
    fn from(e: &Experiment) -> Self {
        let corruption = match &e.corruption {
            Corruption::Noise(n) => {
                let rule = match n.noise {
                    NoiseSpec::Level(v) => pb::noise_rule::Rule::Level(v),
                    NoiseSpec::StdMultiple(k) => pb::noise_rule::Rule::StdMultiple(k),
                    NoiseSpec::Uniform(k) => pb::noise_rule::Rule::Uniform(k),
                };
                pb::experiment::Corruption::Noise(pb::NoiseCorruption {
                    rule: Some(pb::NoiseRule { rule: Some(rule) }),
                    replace: n.replace,
                    samples: n.samples,
                    seed_mode: match n.seed_mode {
                        SeedMode::Rome => pb::SeedMode::Rome,
                        SeedMode::PerFact => pb::SeedMode::PerFact,
                    } as i32,
                    seed: n.seed,
                })
            }
            Corruption::Str => pb::experiment::Corruption::Str(pb::Str {}),
        };
        pb::Experiment {
            corruption: Some(corruption),
            kinds: e.kinds.iter().map(|&k| pb::Kind::from(k) as i32).collect(),
            window: e.window,
            tokens: e.tokens.0.iter().map(|&r| role_to(r) as i32).collect(),
            correctness: match e.correctness {
                Correctness::Strict => pb::Correctness::Strict,
                Correctness::FirstToken => pb::Correctness::FirstToken,
                Correctness::None => pb::Correctness::None,
            } as i32,
            direction: match e.direction {
                Direction::Denoising => pb::Direction::Denoising,
                Direction::Noising => pb::Direction::Noising,
            } as i32,
            metrics: e
                .metrics
                .iter()
                .map(|m| match m {
                    Metric::Prob => pb::Metric::Prob as i32,
                    Metric::Logprob => pb::Metric::Logprob as i32,
                    Metric::LogitDiff => pb::Metric::LogitDiff as i32,
                    Metric::Kl => pb::Metric::Kl as i32,
                })
                .collect(),
        }
    }
}

impl TryFrom<&pb::Experiment> for Experiment {
    type Error = FieldError;
    fn try_from(e: &pb::Experiment) -> Result<Self, FieldError> {
        let corruption = match &e.corruption {
            Some(pb::experiment::Corruption::Noise(n)) => {
                let rule = n
                    .rule
                    .as_ref()
                    .and_then(|r| r.rule)
                    .ok_or_else(|| bad("experiment.noise.rule", "missing"))?;
                let noise = match rule {
                    pb::noise_rule::Rule::Level(v) => NoiseSpec::Level(v),
                    pb::noise_rule::Rule::StdMultiple(k) => NoiseSpec::StdMultiple(k),
                    pb::noise_rule::Rule::Uniform(k) => NoiseSpec::Uniform(k),
                };
                Corruption::Noise(NoiseCorruption {
                    noise,
                    replace: n.replace,
                    samples: n.samples,
                    seed_mode: known("experiment.noise.seed_mode", n.seed_mode, seed_mode_from)?,
                    seed: n.seed,
                })
            }
            Some(pb::experiment::Corruption::Str(_)) => Corruption::Str,
            None => return Err(bad("experiment.corruption", "missing")),
        };
        let kinds = e
            .kinds
            .iter()
            .map(|&k| known("experiment.kinds", k, kind))
            .collect::<Result<Vec<_>, _>>()?;
        let tokens = e
            .tokens
            .iter()
            .map(|&r| known("experiment.tokens", r, role_from))
            .collect::<Result<Vec<_>, _>>()?;
        let metrics = e
            .metrics
            .iter()
            .map(|&m| {
                known("experiment.metrics", m, |v| match pb::Metric::try_from(v).ok()? {
                    pb::Metric::Prob => Some(Metric::Prob),
                    pb::Metric::Logprob => Some(Metric::Logprob),
                    pb::Metric::LogitDiff => Some(Metric::LogitDiff),
                    pb::Metric::Kl => Some(Metric::Kl),
                    pb::Metric::Unspecified => None,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let direction = known("experiment.direction", e.direction, |v| {
            match pb::Direction::try_from(v).ok()? {
                pb::Direction::Denoising => Some(Direction::Denoising),
                pb::Direction::Noising => Some(Direction::Noising),
                pb::Direction::Unspecified => None,
            }
        })?;
        Ok(Experiment {
            corruption,
            kinds,
            window: e.window,
            tokens: Tokens(tokens),
            correctness: known("experiment.correctness", e.correctness, correctness_from)?,
            direction,
            metrics,
        })
    }
}

impl From<&Noise> for pb::Noise {
    fn from(n: &Noise) -> Self {
        pb::Noise {
            level: n.level,
            distribution: match n.distribution {
                Distribution::Normal => pb::Distribution::Normal,
                Distribution::Uniform => pb::Distribution::Uniform,
            } as i32,
            replace: n.replace,
        }
    }
}

impl TryFrom<&pb::Noise> for Noise {
    type Error = FieldError;
    fn try_from(n: &pb::Noise) -> Result<Self, FieldError> {
        Ok(Noise {
            level: n.level,
            distribution: known("noise.distribution", n.distribution, distribution_from)?,
            replace: n.replace,
        })
    }
}

/// The resolved experiment a trace job carries, checked (`Resolved::new`).
pub fn resolved(job: &pb::TraceJob) -> Result<Resolved, FieldError> {
    let experiment = job.experiment.as_ref().ok_or_else(|| bad("experiment", "missing"))?;
    let experiment = Experiment::try_from(experiment)?;
    let noise = job.noise.as_ref().map(Noise::try_from).transpose()?;
    Resolved::new(experiment, noise).map_err(|e| bad("experiment", e.to_string()))
}

/// STR's donor candidates a trace job carries.
pub fn candidates(job: &pb::TraceJob) -> Vec<Candidate> {
    job.candidates
        .iter()
        .map(|c| Candidate {
            known_id: c.known_id,
            subject: c.subject.clone(),
            attribute: c.attribute.clone(),
        })
        .collect()
}

impl From<&Candidate> for pb::DonorCandidate {
    fn from(c: &Candidate) -> Self {
        pb::DonorCandidate {
            known_id: c.known_id,
            subject: c.subject.clone(),
            attribute: c.attribute.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experiments_survive_the_wire() {
        let mut e = Experiment::rome();
        e.kinds = Kind::ALL.to_vec();
        e.tokens = Tokens(vec![TokenRole::LastSubject, TokenRole::Last]);
        let Corruption::Noise(n) = &mut e.corruption else { panic!("noise") };
        n.seed_mode = SeedMode::PerFact;
        n.seed = 7;
        let noise = Noise { level: 0.3, distribution: Distribution::Normal, replace: false };
        let job = pb::TraceJob {
            experiment: Some(pb::Experiment::from(&e)),
            noise: Some(pb::Noise::from(&noise)),
            ..pb::TraceJob::default()
        };
        let back = resolved(&job).expect("resolved");
        assert_eq!(back.experiment, e);
        assert_eq!(back.noise, Some(noise));
        // STR, noising: no noise, and the candidates travel in order.
        let str = Experiment {
            corruption: Corruption::Str,
            direction: Direction::Noising,
            ..Experiment::rome()
        };
        let pool = vec![
            Candidate { known_id: 4, subject: "Lyon".into(), attribute: "France".into() },
            Candidate { known_id: 1, subject: "Oslo".into(), attribute: "Norway".into() },
        ];
        let job = pb::TraceJob {
            experiment: Some(pb::Experiment::from(&str)),
            candidates: pool.iter().map(pb::DonorCandidate::from).collect(),
            ..pb::TraceJob::default()
        };
        let back = resolved(&job).expect("resolved");
        assert_eq!((back.experiment, back.noise), (str, None));
        assert_eq!(candidates(&job), pool);
        let with_noise = pb::TraceJob { noise: Some(pb::Noise::from(&noise)), ..job };
        assert_eq!(resolved(&with_noise).expect_err("STR has no noise").field, "experiment");
    }

    #[test]
    fn unknown_values_name_their_field() {
        let mut msg = pb::Experiment::from(&Experiment::rome());
        msg.kinds.push(99);
        let err = Experiment::try_from(&msg).expect_err("unknown kind");
        assert_eq!(err.field, "experiment.kinds");
        let mut msg = pb::Experiment::from(&Experiment::rome());
        msg.correctness = 0;
        assert_eq!(
            Experiment::try_from(&msg).expect_err("unspecified").field,
            "experiment.correctness"
        );
        let job = pb::TraceJob::default();
        assert_eq!(resolved(&job).expect_err("missing").field, "experiment");
        let mut msg = pb::Experiment::from(&Experiment::rome());
        msg.direction = 7;
        assert_eq!(
            Experiment::try_from(&msg).expect_err("direction").field,
            "experiment.direction"
        );
        // Every metric is computed: a spec that lists fewer decodes, and fails its check.
        let mut msg = pb::Experiment::from(&Experiment::rome());
        msg.metrics.pop();
        let short = Experiment::try_from(&msg).expect("decodes");
        assert!(short.check().expect_err("refused").to_string().contains("every metric"));
    }
}
