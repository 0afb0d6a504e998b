//! The second real family: Gemma 3 270M (Q4_K_M GGUF) predicts known facts, and equals
//! transformers loading the same file.

use worker::predict::predict;

use crate::util::gemma3;

/// transformers 5.24 on the same file: " Seattle" at p = 0.4722, then " Squ" 0.0648.
#[test]
fn predicts_seattle_for_the_space_needle() {
    let prediction =
        predict(gemma3(), "The Space Needle is located in the city of", 5).expect("predict");
    assert_eq!(prediction.tokens.first().map(String::as_str), Some("<bos>"));
    assert_eq!(prediction.top[0].token, " Seattle");
    assert!((prediction.top[0].prob - 0.4722).abs() < 2e-3, "{}", prediction.top[0].prob);
}

/// Gemma 3 270M against transformers 5.24 loading the same GGUF file (tools/golden.py
/// `--gemma3`): on each reference prompt, the token ids (with `<bos>`), the top-1 id,
/// p(top-1) within 2e-3 (the bound), every logit of transformers' 1000 likeliest
/// tokens within 1e-3, and the log-sum-exp of the whole 262k row within 1e-3.
///
/// Tolerances: both sides dequantize the same blocks to f32 and compute in f32 but sum in
/// different orders; over 18 layers and a 640-wide dot product per logit that moves a logit
/// of magnitude ~30 by ~1e-5 (measured: 5.5e-5 at most over the 1000 likeliest tokens of the
/// six prompts, and 3.7e-6 on p(top-1)); 1e-3 is SmolLM2's bound (golden.rs), and a wrong
/// norm offset, RoPE base or window moves logits by 1e-1 or more.
#[test]
fn gemma3_matches_transformers_on_real_prompts() {
    use candle_core::{DType, Device, Tensor};
    use worker::Logits;

    use crate::util::{fixture, logits};

    let loaded = gemma3();
    let tokenizer = loaded.tokenizer().expect("tokenizer");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("gemma3/prompts.json")).expect("prompts"),
    )
    .expect("json");
    let reference =
        candle_core::safetensors::load(fixture("gemma3/reference.safetensors"), &Device::Cpu)
            .expect("reference");
    let top_ids = reference["top_ids"].to_dtype(DType::U32).expect("ids");
    let top_logits = reference["top_logits"].to_vec2::<f32>().expect("logits");
    let lse = reference["logsumexp"].to_vec1::<f32>().expect("lse");
    let prompts = meta["prompts"].as_array().expect("prompts");
    assert!(prompts.len() >= 5);
    let (mut worst_logit, mut worst_p) = (0f32, 0f64);
    for (i, record) in prompts.iter().enumerate() {
        let prompt = record["prompt"].as_str().expect("prompt");
        let ids = tokenizer.encode(prompt).expect("encode");
        let expected_ids: Vec<u32> = reference[&format!("input_ids.{i}")]
            .to_dtype(DType::U32)
            .and_then(|t| t.to_vec1())
            .expect("ids");
        assert_eq!(ids, expected_ids, "token ids of {prompt:?}");
        assert_eq!(ids[0], 2, "<bos> first");
        let ids_t =
            Tensor::new(ids.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
        let row = logits(&loaded.model, &ids_t, Logits::Last).squeeze(0).expect("row");
        let ours: Vec<f32> = row.to_vec1().expect("vec");
        let their_ids: Vec<u32> = top_ids.get(i).and_then(|t| t.to_vec1()).expect("row ids");
        // Top-1 equal.
        let argmax = ours
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(id, _)| id as u32)
            .expect("argmax");
        assert_eq!(argmax, their_ids[0], "top-1 of {prompt:?}");
        // Every logit of transformers' 1000 likeliest tokens.
        for (&id, &theirs) in their_ids.iter().zip(&top_logits[i]) {
            let diff = (ours[id as usize] - theirs).abs();
            worst_logit = worst_logit.max(diff);
            assert!(diff <= 1e-3, "{prompt:?}: logit of {id}: {} vs {theirs}", ours[id as usize]);
        }
        // The whole row's mass, and p(top-1).
        let max = ours[argmax as usize] as f64;
        let our_lse = max + ours.iter().map(|&z| (z as f64 - max).exp()).sum::<f64>().ln();
        assert!((our_lse - f64::from(lse[i])).abs() <= 1e-3, "{prompt:?}: log-sum-exp {our_lse}");
        let p = (max - our_lse).exp();
        let their_p = record["top1_prob"].as_f64().expect("p");
        worst_p = worst_p.max((p - their_p).abs());
        assert!((p - their_p).abs() <= 2e-3, "{prompt:?}: p(top-1) {p} vs {their_p}");
    }
    eprintln!("Gemma 3: max |Δlogit| {worst_logit:.2e} (top 1000), max |Δp(top-1)| {worst_p:.2e}");
}
