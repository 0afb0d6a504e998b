//! What a run measures at the last position (docs/science.md §5): the metrics, and one run's
//! values of all of them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a run measures at the last position (docs/science.md §5). Every metric is computed
/// for every run, per sample, then averaged over the samples.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// p(answer), ROME's score (softmax in f32, as ROME's).
    Prob,
    /// log p(answer), from the log-softmax (f64).
    Logprob,
    /// z(answer) − z(foil), the logits' difference.
    #[value(name = "logit_diff")]
    LogitDiff,
    /// KL(p_clean ‖ p_run), natural log (f64).
    Kl,
}

impl Metric {
    /// Every metric, in the tables' column order.
    pub const ALL: [Metric; 4] = [Metric::Prob, Metric::Logprob, Metric::LogitDiff, Metric::Kl];

    /// The name of its column and flag value.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Prob => "prob",
            Metric::Logprob => "logprob",
            Metric::LogitDiff => "logit_diff",
            Metric::Kl => "kl",
        }
    }

    /// The values it can take: `[lo, hi]` (a result outside is refused). KL is ≥ 0 in
    /// exact arithmetic; a run equal to the clean one can round to a tiny negative value.
    pub fn range(self) -> (f64, f64) {
        match self {
            Metric::Prob => (0.0, 1.0),
            Metric::Logprob => (f64::NEG_INFINITY, 0.0),
            Metric::LogitDiff => (f64::NEG_INFINITY, f64::INFINITY),
            Metric::Kl => (-1e-4, f64::INFINITY),
        }
    }

    /// Whether `v` is a value of this metric (finite, in its range).
    pub fn admits(self, v: f64) -> bool {
        let (lo, hi) = self.range();
        v.is_finite() && v >= lo && v <= hi
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One run's value of every metric, averaged over its samples.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct MetricValues {
    /// p(answer).
    pub prob: f64,
    /// log p(answer).
    pub logprob: f64,
    /// z(answer) − z(foil).
    pub logit_diff: f64,
    /// KL(p_clean ‖ p_run).
    pub kl: f64,
}

impl MetricValues {
    /// The value of `metric`.
    pub fn get(&self, metric: Metric) -> f64 {
        match metric {
            Metric::Prob => self.prob,
            Metric::Logprob => self.logprob,
            Metric::LogitDiff => self.logit_diff,
            Metric::Kl => self.kl,
        }
    }

    /// The first metric whose value is outside its range, with that value.
    pub fn invalid(&self) -> Option<(Metric, f64)> {
        Metric::ALL.into_iter().map(|m| (m, self.get(m))).find(|&(m, v)| !m.admits(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ranges_and_lookup_agree() {
        let names: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(names, ["prob", "logprob", "logit_diff", "kl"]);
        for m in Metric::ALL {
            let parsed = <Metric as clap::ValueEnum>::from_str(m.name(), false).expect("parses");
            assert_eq!(parsed, m);
            assert_eq!(serde_json::to_value(m).expect("json"), m.name());
        }
        let v = MetricValues { prob: 0.5, logprob: 0.5f64.ln(), logit_diff: -3.0, kl: 0.0 };
        assert_eq!(v.invalid(), None);
        assert_eq!(MetricValues { prob: 1.5, ..v }.invalid(), Some((Metric::Prob, 1.5)));
        assert_eq!(MetricValues { logprob: 0.1, ..v }.invalid(), Some((Metric::Logprob, 0.1)));
        assert!(MetricValues { logit_diff: f64::NAN, ..v }.invalid().is_some());
        assert_eq!(MetricValues { kl: -0.5, ..v }.invalid(), Some((Metric::Kl, -0.5)));
        assert_eq!(MetricValues { kl: -1e-7, ..v }.invalid(), None);
    }
}
