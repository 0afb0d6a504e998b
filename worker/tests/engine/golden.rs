//! Parity with Hugging Face transformers, from fixtures written by tools/golden.py.
//!
//! Tolerance: max |logit − reference| ≤ 1e-3 in f32. Both sides compute in f32 but sum in
//! different orders (gemm blocking, fused softmax/norm kernels), which moves a logit of
//! magnitude ~10 by ~1e-5 at most over a few layers; 1e-3 leaves two orders of margin for
//! SmolLM2's 30 layers while still catching any real mistake (a wrong RoPE base, a missed
//! bias, a mask off by one), each of which moves logits by 1e-2 or more.

use candle_core::{DType, Device, IndexOp, Tensor};
use worker::Logits;
use worker::predict::top_k;

use crate::util::{TINY, fixture, logits, max_abs_diff, smollm2, tiny};

const TOLERANCE: f32 = 1e-3;

/// The tiny models: three layers of width 32, so the summation-order noise is ~1e-5
/// (measured: at most 2e-5, Gemma 3); 1e-4 is the bound, and still five times the
/// noise, while a wrong window, soft-cap, norm placement or RoPE base moves logits by 1e-2+.
const TINY_TOLERANCE: f32 = 1e-4;

fn reference(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("reference fixture")
}

/// Every logit at every position of two rows, for each tiny family.
#[test]
fn tiny_models_match_transformers() {
    for name in TINY {
        let loaded = tiny(name);
        let reference = reference(&fixture(&format!("tiny/{name}/reference.safetensors")));
        let ids = reference["input_ids"].to_dtype(DType::U32).expect("ids");
        let expected = &reference["logits"];
        let actual = logits(&loaded.model, &ids, Logits::All);
        let diff = max_abs_diff(&actual, expected);
        assert!(diff <= TINY_TOLERANCE, "{name}: max |logit - reference| = {diff}");
        // The last-position shortcut is the last row of the full computation.
        let last = logits(&loaded.model, &ids, Logits::Last);
        let (_, t, _) = expected.dims3().expect("dims");
        let diff_last = max_abs_diff(&last, &expected.i((.., t - 1, ..)).expect("slice"));
        assert!(diff_last <= TINY_TOLERANCE, "{name}: last position differs by {diff_last}");
        eprintln!("{name}: max |logit - reference| = {diff:.2e}");
    }
}

/// SmolLM2 from its Q4_1 GGUF (dequantized to f32 on both sides): token ids, top-5 and every
/// logit at the last position of each reference prompt.
#[test]
fn smollm2_matches_transformers() {
    let loaded = smollm2();
    let tokenizer = loaded.tokenizer().expect("tokenizer");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("smollm2/prompts.json")).expect("prompts"),
    )
    .expect("json");
    let reference = reference(&fixture("smollm2/reference.safetensors"));
    let prompts = meta["prompts"].as_array().expect("prompts");
    assert!(prompts.len() >= 5);
    for (i, record) in prompts.iter().enumerate() {
        let prompt = record["prompt"].as_str().expect("prompt");
        let ids = tokenizer.encode(prompt).expect("encode");
        let expected_ids: Vec<u32> = reference[&format!("input_ids.{i}")]
            .to_dtype(DType::U32)
            .and_then(|t| t.to_vec1())
            .expect("ids");
        assert_eq!(ids, expected_ids, "token ids of {prompt:?}");
        let ids_t =
            Tensor::new(ids.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("tensor");
        let actual = logits(&loaded.model, &ids_t, Logits::Last).squeeze(0).expect("squeeze");
        let expected = reference["logits"].i(i).expect("row");
        let diff = max_abs_diff(&actual, &expected);
        assert!(diff <= TOLERANCE, "{prompt:?}: max |logit - reference| = {diff}");
        let top5: Vec<u32> = top_k(&actual.to_vec1::<f32>().expect("vec"), 5)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let expected_top5: Vec<u32> = record["top5"]
            .as_array()
            .expect("top5")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        assert_eq!(top5, expected_top5, "top-5 of {prompt:?}");
        eprintln!("{prompt:?}: max |logit - reference| = {diff:.2e}");
    }
}
