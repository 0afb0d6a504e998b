//! The paper's Figure 3 (ROME's notebook `causal_trace_frozen_mlp_attn.ipynb`, "Average
//! Indirect Effects"): per layer, the average indirect effect at the last subject token of
//! restoring one hidden state in the ordinary run (`hidden`), with the attention severed
//! (`severed_attn`) and with the MLP severed (`severed_mlp`), each minus the ordinary run's
//! mean `low_score`, as the notebook subtracts `ordinary_r["low_score"]` from all three.
//! Averaged over the facts complete in every one of these kinds, so the bars compare the
//! same facts. Written as `figure3.parquet`/`.csv` and grouped bars in the notebook's colours.
//! On the recovery scale as a ratio of means, every series is divided by the ATE of those
//! facts (mean clean − mean corrupted).

use std::io::Write;
use std::path::{Path, PathBuf};

use common::barplot::{BarChart, Bars, FIGURE3_COLORS};
use common::kinds::Kind;
use common::rollup::{Rescale, rollup};
use common::summaries::{Figure3Row, Stats, figure3_batch};
use common::tables::write_parquet;

use super::figure2::measured;
use super::read::{FactFilter, SweepTables};

/// The last subject token's row in `rollup`'s categories.
const LAST_SUBJECT: usize = 2;

/// The series of the figure, in the notebook's order and words.
const SERIES: [(Kind, &str); 3] = [
    (Kind::Hidden, "Effect of single state on P"),
    (Kind::SeveredAttn, "Effect with Attn severed"),
    (Kind::SeveredMlp, "Effect with MLP severed"),
];

/// Figure 3's numbers: per series present, per layer, the statistics; and the facts.
#[derive(Debug, Clone)]
pub struct Figure3 {
    /// The series present (the ordinary run and at least one severed kind).
    pub series: Vec<(Kind, Vec<Stats>)>,
    /// Facts averaged.
    pub facts: usize,
}

/// Figure 3, when the sweep has `hidden` and a severed kind with a complete fact.
pub fn compute(sweep: &SweepTables, filter: FactFilter) -> Option<Figure3> {
    let kinds: Vec<Kind> =
        SERIES.iter().map(|&(k, _)| k).filter(|k| sweep.tables.contains_key(k)).collect();
    if !kinds.contains(&Kind::Hidden) || kinds.len() < 2 || !sweep.categories[LAST_SUBJECT] {
        return None;
    }
    // The facts complete in every series, so that the bars compare the same facts.
    let ids: Vec<u64> = sweep
        .facts
        .iter()
        .filter(|f| filter.keeps(f) && kinds.iter().all(|&k| sweep.fact_table(k, f).is_some()))
        .map(|f| f.known_id)
        .collect();
    if ids.is_empty() {
        return None;
    }
    let n_layers = sweep.geometry.n_layers;
    let (ordinary_high, ordinary_low) = {
        let facts = sweep.tables_of(Kind::Hidden, &ids);
        let n = facts.len() as f64;
        let high = facts.iter().map(|f| f.high_score).sum::<f64>() / n;
        (high, facts.iter().map(|f| f.low_score).sum::<f64>() / n)
    };
    // Raw (or per-fact recovery, mapped already): the identity, so p(o)'s bars stay bit for
    // bit.
    let map = sweep.measure.averaged(ordinary_high, ordinary_low).unwrap_or(Rescale::IDENTITY);
    let low = map.value(ordinary_low);
    let series = kinds
        .iter()
        .filter_map(|&kind| {
            let facts = sweep.tables_of(kind, &ids);
            let r = rollup(&facts, n_layers)?;
            let stats = (0..n_layers)
                .map(|l| {
                    let c = r.cell(LAST_SUBJECT, l);
                    let mean = map.value(c.mean);
                    Stats { aie: mean - low, mean, std: map.spread(c.std), n: c.n as u64 }
                })
                .collect();
            Some((kind, stats))
        })
        .collect();
    Some(Figure3 { series, facts: ids.len() })
}

/// Writes `figure3.parquet`, `figure3.csv` and the bars; returns the files.
pub fn write(sweep: &SweepTables, fig: &Figure3, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let rows: Vec<Figure3Row> = fig
        .series
        .iter()
        .flat_map(|(kind, stats)| {
            stats.iter().enumerate().map(|(l, &stats)| Figure3Row {
                layer: l as u32,
                kind: *kind,
                stats,
            })
        })
        .collect();
    let m = measured(sweep);
    let mut csv = String::from("layer,kind,aie,mean,std,n,metric,scale\n");
    for r in &rows {
        let s = r.stats;
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{}\n",
            r.layer, r.kind, s.aie, s.mean, s.std, s.n, m.metric, m.scale
        ));
    }
    let parquet = write_parquet(&figure3_batch(&rows, m)?, "figure3")?;
    let mut written = super::write_table(out, "figure3", parquet, csv)?;
    let chart = BarChart {
        title: format!(
            "Causal effect of states at the early site with Attn or MLP modules severed ({} prompts)",
            fig.facts
        ),
        x_label: format!("Layer at which the single hidden state is restored ({})", sweep.model),
        // ROME's words for p(o) raw, else the measure's.
        y_label: if sweep.measure.is_prob_raw() {
            "Average Indirect Effect".into()
        } else {
            sweep.measure.axis()
        },
        percent: sweep.measure.fractions(),
        series: fig
            .series
            .iter()
            .map(|(kind, stats)| {
                let i = SERIES.iter().position(|(k, _)| k == kind).unwrap_or(0);
                Bars {
                    label: SERIES[i].1.into(),
                    color: FIGURE3_COLORS[i],
                    values: stats.iter().map(|s| s.aie).collect(),
                }
            })
            .collect(),
    };
    written.extend(chart.write(&out.join("figure3"))?);
    Ok(written)
}

/// The figure's peaks, as text.
pub fn print(sweep: &SweepTables, fig: &Figure3, out: &mut dyn Write) -> anyhow::Result<()> {
    let m = &sweep.measure;
    let (effect, times, sign) = (m.effect(), m.times(), m.better().sign());
    let rule = if m.is_ratio() {
        "(mean score − the ordinary run's mean low_score) / its ATE"
    } else {
        "mean score − the ordinary run's mean low_score"
    };
    writeln!(out, "\nFigure 3 (last subject token, {} facts; {effect} = {rule}):", fig.facts)?;
    for (kind, stats) in &fig.series {
        let best = stats
            .iter()
            .enumerate()
            .filter(|(_, s)| s.aie.is_finite())
            .max_by(|a, b| (sign * a.1.aie).total_cmp(&(sign * b.1.aie)));
        if let Some((layer, s)) = best {
            writeln!(out, "  {kind:>13}: best {effect} {:.4} at layer {layer}", s.aie)?;
        }
        let cells: String = stats.iter().map(|s| format!("{:>4.0}", s.aie * times)).collect();
        writeln!(out, "  {:>13}  {cells}   ({effect} × {times} by layer)", "")?;
    }
    Ok(())
}
