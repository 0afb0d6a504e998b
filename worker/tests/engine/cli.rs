//! `worker predict` as a user runs it.

use std::process::Command;

use crate::util::smollm2_path;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_worker"))
}

#[test]
fn predict_json_has_the_documented_shape() {
    let out = worker()
        .args(["predict", "--model"])
        .arg(smollm2_path())
        .args(["--prompt", "Joseph Goebbels worked in the city of", "--top-k", "3", "--json"])
        .output()
        .expect("run worker");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let tokens: Vec<&str> = v["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("string"))
        .collect();
    assert_eq!(tokens.concat(), "Joseph Goebbels worked in the city of");
    let top = v["top"].as_array().expect("top");
    assert_eq!(top.len(), 3);
    assert_eq!(top[0]["token"], " Berlin");
    assert_eq!(top[0]["id"], 11452);
    let probs: Vec<f64> = top.iter().map(|t| t["prob"].as_f64().expect("prob")).collect();
    assert!(
        probs.windows(2).all(|w| w[0] >= w[1]) && probs[0] > 0.2 && probs[0] < 0.35,
        "{probs:?}"
    );
}

#[test]
fn predict_prints_a_table_for_humans() {
    let out = worker()
        .args(["predict", "--model"])
        .arg(smollm2_path())
        .args(["--prompt", "Joseph Goebbels worked in the city of"])
        .output()
        .expect("run worker");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("\" Berlin\""), "{text}");
}

#[test]
fn a_missing_model_is_a_clear_error() {
    let out = worker()
        .args(["predict", "--model", "/nonexistent/model.gguf", "--prompt", "x"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing file /nonexistent/model.gguf"), "{err}");
}
