//! What the averages measure: the metric (`--metric`) on a scale (`--scale`, `--recovery`,
//! `--recovery-floor`), and the words the plots, the printed text and the tables use for it.

use anyhow::bail;
use clap::ValueEnum;
use common::metric::Metric;
use common::rollup::{Better, Rescale};

use super::AggregateArgs;

/// The scale of the averaged values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scale {
    /// The metric's own values: AIE = mean − mean corrupted, ATE = mean clean − mean
    /// corrupted.
    Raw,
    /// The share of the way from the corrupted run (0) to the clean one (1).
    Recovery,
}

/// How recovery is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Recovery {
    /// The raw averages divided by the raw ATE over the same facts: AIE / ATE.
    RatioOfMeans,
    /// Each fact's values mapped to its own 0–1 first, then averaged.
    PerFact,
}

/// The default of `--recovery-floor`.
pub const DEFAULT_FLOOR: f64 = 0.01;

/// A metric on a scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measure {
    /// `--metric`.
    pub metric: Metric,
    /// `--scale`.
    pub scale: Scale,
    /// `--recovery` (read only with `--scale recovery`).
    pub recovery: Recovery,
    /// `--recovery-floor` (read only with `--recovery per-fact`).
    pub floor: f64,
}

impl Measure {
    /// The measure the flags ask for; a recovery flag without the scale it belongs to is
    /// refused rather than silently ignored.
    pub fn from_args(args: &AggregateArgs) -> anyhow::Result<Self> {
        let recovery = args.recovery.unwrap_or(Recovery::RatioOfMeans);
        if args.scale == Scale::Raw && args.recovery.is_some() {
            bail!("--recovery applies to --scale recovery (this is --scale raw)");
        }
        if let Some(floor) = args.recovery_floor {
            if recovery != Recovery::PerFact || args.scale != Scale::Recovery {
                bail!("--recovery-floor applies to --scale recovery --recovery per-fact");
            }
            if !(floor.is_finite() && floor > 0.0) {
                bail!("--recovery-floor {floor}: must be a positive number");
            }
        }
        Ok(Measure {
            metric: args.metric,
            scale: args.scale,
            recovery,
            floor: args.recovery_floor.unwrap_or(DEFAULT_FLOOR),
        })
    }

    /// The scale as the tables' `scale` column and the folder name write it.
    pub fn tag(&self) -> &'static str {
        match (self.scale, self.recovery) {
            (Scale::Raw, _) => "raw",
            (Scale::Recovery, Recovery::RatioOfMeans) => "recovery-ratio-of-means",
            (Scale::Recovery, Recovery::PerFact) => "recovery-per-fact",
        }
    }

    /// The default output folder's name inside `summary/`: none for p(o) raw (the folder
    /// itself, as before metrics), else `<metric>-<tag>`.
    pub fn folder(&self) -> Option<String> {
        (!self.is_prob_raw()).then(|| format!("{}-{}", self.metric, self.tag()))
    }

    /// The floor, when each fact's values are mapped to recovery as they are read.
    pub fn per_fact(&self) -> Option<f64> {
        (self.scale == Scale::Recovery && self.recovery == Recovery::PerFact).then_some(self.floor)
    }

    /// ROME's measure: p(o), raw.
    pub fn is_prob_raw(&self) -> bool {
        (self.metric, self.scale) == (Metric::Prob, Scale::Raw)
    }

    /// Recovery as a ratio of means: averages divided by their ATE.
    pub fn is_ratio(&self) -> bool {
        self.scale == Scale::Recovery && self.recovery == Recovery::RatioOfMeans
    }

    /// The map of an average over facts whose mean clean value is `high` and mean
    /// corrupted value `low`: recovery as a ratio of means, else the identity (raw values,
    /// or per-fact recovery, applied already).
    pub fn averaged(&self, high: f64, low: f64) -> Option<Rescale> {
        self.is_ratio().then(|| Rescale::ratio_of_means(high, low))
    }

    /// Which way the averaged values move toward the clean run: down only for raw KL.
    pub fn better(&self) -> Better {
        if self.scale == Scale::Raw && self.metric == Metric::Kl {
            Better::Lower
        } else {
            Better::Higher
        }
    }

    /// The metric in words.
    pub fn quantity(&self) -> &'static str {
        match self.metric {
            Metric::Prob => "p(o)",
            Metric::Logprob => "log p(o)",
            Metric::LogitDiff => "logit difference",
            Metric::Kl => "KL",
        }
    }

    /// What one averaged cell is: `AIE` or `recovery`.
    pub fn effect(&self) -> &'static str {
        match self.scale {
            Scale::Raw => "AIE",
            Scale::Recovery => "recovery",
        }
    }

    /// The y axis of the line plot and of Figure 3.
    pub fn axis(&self) -> String {
        let q = self.quantity();
        match (self.scale, self.recovery) {
            (Scale::Raw, _) => format!("Average indirect effect on {q}"),
            (Scale::Recovery, Recovery::RatioOfMeans) => format!("Recovery of {q} (AIE / ATE)"),
            (Scale::Recovery, Recovery::PerFact) => format!("Average per-fact recovery of {q}"),
        }
    }

    /// A heatmap's title, `what` the state restored (ROME's words for p(o) raw).
    pub fn map_title(&self, what: &str) -> String {
        match (self.scale, self.metric) {
            (Scale::Raw, Metric::Prob) => format!("Avg Indirect Effect of {what}"),
            (Scale::Raw, _) => format!("Avg Indirect Effect of {what} on {}", self.quantity()),
            (Scale::Recovery, _) => format!("Avg recovery of {} by {what}", self.quantity()),
        }
    }

    /// A heatmap's colour-bar label: the effect, negated for raw KL, whose maps show how
    /// far restoring a state lowers it (clipped at 0, as ROME clips the AIE).
    pub fn map_label(&self) -> &'static str {
        match (self.scale, self.better()) {
            (Scale::Recovery, _) => "recovery",
            (Scale::Raw, Better::Higher) => "AIE",
            (Scale::Raw, Better::Lower) => "−AIE",
        }
    }

    /// Whether the values are fractions (p(o), recovery), shown in percent as ROME does;
    /// the other raw metrics' effects run over several units.
    pub fn fractions(&self) -> bool {
        self.scale == Scale::Recovery || self.metric == Metric::Prob
    }

    /// The factor the printed tables multiply values by: 100 for fractions, else 10.
    pub fn times(&self) -> f64 {
        if self.fractions() { 100.0 } else { 10.0 }
    }

    /// One line saying what the numbers are.
    pub fn describe(&self) -> String {
        let (q, m) = (self.quantity(), self.metric);
        match (self.scale, self.recovery) {
            (Scale::Raw, _) => {
                format!(
                    "metric {m} ({q}), raw: AIE = mean − mean corrupted, ATE = mean clean − mean corrupted"
                )
            }
            (Scale::Recovery, Recovery::RatioOfMeans) => format!(
                "metric {m} ({q}), recovery as a ratio of means: AIE / ATE (1 as clean, 0 as corrupted)"
            ),
            (Scale::Recovery, Recovery::PerFact) => format!(
                "metric {m} ({q}), recovery per fact: (m − corrupted) / (clean − corrupted), \
                 |clean − corrupted| ≥ {}, averaged (1 as clean, 0 as corrupted)",
                self.floor
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_folders_and_directions() {
        let m = |metric, scale, recovery| Measure { metric, scale, recovery, floor: 0.01 };
        let prob = m(Metric::Prob, Scale::Raw, Recovery::RatioOfMeans);
        assert_eq!((prob.folder(), prob.tag()), (None, "raw"));
        assert_eq!(prob.axis(), "Average indirect effect on p(o)");
        let kl = m(Metric::Kl, Scale::Raw, Recovery::PerFact);
        assert_eq!(kl.folder().as_deref(), Some("kl-raw"));
        assert_eq!(kl.better(), Better::Lower);
        let kl = m(Metric::Kl, Scale::Recovery, Recovery::PerFact);
        assert_eq!(kl.folder().as_deref(), Some("kl-recovery-per-fact"));
        assert_eq!((kl.better(), kl.per_fact()), (Better::Higher, Some(0.01)));
        assert!(kl.averaged(0.0, 2.0).is_none());
        let ld = m(Metric::LogitDiff, Scale::Recovery, Recovery::RatioOfMeans);
        assert_eq!(ld.folder().as_deref(), Some("logit_diff-recovery-ratio-of-means"));
        assert_eq!(ld.averaged(3.0, 1.0), Some(Rescale { shift: 1.0, scale: 2.0 }));
        let p = m(Metric::Prob, Scale::Recovery, Recovery::RatioOfMeans);
        assert_eq!(p.folder().as_deref(), Some("prob-recovery-ratio-of-means"));
    }
}
