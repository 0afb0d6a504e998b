//! Symmetric token replacement's donor (docs/science.md §3, "STR"): the fact whose subject
//! replaces this fact's subject in the corrupted prompt.
//!
//! The rule, exactly: among the facts after this one in the dataset's order (the whole file's
//! valid records, cyclic, whatever `--limit` says) with the same `relation_id`, the first
//! - whose attribute's first token (of `" " + attribute`) differs from this fact's and from
//!   the clean run's answer, and
//! - whose subject, put in place of this fact's subject (its first occurrence in the prompt),
//!   gives a prompt of the same number of tokens whose tokens outside the subject's token
//!   range equal this prompt's, and whose subject tokens do not (a donor that changes no
//!   token would corrupt nothing).
//!
//! [`candidates`] lists the same-relation facts in that order (the coordinator sends them
//! with each job, so workers need no dataset and all choose the same donor); [`choose`]
//! applies the token tests with the model's tokenizer.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::dataset::KnownFact;

/// A fact that may lend its subject: what the rule reads of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Its `known_id`.
    pub known_id: u64,
    /// Its subject.
    pub subject: String,
    /// Its attribute (the counterfactual answer, whose first token is the foil).
    pub attribute: String,
}

impl From<&KnownFact> for Candidate {
    fn from(f: &KnownFact) -> Self {
        Self { known_id: f.known_id, subject: f.subject.clone(), attribute: f.attribute.clone() }
    }
}

/// The facts with the same `relation_id` as `facts[i]`, starting after it and wrapping
/// around, itself excluded. Empty when the fact has no relation or `i` is out of range.
/// For many facts of one dataset, build [`Relations`] once instead.
pub fn candidates(facts: &[KnownFact], i: usize) -> Vec<Candidate> {
    Relations::new(facts).candidates(facts, i)
}

/// The positions of each relation's facts in a dataset, so that a fact's candidates cost
/// its relation's size, not the dataset's (a sweep asks for them at every lease).
#[derive(Debug, Clone, Default)]
pub struct Relations(HashMap<String, Vec<usize>>);

impl Relations {
    /// Indexes `facts` (file order).
    pub fn new(facts: &[KnownFact]) -> Self {
        let mut by_relation: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, f) in facts.iter().enumerate() {
            if let Some(r) = &f.relation_id {
                by_relation.entry(r.clone()).or_default().push(i);
            }
        }
        Self(by_relation)
    }

    /// [`candidates`] of `facts[i]`; `facts` must be the slice this index was built from.
    pub fn candidates(&self, facts: &[KnownFact], i: usize) -> Vec<Candidate> {
        let positions = facts
            .get(i)
            .and_then(|f| f.relation_id.as_ref())
            .and_then(|r| self.0.get(r))
            .map_or(&[][..], Vec::as_slice);
        let Ok(k) = positions.binary_search(&i) else { return Vec::new() };
        // After the fact to the end of the file, then from the start up to it.
        positions[k + 1..]
            .iter()
            .chain(&positions[..k])
            .map(|&j| Candidate::from(&facts[j]))
            .collect()
    }
}

/// What the rule needs from the model's tokenizer.
pub trait Encode {
    /// The tokenizer's error.
    type Error;
    /// A prompt's ids as the model reads them (with a BOS token when the model adds one).
    fn prompt_ids(&self, text: &str) -> Result<Vec<u32>, Self::Error>;
    /// The first token of `" " + attribute` (`None` for an empty encoding).
    fn first_answer_token(&self, attribute: &str) -> Result<Option<u32>, Self::Error>;
}

/// The fact being corrupted, as the rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct Recipient<'a> {
    /// Its prompt.
    pub prompt: &'a str,
    /// Its subject (first occurrence in the prompt is replaced).
    pub subject: &'a str,
    /// Its attribute.
    pub attribute: &'a str,
    /// The prompt's ids.
    pub ids: &'a [u32],
    /// The subject's token range `[b, e)` (ROME's `find_token_range`).
    pub range: (usize, usize),
    /// The clean run's answer.
    pub answer_id: u32,
}

/// The chosen donor and the corrupted prompt it gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Donor {
    /// The donor fact.
    pub candidate: Candidate,
    /// This prompt with the donor's subject in place of this fact's.
    pub prompt: String,
    /// Its ids: this prompt's outside the subject's range.
    pub ids: Vec<u32>,
    /// The first token of `" " + donor's attribute`: STR's foil.
    pub foil_id: u32,
}

/// Why no candidate qualified: how many failed each test (a candidate counts under the
/// first test it fails, in the rule's order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoDonor {
    /// Candidates considered (same relation).
    pub candidates: usize,
    /// Whose attribute's first token is this fact's or the clean answer.
    pub same_first_token: usize,
    /// Whose subject changes the prompt's number of tokens.
    pub other_length: usize,
    /// Whose subject changes a token outside the subject's range.
    pub other_tokens: usize,
    /// Whose subject gives this prompt's tokens exactly.
    pub same_subject_tokens: usize,
}

impl std::fmt::Display for NoDonor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.candidates == 0 {
            return write!(f, "no donor: no other fact has this fact's relation_id");
        }
        write!(
            f,
            "no donor among the {} facts of the same relation: {} share the first answer \
             token, {} change the prompt's token count, {} change tokens outside the subject, \
             {} give the same subject tokens",
            self.candidates,
            self.same_first_token,
            self.other_length,
            self.other_tokens,
            self.same_subject_tokens
        )
    }
}

/// Applies the rule to `candidates` in order. The outer error is the tokenizer's; the inner
/// one says why no candidate qualified.
pub fn choose<E: Encode>(
    enc: &E,
    fact: &Recipient<'_>,
    candidates: &[Candidate],
) -> Result<Result<Donor, NoDonor>, E::Error> {
    let own_first = enc.first_answer_token(fact.attribute)?;
    let (b, e) = fact.range;
    let mut why = NoDonor { candidates: candidates.len(), ..NoDonor::default() };
    for c in candidates {
        let Some(foil_id) = enc.first_answer_token(&c.attribute)? else {
            why.same_first_token += 1;
            continue;
        };
        if Some(foil_id) == own_first || foil_id == fact.answer_id {
            why.same_first_token += 1;
            continue;
        }
        let prompt = fact.prompt.replacen(fact.subject, &c.subject, 1);
        let ids = enc.prompt_ids(&prompt)?;
        if ids.len() != fact.ids.len() {
            why.other_length += 1;
        } else if ids[..b] != fact.ids[..b] || ids[e..] != fact.ids[e..] {
            why.other_tokens += 1;
        } else if ids[b..e] == fact.ids[b..e] {
            why.same_subject_tokens += 1;
        } else {
            return Ok(Ok(Donor { candidate: c.clone(), prompt, ids, foil_id }));
        }
    }
    Ok(Err(why))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::convert::Infallible;

    use super::*;

    /// Words with their leading space are tokens, as a BPE over whole words would make them;
    /// ids are assigned on first sight. "<bos>" first, like a model that adds BOS.
    #[derive(Default)]
    struct Words(std::cell::RefCell<HashMap<String, u32>>);

    impl Words {
        fn id(&self, w: &str) -> u32 {
            let mut map = self.0.borrow_mut();
            let n = map.len() as u32;
            *map.entry(w.to_string()).or_insert(n)
        }
        fn split(text: &str) -> Vec<String> {
            let mut out: Vec<String> = Vec::new();
            for (i, w) in text.split(' ').enumerate() {
                out.push(if i == 0 { w.to_string() } else { format!(" {w}") });
            }
            out.retain(|w| !w.is_empty());
            out
        }
    }

    impl Encode for Words {
        type Error = Infallible;
        fn prompt_ids(&self, text: &str) -> Result<Vec<u32>, Infallible> {
            let mut ids = vec![self.id("<bos>")];
            ids.extend(Self::split(text).iter().map(|w| self.id(w)));
            Ok(ids)
        }
        fn first_answer_token(&self, attribute: &str) -> Result<Option<u32>, Infallible> {
            Ok(Self::split(&format!(" {attribute}")).first().map(|w| self.id(w)))
        }
    }

    fn fact(id: u64, rel: &str, subject: &str, attribute: &str, prompt: &str) -> KnownFact {
        KnownFact {
            known_id: id,
            subject: subject.into(),
            attribute: attribute.into(),
            prompt: prompt.into(),
            template: None,
            prediction: None,
            relation_id: (!rel.is_empty()).then(|| rel.into()),
        }
    }

    fn pick(words: &Words, facts: &[KnownFact], i: usize, answer: &str) -> Result<Donor, NoDonor> {
        let f = &facts[i];
        let ids = words.prompt_ids(&f.prompt).unwrap_or_else(|e| match e {});
        let n = Words::split(&f.subject).len();
        // The test prompts start with the subject: its tokens follow <bos>.
        let recipient = Recipient {
            prompt: &f.prompt,
            subject: &f.subject,
            attribute: &f.attribute,
            ids: &ids,
            range: (1, 1 + n),
            answer_id: words.id(&format!(" {answer}")),
        };
        choose(words, &recipient, &candidates(facts, i)).unwrap_or_else(|e| match e {})
    }

    #[test]
    fn candidates_follow_the_file_cyclically_within_the_relation() {
        let facts = [
            fact(10, "P1", "a", "x", "a is"),
            fact(11, "P2", "b", "x", "b is"),
            fact(12, "P1", "c", "x", "c is"),
            fact(13, "", "d", "x", "d is"),
            fact(14, "P1", "e", "x", "e is"),
        ];
        let ids = |i| candidates(&facts, i).iter().map(|c| c.known_id).collect::<Vec<_>>();
        assert_eq!(ids(2), [14, 10]);
        assert_eq!(ids(4), [10, 12]);
        assert_eq!(ids(1), Vec::<u64>::new(), "alone in its relation");
        assert_eq!(ids(3), Vec::<u64>::new(), "no relation_id");
        assert_eq!(ids(9), Vec::<u64>::new(), "out of range");
        // The index gives the same lists as a scan of the file in cyclic order.
        let index = Relations::new(&facts);
        for i in 0..facts.len() {
            let scan: Vec<u64> = (1..facts.len())
                .map(|k| &facts[(i + k) % facts.len()])
                .filter(|f| f.relation_id.is_some() && f.relation_id == facts[i].relation_id)
                .map(|f| f.known_id)
                .collect();
            let indexed: Vec<u64> =
                index.candidates(&facts, i).iter().map(|c| c.known_id).collect();
            assert_eq!(indexed, scan, "fact {i}");
        }
    }

    #[test]
    fn the_first_candidate_that_passes_every_test_is_the_donor() {
        let facts = [
            fact(0, "P17", "Paris", "France", "Paris is located in"),
            // Same relation, but its answer's first token is this fact's.
            fact(1, "P103", "Rome", "Italy", "Rome is located in"),
            fact(2, "P17", "Lyon", "France", "Lyon is located in"),
            // Two tokens for one: the prompt's length changes.
            fact(3, "P17", "New Delhi", "India", "New Delhi is located in"),
            // Its first answer token is the clean run's answer.
            fact(4, "P17", "Berlin", "Germany", "Berlin is located in"),
            fact(5, "P17", "Madrid", "Spain", "Madrid is located in"),
            fact(6, "P17", "Oslo", "Norway", "Oslo is located in"),
        ];
        let words = Words::default();
        let d = pick(&words, &facts, 0, "Germany").expect("a donor");
        assert_eq!(d.candidate.known_id, 5);
        assert_eq!(d.prompt, "Madrid is located in");
        assert_eq!(d.foil_id, words.id(" Spain"));
        let clean = words.prompt_ids(&facts[0].prompt).unwrap_or_else(|e| match e {});
        assert_eq!((d.ids.len(), &d.ids[2..]), (clean.len(), &clean[2..]));
        assert_ne!(d.ids[1], clean[1]);
        // From fact 6 the order wraps: 0 (France ≠ Norway) comes first.
        assert_eq!(pick(&words, &facts, 6, "Norway").expect("donor").candidate.known_id, 0);
    }

    #[test]
    fn no_donor_says_why() {
        let facts = [
            fact(0, "P17", "Paris", "France", "Paris, capital of France, is in"),
            fact(1, "P17", "Lyon", "France", "Lyon is in"),
            fact(2, "P17", "New Delhi", "India", "New Delhi is in"),
            fact(3, "P17", "Paris", "Texas", "Paris is in"),
            fact(4, "P30", "Kenya", "Africa", "Kenya is in"),
        ];
        let words = Words::default();
        let why = pick(&words, &facts, 0, "France").expect_err("no donor");
        // Lyon: same first token; New Delhi: one token more; Paris (Texas): same subject.
        assert_eq!(
            why,
            NoDonor {
                candidates: 3,
                same_first_token: 1,
                other_length: 1,
                other_tokens: 0,
                same_subject_tokens: 1
            }
        );
        assert!(why.to_string().contains("among the 3 facts"), "{why}");
        let alone = pick(&words, &facts, 4, "Africa").expect_err("alone");
        assert_eq!(alone.candidates, 0);
        assert!(alone.to_string().contains("relation_id"), "{alone}");
    }

    /// A subject that occurs twice: only its first occurrence is replaced, so the second
    /// stays and the tokens after the range are unchanged.
    #[test]
    fn only_the_first_occurrence_is_replaced() {
        let facts = [
            fact(0, "P1", "Jaguar", "Tata", "Jaguar cars: Jaguar is owned by"),
            fact(1, "P1", "Volvo", "Geely", "Volvo is owned by"),
        ];
        let words = Words::default();
        let d = pick(&words, &facts, 0, "Tata").expect("donor");
        assert_eq!(d.prompt, "Volvo cars: Jaguar is owned by");
    }
}
