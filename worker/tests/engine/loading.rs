//! Loading variants: sharded safetensors, half-precision dtypes.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use worker::{LoadOptions, Logits, load_model};

use crate::util::{fixture, ids, logits, max_abs_diff, random_rows, tiny};

/// A checkpoint split into shards with an index loads to the same model, and a missing shard
/// is named.
#[test]
fn sharded_safetensors_load_like_one_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = fixture("tiny/llama");
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).expect("copy");
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).expect("load");
    let (mut a, mut b): (HashMap<String, Tensor>, HashMap<String, Tensor>) =
        (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in tensors.into_iter().enumerate() {
        let (shard, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        weight_map.insert(name.clone(), file.into());
        shard.insert(name, t);
    }
    candle_core::safetensors::save(&a, tmp.path().join("model-00001-of-00002.safetensors"))
        .expect("save");
    candle_core::safetensors::save(&b, tmp.path().join("model-00002-of-00002.safetensors"))
        .expect("save");
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string())
        .expect("index");

    let sharded = load_model(tmp.path(), &LoadOptions::default()).expect("sharded loads");
    let x = ids(&random_rows(2, 8, 256, 21));
    assert_eq!(
        max_abs_diff(
            &logits(&sharded.model, &x, Logits::All),
            &logits(&tiny("llama").model, &x, Logits::All)
        ),
        0.0
    );

    std::fs::remove_file(tmp.path().join("model-00002-of-00002.safetensors")).expect("rm");
    let err = load_model(tmp.path(), &LoadOptions::default()).err().expect("must fail").to_string();
    assert!(
        err.contains("missing file") && err.contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
}

/// f16 and bf16 run (scores and softmax stay in f32) and stay close to f32. Measured here:
/// f16 moves O(5) logits by ~0.015, bf16 (8 mantissa bits) by ~0.1; the bounds leave 3x for
/// other CPUs' rounding, and a dtype mix-up would give errors or garbage far beyond them.
#[test]
fn half_precision_runs_close_to_f32() {
    for family in ["gpt2", "llama"] {
        let dir = fixture(&format!("tiny/{family}"));
        let x = ids(&random_rows(2, 8, 256, 22));
        let reference = logits(&tiny(family).model, &x, Logits::All);
        for (dtype, tolerance) in [(DType::F16, 0.05), (DType::BF16, 0.3)] {
            let m = load_model(&dir, &LoadOptions { device: Device::Cpu, dtype }).expect("loads");
            let out = logits(&m.model, &x, Logits::All);
            assert_eq!(out.dtype(), DType::F32, "logits come back in f32");
            let diff = max_abs_diff(&out, &reference);
            assert!(diff <= tolerance, "{family} in {dtype:?}: differs from f32 by {diff}");
            eprintln!("{family} {dtype:?}: max |logit - f32| = {diff:.3}");
        }
    }
}
