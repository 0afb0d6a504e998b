//! The numbers of `report.html` that no other output has: the per-relation table (each
//! relation's facts averaged as Figure 2 averages them all, the same numbers as
//! queries/per_relation.sql) and the facts with the largest and smallest best indirect
//! effect at the last subject token, with their own heatmaps.

use std::collections::BTreeMap;

use common::fact_texts::FactText;
use common::kinds::{Kind, fill};
use common::plot::Heatmap;
use common::rollup::rollup_of;
use common::tables::FactSummary;

use super::figure2::on_scale;
use super::read::{FactFilter, SweepTables};

/// A best effect and its layer, as a rollup's headline holds it.
pub type Best = Option<(f64, usize)>;

/// One relation's row: its facts averaged per kind.
#[derive(Debug, Clone, PartialEq)]
pub struct RelationRow {
    /// The Wikidata relation (`(none)` for facts without one).
    pub relation: String,
    /// Facts of the relation that the filter keeps and that are complete in some kind.
    pub facts: usize,
    /// Per kind (in the rollups' order): the best effect at the last subject token and at
    /// the last token, each with its layer.
    pub best: Vec<(Kind, Best, Best)>,
}

/// Per relation, the headline of each token × layer kind over that relation's facts, on the
/// measure's scale (a ratio of means over each relation's own facts, as per_relation.sql).
/// Most facts first.
pub fn relation_rows(sweep: &SweepTables, filter: FactFilter, kinds: &[Kind]) -> Vec<RelationRow> {
    let mut by_relation: BTreeMap<String, Vec<&FactSummary>> = BTreeMap::new();
    for f in sweep.facts.iter().filter(|f| filter.keeps(f)) {
        let relation = f.relation_id.clone().unwrap_or_else(|| "(none)".into());
        by_relation.entry(relation).or_default().push(f);
    }
    let mut rows: Vec<RelationRow> = by_relation
        .into_iter()
        .filter_map(|(relation, facts)| {
            let mut most = 0;
            let best = kinds
                .iter()
                .map(|&kind| {
                    let tables: Vec<_> =
                        facts.iter().filter_map(|f| sweep.fact_table(kind, f)).collect();
                    most = most.max(tables.len());
                    let r = rollup_of(&tables, sweep.geometry.n_layers, sweep.categories)
                        .map(|r| on_scale(sweep, r));
                    let h = r.as_ref().map(|r| &r.headline);
                    (kind, h.and_then(|h| h.best_last_subject), h.and_then(|h| h.best_last_token))
                })
                .collect();
            (most > 0).then_some(RelationRow { relation, facts: most, best })
        })
        .collect();
    rows.sort_by(|a, b| b.facts.cmp(&a.facts).then_with(|| a.relation.cmp(&b.relation)));
    rows
}

/// A fact ranked by its best effect at the last subject token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    /// The fact.
    pub known_id: u64,
    /// The best of (value − the fact's corrupted value) over the layers, toward the clean
    /// run (the most negative for raw KL), in the measure's metric.
    pub effect: f64,
    /// Its layer.
    pub layer: usize,
}

/// The facts `filter` keeps whose `kind` table is complete and traced the last subject
/// token, ranked by their best effect there: the `n` largest (largest first) and then the
/// `n` smallest (smallest first), never the same fact twice.
pub fn extremes(
    sweep: &SweepTables,
    filter: FactFilter,
    kind: Kind,
    n: usize,
) -> (Vec<Ranked>, Vec<Ranked>) {
    let sign = sweep.measure.better().sign();
    let mut ranked: Vec<Ranked> = sweep
        .facts
        .iter()
        .filter(|f| filter.keeps(f))
        .filter_map(|f| {
            let table = sweep.fact_table(kind, f)?;
            let last = f.subject.1.checked_sub(1)?;
            let row = table.scores.get(last).filter(|r| !r.is_empty())?;
            let (layer, gain) = row
                .iter()
                .map(|v| sign * (v - table.low_score))
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(&b.1))?;
            Some(Ranked { known_id: f.known_id, effect: sign * gain, layer })
        })
        .collect();
    ranked.sort_by(|a, b| {
        (sign * b.effect).total_cmp(&(sign * a.effect)).then(a.known_id.cmp(&b.known_id))
    });
    let top = n.min(ranked.len().div_ceil(2));
    let bottom = n.min(ranked.len() - top);
    let largest = ranked[..top].to_vec();
    let smallest = ranked[ranked.len() - bottom..].iter().rev().copied().collect();
    (largest, smallest)
}

/// A fact's heatmap of `kind` in the style of the worker's per-fact maps: its traced tokens
/// down the side (subject tokens starred), layers across, from its corrupted value to its
/// best. Raw KL is drawn negated, so that darker is still nearer the clean run.
pub fn fact_heatmap(
    sweep: &SweepTables,
    fact: &FactSummary,
    text: Option<&FactText>,
    kind: Kind,
) -> Option<Heatmap> {
    let table = sweep.fact_table(kind, fact)?;
    let sign = sweep.measure.better().sign();
    let (b, e) = fact.subject;
    let label = |t: usize| {
        let word = text.and_then(|x| x.tokens.get(t)).map_or_else(|| format!("#{t}"), Clone::clone);
        if (b..e).contains(&t) { format!("{word}*") } else { word }
    };
    let values: Vec<Vec<f64>> = fact
        .traced_tokens
        .iter()
        .map(|&t| table.scores[t].iter().map(|v| sign * v).collect())
        .collect();
    let m = &sweep.measure;
    let quantity = match text {
        Some(x) if m.is_prob_raw() => format!("p({})", x.answer.trim()),
        _ if m.per_fact().is_some() => "recovery".into(),
        _ if sign < 0.0 => format!("−{}", m.quantity()),
        _ => m.quantity().into(),
    };
    let style = kind.style();
    Some(Heatmap::fact_trace(
        kind,
        format!("Impact of restoring {} after corrupted input", style.what),
        fact.traced_tokens.iter().map(|&t| label(t)).collect(),
        values,
        sign * table.low_score,
        quantity,
        fill(style.x_label, sweep.window as usize, &sweep.model),
    ))
}
