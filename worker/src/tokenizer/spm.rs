//! SentencePiece vocabularies in GGUF files (`tokenizer.ggml.model = "llama"`), rebuilt as
//! transformers' GGUF loader rebuilds them, so the ids equal
//! `AutoTokenizer.from_pretrained(dir, gguf_file=name)`'s.
//!
//! Only Gemma's (architectures `gemma`, `gemma2`, `gemma3`) is implemented: transformers builds
//! those with `GemmaTokenizer` (`integrations/gguf/gguf_tokenizer_mapping.py`,
//! `gemma_tokenizer`), and Gemma 3 270M is the SentencePiece model the engine is checked on.
//! Its shape:
//! - a BPE model with byte fallback (`<0xNN>` pieces) over the file's pieces, whose merges the
//!   file does not list: they are rebuilt from the vocabulary by transformers'
//!   `generate_merges`, ranked by each piece's position in the file (Gemma's scores do not
//!   follow its merge order);
//! - pieces made only of two or more spaces are stored with real spaces but looked up as
//!   `▁▁…`, so they are respelled first;
//! - no prefix space (Gemma ignores `add_space_prefix`): the normalizer only writes each space
//!   as `▁`, and the decoder writes it back;
//! - control pieces (token type 3) are special added tokens, user-defined ones (type 4) plain
//!   added tokens, and `<bos>` is prepended unless `tokenizer.ggml.add_bos_token` is false.

use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper};

use serde_json::{Value, json};

/// The GGUF architectures whose SentencePiece vocabulary is built as Gemma's.
pub(super) const GEMMA_ARCHITECTURES: [&str; 3] = ["gemma", "gemma2", "gemma3"];

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// SentencePiece's space marker.
const SPACE: char = '\u{2581}';

/// Everything a Gemma tokenizer is made of, before it is assembled.
pub(super) struct GemmaParts {
    /// The BPE model (byte fallback, merges rebuilt from the vocabulary).
    pub model: BPE,
    /// Spaces written as `▁`.
    pub normalizer: NormalizerWrapper,
    /// `GemmaTokenizer`'s split on spaces. It never fires (the normalizer has already replaced
    /// every space) but is kept so the pipeline is the one transformers runs.
    pub pre_tokenizer: PreTokenizerWrapper,
    /// `▁` back to a space, byte pieces back to bytes.
    pub decoder: DecoderWrapper,
    /// Control pieces, matched whole and special.
    pub special: Vec<AddedToken>,
    /// User-defined pieces (`\n`, `\t\t`, `<h1>` …), matched whole but not special.
    pub user_defined: Vec<AddedToken>,
}

/// Builds Gemma's tokenizer from the file's pieces (`tokenizer.ggml.tokens`), their types
/// (`tokenizer.ggml.token_type`, empty when absent) and the ids the file names as BOS, EOS,
/// unknown and padding (special whatever their type, as transformers makes its named special
/// tokens). `Err` carries the `tokenizers` message.
pub(super) fn gemma(
    tokens: &[String],
    types: &[i64],
    named: &[usize],
) -> Result<GemmaParts, String> {
    let respelled: Vec<String> = tokens.iter().map(|t| respell_spaces(t)).collect();
    // The rank of a merge is its piece's position, earliest first: transformers passes
    // `{token: -index}` as the scores.
    let positions: Vec<f64> = (0..respelled.len()).map(|i| -(i as f64)).collect();
    let vocab = vocabulary(&respelled);
    let merges = generate_merges(&respelled, &vocab, &positions);

    // Which added tokens, and in what role, is decided on the file's own spelling, as
    // transformers' `add_gguf_special_tokens` does: a user-defined piece of spaces ("  ") is
    // not in the respelled vocabulary, so it stays an ordinary piece (`▁▁`), found by BPE.
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        match types.get(id).copied() {
            _ if named.contains(&id) => special.push(AddedToken::from(token.as_str(), true)),
            Some(TOKEN_TYPE_CONTROL) => special.push(AddedToken::from(token.as_str(), true)),
            Some(TOKEN_TYPE_USER_DEFINED) if vocab.contains_key(token) => {
                user_defined.push(AddedToken::from(token.as_str(), false).normalized(false))
            }
            _ => {}
        }
    }

    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        // `GemmaTokenizer` names the unknown piece "<unk>" whatever the file says; with byte
        // fallback it is used only if a byte piece is missing.
        .unk_token("<unk>".into())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(GemmaParts {
        model,
        normalizer: component(
            json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
        )?,
        pre_tokenizer: component(json!({"type": "Split", "pattern": {"String": " "},
                                        "behavior": "MergedWithPrevious", "invert": false}))?,
        decoder: component(json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]}))?,
        special,
        user_defined,
    })
}

/// A pipeline part from its `tokenizer.json` description.
fn component<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// A piece made only of whitespace, with at least one space, spelled with `▁`, one per
/// character, as transformers' `gemma_tokenizer` respells it (`" " in t and not t.strip()`).
/// In Gemma's files these are the runs of 2 to 31 spaces.
fn respell_spaces(token: &str) -> String {
    if token.contains(' ') && token.chars().all(python_isspace) {
        SPACE.to_string().repeat(token.chars().count())
    } else {
        token.to_string()
    }
}

/// Python's `str.isspace` for one character: Unicode White_Space plus the four ASCII
/// separators U+001C–U+001F that Python also strips.
fn python_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Each piece's id, as a Python dict built from the pieces maps them: a repeated piece keeps
/// its last id.
pub(super) fn vocabulary(tokens: &[String]) -> Vocab {
    tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect()
}

/// transformers' `generate_merges(vocab, vocab_scores)` (`tokenization_utils_base.py`): every
/// way to cut a piece in two halves that are both pieces is a merge; merges are ranked by
/// their piece's score, highest first, then by the left half's length and the right half's
/// length in characters, longest first, ties keeping the order they were found in (pieces in
/// vocabulary order, and within a piece by the halves' ids).
///
/// Repeated pieces behave as the Python dicts do: a piece's id and score are those of its last
/// occurrence, and it is visited at its first. Runs in one pass over the pieces' characters
/// with borrowed lookups in `vocab` (the [`vocabulary`] of `tokens`, which the BPE model then
/// takes over) and one sort, so Gemma's 262,144 pieces take well under a second.
pub(super) fn generate_merges(tokens: &[String], vocab: &Vocab, scores: &[f64]) -> Merges {
    /// One merge before ranking: the piece (by its id) and where it is cut (a byte offset).
    struct Candidate {
        score: f64,
        left_chars: u32,
        right_chars: u32,
        token: u32,
        cut: u32,
    }

    let mut visited = vec![false; tokens.len()];
    let mut candidates = Vec::new();
    let mut local: Vec<(u32, u32, u32, u32)> = Vec::new();
    for token in tokens {
        let Some(&id) = vocab.get(token.as_str()) else { continue };
        if std::mem::replace(&mut visited[id as usize], true) {
            continue;
        }
        // `+ 0.0` makes -0.0 equal to 0.0, as Python compares them; a missing score is 0.
        let score = scores.get(id as usize).copied().unwrap_or(0.0) + 0.0;
        local.clear();
        for (chars, (cut, _)) in token.char_indices().enumerate().skip(1) {
            let (left, right) = token.split_at(cut);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                local.push((l, r, cut as u32, chars as u32));
            }
        }
        local.sort_by_key(|&(l, r, _, _)| (l, r));
        let total = token.chars().count() as u32;
        candidates.extend(local.iter().map(|&(_, _, cut, chars)| Candidate {
            score,
            left_chars: chars,
            right_chars: total - chars,
            token: id,
            cut,
        }));
    }
    // Python's `sorted(..., reverse=True)` is stable, like `sort_by` with reversed keys.
    candidates.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    candidates
        .iter()
        .map(|c| {
            let (left, right) = tokens[c.token as usize].split_at(c.cut as usize);
            (left.to_string(), right.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn pairs(items: &[(&str, &str)]) -> Merges {
        items.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    /// Ranked by position (Gemma): pieces in file order, and within a piece the longest left
    /// half first. The expected list is what transformers' `generate_merges` returns for
    /// `vocab = {t: i}` and `vocab_scores = {t: -i}` on this vocabulary.
    #[test]
    fn merges_follow_positions_then_left_length() {
        let tokens = strings(&["a", "b", "c", "ab", "abc", "bc", "▁", "▁a", "▁▁", "é", "éa"]);
        let positions: Vec<f64> = (0..tokens.len()).map(|i| -(i as f64)).collect();
        assert_eq!(
            generate_merges(&tokens, &vocabulary(&tokens), &positions),
            pairs(&[
                ("a", "b"),
                ("ab", "c"),
                ("a", "bc"),
                ("b", "c"),
                ("▁", "a"),
                ("▁", "▁"),
                ("é", "a"),
            ])
        );
    }

    /// Ranked by real scores with ties: equal scores fall back to the left half's length, then
    /// the right half's, then the order found (vocabulary order). Checked against
    /// transformers 5.24's `generate_merges({t: i}, dict(zip(tokens, scores)))`:
    /// `[('ab','c'), ('a','bc'), ('c','d'), ('a','b'), ('b','c'), ('x','y')]`.
    #[test]
    fn merges_rank_by_score_then_lengths() {
        let tokens = strings(&["a", "b", "c", "d", "x", "y", "ab", "bc", "cd", "abc", "xy"]);
        let scores = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -2.0, -2.0, -1.0, -1.0, -3.0];
        assert_eq!(
            generate_merges(&tokens, &vocabulary(&tokens), &scores),
            pairs(&[("ab", "c"), ("a", "bc"), ("c", "d"), ("a", "b"), ("b", "c"), ("x", "y")])
        );
    }

    /// A repeated piece is visited once, where it first occurs, with its last id's score.
    #[test]
    fn repeated_pieces_count_once() {
        // "ab" scores -1 (its last), so it ranks before "cd" (-2); with its first (-5) it
        // would rank after. transformers gives `[('a','b'), ('c','d')]`.
        let tokens = strings(&["ab", "a", "b", "cd", "c", "d", "ab"]);
        let scores = [-5.0, 0.0, 0.0, -2.0, 0.0, 0.0, -1.0];
        assert_eq!(
            generate_merges(&tokens, &vocabulary(&tokens), &scores),
            pairs(&[("a", "b"), ("c", "d")])
        );
    }

    #[test]
    fn only_space_pieces_are_respelled() {
        assert_eq!(respell_spaces("  "), "▁▁");
        assert_eq!(respell_spaces(" \t "), "▁▁▁");
        assert_eq!(respell_spaces(" "), "▁");
        assert_eq!(respell_spaces("\n\n"), "\n\n");
        assert_eq!(respell_spaces(" a"), " a");
        assert_eq!(respell_spaces("▁▁"), "▁▁");
    }

    /// A miniature Gemma vocabulary: BPE by position, byte fallback for unknown characters,
    /// spaces as `▁`, control pieces special, a user-defined piece of spaces left to BPE.
    #[test]
    fn builds_a_working_gemma_tokenizer() -> Result<(), String> {
        let mut tokens = strings(&["<pad>", "<eos>", "<bos>", "<unk>", "\n", "  ", "▁", "a"]);
        let mut types = vec![3, 3, 3, 3, 4, 4, 1, 1];
        tokens.extend((0..=255).map(|b| format!("<0x{b:02X}>")));
        types.extend([6; 256]);
        tokens.extend(strings(&["b", "ab", "▁ab", "▁▁"]));
        types.extend([1; 4]);
        let parts = gemma(&tokens, &types, &[2])?;
        assert_eq!(parts.special.len(), 4);
        assert_eq!(parts.user_defined.len(), 1, "only \\n: \"  \" is spelled ▁▁ in the vocabulary");
        let mut tok = tokenizers::Tokenizer::new(parts.model);
        tok.with_normalizer(Some(parts.normalizer)).map_err(|e| e.to_string())?;
        tok.with_pre_tokenizer(Some(parts.pre_tokenizer));
        tok.with_decoder(Some(parts.decoder));
        tok.add_special_tokens(parts.special).map_err(|e| e.to_string())?;
        tok.add_tokens(parts.user_defined).map_err(|e| e.to_string())?;
        let ids = |text: &str| -> Result<Vec<u32>, String> {
            Ok(tok.encode(text, false).map_err(|e| e.to_string())?.get_ids().to_vec())
        };
        let (ab, space_ab, spaces) = (265, 266, 267);
        assert_eq!(ids("ab ab")?, vec![ab, space_ab]);
        assert_eq!(ids("<bos>a\n")?, vec![2, 7, 4]);
        // "▁▁ab": a+b ranks before ▁+ab, which ranks before ▁+▁ (positions 265, 266, 267).
        assert_eq!(ids("  ab")?, vec![6, space_ab]);
        assert_eq!(ids("▁▁")?, vec![spaces]);
        // Byte fallback: é is C3 A9, pieces 8 + 0xC3 and 8 + 0xA9.
        let e_acute = ids("é")?;
        assert_eq!(e_acute, vec![8 + 0xC3, 8 + 0xA9]);
        let decode = |ids: &[u32]| tok.decode(ids, false).map_err(|e| e.to_string());
        assert_eq!(decode(&e_acute)?, "é");
        assert_eq!(decode(&[2, ab, space_ab, 4])?, "<bos>ab ab\n");
        Ok(())
    }
}
