//! The line plot of Figure 2's companion (ROME's notebook, second figure): per kind, one
//! panel; per token category, the average indirect effect over layers with a 95% band.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::Result;
use crate::plot::{Figure, write_figure};

/// One line: a label, its colour, and per layer the value and the band's half-width.
#[derive(Debug, Clone)]
pub struct Line {
    /// In the legend.
    pub label: String,
    /// Its colour.
    pub color: RGBColor,
    /// Per layer.
    pub values: Vec<f64>,
    /// Per layer: the band is `values ± half_width` (NaN: no band).
    pub half_width: Vec<f64>,
}

/// One panel: a title, an x label, its lines.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Above the panel.
    pub title: String,
    /// Below its x axis.
    pub x_label: String,
    /// The lines.
    pub lines: Vec<Line>,
}

/// matplotlib's tab10 in ROME's order for the six categories (`color_order = [0, 1, 2, 4,
/// 5, 3]`).
pub const CATEGORY_COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xd6, 0x27, 0x28),
];

/// Writes `<stem>.png` and `<stem>.svg` with the panels side by side and a shared y axis
/// labelled `y_label`; returns their paths.
pub fn write_panels(panels: &[Panel], y_label: &str, stem: &Path) -> Result<Vec<PathBuf>> {
    write_figure(&Panels { panels, y_label }, stem)
}

/// Panels side by side with a shared y axis.
struct Panels<'a> {
    panels: &'a [Panel],
    y_label: &'a str,
}

impl Figure for Panels<'_> {
    fn size(&self) -> (u32, u32) {
        (480 * self.panels.len().max(1) as u32, 420)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        draw(root, self.panels, self.y_label)
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[Panel],
    y_label: &str,
) -> std::result::Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    if panels.is_empty() {
        return Err("nothing to plot".into());
    }
    // One y range for all panels (sharey), from the bands.
    let finite = |v: f64| v.is_finite().then_some(v);
    let (mut lo, mut hi) = (0f64, 0f64);
    for line in panels.iter().flat_map(|p| &p.lines) {
        for (v, w) in line.values.iter().zip(&line.half_width) {
            let w = finite(*w).unwrap_or(0.0);
            if let Some(v) = finite(*v) {
                lo = lo.min(v - w);
                hi = hi.max(v + w);
            }
        }
    }
    let pad = (hi - lo).max(1e-3) * 0.05;
    let (lo, hi) = (lo - pad, hi + pad);
    let areas = root.split_evenly((1, panels.len()));
    for (i, (area, panel)) in areas.iter().zip(panels).enumerate() {
        let layers = panel.lines.iter().map(|l| l.values.len()).max().unwrap_or(1).max(2);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(45)
            .y_label_area_size(if i == 0 { 70 } else { 45 })
            .build_cartesian_2d(0f64..(layers - 1) as f64, lo..hi)
            .map_err(e)?;
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(WHITE)
            .x_desc(&panel.x_label)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.2}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15));
        if i == 0 {
            mesh.y_desc(y_label);
        }
        mesh.draw().map_err(e)?;
        // Bands first, lines over them: a translucent band must not hide another line.
        for line in &panel.lines {
            let upper = line
                .values
                .iter()
                .zip(&line.half_width)
                .enumerate()
                .filter_map(|(l, (v, w))| Some((l as f64, finite(*v)? + finite(*w)?)));
            let lower: Vec<(f64, f64)> = line
                .values
                .iter()
                .zip(&line.half_width)
                .enumerate()
                .filter_map(|(l, (v, w))| Some((l as f64, finite(*v)? - finite(*w)?)))
                .collect();
            let band: Vec<(f64, f64)> = upper.chain(lower.into_iter().rev()).collect();
            if band.len() > 2 {
                chart
                    .draw_series(std::iter::once(Polygon::new(band, line.color.mix(0.15).filled())))
                    .map_err(e)?;
            }
        }
        for line in &panel.lines {
            let points: Vec<(f64, f64)> = line
                .values
                .iter()
                .enumerate()
                .filter_map(|(l, &v)| finite(v).map(|v| (l as f64, v)))
                .collect();
            let series = chart
                .draw_series(LineSeries::new(points, line.color.stroke_width(2)))
                .map_err(e)?;
            if i == 0 {
                let color = line.color;
                series.label(&line.label).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            }
        }
        if i == 0 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(e)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_panels_with_bands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let line = |k: usize| Line {
            label: format!("category {k}"),
            color: CATEGORY_COLORS[k],
            values: (0..12).map(|l| (l as f64 * 0.3 + k as f64).sin() * 0.1).collect(),
            half_width: vec![0.01; 12],
        };
        let panels: Vec<Panel> = ["single hidden vector", "run of 10 MLP lookups"]
            .iter()
            .map(|t| Panel {
                title: t.to_string(),
                x_label: "layer".into(),
                lines: (0..6).map(line).collect(),
            })
            .collect();
        let files = write_panels(&panels, "Average indirect effect", &dir.path().join("lines"))
            .expect("plot");
        let svg = std::fs::read_to_string(&files[1]).expect("svg");
        assert!(svg.contains("run of 10 MLP lookups") && svg.contains("category 5"));
        assert!(std::fs::metadata(&files[0]).expect("png").len() > 5000);
    }
}
