//! Next-token prediction: the clean run of causal tracing, and `worker predict`.

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{Result, bail_request};
use crate::forward::{ForwardRequest, Logits, Start, probabilities};
use crate::intervene::Interventions;
use crate::load::LoadedModel;
use crate::models::Model;

/// One candidate next token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopToken {
    /// Its id.
    pub id: u32,
    /// Its text, decoded alone.
    pub token: String,
    /// Its probability.
    pub prob: f32,
}

/// What `worker predict` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The prompt's tokens, each decoded alone.
    pub tokens: Vec<String>,
    /// The most likely next tokens, most likely first.
    pub top: Vec<TopToken>,
}

/// The next-token distribution of one row of token ids, in f32.
pub fn next_token_probs(model: &Model, ids: &[u32]) -> Result<Vec<f32>> {
    if ids.is_empty() {
        bail_request!("cannot predict after an empty prompt");
    }
    let device = model.device().clone();
    let ids = Tensor::new(ids, &device)?.unsqueeze(0)?;
    let none = Interventions::none();
    let out = model.forward(&ForwardRequest {
        start: Start::Tokens(&ids),
        interventions: &none,
        logits: Logits::Last,
        keep_kv: false,
    })?;
    let logits = out.logits.ok_or_else(|| crate::error::Error::Request("no logits".into()))?;
    Ok(probabilities(&logits)?.squeeze(0)?.to_vec1::<f32>()?)
}

/// The `k` most likely entries of `probs`, most likely first (ties: lower id first).
pub fn top_k(probs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut order: Vec<u32> = (0..probs.len() as u32).collect();
    let k = k.min(order.len());
    let by_prob =
        |a: &u32, b: &u32| probs[*b as usize].total_cmp(&probs[*a as usize]).then(a.cmp(b));
    if k < order.len() && k > 0 {
        order.select_nth_unstable_by(k - 1, by_prob);
    }
    order.truncate(k);
    order.sort_by(by_prob);
    order.into_iter().map(|id| (id, probs[id as usize])).collect()
}

/// Tokenizes `prompt` and returns its top-`k` next tokens.
pub fn predict(loaded: &LoadedModel, prompt: &str, k: usize) -> Result<Prediction> {
    let tokenizer = loaded.tokenizer()?;
    let ids = tokenizer.encode(prompt)?;
    let probs = next_token_probs(&loaded.model, &ids)?;
    let top = top_k(&probs, k)
        .into_iter()
        .map(|(id, prob)| Ok(TopToken { id, token: tokenizer.decode(&[id])?, prob }))
        .collect::<Result<_>>()?;
    Ok(Prediction { tokens: tokenizer.token_strings(&ids)?, top })
}

/// The argmax next token and its probability for many prompts. Prompts of equal length run
/// together, `batch` rows at a time: rows of a batch must have equal length, and batching is
/// what makes a dataset-wide pass fast.
pub fn argmax_many(model: &Model, prompts: &[Vec<u32>], batch: usize) -> Result<Vec<(u32, f32)>> {
    let device = model.device().clone();
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, p) in prompts.iter().enumerate() {
        by_len.entry(p.len()).or_default().push(i);
    }
    let mut out = vec![(0u32, 0f32); prompts.len()];
    let none = Interventions::none();
    for (len, indices) in by_len {
        if len == 0 {
            bail_request!("cannot predict after an empty prompt");
        }
        for chunk in indices.chunks(batch.max(1)) {
            let flat: Vec<u32> = chunk.iter().flat_map(|&i| prompts[i].iter().copied()).collect();
            let ids = Tensor::from_vec(flat, (chunk.len(), len), &device)?;
            let req = ForwardRequest {
                start: Start::Tokens(&ids),
                interventions: &none,
                logits: Logits::Last,
                keep_kv: false,
            };
            let logits = model
                .forward(&req)?
                .logits
                .ok_or_else(|| crate::error::Error::Request("no logits".into()))?;
            let probs = probabilities(&logits)?.to_vec2::<f32>()?;
            for (&i, row) in chunk.iter().zip(&probs) {
                out[i] = top_k(row, 1).first().copied().unwrap_or((0, 0.0));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_probability_then_id() {
        let probs = [0.1, 0.4, 0.05, 0.4, 0.05];
        assert_eq!(top_k(&probs, 3), vec![(1, 0.4), (3, 0.4), (0, 0.1)]);
        assert_eq!(top_k(&probs, 10).len(), 5);
        assert!(top_k(&probs, 0).is_empty());
    }
}
