//! ROME's algorithm as ROME runs it: for every cell, one forward of S + 1 rows over the whole
//! prompt, row 0 clean and rows 1..=S corrupted, the cell's states copied from row 0 into rows
//! 1..=S inside that same forward, logits at every position (`calculate_hidden_flow` →
//! `trace_with_patch`). A kind that freezes states runs ROME's notebook's two passes per cell
//! (`trace_with_repatch`): a first corrupted pass whose outputs of the frozen states are
//! kept, then the measured pass with the cell restored and those states written back. The
//! reference the fast path is tested against, and the baseline it is timed against.
//!
//! Noising (docs/science.md §6) runs, per cell, the corrupted run capturing the cell's states
//! at its token, then the clean prompt in S rows with row s's states overwritten by sample
//! s's values (and a severed kind's frozen states held at the clean run's).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use common::experiment::Resolved;
use common::kinds::{Cell, Kind};
use common::metric::MetricValues;

use super::{FactInput, FactTrace, MetricTables, Outcome, Prepared, Runs, TraceOptions, geometry};
use crate::error::{Error, Result};
use crate::forward::{ForwardRequest, Logits, Start};
use crate::intervene::{EmbedEdit, Interventions, Patch, RowCopy, Site};
use crate::models::Model;
use crate::tokenizer::Tokenizer;

/// Traces a fact ROME's way. With `only`, computes just those (token, layer) cells (every
/// head of them) of every table and leaves the others NaN (the full naive trace of a real
/// model takes minutes).
pub fn trace(
    model: &Model,
    tokenizer: &Tokenizer,
    fact: &FactInput<'_>,
    exp: &Resolved,
    opts: &TraceOptions,
    only: Option<&[(usize, usize)]>,
) -> Result<FactTrace> {
    let e = &exp.experiment;
    let prep = Prepared::new(model, tokenizer, fact, exp, opts)?;
    let (t_len, g, rows) = (prep.len(), geometry(model), e.samples() + 1);
    let device: &Device = model.device();
    let flat: Vec<u32> = (0..rows).flat_map(|_| prep.ids.iter().copied()).collect();
    let ids = Tensor::from_vec(flat, (rows, t_len), device)?;

    // predict_from_input: softmax of the last position of every row; row 0's argmax.
    let clean = run(model, &ids, Interventions::none())?.0;
    let probs =
        crate::forward::probabilities(&clean.narrow(0, 0, 1)?.squeeze(0)?)?.to_vec1::<f32>()?;
    let outcome = Outcome::new(tokenizer, fact, e.correctness, &probs)?;
    let (answer_id, traced) = (outcome.answer_id, outcome.traced);

    let corrupted = prep.corrupt(model, tokenizer, fact, exp, answer_id)?;
    let noised = || corrupted.edit((1..rows).collect(), prep.subject);
    let corrupted_logits = run(model, &ids, with_noise(noised()))?.0.narrow(0, 1, rows - 1)?;
    let (runs, scorer) =
        Runs::score(&clean.narrow(0, 0, 1)?, &corrupted_logits, &corrupted, answer_id)?;
    let score = |logits: &Tensor| -> Result<MetricValues> {
        let values = scorer.score(&logits.narrow(0, 1, rows - 1)?, rows - 1)?;
        values.into_iter().next().ok_or_else(|| Error::Trace("no rows".into()))
    };

    let mut tables = BTreeMap::new();
    if traced {
        for &kind in &e.kinds {
            let mut table = MetricTables::new(kind, t_len, g);
            for &t in &prep.traced_tokens {
                for (layer, head) in kind.layer_heads(g) {
                    if only.is_some_and(|cells| !cells.contains(&(t, layer)))
                        || !opts.wants_layer(layer)
                    {
                        continue;
                    }
                    let cell = Cell { token: t, layer, head };
                    if e.noising() {
                        let values = noising_cell(model, &ids, kind, cell, e.window, &noised())?;
                        table.set(cell, &score(&values)?);
                        continue;
                    }
                    let copies = kind
                        .restored(cell, e.window as usize, g.n_layers)
                        .into_iter()
                        .map(|state| RowCopy {
                            site: Site::from(state),
                            from_row: 0,
                            rows: (1..rows).collect(),
                            tokens: vec![t],
                        })
                        .collect();
                    // A kind that freezes states measures the second draw in ROME's seed
                    // mode (`trace_with_repatch`'s second pass); the others the first.
                    let mut iv = with_noise(match kind.freezes() {
                        Some(_) => corrupted.measured_edit((1..rows).collect(), prep.subject),
                        None => noised(),
                    });
                    iv.copies = copies;
                    iv.patches = frozen(model, &ids, kind, t, rows, Some(&noised()))?;
                    table.set(cell, &score(&run(model, &ids, iv)?.0)?);
                }
            }
            tables.insert(kind, table);
        }
    }
    prep.finish(tokenizer, outcome, runs, corrupted, tables)
}

/// One noising cell: the corrupted run (rows 1..=S corrupted by `noised`) captures the cell's
/// states at its token; then the clean prompt runs with rows 1..=S taking those values (row
/// s sample s's), and a kind's frozen states held at the clean run's. Returns the last
/// position's logits of all S + 1 rows.
fn noising_cell(
    model: &Model,
    ids: &Tensor,
    kind: Kind,
    cell: Cell,
    window: u32,
    noised: &EmbedEdit,
) -> Result<Tensor> {
    let (rows, _) = ids.dims2()?;
    let t = cell.token;
    let states = kind.restored(cell, window as usize, model.dims().n_layers);
    let mut iv = with_noise(noised.clone());
    let slots: Vec<usize> = states.iter().map(|&s| iv.capture(Site::from(s), vec![t])).collect();
    let captured = run(model, ids, iv)?.1;
    let mut iv = Interventions::none();
    for (&state, slot) in states.iter().zip(slots) {
        iv.patches.push(Patch {
            site: Site::from(state),
            rows: (1..rows).collect(),
            tokens: vec![t],
            values: captured[slot].narrow(0, 1, rows - 1)?,
        });
    }
    iv.patches.extend(frozen(model, ids, kind, t, rows, None)?);
    Ok(run(model, ids, iv)?.0)
}

/// `trace_with_repatch`'s first pass for a kind that freezes states: the corrupted run (rows
/// 1..=S corrupted by `first`), or the clean run when noising (`None`), whose outputs of the
/// frozen states at token `t` become patches of rows 1..=S. Empty for kinds that freeze
/// nothing.
fn frozen(
    model: &Model,
    ids: &Tensor,
    kind: Kind,
    t: usize,
    rows: usize,
    first: Option<&EmbedEdit>,
) -> Result<Vec<Patch>> {
    let states = kind.frozen(model.dims().n_layers);
    if states.is_empty() {
        return Ok(Vec::new());
    }
    let mut iv = first.cloned().map_or_else(Interventions::none, with_noise);
    let slots: Vec<usize> = states.iter().map(|&s| iv.capture(Site::from(s), vec![t])).collect();
    let captured = run(model, ids, iv)?.1;
    states
        .iter()
        .zip(slots)
        .map(|(&state, slot)| {
            Ok(Patch {
                site: Site::from(state),
                rows: (1..rows).collect(),
                tokens: vec![t],
                values: captured[slot].narrow(0, 1, rows - 1)?,
            })
        })
        .collect()
}

fn with_noise(edit: EmbedEdit) -> Interventions {
    Interventions { embed: vec![edit], ..Interventions::none() }
}

/// One forward with logits at every position (as ROME's `model(**inp)`); returns the last
/// position's logits `(rows, vocab)` and the captures.
fn run(model: &Model, ids: &Tensor, iv: Interventions) -> Result<(Tensor, Vec<Tensor>)> {
    let req = ForwardRequest {
        start: Start::Tokens(ids),
        interventions: &iv,
        logits: Logits::All,
        keep_kv: false,
    };
    let out = model.forward(&req)?;
    let logits = out.logits.ok_or_else(|| crate::error::Error::Request("no logits".into()))?;
    let (_, t_len, _) = logits.dims3()?;
    Ok((logits.narrow(1, t_len - 1, 1)?.squeeze(1)?, out.captures))
}
