//! Per-fact heatmaps in the style of ROME's `plot_trace_heatmap`: tokens down the side with
//! subject tokens starred, layers across, Purples / Greens / Reds for hidden / mlp / attn, the
//! colour scale from low_score to the best score, and a colour bar labelled p(answer).

use std::path::{Path, PathBuf};

use common::plot::{Heatmap, Palette};

use crate::error::{Error, Result};
use crate::trace::{FactTrace, Kind};

/// The figure of one kind of a trace.
pub fn heatmap(trace: &FactTrace, kind: Kind, window: usize, model_name: &str) -> Option<Heatmap> {
    let table = trace.scores.get(&kind)?;
    let (b, e) = trace.subject_range;
    let row_labels = trace
        .tokens
        .iter()
        .enumerate()
        .map(|(t, tok)| if (b..e).contains(&t) { format!("{tok}*") } else { tok.clone() })
        .collect();
    let values: Vec<Vec<f64>> =
        table.iter().map(|row| row.iter().map(|&s| f64::from(s)).collect()).collect();
    let vmax = values.iter().flatten().copied().fold(f64::NEG_INFINITY, f64::max);
    let (title, x_label, palette) = match kind {
        Kind::Hidden => (
            "Impact of restoring state after corrupted input".to_string(),
            format!("single restored layer within {model_name}"),
            Palette::Purples,
        ),
        Kind::Mlp => (
            "Impact of restoring MLP after corrupted input".to_string(),
            format!("center of interval of {window} restored MLP layers"),
            Palette::Greens,
        ),
        Kind::Attn => (
            "Impact of restoring Attn after corrupted input".to_string(),
            format!("center of interval of {window} restored Attn layers"),
            Palette::Reds,
        ),
    };
    Some(Heatmap {
        title,
        row_labels,
        x_label,
        x_tick_every: 5,
        values,
        vmin: f64::from(trace.low_score),
        vmax,
        palette,
        bar_label: format!("p({})", trace.answer.trim()),
    })
}

/// Writes `trace_<kind>.png` and `.svg` for every traced kind into `dir`.
pub fn write_heatmaps(
    trace: &FactTrace,
    window: usize,
    model_name: &str,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    let mut written = Vec::new();
    for &kind in trace.scores.keys() {
        if let Some(map) = heatmap(trace, kind, window, model_name) {
            let files = map
                .write(&dir.join(format!("trace_{kind}")))
                .map_err(|e| Error::Trace(e.to_string()))?;
            written.extend(files);
        }
    }
    Ok(written)
}
