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

fn tiny_model() -> std::path::PathBuf {
    crate::util::fixture("tiny/llama")
}

#[test]
fn trace_json_has_the_documented_shape() {
    let out = worker()
        .args(["trace", "--model"])
        .arg(tiny_model())
        .args(["--prompt", "Beats Music is owned by", "--subject", "Music", "--noise", "1.0"])
        .args(["--samples", "3", "--window", "2", "--kinds", "hidden,attn", "--json"])
        .output()
        .expect("run worker");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let tokens = v["tokens"].as_array().expect("tokens");
    assert_eq!(tokens.len(), 23, "one token per byte");
    assert_eq!(v["subject_range"], serde_json::json!([6, 11]));
    for key in ["answer", "answer_id", "high_score", "low_score", "noise_level"] {
        assert!(!v[key].is_null(), "{key} missing");
    }
    assert_eq!(v["noise_level"], 1.0);
    assert!(v["correct"].is_null(), "no --expect, no verdict");
    let scores = v["scores"].as_object().expect("scores");
    assert_eq!(scores.keys().collect::<Vec<_>>(), ["attn", "hidden"]);
    for table in scores.values() {
        let rows = table.as_array().expect("rows");
        assert_eq!(rows.len(), 23);
        assert!(rows.iter().all(|r| r.as_array().map(Vec::len) == Some(3)), "L = 3 columns");
    }
    assert_eq!(v["axes"]["hidden"], serde_json::json!(["token", "layer"]));
    assert_eq!(v["traced_tokens"].as_array().map(Vec::len), Some(23), "--tokens all");
}

#[test]
fn trace_plots_and_checks_its_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = worker()
        .args(["trace", "--model"])
        .arg(tiny_model())
        .args([
            "--prompt",
            "Beats Music is owned by",
            "--subject",
            "Beats",
            "--noise",
            "u2",
            "--samples",
            "2",
        ])
        .args(["--window", "2", "--plot"])
        .arg(dir.path())
        .output()
        .expect("run worker");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("best: token"));
    for kind in ["hidden", "mlp", "attn"] {
        for ext in ["png", "svg"] {
            let path = dir.path().join(format!("trace_{kind}.{ext}"));
            assert!(
                std::fs::metadata(&path).map(|m| m.len() > 1000).unwrap_or(false),
                "{}",
                path.display()
            );
        }
    }

    // sK noise needs the subjects it is computed over.
    let out = worker()
        .args(["trace", "--model"])
        .arg(tiny_model())
        .args(["--prompt", "Beats Music is owned by", "--subject", "Beats", "--window", "2"])
        .output()
        .expect("run worker");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--noise s3 needs --noise-subjects"));

    // A window wider than the model is refused, not clipped silently.
    let out = worker()
        .args(["trace", "--model"])
        .arg(tiny_model())
        .args(["--prompt", "Beats Music is owned by", "--subject", "Beats", "--noise", "0.1"])
        .output()
        .expect("run worker");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--window: 10 is more than the model's 3 layers")
    );

    // The new kinds draw their maps: one per traced token for the heads.
    let plots = tempfile::tempdir().expect("tempdir");
    let out = worker()
        .args(["trace", "--model"])
        .arg(tiny_model())
        .args(["--prompt", "Beats Music is owned by", "--subject", "Beats", "--noise", "0.5"])
        .args(["--window", "2", "--samples", "2", "--kinds", "severed_mlp,head"])
        .args(["--tokens", "last-subject,last", "--plot"])
        .arg(plots.path())
        .output()
        .expect("run worker");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("severed_mlp: p(") && stdout.contains(", head "), "{stdout}");
    // "Beats" is the first byte-token run; the prompt is 23 bytes.
    for stem in ["trace_severed_mlp", "trace_head_t4", "trace_head_t22"] {
        assert!(plots.path().join(format!("{stem}.png")).is_file(), "{stem}.png");
    }

    let out = worker()
        .args(["trace", "--model"])
        .arg(tiny_model())
        .args([
            "--prompt",
            "Beats Music is owned by",
            "--subject",
            "Apple",
            "--noise",
            "0.1",
            "--window",
            "2",
        ])
        .output()
        .expect("run worker");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("subject \"Apple\" is not in the prompt"), "{err}");
}

/// `--knowns FILE --known-id N` traces that fact: the same numbers as its prompt, subject and
/// attribute given by hand (its id seeding per-fact noise), its subjects giving sK's std; an
/// id that is missing or broken is an error that says so.
#[test]
fn trace_takes_a_fact_from_a_knowns_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let knowns = dir.path().join("knowns.json");
    let records = serde_json::json!([
        {"known_id": 3, "subject": "Beats Music", "attribute": "Apple",
         "prompt": "Beats Music is owned by", "relation_id": "P127"},
        {"known_id": 7, "subject": "Music", "attribute": "Apple",
         "prompt": "Beats Music is owned by", "relation_id": "P127"},
        {"known_id": 9, "subject": "Nowhere", "prompt": "x"}
    ]);
    std::fs::write(&knowns, records.to_string()).expect("write");
    let trace = |args: &[&str]| {
        worker()
            .args(["trace", "--model"])
            .arg(tiny_model())
            .args(["--samples", "2", "--window", "2", "--kinds", "hidden", "--json"])
            .args(["--seed-mode", "per-fact", "--seed", "5", "--correctness", "none"])
            .args(args)
            .output()
            .expect("run worker")
    };
    let json = |out: &std::process::Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let by_id = json(&trace(&["--knowns", knowns.to_str().expect("utf-8"), "--known-id", "7"]));
    let by_hand = json(&trace(&[
        "--prompt",
        "Beats Music is owned by",
        "--subject",
        "Music",
        "--expect",
        "Apple",
        "--known-id",
        "7",
        "--noise-subjects",
        knowns.to_str().expect("utf-8"),
    ]));
    assert_eq!(by_id, by_hand);
    assert_eq!(by_id["subject_range"], serde_json::json!([6, 11]));
    assert!(!by_id["correct"].is_null(), "the attribute is the expected answer");
    // Every metric of the clean and corrupted runs and of every cell; "scores" is prob's.
    for run in ["clean", "corrupted"] {
        for metric in ["prob", "logprob", "logit_diff", "kl"] {
            assert!(by_id[run][metric].is_f64(), "{run} {metric}: {}", by_id[run]);
        }
    }
    assert_eq!(by_id["clean"]["kl"], 0.0);
    assert!(by_id["foil"].is_string() && by_id["foil_id"] != by_id["answer_id"]);
    assert_eq!(by_id["metrics"]["hidden"]["prob"], by_id["scores"]["hidden"]);
    let kl = &by_id["metrics"]["hidden"]["kl"];
    assert_eq!(kl.as_array().map(Vec::len), by_id["tokens"].as_array().map(Vec::len));
    // Noising is a flag away, and gives other tables.
    let noising = json(&trace(&[
        "--knowns",
        knowns.to_str().expect("utf-8"),
        "--known-id",
        "7",
        "--direction",
        "noising",
    ]));
    assert_eq!(noising["clean"], by_id["clean"]);
    assert_ne!(noising["metrics"], by_id["metrics"]);

    let out = trace(&["--knowns", knowns.to_str().expect("utf-8"), "--known-id", "4"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no fact has known_id 4 (2 valid records)"), "{err}");
    let out = trace(&["--knowns", knowns.to_str().expect("utf-8"), "--known-id", "9"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("record 2 (known_id 9)") && err.contains("attribute"), "{err}");
    // The fact comes from one place: --prompt with --knowns is refused.
    let out = trace(&["--knowns", "k.json", "--known-id", "3", "--prompt", "x", "--subject", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

#[test]
fn noise_level_prints_three_times_the_embedding_std() {
    let out = worker()
        .args(["noise-level", "--model"])
        .arg(smollm2_path())
        .arg("--knowns")
        .arg(crate::util::knowns_path())
        .output()
        .expect("run worker");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let level: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("a number");
    // ROME's collect_embedding_std on SmolLM2 (tests/fixtures/smollm2/rome_traces.json) × 3.
    assert!((level - 0.35).abs() < 0.01, "{level}");
}
