//! The words of a `facts` table: each fact's prompt, subject, attribute, the model's answer
//! and its tokens as the tokenizer split them. The numbers live in
//! [`crate::tables::FactSummary`]; these are what a report prints beside them.

use arrow_array::cast::AsArray;
use arrow_array::types::UInt64Type;
use arrow_array::{Array, ArrayRef, GenericStringArray, RecordBatch};
use bytes::Bytes;

use crate::error::{Error, Result};
use crate::tables::{column, read_batches};

/// A fact's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactText {
    /// The fact.
    pub known_id: u64,
    /// The prompt, as the dataset wrote it.
    pub prompt: String,
    /// The subject, as the dataset wrote it.
    pub subject: String,
    /// The dataset's attribute (the expected answer).
    pub attribute: String,
    /// The model's first answer token, decoded.
    pub answer: String,
    /// The prompt's tokens, decoded one by one.
    pub tokens: Vec<String>,
}

fn strings<'a>(b: &'a RecordBatch, name: &str, what: &str) -> Result<&'a GenericStringArray<i32>> {
    column(b, name, what)?.as_string_opt::<i32>().ok_or_else(|| Error::Parquet {
        what: what.into(),
        message: format!("column `{name}` is not UTF-8 text"),
    })
}

/// Reads the words of a `facts` file back.
pub fn read_fact_texts(bytes: &Bytes) -> Result<Vec<FactText>> {
    let what = "facts";
    let mut out = Vec::new();
    for b in read_batches(bytes, what)? {
        let ids =
            column(&b, "known_id", what)?.as_primitive_opt::<UInt64Type>().ok_or_else(|| {
                Error::Parquet { what: what.into(), message: "column `known_id` is not u64".into() }
            })?;
        let prompts = strings(&b, "prompt", what)?;
        let subjects = strings(&b, "subject", what)?;
        let attributes = strings(&b, "attribute", what)?;
        let answers = strings(&b, "answer", what)?;
        let tokens = column(&b, "tokens", what)?.as_list_opt::<i32>().ok_or_else(|| {
            Error::Parquet { what: what.into(), message: "column `tokens` is not a list".into() }
        })?;
        let text = |a: &GenericStringArray<i32>, i: usize| {
            if a.is_valid(i) { a.value(i).to_string() } else { String::new() }
        };
        for i in 0..b.num_rows() {
            let list: ArrayRef = tokens.value(i);
            let words = list.as_string_opt::<i32>().ok_or_else(|| Error::Parquet {
                what: what.into(),
                message: "column `tokens` does not hold text".into(),
            })?;
            out.push(FactText {
                known_id: ids.value(i),
                prompt: text(prompts, i),
                subject: text(subjects, i),
                attribute: text(attributes, i),
                answer: text(answers, i),
                tokens: (0..words.len()).map(|t| text(words, t)).collect(),
            });
        }
    }
    Ok(out)
}
