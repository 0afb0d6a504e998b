//! The knowns dataset: facts a model may or may not know.
//!
//! The format is the one of ROME's `known_1000.json` (Meng et al., NeurIPS 2022): a JSON array
//! of records with `known_id`, `subject`, `attribute`, `template`, `prediction`, `prompt` and
//! `relation_id`. Only `known_id`, `subject`, `attribute` and `prompt` are needed to trace a
//! fact; the others are kept when present. A broken record is reported with its position and
//! field and never stops the others from loading.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One fact: "`prompt`" should be completed by "` attribute`".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnownFact {
    /// The dataset's id of the fact; unique within a dataset.
    pub known_id: u64,
    /// The subject as it appears, character for character, inside `prompt`.
    pub subject: String,
    /// The expected completion, without its leading space.
    pub attribute: String,
    /// The prompt: the text the model continues.
    pub prompt: String,
    /// The template the prompt came from, `{}` standing for the subject.
    #[serde(default)]
    pub template: Option<String>,
    /// GPT-2 XL's greedy continuation, as recorded by ROME.
    #[serde(default)]
    pub prediction: Option<String>,
    /// The Wikidata relation, e.g. `P30`.
    #[serde(default)]
    pub relation_id: Option<String>,
}

/// A record that could not be read, with where it was and why.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordError {
    /// Zero-based position of the record in the file.
    pub index: usize,
    /// The record's `known_id`, when it could be read.
    pub known_id: Option<u64>,
    /// What is wrong, naming the field.
    pub message: String,
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.known_id {
            Some(id) => write!(f, "record {} (known_id {id}): {}", self.index, self.message),
            None => write!(f, "record {}: {}", self.index, self.message),
        }
    }
}

/// The facts of a dataset that could be read, and the records that could not.
#[derive(Debug, Default)]
pub struct Knowns {
    /// Valid facts, in file order.
    pub facts: Vec<KnownFact>,
    /// Each valid fact's zero-based position in the file.
    pub positions: Vec<usize>,
    /// Invalid records, in file order.
    pub errors: Vec<RecordError>,
}

/// Parses a JSON array of knowns records, keeping every valid record.
///
/// The whole text must be a JSON array (otherwise the error names `source`); each element is
/// checked on its own, so one broken record costs only itself.
pub fn parse_knowns_json(source: &str, text: &str) -> Result<Knowns> {
    // The whole file must be one JSON array: a syntax error loses it all (JSON Lines keeps
    // the other lines), so say what was expected and where it broke.
    let values: Vec<serde_json::Value> =
        serde_json::from_str(text).map_err(|e| Error::Dataset {
            source_name: source.to_string(),
            message: format!("not a JSON array: {e}"),
        })?;
    let mut knowns = Knowns::default();
    for (index, value) in values.into_iter().enumerate() {
        match fact_from_value(value) {
            Ok(fact) => {
                knowns.facts.push(fact);
                knowns.positions.push(index);
            }
            Err((known_id, message)) => {
                knowns.errors.push(RecordError { index, known_id, message })
            }
        }
    }
    Ok(knowns)
}

/// Reads a knowns file from a local path, in the format its name says (a JSON array, JSON
/// Lines or Parquet; see [`crate::dataset_formats`]).
pub fn read_knowns_file(path: &std::path::Path) -> Result<Knowns> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    crate::dataset_formats::parse_knowns(&path.display().to_string(), &bytes.into())
}

pub(crate) fn fact_from_value(
    value: serde_json::Value,
) -> std::result::Result<KnownFact, (Option<u64>, String)> {
    let known_id = value.get("known_id").and_then(serde_json::Value::as_u64);
    // serde would read an array positionally (`[5, "Paris", …]` as a fact), and its errors
    // would then point at indices, not fields; a record is an object by the format's definition.
    if !value.is_object() {
        return Err((known_id, format!("not a JSON object but {}", kind_of(&value))));
    }
    // Going through serde_path_to_error because serde_json's own message ("invalid type:
    // integer `7`, expected a string") does not say which field was wrong.
    let fact: KnownFact = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // A missing field is reported at the record itself ("."), and serde's message already
        // names it ("missing field `attribute`").
        let message = match path.as_str() {
            "." => inner.to_string(),
            _ => format!("field `{path}`: {inner}"),
        };
        (known_id, message)
    })?;
    for (field, text) in
        [("subject", &fact.subject), ("attribute", &fact.attribute), ("prompt", &fact.prompt)]
    {
        if text.trim().is_empty() {
            return Err((known_id, format!("field `{field}` is empty")));
        }
    }
    if !fact.prompt.contains(fact.subject.as_str()) {
        return Err((
            known_id,
            format!("field `subject` ({:?}) does not occur in field `prompt`", fact.subject),
        ));
    }
    Ok(fact)
}

/// The JSON kind of a value, for messages about a record that is not an object.
fn kind_of(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_good_records_and_names_bad_ones() {
        let text = r#"[
            {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica",
             "prompt": "Vinson Massif is located in the continent of"},
            {"known_id": 1, "subject": "Beats", "attribute": "", "prompt": "Beats is owned by"},
            {"known_id": 2, "subject": "Nowhere", "attribute": "X", "prompt": "Somewhere is in"},
            {"subject": "A", "attribute": "B", "prompt": "A is B"},
            {"known_id": 4, "subject": 7, "attribute": "B", "prompt": "A is B"}
        ]"#;
        let knowns = parse_knowns_json("test", text).expect("valid array");
        assert_eq!(knowns.facts.len(), 1);
        assert_eq!(knowns.facts[0].known_id, 0);
        let messages: Vec<String> = knowns.errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 4);
        assert!(messages[0].contains("known_id 1") && messages[0].contains("`attribute` is empty"));
        assert!(messages[1].contains("does not occur in field `prompt`"));
        assert!(messages[2].starts_with("record 3") && messages[2].contains("known_id"));
        assert!(messages[3].contains("known_id 4") && messages[3].contains("invalid type"));
    }

    #[test]
    fn wrong_types_name_the_field() {
        let text = r#"[
            {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica",
             "prompt": "Vinson Massif is located in the continent of"},
            {"known_id": 4, "subject": 7, "attribute": "B", "prompt": "A is B"},
            {"known_id": "seven", "subject": "A", "attribute": "B", "prompt": "A is B"},
            {"known_id": -1, "subject": "A", "attribute": "B", "prompt": "A is B"},
            {"known_id": 8, "subject": "A", "attribute": "B", "prompt": "A is B",
             "template": ["{}", "is"]},
            [9, "A", "B", "A is B"]
        ]"#;
        let knowns = parse_knowns_json("test", text).expect("valid array");
        assert_eq!(knowns.facts.len(), 1);
        assert_eq!(knowns.facts[0].known_id, 0);
        assert_eq!(knowns.positions, [0]);
        let messages: Vec<String> = knowns.errors.iter().map(ToString::to_string).collect();
        let expected = [
            "record 1 (known_id 4): field `subject`: invalid type",
            "record 2: field `known_id`: invalid type",
            "record 3: field `known_id`: invalid value: integer `-1`",
            // Optional fields are checked too: a wrong type there is named, not dropped.
            "record 4 (known_id 8): field `template`: invalid type",
            "record 5: not a JSON object but an array",
        ];
        assert_eq!(messages.len(), expected.len(), "{messages:?}");
        for (message, prefix) in messages.iter().zip(expected) {
            assert!(message.starts_with(prefix), "{prefix:?} in {messages:?}");
        }
    }

    #[test]
    fn a_broken_file_names_its_source() {
        let err = parse_knowns_json("facts.json", "{not json").expect_err("must fail");
        assert!(err.to_string().contains("facts.json"), "{err}");
    }
}
