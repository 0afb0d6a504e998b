//! The fast path: the same numbers as [`super::naive`], with a fraction of its work.
//!
//! - The clean run is computed once per fact (one row), the corrupted run once (S rows),
//!   keeping its keys/values, its residual stream and the states the kinds freeze.
//! - Restoring cell (t, l[, h]) changes nothing before token t nor below the first layer its
//!   states change ([`common::kinds::Plan`]), so each restored run resumes from a base run:
//!   keys/values of tokens < t, residual stream entering that layer for tokens ≥ t. Only that
//!   suffix is computed, and the LM head only at the last position.
//! - The base run of a kind that freezes nothing is the corrupted run. A kind that freezes
//!   states (the severed kinds) measures another corrupted run in ROME's seed mode (the
//!   stream's second draw) with the frozen states held at the first draw's values: that run,
//!   the "trunk", is computed once per token from layer 0 (the frozen states change token t
//!   in every layer) and the token's cells branch off it. In per-fact mode the measured run
//!   is the corrupted run, whose frozen states hold their own values: the base run is the
//!   corrupted run again.
//! - Provable no-ops ([`common::kinds::Plan::NoOp`]) score the base run's probability.
//! - All cells of one token run in one batched forward of cells × samples rows. A cell joins
//!   the batch at its first changed layer, so the batch grows layer by layer and no row
//!   computes a layer it would not change. `max_batch_tokens` bounds its size.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Tensor};
use common::experiment::Resolved;
use common::kinds::{Cell, Kind, Plan, State};

use super::{
    FactInput, FactTrace, KindTable, Outcome, Prepared, TraceOptions, answer_probs, geometry, mean,
};
use crate::error::{Error, Result};
use crate::forward::{ForwardOutput, ForwardRequest, KvCache, LayerKv, Logits, Start};
use crate::intervene::{EmbedEdit, Interventions, Patch, Site};
use crate::models::Model;
use crate::tokenizer::Tokenizer;

/// Where a state is captured: a single head is a slice of the layer's heads.
fn capture_site(state: State) -> Site {
    match state {
        State::Head(l, _) => Site::Heads(l),
        other => Site::from(other),
    }
}

/// States of a run at tokens `b..T`, by capture site: `(rows, T - b, width)`.
struct States {
    by_site: BTreeMap<Site, Tensor>,
    b: usize,
    head_dim: usize,
}

impl States {
    /// `state` at token `t`: `(rows, 1, width)`.
    fn at(&self, state: State, t: usize) -> Result<Tensor> {
        let all = self
            .by_site
            .get(&capture_site(state))
            .ok_or_else(|| Error::Request(format!("{state:?} was not captured")))?;
        let one = all.narrow(1, t - self.b, 1)?;
        Ok(match state {
            State::Head(_, h) => one.narrow(2, h * self.head_dim, self.head_dim)?,
            _ => one,
        })
    }
}

/// A corrupted run that restored runs resume from.
struct Base {
    /// The residual stream entering layer 0, then after each layer, at tokens `from..T`:
    /// `entering[l]` enters layer l, `(S, T - from, d)`.
    entering: Vec<Tensor>,
    /// The first token of `entering`.
    from: usize,
    /// Keys and values of every token, S rows.
    kv: KvCache,
    /// Its mean p(answer): what a no-op cell scores.
    score: f32,
}

impl Base {
    /// The stream entering `layer` at tokens `t..T`.
    fn entering(&self, layer: usize, t: usize, t_len: usize) -> Result<Tensor> {
        Ok(self.entering[layer].narrow(1, t - self.from, t_len - t)?)
    }
}

/// One restored cell in a batched suffix run.
struct Entry {
    cell: Cell,
    /// The first layer whose computation it changes.
    join: usize,
    /// The residual stream entering `join` at tokens `t..T`, `(S, T - t, d)`.
    hidden: Tensor,
    /// Overwrites at token t in layers ≥ `join`: `(site, values)` with values `(1, 1, w)`
    /// (a clean state, the same for every sample) or `(S, 1, w)` (a frozen state).
    patches: Vec<(Site, Tensor)>,
}

/// Traces a fact the fast way.
pub fn trace(
    model: &Model,
    tokenizer: &Tokenizer,
    fact: &FactInput<'_>,
    exp: &Resolved,
    opts: &TraceOptions,
) -> Result<FactTrace> {
    let e = &exp.experiment;
    let prep = Prepared::new(model, tokenizer, fact, exp, opts)?;
    let (t_len, g, samples) = (prep.len(), geometry(model), e.samples());
    let (n_layers, window) = (g.n_layers, e.window as usize);
    let b = prep.subject.0;
    let device: &Device = model.device();
    let suffix: Vec<usize> = (b..t_len).collect();
    let head_dim = model.dims().head_dim;

    // Clean run: one row, capturing every state a restoration may need.
    let restored_sites: BTreeSet<Site> = e
        .kinds
        .iter()
        .flat_map(|&kind| {
            kind.layer_heads(g).flat_map(move |(layer, head)| {
                kind.restored(Cell { token: b, layer, head }, window, n_layers)
            })
        })
        .map(capture_site)
        .collect();
    let ids = Tensor::new(prep.ids.as_slice(), device)?.unsqueeze(0)?;
    let mut clean_iv = Interventions::none();
    let clean_slots: Vec<(Site, usize)> =
        restored_sites.iter().map(|&s| (s, clean_iv.capture(s, suffix.clone()))).collect();
    let clean = forward(model, Start::Tokens(&ids), &clean_iv, false)?;
    let clean_logits = clean.logits.as_ref().ok_or_else(|| Error::Request("no logits".into()))?;
    let probs = crate::forward::probabilities(&clean_logits.squeeze(0)?)?.to_vec1::<f32>()?;
    let outcome = Outcome::new(tokenizer, fact, e.correctness, &probs)?;
    let answer_id = outcome.answer_id;
    let clean = States { by_site: collect(&clean, &clean_slots), b, head_dim };

    // Corrupted run: S rows, keeping keys/values, the residual stream entering every layer
    // and the states the kinds freeze.
    let ids_s = ids.broadcast_as((samples, t_len))?.contiguous()?;
    let corruption = prep.corrupt(model, tokenizer, fact, exp, answer_id)?;
    let rows: Vec<usize> = (0..samples).collect();
    let traced = outcome.traced;
    // A fact that is not traced needs only its low_score.
    let frozen_sites: BTreeSet<Site> = match traced {
        true => e.kinds.iter().flat_map(|k| k.frozen(n_layers)).map(capture_site).collect(),
        false => BTreeSet::new(),
    };
    let (corrupted, frozen) = base_run(
        model,
        &ids_s,
        corruption.edit(rows.clone(), prep.subject),
        b,
        &frozen_sites,
        traced,
        answer_id,
    )?;
    let low_score = corrupted.score;
    let frozen = States { by_site: frozen, b, head_dim };
    // The severed kinds' measured run in ROME's seed mode: the second draw.
    let measured = match corruption.two_draws() && traced {
        true => {
            let edit = corruption.measured_edit(rows, prep.subject);
            Some(base_run(model, &ids_s, edit, b, &BTreeSet::new(), true, answer_id)?.0)
        }
        false => None,
    };

    let mut scores = BTreeMap::new();
    if traced {
        let job = Job {
            model,
            opts,
            samples,
            t_len,
            subject: prep.subject,
            window,
            answer_id,
            clean: &clean,
            frozen: &frozen,
        };
        for &kind in &e.kinds {
            let mut table = KindTable::new(kind, t_len, g);
            for &t in &prep.traced_tokens {
                let trunk;
                let base = match (kind.freezes(), &measured) {
                    (Some(_), Some(measured)) if t >= b => {
                        trunk = job.trunk(kind, t, measured)?;
                        &trunk
                    }
                    (Some(_), Some(measured)) => measured,
                    _ => &corrupted,
                };
                job.token(kind, t, base, &mut table)?;
            }
            scores.insert(kind, table);
        }
    }
    Ok(prep.finish(outcome, low_score, corruption, scores))
}

/// A corrupted run of S rows from the token ids: the stream entering every layer at tokens
/// `b..T`, keys/values (when `keep` is set), its score, and the captures of `extra`.
fn base_run(
    model: &Model,
    ids: &Tensor,
    noise: EmbedEdit,
    b: usize,
    extra: &BTreeSet<Site>,
    keep: bool,
    answer_id: u32,
) -> Result<(Base, BTreeMap<Site, Tensor>)> {
    let (_, t_len) = ids.dims2()?;
    let n_layers = model.dims().n_layers;
    let suffix: Vec<usize> = (b..t_len).collect();
    let mut iv = Interventions { embed: vec![noise], ..Interventions::none() };
    let mut slots = Vec::new();
    if keep {
        slots.push((Site::Input, iv.capture(Site::Input, suffix.clone())));
        for l in 0..n_layers {
            slots.push((Site::Block(l), iv.capture(Site::Block(l), suffix.clone())));
        }
    }
    let extra_slots: Vec<(Site, usize)> =
        extra.iter().map(|&s| (s, iv.capture(s, suffix.clone()))).collect();
    let out = forward(model, Start::Tokens(ids), &iv, keep)?;
    let logits = out.logits.as_ref().ok_or_else(|| Error::Request("no logits".into()))?;
    let score = mean(&answer_probs(logits, answer_id)?);
    let entering = slots.iter().map(|&(_, i)| out.captures[i].clone()).collect();
    let extra = collect(&out, &extra_slots);
    let kv = out.kv.unwrap_or_default();
    Ok((Base { entering, from: b, kv, score }, extra))
}

fn collect(out: &ForwardOutput, slots: &[(Site, usize)]) -> BTreeMap<Site, Tensor> {
    slots.iter().map(|&(s, i)| (s, out.captures[i].clone())).collect()
}

fn forward(
    model: &Model,
    start: Start<'_>,
    iv: &Interventions,
    keep_kv: bool,
) -> Result<ForwardOutput> {
    model.forward(&ForwardRequest { start, interventions: iv, logits: Logits::Last, keep_kv })
}

/// What every restored run of a fact shares.
struct Job<'a> {
    model: &'a Model,
    opts: &'a TraceOptions,
    samples: usize,
    t_len: usize,
    subject: (usize, usize),
    window: usize,
    answer_id: u32,
    clean: &'a States,
    frozen: &'a States,
}

impl Job<'_> {
    /// The frozen states of `kind` at token `t` in layers ≥ `from`, as per-sample patches.
    fn frozen_patches(&self, kind: Kind, t: usize, from: usize) -> Result<Vec<(Site, Tensor)>> {
        let n_layers = self.model.dims().n_layers;
        kind.frozen(n_layers)
            .into_iter()
            .filter(|s| s.layer() >= from)
            .map(|s| Ok((Site::from(s), self.frozen.at(s, t)?)))
            .collect()
    }

    /// The severed kinds' unrestored run at token `t ≥ b`: the measured run's tokens < t as
    /// they are, tokens t..T recomputed from layer 0 with the frozen states held.
    fn trunk(&self, kind: Kind, t: usize, measured: &Base) -> Result<Base> {
        let n_layers = self.model.dims().n_layers;
        let mut iv = Interventions::none();
        for (site, values) in self.frozen_patches(kind, t, 0)? {
            let rows = (0..self.samples).collect();
            iv.patches.push(Patch { site, rows, tokens: vec![t], values });
        }
        let tokens: Vec<usize> = (t..self.t_len).collect();
        let slots: Vec<usize> =
            (0..n_layers).map(|l| iv.capture(Site::Block(l), tokens.clone())).collect();
        let past = measured.kv.narrow_tokens(t)?;
        let start = Start::Resume {
            layer: 0,
            pos: t,
            hidden: measured.entering(0, t, self.t_len)?,
            past: &past,
        };
        let out = forward(self.model, start, &iv, false)?;
        let logits = out.logits.as_ref().ok_or_else(|| Error::Request("no logits".into()))?;
        let mut entering = vec![measured.entering(0, t, self.t_len)?];
        entering.extend(slots.iter().map(|&i| out.captures[i].clone()));
        Ok(Base {
            entering,
            from: t,
            kv: measured.kv.clone(),
            score: mean(&answer_probs(logits, self.answer_id)?),
        })
    }

    /// Every asked cell of `kind` at token `t` into `table`.
    fn token(&self, kind: Kind, t: usize, base: &Base, table: &mut KindTable) -> Result<()> {
        let g = geometry(self.model);
        let mut entries = Vec::new();
        for (layer, head) in kind.layer_heads(g) {
            if !self.opts.wants_layer(layer) {
                continue;
            }
            let cell = Cell { token: t, layer, head };
            match kind.plan(cell, self.subject, self.t_len, self.window, g.n_layers) {
                Plan::NoOp => table.set(cell, base.score),
                Plan::Run { join } => entries.push(self.entry(kind, cell, join, base)?),
            }
        }
        entries.sort_by_key(|e| e.join);
        let per_chunk = (self.opts.max_batch_tokens / (self.samples * (self.t_len - t))).max(1);
        for chunk in entries.chunks(per_chunk) {
            let scores = self.run_batch(t, chunk, &base.kv)?;
            for (entry, score) in chunk.iter().zip(scores) {
                table.set(entry.cell, score);
            }
        }
        Ok(())
    }

    /// A restored cell: the base run's stream entering `join`, with the cell's restored
    /// block output (if it is the one just below `join`) written into token t, and every
    /// other restored or frozen state at layers ≥ `join` as a patch.
    fn entry(&self, kind: Kind, cell: Cell, join: usize, base: &Base) -> Result<Entry> {
        let (t, n_layers) = (cell.token, self.model.dims().n_layers);
        let mut hidden = base.entering(join, t, self.t_len)?;
        let mut patches = Vec::new();
        for state in kind.restored(cell, self.window, n_layers) {
            let clean = self.clean.at(state, t)?;
            if join.checked_sub(1).map(State::Block) == Some(state) {
                let first = clean.broadcast_as((self.samples, 1, clean.dim(2)?))?;
                hidden = if t + 1 < self.t_len {
                    Tensor::cat(&[&first, &hidden.narrow(1, 1, self.t_len - t - 1)?], 1)?
                } else {
                    first.contiguous()?
                };
            } else {
                patches.push((Site::from(state), clean));
            }
        }
        patches.extend(self.frozen_patches(kind, t, join)?);
        Ok(Entry { cell, join, hidden, patches })
    }

    /// Runs the entries of one token together and returns each one's score.
    fn run_batch(&self, t: usize, entries: &[Entry], kv: &KvCache) -> Result<Vec<f32>> {
        let (model, samples) = (self.model, self.samples);
        let n_layers = model.dims().n_layers;
        let kv_len = kv.layers.iter().flatten().next().map_or(0, LayerKv::len);
        let first = entries.first().map_or(n_layers, |e| e.join);
        let mut xs: Option<Tensor> = None;
        let mut joined = 0;
        for layer in first..n_layers {
            joined += join(&mut xs, entries, joined, layer)?;
            let Some(current) = xs.take() else { continue };
            let past =
                if t > 0 { Some(repeat_rows(kv.layer(layer, kv_len)?, t, joined)?) } else { None };
            let patches = layer_patches(entries, joined, layer, samples, t)?;
            let iv = Interventions { patches, ..Interventions::none() };
            xs = Some(model.run_layer(layer, current, t, past.as_ref(), &iv)?.0);
        }
        // Cells that change nothing below the head (the last layer's output) join last.
        joined += join(&mut xs, entries, joined, n_layers)?;
        debug_assert_eq!(joined, entries.len());
        let xs = xs.ok_or_else(|| Error::Request("empty batch".into()))?;
        let probs = answer_probs(&model.last_position_logits(&xs)?, self.answer_id)?;
        Ok(probs.chunks(samples).map(mean).collect())
    }
}

/// The patches of the first `joined` entries at `layer`, one per site: each entry's S rows
/// take its values (a clean state is broadcast over the samples).
fn layer_patches(
    entries: &[Entry],
    joined: usize,
    layer: usize,
    samples: usize,
    t: usize,
) -> Result<Vec<Patch>> {
    let mut by_site: BTreeMap<Site, (Vec<usize>, Vec<Tensor>)> = BTreeMap::new();
    for (i, entry) in entries[..joined].iter().enumerate() {
        for (site, values) in entry.patches.iter().filter(|(s, _)| s.layer() == Some(layer)) {
            let (rows, parts) = by_site.entry(*site).or_default();
            rows.extend(i * samples..(i + 1) * samples);
            let (_, _, w) = values.dims3()?;
            parts.push(values.broadcast_as((samples, 1, w))?);
        }
    }
    by_site
        .into_iter()
        .map(|(site, (rows, parts))| {
            let values = Tensor::cat(&parts.iter().collect::<Vec<_>>(), 0)?;
            Ok(Patch { site, rows, tokens: vec![t], values })
        })
        .collect()
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
