//! SVG charts, drawn with `plotters` (its SVG backend only: no fonts or bitmap
//! libraries are needed to build; text is left to the SVG viewer).
//!
//! One shape serves every chart: panels side by side, each with lines over the same
//! categories on the x axis (rounds 1..n, or prefetch values), one colour per line
//! and a legend. A panel can use a log scale, for values that span orders of
//! magnitude (messages per second from 256 B to 1 MiB bodies).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

/// One line of a panel.
pub(crate) struct Line {
    pub(crate) label: String,
    /// A value per category (`None`: no point there).
    pub(crate) values: Vec<Option<f64>>,
    /// A thin line with crosses, for a limit rather than a measurement.
    pub(crate) limit: bool,
    /// Colour index; lines that belong together share one.
    pub(crate) colour: usize,
}

/// One panel: a y axis and its lines.
pub(crate) struct Panel {
    pub(crate) title: String,
    pub(crate) y_desc: String,
    /// Log scale (values must be > 0; others are not drawn).
    pub(crate) log: bool,
    /// The legend in the upper left corner (else lower right), where the lines are not.
    pub(crate) legend_upper_left: bool,
    pub(crate) lines: Vec<Line>,
}

/// The chart of a comparing scenario: msgs/s per round, one line per side.
pub(crate) fn rounds_svg(title: &str, series: &[(&str, &[f64])]) -> Result<String, String> {
    let rounds = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let categories: Vec<String> = (1..=rounds).map(|r| r.to_string()).collect();
    let panel = Panel {
        title: title.to_owned(),
        y_desc: "msgs/s".to_owned(),
        log: false,
        legend_upper_left: false,
        lines: series
            .iter()
            .enumerate()
            .map(|(i, (label, values))| Line {
                label: (*label).to_owned(),
                values: values.iter().map(|v| Some(*v)).collect(),
                limit: false,
                colour: i,
            })
            .collect(),
    };
    svg("round", &categories, &[panel], (860, 480))
}

/// Panels side by side over the x `categories`, as an SVG document.
pub(crate) fn svg(
    x_desc: &str,
    categories: &[String],
    panels: &[Panel],
    (width, height): (u32, u32),
) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width * panels.len().max(1) as u32, height))
            .into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(area, x_desc, categories, panel).map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

type Area<'a, 'b> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw_panel(
    area: &Area<'_, '_>,
    x_desc: &str,
    categories: &[String],
    panel: &Panel,
) -> Result<(), DrawingAreaErrorKind<<SVGBackend<'static> as DrawingBackend>::ErrorType>> {
    // On a log panel the y coordinate is log10(value); the labels show the value.
    let y = |v: f64| if panel.log { v.log10() } else { v };
    let usable = |v: &f64| v.is_finite() && (!panel.log || *v > 0.0);
    let ys: Vec<f64> = panel
        .lines
        .iter()
        .flat_map(|l| l.values.iter().flatten().copied())
        .filter(usable)
        .map(y)
        .collect();
    let (low, high) = match (
        ys.iter().copied().reduce(f64::min),
        ys.iter().copied().reduce(f64::max),
    ) {
        (Some(lo), Some(hi)) if panel.log => (lo.floor(), (hi + 0.1).ceil().max(lo + 1.0)),
        (Some(_), Some(hi)) => (0.0, (hi * 1.15).max(1.0)),
        _ => (0.0, 1.0),
    };
    let n = categories.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), low..high)?;
    let x_label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 0.01 && i >= 0.0 {
            categories.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    // A log panel is labelled at its powers of ten only.
    let y_label = |v: &f64| {
        if !panel.log {
            short_number(*v)
        } else if (v - v.round()).abs() < 0.01 {
            short_number(10f64.powf(v.round()))
        } else {
            String::new()
        }
    };
    let y_labels = if panel.log {
        (high - low).round() as usize + 1
    } else {
        10
    };
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(panel.y_desc.as_str())
        .x_labels(n)
        .y_labels(y_labels)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .disable_x_mesh()
        .draw()?;
    for line in &panel.lines {
        let colour = Palette99::pick(line.colour).to_rgba();
        let points: Vec<(f64, f64)> = line
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.filter(usable).map(|v| (i as f64, y(v))))
            .collect();
        let width = if line.limit { 1 } else { 2 };
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(width)))?
            .label(line.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(width))
            });
        if line.limit {
            chart.draw_series(
                points
                    .iter()
                    .map(|p| Cross::new(*p, 4, colour.stroke_width(1))),
            )?;
        } else {
            chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, colour.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(if panel.legend_upper_left {
            SeriesLabelPosition::UpperLeft
        } else {
            SeriesLabelPosition::LowerRight
        })
        .draw()?;
    Ok(())
}

/// 1234 -> "1.234k", 5_000_000 -> "5M", 0.5 -> "0.5".
pub(crate) fn short_number(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let digits = format!("{x:.3}");
    let digits = digits.trim_end_matches('0').trim_end_matches('.');
    format!("{digits}{suffix}")
}

/// Where a chart or table goes by default: `$CARGO_TARGET_DIR/idem-bench/<name>`, or
/// `target/idem-bench/<name>` under the current directory.
pub(crate) fn default_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("idem-bench").join(name)
}

/// Writes `text` to `path`, creating its directory; says where on stderr.
pub(crate) fn write(path: &Path, text: &str, what: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text)?;
    eprintln!("{what}: {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `svg` as XML and returns the text of its `<text>` elements.
    fn texts(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).unwrap();
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(|t| t.trim().to_owned()))
            .collect()
    }

    fn polylines(svg: &str) -> usize {
        let doc = roxmltree::Document::parse(svg).unwrap();
        doc.descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .count()
    }

    #[test]
    fn rounds_chart_is_valid_svg_with_every_series() {
        let idem = [12_000.0, 13_500.0, 11_000.0, 12_500.0, 12_000.0];
        let base = [10_000.0, 9_000.0, 9_500.0, 10_500.0, 10_000.0];
        let best = [20_000.0, 21_000.0, 19_000.0, 22_000.0, 20_500.0];
        let svg = rounds_svg(
            "amqp-noop: msgs/s per round",
            &[
                ("idem", &idem),
                ("baseline", &base),
                ("best-case baseline", &best),
            ],
        )
        .unwrap();
        let texts = texts(&svg);
        for want in [
            "amqp-noop: msgs/s per round",
            "idem",
            "baseline",
            "best-case baseline",
            "round",
            "msgs/s",
        ] {
            assert!(texts.iter().any(|t| t == want), "{want:?} not in {texts:?}");
        }
        // The rounds are the x labels.
        for round in ["1", "5"] {
            assert!(texts.iter().any(|t| t == round), "{round} not in {texts:?}");
        }
        // One line per series (the legend samples are paths of their own).
        assert!(polylines(&svg) >= 3, "{svg}");
    }

    #[test]
    fn log_panel_skips_values_it_cannot_draw_and_labels_real_values() {
        let panel = Panel {
            title: "throughput".into(),
            y_desc: "msgs/s".into(),
            log: true,
            legend_upper_left: false,
            lines: vec![Line {
                label: "noop 256 B".into(),
                values: vec![Some(100.0), None, Some(0.0), Some(100_000.0)],
                limit: false,
                colour: 0,
            }],
        };
        let categories: Vec<String> = ["10", "50", "200", "1000"].map(String::from).into();
        let svg = svg("prefetch", &categories, &[panel], (600, 400)).unwrap();
        let texts = texts(&svg);
        assert!(texts.iter().any(|t| t == "noop 256 B"), "{texts:?}");
        assert!(texts.iter().any(|t| t == "1000"), "{texts:?}");
        // The y labels are values (10^y), not logarithms.
        assert!(
            texts.iter().any(|t| t == "100" || t == "1k" || t == "10k"),
            "{texts:?}"
        );
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short_number(1234.0), "1.234k");
        assert_eq!(short_number(5_000_000.0), "5M");
        assert_eq!(short_number(20_000.0), "20k");
        assert_eq!(short_number(0.5), "0.5");
        assert_eq!(short_number(0.0), "0");
    }
}
