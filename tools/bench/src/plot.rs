//! TTFT CDF plots as PNG: plotters' bitmap backend into a buffer, text with
//! ab_glyph from a TrueType font loaded at run time, encoded with `png`.

use crate::error::{BenchError, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::OnceLock;

/// Where Debian's fonts-dejavu-core puts its sans font.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Registers `path` as the plots' "sans-serif" font (once per process).
pub fn load_font(path: &Path) -> Result<()> {
    FONT.get_or_init(|| {
        let bytes = std::fs::read(path).map_err(|e| {
            format!(
                "font {}: {e} (install fonts-dejavu-core or pass --font)",
                path.display()
            )
        })?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("font {}: not a usable TrueType font", path.display()))
    })
    .clone()
    .map_err(BenchError::Plot)
}

/// One curve: its legend and colour, and the (x, y) points of an empirical CDF.
#[derive(Debug, Clone)]
pub struct Curve {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// The colour of a policy's curve.
pub fn policy_color(policy: &str) -> RGBColor {
    match policy {
        "vanilla" => RGBColor(214, 39, 40),
        "static" => RGBColor(31, 119, 180),
        "dynamic" => RGBColor(44, 160, 44),
        _ => RGBColor(127, 127, 127),
    }
}

fn perr(e: impl std::fmt::Display) -> BenchError {
    BenchError::Plot(e.to_string())
}

/// Draws CDFs on a log time axis with the SLO marked, and writes a PNG.
pub fn cdf_png(path: &Path, title: &str, curves: &[Curve], slo_ms: f64, font: &Path) -> Result<()> {
    load_font(font)?;
    let (w, h) = (1000u32, 640u32);
    let xs = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .chain([slo_ms]);
    let (lo, hi) = xs
        .filter(|x| x.is_finite() && *x > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(l, h), x| (l.min(x), h.max(x)));
    if !lo.is_finite() {
        return Err(BenchError::Plot("nothing to plot".into()));
    }
    let (xmin, xmax) = (lo / 1.25, hi * 1.25);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(18)
            .x_label_area_size(52)
            .y_label_area_size(64)
            .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..1.0)
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_labels(12)
            .y_labels(11)
            .light_line_style(RGBColor(238, 238, 238))
            .x_desc("TTFT (ms, log scale)")
            .y_desc("share of requests with TTFT ≤ x")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(perr)?;
        for c in curves {
            let mut steps = Vec::with_capacity(c.points.len() * 2 + 1);
            let mut prev = 0.0;
            steps.push((xmin, 0.0));
            for &(x, y) in &c.points {
                steps.push((x, prev));
                steps.push((x, y));
                prev = y;
            }
            steps.push((xmax, prev));
            let color = c.color;
            chart
                .draw_series(LineSeries::new(steps, color.stroke_width(2)))
                .map_err(perr)?
                .label(c.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
        }
        chart
            .draw_series(DashedLineSeries::new(
                vec![(slo_ms, 0.0), (slo_ms, 1.0)],
                8,
                5,
                BLACK.stroke_width(1),
            ))
            .map_err(perr)?
            .label(format!("SLO {slo_ms:.0} ms"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], BLACK));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(perr)?;
        root.present().map_err(perr)?;
    }
    write_png(path, &buf, w, h)
}

fn write_png(path: &Path, rgb: &[u8], w: u32, h: u32) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| BenchError::io(path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(perr)?;
    writer.write_image_data(rgb).map_err(perr)?;
    writer.finish().map_err(perr)
}
