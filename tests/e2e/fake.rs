//! The fake engine shared by the tests that speak the worker protocol themselves: a dataset
//! of made-up facts, a "model" file no one loads, and results with known scores.

use std::path::{Path, PathBuf};

use common::storage::Location;

/// Layers of the fake model.
pub const LAYERS: u32 = 10;
/// Query heads per layer of the fake model.
pub const HEADS: u32 = 2;
/// Tokens of every fake prompt.
pub const TOKENS: usize = 4;

/// The score the fake engine reports for a cell: a function of its coordinates only.
pub fn fake_score(known_id: u64, kind: usize, t: usize, layer: u32, head: u32) -> f32 {
    let x =
        known_id * 31 + kind as u64 * 7 + t as u64 * 3 + u64::from(layer) + 101 * u64::from(head);
    (x % 1000) as f32 / 1000.0
}

/// A well-formed result for `job`: every kind of its experiment over the traced tokens of a
/// fact whose subject is its first token, along the kind's axes.
pub fn fake_result(job: &proto::TraceJob) -> proto::TraceResult {
    let known_id = job.fact.as_ref().map_or(0, |f| f.known_id);
    let experiment = proto::convert::resolved(job).expect("a valid job").experiment;
    let tokens: Vec<u32> =
        experiment.tokens.select((0, 1), TOKENS).into_iter().map(|t| t as u32).collect();
    let geometry = common::kinds::Geometry { n_layers: LAYERS as usize, n_heads: HEADS as usize };
    let scores = experiment
        .kinds
        .iter()
        .enumerate()
        .map(|(k, kind)| {
            let heads = kind.heads(geometry) as u32;
            let layers = job.layer_start..job.layer_end;
            let scores: Vec<f32> = tokens
                .iter()
                .flat_map(|&t| {
                    layers.clone().flat_map(move |l| {
                        (0..heads).map(move |h| fake_score(known_id, k, t as usize, l, h))
                    })
                })
                .collect();
            let [logprob, logit_diff, kl] =
                [0, 1, 2].map(|m| scores.iter().map(|&s| fake_metric(m, s)).collect());
            proto::KindScores {
                kind: proto::Kind::from(*kind) as i32,
                tokens: tokens.clone(),
                scores,
                logprob,
                logit_diff,
                kl,
            }
        })
        .collect();
    proto::TraceResult {
        tokens: (0..TOKENS).map(|t| format!("t{t}")).collect(),
        token_ids: (0..TOKENS as u32).collect(),
        subject_start: 0,
        subject_end: 1,
        answer: " x".into(),
        answer_id: 7,
        high_score: 0.9,
        low_score: 0.1,
        correct: Some(true),
        traced: true,
        noise_level: Some(0.1),
        donor: None,
        scores,
        foil_id: 8,
        foil: " y".into(),
        clean: Some(fake_run(0.9)),
        corrupted: Some(fake_run(0.1)),
    }
}

/// The fake engine's logprob (0), logit_diff (1) and KL (2) of a cell of p(answer) `p`:
/// each a function of `p`, within its metric's range.
pub fn fake_metric(metric: usize, p: f32) -> f32 {
    match metric {
        0 => -3.0 * p - 0.1,
        1 => 4.0 * p - 1.0,
        _ => 1.0 - p,
    }
}

fn fake_run(p: f32) -> proto::MetricValues {
    let m = |i| f64::from(fake_metric(i, p));
    proto::MetricValues { prob: f64::from(p), logprob: m(0), logit_diff: m(1), kl: m(2) }
}

/// What a fake worker says about itself.
pub fn capabilities() -> proto::Capabilities {
    proto::Capabilities {
        device: "fake".into(),
        dtype: "f32".into(),
        threads: 1,
        n_layers: LAYERS,
        n_heads: HEADS,
        d_model: 1,
        family: "fake".into(),
        version: "0".into(),
    }
}

/// Writes `facts` made-up facts (JSON Lines) and a fake model file into `dir`.
pub fn dataset_and_model(dir: &Path, facts: usize) -> (PathBuf, PathBuf) {
    let dataset = dir.join("facts.jsonl");
    let lines: Vec<String> = (0..facts)
        .map(|i| {
            serde_json::json!({
                "known_id": i, "subject": format!("Subject{i}"), "attribute": "x",
                "prompt": format!("Subject{i} is in"),
            })
            .to_string()
        })
        .collect();
    std::fs::write(&dataset, lines.join("\n")).expect("dataset");
    let model = dir.join("fake.gguf");
    std::fs::write(&model, b"not a model: the simulated workers never load it").expect("model");
    (dataset, model)
}

/// The fake model's fingerprint, as a worker would report it.
pub async fn fingerprint(model: &Path) -> String {
    let at = Location::open(model.to_str().expect("utf8"), false).expect("model location");
    common::fingerprint::model_fingerprint(&at).await.expect("fingerprint")
}
