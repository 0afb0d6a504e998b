//! The Parquet tables of a sweep: `facts`, `traces` (partitioned by kind) and `errors`.
//!
//! Rows are plain structs; [`write_parquet`] turns a slice of them into one Parquet file
//! (Snappy, row groups of up to 1 Mi rows, sized for DuckDB). The readers are the inverse,
//! for tests and tools.

use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder, UInt32Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, UInt32Type, UInt64Type};
use arrow_array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, RecordBatch, StringArray, UInt32Array,
    UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};
use crate::kinds::Kind;
use crate::metric::{Metric, MetricValues};

/// Where a token sits relative to the subject (docs/science.md §7). ROME's categories overlap (a
/// one-token subject's token is both its first and last); a row carries one, by the priority
/// last > last subject > first subject > middle subject > first subsequent > further >
/// before. Aggregations that need the overlapping sets recompute them from `token`, the
/// fact's `subject_start`/`subject_end` and its token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenCategory {
    /// Before the subject (not corrupted; its score is low_score).
    Before,
    /// The subject's first token (b).
    FirstSubject,
    /// The subject's tokens b+1 .. e-2.
    MiddleSubject,
    /// The subject's last token (e-1).
    LastSubject,
    /// The first token after the subject (e).
    FirstSubsequent,
    /// Tokens e+1 .. T-2.
    Further,
    /// The prompt's last token (T-1).
    Last,
}

impl TokenCategory {
    /// The category of token `t` of a `t_len`-token prompt with subject tokens `[b, e)`.
    pub fn of(t: usize, (b, e): (usize, usize), t_len: usize) -> Self {
        if t + 1 == t_len {
            Self::Last
        } else if t + 1 == e {
            Self::LastSubject
        } else if t == b {
            Self::FirstSubject
        } else if t > b && t < e {
            Self::MiddleSubject
        } else if t == e {
            Self::FirstSubsequent
        } else if t > e {
            Self::Further
        } else {
            Self::Before
        }
    }

    /// The name stored in the `token_category` column.
    pub fn name(self) -> &'static str {
        match self {
            Self::Before => "before_subject",
            Self::FirstSubject => "first_subject",
            Self::MiddleSubject => "middle_subject",
            Self::LastSubject => "last_subject",
            Self::FirstSubsequent => "first_subsequent",
            Self::Further => "further",
            Self::Last => "last",
        }
    }
}

/// One row of `facts`: what the clean and corrupted runs say about a fact.
#[derive(Debug, Clone, PartialEq)]
pub struct FactRow {
    /// The dataset's id.
    pub known_id: u64,
    /// The Wikidata relation, when the dataset has it.
    pub relation_id: Option<String>,
    /// The prompt.
    pub prompt: String,
    /// The subject.
    pub subject: String,
    /// The expected attribute.
    pub attribute: String,
    /// The prompt's tokens, each decoded alone.
    pub tokens: Vec<String>,
    /// Their ids.
    pub token_ids: Vec<u32>,
    /// The subject's tokens are `[subject_start, subject_end)`.
    pub subject_start: u32,
    /// See `subject_start`.
    pub subject_end: u32,
    /// The clean run's top token.
    pub answer: String,
    /// Its id.
    pub answer_id: u32,
    /// p(answer), clean.
    pub high_score: f32,
    /// Mean p(answer), corrupted.
    pub low_score: f32,
    /// Whether the model predicts the attribute.
    pub correct: Option<bool>,
    /// Whether the fact's states were restored (its `traces` rows exist).
    pub traced: bool,
    /// The tokens whose rows were computed (the experiment's token selector), ascending;
    /// empty when the fact was not traced.
    pub traced_tokens: Vec<u32>,
    /// The model's layers L: each traced token has L rows per kind (× H for `head`).
    pub n_layers: u32,
    /// The model's query heads H.
    pub n_heads: u32,
    /// The noise level; `None` without noise (STR).
    pub noise_level: Option<f64>,
    /// Corrupted rows per run: noise samples, or STR's 1.
    pub samples: u32,
    /// The model's name.
    pub model: String,
    /// STR's donor fact (docs/science.md §3).
    pub donor_known_id: Option<u64>,
    /// Its subject.
    pub donor_subject: Option<String>,
    /// The corrupted prompt: this fact's with the donor's subject.
    pub donor_prompt: Option<String>,
    /// The foil of `logit_diff` (docs/science.md §5): STR's counterfactual answer, or the
    /// corrupted run's most probable token other than the answer.
    pub foil_id: u32,
    /// The foil, decoded.
    pub foil: String,
    /// Every metric of the clean run (`clean_prob` is `high_score` in f64).
    pub clean: MetricValues,
    /// Every metric of the corrupted run, averaged over the samples.
    pub corrupted: MetricValues,
}

/// One row of `traces`: p(answer) with one state restored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceRow {
    /// The fact.
    pub known_id: u64,
    /// What was restored.
    pub kind: Kind,
    /// The layer (the window's centre for mlp/attn).
    pub layer: u32,
    /// The token.
    pub token: u32,
    /// The head, for kinds with a head axis (`head`); `None` for the others.
    pub head: Option<u32>,
    /// The token's category.
    pub category: TokenCategory,
    /// Mean p(answer) over the samples (the `prob` metric; column `score`).
    pub score: f32,
    /// Mean log p(answer) (NaN in tables of schema < 4, which lack the column).
    pub logprob: f32,
    /// Mean z(answer) − z(foil) (NaN before schema 4).
    pub logit_diff: f32,
    /// Mean KL(p_clean ‖ p_run) (NaN before schema 4).
    pub kl: f32,
}

impl TraceRow {
    /// The row's value of `metric`.
    pub fn value(&self, metric: Metric) -> f32 {
        match metric {
            Metric::Prob => self.score,
            Metric::Logprob => self.logprob,
            Metric::LogitDiff => self.logit_diff,
            Metric::Kl => self.kl,
        }
    }
}

/// The `traces` column holding `metric` (`prob` is `score`, its name since schema 1).
pub fn trace_column(metric: Metric) -> &'static str {
    match metric {
        Metric::Prob => "score",
        other => other.name(),
    }
}

/// One row of `errors`: a record or job that produced no (or not all) rows, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorRow {
    /// The fact, when known.
    pub known_id: Option<u64>,
    /// The record's position in the dataset, for dataset errors.
    pub record: Option<u64>,
    /// The job, for job failures.
    pub job: Option<String>,
    /// Where it failed: `dataset`, `calibration`, `trace`, `lease`, ...
    pub stage: String,
    /// Why.
    pub message: String,
}

/// The `facts` schema.
pub fn facts_schema() -> SchemaRef {
    let list = |item: DataType| DataType::List(Arc::new(Field::new("item", item, true)));
    Arc::new(Schema::new(vec![
        Field::new("known_id", DataType::UInt64, false),
        Field::new("relation_id", DataType::Utf8, true),
        Field::new("prompt", DataType::Utf8, false),
        Field::new("subject", DataType::Utf8, false),
        Field::new("attribute", DataType::Utf8, false),
        Field::new("tokens", list(DataType::Utf8), false),
        Field::new("token_ids", list(DataType::UInt32), false),
        Field::new("subject_start", DataType::UInt32, false),
        Field::new("subject_end", DataType::UInt32, false),
        Field::new("answer", DataType::Utf8, false),
        Field::new("answer_id", DataType::UInt32, false),
        Field::new("high_score", DataType::Float32, false),
        Field::new("low_score", DataType::Float32, false),
        Field::new("correct", DataType::Boolean, true),
        Field::new("traced", DataType::Boolean, false),
        Field::new("traced_tokens", list(DataType::UInt32), false),
        Field::new("n_layers", DataType::UInt32, false),
        Field::new("n_heads", DataType::UInt32, false),
        Field::new("noise_level", DataType::Float64, true),
        Field::new("samples", DataType::UInt32, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("donor_known_id", DataType::UInt64, true),
        Field::new("donor_subject", DataType::Utf8, true),
        Field::new("donor_prompt", DataType::Utf8, true),
        Field::new("foil_id", DataType::UInt32, false),
        Field::new("foil", DataType::Utf8, false),
        Field::new("clean_prob", DataType::Float64, false),
        Field::new("clean_logprob", DataType::Float64, false),
        Field::new("clean_logit_diff", DataType::Float64, false),
        Field::new("clean_kl", DataType::Float64, false),
        Field::new("corrupted_prob", DataType::Float64, false),
        Field::new("corrupted_logprob", DataType::Float64, false),
        Field::new("corrupted_logit_diff", DataType::Float64, false),
        Field::new("corrupted_kl", DataType::Float64, false),
    ]))
}

/// The `traces` schema.
pub fn traces_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("known_id", DataType::UInt64, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("layer", DataType::UInt32, false),
        Field::new("token", DataType::UInt32, false),
        Field::new("head", DataType::UInt32, true),
        Field::new("token_category", DataType::Utf8, false),
        Field::new("score", DataType::Float32, false),
        Field::new("logprob", DataType::Float32, false),
        Field::new("logit_diff", DataType::Float32, false),
        Field::new("kl", DataType::Float32, false),
    ]))
}

/// The `errors` schema.
pub fn errors_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("known_id", DataType::UInt64, true),
        Field::new("record", DataType::UInt64, true),
        Field::new("job", DataType::Utf8, true),
        Field::new("stage", DataType::Utf8, false),
        Field::new("message", DataType::Utf8, false),
    ]))
}

fn batch(schema: SchemaRef, columns: Vec<ArrayRef>, what: &str) -> Result<RecordBatch> {
    RecordBatch::try_new(schema, columns)
        .map_err(|e| Error::Parquet { what: what.into(), message: e.to_string() })
}

/// `facts` rows as a record batch.
pub fn facts_batch(rows: &[FactRow]) -> Result<RecordBatch> {
    let mut tokens = ListBuilder::new(StringBuilder::new());
    let mut token_ids = ListBuilder::new(UInt32Builder::new());
    let mut traced_tokens = ListBuilder::new(UInt32Builder::new());
    for row in rows {
        for t in &row.tokens {
            tokens.values().append_value(t);
        }
        tokens.append(true);
        token_ids.values().append_slice(&row.token_ids);
        token_ids.append(true);
        traced_tokens.values().append_slice(&row.traced_tokens);
        traced_tokens.append(true);
    }
    let strings = |f: fn(&FactRow) -> &str| -> ArrayRef {
        Arc::new(rows.iter().map(|r| Some(f(r))).collect::<StringArray>())
    };
    let u32s = |f: fn(&FactRow) -> u32| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<UInt32Array>())
    };
    let f32s = |f: fn(&FactRow) -> f32| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<Float32Array>())
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(rows.iter().map(|r| r.known_id).collect::<UInt64Array>()),
        Arc::new(rows.iter().map(|r| r.relation_id.as_deref()).collect::<StringArray>()),
        strings(|r| &r.prompt),
        strings(|r| &r.subject),
        strings(|r| &r.attribute),
        Arc::new(tokens.finish()),
        Arc::new(token_ids.finish()),
        u32s(|r| r.subject_start),
        u32s(|r| r.subject_end),
        strings(|r| &r.answer),
        u32s(|r| r.answer_id),
        f32s(|r| r.high_score),
        f32s(|r| r.low_score),
        Arc::new(rows.iter().map(|r| r.correct).collect::<BooleanArray>()),
        Arc::new(rows.iter().map(|r| Some(r.traced)).collect::<BooleanArray>()),
        Arc::new(traced_tokens.finish()),
        u32s(|r| r.n_layers),
        u32s(|r| r.n_heads),
        Arc::new(rows.iter().map(|r| r.noise_level).collect::<Float64Array>()),
        u32s(|r| r.samples),
        strings(|r| &r.model),
        Arc::new(rows.iter().map(|r| r.donor_known_id).collect::<UInt64Array>()),
        Arc::new(rows.iter().map(|r| r.donor_subject.as_deref()).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| r.donor_prompt.as_deref()).collect::<StringArray>()),
        u32s(|r| r.foil_id),
        strings(|r| &r.foil),
    ];
    let mut columns = columns;
    for run in [|r: &FactRow| r.clean, |r: &FactRow| r.corrupted] {
        for metric in Metric::ALL {
            columns
                .push(Arc::new(rows.iter().map(|r| run(r).get(metric)).collect::<Float64Array>()));
        }
    }
    batch(facts_schema(), columns, "facts")
}

/// `traces` rows as a record batch.
pub fn traces_batch(rows: &[TraceRow]) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(rows.iter().map(|r| r.known_id).collect::<UInt64Array>()),
        Arc::new(rows.iter().map(|r| Some(r.kind.name())).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| r.layer).collect::<UInt32Array>()),
        Arc::new(rows.iter().map(|r| r.token).collect::<UInt32Array>()),
        Arc::new(rows.iter().map(|r| r.head).collect::<UInt32Array>()),
        Arc::new(rows.iter().map(|r| Some(r.category.name())).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| r.score).collect::<Float32Array>()),
        Arc::new(rows.iter().map(|r| r.logprob).collect::<Float32Array>()),
        Arc::new(rows.iter().map(|r| r.logit_diff).collect::<Float32Array>()),
        Arc::new(rows.iter().map(|r| r.kl).collect::<Float32Array>()),
    ];
    batch(traces_schema(), columns, "traces")
}

/// `errors` rows as a record batch.
pub fn errors_batch(rows: &[ErrorRow]) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(rows.iter().map(|r| r.known_id).collect::<UInt64Array>()),
        Arc::new(rows.iter().map(|r| r.record).collect::<UInt64Array>()),
        Arc::new(rows.iter().map(|r| r.job.as_deref()).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| Some(r.stage.as_str())).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| Some(r.message.as_str())).collect::<StringArray>()),
    ];
    batch(errors_schema(), columns, "errors")
}

/// One Parquet file holding `batch`.
pub fn write_parquet(batch: &RecordBatch, what: &str) -> Result<Bytes> {
    let err = |e: parquet::errors::ParquetError| Error::Parquet {
        what: what.into(),
        message: e.to_string(),
    };
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(1 << 20))
        .build();
    let mut buffer = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buffer, batch.schema(), Some(props)).map_err(err)?;
    writer.write(batch).map_err(err)?;
    writer.close().map_err(err)?;
    Ok(Bytes::from(buffer))
}

pub(crate) fn read_batches(bytes: &Bytes, what: &str) -> Result<Vec<RecordBatch>> {
    let err =
        |e: &dyn std::fmt::Display| Error::Parquet { what: what.into(), message: e.to_string() };
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
        .map_err(|e| err(&e))?
        .build()
        .map_err(|e| err(&e))?;
    reader.map(|b| b.map_err(|e| err(&e))).collect()
}

pub(crate) fn column<'a>(batch: &'a RecordBatch, name: &str, what: &str) -> Result<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .ok_or_else(|| Error::Parquet { what: what.into(), message: format!("no column `{name}`") })
}

/// Reads a `traces` file back (category and kind parsed from their names).
pub fn read_traces(bytes: &Bytes) -> Result<Vec<TraceRow>> {
    let what = "traces";
    let mut out = Vec::new();
    for b in read_batches(bytes, what)? {
        let ids = column(&b, "known_id", what)?.as_primitive::<UInt64Type>();
        let kinds = column(&b, "kind", what)?.as_string::<i32>();
        let layers = column(&b, "layer", what)?.as_primitive::<UInt32Type>();
        let tokens = column(&b, "token", what)?.as_primitive::<UInt32Type>();
        let heads = column(&b, "head", what)?.as_primitive::<UInt32Type>();
        let categories = column(&b, "token_category", what)?.as_string::<i32>();
        let scores = column(&b, "score", what)?.as_primitive::<Float32Type>();
        // Schema 4's metric columns; NaN for older tables (and never a panic on a bad type).
        let optional =
            |name: &str| b.column_by_name(name).and_then(|c| c.as_primitive_opt::<Float32Type>());
        let (logprob, logit_diff, kl) =
            (optional("logprob"), optional("logit_diff"), optional("kl"));
        let at = |c: Option<&Float32Array>, i: usize| c.map_or(f32::NAN, |c| c.value(i));
        for i in 0..b.num_rows() {
            let kind: Kind = kinds
                .value(i)
                .parse()
                .map_err(|message| Error::Parquet { what: what.into(), message })?;
            let category = ALL_CATEGORIES
                .into_iter()
                .find(|c| c.name() == categories.value(i))
                .ok_or_else(|| Error::Parquet {
                    what: what.into(),
                    message: format!("unknown token_category {:?}", categories.value(i)),
                })?;
            use arrow_array::Array;
            out.push(TraceRow {
                known_id: ids.value(i),
                kind,
                layer: layers.value(i),
                token: tokens.value(i),
                head: heads.is_valid(i).then(|| heads.value(i)),
                category,
                score: scores.value(i),
                logprob: at(logprob, i),
                logit_diff: at(logit_diff, i),
                kl: at(kl, i),
            });
        }
    }
    Ok(out)
}

const ALL_CATEGORIES: [TokenCategory; 7] = [
    TokenCategory::Before,
    TokenCategory::FirstSubject,
    TokenCategory::MiddleSubject,
    TokenCategory::LastSubject,
    TokenCategory::FirstSubsequent,
    TokenCategory::Further,
    TokenCategory::Last,
];

/// The columns of a `facts` file that tests and summaries read back.
#[derive(Debug, Clone, PartialEq)]
pub struct FactSummary {
    /// The fact.
    pub known_id: u64,
    /// Its token count T.
    pub n_tokens: usize,
    /// p(answer), clean and corrupted.
    pub high_score: f32,
    /// See `high_score`.
    pub low_score: f32,
    /// Whether it was traced.
    pub traced: bool,
    /// Whether the model predicts the attribute.
    pub correct: Option<bool>,
    /// Subject tokens `[start, end)`.
    pub subject: (usize, usize),
    /// The Wikidata relation.
    pub relation_id: Option<String>,
    /// The noise level (`None` without noise).
    pub noise_level: Option<f64>,
    /// STR's donor (`None` for noise, and in tables of schema 2, which lack the column).
    pub donor_known_id: Option<u64>,
    /// Every metric of the clean run (`None` before schema 4).
    pub clean: Option<MetricValues>,
    /// Every metric of the corrupted run (`None` before schema 4).
    pub corrupted: Option<MetricValues>,
    /// The tokens whose rows were computed.
    pub traced_tokens: Vec<usize>,
    /// The model's layers.
    pub n_layers: u32,
    /// The model's query heads.
    pub n_heads: u32,
}

/// Reads a `facts` file back (the summary columns).
pub fn read_facts(bytes: &Bytes) -> Result<Vec<FactSummary>> {
    let what = "facts";
    let mut out = Vec::new();
    for b in read_batches(bytes, what)? {
        let ids = column(&b, "known_id", what)?.as_primitive::<UInt64Type>();
        let tokens = column(&b, "token_ids", what)?.as_list::<i32>();
        let high = column(&b, "high_score", what)?.as_primitive::<Float32Type>();
        let low = column(&b, "low_score", what)?.as_primitive::<Float32Type>();
        let traced = column(&b, "traced", what)?.as_boolean();
        let level = column(&b, "noise_level", what)?.as_primitive::<Float64Type>();
        let correct = column(&b, "correct", what)?.as_boolean();
        let start = column(&b, "subject_start", what)?.as_primitive::<UInt32Type>();
        let end = column(&b, "subject_end", what)?.as_primitive::<UInt32Type>();
        let relation = column(&b, "relation_id", what)?.as_string::<i32>();
        let traced_tokens = column(&b, "traced_tokens", what)?.as_list::<i32>();
        let n_layers = column(&b, "n_layers", what)?.as_primitive::<UInt32Type>();
        let n_heads = column(&b, "n_heads", what)?.as_primitive::<UInt32Type>();
        // Optional (schema 2 lacks it), and of the right type or ignored: never a panic.
        let donors =
            b.column_by_name("donor_known_id").and_then(|c| c.as_primitive_opt::<UInt64Type>());
        let metrics = |run: &str| -> Option<Vec<&Float64Array>> {
            Metric::ALL
                .iter()
                .map(|m| {
                    b.column_by_name(&format!("{run}_{}", m.name()))
                        .and_then(|c| c.as_primitive_opt::<Float64Type>())
                })
                .collect()
        };
        let (clean, corrupted) = (metrics("clean"), metrics("corrupted"));
        let values = |cols: &Option<Vec<&Float64Array>>, i: usize| {
            cols.as_ref().map(|c| MetricValues {
                prob: c[0].value(i),
                logprob: c[1].value(i),
                logit_diff: c[2].value(i),
                kl: c[3].value(i),
            })
        };
        for i in 0..b.num_rows() {
            use arrow_array::Array;
            let list = traced_tokens.value(i);
            let traced_tokens =
                list.as_primitive::<UInt32Type>().values().iter().map(|&t| t as usize).collect();
            out.push(FactSummary {
                traced_tokens,
                n_layers: n_layers.value(i),
                n_heads: n_heads.value(i),
                correct: correct.is_valid(i).then(|| correct.value(i)),
                subject: (start.value(i) as usize, end.value(i) as usize),
                relation_id: relation.is_valid(i).then(|| relation.value(i).to_string()),
                known_id: ids.value(i),
                n_tokens: tokens.value(i).len(),
                high_score: high.value(i),
                low_score: low.value(i),
                traced: traced.value(i),
                noise_level: level.is_valid(i).then(|| level.value(i)),
                donor_known_id: donors.filter(|d| d.is_valid(i)).map(|d| d.value(i)),
                clean: values(&clean, i),
                corrupted: values(&corrupted, i),
            });
        }
    }
    Ok(out)
}

/// Reads an `errors` file back.
pub fn read_errors(bytes: &Bytes) -> Result<Vec<ErrorRow>> {
    let what = "errors";
    let mut out = Vec::new();
    for b in read_batches(bytes, what)? {
        let ids = column(&b, "known_id", what)?.as_primitive::<UInt64Type>();
        let records = column(&b, "record", what)?.as_primitive::<UInt64Type>();
        let jobs = column(&b, "job", what)?.as_string::<i32>();
        let stages = column(&b, "stage", what)?.as_string::<i32>();
        let messages = column(&b, "message", what)?.as_string::<i32>();
        for i in 0..b.num_rows() {
            use arrow_array::Array;
            out.push(ErrorRow {
                known_id: ids.is_valid(i).then(|| ids.value(i)),
                record: records.is_valid(i).then(|| records.value(i)),
                job: jobs.is_valid(i).then(|| jobs.value(i).to_string()),
                stage: stages.value(i).to_string(),
                message: messages.value(i).to_string(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_follow_design() {
        // "The Eiffel Tower is in Paris": T = 6, subject [1, 4).
        let cats: Vec<&str> = (0..6).map(|t| TokenCategory::of(t, (1, 4), 6).name()).collect();
        assert_eq!(
            cats,
            [
                "before_subject",
                "first_subject",
                "middle_subject",
                "last_subject",
                "first_subsequent",
                "last"
            ]
        );
        // A one-token subject is its own last token; a subject at the end ends the prompt.
        assert_eq!(TokenCategory::of(0, (0, 1), 4), TokenCategory::LastSubject);
        assert_eq!(TokenCategory::of(2, (0, 1), 4), TokenCategory::Further);
        assert_eq!(TokenCategory::of(3, (2, 4), 4), TokenCategory::Last);
    }

    #[test]
    fn rows_round_trip_through_parquet() {
        let rows = vec![
            TraceRow {
                known_id: 3,
                kind: Kind::Mlp,
                layer: 2,
                token: 1,
                head: None,
                category: TokenCategory::LastSubject,
                score: 0.25,
                logprob: -1.5,
                logit_diff: 2.0,
                kl: 0.5,
            },
            TraceRow {
                known_id: 4,
                kind: Kind::Mlp,
                layer: 0,
                token: 0,
                head: Some(3),
                category: TokenCategory::Before,
                score: 1e-7,
                logprob: -16.0,
                logit_diff: -3.0,
                kl: 0.0,
            },
        ];
        let bytes = write_parquet(&traces_batch(&rows).expect("batch"), "t").expect("write");
        assert_eq!(read_traces(&bytes).expect("read"), rows);
        let errors = vec![ErrorRow {
            known_id: None,
            record: Some(7),
            job: None,
            stage: "dataset".into(),
            message: "m".into(),
        }];
        let bytes = write_parquet(&errors_batch(&errors).expect("batch"), "e").expect("write");
        assert_eq!(read_errors(&bytes).expect("read"), errors);
        let fact = FactRow {
            known_id: 9,
            relation_id: None,
            prompt: "p".into(),
            subject: "s".into(),
            attribute: "a".into(),
            tokens: vec!["x".into(), "y".into()],
            token_ids: vec![1, 2],
            subject_start: 0,
            subject_end: 1,
            answer: " a".into(),
            answer_id: 5,
            high_score: 0.5,
            low_score: 0.1,
            correct: Some(true),
            traced: true,
            traced_tokens: vec![1],
            n_layers: 4,
            n_heads: 2,
            noise_level: Some(0.3),
            samples: 10,
            model: "m".into(),
            donor_known_id: None,
            donor_subject: None,
            donor_prompt: None,
            foil_id: 6,
            foil: " b".into(),
            clean: MetricValues { prob: 0.5, logprob: -0.69, logit_diff: 3.0, kl: 0.0 },
            corrupted: MetricValues { prob: 0.1, logprob: -2.3, logit_diff: -1.0, kl: 1.25 },
        };
        let str = FactRow {
            known_id: 10,
            noise_level: None,
            samples: 1,
            donor_known_id: Some(4),
            donor_subject: Some("d".into()),
            donor_prompt: Some("d p".into()),
            ..fact.clone()
        };
        let batch = facts_batch(&[fact, str]).expect("batch");
        let donors = batch.column_by_name("donor_known_id").expect("column");
        assert_eq!((donors.null_count(), donors.len()), (1, 2));
        let bytes = write_parquet(&batch, "f").expect("write");
        let back = read_facts(&bytes).expect("read");
        assert_eq!((back[0].noise_level, back[1].noise_level), (Some(0.3), None));
        assert_eq!((back[0].donor_known_id, back[1].donor_known_id), (None, Some(4)));
        assert_eq!(back[0].known_id, 9);
        assert_eq!(back[1].corrupted.map(|m| m.kl), Some(1.25));
        assert_eq!(back[0].clean.map(|m| m.logit_diff), Some(3.0));
        assert_eq!(back[0].n_tokens, 2);
        let texts = crate::fact_texts::read_fact_texts(&bytes).expect("texts");
        assert_eq!(texts.len(), 2);
        assert_eq!(
            (texts[0].prompt.as_str(), texts[0].subject.as_str(), texts[0].attribute.as_str()),
            ("p", "s", "a")
        );
        assert_eq!((texts[1].known_id, texts[1].answer.as_str()), (10, " a"));
        assert_eq!(texts[0].tokens, ["x", "y"]);
        assert_eq!(
            (back[0].traced_tokens.clone(), back[0].n_layers, back[0].n_heads),
            (vec![1], 4, 2)
        );
    }
}
