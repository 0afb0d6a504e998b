//! The one forward entry point, shared by every architecture.
//!
//! Every family here is a decoder whose block is one of two shapes ([`Residual`]):
//! sequential, `x += post_attn(attn(x)); x += post_mlp(mlp(x))`, or parallel (GPT-J,
//! GPT-NeoX), `x += post_attn(attn(x)) + post_mlp(mlp(x))`, where `attn` and `mlp` include
//! their input norms and the `post_*` norms are the identity except in Gemma 2/3 and OLMo 2.
//! So the layer loop, the interventions, the key/value cache and the LM head are written once,
//! and each family supplies its sublayers through [`Decoder`].
//!
//! The sites are where ROME's `layername` hooks a module's output: `Attn(l)` and `Mlp(l)` are
//! the sublayer outputs *before* any post-norm (transformers' `self_attn`/`mlp` modules),
//! `Block(l)` is the residual stream after the whole block, `Embed` is what the embedding
//! module returns (scaled by √d in Gemma).
//!
//! A forward pass either starts from token ids ([`Start::Tokens`]) or resumes from a prefix
//! ([`Start::Resume`]): the residual stream entering layer `l` for tokens `t..T`, plus the
//! keys and values of tokens `< t` for layers `>= l`. Restoring a state at (t, l) changes
//! nothing before token t or below layer l, so causal tracing computes only that suffix.

use candle_core::{D, Tensor};

use crate::error::{Error, Result, bail_request};
use crate::intervene::{self, Interventions, Site};
use crate::models::residual::add;

/// The sizes every architecture has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dims {
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Query heads per attention layer.
    pub n_heads: usize,
    /// Width of one head's output (`Site::Head`).
    pub head_dim: usize,
    /// Rows of the LM head.
    pub vocab_size: usize,
    /// Longest sequence the model supports (position embeddings or RoPE's trained length).
    pub max_positions: usize,
}

/// Keys and values of one attention layer, after RoPE where the model has it.
#[derive(Debug, Clone)]
pub struct LayerKv {
    /// `(b_sz, n_kv_heads, seq_len, head_dim)`.
    pub k: Tensor,
    /// `(b_sz, n_kv_heads, seq_len, head_dim)`.
    pub v: Tensor,
}

impl LayerKv {
    /// Number of tokens held.
    pub fn len(&self) -> usize {
        self.k.dims().get(2).copied().unwrap_or(0)
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The keys and values of every layer a forward pass computed.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Indexed by layer; `None` for layers the pass did not run.
    pub layers: Vec<Option<LayerKv>>,
}

impl KvCache {
    /// The first `len` tokens of every layer.
    pub fn narrow_tokens(&self, len: usize) -> Result<Self> {
        self.map(|kv| Ok(LayerKv { k: kv.k.narrow(2, 0, len)?, v: kv.v.narrow(2, 0, len)? }))
    }

    /// The given batch rows (u32 indices, repetitions allowed) of every layer.
    pub fn index_rows(&self, rows: &Tensor) -> Result<Self> {
        // index_select needs contiguous input; a narrowed cache is not.
        self.map(|kv| {
            Ok(LayerKv {
                k: kv.k.contiguous()?.index_select(rows, 0)?,
                v: kv.v.contiguous()?.index_select(rows, 0)?,
            })
        })
    }

    /// The keys and values of `layer`, which must hold `len` tokens.
    pub fn layer(&self, layer: usize, len: usize) -> Result<&LayerKv> {
        match self.layers.get(layer).and_then(Option::as_ref) {
            Some(kv) if kv.len() == len => Ok(kv),
            Some(kv) => {
                bail_request!("past of layer {layer} holds {} tokens, expected {len}", kv.len())
            }
            None => bail_request!("past has no keys and values for layer {layer}"),
        }
    }

    fn map(&self, f: impl Fn(&LayerKv) -> Result<LayerKv>) -> Result<Self> {
        let layers =
            self.layers.iter().map(|kv| kv.as_ref().map(&f).transpose()).collect::<Result<_>>()?;
        Ok(Self { layers })
    }
}

/// Where a forward pass starts.
#[derive(Debug, Clone)]
pub enum Start<'a> {
    /// Token ids `(b_sz, seq_len)`, u32: the full forward.
    Tokens(&'a Tensor),
    /// The suffix of a forward whose prefix was computed before.
    Resume {
        /// First layer to run.
        layer: usize,
        /// Absolute position of the first token of `hidden`.
        pos: usize,
        /// The residual stream entering `layer` at tokens `pos..`: `(b_sz, seq_len - pos, d)`.
        hidden: Tensor,
        /// Keys and values of tokens `< pos` for every layer `>= layer`, one row per row of
        /// `hidden`. Unused when `pos == 0`.
        past: &'a KvCache,
    },
}

/// Which logits to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Logits {
    /// None: a pass run only for its captures stops after the deepest layer it needs.
    None,
    /// The last position only, `(b_sz, vocab)`: all a next-token probability needs.
    #[default]
    Last,
    /// Every computed position, `(b_sz, seq_len, vocab)`.
    All,
}

/// A forward pass: where it starts, what it changes and reads, what it returns.
#[derive(Debug, Clone)]
pub struct ForwardRequest<'a> {
    /// Token ids or a prefix to resume from.
    pub start: Start<'a>,
    /// Edits, patches and captures.
    pub interventions: &'a Interventions,
    /// Which logits to compute.
    pub logits: Logits,
    /// Whether to return the keys and values of every layer run (to resume from later).
    pub keep_kv: bool,
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct ForwardOutput {
    /// As asked by [`ForwardRequest::logits`], in f32.
    pub logits: Option<Tensor>,
    /// One tensor `(b_sz, tokens, d)` per capture, in request order.
    pub captures: Vec<Tensor>,
    /// Keys and values (full length, prefix included) when [`ForwardRequest::keep_kv`].
    pub kv: Option<KvCache>,
}

/// How a block adds its two sublayers to the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residual {
    /// `x += attn(x)`, then `x += mlp(x)`: the MLP reads the stream after attention.
    Sequential,
    /// `x += attn(x) + mlp(x)`: both read the block's input (GPT-J; GPT-NeoX with
    /// `use_parallel_residual`).
    Parallel,
}

/// The parts of a decoder that differ between families.
pub(crate) trait Decoder {
    /// The model's sizes.
    fn dims(&self) -> &Dims;
    /// Token embeddings `(b_sz, seq_len, d)` of ids `(b_sz, seq_len)`.
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor>;
    /// The residual stream entering layer 0: token embeddings plus position embeddings where
    /// the family has them (GPT-2; rotary families add nothing here). `pos0` is the absolute
    /// position of the first token.
    fn add_positions(&self, xs: Tensor, _pos0: usize) -> Result<Tensor> {
        Ok(xs)
    }
    /// The attention sublayer of `layer` up to its output projection, its input norm
    /// included, on the residual stream `xs`. Returns the heads' outputs side by side,
    /// `(b, t, n_heads × head_dim)` (each head's attention-weighted values), and the layer's
    /// keys and values (`past` included).
    fn attn(
        &self,
        layer: usize,
        xs: &Tensor,
        pos0: usize,
        past: Option<&LayerKv>,
    ) -> Result<(Tensor, LayerKv)>;
    /// The attention's output projection of `layer` on the heads' outputs.
    fn attn_out(&self, layer: usize, heads: &Tensor) -> Result<Tensor>;
    /// The MLP sublayer of `layer`, its input norm included.
    fn mlp(&self, layer: usize, xs: &Tensor) -> Result<Tensor>;
    /// How `layer` adds its sublayers to the residual stream.
    fn residual(&self, _layer: usize) -> Residual {
        Residual::Sequential
    }
    /// What the attention output becomes before the residual add: a norm in Gemma 2/3 and
    /// OLMo 2, the identity elsewhere.
    fn post_attn(&self, _layer: usize, attn: Tensor) -> Result<Tensor> {
        Ok(attn)
    }
    /// What the MLP output becomes before the residual add.
    fn post_mlp(&self, _layer: usize, mlp: Tensor) -> Result<Tensor> {
        Ok(mlp)
    }
    /// Final norm and LM head on `(n, d)` or `(b, t, d)` states.
    fn head(&self, xs: &Tensor) -> Result<Tensor>;
}

/// Runs one forward pass of `model`.
pub(crate) fn run<M: Decoder + ?Sized>(
    model: &M,
    req: &ForwardRequest<'_>,
) -> Result<ForwardOutput> {
    let dims = model.dims();
    let iv = req.interventions;
    validate_sites(iv, dims)?;

    let mut captures: Vec<Option<Tensor>> = vec![None; iv.captures.len()];
    let (mut xs, pos0, first_layer, past) = match &req.start {
        Start::Tokens(ids) => {
            let (_, seq_len) = ids.dims2()?;
            if seq_len == 0 {
                bail_request!("empty token rows");
            }
            if seq_len > dims.max_positions {
                bail_request!(
                    "{seq_len} tokens exceed the model's {} positions",
                    dims.max_positions
                );
            }
            let mut emb = model.embed_tokens(ids)?;
            for edit in &iv.embed {
                emb = intervene::apply_embed_edit(&emb, edit)?;
            }
            record(&mut captures, iv, Site::Embed, &emb, 0)?;
            let input = at_site(&mut captures, iv, Site::Input, model.add_positions(emb, 0)?, 0)?;
            (input, 0, 0, None)
        }
        Start::Resume { layer, pos, hidden, past } => {
            if !iv.embed.is_empty() || iv.sites().any(|s| matches!(s, Site::Embed | Site::Input)) {
                bail_request!(
                    "a resumed forward cannot change or capture the embeddings or the input stream"
                );
            }
            if *layer > dims.n_layers {
                bail_request!(
                    "resume layer {layer} is beyond the model's {} layers",
                    dims.n_layers
                );
            }
            let (_, seq_len, _) = hidden.dims3()?;
            if pos + seq_len > dims.max_positions {
                bail_request!(
                    "{} tokens exceed the model's {} positions",
                    pos + seq_len,
                    dims.max_positions
                );
            }
            (hidden.clone(), *pos, *layer, (*pos > 0).then_some(*past))
        }
    };

    // Without logits, the pass ends once the deepest patch or capture is done.
    let last_layer = match req.logits {
        Logits::None => iv.deepest_layer().map_or(first_layer, |l| l + 1),
        Logits::Last | Logits::All => dims.n_layers,
    };
    let mut kv_out = req.keep_kv.then(|| KvCache { layers: vec![None; dims.n_layers] });
    for layer in first_layer..last_layer {
        let layer_past = match past {
            Some(cache) => Some(cache.layer(layer, pos0)?),
            None => None,
        };
        let (out, kv) = layer_step(model, layer, xs, pos0, layer_past, iv, &mut captures)?;
        xs = out;
        if let Some(cache) = kv_out.as_mut() {
            cache.layers[layer] = Some(kv);
        }
    }

    let logits = match req.logits {
        Logits::None => None,
        Logits::Last => Some(last_position_logits(model, &xs)?),
        Logits::All => Some(model.head(&xs)?),
    };
    let captures = captures
        .into_iter()
        .zip(&iv.captures)
        .map(|(t, c)| {
            t.ok_or_else(|| Error::Request(format!("capture at {:?} was not reached", c.site)))
        })
        .collect::<Result<_>>()?;
    Ok(ForwardOutput { logits, captures, kv: kv_out })
}

thread_local! {
    /// Blocks run by this thread so far, every forward and resumed suffix together: what a
    /// benchmark or a test reads before and after a trace (which runs its blocks on the
    /// calling thread) to count its batched layer calls. Each is a few dozen kernels, so on a
    /// GPU their number bounds the launch overhead. Per thread, so that tests running side
    /// by side do not count each other's.
    static LAYER_CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The number of blocks this thread has run, every forward and resumed suffix together.
pub fn layer_calls() -> u64 {
    LAYER_CALLS.with(|c| c.get())
}

/// One block: attention and MLP with their residual adds, and the interventions of their
/// sites. Returns the block's output and its keys and values (`past` included).
pub(crate) fn layer_step<M: Decoder + ?Sized>(
    model: &M,
    layer: usize,
    xs: Tensor,
    pos0: usize,
    past: Option<&LayerKv>,
    iv: &Interventions,
    captures: &mut [Option<Tensor>],
) -> Result<(Tensor, LayerKv)> {
    LAYER_CALLS.with(|c| c.set(c.get() + 1));
    let (heads, kv) = model.attn(layer, &xs, pos0, past)?;
    // All heads' patches and copies, then single heads', then the captures of both, so a
    // capture of the heads sees a patched head.
    let site = Site::Heads(layer);
    let heads = intervene::apply_patches(heads, site, &iv.patches, pos0)?;
    let heads = intervene::apply_copies(heads, site, &iv.copies, pos0)?;
    let n_heads = model.dims().n_heads;
    let heads = intervene::apply_head_sites(heads, layer, n_heads, iv, pos0)?;
    record(captures, iv, site, &heads, pos0)?;
    record_heads(captures, iv, layer, n_heads, &heads, pos0)?;
    let attn = model.attn_out(layer, &heads)?;
    let attn = at_site(captures, iv, Site::Attn(layer), attn, pos0)?;
    let attn = model.post_attn(layer, attn)?;
    let out = match model.residual(layer) {
        Residual::Sequential => {
            let xs = add(&xs, &attn)?;
            let mlp = at_site(captures, iv, Site::Mlp(layer), model.mlp(layer, &xs)?, pos0)?;
            add(&xs, &model.post_mlp(layer, mlp)?)?
        }
        Residual::Parallel => {
            let mlp = at_site(captures, iv, Site::Mlp(layer), model.mlp(layer, &xs)?, pos0)?;
            // GPT-J and GPT-NeoX: attn + mlp + residual, in that order.
            add(&add(&attn, &model.post_mlp(layer, mlp)?)?, &xs)?
        }
    };
    let xs = at_site(captures, iv, Site::Block(layer), out, pos0)?;
    Ok((xs, kv))
}

/// Logits `(b, vocab)` of the last position of `xs` `(b, t, d)`.
pub(crate) fn last_position_logits<M: Decoder + ?Sized>(model: &M, xs: &Tensor) -> Result<Tensor> {
    let (_, seq_len, _) = xs.dims3()?;
    model.head(&xs.narrow(1, seq_len - 1, 1)?.squeeze(1)?)
}

/// Patches, copies, then captures the state at `site`.
fn at_site(
    captures: &mut [Option<Tensor>],
    iv: &Interventions,
    site: Site,
    xs: Tensor,
    pos0: usize,
) -> Result<Tensor> {
    let xs = intervene::apply_patches(xs, site, &iv.patches, pos0)?;
    let xs = intervene::apply_copies(xs, site, &iv.copies, pos0)?;
    record(captures, iv, site, &xs, pos0)?;
    Ok(xs)
}

fn record(
    captures: &mut [Option<Tensor>],
    iv: &Interventions,
    site: Site,
    xs: &Tensor,
    pos0: usize,
) -> Result<()> {
    for (slot, capture) in captures.iter_mut().zip(&iv.captures) {
        if capture.site == site {
            *slot = Some(intervene::read_capture(xs, capture, pos0)?);
        }
    }
    Ok(())
}

/// Captures of single heads: column slices of the heads' outputs `(b, t, n_heads × d_head)`.
fn record_heads(
    captures: &mut [Option<Tensor>],
    iv: &Interventions,
    layer: usize,
    n_heads: usize,
    heads: &Tensor,
    pos0: usize,
) -> Result<()> {
    for (slot, capture) in captures.iter_mut().zip(&iv.captures) {
        if let Site::Head(l, h) = capture.site
            && l == layer
        {
            let head_dim = heads.dim(2)? / n_heads.max(1);
            let one = heads.narrow(2, h * head_dim, head_dim)?;
            *slot = Some(intervene::read_capture(&one, capture, pos0)?);
        }
    }
    Ok(())
}

fn validate_sites(iv: &Interventions, dims: &Dims) -> Result<()> {
    let n_layers = dims.n_layers;
    for site in iv.sites() {
        if let Some(layer) = site.layer().filter(|&l| l >= n_layers) {
            bail_request!("{site:?}: layer {layer} is beyond the model's {n_layers} layers");
        }
        if let Site::Head(_, h) = site
            && h >= dims.n_heads
        {
            bail_request!("{site:?}: the model has {} heads per layer", dims.n_heads);
        }
    }
    if iv.patches.iter().any(|p| p.site == Site::Embed)
        || iv.copies.iter().any(|c| c.site == Site::Embed)
    {
        bail_request!("patch at Embed: use an embedding edit to change the embeddings");
    }
    Ok(())
}

/// Softmax over the last dimension in f32: next-token probabilities from logits.
pub fn probabilities(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(&logits.to_dtype(candle_core::DType::F32)?, D::Minus1)?)
}
