//! The metrics of a run at the last position (docs/science.md §5): `prob` = p(a), ROME's
//! score; `logprob` = log p(a) from the log-softmax; `logit_diff` = z(a) − z(f);
//! `kl` = KL(p_clean ‖ p_run). Each is computed per sample, then averaged over the samples.
//!
//! All four come from one pass of f64 exponentials per row of f32 logits:
//! lse = max + ln Σ exp(z − max), log p(v) = z(v) − lse, and KL without materialising
//! log p_run: Σ p_c (log p_c − z + lse) = Σ p_c log p_c − Σ p_c z + lse Σ p_c, the first
//! and last sums fixed per fact. `prob` is exp(z_a − lse) rounded to f32, and the samples are
//! summed in order in f32 ([`super::mean`]) as ROME sums them; an f32 softmax (ROME's, or
//! candle's) agrees with it to the rounding of its f32 sum over the vocabulary (~1e-6
//! relative). Rows are scored in parallel: with a 49k–262k vocabulary and ten rows per
//! restored state, scoring was a tenth of a fast trace when it ran on one thread with an f32
//! softmax and a log-softmax vector per row; each row's sums are vectorised
//! ([`super::row_sums`]).
//! [`Scorer::row_reference`] is the plain definition the tests hold it to.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use common::metric::MetricValues;
use rayon::prelude::*;

use super::mean;
use super::row_sums::row_sums;
use crate::error::{Error, Result};

/// Scores runs of one fact: the answer, the foil and the clean distribution are fixed.
pub(crate) struct Scorer {
    answer: u32,
    foil: u32,
    /// The clean run's log-probabilities (f64).
    clean_logp: Vec<f64>,
    /// Their exponentials: the clean distribution KL weighs by.
    clean_p: Vec<f64>,
    /// Σ p_c log p_c and Σ p_c: KL's terms that do not depend on the run.
    clean_neg_entropy: f64,
    clean_mass: f64,
}

/// One row's metrics before averaging: p(a) in f32, then logprob, logit_diff, kl.
type RowMetrics = (f32, [f64; 3]);

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

/// Calls `f` on the elements of `t` in row-major order: the CPU tensor's own buffer when it
/// is contiguous f32, a host copy otherwise. The logits of a batch are 10–200 MB; copying
/// them took the main thread a tenth of a second per batch (the copy and its fresh pages) while
/// the other cores waited.
fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&data[start..end]));
        }
    }
    let flat = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&flat))
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
        let clean_p: Vec<f64> = clean_logp.iter().map(|l| l.exp()).collect();
        let clean_neg_entropy = clean_p.iter().zip(&clean_logp).map(|(p, l)| p * l).sum();
        let clean_mass = clean_p.iter().sum();
        Ok(Self { answer, foil, clean_logp, clean_p, clean_neg_entropy, clean_mass })
    }

    /// The metrics of consecutive groups of `samples` rows of `logits` `(groups × samples,
    /// vocab)`, each averaged over its group.
    pub(crate) fn score(&self, logits: &Tensor, samples: usize) -> Result<Vec<MetricValues>> {
        let (n_rows, vocab) = logits.dims2()?;
        if samples == 0 || n_rows % samples != 0 {
            return Err(Error::Trace(format!("{n_rows} rows in groups of {samples}")));
        }
        self.check_vocab(vocab)?;
        let per_row: Vec<RowMetrics> =
            with_host_f32(logits, |flat| flat.par_chunks(vocab).map(|z| self.row(z)).collect())?;
        Ok(per_row
            .chunks(samples)
            .map(|group| {
                let p: Vec<f32> = group.iter().map(|r| r.0).collect();
                let avg = |i: usize| group.iter().map(|r| r.1[i]).sum::<f64>() / samples as f64;
                MetricValues {
                    prob: f64::from(mean(&p)),
                    logprob: avg(0),
                    logit_diff: avg(1),
                    kl: avg(2),
                }
            })
            .collect())
    }

    fn check_vocab(&self, vocab: usize) -> Result<()> {
        if vocab != self.clean_logp.len() {
            return Err(Error::Trace(format!(
                "logits of {vocab} tokens against a clean run of {}",
                self.clean_logp.len()
            )));
        }
        Ok(())
    }

    /// The metrics of one row of `vocab` logits (checked by the caller).
    fn row(&self, z: &[f32]) -> RowMetrics {
        let (a, f) = (self.answer as usize, self.foil as usize);
        let sums = row_sums(z, &self.clean_p);
        let (lse, dot) = (sums.max + sums.sum_exp.ln(), sums.dot);
        let kl = self.clean_neg_entropy - dot + lse * self.clean_mass;
        let za = f64::from(z[a]);
        ((za - lse).exp() as f32, [za - lse, za - f64::from(z[f]), kl])
    }

    /// [`Scorer::row`] by the definitions, for tests: candle's softmax for p(a), a
    /// log-softmax vector for the rest.
    #[cfg(test)]
    fn row_reference(&self, z: &[f32]) -> RowMetrics {
        let t = Tensor::new(z, &candle_core::Device::Cpu).and_then(|t| t.unsqueeze(0));
        let p = t.map_err(Error::from).and_then(|t| super::answer_probs(&t, self.answer));
        let prob = p.ok().and_then(|p| p.first().copied()).unwrap_or(f32::NAN);
        let logp = log_softmax(z);
        let kl = self
            .clean_p
            .iter()
            .zip(&self.clean_logp)
            .zip(&logp)
            .map(|((p, lc), lr)| p * (lc - lr))
            .sum();
        let (a, f) = (self.answer as usize, self.foil as usize);
        (prob, [logp[a], f64::from(z[a]) - f64::from(z[f]), kl])
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

    /// The fused parallel row equals the definitions on random logits: p(a) within 1e-5
    /// relative of candle's f32 softmax (whose f32 sum over 5000 terms is off by up to
    /// ~√5000·ε ≈ 1e-5 relative; measured 2.8e-6), the f64 metrics within 1e-10 (KL's
    /// rearranged sums cancel terms of size ~|z| ≤ 40, each exact to ~1e-14).
    #[test]
    fn fused_rows_equal_the_definitions() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let vocab = 5000;
        let mut row = |scale: f32| -> Vec<f32> {
            (0..vocab).map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0)).collect()
        };
        let clean = row(20.0);
        let clean_t = logits(&[&clean]);
        let scorer = Scorer::new(&clean_t, 17, 4000).expect("scorer");
        let mut runs: Vec<Vec<f32>> = vec![clean.clone()];
        runs.extend([0.5, 5.0, 20.0, 40.0].map(&mut row));
        for z in &runs {
            let (p, m) = scorer.row(z);
            let (p_ref, m_ref) = scorer.row_reference(z);
            assert!((p - p_ref).abs() <= 1e-5 * p_ref, "{p} vs {p_ref}");
            for (x, y) in m.iter().zip(m_ref) {
                assert!((x - y).abs() < 1e-10, "{m:?} vs {m_ref:?}");
            }
        }
        // The clean run against itself: KL 0 to rounding.
        assert!(scorer.row(&clean).1[2].abs() < 1e-10);
        // Groups: the mean of the rows' metrics.
        let refs: Vec<&[f32]> = runs.iter().map(Vec::as_slice).collect();
        let scored = scorer.score(&logits(&refs[1..]), 2).expect("score");
        assert_eq!(scored.len(), 2);
        let (a, b) = (scorer.row_reference(&runs[1]).1, scorer.row_reference(&runs[2]).1);
        assert!((scored[0].logprob - (a[0] + b[0]) / 2.0).abs() < 1e-10);
        // A view that is not contiguous (the scorer copies it) and a narrowed one (it reads
        // the buffer in place from an offset) score the same rows the same.
        let all = logits(&refs);
        let strided = all.t().and_then(|t| t.contiguous()).and_then(|t| t.t()).expect("view");
        assert!(!strided.is_contiguous());
        let narrowed = all.narrow(0, 1, 4).expect("narrow");
        for view in [strided.narrow(0, 1, 4).expect("narrow"), narrowed] {
            let again = scorer.score(&view, 2).expect("score");
            assert_eq!(again.len(), 2);
            for (x, y) in again.iter().zip(&scored) {
                assert_eq!((x.prob, x.logprob, x.kl), (y.prob, y.logprob, y.kl));
            }
        }
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
