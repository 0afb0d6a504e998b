//! The tracer reproduces ROME's own numbers: tests/fixtures/smollm2/rome_traces.json holds
//! traces computed by ROME's code (tools/rome_reference.py: causal_trace.py's functions with
//! hooks for nethook) on SmolLM2 with ROME's settings: s3 noise, 10 samples, window 10,
//! RandomState(1) noise for every run.

use common::dataset::read_knowns_file;
use worker::trace::noise::embedding_std;
use worker::trace::{Correctness, FactInput, Kind, Path, TraceConfig, trace_fact};

use crate::util::{fixture, knowns_path, smollm2};

/// Tolerance on probabilities. The forward passes differ from transformers' by up to ~7e-5
/// on a logit (golden.rs); a probability p moves by about p·Δlogit. Measured: at most 2.2e-6
/// over every cell of both facts. 2e-5 leaves ten-fold room and is a thousandth of the
/// effects being measured (0.02–0.5).
const TOLERANCE: f64 = 2e-5;

fn load() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("smollm2/rome_traces.json"))
        .expect("tools/rome_reference.py fixture");
    serde_json::from_str(&text).expect("json")
}

#[test]
fn noise_level_is_romes_collect_embedding_std() {
    let f = load();
    let loaded = smollm2();
    let knowns = read_knowns_file(&knowns_path()).expect("knowns");
    let subjects: Vec<&str> = knowns.facts.iter().map(|k| k.subject.as_str()).collect();
    let std = embedding_std(&loaded.model, loaded.tokenizer().expect("tokenizer"), &subjects)
        .expect("std");
    let expected = f["embedding_std"].as_f64().expect("std");
    // Both are an f32 result: equal, or one f32 ulp apart from a different summation order.
    assert!((std - expected).abs() <= expected * 1.2e-7, "std {std} vs ROME's {expected}");
}

#[test]
fn traces_match_romes_code() {
    let f = load();
    let loaded = smollm2();
    let tok = loaded.tokenizer().expect("tokenizer");
    let mut cfg = TraceConfig::rome(f["noise_level"].as_f64().expect("level"));
    cfg.correctness = Correctness::Strict;
    let mut worst = 0f64;
    for fact in f["facts"].as_array().expect("facts") {
        let s = |k: &str| fact[k].as_str().expect(k);
        let input = FactInput {
            known_id: fact["known_id"].as_u64().expect("id"),
            prompt: s("prompt"),
            subject: s("subject"),
            expect: Some(s("attribute")),
        };
        let ours = trace_fact(&loaded.model, tok, &input, &cfg, Path::Fast).expect("trace");
        let tokens: Vec<&str> = fact["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_str().expect("token"))
            .collect();
        assert_eq!(ours.tokens, tokens);
        let range: Vec<usize> = fact["subject_range"]
            .as_array()
            .expect("range")
            .iter()
            .map(|v| v.as_u64().expect("b") as usize)
            .collect();
        assert_eq!(vec![ours.subject_range.0, ours.subject_range.1], range);
        assert_eq!(u64::from(ours.answer_id), fact["answer_id"].as_u64().expect("answer"));
        assert_eq!(ours.correct, fact["correct_prediction"].as_bool());
        let mut check = |what: String, ours: f32, rome: f64| {
            let diff = (f64::from(ours) - rome).abs();
            worst = worst.max(diff);
            assert!(diff <= TOLERANCE, "{}: {what}: ours {ours}, ROME {rome}", input.prompt);
        };
        check("high_score".into(), ours.high_score, fact["high_score"].as_f64().expect("high"));
        check("low_score".into(), ours.low_score, fact["low_score"].as_f64().expect("low"));
        for kind in Kind::ALL {
            let table = fact["scores"][kind.name()].as_array().expect("table");
            for (t, row) in table.iter().enumerate() {
                for (l, rome) in row.as_array().expect("row").iter().enumerate() {
                    check(
                        format!("{kind} ({t}, {l})"),
                        ours.scores[&kind][t][l],
                        rome.as_f64().expect("score"),
                    );
                }
            }
        }
    }
    eprintln!("largest |ours - ROME| = {worst:.2e}");
}
