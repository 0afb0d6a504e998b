//! ROME's algorithm as ROME runs it (`calculate_hidden_flow` → `trace_with_patch`): for every
//! restored state, one forward of S + 1 rows over the whole prompt, row 0 clean and rows
//! 1..=S noised, the state copied from row 0 into rows 1..=S inside that same forward, logits
//! at every position. The reference the fast path is tested against, and the baseline it is
//! timed against.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use super::config::{Kind, window_layers};
use super::{FactInput, FactTrace, Outcome, Prepared, TraceConfig, answer_probs, mean};
use crate::error::Result;
use crate::forward::{ForwardRequest, Logits, Start};
use crate::intervene::{EmbedEdit, EmbedOp, Interventions, RowCopy, Site};
use crate::models::Model;
use crate::tokenizer::Tokenizer;

/// The sites restored for state (t, l) of `kind`.
pub(crate) fn restored_sites(
    kind: Kind,
    layer: usize,
    window: usize,
    n_layers: usize,
) -> Vec<Site> {
    match kind {
        Kind::Hidden => vec![Site::Block(layer)],
        Kind::Mlp => window_layers(layer, window, n_layers).map(Site::Mlp).collect(),
        Kind::Attn => window_layers(layer, window, n_layers).map(Site::Attn).collect(),
    }
}

/// Traces a fact ROME's way. With `only`, computes just those (token, layer) cells of every
/// table and leaves the others NaN (the full naive trace of a real model takes minutes).
pub fn trace(
    model: &Model,
    tokenizer: &Tokenizer,
    fact: &FactInput<'_>,
    cfg: &TraceConfig,
    only: Option<&[(usize, usize)]>,
) -> Result<FactTrace> {
    let prep = Prepared::new(model, tokenizer, fact, cfg)?;
    let (t_len, n_layers, rows) = (prep.len(), model.dims().n_layers, cfg.samples + 1);
    let device: &Device = model.device();
    let flat: Vec<u32> = (0..rows).flat_map(|_| prep.ids.iter().copied()).collect();
    let ids = Tensor::from_vec(flat, (rows, t_len), device)?;

    // predict_from_input: softmax of the last position of every row; row 0's argmax.
    let clean = run(model, &ids, Interventions::none())?;
    let probs =
        crate::forward::probabilities(&clean.narrow(0, 0, 1)?.squeeze(0)?)?.to_vec1::<f32>()?;
    let outcome = Outcome::new(tokenizer, fact, cfg, &probs)?;
    let (answer_id, traced) = (outcome.answer_id, outcome.traced);

    let (b, e) = prep.subject;
    let noise = EmbedEdit {
        rows: (1..rows).collect(),
        tokens: b..e,
        op: if cfg.noise.replace { EmbedOp::Replace } else { EmbedOp::Add },
        values: prep.noise.clone(),
    };
    let score = |copies: Vec<RowCopy>| -> Result<f32> {
        let iv = Interventions { embed: vec![noise.clone()], copies, ..Interventions::none() };
        let logits = run(model, &ids, iv)?;
        Ok(mean(&answer_probs(&logits.narrow(0, 1, rows - 1)?, answer_id)?))
    };
    let low_score = score(Vec::new())?;

    let mut scores = BTreeMap::new();
    if traced {
        for &kind in &cfg.kinds {
            let mut table = vec![vec![f32::NAN; n_layers]; t_len];
            for (t, row) in table.iter_mut().enumerate() {
                for (l, cell) in row.iter_mut().enumerate() {
                    if only.is_some_and(|cells| !cells.contains(&(t, l))) || !cfg.wants_layer(l) {
                        continue;
                    }
                    let copies = restored_sites(kind, l, cfg.window, n_layers)
                        .into_iter()
                        .map(|site| RowCopy {
                            site,
                            from_row: 0,
                            rows: (1..rows).collect(),
                            tokens: vec![t],
                        })
                        .collect();
                    *cell = score(copies)?;
                }
            }
            scores.insert(kind, table);
        }
    }
    Ok(prep.finish(outcome, low_score, cfg.noise.level, scores))
}

/// One forward with logits at every position (as ROME's `model(**inp)`); returns the last
/// position's logits `(rows, vocab)`.
fn run(model: &Model, ids: &Tensor, iv: Interventions) -> Result<Tensor> {
    let req = ForwardRequest {
        start: Start::Tokens(ids),
        interventions: &iv,
        logits: Logits::All,
        keep_kv: false,
    };
    let logits = model
        .forward(&req)?
        .logits
        .ok_or_else(|| crate::error::Error::Request("no logits".into()))?;
    let (_, t_len, _) = logits.dims3()?;
    Ok(logits.narrow(1, t_len - 1, 1)?.squeeze(1)?)
}
