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
//! - All cells of one token, of every kind, run in one batched forward of cells × samples
//!   rows, each cell resuming from its own kind's base run (the severed kinds' trunks differ
//!   from the others' corrupted run). A cell joins the batch at its first changed layer, so
//!   the batch grows layer by layer and no row computes a layer it would not change.
//!   `max_batch_tokens` bounds its size. So a fact takes about T × L batched layer calls,
//!   not T × kinds × L (`trace-bench` reports the count).
//! - `tokens_per_batch` > 1 batches the cells of several tokens together: every row then
//!   computes the tokens from the group's earliest restored one, those before its own token
//!   copied from its base run and recomputed unchanged (attention is causal, so a cell
//!   changes nothing before its token). That is more FLOPs for fewer, larger layer calls:
//!   about L per fact when all tokens share a batch, which is what a GPU, bound by launches
//!   rather than arithmetic on small models, wants. A CPU keeps one token per batch.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Tensor};
use common::experiment::Resolved;
use common::kinds::{Cell, Kind, Plan, State};
use common::metric::MetricValues;

use super::score::Scorer;
use super::{FactInput, FactTrace, MetricTables, Outcome, Prepared, Runs, TraceOptions, geometry};
use crate::error::{Error, Result};
use crate::forward::{ForwardOutput, ForwardRequest, KvCache, LayerKv, Logits, Start};
use crate::intervene::{EmbedEdit, Interventions, Patch, Site};
use crate::models::{Model, copies};
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
    /// `entering[l]` enters layer l, `(rows, T - from, d)`.
    entering: Vec<Tensor>,
    /// The first token of `entering`.
    from: usize,
    /// Keys and values of every token, `rows` rows.
    kv: KvCache,
    /// S (a corrupted run), or 1 (the clean run, the same for every sample).
    rows: usize,
    /// Its metrics: what a no-op cell scores.
    score: MetricValues,
}

impl Base {
    /// The stream entering `layer` at tokens `t..T`.
    fn entering(&self, layer: usize, t: usize, t_len: usize) -> Result<Tensor> {
        self.entering_span(layer, t, t_len - t)
    }

    /// The stream entering `layer` at tokens `t..t + len`.
    fn entering_span(&self, layer: usize, t: usize, len: usize) -> Result<Tensor> {
        let at = t.checked_sub(self.from).ok_or_else(|| {
            Error::Request(format!("token {t} is before the base run's first token {}", self.from))
        })?;
        Ok(self.entering[layer].narrow(1, at, len)?)
    }
}

/// A cell's runs at its token: its own base run, and the run whose tokens before the cell's
/// it shares (the same run, except for the severed kinds' trunks: their measured run).
#[derive(Clone, Copy)]
struct Bases<'a> {
    token: usize,
    kind: Kind,
    own: &'a Base,
    before: &'a Base,
}

/// One restored cell in a batched suffix run that starts at token `start ≤ t`.
struct Entry {
    kind: Kind,
    cell: Cell,
    /// Its base run: an index into the batch's bases.
    base: usize,
    /// The first layer whose computation it changes.
    join: usize,
    /// The residual stream entering `join` at tokens `start..T`, `(S, T - start, d)`: the
    /// base run's tokens `start..t` (which the cell does not change: attention is causal)
    /// then the cell's own.
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
    let (n_layers, window, noising) = (g.n_layers, e.window as usize, e.noising());
    let b = prep.subject.0;
    let device: &Device = model.device();
    let head_dim = model.dims().head_dim;

    // The states a restoration writes, and the states the kinds freeze.
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
    let frozen_sites: BTreeSet<Site> =
        e.kinds.iter().flat_map(|k| k.frozen(n_layers)).map(capture_site).collect();

    // Clean run: one row. Denoising takes the restored states from it; noising resumes from
    // it (its stream and keys/values) with the frozen states at its values.
    let ids = Tensor::new(prep.ids.as_slice(), device)?.unsqueeze(0)?;
    let clean_sites = if noising { &frozen_sites } else { &restored_sites };
    let (mut clean, clean_states, clean_logits) =
        base_run(model, &ids, None, b, clean_sites, noising)?;
    let probs = crate::forward::probabilities(&clean_logits.squeeze(0)?)?.to_vec1::<f32>()?;
    let outcome = Outcome::new(tokenizer, fact, e.correctness, &probs)?;
    let (answer_id, traced) = (outcome.answer_id, outcome.traced);

    // Corrupted run: S rows. Denoising resumes from it (its stream, keys/values, and the
    // frozen states at its values); noising takes the replacing states from it. A fact that
    // is not traced needs only its metrics.
    let ids_s = ids.broadcast_as((samples, t_len))?.contiguous()?;
    let corruption = prep.corrupt(model, tokenizer, fact, exp, answer_id)?;
    let rows: Vec<usize> = (0..samples).collect();
    let none = BTreeSet::new();
    let corrupted_sites = match (traced, noising) {
        (false, _) => &none,
        (true, false) => &frozen_sites,
        (true, true) => &restored_sites,
    };
    let edit = corruption.edit(rows.clone(), prep.subject);
    let (mut corrupted, corrupted_states, corrupted_logits) =
        base_run(model, &ids_s, Some(edit), b, corrupted_sites, traced && !noising)?;
    let (runs, scorer) = Runs::score(&clean_logits, &corrupted_logits, &corruption, answer_id)?;
    clean.score = runs.clean;
    corrupted.score = runs.corrupted;
    let states = |by_site| States { by_site, b, head_dim };
    let (source, frozen) = match noising {
        false => (states(clean_states), states(corrupted_states)),
        true => (states(corrupted_states), states(clean_states)),
    };
    // The severed kinds' measured run in ROME's seed mode: the second draw.
    let measured = match corruption.two_draws() && traced {
        true => {
            let edit = corruption.measured_edit(rows, prep.subject);
            let (mut base, _, logits) = base_run(model, &ids_s, Some(edit), b, &none, true)?;
            base.score = first(scorer.score(&logits, samples)?)?;
            Some(base)
        }
        false => None,
    };
    let base = if noising { &clean } else { &corrupted };

    let mut tables: BTreeMap<Kind, MetricTables> = BTreeMap::new();
    if traced {
        let job = Job {
            model,
            opts,
            samples,
            t_len,
            subject: prep.subject,
            window,
            scorer: &scorer,
            source: &source,
            frozen: &frozen,
        };
        tables = e.kinds.iter().map(|&k| (k, MetricTables::new(k, t_len, g))).collect();
        let per_batch = opts.tokens_per_batch.max(1);
        for group in prep.traced_tokens.chunks(per_batch) {
            // Each kind's base run at each token: the severed kinds' trunk (their own frozen
            // states held from layer 0) or measured run, the corrupted or clean run otherwise.
            let mut trunks = BTreeMap::new();
            for &t in group {
                if let Some(measured) = measured.as_ref().filter(|_| t >= b) {
                    for &kind in e.kinds.iter().filter(|k| k.freezes().is_some()) {
                        trunks.insert((t, kind), job.trunk(kind, t, measured)?);
                    }
                }
            }
            let mut bases = Vec::new();
            for &t in group {
                for &kind in &e.kinds {
                    let (own, before) = match (kind.freezes(), &measured) {
                        (Some(_), Some(m)) => (trunks.get(&(t, kind)).unwrap_or(m), m),
                        _ => (base, base),
                    };
                    bases.push(Bases { token: t, kind, own, before });
                }
            }
            job.tokens(&bases, &mut tables)?;
        }
    }
    prep.finish(tokenizer, outcome, runs, corruption, tables)
}

fn first(values: Vec<MetricValues>) -> Result<MetricValues> {
    values.into_iter().next().ok_or_else(|| Error::Request("a run without rows".into()))
}

/// A run of the prompt's rows (`ids`, 1 or S), corrupted by `edit` if any: the stream entering
/// every layer at tokens `b..T` and keys/values (when `keep` is set), the captures of `extra`
/// at tokens `b..T`, and the last position's logits `(rows, vocab)`. Its score is set by the
/// caller, once the foil is known.
fn base_run(
    model: &Model,
    ids: &Tensor,
    edit: Option<EmbedEdit>,
    b: usize,
    extra: &BTreeSet<Site>,
    keep: bool,
) -> Result<(Base, BTreeMap<Site, Tensor>, Tensor)> {
    let (rows, t_len) = ids.dims2()?;
    let n_layers = model.dims().n_layers;
    let suffix: Vec<usize> = (b..t_len).collect();
    let mut iv = Interventions { embed: edit.into_iter().collect(), ..Interventions::none() };
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
    let logits = out.logits.clone().ok_or_else(|| Error::Request("no logits".into()))?;
    let entering = slots.iter().map(|&(_, i)| out.captures[i].clone()).collect();
    let extra = collect(&out, &extra_slots);
    let kv = out.kv.unwrap_or_default();
    let score = MetricValues::default();
    Ok((Base { entering, from: b, kv, rows, score }, extra, logits))
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
    scorer: &'a Scorer,
    /// Where the written states come from: the clean run (denoising, 1 row) or the
    /// corrupted run (noising, S rows).
    source: &'a States,
    /// The frozen states' values: the corrupted run's (S rows), or the clean run's (1 row).
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
            rows: measured.rows,
            score: first(self.scorer.score(logits, self.samples)?)?,
        })
    }

    /// Every asked cell of every kind at the tokens of `bases` into `tables`, all batched
    /// together: `bases` holds each (token, kind)'s base runs. Every row computes the tokens
    /// from the earliest restored one on, so one token alone wastes nothing, and several
    /// share their layer calls at the price of recomputing, unchanged, the tokens between.
    fn tokens(&self, bases: &[Bases<'_>], tables: &mut BTreeMap<Kind, MetricTables>) -> Result<()> {
        let g = geometry(self.model);
        let mut runs = Vec::new();
        for (i, at) in bases.iter().enumerate() {
            let table = tables
                .get_mut(&at.kind)
                .ok_or_else(|| Error::Request(format!("no table for {:?}", at.kind)))?;
            for (layer, head) in at.kind.layer_heads(g) {
                if !self.opts.wants_layer(layer) {
                    continue;
                }
                let cell = Cell { token: at.token, layer, head };
                match at.kind.plan(cell, self.subject, self.t_len, self.window, g.n_layers) {
                    Plan::NoOp => table.set(cell, &at.own.score),
                    Plan::Run { join } => runs.push((i, cell, join)),
                }
            }
        }
        let Some(start) = runs.iter().map(|(_, cell, _)| cell.token).min() else {
            return Ok(());
        };
        let mut entries = Vec::with_capacity(runs.len());
        for (i, cell, join) in runs {
            entries.push(self.entry(cell, join, i, &bases[i], start)?);
        }
        entries.sort_by_key(|e| e.join);
        let per_chunk = (self.opts.max_batch_tokens / (self.samples * (self.t_len - start))).max(1);
        let own: Vec<&Base> = bases.iter().map(|at| at.own).collect();
        for chunk in entries.chunks(per_chunk) {
            let scores = self.run_batch(start, chunk, &own)?;
            for (entry, score) in chunk.iter().zip(scores) {
                if let Some(table) = tables.get_mut(&entry.kind) {
                    table.set(entry.cell, &score);
                }
            }
        }
        Ok(())
    }

    /// A restored cell: the base run's stream entering `join` (one copy per sample), with
    /// the cell's written block output (if it is the one just below `join`) at token t, and
    /// every other written or frozen state at layers ≥ `join` as a patch; preceded by the
    /// stream at tokens `start..t`, which the cell does not change.
    fn entry(
        &self,
        cell: Cell,
        join: usize,
        base_index: usize,
        at: &Bases<'_>,
        start: usize,
    ) -> Result<Entry> {
        let (t, n_layers, kind) = (cell.token, self.model.dims().n_layers, at.kind);
        // Every part is one row (a clean run's) or S rows (a corrupted run's); each is
        // widened to the S rows of the entry once, before the parts are joined.
        let samples = self.samples;
        let widen = |x: Tensor| -> Result<Tensor> {
            let (_, len, d) = x.dims3()?;
            Ok(x.broadcast_as((samples, len, d))?)
        };
        let mut hidden = widen(at.own.entering(join, t, self.t_len)?)?;
        let mut patches = Vec::new();
        for state in kind.restored(cell, self.window, n_layers) {
            let value = self.source.at(state, t)?;
            if join.checked_sub(1).map(State::Block) == Some(state) {
                let first = widen(value)?;
                hidden = if t + 1 < self.t_len {
                    copies::cat(&[&first, &hidden.narrow(1, 1, self.t_len - t - 1)?], 1)?
                } else {
                    first
                };
            } else {
                patches.push((Site::from(state), value));
            }
        }
        if start < t {
            let before = widen(at.before.entering_span(join, start, t - start)?)?;
            hidden = copies::cat(&[&before, &hidden], 1)?;
        }
        let hidden = copies::contiguous(&hidden)?;
        patches.extend(self.frozen_patches(kind, t, join)?);
        Ok(Entry { kind, cell, base: base_index, join, hidden, patches })
    }

    /// Runs entries together from token `start` on and returns each one's metrics.
    fn run_batch(
        &self,
        start: usize,
        entries: &[Entry],
        bases: &[&Base],
    ) -> Result<Vec<MetricValues>> {
        let (model, samples) = (self.model, self.samples);
        let n_layers = model.dims().n_layers;
        let first = entries.first().map_or(n_layers, |e| e.join);
        let mut xs: Option<Tensor> = None;
        let mut joined = 0;
        for layer in first..n_layers {
            joined += join(&mut xs, entries, joined, layer)?;
            let Some(current) = xs.take() else { continue };
            let past = match start {
                0 => None,
                _ => Some(stack_past(&entries[..joined], bases, layer, start, samples)?),
            };
            let patches = layer_patches(entries, joined, layer, samples)?;
            let iv = Interventions { patches, ..Interventions::none() };
            xs = Some(model.run_layer(layer, current, start, past.as_ref(), &iv)?.0);
        }
        // Cells that change nothing below the head (the last layer's output) join last.
        joined += join(&mut xs, entries, joined, n_layers)?;
        debug_assert_eq!(joined, entries.len());
        let xs = xs.ok_or_else(|| Error::Request("empty batch".into()))?;
        self.scorer.score(&model.last_position_logits(&xs)?, samples)
    }
}

/// The patches of the first `joined` entries at `layer`, one per site and token: each
/// entry's S rows take its values (a clean state is broadcast over the samples) at its token.
fn layer_patches(
    entries: &[Entry],
    joined: usize,
    layer: usize,
    samples: usize,
) -> Result<Vec<Patch>> {
    let mut by_site: BTreeMap<(Site, usize), (Vec<usize>, Vec<Tensor>)> = BTreeMap::new();
    for (i, entry) in entries[..joined].iter().enumerate() {
        for (site, values) in entry.patches.iter().filter(|(s, _)| s.layer() == Some(layer)) {
            let (rows, parts) = by_site.entry((*site, entry.cell.token)).or_default();
            rows.extend(i * samples..(i + 1) * samples);
            let (_, _, w) = values.dims3()?;
            parts.push(values.broadcast_as((samples, 1, w))?);
        }
    }
    by_site
        .into_iter()
        .map(|((site, t), (rows, parts))| {
            let values = copies::cat(&parts.iter().collect::<Vec<_>>(), 0)?;
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
    *xs = Some(copies::cat(&parts, 0)?);
    Ok(joining.len())
}

/// The keys and values of tokens `< t` (the batch's first computed token) at `layer` for the
/// rows of `entries`: each entry's S rows take its base run's (a clean base's one row serves
/// every sample). Consecutive entries on the same base share one repeat.
fn stack_past(
    entries: &[Entry],
    bases: &[&Base],
    layer: usize,
    t: usize,
    samples: usize,
) -> Result<LayerKv> {
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < entries.len() {
        let index = entries[i].base;
        let run = entries[i..].iter().take_while(|e| e.base == index).count();
        let base =
            bases.get(index).ok_or_else(|| Error::Request(format!("no base run {index}")))?;
        let kv_len = base.kv.layers.iter().flatten().next().map_or(0, LayerKv::len);
        let kv = base.kv.layer(layer, kv_len)?;
        let copies = run * (samples / base.rows.max(1));
        let (k, v) = (kv.k.narrow(2, 0, t)?, kv.v.narrow(2, 0, t)?);
        ks.extend(std::iter::repeat_n(k, copies));
        vs.extend(std::iter::repeat_n(v, copies));
        i += run;
    }
    let (ks, vs): (Vec<&Tensor>, Vec<&Tensor>) = (ks.iter().collect(), vs.iter().collect());
    Ok(LayerKv { k: copies::cat(&ks, 0)?, v: copies::cat(&vs, 0)? })
}
