//! PNG plots of training runs (plotters, bitmap backend). Text needs a TrueType font: the
//! first of a few common system fonts is used (or RUDDER_FONT); without one, plots are skipped
//! with a warning rather than failing the run.

use plotters::prelude::*;
use rudder_cf::TrainReport;
use std::path::Path;
use std::sync::OnceLock;

const FONT_PATHS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let env = std::env::var("RUDDER_FONT").ok();
        let candidates = env.iter().map(String::as_str).chain(FONT_PATHS);
        for p in candidates {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Every point of every series, or the reason no plot can be drawn (no font).
fn points<'a>(series: &'a [(&str, Vec<(f64, f64)>)]) -> Result<Vec<&'a (f64, f64)>, String> {
    if !font_ready() {
        return Err("no TrueType font found (set RUDDER_FONT to a .ttf file)".into());
    }
    Ok(series.iter().flat_map(|(_, s)| s.iter()).collect())
}

type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// The series legend in the corner of a chart.
fn legend<'a>(chart: &mut Chart<'a, 'a>) -> Result<(), String> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|x| x.to_string())
}

/// Line chart of several named series over x values.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<(), String> {
    let pts = points(series)?;
    if pts.is_empty() {
        return Ok(());
    }
    let (x0, x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.0), a.1.max(p.0))
    });
    let (y0, y1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.1), a.1.max(p.1))
    });
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|x| e(&x))?;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (k, (name, s)) in series.iter().enumerate() {
        let c = colours[k % colours.len()];
        chart
            .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    if series.len() > 1 {
        legend(&mut chart)?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// `loss.png` and `valid.png` in a run folder; failures are warnings.
pub fn training_curves(dir: &Path, r: &TrainReport) {
    let loss: Vec<(f64, f64)> = r
        .history
        .iter()
        .map(|h| ((h.epoch + 1) as f64, h.loss))
        .collect();
    let k = r.config.selection_k();
    let get = |m: &str| -> Vec<(f64, f64)> {
        r.history
            .iter()
            .filter_map(|h| {
                h.valid
                    .as_ref()
                    .and_then(|v| v.get(&format!("{m}@{k}")))
                    .map(|v| ((h.epoch + 1) as f64, *v))
            })
            .collect()
    };
    let res = lines(
        &dir.join("loss.png"),
        "training loss",
        "epoch",
        &[("loss", loss)],
    )
    .and_then(|_| {
        lines(
            &dir.join("valid.png"),
            &format!("validation Recall@{k} and NDCG@{k}"),
            "epoch",
            &[
                (&format!("Recall@{k}"), get("recall")),
                (&format!("NDCG@{k}"), get("ndcg")),
            ],
        )
    });
    if let Err(e) = res {
        tracing::warn!("plots skipped: {e}");
    }
}

/// Scatter of named point sets (x, y).
pub fn scatter(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<(), String> {
    let pts = points(series)?;
    if pts.is_empty() {
        return Ok(());
    }
    let (x0, x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.0), a.1.max(p.0))
    });
    let (y0, y1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.1), a.1.max(p.1))
    });
    let (px, py) = (((x1 - x0) * 0.03).max(1e-6), ((y1 - y0) * 0.05).max(1e-6));
    let root = BitMapBackend::new(path, (800, 520)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py))
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|x| e(&x))?;
    let colours = [BLUE, RED, GREEN, MAGENTA];
    for (k, (name, s)) in series.iter().enumerate() {
        let c = colours[k % colours.len()];
        chart
            .draw_series(
                s.iter()
                    .map(|&(x, y)| Circle::new((x, y), 2, c.mix(0.5).filled())),
            )
            .map_err(|x| e(&x))?
            .label(*name)
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, c.filled()));
    }
    legend(&mut chart)?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// Grouped bars: for each integer category x (1, 2, …), one bar per named series side by side.
pub fn bars(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<(), String> {
    let pts = points(series)?;
    if pts.is_empty() {
        return Ok(());
    }
    let x0 = pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min) - 0.6;
    let x1 = pts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max) + 0.6;
    let y1 = pts.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| {
            if (v - v.round()).abs() < 1e-9 {
                format!("{}", v.round() as i64)
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|x| e(&x))?;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let w = 0.8 / series.len().max(1) as f64;
    for (k, (name, s)) in series.iter().enumerate() {
        let c = colours[k % colours.len()];
        let off = -0.4 + w * k as f64;
        chart
            .draw_series(s.iter().map(|&(x, y)| {
                Rectangle::new(
                    [(x + off, 0.0), (x + off + w * 0.9, y)],
                    c.mix(0.7).filled(),
                )
            }))
            .map_err(|x| e(&x))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
    }
    if series.len() > 1 {
        legend(&mut chart)?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
