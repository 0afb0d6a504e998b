//! Symmetric token replacement (`--corruption str`): the corrupted run is the donor's prompt,
//! the fast path equals the naive one, and a fact without a donor is an error that says why.
//!
//! SmolLM2 only: the tiny models' byte tokenizer gives every answer the same first token
//! (the space), so no fact there has a donor.

use candle_core::IndexOp;
use common::dataset::{KnownFact, read_knowns_file};
use common::donor::{Candidate, candidates};
use common::experiment::{Corruption, Direction, Experiment, Resolved, TokenRole, Tokens};
use common::kinds::Kind;
use worker::forward::Logits;
use worker::trace::naive;
use worker::trace::{Correctness, FactInput, Path, TraceOptions, trace_fact};

use crate::trace::{assert_same, sample_cells};
use crate::util::{ids, knowns_path, logits, smollm2};

pub fn str_experiment(kinds: &[Kind]) -> Resolved {
    let e = Experiment {
        corruption: Corruption::Str,
        kinds: kinds.to_vec(),
        correctness: Correctness::None,
        ..Experiment::rome()
    };
    Resolved::new(e, None).expect("STR")
}

/// known_1000's facts with these ids, each with its donor candidates.
pub fn facts(known_ids: &[u64]) -> Vec<(KnownFact, Vec<Candidate>)> {
    let knowns = read_knowns_file(&knowns_path()).expect("knowns");
    known_ids
        .iter()
        .map(|id| {
            let i = knowns.facts.iter().position(|f| f.known_id == *id).expect("fact");
            (knowns.facts[i].clone(), candidates(&knowns.facts, i))
        })
        .collect()
}

pub fn input<'a>(fact: &'a KnownFact, pool: &'a [Candidate]) -> FactInput<'a> {
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

/// Every kind, fast against naive, in both directions, on facts whose subject starts the
/// prompt and does not (tolerances as in `trace.rs`). Heads at two cells: a fast trace of every head of
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
        // Noising (the clean run with the donor's states): every kind, the same cells.
        let mut noising = str_experiment(kinds);
        noising.experiment.direction = Direction::Noising;
        let fast =
            trace_fact(&loaded.model, tok, &fact, &noising, &opts, Path::Fast).expect("fast");
        let naive = naive::trace(&loaded.model, tok, &fact, &noising, &opts, Some(&cells[..]))
            .expect("naive");
        let what = format!("{} noising", fact.prompt);
        assert_eq!(assert_same(&what, &naive, &fast), cells.len() * kinds.len());
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
