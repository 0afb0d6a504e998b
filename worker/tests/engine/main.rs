//! The engine's integration tests: one binary, one module per subject (see matklad's
//! "Delete Cargo Integration Tests").

mod cli;
mod errors;
mod gemma3;
mod gguf_roundtrip;
mod golden;
mod heads;
mod interventions;
mod loading;
mod parallel;
mod patching;
mod replacement;
mod rome;
mod smollm2;
mod tokenizers;
mod trace;
mod util;
