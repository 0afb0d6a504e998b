//! Building blocks shared by the model families: linear layers, causal attention over a
//! key/value prefix, and the tracing spans around them.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::copies;
use super::gpt2::Activation;
use super::packed::PackedWeight;
use crate::error::Result;
use crate::forward::LayerKv;
use crate::weights::Weights;

/// `y = x W + b` with `W` stored as `(in, out)`.
///
/// Hugging Face `Linear` weights are `(out, in)` and GPT-2's `Conv1D` weights are `(in, out)`;
/// both are kept as an `(in, out)` view of the stored tensor, or, for f32 on a CPU whose
/// kernel `packed.rs` has, packed once for that kernel (the tensor is then dropped).
#[derive(Clone)]
pub(crate) struct Linear {
    w: Weight,
    bias: Option<Tensor>,
    span: tracing::Span,
}

#[derive(Clone)]
enum Weight {
    InOut(Tensor),
    Packed(Arc<PackedWeight>),
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, (k, n)) = match &self.w {
            Weight::InOut(w) => ("in-out", w.dims2().unwrap_or_default()),
            Weight::Packed(p) => ("packed", p.dims()),
        };
        write!(f, "Linear({k} -> {n}, {kind}, bias: {})", self.bias.is_some())
    }
}

impl Linear {
    /// From a Hugging Face `Linear` weight `(out, in)`, packed where the CPU kernel runs.
    pub(crate) fn from_out_in(weight: Tensor, bias: Option<Tensor>, name: &str) -> Result<Self> {
        Self::from_in_out(weight.t()?, bias, name)
    }

    /// From an `(in, out)` weight, e.g. GPT-2's `Conv1D`, packed where the CPU kernel runs.
    pub(crate) fn from_in_out(w_in_out: Tensor, bias: Option<Tensor>, name: &str) -> Result<Self> {
        let w = match PackedWeight::pack(&w_in_out)? {
            Some(packed) => Weight::Packed(Arc::new(packed)),
            None => Weight::InOut(w_in_out),
        };
        Ok(Self { w, bias, span: tracing::trace_span!("linear", name) })
    }

    /// A tied LM head over the token table `(vocab, d)`, and the table the model looks its
    /// inputs up in. Where the CPU kernel runs, the head is packed and the table becomes
    /// the packed copy read back ([`TokenTable::Packed`]), so the vocabulary is held once;
    /// elsewhere both use the tensor.
    pub(crate) fn tied(
        table: Tensor,
        bias: Option<Tensor>,
        name: &str,
    ) -> Result<(TokenTable, Self)> {
        let span = tracing::trace_span!("linear", name);
        Ok(match PackedWeight::pack(&table.t()?)? {
            Some(packed) => {
                let packed = Arc::new(packed);
                let head = Self { w: Weight::Packed(packed.clone()), bias, span };
                (TokenTable::Packed(packed), head)
            }
            None => {
                let head = Self { w: Weight::InOut(table.t()?), bias, span };
                (TokenTable::Tensor(table), head)
            }
        })
    }

    /// `(in, out)`.
    fn dims(&self) -> Result<(usize, usize)> {
        Ok(match &self.w {
            Weight::InOut(w) => w.dims2()?,
            Weight::Packed(p) => p.dims(),
        })
    }

    /// SwiGLU of the layer's output, `silu(y[…, :half]) · y[…, half:]`, computed as the
    /// product leaves the kernel where the weight is packed (and there is no bias); `None`
    /// otherwise, for the caller to take [`Self::forward`] and `ops::silu_mul`.
    pub(crate) fn forward_silu_mul(&self, xs: &Tensor, half: usize) -> Result<Option<Tensor>> {
        let (Weight::Packed(p), None) = (&self.w, &self.bias) else { return Ok(None) };
        let _enter = self.span.enter();
        let mut dims = xs.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(0);
        let rows = xs.elem_count() / in_dim.max(1);
        let Some(ys) = p.matmul_silu_mul(&xs.reshape((rows, in_dim))?, half)? else {
            return Ok(None);
        };
        if let Some(last) = dims.last_mut() {
            *last = half;
        }
        Ok(Some(ys.reshape(dims)?))
    }

    /// Applies the layer to `(…, in)`.
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let dims = xs.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(0);
        let rows = xs.elem_count() / in_dim.max(1);
        let xs = xs.reshape((rows, in_dim))?;
        let ys = match &self.w {
            Weight::InOut(w) => super::matmul::matmul(&xs, w)?,
            Weight::Packed(p) => p.matmul(&xs)?,
        };
        let ys = match &self.bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        };
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.dims()?.1;
        }
        Ok(ys.reshape(out_dims)?)
    }
}

/// Scaled dot-product attention of queries `q` `(b, n_heads, t_q, head_dim)` for absolute
/// positions `pos0..pos0 + t_q` over keys and values `(b, n_kv_heads, pos0 + t_q, head_dim)`
/// (grouped-query attention when `n_kv_heads < n_heads`), causal, and limited to the last
/// `window` positions when the model has a sliding window.
pub(crate) fn causal_attention(
    q: &Tensor,
    kv: &LayerKv,
    pos0: usize,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    causal_attention_capped(q, kv, pos0, scale, window, None)
}

/// [`causal_attention`] with Gemma 2's soft-capping of the scaled scores, `c · tanh(s / c)`,
/// before the mask (as transformers' `eager_attention_forward` applies it).
pub(crate) fn causal_attention_capped(
    q: &Tensor,
    kv: &LayerKv,
    pos0: usize,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b_sz, n_heads, t_q, head_dim) = q.dims4()?;
    let (_, n_kv_heads, t_k, _) = kv.k.dims4()?;
    let n_rep = n_heads / n_kv_heads;
    // Queries of the heads that share a key/value head are stacked along the sequence axis so
    // that one matmul per kv head serves them all, without copying keys n_rep times.
    let q = q.reshape((b_sz, n_kv_heads, n_rep * t_q, head_dim))?;
    // Scores, mask and softmax in f32 whatever the model's dtype, as transformers does.
    let scores = (q.matmul(&kv.k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let scores = match softcap {
        Some(cap) => ((scores / cap)?.tanh()? * cap)?,
        None => scores,
    };
    let scores = match causal_mask(t_q, t_k, pos0, window, q.device())? {
        Some(mask) => scores
            .reshape((b_sz, n_kv_heads, n_rep, t_q, t_k))?
            .broadcast_add(&mask)?
            .reshape((b_sz, n_kv_heads, n_rep * t_q, t_k))?,
        None => scores,
    };
    let probs =
        candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(kv.v.dtype())?;
    let out = probs.matmul(&kv.v)?;
    Ok(out.reshape((b_sz, n_heads, t_q, head_dim))?)
}

/// Additive mask `(t_q, t_k)`: 0 where query `pos0 + i` may see key `j`, -inf elsewhere.
/// `None` when every query sees every key (one query at the end, no window in the way).
fn causal_mask(
    t_q: usize,
    t_k: usize,
    pos0: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let window_bites = window.is_some_and(|w| t_k > w);
    if t_q == 1 && !window_bites {
        return Ok(None);
    }
    let mut mask = vec![0f32; t_q * t_k];
    for i in 0..t_q {
        let q_pos = pos0 + i;
        for j in 0..t_k {
            let future = j > q_pos;
            // transformers' sliding window keeps keys with q_pos - j < window.
            let too_old = window.is_some_and(|w| q_pos >= j + w);
            if future || too_old {
                mask[i * t_k + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Some(Tensor::from_vec(mask, (t_q, t_k), device)?))
}

/// Rows of the embedding `table` `(vocab, d)` for token ids `(b, t)`: `(b, t, d)`.
pub(crate) fn embed(table: &TokenTable, ids: &Tensor) -> Result<Tensor> {
    let (b_sz, seq_len) = ids.dims2()?;
    let rows = match table {
        TokenTable::Tensor(table) => table.index_select(&ids.flatten_all()?, 0)?,
        TokenTable::Packed(packed) => {
            packed.columns(&ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?)?
        }
    };
    let d = rows.dim(1)?;
    Ok(rows.reshape((b_sz, seq_len, d))?)
}

/// The token table `(vocab, d)` a model looks its inputs up in: a tensor, or the packed copy
/// of the LM head tied to it ([`Linear::tied`]).
#[derive(Clone)]
pub(crate) enum TokenTable {
    Tensor(Tensor),
    Packed(Arc<PackedWeight>),
}

impl From<Tensor> for TokenTable {
    fn from(table: Tensor) -> Self {
        TokenTable::Tensor(table)
    }
}

/// Appends the new keys and values to the prefix's.
pub(crate) fn extend_kv(past: Option<&LayerKv>, k: Tensor, v: Tensor) -> Result<LayerKv> {
    Ok(match past {
        Some(past) if !past.is_empty() => {
            LayerKv { k: copies::cat(&[&past.k, &k], 2)?, v: copies::cat(&[&past.v, &v], 2)? }
        }
        _ => LayerKv { k, v },
    })
}

/// Splits `(b, t, n_heads * head_dim)` into `(b, n_heads, t, head_dim)`, contiguous.
pub(crate) use super::ops::split_heads;

/// Queries, keys and values `(b, heads, t, head_dim)` from the output of a fused q/k/v
/// projection `(b, t, 3 × n_heads × head_dim)` laid out `[q | k | v]` (multi-head attention:
/// as many key/value heads as query heads).
pub(crate) fn split_qkv(
    qkv: &Tensor,
    n_heads: usize,
    head_dim: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = n_heads * head_dim;
    let part = |i: usize| split_heads(&qkv.narrow(2, i * d, d)?, n_heads, head_dim);
    Ok((part(0)?, part(1)?, part(2)?))
}

/// Merges `(b, n_heads, t, head_dim)` back into `(b, t, n_heads * head_dim)`.
pub(crate) fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    let (b_sz, n_heads, seq_len, head_dim) = xs.dims4()?;
    Ok(super::ops::swap_axes_12(xs)?.reshape((b_sz, seq_len, n_heads * head_dim))?)
}

/// LayerNorm with a weight and a bias over the last dimension (GPT-2, GPT-J, GPT-NeoX), as
/// candle's fused kernel computes it.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    /// In f32, as the kernel applies it.
    eps: f32,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`, both `(d)`.
    pub(crate) fn load(w: &Weights, prefix: &str, d: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{prefix}.weight"), &[d])?,
            bias: w.get(&format!("{prefix}.bias"), &[d])?,
            eps,
        })
    }

    /// Normalizes `(…, d)`.
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps)?)
    }
}

/// The MLP activation a config names (`activation_function`, `hidden_act`), as transformers'
/// `ACT2FN` defines it; `None` for one the engine does not implement.
pub(crate) fn activation(name: &str) -> Option<Activation> {
    match name {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
        "gelu" => Some(Activation::GeluErf),
        "relu" => Some(Activation::Relu),
        _ => None,
    }
}

/// The activations [`activation`] accepts, for error messages.
pub(crate) const ACTIVATIONS: &str = "gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu";

/// Applies `act` elementwise.
pub(crate) fn activate(xs: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::GeluTanh => xs.gelu()?,
        Activation::GeluErf => xs.gelu_erf()?,
        Activation::Relu => xs.relu()?,
    })
}
