//! The corrupting noise: drawn as numpy draws it, seeded per fact, and the spread of the
//! subjects' embeddings that the `sK` level multiplies (ROME's `collect_embedding_std`). The
//! level itself is resolved in one place, `common::experiment::NoiseCorruption::resolve`.

use candle_core::{DType, Device, Tensor};

use common::settings::{Distribution, SeedMode};

use super::rng::RandomState;
use crate::error::{Error, Result};
use crate::forward::{ForwardRequest, Logits, Start};
use crate::intervene::{Interventions, Site};
use crate::models::Model;
use crate::tokenizer::Tokenizer;

/// `n` unit noise values from `RandomState(seed)`: `randn(n)` or `uniform(-1, 1, n)`.
pub fn draw(seed: u32, distribution: Distribution, n: usize) -> Vec<f64> {
    let mut rs = RandomState::new(seed);
    match distribution {
        Distribution::Normal => rs.randn(n),
        Distribution::Uniform => rs.uniform(-1.0, 1.0, n),
    }
}

/// The standard deviation of the token embeddings of `subjects`, each tokenized alone (BOS
/// included where the tokenizer adds one), over all values, unbiased (n − 1). PyTorch's
/// `std()` of the f32 embeddings accumulates in double and returns a float; so does this.
pub fn embedding_std(model: &Model, tokenizer: &Tokenizer, subjects: &[&str]) -> Result<f64> {
    let (mut n, mut sum) = (0usize, 0f64);
    let mut all = Vec::new();
    for subject in subjects {
        let ids = tokenizer.encode(subject)?;
        if ids.is_empty() {
            continue;
        }
        let values = subject_embeddings(model, &ids)?;
        n += values.len();
        sum += values.iter().sum::<f64>();
        all.push(values);
    }
    if n < 2 {
        return Err(Error::Trace(
            "the embedding std needs at least two values (no subjects?)".into(),
        ));
    }
    let mean = sum / n as f64;
    let squares: f64 = all.iter().flatten().map(|v| (v - mean) * (v - mean)).sum();
    Ok(f64::from((squares / (n - 1) as f64).sqrt() as f32))
}

fn subject_embeddings(model: &Model, ids: &[u32]) -> Result<Vec<f64>> {
    let device: &Device = model.device();
    let ids = Tensor::new(ids, device)?.unsqueeze(0)?;
    let mut iv = Interventions::none();
    iv.capture(Site::Embed, (0..ids.dim(1)?).collect());
    // No logits: the pass stops after the embeddings.
    let out = model.forward(&ForwardRequest {
        start: Start::Tokens(&ids),
        interventions: &iv,
        logits: Logits::None,
        keep_kv: false,
    })?;
    Ok(out.captures[0].to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
}

/// The seed of a fact's noise generator (numpy's `RandomState` takes 32 bits).
pub fn fact_seed(mode: SeedMode, sweep_seed: u64, known_id: u64) -> u32 {
    match mode {
        SeedMode::Rome => 1,
        SeedMode::PerFact => {
            // SplitMix64 of the pair: a fixed, well-mixed function, so neighbouring ids and
            // seeds give unrelated streams and a rerun gives the same one.
            let mut z = sweep_seed ^ known_id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 32) as u32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_fact_seeds_differ_and_repeat() {
        let a = fact_seed(SeedMode::PerFact, 7, 1);
        assert_eq!(a, fact_seed(SeedMode::PerFact, 7, 1));
        assert_ne!(a, fact_seed(SeedMode::PerFact, 7, 2));
        assert_ne!(a, fact_seed(SeedMode::PerFact, 8, 1));
        assert_eq!(fact_seed(SeedMode::Rome, 7, 1), 1);
    }

    /// ROME's severed runs draw twice from one `RandomState(1)`: the second draw continues
    /// the stream, so one draw of twice the length split in halves is the same two draws.
    #[test]
    fn two_draws_are_one_stream() {
        let whole = draw(1, Distribution::Normal, 10);
        let mut rs = RandomState::new(1);
        let (a, b) = (rs.randn(5), rs.randn(5));
        assert_eq!(&whole[..5], a.as_slice());
        assert_eq!(&whole[5..], b.as_slice());
    }
}
