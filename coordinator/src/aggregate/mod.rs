//! `coordinator aggregate`: a finished (or running) sweep's tables → the paper's averaged
//! figures, each drawn when the sweep has its kinds: Figure 2 for every token × layer kind
//! ([`figure2`]), Figure 3 when it has `hidden` and a severed kind ([`figure3`]), and the
//! layer × head maps for `head` ([`heads`]). docs/science.md defines every number.

pub mod figure2;
pub mod figure3;
pub mod heads;
pub mod read;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use common::storage::Location;

pub use read::{FactFilter, read_sweep};

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
    /// Which traced facts to average: correct (the model predicts the attribute, as the
    /// paper's Figure 2) or all (as ROME's Figure 3 notebook, which averages every fact of
    /// known_1000 with the model's own answer: sweep with --correctness none).
    #[arg(long, value_enum, default_value = "correct")]
    pub facts: FactFilter,
}

/// Runs `coordinator aggregate`.
pub async fn aggregate(args: &AggregateArgs, stdout: &mut dyn Write) -> anyhow::Result<()> {
    let at = Location::open(&args.results, false)
        .with_context(|| format!("--results {}", args.results))?;
    let sweep = read_sweep(&at).await?;
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
        if local.is_dir() { local.join("summary") } else { PathBuf::from("summary") }
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
    if !rollups.is_empty() {
        written.extend(figure2::write(&sweep, &rollups, &out)?);
        figure2::print(&sweep, &rollups, stdout)?;
    }
    if let Some(fig) = &fig3 {
        written.extend(figure3::write(&sweep, fig, &out)?);
        figure3::print(fig, stdout)?;
    }
    if let Some(r) = &heads {
        written.extend(heads::write(&sweep, r, &out)?);
        heads::print(&sweep, r, stdout)?;
    }
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
