//! The metrics of a run at the last position (docs/science.md §5): `prob` = p(a), ROME's
//! score; `logprob` = log p(a) from the log-softmax; `logit_diff` = z(a) − z(f);
//! `kl` = KL(p_clean ‖ p_run). Each is computed per sample, then averaged over the samples.
//!
//! `prob` keeps ROME's arithmetic exactly (softmax in f32, the samples summed in order in
//! f32: [`super::answer_probs`], [`super::mean`]), so the tables of `prob` are the numbers
//! they were before the other metrics existed. The others are computed in f64 from the f32
//! logits, one row at a time: log p(v) = z(v) − max − ln Σ exp(z − max).

use candle_core::{DType, Tensor};
use common::metric::MetricValues;

use super::{answer_probs, mean};
use crate::error::{Error, Result};

/// Scores runs of one fact: the answer, the foil and the clean distribution are fixed.
pub(crate) struct Scorer {
    answer: u32,
    foil: u32,
    /// The clean run's log-probabilities (f64).
    clean_logp: Vec<f64>,
    /// Their exponentials: the clean distribution KL weighs by.
    clean_p: Vec<f64>,
}

/// log-softmax of one row of logits, in f64.
fn log_softmax(z: &[f32]) -> Vec<f64> {
    let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let lse = z.iter().map(|&v| (f64::from(v) - max).exp()).sum::<f64>().ln();
    z.iter().map(|&v| f64::from(v) - max - lse).collect()
}

/// The rows of `logits` `(rows, vocab)` on the host, in f32.
fn host_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

fn index(row: &[f32], id: u32, what: &str) -> Result<f64> {
    row.get(id as usize).map(|&v| f64::from(v)).ok_or_else(|| {
        Error::Trace(format!("{what} id {id} is outside the vocabulary of {}", row.len()))
    })
}

impl Scorer {
    /// From the clean run's logits `(1, vocab)`.
    pub(crate) fn new(clean_logits: &Tensor, answer: u32, foil: u32) -> Result<Self> {
        let rows = host_rows(clean_logits)?;
        let row = rows.first().ok_or_else(|| Error::Trace("no clean logits".into()))?;
        index(row, answer, "answer")?;
        index(row, foil, "foil")?;
        let clean_logp = log_softmax(row);
        let clean_p = clean_logp.iter().map(|l| l.exp()).collect();
        Ok(Self { answer, foil, clean_logp, clean_p })
    }

    /// The metrics of consecutive groups of `samples` rows of `logits` `(groups × samples,
    /// vocab)`, each averaged over its group.
    pub(crate) fn score(&self, logits: &Tensor, samples: usize) -> Result<Vec<MetricValues>> {
        let probs = answer_probs(logits, self.answer)?;
        let rows = host_rows(logits)?;
        if samples == 0 || rows.len() % samples != 0 || rows.len() != probs.len() {
            return Err(Error::Trace(format!("{} rows in groups of {samples}", rows.len())));
        }
        let per_row: Vec<[f64; 3]> =
            rows.iter().map(|z| self.row(z)).collect::<Result<Vec<_>>>()?;
        Ok(probs
            .chunks(samples)
            .zip(per_row.chunks(samples))
            .map(|(p, others)| {
                let avg = |i: usize| others.iter().map(|o| o[i]).sum::<f64>() / samples as f64;
                MetricValues {
                    prob: f64::from(mean(p)),
                    logprob: avg(0),
                    logit_diff: avg(1),
                    kl: avg(2),
                }
            })
            .collect())
    }

    /// logprob, logit_diff and KL of one row.
    fn row(&self, z: &[f32]) -> Result<[f64; 3]> {
        if z.len() != self.clean_logp.len() {
            return Err(Error::Trace(format!(
                "logits of {} tokens against a clean run of {}",
                z.len(),
                self.clean_logp.len()
            )));
        }
        let logp = log_softmax(z);
        let kl = self
            .clean_p
            .iter()
            .zip(&self.clean_logp)
            .zip(&logp)
            .map(|((p, lc), lr)| p * (lc - lr))
            .sum();
        let (a, f) = (self.answer as usize, self.foil as usize);
        Ok([logp[a], f64::from(z[a]) - f64::from(z[f]), kl])
    }
}

/// Gaussian noise's foil: the token, other than `answer`, with the highest mean probability
/// over the corrupted run's rows `(S, vocab)` (probabilities in f64; the lowest id on a tie).
pub(crate) fn top_other(logits: &Tensor, answer: u32) -> Result<u32> {
    let rows = host_rows(logits)?;
    let vocab = rows.first().map_or(0, Vec::len);
    let mut mean_p = vec![0f64; vocab];
    for z in &rows {
        for (m, l) in mean_p.iter_mut().zip(log_softmax(z)) {
            *m += l.exp();
        }
    }
    let best = mean_p.iter().enumerate().filter(|&(v, _)| v != answer as usize).fold(
        None,
        |best: Option<(usize, f64)>, (v, &p)| match best {
            Some((_, bp)) if bp >= p => best,
            _ => Some((v, p)),
        },
    );
    best.map(|(v, _)| v as u32)
        .ok_or_else(|| Error::Trace("the vocabulary has no token besides the answer".into()))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn logits(rows: &[&[f32]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).expect("tensor")
    }

    #[test]
    fn metrics_match_their_definitions_by_hand() {
        // Clean: z = (2, 0, 0): p = (e², 1, 1) / (e² + 2).
        let clean = logits(&[&[2.0, 0.0, 0.0]]);
        let scorer = Scorer::new(&clean, 0, 1).expect("scorer");
        let c = scorer.score(&clean, 1).expect("score")[0];
        let s = 2f64.exp() + 2.0;
        assert!((c.prob - 2f64.exp() / s).abs() < 1e-6, "{c:?}");
        assert!((c.logprob - (2.0 - s.ln())).abs() < 1e-12);
        assert_eq!(c.logit_diff, 2.0);
        assert!(c.kl.abs() < 1e-15);
        // Two samples: uniform, and z = (0, 1, 0); the metrics are their means.
        let run = logits(&[&[0.0, 0.0, 0.0], &[0.0, 1.0, 0.0]]);
        let m = scorer.score(&run, 2).expect("score")[0];
        let pc = [2f64.exp() / s, 1.0 / s, 1.0 / s];
        let kl = |logp: [f64; 3]| -> f64 { (0..3).map(|v| pc[v] * (pc[v].ln() - logp[v])).sum() };
        let third = (1f64 / 3.0).ln();
        let s2 = 2.0 + 1f64.exp();
        let second = [-s2.ln(), 1.0 - s2.ln(), -s2.ln()];
        assert!((m.logprob - (third + second[0]) / 2.0).abs() < 1e-12);
        assert!((m.logit_diff - (0.0 + -1.0) / 2.0).abs() < 1e-12);
        assert!((m.kl - (kl([third; 3]) + kl(second)) / 2.0).abs() < 1e-12);
        assert!((m.prob - (1.0 / 3.0 + 1.0 / s2) / 2.0).abs() < 1e-6);
        // Per group: two groups of one sample each.
        let each = scorer.score(&run, 1).expect("score");
        assert_eq!(each.len(), 2);
        assert!((each[1].logit_diff + 1.0).abs() < 1e-12);
        assert!(scorer.score(&run, 3).is_err());
        assert!(Scorer::new(&clean, 7, 1).is_err());
    }

    #[test]
    fn the_noise_foil_is_the_best_other_token_on_average() {
        // Token 2 wins one row, token 1 wins on average; the answer 0 is never the foil.
        let run = logits(&[&[9.0, 3.0, 3.5], &[9.0, 4.0, 0.0]]);
        assert_eq!(top_other(&run, 0).expect("foil"), 1);
        assert_eq!(top_other(&logits(&[&[0.0, 0.0, 0.0]]), 0).expect("tie"), 1);
        assert!(top_other(&logits(&[&[0.0]]), 0).is_err());
    }
}
