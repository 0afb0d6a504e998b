//! The causal-tracing engine: transformer forward passes in candle with intervention points.
//!
//! - [`load`]: a model and tokenizer from a Hugging Face folder or a GGUF file;
//! - [`models`]: GPT-2 and Llama-style families behind one [`models::Model`];
//! - [`forward`]: the single forward entry point, which can resume from a cached prefix;
//! - [`intervene`]: embedding edits, state patches and captures;
//! - [`predict`]: next-token prediction;
//! - [`trace`]: causal tracing of one fact, naive (ROME's way) and fast;
//! - [`serve`]: the worker of a distributed sweep (`worker serve`).
//!
//! See ARCHITECTURE.md at the repository root for how the pieces fit.

pub mod cli;
pub mod error;
pub mod forward;
pub mod gguf;
pub mod intervene;
pub mod load;
pub mod models;
pub mod plot;
pub mod predict;
pub mod serve;
pub mod tokenizer;
pub mod trace;
mod weights;

pub use error::{Error, Result};
pub use forward::{ForwardOutput, ForwardRequest, KvCache, LayerKv, Logits, Start};
pub use intervene::{Capture, EmbedEdit, EmbedOp, Interventions, Patch, Site};
pub use load::{LoadOptions, LoadedModel, load_model};
pub use models::Model;

// Not called directly: depending on gemm turns on its AVX-512 kernels for candle's matmuls
// (the `x86-v4` feature, see the workspace Cargo.toml).
use gemm as _;

/// The f32 GEMM kernels candle's CPU matmuls use on this machine, for benchmark reports.
pub fn cpu_gemm_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2+fma";
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        return "neon";
    }
    #[allow(unreachable_code)]
    "scalar"
}
