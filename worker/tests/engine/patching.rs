//! Every corruption, direction and metric against an independent reference: plain PyTorch
//! forward hooks on transformers' SmolLM2 (`tools/patching_reference.py`, which chooses
//! STR's donor and the noise foil by its own reading of the rules), in
//! `tests/fixtures/smollm2/patching.json`.
//!
//! Four facts (subject first, after other tokens, one token before the last, one token at
//! 0), the hidden, mlp and attn tables of every metric, denoising and noising, under STR and
//! under ROME's Gaussian noise (10 samples, `RandomState(1)`, the fixture's level).
//! Tolerances: 1e-4 on `prob`, 1e-3 on the others. The reference computes in f64 from f32
//! logits as we do, but its f32 forward sums in other orders (transformers' kernels against
//! candle's): probabilities move by ~1e-6 (measured below), logits of magnitude up to ~30
//! by ~1e-5, and logprob of a small p amplifies that relatively; 1e-3 leaves two orders of
//! magnitude for it, and a wrong row, token or sample moves a cell by far more.

use common::experiment::{Corruption, Direction, Experiment, Noise, Resolved};
use common::kinds::Kind;
use common::metric::Metric;
use common::settings::{Distribution, NoiseSpec, SeedMode};
use serde_json::Value;
use worker::trace::{Correctness, FactTrace, Path, TraceOptions, trace_fact};

use crate::replacement::{facts, input, str_experiment};
use crate::util::smollm2;

const KINDS: [Kind; 3] = [Kind::Hidden, Kind::Mlp, Kind::Attn];

fn tolerance(metric: Metric) -> f64 {
    if metric == Metric::Prob { 1e-4 } else { 1e-3 }
}

fn noise_experiment(level: f64, samples: u32) -> Resolved {
    let mut e =
        Experiment { kinds: KINDS.to_vec(), correctness: Correctness::None, ..Experiment::rome() };
    let Corruption::Noise(n) = &mut e.corruption else { panic!("noise") };
    n.noise = NoiseSpec::Level(level);
    n.samples = samples;
    n.seed_mode = SeedMode::Rome;
    let noise = Noise { level, distribution: Distribution::Normal, replace: false };
    Resolved::new(e, Some(noise)).expect("noise")
}

/// Compares `trace` with the reference's entry of its corruption in `direction`; returns the
/// cells compared and the largest |Δ| of each metric.
fn compare(
    what: &str,
    trace: &FactTrace,
    reference: &Value,
    direction: Direction,
    worst: &mut [f64; 4],
) -> usize {
    assert_eq!(u64::from(trace.foil_id), reference["foil_id"].as_u64().expect("foil"), "{what}");
    let mut check = |what: &str, metric: Metric, ours: f64, theirs: &Value| {
        let theirs = theirs.as_f64().expect("number");
        let delta = (ours - theirs).abs();
        let i = Metric::ALL.iter().position(|&m| m == metric).expect("metric");
        worst[i] = worst[i].max(delta);
        assert!(delta <= tolerance(metric), "{what} {metric}: ours {ours}, reference {theirs}");
    };
    for metric in Metric::ALL {
        let (clean, corrupted) = (&reference["clean"], &reference["corrupted"]);
        check(&format!("{what} clean"), metric, trace.clean.get(metric), &clean[metric.name()]);
        check(
            &format!("{what} corrupted"),
            metric,
            trace.corrupted.get(metric),
            &corrupted[metric.name()],
        );
    }
    let mut compared = 0;
    for kind in KINDS {
        for metric in Metric::ALL {
            let table = &trace.metrics[&kind][&metric];
            let rows = reference[direction.to_string()][kind.name()][metric.name()]
                .as_array()
                .expect("table");
            assert_eq!(rows.len(), trace.tokens.len(), "{what}");
            for (t, row) in rows.iter().enumerate() {
                for (l, cell) in row.as_array().expect("row").iter().enumerate() {
                    let ours = f64::from(table.at(t, l));
                    check(&format!("{what} {direction} {kind} ({t}, {l})"), metric, ours, cell);
                    compared += 1;
                }
            }
        }
    }
    compared
}

fn fixture() -> Value {
    let path = crate::util::fixture("smollm2/patching.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

/// STR, both directions, every metric, the four facts (with the same donor as the
/// reference's).
#[test]
fn str_equals_an_independent_pytorch_reference() {
    let loaded = smollm2();
    let tok = loaded.tokenizer().expect("tokenizer");
    let opts = TraceOptions::default();
    let (mut compared, mut worst) = (0, [0f64; 4]);
    for expected in fixture()["facts"].as_array().expect("facts") {
        let known_id = expected["known_id"].as_u64().expect("id");
        let (fact, pool) = facts(&[known_id]).remove(0);
        for direction in [Direction::Denoising, Direction::Noising] {
            let mut exp = str_experiment(&KINDS);
            exp.experiment.direction = direction;
            let trace =
                trace_fact(&loaded.model, tok, &input(&fact, &pool), &exp, &opts, Path::Fast)
                    .expect("trace");
            let donor = trace.donor.as_ref().expect("donor");
            assert_eq!(donor.known_id, expected["donor"]["known_id"].as_u64().expect("donor"));
            assert_eq!(u64::from(trace.answer_id), expected["answer_id"].as_u64().expect("a"));
            let what = format!("fact {known_id} str");
            let reference = &expected["corruptions"]["str"];
            compared += compare(&what, &trace, reference, direction, &mut worst);
        }
    }
    eprintln!("STR: largest |Δ| per metric (prob, logprob, logit_diff, kl): {worst:?}");
    // Facts of 10, 11, 6 and 4 tokens, 30 layers, three kinds, four metrics, two directions.
    assert_eq!(compared, (10 + 11 + 6 + 4) * 30 * 3 * 4 * 2);
}

/// ROME's Gaussian noise, both directions, every metric, on the two shortest facts (the
/// others' noise traces take minutes each in a test build; `str_…` covers all four).
#[test]
fn noise_equals_an_independent_pytorch_reference() {
    let loaded = smollm2();
    let tok = loaded.tokenizer().expect("tokenizer");
    let fixture = fixture();
    let level = fixture["noise_level"].as_f64().expect("level");
    let samples = fixture["samples"].as_u64().expect("samples") as u32;
    let opts = TraceOptions::default();
    let (mut compared, mut worst) = (0, [0f64; 4]);
    for expected in fixture["facts"].as_array().expect("facts") {
        let known_id = expected["known_id"].as_u64().expect("id");
        if ![390, 81].contains(&known_id) {
            continue;
        }
        let (fact, pool) = facts(&[known_id]).remove(0);
        for direction in [Direction::Denoising, Direction::Noising] {
            let mut exp = noise_experiment(level, samples);
            exp.experiment.direction = direction;
            let trace =
                trace_fact(&loaded.model, tok, &input(&fact, &pool), &exp, &opts, Path::Fast)
                    .expect("trace");
            let what = format!("fact {known_id} noise");
            let reference = &expected["corruptions"]["noise"];
            compared += compare(&what, &trace, reference, direction, &mut worst);
        }
    }
    eprintln!("noise: largest |Δ| per metric (prob, logprob, logit_diff, kl): {worst:?}");
    assert_eq!(compared, (6 + 4) * 30 * 3 * 4 * 2);
}
