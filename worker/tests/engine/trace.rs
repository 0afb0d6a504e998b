//! Causal tracing: the fast path computes exactly what ROME's algorithm (the naive path)
//! computes, on every tiny family and on SmolLM2.
//!
//! Tolerance 1e-5 absolute on every probability: the two paths run the same arithmetic on
//! different batch shapes (S + 1 full rows against suffix rows of many states), which
//! reorders f32 sums by a few ulps of O(1) activations; that moves probabilities by ~1e-7.

use worker::trace::naive;
use worker::trace::{
    Correctness, Distribution, FactInput, FactTrace, Kind, Noise, Path, SeedMode, TraceConfig,
    trace_fact,
};

use crate::util::{TINY, smollm2, tiny};

const TOLERANCE: f32 = 1e-5;

fn config(
    level: f64,
    distribution: Distribution,
    replace: bool,
    seed_mode: SeedMode,
) -> TraceConfig {
    TraceConfig {
        kinds: Kind::ALL.to_vec(),
        samples: 4,
        window: 2,
        noise: Noise { level, distribution, replace },
        seed_mode,
        seed: 99,
        correctness: Correctness::None,
        max_batch_tokens: 8192,
        layers: None,
    }
}

/// Compares every number of two traces; NaN cells of `naive` (not computed) are skipped.
fn assert_same(what: &str, naive: &FactTrace, fast: &FactTrace) -> usize {
    assert_eq!(naive.tokens, fast.tokens, "{what}: tokens");
    assert_eq!(naive.subject_range, fast.subject_range, "{what}: subject range");
    assert_eq!(naive.answer_id, fast.answer_id, "{what}: answer");
    assert!(
        (naive.high_score - fast.high_score).abs() <= TOLERANCE,
        "{what}: high {} vs {}",
        naive.high_score,
        fast.high_score
    );
    assert!(
        (naive.low_score - fast.low_score).abs() <= TOLERANCE,
        "{what}: low {} vs {}",
        naive.low_score,
        fast.low_score
    );
    assert_eq!(naive.scores.keys().collect::<Vec<_>>(), fast.scores.keys().collect::<Vec<_>>());
    let mut compared = 0;
    for (kind, table) in &naive.scores {
        for (t, row) in table.iter().enumerate() {
            for (l, &expected) in row.iter().enumerate() {
                if expected.is_nan() {
                    continue;
                }
                let actual = fast.scores[kind][t][l];
                assert!(
                    (expected - actual).abs() <= TOLERANCE,
                    "{what}: {kind} ({t}, {l}): naive {expected}, fast {actual}"
                );
                compared += 1;
            }
        }
    }
    compared
}

/// Full tables, every kind, Gaussian / uniform / replace noise, both seed modes.
#[test]
fn fast_equals_naive_on_tiny_models() {
    let fact = FactInput {
        known_id: 17,
        prompt: "Beats Music is owned by",
        // Within reach of the last token through Mistral's window of 4 over 3 layers.
        subject: "owned",
        expect: None,
    };
    let cases = [
        ("gaussian", config(1.0, Distribution::Normal, false, SeedMode::Rome)),
        ("uniform", config(2.0, Distribution::Uniform, false, SeedMode::PerFact)),
        ("replace", config(0.5, Distribution::Normal, true, SeedMode::PerFact)),
    ];
    for name in TINY {
        let loaded = tiny(name);
        let tok = loaded.tokenizer().expect("tokenizer");
        for (noise, cfg) in &cases {
            let what = format!("{name}/{noise}");
            let naive = trace_fact(&loaded.model, tok, &fact, cfg, Path::Naive).expect("naive");
            let fast = trace_fact(&loaded.model, tok, &fact, cfg, Path::Fast).expect("fast");
            let t_len = fast.tokens.len();
            let n = assert_same(&what, &naive, &fast);
            assert_eq!(n, 3 * t_len * 3, "{what}: every cell compared");
            // One token per byte: "owned" is bytes 15..20.
            assert_eq!(fast.subject_range, (15, 20), "{what}");
            // Restoring the last token's final state gives back the clean prediction.
            let top_right = fast.scores[&Kind::Hidden][t_len - 1][2];
            assert!(
                (top_right - fast.high_score).abs() <= TOLERANCE,
                "{what}: {top_right} vs high {}",
                fast.high_score
            );
            // The corruption does something, and restoring states undoes some of it.
            assert!(fast.high_score != fast.low_score, "{what}: noise changed nothing");
            let moved = fast
                .scores
                .values()
                .flatten()
                .flatten()
                .filter(|&&s| (s - fast.low_score).abs() > 1e-3)
                .count();
            assert!(moved > 10, "{what}: only {moved} cells differ from low_score");
        }
    }
}

/// A larger batch bound changes nothing but the batching.
#[test]
fn batch_bound_does_not_change_scores() {
    let loaded = tiny("llama");
    let tok = loaded.tokenizer().expect("tokenizer");
    let fact = FactInput {
        known_id: 1,
        prompt: "The Space Needle is in",
        subject: "Space Needle",
        expect: None,
    };
    let mut cfg = config(1.0, Distribution::Normal, false, SeedMode::Rome);
    let big = trace_fact(&loaded.model, tok, &fact, &cfg, Path::Fast).expect("fast");
    cfg.max_batch_tokens = 1;
    let small = trace_fact(&loaded.model, tok, &fact, &cfg, Path::Fast).expect("fast");
    assert_same("batch bound", &big, &small);
}

/// SmolLM2 on real facts, all kinds, Gaussian and uniform noise: the naive path on a sample of
/// cells in every region of the table (the full naive trace takes minutes per fact).
#[test]
fn fast_equals_naive_on_smollm2() {
    let loaded = smollm2();
    let tok = loaded.tokenizer().expect("tokenizer");
    let facts = [
        FactInput {
            known_id: 78,
            prompt: "Joseph Goebbels worked in the city of",
            subject: "Joseph Goebbels",
            expect: Some("Berlin"),
        },
        FactInput {
            known_id: 1000,
            prompt: "Apple A5 was created by",
            subject: "Apple A5",
            expect: Some("Apple"),
        },
    ];
    let n_layers = loaded.model.dims().n_layers;
    for (i, fact) in facts.iter().enumerate() {
        let mut cfg = config(
            0.15,
            if i == 0 { Distribution::Normal } else { Distribution::Uniform },
            false,
            SeedMode::Rome,
        );
        cfg.samples = 3;
        cfg.window = 10;
        let fast = trace_fact(&loaded.model, tok, fact, &cfg, Path::Fast).expect("fast");
        let t_len = fast.tokens.len();
        let (b, e) = fast.subject_range;
        let mut cells: Vec<(usize, usize)> = [
            (0, 0),
            (b, 0),
            (e - 1, 3),
            (e - 1, n_layers / 2),
            (e, 7),
            (t_len - 1, 0),
            (t_len - 1, n_layers - 1),
            (t_len - 2, n_layers - 1),
        ]
        .into_iter()
        .collect();
        cells.sort_unstable();
        cells.dedup();
        let naive = naive::trace(&loaded.model, tok, fact, &cfg, Some(&cells)).expect("naive");
        let n = assert_same(fact.prompt, &naive, &fast);
        assert_eq!(n, cells.len() * 3);
        assert_eq!(fast.correct, Some(true), "{}", fact.prompt);
    }
}
