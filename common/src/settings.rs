//! The values an experiment's settings take: noise rules and distributions, seed modes,
//! correctness rules. [`crate::experiment::Experiment`] holds them; docs/science.md defines
//! each (ROME's `calculate_hidden_flow`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The noise distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    /// `randn`: standard normal.
    Normal,
    /// `uniform(-1, 1)`.
    Uniform,
}

/// The `--noise` flag: a level, `sK` (K × the embeddings' std) or `uK` (uniform noise × K).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum NoiseSpec {
    /// Gaussian noise of this level.
    Level(f64),
    /// Gaussian noise of level K × std of the subjects' embeddings (ROME's default: s3).
    StdMultiple(f64),
    /// Uniform noise in [-1, 1) × K.
    Uniform(f64),
}

impl FromStr for NoiseSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let number = |t: &str| -> Result<f64, String> {
            let v: f64 =
                t.parse().map_err(|_| format!("--noise {s:?}: expected a number, sK or uK"))?;
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(format!("--noise {s:?}: must be finite and >= 0"))
            }
        };
        match (s.strip_prefix('s'), s.strip_prefix('u')) {
            (Some(k), _) => Ok(NoiseSpec::StdMultiple(number(k)?)),
            (_, Some(k)) => Ok(NoiseSpec::Uniform(number(k)?)),
            _ => Ok(NoiseSpec::Level(number(s)?)),
        }
    }
}

impl NoiseSpec {
    /// Whether the level must first be measured on the dataset's subjects (`sK`).
    pub fn needs_calibration(self) -> bool {
        matches!(self, NoiseSpec::StdMultiple(_))
    }
}

impl fmt::Display for NoiseSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoiseSpec::Level(v) => write!(f, "{v}"),
            NoiseSpec::StdMultiple(k) => write!(f, "s{k}"),
            NoiseSpec::Uniform(k) => write!(f, "u{k}"),
        }
    }
}

/// How the noise generator is seeded for each fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeedMode {
    /// ROME's: `RandomState(1)` for every fact, so every fact of equal subject length sees the
    /// same noise.
    Rome,
    /// A seed derived from the sweep seed and the fact's id.
    PerFact,
}

impl FromStr for SeedMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rome" => Ok(SeedMode::Rome),
            "per-fact" => Ok(SeedMode::PerFact),
            other => Err(format!("unknown seed mode {other:?} (rome, per-fact)")),
        }
    }
}

/// Which facts count as known, and so get traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Correctness {
    /// ROME's rule: the decoded answer token, trimmed, equals the attribute.
    Strict,
    /// The answer id equals the first token of " " + attribute.
    FirstToken,
    /// Trace every fact; `correct` is still reported by the first-token rule.
    None,
}

impl FromStr for Correctness {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(Correctness::Strict),
            "first-token" => Ok(Correctness::FirstToken),
            "none" => Ok(Correctness::None),
            other => Err(format!("unknown correctness {other:?} (strict, first-token, none)")),
        }
    }
}

impl fmt::Display for SeedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeedMode::Rome => "rome",
            SeedMode::PerFact => "per-fact",
        })
    }
}

impl fmt::Display for Correctness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Correctness::Strict => "strict",
            Correctness::FirstToken => "first-token",
            Correctness::None => "none",
        })
    }
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Distribution::Normal => "normal",
            Distribution::Uniform => "uniform",
        })
    }
}

impl FromStr for Distribution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "normal" => Ok(Distribution::Normal),
            "uniform" => Ok(Distribution::Uniform),
            other => Err(format!("unknown distribution {other:?} (normal, uniform)")),
        }
    }
}
