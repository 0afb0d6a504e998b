//! How much arithmetic each path performs: the FLOP counts the benchmark reports.
//!
//! A FLOP is a multiply or an add: a matmul of (m × k)·(k × n) is 2·m·k·n. Counted: every
//! linear layer, the attention score and value products (the full query × key rectangle that
//! both paths compute, masked entries included), and the LM head. Norms, softmax, RoPE and
//! copies are left out: they are O(d) per token against O(d²), under 1% here.

use common::experiment::Experiment;
use common::kinds::{Cell, Geometry, Plan};

use crate::models::{Model, ModelConfig};

/// The per-token costs of a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelCost {
    /// Multiply-adds of a block's linear layers for one token.
    pub linear_macs: f64,
    /// Multiply-adds of attention per (query, key) pair in one layer (scores and values).
    pub attn_macs_per_pair: f64,
    /// Multiply-adds of the LM head for one position.
    pub head_macs: f64,
    /// Blocks.
    pub n_layers: usize,
    /// Query heads per layer.
    pub n_heads: usize,
}

impl ModelCost {
    /// The costs of a configuration.
    pub fn of(cfg: &ModelConfig) -> Self {
        match cfg {
            ModelConfig::Gpt2(c) => {
                let d = c.n_embd as f64;
                let inner = c.n_inner as f64;
                Self {
                    linear_macs: d * 3.0 * d + d * d + 2.0 * d * inner,
                    attn_macs_per_pair: 2.0 * d,
                    head_macs: d * c.vocab_size as f64,
                    n_layers: c.n_layer,
                    n_heads: c.n_head,
                }
            }
            ModelConfig::Llama(c) => {
                let d = c.hidden_size as f64;
                let q = (c.n_heads * c.head_dim) as f64;
                let kv = (c.n_kv_heads * c.head_dim) as f64;
                let i = c.intermediate_size as f64;
                Self {
                    linear_macs: d * q + 2.0 * d * kv + q * d + 3.0 * d * i,
                    attn_macs_per_pair: 2.0 * q,
                    head_macs: d * c.vocab_size as f64,
                    n_layers: c.n_layers,
                    n_heads: c.n_heads,
                }
            }
            // q, k, v and the output projection, then a two-matrix MLP, like GPT-2.
            ModelConfig::GptJ(c) => {
                Self::dense(c.n_embd, c.n_inner, c.vocab_size, c.n_layer, c.n_head)
            }
            ModelConfig::GptNeoX(c) => {
                Self::dense(c.hidden_size, c.intermediate_size, c.vocab_size, c.n_layers, c.n_heads)
            }
        }
    }

    /// A block of `d × 3d` q/k/v, `d × d` output and `d × inner`, `inner × d` MLP matrices.
    fn dense(d: usize, inner: usize, vocab: usize, n_layers: usize, n_heads: usize) -> Self {
        let (d, inner) = (d as f64, inner as f64);
        Self {
            linear_macs: d * 3.0 * d + d * d + 2.0 * d * inner,
            attn_macs_per_pair: 2.0 * d,
            head_macs: d * vocab as f64,
            n_layers,
            n_heads,
        }
    }

    /// The model's layers and heads.
    pub fn geometry(&self) -> Geometry {
        Geometry { n_layers: self.n_layers, n_heads: self.n_heads }
    }

    /// FLOPs of `rows` rows computing tokens `from..to` (keys `0..to`) through `layers` layers,
    /// with the LM head at `head_positions` positions per row.
    pub fn forward(
        &self,
        rows: usize,
        from: usize,
        to: usize,
        layers: usize,
        head_positions: usize,
    ) -> f64 {
        let tokens = (to - from) as f64;
        let pairs = tokens * to as f64;
        let per_row = layers as f64 * (tokens * self.linear_macs + pairs * self.attn_macs_per_pair)
            + head_positions as f64 * self.head_macs;
        2.0 * rows as f64 * per_row
    }
}

/// FLOPs of the naive path on a `t_len`-token prompt with subject `[b, e)`: clean and
/// corrupted runs, then per cell one forward of S + 1 rows over all tokens and layers, one
/// more for a kind that freezes states and one more when noising (the corrupted pass that
/// captures the cell's states), logits at every position.
pub fn naive_flops(
    cost: &ModelCost,
    exp: &Experiment,
    t_len: usize,
    subject: (usize, usize),
) -> f64 {
    let run = cost.forward(exp.samples() + 1, 0, t_len, cost.n_layers, t_len);
    let tokens = exp.tokens.select(subject, t_len).len();
    let runs: usize = exp
        .kinds
        .iter()
        .map(|k| {
            let passes = 1 + usize::from(k.freezes().is_some()) + usize::from(exp.noising());
            tokens * k.cells_per_token(cost.geometry()) * passes
        })
        .sum();
    (2 + runs) as f64 * run
}

/// FLOPs of the fast path on a `t_len`-token prompt with subject `[b, e)`: a clean run of one
/// row, a corrupted run of S rows (and the severed kinds' second draw in ROME's seed mode),
/// then per traced token ≥ b the severed kinds' trunk (S rows from layer 0) and, for each
/// cell that is not a provable no-op, S rows computing tokens `t..T` from the layer it joins
/// at, the head at the last position. With `tokens_per_batch` > 1 the traced tokens go in
/// groups, as the fast path batches them, and a cell's rows compute from its group's earliest
/// restored token instead of its own.
pub fn fast_flops(
    cost: &ModelCost,
    exp: &Experiment,
    t_len: usize,
    subject: (usize, usize),
    tokens_per_batch: usize,
) -> f64 {
    let (n_layers, s, g) = (cost.n_layers, exp.samples(), cost.geometry());
    let two_draws = exp.two_draws();
    let corrupted_runs = if two_draws { 2 } else { 1 };
    let mut flops = cost.forward(1, 0, t_len, n_layers, 1)
        + corrupted_runs as f64 * cost.forward(s, 0, t_len, n_layers, 1);
    let window = exp.window as usize;
    let tokens = exp.tokens.select(subject, t_len);
    for group in tokens.chunks(tokens_per_batch.max(1)) {
        let mut runs = Vec::new();
        for &kind in &exp.kinds {
            for &t in group.iter().filter(|&&t| t >= subject.0) {
                if kind.freezes().is_some() && two_draws {
                    flops += cost.forward(s, t, t_len, n_layers, 1);
                }
                for (layer, head) in kind.layer_heads(g) {
                    let cell = Cell { token: t, layer, head };
                    if let Plan::Run { join } = kind.plan(cell, subject, t_len, window, n_layers) {
                        runs.push((t, join));
                    }
                }
            }
        }
        let start = runs.iter().map(|&(t, _)| t).min().unwrap_or(0);
        for (_, join) in runs {
            flops += cost.forward(s, start, t_len, n_layers - join, 1);
        }
    }
    flops
}

/// The costs of a loaded model.
pub fn model_cost(model: &Model) -> ModelCost {
    ModelCost::of(model.config())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2 small: 85M parameters in its blocks, so ~2 × 85M FLOPs per token.
    #[test]
    fn gpt2_small_costs_what_its_parameters_say() {
        let raw: crate::models::gpt2::RawConfig = serde_json::from_str("{}").expect("defaults");
        let cost = ModelCost::of(&ModelConfig::Gpt2(raw.into_config("test").expect("config")));
        let per_token = 2.0 * cost.linear_macs * cost.n_layers as f64;
        assert!((per_token / 2.0 - 84.9e6).abs() < 0.1e6, "{per_token}");
        assert_eq!(cost.head_macs, 768.0 * 50257.0);
    }

    /// On a 10-token prompt whose subject starts at 0 the naive path does several times the
    /// fast path's work, and more when the subject starts later.
    #[test]
    fn fast_is_a_fraction_of_naive() {
        let raw: crate::models::gpt2::RawConfig = serde_json::from_str("{}").expect("defaults");
        let cost = ModelCost::of(&ModelConfig::Gpt2(raw.into_config("test").expect("config")));
        let exp = Experiment::rome();
        let ratio = naive_flops(&cost, &exp, 10, (0, 2)) / fast_flops(&cost, &exp, 10, (0, 2), 1);
        assert!(ratio > 3.0 && ratio < 8.0, "{ratio}");
        let later = naive_flops(&cost, &exp, 10, (4, 6)) / fast_flops(&cost, &exp, 10, (4, 6), 1);
        assert!(later > ratio, "{later} vs {ratio}");
        // A Figure-3 experiment of the last subject token costs a fraction of a full trace.
        let mut fig3 = Experiment::rome();
        fig3.kinds = vec![common::kinds::Kind::SeveredMlp];
        fig3.tokens = common::experiment::Tokens(vec![common::experiment::TokenRole::LastSubject]);
        let mut full = fig3.clone();
        full.tokens = common::experiment::Tokens::all();
        let share =
            fast_flops(&cost, &fig3, 10, (0, 2), 1) / fast_flops(&cost, &full, 10, (0, 2), 1);
        assert!(share < 0.3, "{share}");
        // Noising: the naive path runs two passes per cell, the fast path what it did.
        let noising = Experiment { direction: common::experiment::Direction::Noising, ..exp };
        let rome = Experiment::rome();
        assert_eq!(
            fast_flops(&cost, &noising, 10, (0, 2), 1),
            fast_flops(&cost, &rome, 10, (0, 2), 1)
        );
        let (two, one) =
            (naive_flops(&cost, &noising, 10, (0, 2)), naive_flops(&cost, &rome, 10, (0, 2)));
        assert!(two > 1.9 * one && two < 2.0 * one, "{two} vs {one}");
    }

    /// Batching every token together computes each row from the first traced token: more
    /// work than one token at a time, less than the naive path, and the same for one token.
    #[test]
    fn grouping_tokens_costs_the_padding() {
        let raw: crate::models::gpt2::RawConfig = serde_json::from_str("{}").expect("defaults");
        let cost = ModelCost::of(&ModelConfig::Gpt2(raw.into_config("test").expect("config")));
        let exp = Experiment::rome();
        let one = fast_flops(&cost, &exp, 10, (0, 2), 1);
        let all = fast_flops(&cost, &exp, 10, (0, 2), usize::MAX);
        let pairs = fast_flops(&cost, &exp, 10, (0, 2), 2);
        assert!(one < pairs && pairs < all, "{one} {pairs} {all}");
        assert!(all < naive_flops(&cost, &exp, 10, (0, 2)), "{all}");
        // A subject at the prompt's end leaves one traced token to restore: nothing to pad.
        let last = fast_flops(&cost, &exp, 10, (9, 10), usize::MAX);
        assert_eq!(last, fast_flops(&cost, &exp, 10, (9, 10), 1));
    }
}
