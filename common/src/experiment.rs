//! The experiment: one spec holding every setting that changes a number of a trace.
//!
//! `worker trace` and `coordinator run` parse their flags into it in one place
//! ([`crate::flags::ExperimentFlags::experiment`]), it is validated once
//! ([`Experiment::check`]), travels to workers as one typed message (proto's `Experiment`),
//! is recorded in the manifest, and its digest names the sweep. The noise level is resolved
//! once ([`NoiseCorruption::resolve`]: from the command line, or from the calibration job's
//! embedding std) and then carried resolved ([`Resolved`]). docs/science.md defines every
//! quantity.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kinds::{Geometry, Kind};
pub use crate::metric::Metric;
use crate::rollup::category_rows;
use crate::settings::{Correctness, Distribution, NoiseSpec, SeedMode};

/// Everything that decides a trace's numbers, besides the model and the fact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    /// What is corrupted, and how.
    pub corruption: Corruption,
    /// What is restored: the kinds, in output order, each once.
    pub kinds: Vec<Kind>,
    /// Layers restored together by the windowed kinds (mlp, attn).
    pub window: u32,
    /// Which tokens' rows are computed.
    pub tokens: Tokens,
    /// Which facts are traced.
    pub correctness: Correctness,
    /// Which run is patched with which run's states.
    pub direction: Direction,
    /// What is measured at the last position.
    pub metrics: Vec<Metric>,
}

/// What is corrupted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Corruption {
    /// ROME's: noise on the subject's token embeddings, S samples.
    Noise(NoiseCorruption),
    /// Symmetric token replacement: the subject's tokens replaced by a donor fact's
    /// (`crate::donor`), one deterministic corrupted run.
    Str,
}

/// Noise on the subject's token embeddings (ROME's `trace_with_patch` noise).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NoiseCorruption {
    /// The rule for the level: a number, `sK` or `uK`.
    pub noise: NoiseSpec,
    /// Replace the embeddings with the noise instead of adding it.
    pub replace: bool,
    /// Noise samples S per run.
    pub samples: u32,
    /// How each fact's generator is seeded.
    pub seed_mode: SeedMode,
    /// The sweep seed of [`SeedMode::PerFact`]; 0 in ROME's mode, where it changes nothing.
    pub seed: u64,
}

/// Which run is patched with which run's states (docs/science.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// ROME's: the corrupted run with a cell's states restored to the clean run's.
    Denoising,
    /// The clean run with a cell's states replaced by the corrupted run's (sample s's in
    /// row s); the frozen states of the severed kinds hold the clean run's values.
    Noising,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Denoising => "denoising",
            Direction::Noising => "noising",
        })
    }
}

/// A role a token plays in its prompt (docs/science.md, "token categories").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenRole {
    /// Every token of the prompt.
    All,
    /// The subject's first token b.
    FirstSubject,
    /// The subject's tokens b+1 .. e-2.
    MiddleSubject,
    /// The subject's last token e-1.
    LastSubject,
    /// The first token after the subject, e.
    FirstSubsequent,
    /// Tokens e+1 .. T-2.
    Further,
    /// The prompt's last token T-1.
    Last,
}

/// Which tokens' rows a trace computes: the union of some roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tokens(pub Vec<TokenRole>);

impl Tokens {
    /// Every token (ROME's tables).
    pub fn all() -> Self {
        Self(vec![TokenRole::All])
    }

    /// Whether every token is traced.
    pub fn is_all(&self) -> bool {
        self.0.contains(&TokenRole::All)
    }

    /// Which of the averages' categories (`rollup::CATEGORIES`, in that order) the selector
    /// asks for: all six for `all`.
    pub fn categories(&self) -> [bool; 6] {
        let mut asked = [self.is_all(); 6];
        for role in &self.0 {
            if let Some(i) = role.category() {
                asked[i] = true;
            }
        }
        asked
    }

    /// The traced tokens of a `t_len`-token prompt with subject `[b, e)`, ascending, each
    /// once. The roles overlap as ROME's categories do (a one-token subject's token is its
    /// first and last).
    pub fn select(&self, subject: (usize, usize), t_len: usize) -> Vec<usize> {
        if self.is_all() {
            return (0..t_len).collect();
        }
        let rows = category_rows(subject, t_len);
        let mut tokens: Vec<usize> = self
            .0
            .iter()
            .filter_map(|role| role.category())
            .flat_map(|i| rows[i].iter().copied())
            .filter(|&t| t < t_len)
            .collect();
        tokens.sort_unstable();
        tokens.dedup();
        tokens
    }
}

impl Default for Tokens {
    fn default() -> Self {
        Self::all()
    }
}

/// The noise a run adds: the level resolved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Noise {
    /// Multiplies the unit noise (in f64, as ROME's `noise * x`).
    pub level: f64,
    /// Normal or uniform unit noise.
    pub distribution: Distribution,
    /// Replace the embeddings instead of adding to them.
    pub replace: bool,
}

fn invalid(setting: &str, message: impl Into<String>) -> Error {
    Error::Experiment { setting: setting.into(), message: message.into() }
}

impl NoiseCorruption {
    /// The checks of the noise settings, given the kinds they corrupt for.
    fn check(&self, kinds: &[Kind]) -> Result<()> {
        if self.samples == 0 {
            return Err(invalid("--samples", "must be at least 1"));
        }
        if self.seed_mode == SeedMode::Rome && self.seed != 0 {
            return Err(invalid("--seed", "applies to --seed-mode per-fact only"));
        }
        let noise_ok = match self.noise {
            NoiseSpec::Level(v) | NoiseSpec::StdMultiple(v) | NoiseSpec::Uniform(v) => {
                v.is_finite() && v >= 0.0
            }
        };
        if !noise_ok {
            return Err(invalid("--noise", format!("{} is not a level", self.noise)));
        }
        // ROME's notebook (`trace_with_repatch`) only adds Gaussian noise; its two-pass
        // seeding has no meaning for the other corruptions.
        if self.seed_mode == SeedMode::Rome {
            for kind in kinds.iter().filter(|k| k.freezes().is_some()) {
                if self.replace {
                    return Err(invalid(
                        "--replace",
                        format!(
                            "{kind} with --seed-mode rome reproduces ROME's notebook, which only adds noise"
                        ),
                    ));
                }
                if matches!(self.noise, NoiseSpec::Uniform(_)) {
                    return Err(invalid(
                        "--noise",
                        format!(
                            "{kind} with --seed-mode rome reproduces ROME's notebook, which only adds Gaussian noise"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the level must first be measured on the dataset's subjects (`sK`).
    pub fn needs_calibration(&self) -> bool {
        self.noise.needs_calibration()
    }

    /// The factor K of an `sK` rule.
    pub fn std_factor(&self) -> Option<f64> {
        match self.noise {
            NoiseSpec::StdMultiple(k) => Some(k),
            _ => None,
        }
    }

    /// The noise this rule gives: the one place a level is resolved. `std` is the
    /// embeddings' standard deviation (the calibration), which `sK` needs.
    pub fn resolve(&self, std: Option<f64>) -> Result<Noise> {
        let (level, distribution) = match self.noise {
            NoiseSpec::Level(level) => (level, Distribution::Normal),
            NoiseSpec::Uniform(k) => (k, Distribution::Uniform),
            // ROME: noise_level = 3 * collect_embedding_std(...), a Python float product.
            NoiseSpec::StdMultiple(k) => {
                let std = std.ok_or_else(|| {
                    invalid("--noise", format!("s{k} needs the embedding std of the subjects"))
                })?;
                if !(std.is_finite() && std >= 0.0) {
                    return Err(invalid("--noise", format!("embedding std {std} is not a std")));
                }
                (k * std, Distribution::Normal)
            }
        };
        Ok(Noise { level, distribution, replace: self.replace })
    }
}

impl Experiment {
    /// ROME's `calculate_hidden_flow` settings with the `s3` rule: every kind of Figure 2,
    /// 10 samples, window 10, `RandomState(1)` for every fact, every token, first-token
    /// correctness.
    pub fn rome() -> Self {
        Self {
            corruption: Corruption::Noise(NoiseCorruption {
                noise: NoiseSpec::StdMultiple(3.0),
                replace: false,
                samples: 10,
                seed_mode: SeedMode::Rome,
                seed: 0,
            }),
            kinds: Kind::ROME.to_vec(),
            window: 10,
            tokens: Tokens::all(),
            correctness: Correctness::FirstToken,
            direction: Direction::Denoising,
            metrics: Metric::ALL.to_vec(),
        }
    }

    /// The noise corruption, if that is the corruption.
    pub fn noise(&self) -> Option<&NoiseCorruption> {
        match &self.corruption {
            Corruption::Noise(n) => Some(n),
            Corruption::Str => None,
        }
    }

    /// Whether the corruption replaces the subject by a donor's.
    pub fn is_str(&self) -> bool {
        self.corruption == Corruption::Str
    }

    /// Whether the noise level must first be measured on the dataset's subjects (`sK`).
    pub fn needs_calibration(&self) -> bool {
        self.noise().is_some_and(NoiseCorruption::needs_calibration)
    }

    /// Corrupted rows per run: the noise samples, or STR's one.
    pub fn samples(&self) -> usize {
        self.noise().map_or(1, |n| n.samples as usize)
    }

    /// Whether the severed kinds' frozen states come from another corrupted run than the
    /// measured one (ROME's seeding quirk, docs/science.md §4): noise in `rome` mode only,
    /// denoising only (noising measures the clean run, and freezes its values).
    pub fn two_draws(&self) -> bool {
        self.freezes()
            && self.direction == Direction::Denoising
            && self.noise().is_some_and(|n| n.seed_mode == SeedMode::Rome)
    }

    /// Whether restored runs patch the clean run with the corrupted run's states.
    pub fn noising(&self) -> bool {
        self.direction == Direction::Noising
    }

    /// Whether any kind freezes states at a corrupted run's values.
    pub fn freezes(&self) -> bool {
        self.kinds.iter().any(|k| k.freezes().is_some())
    }

    /// The checks that need no model. Every message names the flag at fault.
    pub fn check(&self) -> Result<()> {
        if self.window == 0 {
            return Err(invalid("--window", "must be at least 1"));
        }
        if self.kinds.is_empty() {
            return Err(invalid("--kinds", "needs at least one kind"));
        }
        for (i, kind) in self.kinds.iter().enumerate() {
            if self.kinds[..i].contains(kind) {
                return Err(invalid("--kinds", format!("{kind} is named twice")));
            }
        }
        if self.tokens.0.is_empty() {
            return Err(invalid("--tokens", "needs at least one token role (or all)"));
        }
        // Every metric is computed and stored; the list records which, in column order.
        if self.metrics != Metric::ALL {
            return Err(invalid(
                "metrics",
                format!("must be every metric in order ({:?})", Metric::ALL),
            ));
        }
        match &self.corruption {
            Corruption::Noise(n) => n.check(&self.kinds),
            Corruption::Str => Ok(()),
        }
    }

    /// The checks that need the model's shape.
    pub fn check_model(&self, g: Geometry) -> Result<()> {
        if self.window as usize > g.n_layers {
            return Err(invalid(
                "--window",
                format!("{} is more than the model's {} layers", self.window, g.n_layers),
            ));
        }
        if g.n_layers == 0 || (self.kinds.iter().any(|k| k.has_heads()) && g.n_heads == 0) {
            return Err(invalid("--model", "reports no layers or no heads"));
        }
        Ok(())
    }

    /// `blake3:` and the hex digest of the spec's JSON: equal specs, equal digests.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("blake3:{}", blake3::hash(&json).to_hex())
    }
}

/// An experiment whose noise level is known: what a worker runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    /// The spec.
    pub experiment: Experiment,
    /// Its noise, resolved; `None` for a corruption without noise (STR).
    pub noise: Option<Noise>,
}

impl Resolved {
    /// Checks the spec, and that `noise` is what its rule resolves to (a worker trusts
    /// nothing it is sent).
    pub fn new(experiment: Experiment, noise: Option<Noise>) -> Result<Self> {
        experiment.check()?;
        match (experiment.noise(), noise) {
            (None, None) => {}
            (None, Some(noise)) => {
                return Err(invalid(
                    "--noise",
                    format!("{noise:?} given to a corruption without noise"),
                ));
            }
            (Some(rule), None) => {
                return Err(invalid("--noise", format!("the rule {} is not resolved", rule.noise)));
            }
            (Some(rule), Some(noise)) => {
                let expected = rule.resolve(Some(0.0))?;
                let level_ok = noise.level.is_finite()
                    && noise.level >= 0.0
                    && (rule.needs_calibration() || noise.level == expected.level);
                if !level_ok
                    || noise.distribution != expected.distribution
                    || noise.replace != rule.replace
                {
                    return Err(invalid(
                        "--noise",
                        format!("{noise:?} is not what the rule {} resolves to", rule.noise),
                    ));
                }
            }
        }
        Ok(Self { experiment, noise })
    }
}

impl TokenRole {
    /// The category of `rollup::CATEGORIES` the role names (`None` for `all`).
    pub fn category(self) -> Option<usize> {
        match self {
            TokenRole::All => None,
            TokenRole::FirstSubject => Some(0),
            TokenRole::MiddleSubject => Some(1),
            TokenRole::LastSubject => Some(2),
            TokenRole::FirstSubsequent => Some(3),
            TokenRole::Further => Some(4),
            TokenRole::Last => Some(5),
        }
    }
}

impl fmt::Display for TokenRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenRole::All => "all",
            TokenRole::FirstSubject => "first-subject",
            TokenRole::MiddleSubject => "middle-subject",
            TokenRole::LastSubject => "last-subject",
            TokenRole::FirstSubsequent => "first-subsequent",
            TokenRole::Further => "further",
            TokenRole::Last => "last",
        })
    }
}

impl FromStr for TokenRole {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        const ALL: [TokenRole; 7] = [
            TokenRole::All,
            TokenRole::FirstSubject,
            TokenRole::MiddleSubject,
            TokenRole::LastSubject,
            TokenRole::FirstSubsequent,
            TokenRole::Further,
            TokenRole::Last,
        ];
        ALL.into_iter().find(|r| r.to_string() == s).ok_or_else(|| {
            let names: Vec<String> = ALL.iter().map(ToString::to_string).collect();
            format!("unknown token role {s:?} ({})", names.join(", "))
        })
    }
}

impl fmt::Display for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&names.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut Experiment)) -> Experiment {
        let mut e = Experiment::rome();
        f(&mut e);
        e
    }

    fn noise_mut(e: &mut Experiment) -> &mut NoiseCorruption {
        match &mut e.corruption {
            Corruption::Noise(n) => n,
            Corruption::Str => panic!("a noise experiment"),
        }
    }

    #[test]
    fn token_roles_select_romes_categories() {
        // T = 7, subject [1, 4): first 1, middle 2, last 3, first after 4, further 5, last 6.
        let t = |roles: &[TokenRole]| Tokens(roles.to_vec()).select((1, 4), 7);
        assert_eq!(t(&[TokenRole::All]), (0..7).collect::<Vec<_>>());
        assert_eq!(t(&[TokenRole::LastSubject, TokenRole::Last]), vec![3, 6]);
        assert_eq!(t(&[TokenRole::Last, TokenRole::LastSubject, TokenRole::Last]), vec![3, 6]);
        assert_eq!(t(&[TokenRole::MiddleSubject]), vec![2]);
        // One-token subject at the end: it is its first and last token and the last token.
        let one = Tokens(vec![TokenRole::FirstSubject, TokenRole::LastSubject, TokenRole::Last]);
        assert_eq!(one.select((2, 3), 3), vec![2]);
        assert!(Tokens(vec![TokenRole::FirstSubsequent]).select((2, 3), 3).is_empty());
        assert_eq!("last-subject".parse(), Ok(TokenRole::LastSubject));
        let asked = Tokens(vec![TokenRole::LastSubject, TokenRole::Last]).categories();
        assert_eq!(asked, [false, false, true, false, false, true]);
        assert_eq!(Tokens::all().categories(), [true; 6]);
        assert!("subject".parse::<TokenRole>().is_err());
    }

    #[test]
    fn checks_name_the_flag() {
        let err = |e: Experiment| e.check().expect_err("invalid").to_string();
        assert!(err(with(|e| noise_mut(e).samples = 0)).starts_with("--samples"));
        assert!(err(with(|e| e.window = 0)).starts_with("--window"));
        assert!(err(with(|e| e.kinds.clear())).starts_with("--kinds"));
        assert!(err(with(|e| e.kinds.push(Kind::Mlp))).contains("twice"));
        assert!(err(with(|e| e.tokens.0.clear())).starts_with("--tokens"));
        assert!(err(with(|e| noise_mut(e).seed = 4)).starts_with("--seed"));
        let severed = |e: &mut Experiment| e.kinds = vec![Kind::Hidden, Kind::SeveredMlp];
        assert!(
            err(with(|e| {
                severed(e);
                noise_mut(e).replace = true;
            }))
            .starts_with("--replace")
        );
        assert!(
            err(with(|e| {
                severed(e);
                noise_mut(e).noise = NoiseSpec::Uniform(2.0);
            }))
            .starts_with("--noise")
        );
        // In per-fact mode the severed kinds take any noise.
        let ok = with(|e| {
            severed(e);
            let n = noise_mut(e);
            n.replace = true;
            n.seed_mode = SeedMode::PerFact;
            n.seed = 3;
        });
        ok.check().expect("per-fact severed with replace");
        Experiment::rome().check().expect("ROME's settings");
        let g = Geometry { n_layers: 6, n_heads: 2 };
        assert!(
            Experiment::rome().check_model(g).expect_err("window").to_string().contains("6 layers")
        );
    }

    #[test]
    fn noise_is_resolved_once_and_checked() {
        let rule = *Experiment::rome().noise().expect("noise");
        assert!(rule.resolve(None).is_err(), "s3 needs the std");
        let noise = rule.resolve(Some(0.5)).expect("level");
        assert_eq!(noise.level, 1.5);
        Resolved::new(Experiment::rome(), Some(noise)).expect("consistent");
        let wrong = Noise { distribution: Distribution::Uniform, ..noise };
        assert!(Resolved::new(Experiment::rome(), Some(wrong)).is_err());
        assert!(Resolved::new(Experiment::rome(), None).is_err(), "noise needs its level");
        let fixed = with(|e| noise_mut(e).noise = NoiseSpec::Level(0.1));
        assert!(Resolved::new(fixed.clone(), Some(noise)).is_err(), "a level is what it says");
        Resolved::new(fixed, Some(Noise { level: 0.1, ..noise })).expect("the level");
        let str = with(|e| e.corruption = Corruption::Str);
        assert!(Resolved::new(str.clone(), Some(noise)).is_err(), "STR has no noise");
        assert!(Resolved::new(str, None).expect("STR").noise.is_none());
    }

    #[test]
    fn digests_follow_the_spec() {
        let a = Experiment::rome();
        assert_eq!(a.digest(), Experiment::rome().digest());
        assert_ne!(a.digest(), with(|e| e.window = 3).digest());
        assert_ne!(a.digest(), with(|e| e.tokens = Tokens(vec![TokenRole::Last])).digest());
        let json = serde_json::to_value(&a).expect("json");
        assert_eq!(json["corruption"]["type"], "noise");
        let str = with(|e| e.corruption = Corruption::Str);
        assert_ne!(a.digest(), str.digest());
        assert_eq!(serde_json::to_value(&str).expect("json")["corruption"]["type"], "str");
        assert_eq!(json["tokens"], serde_json::json!(["all"]));
        let back: Experiment = serde_json::from_value(json).expect("back");
        assert_eq!(back, a);
    }
}
