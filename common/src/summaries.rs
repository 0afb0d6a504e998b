//! The tables `coordinator aggregate` writes: Figure 2's summary, Figure 3's bars, the
//! per-head maps. Each is a list of plain rows turned into one Parquet file (and CSV by the
//! aggregate); NaN, for a cell no fact has, becomes null. Every table ends with the metric
//! and the scale its values are in ([`Measured`]).

use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use crate::error::{Error, Result};
use crate::kinds::Kind;

fn batch(schema: SchemaRef, columns: Vec<ArrayRef>, what: &str) -> Result<RecordBatch> {
    RecordBatch::try_new(schema, columns)
        .map_err(|e| Error::Parquet { what: what.into(), message: e.to_string() })
}

fn opt(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// What a summary's values are: the metric (`prob`, `logprob`, `logit_diff`, `kl`) and the
/// scale (`raw`, `recovery-ratio-of-means`, `recovery-per-fact`); the last two columns of
/// every table, one value throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured<'a> {
    /// The metric's name.
    pub metric: &'a str,
    /// The scale's name.
    pub scale: &'a str,
}

fn measured_fields() -> [Field; 2] {
    [Field::new("metric", DataType::Utf8, false), Field::new("scale", DataType::Utf8, false)]
}

fn measured_columns(m: Measured<'_>, rows: usize) -> [ArrayRef; 2] {
    [
        Arc::new(std::iter::repeat_n(Some(m.metric), rows).collect::<StringArray>()),
        Arc::new(std::iter::repeat_n(Some(m.scale), rows).collect::<StringArray>()),
    ]
}

/// The statistics columns every summary has.
fn stats_fields() -> [Field; 4] {
    [
        Field::new("aie", DataType::Float64, true),
        Field::new("mean", DataType::Float64, true),
        Field::new("std", DataType::Float64, true),
        Field::new("n", DataType::UInt64, false),
    ]
}

/// An average over facts: the statistics of one cell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Average indirect effect: mean score − mean low_score (on the measure's scale).
    pub aie: f64,
    /// Mean score.
    pub mean: f64,
    /// Standard deviation of the scores (ddof 0).
    pub std: f64,
    /// Rows averaged.
    pub n: u64,
}

fn stats_columns(stats: impl Iterator<Item = Stats> + Clone) -> [ArrayRef; 4] {
    [
        Arc::new(stats.clone().map(|s| opt(s.aie)).collect::<Float64Array>()),
        Arc::new(stats.clone().map(|s| opt(s.mean)).collect::<Float64Array>()),
        Arc::new(stats.clone().map(|s| opt(s.std)).collect::<Float64Array>()),
        Arc::new(stats.map(|s| s.n).collect::<UInt64Array>()),
    ]
}

/// One cell of a sweep's summary (`summary.parquet`): Figure 2 for one kind.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRow {
    /// `hidden`, `mlp` or `attn`.
    pub kind: Kind,
    /// One of [`crate::rollup::CATEGORIES`].
    pub category: &'static str,
    /// The layer.
    pub layer: u32,
    /// Average indirect effect: mean score − mean low_score.
    pub aie: f64,
    /// Mean score.
    pub mean: f64,
    /// Standard deviation of the scores (ddof 0).
    pub std: f64,
    /// Rows averaged.
    pub n: u64,
}

/// The `summary` schema.
pub fn summary_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("kind", DataType::Utf8, false),
        Field::new("category", DataType::Utf8, false),
        Field::new("layer", DataType::UInt32, false),
        Field::new("aie", DataType::Float64, true),
        Field::new("mean", DataType::Float64, true),
        Field::new("std", DataType::Float64, true),
        Field::new("n", DataType::UInt64, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("scale", DataType::Utf8, false),
    ]))
}

/// Summary rows as a record batch (NaN, for a category no fact has, becomes null).
pub fn summary_batch(rows: &[SummaryRow], measured: Measured<'_>) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(rows.iter().map(|r| Some(r.kind.name())).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| Some(r.category)).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| r.layer).collect::<UInt32Array>()),
        Arc::new(rows.iter().map(|r| opt(r.aie)).collect::<Float64Array>()),
        Arc::new(rows.iter().map(|r| opt(r.mean)).collect::<Float64Array>()),
        Arc::new(rows.iter().map(|r| opt(r.std)).collect::<Float64Array>()),
        Arc::new(rows.iter().map(|r| r.n).collect::<UInt64Array>()),
    ];
    columns.extend(measured_columns(measured, rows.len()));
    batch(summary_schema(), columns, "summary")
}

/// One bar of Figure 3 (`figure3.parquet`): at the last subject token, the effect of
/// restoring the hidden state of one layer in the ordinary or a severed run, each minus the
/// ordinary run's mean low_score (ROME's notebook).
#[derive(Debug, Clone, PartialEq)]
pub struct Figure3Row {
    /// The layer restored.
    pub layer: u32,
    /// `hidden` (the ordinary run), `severed_attn` or `severed_mlp`.
    pub kind: Kind,
    /// The cell's statistics over the facts.
    pub stats: Stats,
}

/// The `figure3` schema.
pub fn figure3_schema() -> SchemaRef {
    let mut fields = vec![
        Field::new("layer", DataType::UInt32, false),
        Field::new("kind", DataType::Utf8, false),
    ];
    fields.extend(stats_fields());
    fields.extend(measured_fields());
    Arc::new(Schema::new(fields))
}

/// Figure 3's rows as a record batch.
pub fn figure3_batch(rows: &[Figure3Row], measured: Measured<'_>) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(rows.iter().map(|r| r.layer).collect::<UInt32Array>()),
        Arc::new(rows.iter().map(|r| Some(r.kind.name())).collect::<StringArray>()),
    ];
    columns.extend(stats_columns(rows.iter().map(|r| r.stats)));
    columns.extend(measured_columns(measured, rows.len()));
    batch(figure3_schema(), columns, "figure3")
}

/// One cell of the per-head maps (`heads.parquet`): restoring head h of layer l at a token
/// category, averaged over facts.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadRow {
    /// `last_subject` or `last`.
    pub category: &'static str,
    /// The layer.
    pub layer: u32,
    /// The head.
    pub head: u32,
    /// The cell's statistics over the facts.
    pub stats: Stats,
}

/// The `heads` schema.
pub fn heads_schema() -> SchemaRef {
    let mut fields = vec![
        Field::new("category", DataType::Utf8, false),
        Field::new("layer", DataType::UInt32, false),
        Field::new("head", DataType::UInt32, false),
    ];
    fields.extend(stats_fields());
    fields.extend(measured_fields());
    Arc::new(Schema::new(fields))
}

/// The per-head rows as a record batch.
pub fn heads_batch(rows: &[HeadRow], measured: Measured<'_>) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(rows.iter().map(|r| Some(r.category)).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| r.layer).collect::<UInt32Array>()),
        Arc::new(rows.iter().map(|r| r.head).collect::<UInt32Array>()),
    ];
    columns.extend(stats_columns(rows.iter().map(|r| r.stats)));
    columns.extend(measured_columns(measured, rows.len()));
    batch(heads_schema(), columns, "heads")
}
