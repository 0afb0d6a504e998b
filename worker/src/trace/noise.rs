//! The corrupting noise: drawn as numpy draws it, scaled as ROME scales it, and the `sK`
//! level from the spread of the subjects' embeddings (ROME's `collect_embedding_std`).

use candle_core::{DType, Device, Tensor};

use super::config::{Distribution, Noise, NoiseSpec};
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

/// Resolves a `--noise` spec to a level; `sK` needs the embedding std of the subjects.
pub fn resolve(spec: NoiseSpec, replace: bool, std: Option<f64>) -> Result<Noise> {
    Ok(match spec {
        NoiseSpec::Level(level) => Noise { level, distribution: Distribution::Normal, replace },
        NoiseSpec::Uniform(k) => Noise { level: k, distribution: Distribution::Uniform, replace },
        // ROME: noise_level = 3 * collect_embedding_std(...), a Python float product.
        NoiseSpec::StdMultiple(k) => {
            let std = std.ok_or_else(|| {
                Error::Trace(format!("noise s{k} needs the embedding std of the subjects"))
            })?;
            Noise { level: k * std, distribution: Distribution::Normal, replace }
        }
    })
}
