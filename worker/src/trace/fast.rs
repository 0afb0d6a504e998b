//! The fast path: the same numbers as [`super::naive`], with a fraction of its work.
//!
//! - The clean run is computed once per fact (one row), the corrupted run once (S rows),
//!   keeping its keys/values and its residual stream.
//! - Restoring state (t, l) changes nothing before token t nor below the first restored
//!   layer, so each restored run resumes from the corrupted run: keys/values of tokens < t,
//!   residual stream entering the first restored layer for tokens ≥ t. Only that suffix is
//!   computed, and the LM head only at the last position.
//! - States before the subject, and hidden states of the last layer at tokens other than
//!   the last, provably change nothing: their score is `low_score`, exactly.
//! - All restored states of one token run in one batched forward of states × samples rows.
//!   A state joins the batch at its first restored layer, so the batch grows layer by layer
//!   and no row computes a layer it would not change. `max_batch_tokens` bounds its size.

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::{Device, Tensor};

use super::config::{Kind, window_layers};
use super::{FactInput, FactTrace, Outcome, Prepared, TraceConfig, answer_probs, mean};
use crate::error::{Error, Result};
use crate::forward::{ForwardRequest, KvCache, LayerKv, Logits, Start};
use crate::intervene::{EmbedEdit, EmbedOp, Interventions, Patch, Site};
use crate::models::Model;
use crate::tokenizer::Tokenizer;

/// The states of a fact's clean and corrupted runs that restored runs start from.
struct Runs {
    /// Per kind, per layer: the clean state at tokens `b..T`, `(1, T - b, d)`.
    clean: BTreeMap<Kind, Vec<Tensor>>,
    /// The corrupted residual stream entering layer 0 at tokens `b..T`, `(S, T - b, d)`.
    input: Tensor,
    /// The corrupted residual stream after each layer at tokens `b..T`, `(S, T - b, d)`.
    blocks: Vec<Tensor>,
    /// The corrupted run's keys and values, all tokens, S rows.
    kv: KvCache,
}

/// One restored state in a batched suffix run.
struct Entry {
    /// Its cell in the table: the layer l of state (t, l).
    layer: usize,
    /// The first layer whose computation it changes.
    join: usize,
    /// The residual stream entering `join` at tokens `t..T`, `(S, T - t, d)`.
    hidden: Tensor,
    /// Layers whose sublayer output at token t is restored (mlp/attn), empty for hidden.
    window: Range<usize>,
}

/// Traces a fact the fast way.
pub fn trace(
    model: &Model,
    tokenizer: &Tokenizer,
    fact: &FactInput<'_>,
    cfg: &TraceConfig,
) -> Result<FactTrace> {
    let prep = Prepared::new(model, tokenizer, fact, cfg)?;
    let (t_len, n_layers, samples) = (prep.len(), model.dims().n_layers, cfg.samples);
    let (b, e) = prep.subject;
    let device: &Device = model.device();
    let suffix: Vec<usize> = (b..t_len).collect();

    // Clean run: one row, capturing every state a restored run may need.
    let ids = Tensor::new(prep.ids.as_slice(), device)?.unsqueeze(0)?;
    let mut clean_iv = Interventions::none();
    let mut clean_slots: BTreeMap<Kind, Vec<usize>> = BTreeMap::new();
    for &kind in &cfg.kinds {
        let site = |l| match kind {
            Kind::Hidden => Site::Block(l),
            Kind::Mlp => Site::Mlp(l),
            Kind::Attn => Site::Attn(l),
        };
        clean_slots.insert(
            kind,
            (0..n_layers).map(|l| clean_iv.capture(site(l), suffix.clone())).collect(),
        );
    }
    let clean = forward(model, Start::Tokens(&ids), &clean_iv, false)?;
    let clean_logits = clean.logits.as_ref().ok_or_else(|| Error::Request("no logits".into()))?;
    let probs = crate::forward::probabilities(&clean_logits.squeeze(0)?)?.to_vec1::<f32>()?;
    let outcome = Outcome::new(tokenizer, fact, cfg, &probs)?;
    let (answer_id, traced) = (outcome.answer_id, outcome.traced);

    // Corrupted run: S rows, keeping keys/values and the residual stream after every layer.
    let ids_s = ids.broadcast_as((samples, t_len))?.contiguous()?;
    let mut corrupt_iv = Interventions::none();
    corrupt_iv.embed.push(EmbedEdit {
        rows: (0..samples).collect(),
        tokens: b..e,
        op: if cfg.noise.replace { EmbedOp::Replace } else { EmbedOp::Add },
        values: prep.noise.clone(),
    });
    let input_slot = corrupt_iv.capture(Site::Input, suffix.clone());
    let block_slots: Vec<usize> =
        (0..n_layers).map(|l| corrupt_iv.capture(Site::Block(l), suffix.clone())).collect();
    let corrupted = forward(model, Start::Tokens(&ids_s), &corrupt_iv, traced)?;
    let low_logits = corrupted.logits.as_ref().ok_or_else(|| Error::Request("no logits".into()))?;
    let low_score = mean(&answer_probs(low_logits, answer_id)?);

    let mut scores = BTreeMap::new();
    if traced {
        let runs = Runs {
            clean: clean_slots
                .into_iter()
                .map(|(kind, slots)| {
                    (kind, slots.iter().map(|&i| clean.captures[i].clone()).collect())
                })
                .collect(),
            input: corrupted.captures[input_slot].clone(),
            blocks: block_slots.iter().map(|&i| corrupted.captures[i].clone()).collect(),
            kv: corrupted.kv.ok_or_else(|| Error::Request("no keys and values".into()))?,
        };
        for &kind in &cfg.kinds {
            // Cells outside the asked layers are NaN; the others default to low_score, which
            // is exact for the states that change nothing (see the module comment).
            let mut table: Vec<Vec<f32>> = (0..t_len)
                .map(|_| {
                    (0..n_layers)
                        .map(|l| if cfg.wants_layer(l) { low_score } else { f32::NAN })
                        .collect()
                })
                .collect();
            for (t, row) in table.iter_mut().enumerate().skip(b) {
                let mut entries = entries(kind, t, b, t_len, n_layers, cfg.window, &runs)?;
                entries.retain(|entry| cfg.wants_layer(entry.layer));
                let per_chunk = (cfg.max_batch_tokens / (samples * (t_len - t))).max(1);
                for chunk in entries.chunks(per_chunk) {
                    let chunk_scores =
                        run_batch(model, kind, t, b, chunk, &runs, samples, answer_id)?;
                    for (entry, score) in chunk.iter().zip(chunk_scores) {
                        row[entry.layer] = score;
                    }
                }
            }
            scores.insert(kind, table);
        }
    }
    Ok(prep.finish(outcome, low_score, cfg.noise.level, scores))
}

fn forward(
    model: &Model,
    start: Start<'_>,
    iv: &Interventions,
    keep_kv: bool,
) -> Result<crate::forward::ForwardOutput> {
    model.forward(&ForwardRequest { start, interventions: iv, logits: Logits::Last, keep_kv })
}

/// The restored states of token `t` that need computing, sorted by the layer they join at.
fn entries(
    kind: Kind,
    t: usize,
    b: usize,
    t_len: usize,
    n_layers: usize,
    window: usize,
    runs: &Runs,
) -> Result<Vec<Entry>> {
    let from = t - b;
    let mut out = Vec::with_capacity(n_layers);
    for layer in 0..n_layers {
        let entry = match kind {
            Kind::Hidden => {
                // The last layer's output at an earlier token feeds nothing the last position
                // reads: restoring it is a no-op, and its score is low_score exactly.
                if layer + 1 == n_layers && t + 1 < t_len {
                    continue;
                }
                let clean = runs.clean[&kind][layer].narrow(1, from, 1)?;
                let corrupted = &runs.blocks[layer];
                let (samples, _, d) = corrupted.dims3()?;
                let first = clean.broadcast_as((samples, 1, d))?;
                let hidden = if t + 1 < t_len {
                    Tensor::cat(&[&first, &corrupted.narrow(1, from + 1, t_len - t - 1)?], 1)?
                } else {
                    first.contiguous()?
                };
                Entry { layer, join: layer + 1, hidden, window: 0..0 }
            }
            Kind::Mlp | Kind::Attn => {
                let window = window_layers(layer, window, n_layers);
                let entering =
                    if window.start == 0 { &runs.input } else { &runs.blocks[window.start - 1] };
                let hidden = entering.narrow(1, from, t_len - t)?;
                Entry { layer, join: window.start, hidden, window }
            }
        };
        out.push(entry);
    }
    out.sort_by_key(|e| e.join);
    Ok(out)
}

/// Runs the entries of one token together and returns each one's score.
#[allow(clippy::too_many_arguments)]
fn run_batch(
    model: &Model,
    kind: Kind,
    t: usize,
    b: usize,
    entries: &[Entry],
    runs: &Runs,
    samples: usize,
    answer_id: u32,
) -> Result<Vec<f32>> {
    let n_layers = model.dims().n_layers;
    let first = entries.first().map_or(n_layers, |e| e.join);
    let mut xs: Option<Tensor> = None;
    let mut joined = 0;
    for layer in first..n_layers {
        joined += join(&mut xs, entries, joined, layer)?;
        let Some(current) = xs.take() else { continue };
        let past = if t > 0 {
            Some(repeat_rows(runs.kv.layer(layer, runs.kv_len())?, t, joined)?)
        } else {
            None
        };
        let mut iv = Interventions::none();
        if kind != Kind::Hidden {
            let rows: Vec<usize> = entries[..joined]
                .iter()
                .enumerate()
                .filter(|(_, e)| e.window.contains(&layer))
                .flat_map(|(i, _)| i * samples..(i + 1) * samples)
                .collect();
            if !rows.is_empty() {
                let site = if kind == Kind::Mlp { Site::Mlp(layer) } else { Site::Attn(layer) };
                let values = runs.clean[&kind][layer].narrow(1, t - b, 1)?;
                iv.patches.push(Patch { site, rows, tokens: vec![t], values });
            }
        }
        xs = Some(model.run_layer(layer, current, t, past.as_ref(), &iv)?.0);
    }
    // States that change nothing below the head (the last layer's output) join last.
    joined += join(&mut xs, entries, joined, n_layers)?;
    debug_assert_eq!(joined, entries.len());
    let xs = xs.ok_or_else(|| Error::Request("empty batch".into()))?;
    let probs = answer_probs(&model.last_position_logits(&xs)?, answer_id)?;
    Ok(probs.chunks(samples).map(mean).collect())
}

/// Appends the hidden states of the entries joining at `layer`; returns how many joined.
fn join(xs: &mut Option<Tensor>, entries: &[Entry], joined: usize, layer: usize) -> Result<usize> {
    let joining: Vec<&Tensor> =
        entries[joined..].iter().take_while(|e| e.join == layer).map(|e| &e.hidden).collect();
    if joining.is_empty() {
        return Ok(0);
    }
    let mut parts: Vec<&Tensor> = Vec::with_capacity(joining.len() + 1);
    if let Some(current) = xs.as_ref() {
        parts.push(current);
    }
    parts.extend(joining.iter().copied());
    *xs = Some(Tensor::cat(&parts, 0)?);
    Ok(joining.len())
}

/// The first `len` tokens of the S samples' keys/values, once per joined state.
fn repeat_rows(kv: &LayerKv, len: usize, copies: usize) -> Result<LayerKv> {
    let k = kv.k.narrow(2, 0, len)?;
    let v = kv.v.narrow(2, 0, len)?;
    let ks: Vec<&Tensor> = std::iter::repeat_n(&k, copies).collect();
    let vs: Vec<&Tensor> = std::iter::repeat_n(&v, copies).collect();
    Ok(LayerKv { k: Tensor::cat(&ks, 0)?, v: Tensor::cat(&vs, 0)? })
}

impl Runs {
    /// Tokens in the corrupted run's cache (the whole prompt).
    fn kv_len(&self) -> usize {
        self.kv.layers.iter().flatten().next().map_or(0, LayerKv::len)
    }
}
