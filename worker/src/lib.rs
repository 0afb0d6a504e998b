//! The causal-tracing engine: transformer forward passes in candle with intervention points.
//!
//! - [`load`]: a model and tokenizer from a Hugging Face folder or a GGUF file;
//! - [`models`]: GPT-2 and Llama-style families behind one [`models::Model`];
//! - [`forward`]: the single forward entry point, which can resume from a cached prefix;
//! - [`intervene`]: embedding edits, state patches and captures;
//! - [`predict`]: next-token prediction;
//! - [`trace`]: causal tracing of one fact, naive (ROME's way) and fast;
//! - [`serve`]: the worker of a distributed sweep (`worker serve`);
//! - [`cpu`]: the host's GEMM kernels and allocator settings.
//!
//! See ARCHITECTURE.md at the repository root for how the pieces fit.

pub mod bench;
pub mod cli;
pub mod cpu;
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
