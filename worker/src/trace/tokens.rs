//! Where the subject is among the prompt's tokens.

/// ROME's `find_token_range`: the tokens `[b, e)` covering the first occurrence of `subject`
/// in the concatenation of the prompt's tokens, each decoded alone. Character positions count
/// Unicode scalar values, as Python's `str` does. `None` if the subject does not occur.
pub fn find_token_range(tokens: &[String], subject: &str) -> Option<(usize, usize)> {
    if subject.is_empty() {
        return None;
    }
    let whole: String = tokens.concat();
    let byte_loc = whole.find(subject)?;
    let char_loc = whole[..byte_loc].chars().count();
    let subject_len = subject.chars().count();
    let mut loc = 0;
    let mut start = None;
    for (i, t) in tokens.iter().enumerate() {
        loc += t.chars().count();
        if start.is_none() && loc > char_loc {
            start = Some(i);
        }
        if loc >= char_loc + subject_len {
            return start.map(|b| (b, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_romes_ranges() {
        let t = toks(&["Be", "ats", " Music", " is", " owned", " by"]);
        assert_eq!(find_token_range(&t, "Beats Music"), Some((0, 3)));
        assert_eq!(find_token_range(&t, "Music"), Some((2, 3)));
        // A subject that starts inside a token takes that whole token.
        assert_eq!(find_token_range(&t, "ats"), Some((1, 2)));
        assert_eq!(find_token_range(&t, "eats Mu"), Some((0, 3)));
        assert_eq!(find_token_range(&t, "Apple"), None);
        assert_eq!(find_token_range(&t, ""), None);
        // Characters, not bytes, as in Python.
        let t = toks(&["Café", " Nero", " is"]);
        assert_eq!(find_token_range(&t, "Nero"), Some((1, 2)));
    }
}
