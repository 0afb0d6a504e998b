//! What a causal trace is asked to compute: kinds, samples, window, noise, seeds, correctness.
//! The definitions follow ROME's `calculate_hidden_flow` (DESIGN.md §1).

use serde::{Deserialize, Serialize};

pub use common::settings::{Correctness, Distribution, Kind, NoiseSpec, SeedMode};

/// The layers restored for kind `mlp`/`attn` at centre `layer`: ROME's
/// `range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))`.
pub fn window_layers(layer: usize, window: usize, n_layers: usize) -> std::ops::Range<usize> {
    let lo = layer.saturating_sub(window / 2);
    let hi = (layer + window.div_ceil(2)).min(n_layers);
    lo..hi
}

/// Resolved noise: what is added to (or replaces) the subject's embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Noise {
    /// Multiplies the unit noise (in f64, as ROME's `noise * x`).
    pub level: f64,
    /// Normal or uniform.
    pub distribution: Distribution,
    /// Replace the embeddings instead of adding to them.
    pub replace: bool,
}

/// The seed of a fact's noise generator (numpy's `RandomState` takes 32 bits).
pub fn fact_seed(mode: SeedMode, sweep_seed: u64, known_id: u64) -> u32 {
    match mode {
        SeedMode::Rome => 1,
        SeedMode::PerFact => {
            // SplitMix64 of the pair: a fixed, well-mixed function, so neighbouring ids and
            // seeds give unrelated streams and a rerun gives the same one.
            let mut z = sweep_seed ^ known_id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 32) as u32
        }
    }
}

/// Which implementation computes the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// ROME's algorithm as ROME runs it.
    Naive,
    /// Clean run once, corrupted prefix reused, suffixes batched.
    Fast,
}

/// Everything a trace needs besides the model and the fact.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// Kinds to compute, in output order.
    pub kinds: Vec<Kind>,
    /// Noise samples S.
    pub samples: usize,
    /// Window W for mlp/attn.
    pub window: usize,
    /// The resolved noise.
    pub noise: Noise,
    /// How each fact's generator is seeded.
    pub seed_mode: SeedMode,
    /// The sweep seed for [`SeedMode::PerFact`].
    pub seed: u64,
    /// Which facts are traced.
    pub correctness: Correctness,
    /// Fast path memory bound: at most this many (row × token) states in one batched forward.
    pub max_batch_tokens: usize,
    /// Compute only these layers' scores (a sweep job's share of the fact); the other cells
    /// of the tables are NaN. `None`: every layer.
    pub layers: Option<std::ops::Range<usize>>,
}

impl TraceConfig {
    /// Whether the score of `layer` is asked for.
    pub fn wants_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|r| r.contains(&layer))
    }

    /// ROME's settings for a given noise level: all kinds, 10 samples, window 10, ROME seeds.
    pub fn rome(level: f64) -> Self {
        Self {
            kinds: Kind::ALL.to_vec(),
            samples: 10,
            window: 10,
            noise: Noise { level, distribution: Distribution::Normal, replace: false },
            seed_mode: SeedMode::Rome,
            seed: 0,
            correctness: Correctness::None,
            max_batch_tokens: 8192,
            layers: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_romes() {
        // range(max(0, l - 5), min(L, l - (-10 // 2))) with W = 10, L = 12.
        assert_eq!(window_layers(0, 10, 12), 0..5);
        assert_eq!(window_layers(5, 10, 12), 0..10);
        assert_eq!(window_layers(6, 10, 12), 1..11);
        assert_eq!(window_layers(11, 10, 12), 6..12);
        // Odd windows: l - (-W // 2) = l + ceil(W / 2).
        assert_eq!(window_layers(4, 3, 12), 3..6);
        assert_eq!(window_layers(0, 1, 12), 0..1);
    }

    #[test]
    fn noise_flags_parse() {
        assert_eq!("0.1".parse(), Ok(NoiseSpec::Level(0.1)));
        assert_eq!("s3".parse(), Ok(NoiseSpec::StdMultiple(3.0)));
        assert_eq!("u2.5".parse(), Ok(NoiseSpec::Uniform(2.5)));
        assert!("sx".parse::<NoiseSpec>().is_err());
        assert!("-1".parse::<NoiseSpec>().is_err());
        assert!("nan".parse::<NoiseSpec>().is_err());
    }

    #[test]
    fn per_fact_seeds_differ_and_repeat() {
        let a = fact_seed(SeedMode::PerFact, 7, 1);
        assert_eq!(a, fact_seed(SeedMode::PerFact, 7, 1));
        assert_ne!(a, fact_seed(SeedMode::PerFact, 7, 2));
        assert_ne!(a, fact_seed(SeedMode::PerFact, 8, 1));
        assert_eq!(fact_seed(SeedMode::Rome, 7, 1), 1);
    }
}
