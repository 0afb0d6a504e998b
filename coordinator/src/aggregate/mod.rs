//! `coordinator aggregate`: a finished (or running) sweep's tables → the paper's averaged
//! figures, each drawn when the sweep has its kinds: Figure 2 for every token × layer kind
//! ([`figure2`]), Figure 3 when it has `hidden` and a severed kind ([`figure3`]), and the
//! layer × head maps for `head` ([`heads`]). docs/science.md defines every number. Each
//! averages one metric on one scale ([`measure`]). All of it, with the per-relation table and
//! the extreme facts, goes into one page to open first, `report.html` ([`report`]).

pub mod figure2;
pub mod figure3;
pub mod heads;
pub mod measure;
#[cfg(test)]
mod measure_tests;
pub mod read;
pub mod report;
pub mod report_facts;
#[cfg(test)]
mod report_tests;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use common::metric::Metric;
use common::storage::Location;

pub use measure::{Measure, Recovery, Scale};
pub use read::{FactFilter, read_sweep};

/// `coordinator aggregate`.
#[derive(Debug, Args)]
pub struct AggregateArgs {
    /// The sweep's folder (`<out>/<sweep-id>`): a path or an object-store URL.
    #[arg(long)]
    pub results: String,
    /// Where the summary and figures go. Default: `summary/` inside a local results folder,
    /// else `./summary`; for any measure but `--metric prob --scale raw`, the folder
    /// `<metric>-<scale>` inside it (`logit_diff-raw`, `kl-recovery-ratio-of-means`,
    /// `prob-recovery-per-fact`), so that no measure overwrites another's files.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Which traced facts to average: correct (the model predicts the attribute, as the
    /// paper's Figure 2) or all (as ROME's Figure 3 notebook, which averages every fact of
    /// known_1000 with the model's own answer: sweep with --correctness none).
    #[arg(long, value_enum, default_value = "correct")]
    pub facts: FactFilter,
    /// What is averaged: prob (p(o), ROME's), logprob (log p(o)), logit_diff (z(o) − z(foil))
    /// or kl (KL(p_clean ‖ p), 0 when clean and larger the more corrupted). A fact's clean
    /// and corrupted values are its clean_<metric> and corrupted_<metric> (high_score and
    /// low_score for prob), its cells the traces' <metric> column (score for prob). Every
    /// metric but prob needs a sweep of table schema 4.
    #[arg(long, value_enum, default_value = "prob")]
    pub metric: Metric,
    /// raw: the metric's values (AIE = mean − mean corrupted; ATE = mean clean − mean
    /// corrupted). recovery: (m − corrupted) / (clean − corrupted), 1 as clean and 0 as
    /// corrupted for every metric (KL's clean − corrupted is negative), taken as --recovery
    /// says.
    #[arg(long, value_enum, default_value = "raw")]
    pub scale: Scale,
    /// With --scale recovery [default: ratio-of-means]. ratio-of-means: the raw averages
    /// divided by the raw ATE over the same facts (each AIE becomes AIE / ATE, each mean
    /// (mean − mean corrupted) / ATE, each std std / |ATE|; the ATE 1). per-fact: each
    /// fact's values mapped first with its own clean and corrupted values, then averaged (a
    /// fact's clean value becomes 1, its corrupted 0).
    #[arg(long, value_enum)]
    pub recovery: Option<Recovery>,
    /// With --recovery per-fact [default: 0.01]: a fact's clean − corrupted is taken at
    /// least this far from 0, keeping its sign (exactly 0 counts as positive), so that a
    /// fact the corruption barely moved cannot dominate the average.
    #[arg(long)]
    pub recovery_floor: Option<f64>,
    /// Average only the facts that another sweep's folder (path or URL) averages too (its
    /// traced facts that --facts keeps): e.g. a noise sweep on the facts an STR sweep of the
    /// same dataset could trace (those with a donor), to compare the two on the same facts.
    #[arg(long, value_name = "SWEEP")]
    pub facts_of: Option<String>,
}

/// Runs `coordinator aggregate`.
pub async fn aggregate(args: &AggregateArgs, stdout: &mut dyn Write) -> anyhow::Result<()> {
    let at = Location::open(&args.results, false)
        .with_context(|| format!("--results {}", args.results))?;
    let measure = Measure::from_args(args)?;
    let mut sweep = read_sweep(&at, &measure).await?;
    let mut note = None;
    if let Some(other) = &args.facts_of {
        let other_at =
            Location::open(other, false).with_context(|| format!("--facts-of {other}"))?;
        let ids = read::kept_ids(&other_at, args.facts)
            .await
            .with_context(|| format!("--facts-of {other}"))?;
        sweep.facts.retain(|f| ids.contains(&f.known_id));
        let said = format!("Only the {} facts that {other} averages.", ids.len());
        writeln!(stdout, "{said}")?;
        note = Some(said);
    }
    let rollups = figure2::rollups(&sweep, args.facts);
    let fig3 = figure3::compute(&sweep, args.facts);
    let heads = heads::compute(&sweep, args.facts);
    if rollups.is_empty() && fig3.is_none() && heads.is_none() {
        let which = match args.facts {
            FactFilter::Correct => "correctly predicted, ",
            FactFilter::All => "",
        };
        bail!("{}: no {which}traced fact with every row to average", args.results);
    }
    let out = args.out.clone().unwrap_or_else(|| {
        let local = Path::new(&args.results);
        let summary = if local.is_dir() { local.join("summary") } else { PathBuf::from("summary") };
        match measure.folder() {
            Some(folder) => summary.join(folder),
            None => summary,
        }
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    writeln!(
        stdout,
        "{} facts, {} {} and traced; {} layers, {} heads",
        sweep.facts.len(),
        sweep.kept(args.facts),
        match args.facts {
            FactFilter::Correct => "correctly predicted",
            FactFilter::All => "(all)",
        },
        sweep.geometry.n_layers,
        sweep.geometry.n_heads
    )?;
    writeln!(stdout, "{}", measure.describe())?;
    let mut files: [Vec<PathBuf>; 3] = Default::default();
    if !rollups.is_empty() {
        files[0] = figure2::write(&sweep, &rollups, &out)?;
        figure2::print(&sweep, &rollups, stdout)?;
    }
    if let Some(fig) = &fig3 {
        files[1] = figure3::write(&sweep, fig, &out)?;
        figure3::print(&sweep, fig, stdout)?;
    }
    if let Some(r) = &heads {
        files[2] = heads::write(&sweep, r, &out)?;
        heads::print(&sweep, r, stdout)?;
    }
    written.extend(files.iter().flatten().cloned());
    let page = report::Report {
        sweep: &sweep,
        filter: args.facts,
        results: &args.results,
        rollups: &rollups,
        figure3: fig3.as_ref(),
        heads: heads.as_ref(),
        files: [&files[0], &files[1], &files[2]],
        note,
    };
    written.push(report::write(&page, &out)?);
    writeln!(stdout, "\nwrote {}", out.display())?;
    for file in written {
        let name = file.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        writeln!(stdout, "  {name}")?;
    }
    Ok(())
}

/// Writes a table twice, `<name>.parquet` (already encoded) and `<name>.csv`; returns both.
pub(crate) fn write_table(
    out: &Path,
    name: &str,
    parquet: bytes::Bytes,
    csv: String,
) -> anyhow::Result<Vec<PathBuf>> {
    let files = [out.join(format!("{name}.parquet")), out.join(format!("{name}.csv"))];
    std::fs::write(&files[0], parquet)?;
    std::fs::write(&files[1], csv)?;
    Ok(files.to_vec())
}
