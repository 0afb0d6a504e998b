//! Symmetric token replacement (`--corruption str`): the corrupted run is the donor's prompt,
//! the fast path equals the naive one, and a fact without a donor is an error that says why.
//!
//! SmolLM2 only: the tiny models' byte tokenizer gives every answer the same first token
//! (the space), so no fact there has a donor.

use candle_core::IndexOp;
use common::dataset::{KnownFact, read_knowns_file};
use common::donor::{Candidate, candidates};
use common::experiment::{Corruption, Experiment, Resolved, TokenRole, Tokens};
use common::kinds::Kind;
use worker::forward::Logits;
use worker::trace::naive;
use worker::trace::{Correctness, FactInput, Path, TraceOptions, trace_fact};

use crate::trace::{assert_same, sample_cells};
use crate::util::{ids, knowns_path, logits, smollm2};

fn str_experiment(kinds: &[Kind]) -> Resolved {
    let e = Experiment {
        corruption: Corruption::Str,
        kinds: kinds.to_vec(),
        correctness: Correctness::None,
        ..Experiment::rome()
    };
    Resolved::new(e, None).expect("STR")
}

/// known_1000's facts with these ids, each with its donor candidates.
fn facts(known_ids: &[u64]) -> Vec<(KnownFact, Vec<Candidate>)> {
    let knowns = read_knowns_file(&knowns_path()).expect("knowns");
    known_ids
        .iter()
        .map(|id| {
            let i = knowns.facts.iter().position(|f| f.known_id == *id).expect("fact");
            (knowns.facts[i].clone(), candidates(&knowns.facts, i))
        })
        .collect()
}

fn input<'a>(fact: &'a KnownFact, pool: &'a [Candidate]) -> FactInput<'a> {
    FactInput {
        known_id: fact.known_id,
        prompt: &fact.prompt,
        subject: &fact.subject,
        expect: Some(&fact.attribute),
        candidates: pool,
    }
}

/// The corrupted run is the donor's prompt run as it is: `low_score` is p(answer) of a
/// plain forward of the donor prompt's tokens (within 1e-6: the same arithmetic, the
/// embeddings replaced instead of looked up), and restoring the last layer's hidden state at
/// the last token gives the clean run back.
#[test]
fn the_corrupted_run_is_the_donor_prompt() {
    let loaded = smollm2();
    let tok = loaded.tokenizer().expect("tokenizer");
    for (fact, pool) in facts(&[78, 7]) {
        let mut exp = str_experiment(&[Kind::Hidden]);
        exp.experiment.tokens = Tokens(vec![TokenRole::Last]);
        let opts = TraceOptions::default();
        let trace = trace_fact(&loaded.model, tok, &input(&fact, &pool), &exp, &opts, Path::Fast)
            .expect("trace");
        let donor = trace.donor.as_ref().expect("a donor");
        assert!(trace.noise_level.is_none(), "no noise");
        let donor_ids = tok.encode(&donor.prompt).expect("encode");
        assert_eq!(donor_ids.len(), trace.token_ids.len());
        let z = logits(&loaded.model, &ids(&[donor_ids]), Logits::Last);
        let probs = worker::forward::probabilities(&z.i(0).expect("row")).expect("softmax");
        let p: f32 = probs.i(trace.answer_id as usize).and_then(|p| p.to_scalar()).expect("p");
        assert!(
            (p - trace.low_score).abs() <= 1e-6,
            "{}: {p} vs {}",
            fact.known_id,
            trace.low_score
        );
        let last = trace.tokens.len() - 1;
        let n_layers = loaded.model.dims().n_layers;
        let restored = trace.scores[&Kind::Hidden].at(last, n_layers - 1);
        assert!((restored - trace.high_score).abs() <= 1e-6, "{restored} vs {}", trace.high_score);
        assert_ne!(donor.foil_id, trace.answer_id);
    }
}

/// Every kind, fast against naive, on facts whose subject starts the prompt and does not
/// (tolerance as in `trace.rs`: 1e-5). Heads at two cells: a fast trace of every head of
/// every token costs minutes.
#[test]
fn fast_equals_naive_under_str() {
    let loaded = smollm2();
    let tok = loaded.tokenizer().expect("tokenizer");
    let opts = TraceOptions::default();
    let n_layers = loaded.model.dims().n_layers;
    let token_kinds: Vec<Kind> = Kind::ALL.into_iter().filter(|k| !k.has_heads()).collect();
    // Fact 7 (subject after the first token) with every kind, 78 (subject first) with two.
    for ((fact, pool), kinds) in
        facts(&[7, 78]).iter().zip([&token_kinds[..], &[Kind::Hidden, Kind::Attn]])
    {
        let fact = input(fact, pool);
        let mut exp = str_experiment(kinds);
        let fast = trace_fact(&loaded.model, tok, &fact, &exp, &opts, Path::Fast).expect("fast");
        let t_len = fast.tokens.len();
        let (b, e) = fast.subject_range;
        let cells = sample_cells(t_len, (b, e), n_layers);
        let naive =
            naive::trace(&loaded.model, tok, &fact, &exp, &opts, Some(&cells[..])).expect("naive");
        assert_eq!(assert_same(fact.prompt, &naive, &fast), cells.len() * kinds.len());
        assert_eq!(naive.donor, fast.donor);
        // The severed kinds freeze the corrupted run's own states (one run, no second draw):
        // before the subject they score low_score, as hidden does.
        if b > 0 {
            for kind in [Kind::Hidden, Kind::SeveredMlp, Kind::SeveredAttn] {
                assert!(kinds.contains(&kind));
                let v = fast.scores[&kind].at(0, 0);
                assert!((v - fast.low_score).abs() <= 1e-6, "{kind}: {v}");
            }
        }
        exp.experiment.kinds = vec![Kind::Head];
        exp.experiment.tokens = Tokens(vec![TokenRole::LastSubject, TokenRole::Last]);
        let fast = trace_fact(&loaded.model, tok, &fact, &exp, &opts, Path::Fast).expect("fast");
        let head_cells = [(e - 1, 3), (t_len - 1, n_layers - 2)];
        let naive = naive::trace(&loaded.model, tok, &fact, &exp, &opts, Some(&head_cells[..]))
            .expect("naive");
        let n = assert_same(fact.prompt, &naive, &fast);
        assert_eq!(n, head_cells.len() * loaded.model.dims().n_heads);
    }
}

/// No candidate qualifies: an error for this fact that counts each test's failures; no
/// attribute: an error too (the rule needs it).
#[test]
fn a_fact_without_a_donor_says_why() {
    let loaded = smollm2();
    let tok = loaded.tokenizer().expect("tokenizer");
    let exp = str_experiment(&[Kind::Hidden]);
    let opts = TraceOptions::default();
    let pool = vec![
        // Same first answer token as the fact's.
        Candidate { known_id: 1, subject: "Heinrich Himmler".into(), attribute: "Berlin".into() },
        // Another token count.
        Candidate { known_id: 2, subject: "Max".into(), attribute: "Munich".into() },
    ];
    let fact = FactInput {
        known_id: 78,
        prompt: "Joseph Goebbels worked in the city of",
        subject: "Joseph Goebbels",
        expect: Some("Berlin"),
        candidates: &pool,
    };
    let err = trace_fact(&loaded.model, tok, &fact, &exp, &opts, Path::Fast)
        .expect_err("no donor")
        .to_string();
    assert!(err.contains("no donor among the 2 facts"), "{err}");
    assert!(err.contains("1 share the first answer token, 1 change the prompt's token count"));
    let without = FactInput { expect: None, ..fact };
    let err = trace_fact(&loaded.model, tok, &without, &exp, &opts, Path::Naive)
        .expect_err("no attribute")
        .to_string();
    assert!(err.contains("needs the fact's attribute"), "{err}");
}

/// STR against an independent reference: plain PyTorch forward hooks on transformers'
/// SmolLM2 (`tools/patching_reference.py`, which chooses the donor by its own reading of
/// the rule), four facts (subject first, after other tokens, one token before the last,
/// one token at 0): the same donor and foil, `high_score`/`low_score`, and every cell of
/// the hidden, mlp and attn tables within 1e-4 (p(answer); measured: 8.1e-6 at most over
/// the 2790 cells, f32 sums in other orders).
#[test]
fn str_equals_an_independent_pytorch_reference() {
    const TOLERANCE: f64 = 1e-4;
    let loaded = smollm2();
    let tok = loaded.tokenizer().expect("tokenizer");
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::util::fixture("smollm2/patching.json")).expect("fixture"),
    )
    .expect("json");
    let kinds = [Kind::Hidden, Kind::Mlp, Kind::Attn];
    let exp = str_experiment(&kinds);
    let opts = TraceOptions::default();
    let mut compared = 0;
    for expected in fixture["facts"].as_array().expect("facts") {
        let known_id = expected["known_id"].as_u64().expect("id");
        let (fact, pool) = facts(&[known_id]).remove(0);
        let trace = trace_fact(&loaded.model, tok, &input(&fact, &pool), &exp, &opts, Path::Fast)
            .expect("trace");
        let reference = &expected["corruptions"]["str"];
        let donor = trace.donor.as_ref().expect("donor");
        assert_eq!(donor.known_id, expected["donor"]["known_id"].as_u64().expect("donor"));
        assert_eq!(u64::from(donor.foil_id), reference["foil_id"].as_u64().expect("foil"));
        assert_eq!(u64::from(trace.answer_id), expected["answer_id"].as_u64().expect("answer"));
        let close = |what: &str, ours: f32, theirs: &serde_json::Value| {
            let theirs = theirs.as_f64().expect("number");
            assert!(
                (f64::from(ours) - theirs).abs() <= TOLERANCE,
                "fact {known_id} {what}: ours {ours}, reference {theirs}"
            );
        };
        close("high_score", trace.high_score, &reference["clean"]["prob"]);
        close("low_score", trace.low_score, &reference["corrupted"]["prob"]);
        for kind in kinds {
            let rows = reference["denoising"][kind.name()]["prob"].as_array().expect("table");
            assert_eq!(rows.len(), trace.tokens.len());
            for (t, row) in rows.iter().enumerate() {
                for (l, cell) in row.as_array().expect("row").iter().enumerate() {
                    close(&format!("{kind} ({t}, {l})"), trace.scores[&kind].at(t, l), cell);
                    compared += 1;
                }
            }
        }
    }
    // Facts of 10, 11, 6 and 4 tokens, 30 layers, three kinds.
    assert_eq!(compared, (10 + 11 + 6 + 4) * 30 * 3);
}
