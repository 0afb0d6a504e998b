//! The paper's Figure 2 for every kind with token × layer axes: `summary.parquet`/`.csv`
//! (kind, category, layer, aie, mean, std, n), `headline.csv`/`.json` (ATE and the best AIEs),
//! and, when every token was traced, one heatmap per kind in the kind's style and the line
//! plot with 95% bands. The tables record the measure (metric, scale) in their last columns
//! (headline.json in each kind's fields).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use common::kinds::Kind;
use common::lineplot::{CATEGORY_COLORS, Line, Panel, write_panels};
use common::plot::Heatmap;
use common::rollup::{CATEGORIES, CATEGORY_LABELS, Rollup, rollup_of};
use common::summaries::{Measured, SummaryRow, summary_batch};
use common::tables::write_parquet;

use super::read::{FactFilter, SweepTables};

/// ROME's rollup of each token × layer kind over the facts `filter` keeps, on the measure's
/// scale.
pub fn rollups(sweep: &SweepTables, filter: FactFilter) -> BTreeMap<Kind, Rollup> {
    sweep
        .tables
        .keys()
        .filter(|k| !k.has_heads())
        .filter_map(|&kind| {
            let facts = sweep.complete(kind, filter);
            let r = rollup_of(&facts, sweep.geometry.n_layers, sweep.categories)?;
            Some((kind, on_scale(sweep, r)))
        })
        .collect()
}

/// A rollup of the measure's values on its scale: divided by its own ATE for recovery as a
/// ratio of means (over the same facts), else as it is, its best AIEs the furthest toward
/// the clean run (the smallest for raw KL).
pub(crate) fn on_scale(sweep: &SweepTables, r: Rollup) -> Rollup {
    let m = &sweep.measure;
    match m.averaged(r.headline.high_score, r.headline.low_score) {
        Some(map) => r.rescaled(map, m.better()),
        None => r.toward(m.better()),
    }
}

/// The measure's names, as the tables' last columns.
pub(crate) fn measured(sweep: &SweepTables) -> Measured<'_> {
    Measured { metric: sweep.measure.metric.name(), scale: sweep.measure.tag() }
}

fn fill(template: &str, sweep: &SweepTables) -> String {
    common::kinds::fill(template, sweep.window as usize, &sweep.model)
}

fn summary_rows(rollups: &BTreeMap<Kind, Rollup>) -> Vec<SummaryRow> {
    rollups
        .iter()
        .flat_map(|(&kind, r)| {
            r.cells.iter().map(move |c| SummaryRow {
                kind,
                category: CATEGORIES[c.category],
                layer: c.layer as u32,
                aie: c.aie,
                mean: c.mean,
                std: c.std,
                n: c.n as u64,
            })
        })
        .collect()
}

/// A CSV cell: empty for a category that was not traced (as DuckDB writes NULL).
fn cell<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(String::new, |v| v.to_string())
}

/// Writes the tables and figures; returns the files written.
pub fn write(
    sweep: &SweepTables,
    rollups: &BTreeMap<Kind, Rollup>,
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let rows = summary_rows(rollups);
    let m = measured(sweep);
    let mut csv = String::from("kind,category,layer,aie,mean,std,n,metric,scale\n");
    for r in &rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{}\n",
            r.kind, r.category, r.layer, r.aie, r.mean, r.std, r.n, m.metric, m.scale
        ));
    }
    let parquet = write_parquet(&summary_batch(&rows, m)?, "summary")?;
    let mut written = super::write_table(out, "summary", parquet, csv)?;

    let mut headline_csv = String::from(
        "kind,facts,high_score,low_score,ate,best_aie_last_subject,best_layer_last_subject,best_aie_last_token,best_layer_last_token,metric,scale\n",
    );
    let floor = sweep.measure.per_fact();
    let mut headline_json = serde_json::Map::new();
    for (kind, r) in rollups {
        let h = &r.headline;
        headline_csv.push_str(&format!(
            "{kind},{},{},{},{},{},{},{},{},{},{}\n",
            h.facts,
            h.high_score,
            h.low_score,
            h.ate,
            cell(h.best_last_subject.map(|b| b.0)),
            cell(h.best_last_subject.map(|b| b.1)),
            cell(h.best_last_token.map(|b| b.0)),
            cell(h.best_last_token.map(|b| b.1)),
            m.metric,
            m.scale,
        ));
        headline_json.insert(
            kind.name().into(),
            serde_json::json!({
                "facts": h.facts, "high_score": h.high_score, "low_score": h.low_score, "ate": h.ate,
                "best_aie_last_subject": h.best_last_subject.map(|b| b.0),
                "best_layer_last_subject": h.best_last_subject.map(|b| b.1),
                "best_aie_last_token": h.best_last_token.map(|b| b.0),
                "best_layer_last_token": h.best_last_token.map(|b| b.1),
                "metric": m.metric, "scale": m.scale, "recovery_floor": floor,
            }),
        );
    }
    for (name, text) in [
        ("headline.csv", headline_csv),
        ("headline.json", serde_json::to_string_pretty(&headline_json)?),
    ] {
        std::fs::write(out.join(name), text)?;
        written.push(out.join(name));
    }
    // The figures need every category's row; a token-selected sweep gets its tables only.
    if sweep.categories == [true; 6] {
        written.extend(heatmaps(sweep, rollups, out)?);
        written.extend(lines(sweep, rollups, out)?);
    }
    Ok(written)
}

/// AIE clipped at 0 (NaN, a category no fact has, as 0), every kind on the hidden map's
/// scale at least (as the notebook). Raw KL's maps show −AIE, how far a state lowers it.
fn heatmaps(
    sweep: &SweepTables,
    rollups: &BTreeMap<Kind, Rollup>,
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let m = &sweep.measure;
    let sign = m.better().sign();
    let clipped = |r: &Rollup| -> Vec<Vec<f64>> {
        (0..CATEGORIES.len())
            .map(|c| {
                (0..r.n_layers)
                    .map(|l| (sign * r.cell(c, l).aie).max(0.0))
                    .map(|v| if v.is_nan() { 0.0 } else { v })
                    .collect()
            })
            .collect()
    };
    let top = |r: &Rollup| clipped(r).into_iter().flatten().fold(0f64, f64::max);
    let vmax = rollups.get(&Kind::Hidden).or_else(|| rollups.values().next()).map_or(1.0, top);
    let mut written = Vec::new();
    for (&kind, r) in rollups {
        let style = kind.style();
        let map = Heatmap {
            title: format!("{} over {} prompts", m.map_title(style.what), r.headline.facts),
            row_labels: CATEGORY_LABELS.iter().map(ToString::to_string).collect(),
            x_label: fill(style.x_label, sweep),
            x_tick_every: 5,
            values: clipped(r),
            vmin: 0.0,
            vmax: if kind == Kind::Hidden { vmax } else { vmax.max(top(r)) },
            palette: style.palette,
            bar_label: m.map_label().into(),
        };
        written.extend(map.write(&out.join(format!("rollup_{kind}")))?);
    }
    Ok(written)
}

fn lines(
    sweep: &SweepTables,
    rollups: &BTreeMap<Kind, Rollup>,
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let panels: Vec<Panel> = rollups
        .iter()
        .map(|(&kind, r)| Panel {
            title: fill(kind.style().panel, sweep),
            x_label: format!("layer within {}", sweep.model),
            lines: (0..CATEGORIES.len())
                .map(|c| Line {
                    label: CATEGORY_LABELS[c].into(),
                    color: CATEGORY_COLORS[c],
                    values: (0..r.n_layers).map(|l| r.cell(c, l).aie).collect(),
                    // 95% band: 1.96 sd / sqrt(n) (docs/science.md), n the rows averaged.
                    half_width: (0..r.n_layers)
                        .map(|l| {
                            let cell = r.cell(c, l);
                            1.96 * cell.std / (cell.n as f64).sqrt()
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    Ok(write_panels(&panels, &sweep.measure.axis(), &out.join("lines"))?)
}

/// The headline and the AIE table of every kind, as text.
pub fn print(
    sweep: &SweepTables,
    rollups: &BTreeMap<Kind, Rollup>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    // Every layer when they fit in a line, else every other one.
    let step = if sweep.geometry.n_layers <= 32 { 1 } else { 2 };
    let (effect, times) = (sweep.measure.effect(), sweep.measure.times());
    for (kind, r) in rollups {
        let h = &r.headline;
        let best = |b: Option<(f64, usize)>| match b {
            Some((aie, layer)) => format!("{aie:.4} (layer {layer})"),
            None => "not traced".into(),
        };
        writeln!(
            out,
            "\n{kind}: {} facts, ATE {:.4} (high {:.4}, low {:.4}); best {effect} at the last subject token {}, at the last token {}",
            h.facts,
            h.ate,
            h.high_score,
            h.low_score,
            best(h.best_last_subject),
            best(h.best_last_token),
        )?;
        let header: String = (0..r.n_layers).step_by(step).map(|l| format!("{l:>4}")).collect();
        writeln!(out, "{:>24}{header}   ({effect} × {times} by layer)", "")?;
        for (c, label) in CATEGORY_LABELS.iter().enumerate() {
            let cells: String = (0..r.n_layers)
                .step_by(step)
                .map(|l| {
                    let v = r.cell(c, l).aie;
                    if v.is_finite() { format!("{:>4.0}", v * times) } else { "   -".into() }
                })
                .collect();
            writeln!(out, "{label:>24}{cells}")?;
        }
    }
    Ok(())
}
