//! Knowns datasets in the formats sweeps read: a JSON array (ROME's `known_1000.json`), JSON
//! Lines, or Parquet with the same column names. Every record is validated on its own: a
//! broken record (bad JSON line, missing field, subject not in the prompt, duplicate id)
//! becomes a [`RecordError`] naming its position and field, and the others load.

use std::collections::HashMap;

use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Value};

use crate::dataset::{Knowns, RecordError, fact_from_value, parse_knowns_json};
use crate::error::{Error, Result};

/// The file formats of a knowns dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON array of records.
    JsonArray,
    /// One JSON record per line.
    JsonLines,
    /// A Parquet table, one row per record.
    Parquet,
}

impl Format {
    /// The format a file name says: `.jsonl`/`.ndjson` → JSON Lines, `.parquet` → Parquet,
    /// anything else → a JSON array.
    pub fn of(name: &str) -> Self {
        let name = name.to_ascii_lowercase();
        let name = name.split(['?', '#']).next().unwrap_or_default();
        if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
            Format::JsonLines
        } else if name.ends_with(".parquet") {
            Format::Parquet
        } else {
            Format::JsonArray
        }
    }
}

/// Parses a dataset in the format its name says, then drops records that repeat an earlier
/// record's `known_id` (their rows would collide in the output tables).
pub fn parse_knowns(source: &str, bytes: &Bytes) -> Result<Knowns> {
    let mut knowns = match Format::of(source) {
        Format::JsonArray => {
            let text = std::str::from_utf8(bytes).map_err(|e| Error::Dataset {
                source_name: source.to_string(),
                message: format!("not UTF-8: {e}"),
            })?;
            parse_knowns_json(source, text)?
        }
        Format::JsonLines => parse_knowns_jsonl(source, bytes)?,
        Format::Parquet => parse_knowns_parquet(source, bytes)?,
    };
    drop_duplicate_ids(&mut knowns);
    Ok(knowns)
}

/// JSON Lines: blank lines are skipped; a line that is not JSON is a record error.
fn parse_knowns_jsonl(source: &str, bytes: &[u8]) -> Result<Knowns> {
    let mut knowns = Knowns::default();
    for (index, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record = serde_json::from_slice::<Value>(line)
            .map_err(|e| (None, format!("line {}: not JSON: {e}", index + 1)))
            .and_then(fact_from_value);
        push(&mut knowns, index, record);
    }
    if knowns.facts.is_empty() && knowns.errors.is_empty() {
        return Err(Error::Dataset {
            source_name: source.to_string(),
            message: "no records".into(),
        });
    }
    Ok(knowns)
}

fn push(
    knowns: &mut Knowns,
    index: usize,
    record: std::result::Result<crate::dataset::KnownFact, (Option<u64>, String)>,
) {
    match record {
        Ok(fact) => {
            knowns.facts.push(fact);
            knowns.positions.push(index);
        }
        Err((known_id, message)) => knowns.errors.push(RecordError { index, known_id, message }),
    }
}

/// Parquet: each row becomes the JSON record it stands for, and is checked as one.
fn parse_knowns_parquet(source: &str, bytes: &Bytes) -> Result<Knowns> {
    let bad = |e: &dyn std::fmt::Display| Error::Dataset {
        source_name: source.to_string(),
        message: format!("not a readable Parquet file: {e}"),
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
        .map_err(|e| bad(&e))?
        .build()
        .map_err(|e| bad(&e))?;
    let mut knowns = Knowns::default();
    let mut index = 0;
    for batch in reader {
        let batch = batch.map_err(|e| bad(&e))?;
        for row in 0..batch.num_rows() {
            let record = row_to_json(&batch, row).and_then(fact_from_value);
            push(&mut knowns, index, record);
            index += 1;
        }
    }
    Ok(knowns)
}

fn row_to_json(
    batch: &RecordBatch,
    row: usize,
) -> std::result::Result<Value, (Option<u64>, String)> {
    let mut object = Map::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if column.is_null(row) {
            continue;
        }
        let value = cell(column.as_ref(), row).ok_or_else(|| {
            (None, format!("column `{}` has unsupported type {}", field.name(), field.data_type()))
        })?;
        object.insert(field.name().clone(), value);
    }
    Ok(Value::Object(object))
}

fn cell(column: &dyn Array, row: usize) -> Option<Value> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type, UInt32Type, UInt64Type};
    Some(match column.data_type() {
        DataType::Utf8 => Value::from(column.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Value::from(column.as_string::<i64>().value(row)),
        DataType::Utf8View => Value::from(column.as_string_view().value(row)),
        DataType::Int64 => Value::from(column.as_primitive::<Int64Type>().value(row)),
        DataType::Int32 => Value::from(column.as_primitive::<Int32Type>().value(row)),
        DataType::UInt64 => Value::from(column.as_primitive::<UInt64Type>().value(row)),
        DataType::UInt32 => Value::from(column.as_primitive::<UInt32Type>().value(row)),
        _ => return None,
    })
}

fn drop_duplicate_ids(knowns: &mut Knowns) {
    let mut first: HashMap<u64, usize> = HashMap::new();
    let facts = std::mem::take(&mut knowns.facts);
    let positions = std::mem::take(&mut knowns.positions);
    for (fact, index) in facts.into_iter().zip(positions) {
        if let Some(&earlier) = first.get(&fact.known_id) {
            knowns.errors.push(RecordError {
                index,
                known_id: Some(fact.known_id),
                message: format!("field `known_id` repeats the id of record {earlier}"),
            });
        } else {
            first.insert(fact.known_id, index);
            knowns.facts.push(fact);
            knowns.positions.push(index);
        }
    }
    knowns.errors.sort_by_key(|e| e.index);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Float64Array, Int64Array, StringArray};

    use super::*;

    #[test]
    fn json_lines_keep_good_records_around_bad_lines() {
        let text = concat!(
            r#"{"known_id": 1, "subject": "A", "attribute": "B", "prompt": "A is"}"#,
            "\n{broken\n\n",
            r#"{"known_id": 3, "subject": "Z", "attribute": "B", "prompt": "A is"}"#,
            "\n",
            r#"{"known_id": 1, "subject": "C", "attribute": "D", "prompt": "C is"}"#,
        );
        let knowns = parse_knowns("x.jsonl", &Bytes::from(text)).expect("parses");
        assert_eq!(knowns.facts.len(), 1);
        let messages: Vec<String> = knowns.errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(messages[0].contains("line 2: not JSON"), "{messages:?}");
        assert!(messages[1].contains("known_id 3") && messages[1].contains("`subject`"));
        assert!(messages[2].contains("`known_id` repeats"), "{messages:?}");
    }

    #[test]
    fn files_are_read_in_the_format_their_name_says() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("facts.jsonl");
        let line = r#"{"known_id": 1, "subject": "A", "attribute": "B", "prompt": "A is"}"#;
        std::fs::write(&path, format!("{line}\n")).expect("write");
        let knowns = crate::dataset::read_knowns_file(&path).expect("reads JSON Lines");
        assert_eq!(knowns.facts.len(), 1);
        assert_eq!(Format::of("s3://b/k.parquet?x=1"), Format::Parquet);
        assert_eq!(Format::of("known_1000.json"), Format::JsonArray);
    }

    /// A knowns Parquet file with these four columns.
    fn knowns_parquet(
        known_id: ArrayRef,
        subject: &[Option<&str>],
        attribute: &[&str],
        prompt: &[&str],
    ) -> Bytes {
        let batch = RecordBatch::try_from_iter([
            ("known_id", known_id),
            ("subject", Arc::new(StringArray::from(subject.to_vec())) as ArrayRef),
            ("attribute", Arc::new(StringArray::from(attribute.to_vec()))),
            ("prompt", Arc::new(StringArray::from(prompt.to_vec()))),
        ])
        .expect("batch");
        let mut buffer = Vec::new();
        let mut writer = parquet::arrow::ArrowWriter::try_new(&mut buffer, batch.schema(), None)
            .expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        Bytes::from(buffer)
    }

    #[test]
    fn parquet_rows_are_records() {
        let bytes = knowns_parquet(
            Arc::new(Int64Array::from(vec![5, 6])),
            &[Some("Paris"), None],
            &["France", "X"],
            &["Paris is in", "Y is"],
        );
        let knowns = parse_knowns("k.parquet", &bytes).expect("parses");
        assert_eq!(knowns.facts.len(), 1);
        assert_eq!(knowns.facts[0].subject, "Paris");
        assert_eq!(knowns.errors.len(), 1);
        assert!(knowns.errors[0].to_string().contains("subject"), "{}", knowns.errors[0]);
    }

    #[test]
    fn a_broken_parquet_file_names_its_source() {
        let err = parse_knowns("k.parquet", &Bytes::from_static(b"PAR1 junk PAR1"))
            .expect_err("junk is not Parquet");
        let message = err.to_string();
        assert!(message.starts_with("dataset k.parquet: not a readable Parquet file"), "{message}");
    }

    #[test]
    fn a_bad_parquet_value_costs_only_its_row() {
        let bytes = knowns_parquet(
            Arc::new(Int64Array::from(vec![5, -1, 7, 8])),
            &[Some("Paris"), Some("Rome"), None, Some("Oslo")],
            &["France", "Italy", "X", "Norway"],
            &["Paris is in", "Rome is in", "Y is in", "Oslo is in"],
        );
        let knowns = parse_knowns("k.parquet", &bytes).expect("parses");
        let ids: Vec<u64> = knowns.facts.iter().map(|f| f.known_id).collect();
        assert_eq!(ids, [5, 8]);
        assert_eq!(knowns.positions, [0, 3]);
        let messages: Vec<String> = knowns.errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].starts_with("record 1: field `known_id`: invalid value: integer `-1`"),
            "{messages:?}"
        );
        assert!(
            messages[1].starts_with("record 2 (known_id 7): missing field `subject`"),
            "{messages:?}"
        );
    }

    #[test]
    fn a_parquet_column_of_unsupported_type_is_named_in_every_row() {
        let bytes = knowns_parquet(
            Arc::new(Float64Array::from(vec![1.0, 2.0])),
            &[Some("Paris"), Some("Oslo")],
            &["France", "Norway"],
            &["Paris is in", "Oslo is in"],
        );
        let knowns = parse_knowns("k.parquet", &bytes).expect("parses");
        assert!(knowns.facts.is_empty());
        let messages: Vec<String> = knowns.errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        for (i, message) in messages.iter().enumerate() {
            assert!(
                message.starts_with(&format!(
                    "record {i}: column `known_id` has unsupported type Float64"
                )),
                "{messages:?}"
            );
        }
    }

    #[test]
    fn a_json_array_that_is_not_utf8_names_its_source() {
        // One bad byte costs the whole array: it cannot be parsed as text to find the records.
        let err = parse_knowns("k.json", &Bytes::from_static(b"[{\"subject\": \"\xff\"}]"))
            .expect_err("not UTF-8");
        let message = err.to_string();
        assert!(message.starts_with("dataset k.json: not UTF-8"), "{message}");
    }

    #[test]
    fn an_empty_json_lines_file_names_its_source() {
        for text in ["", "\n \n", "\r\n\t\n"] {
            let err = parse_knowns("k.jsonl", &Bytes::from(text)).expect_err("no records");
            assert_eq!(err.to_string(), "dataset k.jsonl: no records", "{text:?}");
        }
    }
}
