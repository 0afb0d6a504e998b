//! Causal tracing: the fast path computes exactly what ROME's algorithm (the naive path)
//! computes, for every kind, on every tiny family and on SmolLM2.
//!
//! Tolerance 1e-5 absolute on every probability: the two paths run the same arithmetic on
//! different batch shapes (S + 1 full rows against suffix rows of many states), which
//! reorders f32 sums by a few ulps of O(1) activations; that moves probabilities by ~1e-7.
//! The other metrics are functions of logits of magnitude up to ~30, which the same
//! reordering moves by ~1e-6 absolute: 1e-4 on logprob, logit_diff and KL (stored in f32).

use common::experiment::{Corruption, Direction, Experiment, Noise, Resolved, TokenRole, Tokens};
use common::kinds::{Cell, Kind};
use common::metric::Metric;
use worker::trace::naive;
use worker::trace::{
    Correctness, Distribution, FactInput, FactTrace, NoiseSpec, Path, SeedMode, TraceOptions,
    trace_fact,
};

use crate::util::{TINY, smollm2, tiny};

const TOLERANCE: f32 = 1e-5;
const METRIC_TOLERANCE: f64 = 1e-4;

fn tolerance(metric: Metric) -> f64 {
    if metric == Metric::Prob { f64::from(TOLERANCE) } else { METRIC_TOLERANCE }
}

/// An experiment of `kinds` with the noise given as a level.
pub fn experiment(
    kinds: &[Kind],
    level: f64,
    distribution: Distribution,
    replace: bool,
    seed_mode: SeedMode,
) -> Resolved {
    let mut e = Experiment { kinds: kinds.to_vec(), window: 2, ..Experiment::rome() };
    e.correctness = Correctness::None;
    let Corruption::Noise(n) = &mut e.corruption else { panic!("noise") };
    n.noise = match distribution {
        Distribution::Normal => NoiseSpec::Level(level),
        Distribution::Uniform => NoiseSpec::Uniform(level),
    };
    n.replace = replace;
    n.samples = 4;
    n.seed_mode = seed_mode;
    n.seed = if seed_mode == SeedMode::PerFact { 99 } else { 0 };
    Resolved::new(e, Some(Noise { level, distribution, replace })).expect("a valid experiment")
}

/// Compares every number of two traces; NaN cells of `naive` (not computed) are skipped.
/// Returns the cells compared.
pub fn assert_same(what: &str, naive: &FactTrace, fast: &FactTrace) -> usize {
    assert_eq!(naive.tokens, fast.tokens, "{what}: tokens");
    assert_eq!(naive.subject_range, fast.subject_range, "{what}: subject range");
    assert_eq!(naive.answer_id, fast.answer_id, "{what}: answer");
    assert_eq!(naive.traced_tokens, fast.traced_tokens, "{what}: traced tokens");
    for (name, a, b) in
        [("high", naive.high_score, fast.high_score), ("low", naive.low_score, fast.low_score)]
    {
        assert!((a - b).abs() <= TOLERANCE, "{what}: {name} {a} vs {b}");
    }
    assert_eq!(naive.foil_id, fast.foil_id, "{what}: foil");
    for metric in Metric::ALL {
        for (run, a, b) in
            [("clean", naive.clean, fast.clean), ("corrupted", naive.corrupted, fast.corrupted)]
        {
            let (a, b) = (a.get(metric), b.get(metric));
            assert!((a - b).abs() <= tolerance(metric), "{what}: {run} {metric} {a} vs {b}");
        }
    }
    assert_eq!(naive.scores.keys().collect::<Vec<_>>(), fast.scores.keys().collect::<Vec<_>>());
    let mut compared = 0;
    for (kind, table) in &naive.scores {
        let prob: Vec<_> = naive.metrics[kind][&Metric::Prob].computed().collect();
        assert_eq!(prob, table.computed().collect::<Vec<_>>(), "{what}: scores are prob");
        for (cell, expected) in table.computed() {
            let actual = fast.scores[kind].get(cell);
            assert!(
                (expected - actual).abs() <= TOLERANCE,
                "{what}: {kind} {cell:?}: naive {expected}, fast {actual}"
            );
            compared += 1;
        }
        for metric in Metric::ALL {
            for (cell, expected) in naive.metrics[kind][&metric].computed() {
                let actual = fast.metrics[kind][&metric].get(cell);
                assert!(
                    f64::from(expected - actual).abs() <= tolerance(metric),
                    "{what}: {kind} {metric} {cell:?}: naive {expected}, fast {actual}"
                );
            }
        }
    }
    compared
}

/// The tiny models' fact: "owned" is within reach of the last token through Mistral's
/// window of 4 over 3 layers.
const OWNED: FactInput<'static> = FactInput {
    known_id: 17,
    prompt: "Beats Music is owned by",
    subject: "owned",
    expect: None,
    candidates: &[],
};

/// The fast path's token batchings: one token at a time (a CPU's), every token together (a
/// GPU's), and groups of three, whose later groups start past the subject.
const TOKEN_BATCHES: [usize; 3] = [1, usize::MAX, 3];

/// Traces `OWNED` both ways for every case on every tiny family, the fast way with every
/// token batching, and hands `check` the name, the naive and fast traces, and the family's
/// heads.
fn on_tiny_models(cases: &[(&str, Resolved)], check: impl Fn(&str, &FactTrace, &FactTrace, usize)) {
    let opts = TraceOptions::default();
    for name in TINY {
        let loaded = tiny(name);
        let tok = loaded.tokenizer().expect("tokenizer");
        let heads = loaded.model.dims().n_heads;
        for (case, exp) in cases {
            let naive =
                trace_fact(&loaded.model, tok, &OWNED, exp, &opts, Path::Naive).expect("naive");
            for tokens_per_batch in TOKEN_BATCHES {
                let what = format!("{name}/{case}/{tokens_per_batch} tokens per batch");
                let batched = TraceOptions { tokens_per_batch, ..TraceOptions::default() };
                let fast = trace_fact(&loaded.model, tok, &OWNED, exp, &batched, Path::Fast)
                    .expect("fast");
                check(&what, &naive, &fast, heads);
            }
        }
    }
}

/// Full tables, every kind, Gaussian / uniform / replace noise, both seed modes (the
/// severed kinds with ROME's two draws in the first case).
#[test]
fn fast_equals_naive_on_tiny_models() {
    let all = Kind::ALL;
    let cases = [
        ("gaussian", experiment(&all, 1.0, Distribution::Normal, false, SeedMode::Rome)),
        ("uniform", experiment(&all, 2.0, Distribution::Uniform, false, SeedMode::PerFact)),
        ("replace", experiment(&all, 0.5, Distribution::Normal, true, SeedMode::PerFact)),
    ];
    on_tiny_models(&cases, |what, naive, fast, heads| {
        let t_len = fast.tokens.len();
        let n = assert_same(what, naive, fast);
        assert_eq!(n, t_len * 3 * (5 + heads), "{what}: every cell compared");
        // One token per byte: "owned" is bytes 15..20.
        assert_eq!(fast.subject_range, (15, 20), "{what}");
        // Restoring the last token's final state gives back the clean prediction, with
        // or without severed paths.
        for kind in [Kind::Hidden, Kind::SeveredMlp, Kind::SeveredAttn] {
            let top_right = fast.scores[&kind].at(t_len - 1, 2);
            assert!(
                (top_right - fast.high_score).abs() <= TOLERANCE,
                "{what}: {kind} {top_right} vs high {}",
                fast.high_score
            );
        }
        // The corruption does something, and restoring states undoes some of it.
        assert!(fast.high_score != fast.low_score, "{what}: noise changed nothing");
        for (kind, table) in &fast.scores {
            let moved = table.computed().filter(|(_, s)| (s - fast.low_score).abs() > 1e-3).count();
            assert!(moved > 3, "{what}: {kind}: only {moved} cells differ from low_score");
        }
        // Severing changes the restored hidden state's effect.
        let hidden = &fast.scores[&Kind::Hidden];
        let severed = &fast.scores[&Kind::SeveredMlp];
        let differ = (15..t_len)
            .flat_map(|t| (0..3).map(move |l| (t, l)))
            .filter(|&(t, l)| (hidden.at(t, l) - severed.at(t, l)).abs() > 1e-4)
            .count();
        assert!(differ >= 3, "{what}: severing the MLPs changed only {differ} cells");
    });
}

/// Noising, every kind, both seed modes: the clean run with one state replaced by the
/// corrupted run's. Replacing the last token's final state gives the corrupted prediction;
/// a state that changes nothing scores the clean values.
#[test]
fn noising_fast_equals_naive_on_tiny_models() {
    let all = Kind::ALL;
    let noising = |mut r: Resolved| {
        r.experiment.direction = Direction::Noising;
        Resolved::new(r.experiment, r.noise).expect("valid")
    };
    let cases = [
        (
            "noising/rome",
            noising(experiment(&all, 1.0, Distribution::Normal, false, SeedMode::Rome)),
        ),
        (
            "noising/per-fact",
            noising(experiment(&all, 0.5, Distribution::Normal, true, SeedMode::PerFact)),
        ),
    ];
    on_tiny_models(&cases, |what, naive, fast, heads| {
        let t_len = fast.tokens.len();
        assert_eq!(assert_same(what, naive, fast), t_len * 3 * (5 + heads), "{what}");
        for kind in [Kind::Hidden, Kind::SeveredMlp, Kind::SeveredAttn] {
            for metric in Metric::ALL {
                let table = &fast.metrics[&kind][&metric];
                let (top_right, low) = (table.at(t_len - 1, 2), fast.corrupted.get(metric));
                assert!(
                    (f64::from(top_right) - low).abs() <= tolerance(metric),
                    "{what}: {kind} {metric}: last state {top_right} vs corrupted {low}"
                );
                // Before the subject nothing changes: the clean values.
                let (before, clean) = (table.at(0, 1), fast.clean.get(metric));
                assert!(
                    (f64::from(before) - clean).abs() <= tolerance(metric),
                    "{what}: {kind} {metric}: {before} vs clean {clean}"
                );
            }
        }
        for (kind, table) in &fast.scores {
            let moved =
                table.computed().filter(|(_, s)| (s - fast.high_score).abs() > 1e-3).count();
            assert!(moved > 3, "{what}: {kind}: only {moved} cells differ from high_score");
        }
        assert!(fast.clean.kl.abs() < 1e-9, "{what}: clean KL {}", fast.clean.kl);
        assert!(fast.corrupted.kl > 1e-4, "{what}: corrupted KL {}", fast.corrupted.kl);
        assert_ne!(fast.foil_id, fast.answer_id, "{what}");
    });
}

/// Before the subject a severed cell changes nothing: in ROME's seed mode it scores the
/// second draw's corrupted run (not low_score), in per-fact mode low_score.
#[test]
fn severed_no_ops_score_the_measured_run() {
    let loaded = tiny("llama");
    let tok = loaded.tokenizer().expect("tokenizer");
    let fact = FactInput {
        known_id: 3,
        prompt: "The Space Needle is in",
        subject: "Needle",
        expect: None,
        candidates: &[],
    };
    let opts = TraceOptions::default();
    for mode in [SeedMode::Rome, SeedMode::PerFact] {
        let exp =
            experiment(&[Kind::Hidden, Kind::SeveredAttn], 1.0, Distribution::Normal, false, mode);
        let fast = trace_fact(&loaded.model, tok, &fact, &exp, &opts, Path::Fast).expect("fast");
        let (b, _) = fast.subject_range;
        let severed = fast.scores[&Kind::SeveredAttn].at(0, 1);
        assert_eq!(fast.scores[&Kind::Hidden].at(b - 1, 0), fast.low_score);
        assert_eq!(fast.scores[&Kind::SeveredAttn].at(b - 1, 2), severed);
        match mode {
            SeedMode::Rome => assert!(
                (severed - fast.low_score).abs() > 1e-4,
                "the second draw is another corrupted run: {severed} vs {}",
                fast.low_score
            ),
            SeedMode::PerFact => assert_eq!(severed, fast.low_score),
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
        candidates: &[],
    };
    let exp = experiment(&Kind::ALL, 1.0, Distribution::Normal, false, SeedMode::Rome);
    let big = trace_fact(&loaded.model, tok, &fact, &exp, &TraceOptions::default(), Path::Fast)
        .expect("fast");
    let small = TraceOptions { max_batch_tokens: 1, ..TraceOptions::default() };
    let small = trace_fact(&loaded.model, tok, &fact, &exp, &small, Path::Fast).expect("fast");
    assert_same("batch bound", &big, &small);
    // Every token in one batch, cut into batches of one cell.
    let tiny_all = TraceOptions { max_batch_tokens: 1, tokens_per_batch: usize::MAX, layers: None };
    let tiny_all =
        trace_fact(&loaded.model, tok, &fact, &exp, &tiny_all, Path::Fast).expect("fast");
    assert_same("one cell per batch, all tokens", &big, &tiny_all);
}

/// Batching every token of a fact together takes one pass over the layers for all restored
/// cells (ROME's three kinds), besides the clean and corrupted runs: about L layer calls
/// where one token at a time takes about T × L.
#[test]
fn all_tokens_in_one_batch_take_one_pass_over_the_layers() {
    let loaded = tiny("llama");
    let tok = loaded.tokenizer().expect("tokenizer");
    let n_layers = loaded.model.dims().n_layers as u64;
    let exp = experiment(
        &[Kind::Hidden, Kind::Mlp, Kind::Attn],
        1.0,
        Distribution::Normal,
        false,
        SeedMode::Rome,
    );
    let calls = |opts: &TraceOptions| {
        let before = worker::forward::layer_calls();
        let trace = trace_fact(&loaded.model, tok, &OWNED, &exp, opts, Path::Fast).expect("fast");
        (worker::forward::layer_calls() - before, trace)
    };
    let (one, by_token) = calls(&TraceOptions::default());
    let all =
        TraceOptions { max_batch_tokens: 1 << 20, tokens_per_batch: usize::MAX, layers: None };
    let (together, all_tokens) = calls(&all);
    assert_same("all tokens together", &by_token, &all_tokens);
    let traced = (by_token.tokens.len() - by_token.subject_range.0) as u64;
    assert!(together <= 3 * n_layers, "{together} layer calls, L = {n_layers}");
    assert!(one >= traced * n_layers, "{one} layer calls one token at a time, {traced} tokens");
}

/// A token selector computes exactly those rows, with the numbers of the full trace, and a
/// layer range exactly those layers.
#[test]
fn token_selectors_and_layer_ranges_compute_their_share() {
    let loaded = tiny("qwen2");
    let tok = loaded.tokenizer().expect("tokenizer");
    let fact = FactInput {
        known_id: 2,
        prompt: "Apple A5 was created by",
        subject: "Apple",
        expect: None,
        candidates: &[],
    };
    let mut exp = experiment(&Kind::ALL, 1.0, Distribution::Normal, false, SeedMode::Rome);
    let opts = TraceOptions::default();
    let full = trace_fact(&loaded.model, tok, &fact, &exp, &opts, Path::Fast).expect("full");
    exp.experiment.tokens = Tokens(vec![TokenRole::LastSubject, TokenRole::Last]);
    let some = TraceOptions { layers: Some(1..3), ..TraceOptions::default() };
    let part = trace_fact(&loaded.model, tok, &fact, &exp, &some, Path::Fast).expect("part");
    let (_, e) = part.subject_range;
    let t_len = part.tokens.len();
    assert_eq!(part.traced_tokens, vec![e - 1, t_len - 1]);
    for (kind, table) in &part.scores {
        let cells: Vec<Cell> = table.computed().map(|(c, _)| c).collect();
        assert_eq!(
            cells.len(),
            2 * 2 * kind.heads(common::kinds::Geometry { n_layers: 3, n_heads: 4 })
        );
        for (cell, v) in table.computed() {
            assert!([e - 1, t_len - 1].contains(&cell.token) && cell.layer >= 1, "{kind} {cell:?}");
            let whole = full.scores[kind].get(cell);
            assert!((v - whole).abs() <= TOLERANCE, "{kind} {cell:?}: {v} vs {whole}");
        }
    }
}

/// SmolLM2 on real facts, every kind, Gaussian and uniform noise: the naive path on a sample
/// of cells in every region of the table (the full naive trace takes minutes per fact).
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
            candidates: &[],
        },
        FactInput {
            known_id: 1000,
            prompt: "Apple A5 was created by",
            subject: "Apple A5",
            expect: Some("Apple"),
            candidates: &[],
        },
    ];
    let n_layers = loaded.model.dims().n_layers;
    let opts = TraceOptions::default();
    for (i, fact) in facts.iter().enumerate() {
        // ROME's notebook adds Gaussian noise only: the severed kinds run per-fact with
        // uniform noise.
        let (distribution, mode) = if i == 0 {
            (Distribution::Normal, SeedMode::Rome)
        } else {
            (Distribution::Uniform, SeedMode::PerFact)
        };
        let mut exp = experiment(&Kind::ALL, 0.15, distribution, false, mode);
        let Corruption::Noise(n) = &mut exp.experiment.corruption else { panic!("noise") };
        n.samples = 3;
        exp.experiment.window = 10;
        let fast = trace_fact(&loaded.model, tok, fact, &exp, &opts, Path::Fast).expect("fast");
        let t_len = fast.tokens.len();
        let (b, e) = fast.subject_range;
        let cells = sample_cells(t_len, (b, e), n_layers);
        let without_heads: Vec<Kind> = Kind::ALL.into_iter().filter(|k| !k.has_heads()).collect();
        exp.experiment.kinds = without_heads;
        let naive =
            naive::trace(&loaded.model, tok, fact, &exp, &opts, Some(&cells)).expect("naive");
        let n = assert_same(fact.prompt, &naive, &fast_without_heads(&fast));
        assert_eq!(n, cells.len() * 5);
        // Heads: three cells, every head (a naive run per head).
        exp.experiment.kinds = vec![Kind::Head];
        let head_cells = [(e - 1, 3), (t_len - 1, n_layers - 2), (t_len - 2, n_layers - 1)];
        let naive =
            naive::trace(&loaded.model, tok, fact, &exp, &opts, Some(&head_cells)).expect("naive");
        let mut heads_only = fast.clone();
        heads_only.scores.retain(|k, _| *k == Kind::Head);
        let n = assert_same(fact.prompt, &naive, &heads_only);
        assert_eq!(n, 3 * loaded.model.dims().n_heads);
        assert_eq!(fast.correct, Some(true), "{}", fact.prompt);
    }
}

/// (token, layer) cells in every region of a fact's table, for a naive check of a real
/// model (its full naive trace takes minutes): before and at the subject, after it, the
/// last tokens, the first and last layers.
pub fn sample_cells(t_len: usize, (b, e): (usize, usize), n_layers: usize) -> Vec<(usize, usize)> {
    let mut cells = vec![
        (0, 0),
        (b, 0),
        (e - 1, 3),
        (e - 1, n_layers / 2),
        (e.min(t_len - 1), 7),
        (t_len - 1, 0),
        (t_len - 1, n_layers - 1),
        (t_len.saturating_sub(2), n_layers - 1),
    ];
    cells.sort_unstable();
    cells.dedup();
    cells
}

fn fast_without_heads(fast: &FactTrace) -> FactTrace {
    let mut t = fast.clone();
    t.scores.retain(|k, _| !k.has_heads());
    t
}
