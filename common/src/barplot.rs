//! Grouped bars in the style of the paper's Figure 3 (ROME's notebook
//! `causal_trace_frozen_mlp_attn.ipynb`): per layer, one bar per series side by side, the y
//! axis in percent (or plain numbers, for a metric whose effects are not fractions), a
//! legend without a frame.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::Result;
use crate::plot::{Figure, write_figure};

/// One series of bars: a label, its colour, and a value per layer (NaN: no bar).
#[derive(Debug, Clone)]
pub struct Bars {
    /// In the legend.
    pub label: String,
    /// Its colour.
    pub color: RGBColor,
    /// Per layer.
    pub values: Vec<f64>,
}

/// A grouped bar chart.
#[derive(Debug, Clone)]
pub struct BarChart {
    /// Above the chart.
    pub title: String,
    /// Below the x axis.
    pub x_label: String,
    /// Beside the y axis.
    pub y_label: String,
    /// Whether the y ticks are percent (values that are fractions: p(o), recovery), else
    /// plain numbers (log p(o), logit difference, KL).
    pub percent: bool,
    /// The series, drawn left to right within each group.
    pub series: Vec<Bars>,
}

/// The notebook's colours: the ordinary run, attention severed, MLP severed.
pub const FIGURE3_COLORS: [RGBColor; 3] =
    [RGBColor(0x72, 0x61, 0xab), RGBColor(0xf3, 0x20, 0x1b), RGBColor(0x20, 0xb0, 0x20)];

impl BarChart {
    /// Writes `<stem>.png` and `<stem>.svg`; returns their paths.
    pub fn write(&self, stem: &Path) -> Result<Vec<PathBuf>> {
        write_figure(self, stem)
    }
}

impl Figure for BarChart {
    fn size(&self) -> (u32, u32) {
        let groups = self.series.iter().map(|s| s.values.len()).max().unwrap_or(0);
        ((18 * groups as u32).max(480) + 160, 420)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let groups = self.series.iter().map(|s| s.values.len()).max().unwrap_or(0);
        if groups == 0 || self.series.is_empty() {
            return Err("nothing to plot".into());
        }
        let finite = self.series.iter().flat_map(|s| &s.values).copied().filter(|v| v.is_finite());
        let (lo, hi) = finite.fold((0f64, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        // The notebook's ylim: at least 2.5% at the top.
        let hi = hi.max(0.025) * 1.05;
        let lo = if lo < 0.0 { lo * 1.05 } else { 0.0 };
        // Ticks every 0.5% need a decimal; every 1% or more do not.
        let decimals = if hi - lo < 0.06 { 1 } else { 0 };
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.6f64..(groups as f64 - 0.4), lo..hi)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_labels(groups.min(25))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| {
                if self.percent {
                    format!("{:.*}%", decimals, v * 100.0)
                } else {
                    format!("{v:.2}")
                }
            })
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .draw()
            .map_err(e)?;
        // The notebook's layout: three series at offsets -0.3, 0, +0.3, each 0.3 wide.
        let n = self.series.len() as f64;
        let width = 0.9 / n;
        for (k, series) in self.series.iter().enumerate() {
            let offset = (k as f64 - (n - 1.0) / 2.0) * width;
            let color = series.color;
            let bars = series.values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(
                move |(l, &v)| {
                    let x = l as f64 + offset;
                    Rectangle::new([(x - width / 2.0, 0.0), (x + width / 2.0, v)], color.filled())
                },
            );
            chart.draw_series(bars).map_err(e)?.label(&series.label).legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
            });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.0))
            .border_style(WHITE.mix(0.0))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(e)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_grouped_bars() {
        let dir = tempfile::tempdir().expect("tempdir");
        let series =
            ["Effect of single state on P", "Effect with Attn severed", "Effect with MLP severed"]
                .iter()
                .zip(FIGURE3_COLORS)
                .enumerate()
                .map(|(k, (label, color))| Bars {
                    label: label.to_string(),
                    color,
                    values: (0..12).map(|l| (l as f64 * 0.4 + k as f64).sin() * 0.08).collect(),
                })
                .collect();
        let chart = BarChart {
            title: "Causal effect of states at the early site with Attn or MLP modules severed"
                .into(),
            x_label: "Layer at which the single hidden state is restored".into(),
            y_label: "Average Indirect Effect".into(),
            percent: true,
            series,
        };
        let files = chart.write(&dir.path().join("figure3")).expect("plot");
        let svg = std::fs::read_to_string(&files[1]).expect("svg");
        assert!(svg.contains("Effect with MLP severed") && svg.contains("%"));
        assert!(std::fs::metadata(&files[0]).expect("png").len() > 5000);
    }
}
