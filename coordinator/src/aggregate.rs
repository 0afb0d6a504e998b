//! `coordinator aggregate`: a finished (or running) sweep's tables → ROME's averaged effects
//! (Figure 2): `summary.parquet`/`.csv` (kind, category, layer, aie, mean, std, n),
//! `headline.csv`/`.json` (ATE and best AIEs per kind), the three heatmaps and the line plot.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use common::lineplot::{CATEGORY_COLORS, Line, Panel, write_panels};
use common::plot::{Heatmap, Palette};
use common::rollup::{CATEGORIES, CATEGORY_LABELS, FactTable, Rollup, rollup};
use common::settings::Kind;
use common::storage::Location;
use common::tables::{
    FactSummary, SummaryRow, read_facts, read_traces, summary_batch, write_parquet,
};

/// `coordinator aggregate`.
#[derive(Debug, Args)]
pub struct AggregateArgs {
    /// The sweep's folder (`<out>/<sweep-id>`): a path or an object-store URL.
    #[arg(long)]
    pub results: String,
    /// Where the summary and figures go (default: `summary/` inside a local results folder,
    /// else `./summary`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A sweep's tables, read and grouped.
pub struct SweepTables {
    /// Fact rows.
    pub facts: Vec<FactSummary>,
    /// Per kind, per fact: T rows of L scores.
    pub tables: BTreeMap<Kind, HashMap<u64, Vec<Vec<f64>>>>,
    /// Layers L.
    pub n_layers: usize,
    /// The model's name and the window, from the manifest when there is one.
    pub model: String,
    /// The mlp/attn window.
    pub window: u32,
}

/// Reads `facts/` and `traces/` of a sweep folder.
pub async fn read_sweep(at: &Location) -> anyhow::Result<SweepTables> {
    let mut facts = Vec::new();
    for (name, _) in at.list("facts").await? {
        if name.ends_with(".parquet") {
            facts.extend(read_facts(&at.read_child(&name).await?).with_context(|| name.clone())?);
        }
    }
    if facts.is_empty() {
        bail!("{} has no facts/*.parquet: is it a sweep folder (<out>/<sweep-id>)?", at.display);
    }
    let mut rows = Vec::new();
    for (name, _) in at.list("traces").await? {
        if name.ends_with(".parquet") {
            rows.extend(read_traces(&at.read_child(&name).await?).with_context(|| name.clone())?);
        }
    }
    let manifest: Option<serde_json::Value> = match at.read_child("manifest.json").await {
        Ok(bytes) => serde_json::from_slice(&bytes).ok(),
        Err(_) => None,
    };
    let n_layers = manifest.as_ref().and_then(|m| m["n_layers"].as_u64()).map_or_else(
        || rows.iter().map(|r| r.layer as usize + 1).max().unwrap_or(0),
        |n| n as usize,
    );
    let model =
        manifest.as_ref().and_then(|m| m["model"].as_str()).map_or("the model".to_string(), |m| {
            let last = m.trim_end_matches('/').rsplit('/').next().unwrap_or(m);
            last.strip_suffix(".gguf").unwrap_or(last).to_string()
        });
    let window =
        manifest.as_ref().and_then(|m| m["settings"]["window"].as_u64()).map_or(10, |w| w as u32);
    let t_len: HashMap<u64, usize> = facts.iter().map(|f| (f.known_id, f.n_tokens)).collect();
    let mut tables: BTreeMap<Kind, HashMap<u64, Vec<Vec<f64>>>> = BTreeMap::new();
    for r in rows {
        let Some(&t) = t_len.get(&r.known_id) else { continue };
        if r.token as usize >= t || r.layer as usize >= n_layers {
            bail!("traces row {r:?} lies outside its fact's {t} tokens × {n_layers} layers");
        }
        let table = tables
            .entry(r.kind)
            .or_default()
            .entry(r.known_id)
            .or_insert_with(|| vec![vec![f64::NAN; n_layers]; t]);
        table[r.token as usize][r.layer as usize] = f64::from(r.score);
    }
    Ok(SweepTables { facts, tables, n_layers, model, window })
}

/// ROME's rollup of each kind over the correctly predicted, fully traced facts.
pub fn rollups(sweep: &SweepTables) -> BTreeMap<Kind, Rollup> {
    let mut out = BTreeMap::new();
    for (&kind, tables) in &sweep.tables {
        let facts: Vec<FactTable<'_>> = sweep
            .facts
            .iter()
            // ROME: "Only consider cases where the model begins with the correct prediction".
            .filter(|f| f.traced && f.correct != Some(false))
            .filter_map(|f| {
                let scores = tables.get(&f.known_id)?;
                // A fact with a job given up has holes: leave it out rather than bias a cell.
                if scores.iter().flatten().any(|v| v.is_nan()) {
                    return None;
                }
                Some(FactTable {
                    subject: f.subject,
                    high_score: f64::from(f.high_score),
                    low_score: f64::from(f.low_score),
                    scores,
                })
            })
            .collect();
        if let Some(r) = rollup(&facts, sweep.n_layers) {
            out.insert(kind, r);
        }
    }
    out
}

/// Runs `coordinator aggregate`.
pub async fn aggregate(args: &AggregateArgs, stdout: &mut dyn Write) -> anyhow::Result<()> {
    let at = Location::open(&args.results, false)
        .with_context(|| format!("--results {}", args.results))?;
    let sweep = read_sweep(&at).await?;
    let rollups = rollups(&sweep);
    if rollups.is_empty() {
        bail!("{}: no correctly predicted, traced fact to average", args.results);
    }
    let out = args.out.clone().unwrap_or_else(|| {
        let local = Path::new(&args.results);
        if local.is_dir() { local.join("summary") } else { PathBuf::from("summary") }
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let written = write_outputs(&sweep, &rollups, &out)?;
    print_summary(&sweep, &rollups, stdout)?;
    writeln!(stdout, "\nwrote {}", out.display())?;
    for file in written {
        writeln!(
            stdout,
            "  {}",
            file.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        )?;
    }
    Ok(())
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

fn write_outputs(
    sweep: &SweepTables,
    rollups: &BTreeMap<Kind, Rollup>,
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let rows = summary_rows(rollups);
    let parquet = out.join("summary.parquet");
    std::fs::write(&parquet, write_parquet(&summary_batch(&rows)?, "summary")?)?;
    written.push(parquet);
    let mut csv = String::from("kind,category,layer,aie,mean,std,n\n");
    for r in &rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            r.kind, r.category, r.layer, r.aie, r.mean, r.std, r.n
        ));
    }
    let path = out.join("summary.csv");
    std::fs::write(&path, csv)?;
    written.push(path);

    let mut headline_csv = String::from(
        "kind,facts,high_score,low_score,ate,best_aie_last_subject,best_layer_last_subject,best_aie_last_token,best_layer_last_token\n",
    );
    let mut headline_json = serde_json::Map::new();
    for (kind, r) in rollups {
        let h = &r.headline;
        headline_csv.push_str(&format!(
            "{kind},{},{},{},{},{},{},{},{}\n",
            h.facts,
            h.high_score,
            h.low_score,
            h.ate,
            h.best_last_subject.0,
            h.best_last_subject.1,
            h.best_last_token.0,
            h.best_last_token.1
        ));
        headline_json.insert(
            kind.name().into(),
            serde_json::json!({
                "facts": h.facts, "high_score": h.high_score, "low_score": h.low_score, "ate": h.ate,
                "best_aie_last_subject": h.best_last_subject.0, "best_layer_last_subject": h.best_last_subject.1,
                "best_aie_last_token": h.best_last_token.0, "best_layer_last_token": h.best_last_token.1,
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

    // Heatmaps: AIE clipped at 0, every kind on the hidden map's scale (as the notebook).
    let clipped = |r: &Rollup| -> Vec<Vec<f64>> {
        (0..CATEGORIES.len())
            .map(|c| {
                (0..r.n_layers)
                    .map(|l| r.cell(c, l).aie.max(0.0))
                    .map(|v| if v.is_nan() { 0.0 } else { v })
                    .collect()
            })
            .collect()
    };
    let vmax = rollups
        .get(&Kind::Hidden)
        .or_else(|| rollups.values().next())
        .map(|r| clipped(r).into_iter().flatten().fold(0f64, f64::max))
        .unwrap_or(1.0);
    for (&kind, r) in rollups {
        let (what, palette, x_label) = match kind {
            Kind::Hidden => (
                "h_i^(l)",
                Palette::Purples,
                format!("single patched layer within {}", sweep.model),
            ),
            Kind::Mlp => (
                "MLP",
                Palette::Greens,
                format!("center of interval of {} patched mlp layers", sweep.window),
            ),
            Kind::Attn => (
                "Attn",
                Palette::Reds,
                format!("center of interval of {} patched attn layers", sweep.window),
            ),
        };
        let map = Heatmap {
            title: format!("Avg Indirect Effect of {what} over {} prompts", r.headline.facts),
            row_labels: CATEGORY_LABELS.iter().map(ToString::to_string).collect(),
            x_label,
            x_tick_every: 5,
            values: clipped(r),
            vmin: 0.0,
            vmax: if kind == Kind::Hidden {
                vmax
            } else {
                vmax.max(clipped(r).into_iter().flatten().fold(0f64, f64::max))
            },
            palette,
            bar_label: "AIE".into(),
        };
        written.extend(map.write(&out.join(format!("rollup_{kind}")))?);
    }
    let panels: Vec<Panel> = rollups
        .iter()
        .map(|(&kind, r)| Panel {
            title: match kind {
                Kind::Hidden => "single hidden vector".into(),
                Kind::Mlp => format!("run of {} MLP lookups", sweep.window),
                Kind::Attn => format!("run of {} Attn modules", sweep.window),
            },
            x_label: format!("layer within {}", sweep.model),
            lines: (0..CATEGORIES.len())
                .map(|c| Line {
                    label: CATEGORY_LABELS[c].into(),
                    color: CATEGORY_COLORS[c],
                    values: (0..r.n_layers).map(|l| r.cell(c, l).aie).collect(),
                    // 95% band: 1.96 sd / sqrt(n) (DESIGN.md §1), n the rows averaged.
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
    written.extend(write_panels(&panels, "Average indirect effect on p(o)", &out.join("lines"))?);
    Ok(written)
}

fn print_summary(
    sweep: &SweepTables,
    rollups: &BTreeMap<Kind, Rollup>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let traced = sweep.facts.iter().filter(|f| f.traced && f.correct != Some(false)).count();
    writeln!(
        out,
        "{} facts, {traced} correctly predicted and traced; {} layers",
        sweep.facts.len(),
        sweep.n_layers
    )?;
    // Every layer when they fit in a line, else every other one.
    let step = if sweep.n_layers <= 32 { 1 } else { 2 };
    for (kind, r) in rollups {
        let h = &r.headline;
        writeln!(
            out,
            "\n{kind}: {} facts, ATE {:.4} (high {:.4}, low {:.4}); best AIE at the last subject token {:.4} (layer {}), at the last token {:.4} (layer {})",
            h.facts,
            h.ate,
            h.high_score,
            h.low_score,
            h.best_last_subject.0,
            h.best_last_subject.1,
            h.best_last_token.0,
            h.best_last_token.1
        )?;
        let header: String = (0..r.n_layers).step_by(step).map(|l| format!("{l:>4}")).collect();
        writeln!(out, "{:>24}{header}   (AIE × 100 by layer)", "")?;
        for (c, label) in CATEGORY_LABELS.iter().enumerate() {
            let cells: String = (0..r.n_layers)
                .step_by(step)
                .map(|l| {
                    let v = r.cell(c, l).aie;
                    if v.is_finite() { format!("{:>4.0}", v * 100.0) } else { "   -".into() }
                })
                .collect();
            writeln!(out, "{label:>24}{cells}")?;
        }
    }
    Ok(())
}
