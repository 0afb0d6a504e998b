//! What identifies a sweep, and how it is cut into jobs.
//!
//! A sweep's settings (dataset digest, model fingerprint, trace settings, sharding) name it:
//! the default sweep id is a digest of them, so running the same command again finds the
//! same sweep and resumes it. Job ids are deterministic for the same reason.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::experiment::Experiment;

/// The id of the job that computes the `sK` noise level.
pub const CALIBRATION_JOB: &str = "calibration";

/// The version of a sweep's tables and manifest. 2: the experiment spec (kinds beyond
/// ROME's three, token selectors), the `head` column of `traces`, and `traced_tokens`,
/// `n_layers`, `n_heads` in `facts`. 3: STR's donor in `facts` (`donor_known_id`,
/// `donor_subject`, `donor_prompt`), `noise_level` null without noise. A coordinator
/// refuses to resume a sweep of another version (its tables would mix two schemas);
/// `coordinator aggregate` reads [`READABLE`].
pub const SCHEMA: u32 = 4;

/// The schemas `coordinator aggregate` reads: 3 and 4 add columns to 2; the aggregate needs
/// 4's metric columns for any metric but `prob`.
pub const READABLE: std::ops::RangeInclusive<u32> = 2..=SCHEMA;

/// What schema [`SCHEMA`] changed, for the message that refuses to resume an older sweep.
pub const SCHEMA_CHANGES: &str =
    "every metric (prob, logprob, logit_diff, kl) of every run, the foil, and --direction";

/// Everything that decides a sweep's numbers. Two runs with equal settings are one sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSettings {
    /// The tables' version, [`SCHEMA`].
    pub schema: u32,
    /// blake3 of the dataset's bytes.
    pub dataset_digest: String,
    /// The model's fingerprint (see [`crate::fingerprint`]).
    pub model_fingerprint: String,
    /// What is computed for each fact.
    pub experiment: Experiment,
    /// Layers per job (`None`: all of a fact's layers in one job).
    pub layers_per_job: Option<u32>,
    /// Only the first N valid facts.
    pub limit: Option<u64>,
    /// Weights and activations on the workers.
    pub dtype: String,
}

impl SweepSettings {
    /// The default sweep id: `sweep-` and 12 hex digits of the settings' digest (the
    /// experiment's digest among them).
    pub fn default_sweep_id(&self) -> String {
        let json = serde_json::to_vec(&(self, self.experiment.digest())).unwrap_or_default();
        let hex = blake3::hash(&json).to_hex();
        format!("sweep-{}", &hex.as_str()[..12])
    }

    /// The settings that differ from `other`'s, as `path: ours vs theirs`.
    pub fn differences(&self, other: &SweepSettings) -> Vec<String> {
        let (Ok(a), Ok(b)) = (serde_json::to_value(self), serde_json::to_value(other)) else {
            return vec!["settings cannot be compared".into()];
        };
        let mut out = Vec::new();
        diff("", &a, &b, &mut out);
        out
    }
}

/// Leaf-by-leaf differences of two JSON values, named by their dotted path.
fn diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match y.get(k) {
                    Some(w) => diff(&p, v, w, out),
                    None => out.push(format!("{p}: {v} vs missing")),
                }
            }
        }
        _ if a != b => out.push(format!("{path}: {a} vs {b}")),
        _ => {}
    }
}

/// The layer ranges of a fact's jobs: `per_job` layers each (the last may be shorter), or one
/// range of all `n_layers`.
pub fn layer_ranges(n_layers: u32, per_job: Option<u32>) -> Vec<Range<u32>> {
    let step = per_job.unwrap_or(n_layers).clamp(1, n_layers.max(1));
    (0..n_layers).step_by(step as usize).map(|lo| lo..(lo + step).min(n_layers)).collect()
}

/// The id of the job tracing `layers` of fact `known_id`.
pub fn trace_job_id(known_id: u64, layers: &Range<u32>) -> String {
    format!("{known_id}:{}-{}", layers.start, layers.end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ranges_cover_every_layer_once() {
        assert_eq!(layer_ranges(12, None), vec![0..12]);
        assert_eq!(layer_ranges(12, Some(5)), vec![0..5, 5..10, 10..12]);
        assert_eq!(layer_ranges(3, Some(10)), vec![0..3]);
        assert_eq!(layer_ranges(4, Some(1)).len(), 4);
        assert_eq!(trace_job_id(7, &(0..5)), "7:0-5");
    }

    #[test]
    fn ids_follow_settings() {
        let a = SweepSettings {
            schema: SCHEMA,
            dataset_digest: "d".into(),
            model_fingerprint: "m".into(),
            experiment: Experiment::rome(),
            layers_per_job: None,
            limit: None,
            dtype: "f32".into(),
        };
        let mut b = a.clone();
        assert_eq!(a.default_sweep_id(), b.default_sweep_id());
        b.experiment.window = 3;
        assert_ne!(a.default_sweep_id(), b.default_sweep_id());
        assert_eq!(a.differences(&b), vec!["experiment.window: 10 vs 3".to_string()]);
    }
}
