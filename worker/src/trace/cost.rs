//! How much arithmetic each path performs: the FLOP counts the benchmark reports.
//!
//! A FLOP is a multiply or an add: a matmul of (m × k)·(k × n) is 2·m·k·n. Counted: every
//! linear layer, the attention score and value products (the full query × key rectangle that
//! both paths compute, masked entries included), and the LM head. Norms, softmax, RoPE and
//! copies are left out: they are O(d) per token against O(d²), under 1% here.

use super::config::{Kind, TraceConfig, window_layers};
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
                }
            }
        }
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

/// FLOPs of the naive path on a `t_len`-token prompt: clean and corrupted runs, then one
/// forward of S + 1 rows over all tokens and layers per state, logits at every position.
pub fn naive_flops(cost: &ModelCost, cfg: &TraceConfig, t_len: usize) -> f64 {
    let run = cost.forward(cfg.samples + 1, 0, t_len, cost.n_layers, t_len);
    let states = cfg.kinds.len() * t_len * cost.n_layers;
    (2 + states) as f64 * run
}

/// FLOPs of the fast path on a `t_len`-token prompt with subject `[b, e)`: a clean run of one
/// row, a corrupted run of S rows, then for each state that is not a provable no-op, S rows
/// computing tokens `t..T` from the layer the state joins at, the head at the last position.
pub fn fast_flops(cost: &ModelCost, cfg: &TraceConfig, t_len: usize, b: usize) -> f64 {
    let n_layers = cost.n_layers;
    let mut flops =
        cost.forward(1, 0, t_len, n_layers, 1) + cost.forward(cfg.samples, 0, t_len, n_layers, 1);
    for &kind in &cfg.kinds {
        for t in b..t_len {
            for layer in 0..n_layers {
                let join = match kind {
                    Kind::Hidden if layer + 1 == n_layers && t + 1 < t_len => continue,
                    Kind::Hidden => layer + 1,
                    Kind::Mlp | Kind::Attn => window_layers(layer, cfg.window, n_layers).start,
                };
                flops += cost.forward(cfg.samples, t, t_len, n_layers - join, 1);
            }
        }
    }
    flops
}

/// The costs of a loaded model.
pub fn model_cost(model: &Model) -> ModelCost {
    match model {
        Model::Gpt2(m) => ModelCost::of(&ModelConfig::Gpt2(m.config().clone())),
        Model::Llama(m) => ModelCost::of(&ModelConfig::Llama(m.config().clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::config::TraceConfig;

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
        let cfg = TraceConfig::rome(0.1);
        let ratio = naive_flops(&cost, &cfg, 10) / fast_flops(&cost, &cfg, 10, 0);
        assert!(ratio > 3.0 && ratio < 8.0, "{ratio}");
        assert!(naive_flops(&cost, &cfg, 10) / fast_flops(&cost, &cfg, 10, 4) > ratio);
    }
}
