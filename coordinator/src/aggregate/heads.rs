//! The per-head maps: for the `head` kind, the average indirect effect of restoring one
//! attention head's output at the last subject token and at the last token, layer × head:
//! `heads.parquet`/`.csv` and one heatmap per token (AIE clipped at 0, as Figure 2's maps).

use std::io::Write;
use std::path::{Path, PathBuf};

use common::kinds::Kind;
use common::plot::Heatmap;
use common::rollup::{CATEGORIES, Rollup, rollup_of};
use common::summaries::{HeadRow, Stats, heads_batch};
use common::tables::write_parquet;

use super::figure2::{measured, on_scale};
use super::read::{FactFilter, SweepTables};

/// The token categories the maps show, as `rollup`'s category indices.
const MAPS: [(usize, &str); 2] = [(2, "last subject token"), (5, "last token")];

/// The per-head rollup: `rollup` over rows of L × H cells (layer-major), when the sweep has
/// the `head` kind and a complete fact; on the measure's scale.
pub fn compute(sweep: &SweepTables, filter: FactFilter) -> Option<Rollup> {
    if !sweep.tables.contains_key(&Kind::Head) {
        return None;
    }
    let facts = sweep.complete(Kind::Head, filter);
    rollup_of(&facts, Kind::Head.cells_per_token(sweep.geometry), sweep.categories)
        .filter(|r| maps(r).next().is_some())
        .map(|r| on_scale(sweep, r))
}

/// The maps whose token category has rows.
fn maps(r: &Rollup) -> impl Iterator<Item = (usize, &'static str)> + '_ {
    MAPS.into_iter().filter(|&(category, _)| r.cell(category, 0).n > 0)
}

fn rows(sweep: &SweepTables, r: &Rollup) -> Vec<HeadRow> {
    let heads = sweep.geometry.n_heads;
    maps(r)
        .flat_map(|(category, _)| {
            (0..r.n_layers).map(move |column| {
                let c = r.cell(category, column);
                HeadRow {
                    category: CATEGORIES[category],
                    layer: (column / heads) as u32,
                    head: (column % heads) as u32,
                    stats: Stats { aie: c.aie, mean: c.mean, std: c.std, n: c.n as u64 },
                }
            })
        })
        .collect()
}

/// Writes `heads.parquet`, `heads.csv` and the two maps; returns the files.
pub fn write(sweep: &SweepTables, r: &Rollup, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let rows = rows(sweep, r);
    let m = measured(sweep);
    let mut csv = String::from("category,layer,head,aie,mean,std,n,metric,scale\n");
    for h in &rows {
        let s = h.stats;
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{}\n",
            h.category, h.layer, h.head, s.aie, s.mean, s.std, s.n, m.metric, m.scale
        ));
    }
    let parquet = write_parquet(&heads_batch(&rows, m)?, "heads")?;
    let mut written = super::write_table(out, "heads", parquet, csv)?;
    let (n_layers, n_heads) = (sweep.geometry.n_layers, sweep.geometry.n_heads);
    let style = Kind::Head.style();
    let measure = &sweep.measure;
    // Raw KL's maps show −AIE, how far a head lowers it (as Figure 2's maps).
    let sign = measure.better().sign();
    for (category, label) in maps(r) {
        let values: Vec<Vec<f64>> = (0..n_heads)
            .map(|h| {
                (0..n_layers)
                    .map(|l| (sign * r.cell(category, l * n_heads + h).aie).max(0.0))
                    .map(|v| if v.is_nan() { 0.0 } else { v })
                    .collect()
            })
            .collect();
        let vmax = values.iter().flatten().copied().fold(0f64, f64::max);
        let map = Heatmap {
            title: format!(
                "{} at the {label} over {} prompts",
                measure.map_title(style.what),
                r.headline.facts
            ),
            row_labels: (0..n_heads).map(|h| format!("head {h}")).collect(),
            x_label: format!("layer within {}", sweep.model),
            x_tick_every: 5,
            values,
            vmin: 0.0,
            vmax: vmax.max(1e-6),
            palette: style.palette,
            bar_label: measure.map_label().into(),
        };
        let stem = format!("heads_{}", CATEGORIES[category]);
        written.extend(map.write(&out.join(stem))?);
    }
    Ok(written)
}

/// The strongest heads, as text.
pub fn print(sweep: &SweepTables, r: &Rollup, out: &mut dyn Write) -> anyhow::Result<()> {
    let heads = sweep.geometry.n_heads;
    let sign = sweep.measure.better().sign();
    writeln!(
        out,
        "\nhead: {} facts, the five strongest heads per token ({}):",
        r.headline.facts,
        sweep.measure.effect()
    )?;
    for (category, label) in maps(r) {
        let mut cells: Vec<(usize, f64)> = (0..r.n_layers)
            .map(|c| (c, r.cell(category, c).aie))
            .filter(|(_, v)| v.is_finite())
            .collect();
        cells.sort_by(|a, b| (sign * b.1).total_cmp(&(sign * a.1)));
        let top: Vec<String> = cells
            .iter()
            .take(5)
            .map(|&(c, v)| format!("L{}H{} {:.4}", c / heads, c % heads, v))
            .collect();
        writeln!(out, "  {label:>18}: {}", top.join(", "))?;
    }
    Ok(())
}
