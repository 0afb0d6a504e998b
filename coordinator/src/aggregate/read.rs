//! A sweep's tables read back and grouped per kind and fact, each fact's table shaped by its
//! kind's axes: a row per token of the cells along the other axes (L, or L × H), empty for
//! tokens the experiment's selector did not trace. The cells and each fact's clean and
//! corrupted values are those of the measure's metric, mapped to per-fact recovery already
//! when the measure asks for it.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, bail};
use common::experiment::Tokens;
use common::fact_texts::{FactText, read_fact_texts};
use common::kinds::{Geometry, Kind};
use common::metric::Metric;
use common::rollup::{FactTable, Rescale};
use common::storage::Location;
use common::tables::{FactSummary, read_facts, read_traces};

use super::Measure;

/// Which facts the averages take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FactFilter {
    /// Traced facts the model predicts (ROME's Figure 2: "only consider cases where the model
    /// begins with the correct prediction").
    Correct,
    /// Every traced fact (ROME's Figure 3 notebook averages all of `knowns[:1000]`, with
    /// `--correctness none`).
    All,
}

impl FactFilter {
    /// Whether `fact` is averaged.
    pub fn keeps(self, fact: &FactSummary) -> bool {
        fact.traced
            && match self {
                FactFilter::Correct => fact.correct != Some(false),
                FactFilter::All => true,
            }
    }
}

/// A sweep's tables, read and grouped.
pub struct SweepTables {
    /// Fact rows.
    pub facts: Vec<FactSummary>,
    /// Per kind, per fact: T rows of the token's cells (empty when not traced).
    pub tables: BTreeMap<Kind, HashMap<u64, Vec<Vec<f64>>>>,
    /// The model's layers and heads.
    pub geometry: Geometry,
    /// The model's name, from the manifest when there is one.
    pub model: String,
    /// The windowed kinds' window.
    pub window: u32,
    /// The token categories the experiment's selector traced (all six without a manifest).
    pub categories: [bool; 6],
    /// What the cells and levels are.
    pub measure: Measure,
    /// Per fact: its clean and corrupted values of the measure (1 and 0 for per-fact
    /// recovery).
    pub levels: HashMap<u64, (f64, f64)>,
    /// The sweep's manifest, when it has one that parses.
    pub manifest: Option<serde_json::Value>,
    /// The facts' words (prompts, tokens, answers), by id.
    pub texts: HashMap<u64, FactText>,
}

/// A fact's clean and corrupted values of `metric`: `high_score` and `low_score` for prob
/// (as before metrics, so p(o)'s numbers stay bit for bit; `clean_prob` is the same value in
/// f64), else the schema 4 columns, `None` in an older sweep.
fn levels(fact: &FactSummary, metric: Metric) -> Option<(f64, f64)> {
    match metric {
        Metric::Prob => Some((f64::from(fact.high_score), f64::from(fact.low_score))),
        m => Some((fact.clean?.get(m), fact.corrupted?.get(m))),
    }
}

/// The rows of `table`'s files that the journal has committed (`committed`, read once per
/// sweep): a sweep read while it runs, or after a crash, can hold files of a flush whose
/// commit never came (queries/facts.sql reads the same files).
async fn read_table<T>(
    at: &Location,
    committed: &HashSet<String>,
    table: &str,
    read: impl Fn(&bytes::Bytes) -> common::Result<Vec<T>>,
) -> anyhow::Result<Vec<T>> {
    let mut rows = Vec::new();
    for (name, _) in at.list(table).await? {
        if name.ends_with(".parquet") && committed.contains(&name) {
            rows.extend(read(&at.read_child(&name).await?).with_context(|| name.clone())?);
        }
    }
    Ok(rows)
}

/// The committed `facts` rows with their words, each file read once (both readers walk the
/// same batches in the same order, so row i of one is row i of the other).
async fn read_facts_and_texts(
    at: &Location,
    committed: &HashSet<String>,
) -> anyhow::Result<(Vec<FactSummary>, HashMap<u64, FactText>)> {
    let both = read_table(at, committed, "facts", |bytes| {
        Ok(read_facts(bytes)?.into_iter().zip(read_fact_texts(bytes)?).collect::<Vec<_>>())
    })
    .await?;
    let (facts, texts): (Vec<_>, Vec<_>) = both.into_iter().unzip();
    Ok((facts, texts.into_iter().map(|t| (t.known_id, t)).collect()))
}

/// The ids of the facts of a sweep folder that `filter` keeps (read from `facts/` only).
pub async fn kept_ids(at: &Location, filter: FactFilter) -> anyhow::Result<HashSet<u64>> {
    let committed = crate::journal::committed_files(at).await?;
    let facts = read_table(at, &committed, "facts", read_facts).await?;
    if facts.is_empty() {
        bail!(
            "{} has no committed facts/*.parquet: is it a sweep folder (<out>/<sweep-id>) with a commit?",
            at.display
        );
    }
    Ok(facts.iter().filter(|f| filter.keeps(f)).map(|f| f.known_id).collect())
}

/// Reads `facts/` and `traces/` of a sweep folder: the values of `measure`'s metric.
pub async fn read_sweep(at: &Location, measure: &Measure) -> anyhow::Result<SweepTables> {
    let manifest: Option<serde_json::Value> = match at.read_child("manifest.json").await {
        Ok(bytes) => serde_json::from_slice(&bytes).ok(),
        Err(_) => None,
    };
    let schema = manifest.as_ref().map(|m| m["settings"]["schema"].as_u64().unwrap_or(1));
    let readable = common::sweep::READABLE;
    let known = |s: u64| u32::try_from(s).is_ok_and(|s| readable.contains(&s));
    if let Some(found) = schema.filter(|&s| !known(s)) {
        bail!(
            "{} holds a sweep of table schema {found}; this coordinator reads schemas {} to \
             {}: aggregate it with the version that wrote it",
            at.display,
            readable.start(),
            readable.end()
        );
    }
    let committed = crate::journal::committed_files(at).await?;
    let (facts, texts) = read_facts_and_texts(at, &committed).await?;
    if facts.is_empty() {
        bail!(
            "{} has no committed facts/*.parquet: is it a sweep folder (<out>/<sweep-id>) with a commit?",
            at.display
        );
    }
    let metric = measure.metric;
    if facts.iter().any(|f| levels(f, metric).is_none()) {
        // Schema 4 added the metric columns; a sweep without them cannot be averaged in any
        // metric but prob (its rows would all read NaN and drop silently).
        let schema = schema.map_or_else(|| "below 4".to_string(), |s| s.to_string());
        bail!(
            "--metric {metric}: {} holds a sweep of table schema {schema}, whose tables record \
             only prob (schema 4 adds logprob, logit_diff and kl): aggregate it with --metric prob",
            at.display
        );
    }
    let levels: HashMap<u64, (f64, f64)> =
        facts.iter().filter_map(|f| Some((f.known_id, levels(f, metric)?))).collect();
    // Per-fact recovery maps each fact's values as they are read; the clean value becomes 1
    // and the corrupted 0.
    let per_fact: HashMap<u64, Rescale> = match measure.per_fact() {
        Some(floor) => levels
            .iter()
            .map(|(&id, &(clean, corrupted))| (id, Rescale::per_fact(clean, corrupted, floor)))
            .collect(),
        None => HashMap::new(),
    };
    let levels = match measure.per_fact() {
        Some(_) => levels.keys().map(|&id| (id, (1.0, 0.0))).collect(),
        None => levels,
    };
    let rows = read_table(at, &committed, "traces", read_traces).await?;
    let n_layers = facts.iter().map(|f| f.n_layers as usize).max().unwrap_or(0);
    let n_heads = facts.iter().map(|f| f.n_heads as usize).max().unwrap_or(0);
    let geometry = Geometry { n_layers, n_heads };
    let model = manifest.as_ref().and_then(|m| m["model"].as_str()).map_or_else(
        || "the model".to_string(),
        |m| {
            let last = m.trim_end_matches('/').rsplit('/').next().unwrap_or(m);
            last.strip_suffix(".gguf").unwrap_or(last).to_string()
        },
    );
    let window = manifest
        .as_ref()
        .and_then(|m| m["settings"]["experiment"]["window"].as_u64())
        .map_or(10, |w| w as u32);
    let categories = manifest
        .as_ref()
        .and_then(|m| {
            serde_json::from_value::<Tokens>(m["settings"]["experiment"]["tokens"].clone()).ok()
        })
        .map_or([true; 6], |t| t.categories());
    let t_len: HashMap<u64, usize> = facts.iter().map(|f| (f.known_id, f.n_tokens)).collect();
    let mut tables: BTreeMap<Kind, HashMap<u64, Vec<Vec<f64>>>> = BTreeMap::new();
    for r in rows {
        let Some(&t) = t_len.get(&r.known_id) else { continue };
        let heads = r.kind.heads(geometry);
        let head = r.head.unwrap_or(0) as usize;
        if r.token as usize >= t || r.layer as usize >= n_layers || head >= heads {
            bail!("traces row {r:?} lies outside its fact's {t} tokens × {geometry:?}");
        }
        let table = tables
            .entry(r.kind)
            .or_default()
            .entry(r.known_id)
            .or_insert_with(|| vec![Vec::new(); t]);
        let row = &mut table[r.token as usize];
        if row.is_empty() {
            *row = vec![f64::NAN; n_layers * heads];
        }
        let value = f64::from(r.value(metric));
        row[r.layer as usize * heads + head] = match per_fact.get(&r.known_id) {
            Some(map) => map.value(value),
            None => value,
        };
    }
    Ok(SweepTables {
        facts,
        tables,
        geometry,
        model,
        window,
        categories,
        measure: *measure,
        levels,
        manifest,
        texts,
    })
}

impl SweepTables {
    /// The table of `kind` for `fact` when every traced token has every cell: a fact with
    /// a job given up has holes, and is left out rather than bias a cell.
    pub fn fact_table(&self, kind: Kind, fact: &FactSummary) -> Option<FactTable<'_>> {
        let scores = self.tables.get(&kind)?.get(&fact.known_id)?;
        let width = kind.cells_per_token(self.geometry);
        let full = fact.traced_tokens.iter().all(|&t| {
            scores.get(t).is_some_and(|row| row.len() == width && !row.iter().any(|v| v.is_nan()))
        });
        let &(high_score, low_score) = self.levels.get(&fact.known_id)?;
        full.then_some(FactTable { subject: fact.subject, high_score, low_score, scores })
    }

    /// The complete tables of `kind` of the facts `filter` keeps.
    pub fn complete(&self, kind: Kind, filter: FactFilter) -> Vec<FactTable<'_>> {
        self.facts
            .iter()
            .filter(|f| filter.keeps(f))
            .filter_map(|f| self.fact_table(kind, f))
            .collect()
    }

    /// The complete tables of `kind` of the facts `ids`.
    pub fn tables_of(&self, kind: Kind, ids: &[u64]) -> Vec<FactTable<'_>> {
        self.facts
            .iter()
            .filter(|f| ids.contains(&f.known_id))
            .filter_map(|f| self.fact_table(kind, f))
            .collect()
    }

    /// Facts the filter keeps.
    pub fn kept(&self, filter: FactFilter) -> usize {
        self.facts.iter().filter(|f| filter.keeps(f)).count()
    }
}
