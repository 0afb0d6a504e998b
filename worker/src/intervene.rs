//! Intervention points: where a caller may edit, overwrite or read a model's internal state.
//!
//! Candle has no hooks, so interventions are data passed into the forward pass
//! ([`crate::forward::ForwardRequest`]) rather than global state. Every position is an
//! absolute token index into the full sequence, also when a forward resumes from a prefix.
//!
//! Order inside a forward pass, for each layer `l`:
//!
//! ```text
//!   embeddings ── EmbedEdit ── capture(Embed) ── (+ positions) ── patch/capture(Input) ─┐
//!   ┌──────────────────────────────────────────────────────────────────────────────────┘
//!   └─> heads(l) ── patch/capture(Heads(l)) ── patch/capture(Head(l, h)) ── o_proj ──
//!        patch/capture(Attn(l)) ── + ── mlp(l) ── patch/capture(Mlp(l)) ── +
//!        ── patch/capture(Block(l)) ─> next layer
//! ```
//!
//! At each site, patches apply first, then row copies, then captures: a capture sees the
//! state after this pass's own changes at the same site. `Head(l, h)` is a column slice of
//! `Heads(l)`: its patches and copies apply after those of `Heads(l)`, and before the
//! captures of either.

use std::ops::Range;

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::error::{Result, bail_request};
use crate::models::copies;

/// A place in the network whose state can be captured or overwritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// The token embeddings, before position embeddings are added (GPT-2's `wte` output,
    /// Llama's `embed_tokens` output): where causal tracing adds its noise.
    Embed,
    /// The residual stream entering layer 0: token embeddings plus position embeddings where
    /// the family has them (GPT-2), the token embeddings otherwise.
    Input,
    /// The output of block `l`: the residual stream after layer `l`.
    Block(usize),
    /// The attention sublayer's output of layer `l` (after its output projection, before it
    /// is added to the residual stream).
    Attn(usize),
    /// The MLP sublayer's output of layer `l` (after its down projection, before it is added
    /// to the residual stream).
    Mlp(usize),
    /// Every attention head's output of layer `l` before the output projection, heads
    /// side by side: `(b, t, n_heads × head_dim)` (TransformerLens' `hook_z`, flattened).
    Heads(usize),
    /// Head `h`'s output of layer `l` before the output projection: `(b, t, head_dim)`, its
    /// attention-weighted value vector (`hook_z[:, :, h]`).
    Head(usize, usize),
}

impl Site {
    /// The layer the site belongs to; `None` for the embeddings.
    pub fn layer(self) -> Option<usize> {
        match self {
            Site::Embed | Site::Input => None,
            Site::Block(l) | Site::Attn(l) | Site::Mlp(l) | Site::Heads(l) | Site::Head(l, _) => {
                Some(l)
            }
        }
    }
}

impl From<common::kinds::State> for Site {
    fn from(state: common::kinds::State) -> Self {
        use common::kinds::State;
        match state {
            State::Block(l) => Site::Block(l),
            State::Mlp(l) => Site::Mlp(l),
            State::Attn(l) => Site::Attn(l),
            State::Head(l, h) => Site::Head(l, h),
        }
    }
}

/// How an [`EmbedEdit`] combines its values with the embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedOp {
    /// `x += values`, computed in the values' dtype and rounded once to the model's dtype.
    /// Noise in f64 added to f32 embeddings is thus what PyTorch's in-place
    /// `x[rows, b:e] += noise` computes.
    Add,
    /// `x = values` (rounded to the model's dtype).
    Replace,
}

/// An edit of the token embeddings of some rows over a range of tokens.
#[derive(Debug, Clone)]
pub struct EmbedEdit {
    /// Batch rows to edit.
    pub rows: Vec<usize>,
    /// Token positions to edit.
    pub tokens: Range<usize>,
    /// Add or replace.
    pub op: EmbedOp,
    /// Shape `(rows.len(), tokens.len(), d_model)`, or `(1, tokens.len(), d_model)` to use
    /// the same values for every row. Any float dtype.
    pub values: Tensor,
}

/// An overwrite of a state at chosen rows and tokens.
#[derive(Debug, Clone)]
pub struct Patch {
    /// Where; not [`Site::Embed`] (use an [`EmbedEdit`]).
    pub site: Site,
    /// Batch rows to overwrite.
    pub rows: Vec<usize>,
    /// Token positions to overwrite (absolute).
    pub tokens: Vec<usize>,
    /// Shape `(rows.len(), tokens.len(), d_model)`, or `(1, tokens.len(), d_model)` to write
    /// the same values into every row (e.g. a clean state restored into every corrupted row).
    pub values: Tensor,
}

/// An overwrite of a state at chosen rows and tokens with the same state of another row of
/// the same pass: ROME's `h[1:, t] = h[0, t]`, which restores the clean row's value computed
/// in the very batch being run.
#[derive(Debug, Clone)]
pub struct RowCopy {
    /// Where; not [`Site::Embed`].
    pub site: Site,
    /// The row whose values are copied.
    pub from_row: usize,
    /// Rows to overwrite.
    pub rows: Vec<usize>,
    /// Token positions (absolute).
    pub tokens: Vec<usize>,
}

/// A request to return a state for chosen tokens, for every row.
#[derive(Debug, Clone)]
pub struct Capture {
    /// Where.
    pub site: Site,
    /// Token positions (absolute), in the order the result should have them.
    pub tokens: Vec<usize>,
}

/// Everything a forward pass should do besides computing the plain forward.
#[derive(Debug, Clone, Default)]
pub struct Interventions {
    /// Edits of the token embeddings, applied in order.
    pub embed: Vec<EmbedEdit>,
    /// Overwrites, applied in order at their site (a later one wins where two overlap).
    pub patches: Vec<Patch>,
    /// Copies between rows, applied at their site after the patches.
    pub copies: Vec<RowCopy>,
    /// States to return; the results come back in this order.
    pub captures: Vec<Capture>,
}

impl Interventions {
    /// Interventions that do nothing.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds a capture and returns its index in [`crate::forward::ForwardOutput::captures`].
    pub fn capture(&mut self, site: Site, tokens: Vec<usize>) -> usize {
        self.captures.push(Capture { site, tokens });
        self.captures.len() - 1
    }

    /// The deepest layer any patch, copy or capture touches.
    pub(crate) fn deepest_layer(&self) -> Option<usize> {
        let patch_layers = self.patches.iter().filter_map(|p| p.site.layer());
        let copy_layers = self.copies.iter().filter_map(|c| c.site.layer());
        patch_layers
            .chain(copy_layers)
            .chain(self.captures.iter().filter_map(|c| c.site.layer()))
            .max()
    }

    /// Every site a patch, copy or capture names.
    pub(crate) fn sites(&self) -> impl Iterator<Item = Site> + '_ {
        let patches = self.patches.iter().map(|p| p.site);
        patches
            .chain(self.copies.iter().map(|c| c.site))
            .chain(self.captures.iter().map(|c| c.site))
    }
}

/// Row-major indices `row * seq_len + (token - pos0)` into a `(b_sz * seq_len, d)` view of a
/// `(b_sz, seq_len, d)` state whose first token is at absolute position `pos0`.
pub(crate) struct FlatIndex {
    /// One entry per (row, token) pair, rows outermost.
    pub(crate) indices: Vec<u32>,
}

impl FlatIndex {
    /// Checks rows and tokens against the state's extent and builds the indices.
    pub(crate) fn new(
        what: &str,
        rows: &[usize],
        tokens: impl Iterator<Item = usize> + Clone,
        b_sz: usize,
        pos0: usize,
        seq_len: usize,
    ) -> Result<Self> {
        let mut indices = Vec::new();
        for &row in rows {
            if row >= b_sz {
                bail_request!("{what}: row {row} is outside the batch of {b_sz} rows");
            }
            for token in tokens.clone() {
                if token < pos0 || token >= pos0 + seq_len {
                    bail_request!(
                        "{what}: token {token} is outside the computed tokens {pos0}..{}",
                        pos0 + seq_len
                    );
                }
                let flat = row * seq_len + (token - pos0);
                indices.push(u32::try_from(flat).map_err(|_| {
                    crate::error::Error::Request(format!("{what}: state too large to index"))
                })?);
            }
        }
        Ok(Self { indices })
    }

    fn tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::new(self.indices.as_slice(), device)?)
    }
}

/// Brings `values` of shape `(n_rows or 1, n_tokens, d)` to `(n_rows * n_tokens, d)`.
fn flatten_values(
    what: &str,
    values: &Tensor,
    n_rows: usize,
    n_tokens: usize,
    d: usize,
) -> Result<Tensor> {
    let dims = values.dims();
    let ok = dims.len() == 3
        && (dims[0] == n_rows || dims[0] == 1)
        && dims[1] == n_tokens
        && dims[2] == d;
    if !ok {
        bail_request!(
            "{what}: values have shape {dims:?}, expected ({n_rows} or 1, {n_tokens}, {d})"
        );
    }
    let values = if dims[0] == n_rows {
        values.clone()
    } else {
        values.broadcast_as((n_rows, n_tokens, d))?
    };
    Ok(values.reshape((n_rows * n_tokens, d))?)
}

/// Overwrites rows `index` of the flattened state with `values` (the parts stacked): an exact
/// copy, so writing a state's own value back changes nothing, bit for bit. Filled in parallel
/// ([`copies::overwrite_rows`]); a row written twice keeps its last value.
fn overwrite(xs: &Tensor, index: &FlatIndex, values: &[&Tensor]) -> Result<Tensor> {
    let (b_sz, seq_len, d) = xs.dims3()?;
    let flat = xs.reshape((b_sz * seq_len, d))?;
    Ok(copies::overwrite_rows(&flat, &index.indices, values)?.reshape((b_sz, seq_len, d))?)
}

/// [`overwrite`] as one candle scatter: the plain path of [`apply_patches_in_order`].
fn overwrite_plain(xs: &Tensor, index: &FlatIndex, values: &Tensor) -> Result<Tensor> {
    let (b_sz, seq_len, d) = xs.dims3()?;
    let flat = xs.reshape((b_sz * seq_len, d))?;
    let out = copies::overwrite_rows_reference(&flat, &index.indices, &[values])?;
    Ok(out.reshape((b_sz, seq_len, d))?)
}

/// Applies an embedding edit to token embeddings `xs` of shape `(b_sz, seq_len, d)`.
pub(crate) fn apply_embed_edit(xs: &Tensor, edit: &EmbedEdit) -> Result<Tensor> {
    let (b_sz, seq_len, d) = xs.dims3()?;
    let index =
        FlatIndex::new("embedding edit", &edit.rows, edit.tokens.clone(), b_sz, 0, seq_len)?;
    let values =
        flatten_values("embedding edit", &edit.values, edit.rows.len(), edit.tokens.len(), d)?;
    let new = match edit.op {
        EmbedOp::Replace => values,
        EmbedOp::Add => {
            let current =
                xs.reshape((b_sz * seq_len, d))?.index_select(&index.tensor(xs.device())?, 0)?;
            let wide = promote(xs.dtype(), values.dtype());
            (current.to_dtype(wide)? + values.to_dtype(wide)?)?
        }
    };
    overwrite(xs, &index, &[&new])
}

/// The dtype an addition of `a` and `b` is computed in: the wider of the two.
fn promote(a: DType, b: DType) -> DType {
    if a.size_in_bytes() >= b.size_in_bytes() { a } else { b }
}

/// Applies every patch of `site` to the state `xs` (`(b_sz, seq_len, d)`, first token at `pos0`).
/// Patches that write disjoint places are applied in one overwrite: each overwrite copies the
/// whole state, and a batch of many restored tokens has a patch per (site, token). Patches
/// that overlap are applied one by one in order, the last one winning, as
/// [`apply_patches_in_order`] does (the reference; a test holds the two equal).
pub(crate) fn apply_patches(
    xs: Tensor,
    site: Site,
    patches: &[Patch],
    pos0: usize,
) -> Result<Tensor> {
    let (indices, values) = patch_parts(&xs, site, patches, pos0)?;
    match values.len() {
        0 => return Ok(xs),
        // One patch: one overwrite, as in order.
        1 => {}
        // Overlapping patches: in order (the parallel overwrite would agree on the CPU, but a
        // scatter elsewhere does not promise which duplicate wins).
        _ if !all_distinct(&indices, xs.elem_count() / xs.dim(2)?) => {
            return apply_patches_in_order(xs, site, patches, pos0);
        }
        _ => {}
    }
    overwrite(&xs, &FlatIndex { indices }, &values.iter().collect::<Vec<_>>())
}

/// Whether no flat index (each below `len`) occurs twice: a bitmap, one pass.
fn all_distinct(indices: &[u32], len: usize) -> bool {
    let mut seen = vec![0u64; len.div_ceil(64)];
    indices.iter().all(|&i| {
        let (word, bit) = (i as usize / 64, 1u64 << (i % 64));
        let fresh = seen[word] & bit == 0;
        seen[word] |= bit;
        fresh
    })
}

/// The checked flat indices of every patch of `site`, concatenated, and each patch's values
/// as `(rows × tokens, d)` in the state's dtype.
fn patch_parts(
    xs: &Tensor,
    site: Site,
    patches: &[Patch],
    pos0: usize,
) -> Result<(Vec<u32>, Vec<Tensor>)> {
    let (b_sz, seq_len, d) = xs.dims3()?;
    let (mut indices, mut values) = (Vec::new(), Vec::new());
    for patch in patches.iter().filter(|p| p.site == site) {
        let what = format!("patch at {site:?}");
        let index =
            FlatIndex::new(&what, &patch.rows, patch.tokens.iter().copied(), b_sz, pos0, seq_len)?;
        let v = flatten_values(&what, &patch.values, patch.rows.len(), patch.tokens.len(), d)?;
        indices.extend(index.indices);
        values.push(v.to_dtype(xs.dtype())?);
    }
    Ok((indices, values))
}

/// [`apply_patches`] one patch at a time, in order: the plain path.
pub(crate) fn apply_patches_in_order(
    xs: Tensor,
    site: Site,
    patches: &[Patch],
    pos0: usize,
) -> Result<Tensor> {
    let mut xs = xs;
    for patch in patches.iter().filter(|p| p.site == site) {
        let (b_sz, seq_len, d) = xs.dims3()?;
        let what = format!("patch at {site:?}");
        let index =
            FlatIndex::new(&what, &patch.rows, patch.tokens.iter().copied(), b_sz, pos0, seq_len)?;
        let values = flatten_values(&what, &patch.values, patch.rows.len(), patch.tokens.len(), d)?;
        xs = overwrite_plain(&xs, &index, &values)?;
    }
    Ok(xs)
}

/// Applies every row copy of `site` to the state `xs` (`(b_sz, seq_len, d)`, first token at
/// `pos0`).
pub(crate) fn apply_copies(
    xs: Tensor,
    site: Site,
    copies: &[RowCopy],
    pos0: usize,
) -> Result<Tensor> {
    let mut xs = xs;
    for copy in copies.iter().filter(|c| c.site == site) {
        let (b_sz, seq_len, d) = xs.dims3()?;
        let what = format!("row copy at {site:?}");
        let source = FlatIndex::new(
            &what,
            &[copy.from_row],
            copy.tokens.iter().copied(),
            b_sz,
            pos0,
            seq_len,
        )?;
        let index =
            FlatIndex::new(&what, &copy.rows, copy.tokens.iter().copied(), b_sz, pos0, seq_len)?;
        let values =
            xs.reshape((b_sz * seq_len, d))?.index_select(&source.tensor(xs.device())?, 0)?;
        let values =
            flatten_values(&what, &values.unsqueeze(0)?, copy.rows.len(), copy.tokens.len(), d)?;
        xs = overwrite(&xs, &index, &[&values])?;
    }
    Ok(xs)
}

/// Reads the captured tokens of `xs` (`(b_sz, seq_len, d)`, first token at `pos0`) as
/// `(b_sz, tokens.len(), d)`.
pub(crate) fn read_capture(xs: &Tensor, capture: &Capture, pos0: usize) -> Result<Tensor> {
    let (_, seq_len, _) = xs.dims3()?;
    let mut local = Vec::with_capacity(capture.tokens.len());
    for &token in &capture.tokens {
        if token < pos0 || token >= pos0 + seq_len {
            bail_request!(
                "capture at {:?}: token {token} is outside the computed tokens {pos0}..{}",
                capture.site,
                pos0 + seq_len
            );
        }
        local.push(u32::try_from(token - pos0).unwrap_or(u32::MAX));
    }
    // A contiguous run (the common case) is a cheap narrow; anything else an index_select.
    let contiguous_run = local.windows(2).all(|w| w[1] == w[0] + 1);
    if contiguous_run && !local.is_empty() {
        let start = local[0] as usize;
        return Ok(xs.i((.., start..start + local.len(), ..))?.contiguous()?);
    }
    let idx = Tensor::new(local.as_slice(), xs.device())?;
    Ok(xs.contiguous()?.index_select(&idx, 1)?)
}

/// Applies the patches and row copies of the `Head(layer, h)` sites to `z`, the heads'
/// outputs `(b_sz, seq_len, n_heads × head_dim)` whose first token is at `pos0`. Each head is
/// a column slice of `z`; it is addressed as rows of the `(b_sz, seq_len × n_heads,
/// head_dim)` view, so the overwrite is the same exact copy as at any other site.
pub(crate) fn apply_head_sites(
    z: Tensor,
    layer: usize,
    n_heads: usize,
    iv: &Interventions,
    pos0: usize,
) -> Result<Tensor> {
    let here = |site: Site| matches!(site, Site::Head(l, _) if l == layer);
    if !iv.patches.iter().any(|p| here(p.site)) && !iv.copies.iter().any(|c| here(c.site)) {
        return Ok(z);
    }
    let (b_sz, seq_len, width) = z.dims3()?;
    if n_heads == 0 || width % n_heads != 0 {
        bail_request!("heads of layer {layer}: width {width} is not {n_heads} heads");
    }
    let head_dim = width / n_heads;
    let mut view = z.contiguous()?.reshape((b_sz, seq_len * n_heads, head_dim))?;
    // Tokens become rows of the view: (token - pos0) × n_heads + h, first row 0.
    let map = |site: Site, h: usize, tokens: &[usize]| -> Result<Vec<usize>> {
        tokens
            .iter()
            .map(|&t| {
                if t < pos0 || t >= pos0 + seq_len {
                    bail_request!(
                        "{site:?}: token {t} is outside the computed tokens {pos0}..{}",
                        pos0 + seq_len
                    );
                }
                Ok((t - pos0) * n_heads + h)
            })
            .collect()
    };
    for h in 0..n_heads {
        let site = Site::Head(layer, h);
        let patches = iv
            .patches
            .iter()
            .filter(|p| p.site == site)
            .map(|p| Ok(Patch { tokens: map(site, h, &p.tokens)?, ..p.clone() }))
            .collect::<Result<Vec<_>>>()?;
        view = apply_patches(view, site, &patches, 0)?;
        let copies = iv
            .copies
            .iter()
            .filter(|c| c.site == site)
            .map(|c| Ok(RowCopy { tokens: map(site, h, &c.tokens)?, ..c.clone() }))
            .collect::<Result<Vec<_>>>()?;
        view = apply_copies(view, site, &copies, 0)?;
    }
    Ok(view.reshape((b_sz, seq_len, width))?)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random(rng: &mut StdRng, shape: (usize, usize, usize)) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32")
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// Random patches of one site, as the fast path makes them: each a set of rows at one
    /// token (or a shared row broadcast), some at another site to be left out.
    fn patches(rng: &mut StdRng, b: usize, seq: usize, d: usize, pos0: usize) -> Vec<Patch> {
        let mut out = Vec::new();
        for _ in 0..rng.random_range(1..6) {
            let token = pos0 + rng.random_range(0..seq);
            let rows: Vec<usize> = (0..b).filter(|_| rng.random_bool(0.5)).collect();
            if rows.is_empty() {
                continue;
            }
            let shared = rng.random_bool(0.3);
            let values = random(rng, (if shared { 1 } else { rows.len() }, 1, d));
            let site = if rng.random_bool(0.2) { Site::Mlp(1) } else { Site::Block(0) };
            out.push(Patch { site, rows, tokens: vec![token], values });
        }
        out
    }

    #[test]
    fn one_scatter_equals_patches_one_by_one() {
        let mut rng = StdRng::seed_from_u64(7);
        let (mut merged, mut overlapping) = (0, 0);
        for _ in 0..300 {
            let (b, seq, d, pos0) = (rng.random_range(1..6), rng.random_range(1..5), 8, 2);
            let xs = random(&mut rng, (b, seq, d));
            let ps = patches(&mut rng, b, seq, d, pos0);
            let fast = apply_patches(xs.clone(), Site::Block(0), &ps, pos0).expect("fast");
            let plain = apply_patches_in_order(xs, Site::Block(0), &ps, pos0).expect("plain");
            assert_eq!(bits(&fast), bits(&plain), "{ps:?}");
            let (indices, _) = patch_parts(&fast, Site::Block(0), &ps, pos0).expect("parts");
            if all_distinct(&indices, b * seq) { merged += 1 } else { overlapping += 1 }
        }
        // Both branches ran: disjoint patches in one scatter, overlapping ones in order.
        assert!(merged > 50 && overlapping > 50, "{merged} merged, {overlapping} overlapping");
    }

    #[test]
    fn a_patch_outside_the_state_is_refused_either_way() {
        let mut rng = StdRng::seed_from_u64(1);
        let xs = random(&mut rng, (2, 3, 4));
        let bad = Patch {
            site: Site::Block(0),
            rows: vec![2],
            tokens: vec![0],
            values: random(&mut rng, (1, 1, 4)),
        };
        let good = Patch {
            site: Site::Block(0),
            rows: vec![0],
            tokens: vec![1],
            values: random(&mut rng, (1, 1, 4)),
        };
        let ps = [good, bad];
        assert!(apply_patches(xs.clone(), Site::Block(0), &ps, 0).is_err());
        assert!(apply_patches_in_order(xs, Site::Block(0), &ps, 0).is_err());
    }
}
