//! Per-fact heatmaps in the style of ROME's `plot_trace_heatmap`: the traced tokens down the
//! side with subject tokens starred, layers across, the kind's colour map
//! (`common::kinds::Style`), the colour scale from low_score to the best score, and a colour
//! bar labelled p(answer). A kind with a head axis gets one map per traced token, heads
//! down the side.

use std::path::{Path, PathBuf};

use common::kinds::{Kind, fill};
use common::plot::Heatmap;

use crate::error::{Error, Result};
use crate::trace::FactTrace;

/// The figures of one kind of a trace, with the file stem of each.
pub fn heatmaps(
    trace: &FactTrace,
    kind: Kind,
    window: usize,
    model_name: &str,
) -> Vec<(String, Heatmap)> {
    let Some(table) = trace.scores.get(&kind) else { return Vec::new() };
    let (b, e) = trace.subject_range;
    let style = kind.style();
    let label = |t: usize| {
        let tok = &trace.tokens[t];
        if (b..e).contains(&t) { format!("{tok}*") } else { tok.clone() }
    };
    let (low, answer) = (f64::from(trace.low_score), format!("p({})", trace.answer.trim()));
    let map = |title: String, row_labels, x_label, values| {
        Heatmap::fact_trace(kind, title, row_labels, values, low, answer.clone(), x_label)
    };
    let title = format!("Impact of restoring {} after corrupted input", style.what);
    let x_label = fill(style.x_label, window, model_name);
    if kind.has_heads() {
        return trace
            .traced_tokens
            .iter()
            .map(|&t| {
                let row = table.row(t);
                let values = (0..table.n_heads)
                    .map(|h| {
                        (0..table.n_layers).map(|l| f64::from(row[l * table.n_heads + h])).collect()
                    })
                    .collect();
                let heads = (0..table.n_heads).map(|h| format!("head {h}")).collect();
                let title = format!("{title}, token {t} ({})", label(t));
                (format!("trace_{kind}_t{t}"), map(title, heads, x_label.clone(), values))
            })
            .collect();
    }
    let values = trace
        .traced_tokens
        .iter()
        .map(|&t| table.row(t).iter().map(|&s| f64::from(s)).collect())
        .collect();
    let rows = trace.traced_tokens.iter().map(|&t| label(t)).collect();
    vec![(format!("trace_{kind}"), map(title, rows, x_label, values))]
}

/// Writes `trace_<kind>.png` and `.svg` (per token for kinds with a head axis) for every
/// traced kind into `dir`.
pub fn write_heatmaps(
    trace: &FactTrace,
    window: usize,
    model_name: &str,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    let mut written = Vec::new();
    for &kind in trace.scores.keys() {
        for (stem, map) in heatmaps(trace, kind, window, model_name) {
            let files = map.write(&dir.join(stem)).map_err(|e| Error::Trace(e.to_string()))?;
            written.extend(files);
        }
    }
    Ok(written)
}
