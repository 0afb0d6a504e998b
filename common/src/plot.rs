//! Heatmaps in the style of ROME's figures (matplotlib `pcolor` with a sequential colour map
//! and a colour bar), drawn with plotters as PNG and SVG. Shared by the worker's per-fact
//! traces and the coordinator's averaged Figure 2.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};

/// matplotlib's sequential maps that ROME uses per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Palette {
    /// Hidden states.
    Purples,
    /// MLP.
    Greens,
    /// Attention.
    Reds,
    /// Attention heads.
    Oranges,
    /// Anything else.
    Blues,
}

impl Palette {
    fn gradient(self) -> colorous::Gradient {
        match self {
            Palette::Purples => colorous::PURPLES,
            Palette::Greens => colorous::GREENS,
            Palette::Reds => colorous::REDS,
            Palette::Oranges => colorous::ORANGES,
            Palette::Blues => colorous::BLUES,
        }
    }

    /// The colour of `value` on a `[vmin, vmax]` scale, clipped at both ends.
    pub fn color(self, value: f64, vmin: f64, vmax: f64) -> RGBColor {
        let span = vmax - vmin;
        let t = if span > 0.0 { ((value - vmin) / span).clamp(0.0, 1.0) } else { 0.0 };
        let c = self.gradient().eval_continuous(t);
        RGBColor(c.r, c.g, c.b)
    }
}

/// A heatmap: rows top to bottom, columns left to right.
#[derive(Debug, Clone)]
pub struct Heatmap {
    /// Above the plot.
    pub title: String,
    /// One per row, top first.
    pub row_labels: Vec<String>,
    /// Below the x axis.
    pub x_label: String,
    /// Label every this many columns (0, k, 2k, …).
    pub x_tick_every: usize,
    /// `values[row][col]`.
    pub values: Vec<Vec<f64>>,
    /// The value drawn lightest.
    pub vmin: f64,
    /// The value drawn darkest.
    pub vmax: f64,
    /// The colour map.
    pub palette: Palette,
    /// Under the colour bar, e.g. "p(Berlin)".
    pub bar_label: String,
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Plot { path: path.display().to_string(), message: e.to_string() }
}

/// A figure drawn the same way on any plotters backend: written as PNG and SVG.
pub(crate) trait Figure {
    /// Width and height in pixels.
    fn size(&self) -> (u32, u32);
    /// Draws the figure onto `root`.
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String>;
}

/// Writes `<stem>.png` and `<stem>.svg` of `figure`; returns their paths.
pub(crate) fn write_figure(figure: &impl Figure, stem: &Path) -> Result<Vec<PathBuf>> {
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let size = figure.size();
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        figure.draw(&root).map_err(|e| plot_err(&png, e))?;
        root.present().map_err(|e| plot_err(&png, e))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        figure.draw(&root).map_err(|e| plot_err(&svg, e))?;
        root.present().map_err(|e| plot_err(&svg, e))?;
    }
    Ok(vec![png, svg])
}

/// `figure` as an SVG document in a string (to inline in HTML); `what` names it in errors.
pub(crate) fn svg_string(figure: &impl Figure, what: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, figure.size()).into_drawing_area();
        let path = Path::new(what);
        figure.draw(&root).map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    Ok(svg)
}

impl Heatmap {
    /// One fact's trace of `kind` as ROME's `plot_trace_heatmap` draws it: `rows` (labelled
    /// `row_labels`) down the side, layers across (`x_label`: the kind's, filled with
    /// [`crate::kinds::fill`]), the kind's colour map, the colour scale from `low` (the
    /// corrupted run's value) to the best value, and `bar_label` (e.g. "p(Berlin)").
    pub fn fact_trace(
        kind: crate::kinds::Kind,
        title: String,
        row_labels: Vec<String>,
        rows: Vec<Vec<f64>>,
        low: f64,
        bar_label: String,
        x_label: String,
    ) -> Self {
        let vmax = rows.iter().flatten().copied().fold(f64::NEG_INFINITY, f64::max);
        Heatmap {
            title,
            row_labels,
            x_label,
            x_tick_every: 5,
            values: rows,
            vmin: low,
            vmax,
            palette: kind.style().palette,
            bar_label,
        }
    }

    /// Writes `<stem>.png` and `<stem>.svg`; returns their paths.
    pub fn write(&self, stem: &Path) -> Result<Vec<PathBuf>> {
        write_figure(self, stem)
    }

    /// The heatmap as an SVG document, the same drawing as [`Heatmap::write`]'s `.svg`.
    pub fn svg(&self) -> Result<String> {
        svg_string(self, &self.title)
    }
}

impl Figure for Heatmap {
    fn size(&self) -> (u32, u32) {
        let rows = self.row_labels.len() as u32;
        (960, 130 + 26 * rows.max(4))
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let rows = self.row_labels.len();
        let cols = self.values.first().map_or(0, Vec::len);
        if rows == 0 || cols == 0 {
            return Err("nothing to plot".into());
        }
        let (width, _) = root.dim_in_pixel();
        let (main, bar) = root.split_horizontally(width - 130);
        let longest = self.row_labels.iter().map(|l| l.chars().count()).max().unwrap_or(1) as u32;
        // Cells are unit squares; ticks sit at their centres. Row 0 is drawn at the top.
        let x_ticks: Vec<f64> =
            (0..cols).step_by(self.x_tick_every.max(1)).map(|c| c as f64 + 0.5).collect();
        let y_ticks: Vec<f64> = (0..rows).map(|r| r as f64 + 0.5).collect();
        let mut chart = ChartBuilder::on(&main)
            .caption(&self.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(52)
            .y_label_area_size(20 + 9 * longest.min(40))
            .build_cartesian_2d(
                Cells { n: cols, ticks: x_ticks },
                Cells { n: rows, ticks: y_ticks },
            )
            .map_err(e)?;
        let labels = &self.row_labels;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_label_formatter(&|x| format!("{}", x.floor()))
            .y_label_formatter(&|y| {
                let r = rows - 1 - (y.floor() as usize).min(rows - 1);
                labels[r].clone()
            })
            .x_desc(&self.x_label)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(e)?;
        let cells = self.values.iter().enumerate().flat_map(|(r, row)| {
            let y = (rows - 1 - r) as f64;
            row.iter().enumerate().map(move |(c, &v)| {
                let color = self.palette.color(v, self.vmin, self.vmax);
                Rectangle::new([(c as f64, y), (c as f64 + 1.0, y + 1.0)], color.filled())
            })
        });
        chart.draw_series(cells).map_err(e)?;

        // The colour bar: the value scale from vmin to vmax.
        let (lo, hi) = if self.vmax > self.vmin {
            (self.vmin, self.vmax)
        } else {
            (self.vmin, self.vmin + 1e-6)
        };
        // Enough decimals to tell about five ticks apart (a head's AIE is a few 1e-3).
        let decimals = (-((hi - lo) / 5.0).log10()).ceil().clamp(2.0, 6.0) as usize;
        let mut legend = ChartBuilder::on(&bar)
            .margin_top(48)
            .margin_bottom(12)
            .margin_right(12)
            .x_label_area_size(52)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..1f64, lo..hi)
            .map_err(e)?;
        legend
            .configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(6)
            .y_label_formatter(&|v| format!("{:.*}", decimals, v))
            .x_desc(&self.bar_label)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(e)?;
        let steps = 100;
        let strips = (0..steps).map(|i| {
            let a = lo + (hi - lo) * i as f64 / steps as f64;
            let b = lo + (hi - lo) * (i + 1) as f64 / steps as f64;
            Rectangle::new([(0.0, a), (1.0, b)], self.palette.color((a + b) / 2.0, lo, hi).filled())
        });
        legend.draw_series(strips).map_err(e)?;
        Ok(())
    }
}

/// A coordinate of `n` unit cells over `0..n` whose ticks are the given cell centres
/// (plotters' own ranges put ticks at "nice" numbers, i.e. on cell edges).
struct Cells {
    n: usize,
    ticks: Vec<f64>,
}

impl plotters::coord::ranged1d::Ranged for Cells {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let frac = value / self.n.max(1) as f64;
        limit.0 + (frac * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: plotters::coord::ranged1d::KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        self.ticks.clone()
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..self.n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_clip_and_darken() {
        let p = Palette::Purples;
        assert_eq!(p.color(-1.0, 0.0, 1.0), p.color(0.0, 0.0, 1.0));
        assert_eq!(p.color(2.0, 0.0, 1.0), p.color(1.0, 0.0, 1.0));
        let light = p.color(0.0, 0.0, 1.0);
        let dark = p.color(1.0, 0.0, 1.0);
        assert!(u32::from(dark.0) + u32::from(dark.1) < u32::from(light.0) + u32::from(light.1));
    }

    #[test]
    fn writes_png_and_svg() {
        let dir = std::env::temp_dir().join(format!("ct-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let map = Heatmap {
            title: "Impact of restoring state after corrupted input".into(),
            row_labels: vec!["Be*".into(), "ats*".into(), " is".into()],
            x_label: "single restored layer".into(),
            x_tick_every: 5,
            values: vec![vec![0.1, 0.5, 0.9], vec![0.2, 0.3, 0.4], vec![0.0, 0.0, 1.0]],
            vmin: 0.1,
            vmax: 1.0,
            palette: Palette::Greens,
            bar_label: "p(Apple)".into(),
        };
        let files = map.write(&dir.join("trace_hidden")).expect("plot");
        for f in &files {
            assert!(std::fs::metadata(f).expect("written").len() > 1000, "{}", f.display());
        }
        let svg = std::fs::read_to_string(&files[1]).expect("svg");
        assert!(svg.contains("p(Apple)") && svg.contains("ats*"));
        // The string the report inlines is the file's drawing.
        assert_eq!(map.svg().expect("svg string"), svg);
        std::fs::remove_dir_all(&dir).ok();
    }
}
