//! The sweep's charts (PNG and SVG) with plotters. Text is drawn with ab_glyph from a TrueType
//! font read at run time (DejaVu Sans, Debian's fonts-dejavu-core), so that no system font
//! library is needed to build.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

const FONT_FILES: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
const SIZE: (u32, u32) = (900, 560);
/// Enough for a sweep's lines against mounts (a line per bitrate and listener count) to be told
/// apart in most sweeps; beyond that the colours repeat.
const COLORS: [RGBColor; 8] = [
    RED,
    BLUE,
    GREEN,
    MAGENTA,
    CYAN,
    BLACK,
    RGBColor(230, 140, 0),
    RGBColor(130, 60, 170),
];

/// One line of a chart: its name and (x, value) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Per point: whether that run was served in full (drawn filled, else hollow).
    pub ok: Vec<bool>,
}

/// Makes the font known to plotters; once per process.
fn load_font() -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let bytes = FONT_FILES
                .iter()
                .find_map(|f| std::fs::read(f).ok())
                .ok_or("no DejaVu Sans font found (apt-get install fonts-dejavu-core)")?;
            // plotters keeps fonts for the life of the process.
            register_font(
                "sans-serif",
                FontStyle::Normal,
                Box::leak(bytes.into_boxed_slice()),
            )
            .map_err(|_| "the font file is not a usable TrueType font".to_string())
        })
        .clone()
}

/// Draws `series` against a count (listeners, mounts; log scale, described by `x_desc`) into
/// `stem`.png and `stem`.svg.
pub fn chart(
    stem: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<(), String> {
    load_font()?;
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    draw(
        BitMapBackend::new(&png, SIZE).into_drawing_area(),
        title,
        x_desc,
        y_desc,
        series,
    )?;
    draw(
        SVGBackend::new(&svg, SIZE).into_drawing_area(),
        title,
        x_desc,
        y_desc,
        series,
    )
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let points = series.iter().flat_map(|s| s.points.iter());
    let x_max = points.clone().map(|p| p.0).fold(100.0, f64::max) * 1.5;
    let x_min = points.clone().map(|p| p.0).fold(x_max, f64::min) / 1.5;
    let y_max = points.map(|p| p.1).fold(0.0, f64::max) * 1.15;
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d((x_min..x_max).log_scale(), 0.0..y_max.max(1.0))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc(y_desc)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(e)?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
            .map_err(e)?
            .label(&s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().zip(&s.ok).map(|(p, ok)| {
                let style = if *ok {
                    color.filled()
                } else {
                    color.stroke_width(2)
                };
                Circle::new(*p, 5, style)
            }))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}
