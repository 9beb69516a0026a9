//! The two pictures, as hand-written SVG (no plotting crate): throughput by requests in flight,
//! and the latency CDF.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::plan::CURVES;
use crate::report::{RATIO_TARGET, Report};

const WIDTH: f64 = 840.0;
const HEIGHT: f64 = 460.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// A line.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    color: &'static str,
    markers: bool,
}

/// A horizontal reference line.
struct Rule {
    y: f64,
    label: String,
    color: &'static str,
    dash: &'static str,
}

struct Chart {
    title: String,
    x_label: String,
    y_label: String,
    /// Logarithmic; the y axis is linear.
    x_range: (f64, f64),
    y_range: (f64, f64),
    x_ticks: Vec<f64>,
    y_ticks: Vec<f64>,
    series: Vec<Series>,
    rules: Vec<Rule>,
}

impl Chart {
    fn x(&self, v: f64) -> f64 {
        let (lo, hi) = self.x_range;
        let f = (v.max(lo).ln() - lo.ln()) / (hi.ln() - lo.ln());
        LEFT + f.clamp(0.0, 1.0) * (WIDTH - LEFT - RIGHT)
    }

    fn y(&self, v: f64) -> f64 {
        let (lo, hi) = self.y_range;
        let f = (v - lo) / (hi - lo);
        HEIGHT - BOTTOM - f.clamp(0.0, 1.0) * (HEIGHT - TOP - BOTTOM)
    }

    fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" font-size="15" font-weight="bold">{}</text>"#,
            LEFT,
            escape(&self.title)
        );
        let (x0, x1) = (LEFT, WIDTH - RIGHT);
        let (y0, y1) = (HEIGHT - BOTTOM, TOP);
        for &t in &self.y_ticks {
            let y = self.y(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                x0 - 6.0,
                y + 4.0,
                tick_label(t)
            );
        }
        for &t in &self.x_ticks {
            let x = self.x(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{y1}" stroke="#e5e5e5"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                y0 + 16.0,
                tick_label(t)
            );
        }
        let _ = writeln!(
            s,
            r#"<polyline points="{x0},{y1} {x0},{y0} {x1},{y0}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            (x0 + x1) / 2.0,
            HEIGHT - 14.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (y0 + y1) / 2.0,
            escape(&self.y_label)
        );
        for rule in &self.rules {
            let y = self.y(rule.y);
            let _ = writeln!(
                s,
                r#"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="{}" stroke-dasharray="{}"/><text x="{:.1}" y="{:.1}" fill="{}">{}</text>"#,
                rule.color,
                rule.dash,
                x1 + 6.0,
                y + 4.0,
                rule.color,
                escape(&rule.label)
            );
        }
        for (i, series) in self.series.iter().enumerate() {
            let points: Vec<String> = series
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", self.x(x), self.y(y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                points.join(" "),
                series.color
            );
            if series.markers {
                for &(x, y) in &series.points {
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"/>"#,
                        self.x(x),
                        self.y(y),
                        series.color
                    );
                }
            }
            let ly = TOP + 40.0 + 18.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                x1 + 6.0,
                x1 + 26.0,
                series.color,
                x1 + 30.0,
                ly + 4.0,
                escape(&series.name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// Ticks at 1, 2, 5 × 10^k covering `0..=max`, about five of them.
fn linear_ticks(max: f64) -> (f64, Vec<f64>) {
    let raw = (max / 5.0).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let top = (max / step).ceil() * step;
    let ticks = (0..=((top / step).round() as usize))
        .map(|i| i as f64 * step)
        .collect();
    (top, ticks)
}

/// Ticks at 1, 2, 5 × 10^k within `lo..=hi`.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let t = m * decade;
            if t >= lo && t <= hi {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    ticks
}

fn tick_label(t: f64) -> String {
    if t >= 1000.0 && (t % 1000.0).abs() < 1e-9 {
        format!("{}k", t / 1000.0)
    } else if t >= 1.0 || t == 0.0 {
        format!("{t}")
    } else {
        format!("{t:.2}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes `throughput-vs-in-flight.svg` and `latency-cdf.svg` into `dir`.
///
/// # Errors
/// If a file cannot be written.
pub(crate) fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    for (name, chart) in [
        ("throughput-vs-in-flight.svg", throughput_chart(report)),
        ("latency-cdf.svg", latency_chart(report)),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, chart.render())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn throughput_chart(report: &Report) -> Chart {
    let n = report.plan.sessions;
    let raw = report.anchor_rate("sign", "secp256k1", n);
    let series: Vec<Series> = report
        .stores
        .iter()
        .filter(|s| !s.sweep.is_empty())
        .zip(COLORS)
        .map(|(store, color)| Series {
            name: format!(
                "{} ({} workers, {n} sessions)",
                store.store, report.plan.workers
            ),
            points: store
                .sweep
                .iter()
                .map(|p| (p.in_flight as f64, p.ops_per_sec))
                .collect(),
            color,
            markers: true,
        })
        .collect();
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(raw)
        .fold(1.0, f64::max);
    let (top, y_ticks) = linear_ticks(max * 1.05);
    let mut rules = Vec::new();
    if let Some(raw) = raw {
        rules.push(Rule {
            y: raw,
            label: format!("raw PKCS#11, {n} sessions"),
            color: "#555555",
            dash: "6 4",
        });
        rules.push(Rule {
            y: raw * RATIO_TARGET,
            label: format!("target {:.0}% of raw", RATIO_TARGET * 100.0),
            color: "#999999",
            dash: "2 3",
        });
    }
    let sweep = &report.plan.sweep;
    let lo = sweep.iter().copied().min().unwrap_or(1).max(1) as f64;
    let hi = sweep.iter().copied().max().unwrap_or(64).max(2) as f64;
    Chart {
        title: "secp256k1 signatures/s by requests in flight".to_owned(),
        x_label: "requests in flight (closed loop, log scale)".to_owned(),
        y_label: "signatures per second".to_owned(),
        x_range: (lo, hi),
        y_range: (0.0, top),
        x_ticks: sweep.iter().map(|&k| k as f64).collect(),
        y_ticks,
        series,
        rules,
    }
}

fn latency_chart(report: &Report) -> Chart {
    let mut series = Vec::new();
    let mut colors = COLORS.into_iter().cycle();
    for store in &report.stores {
        for l in &store.latency {
            let label = CURVES
                .iter()
                .find(|c| c.api == l.curve)
                .map_or(l.curve.as_str(), |c| c.label);
            series.push(Series {
                name: format!("{} {label} @{:.0}/s", store.store, l.rate_per_sec),
                points: l.cdf.clone(),
                color: colors.next().unwrap_or("black"),
                markers: false,
            });
        }
    }
    let xs = || series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let lo = xs().filter(|x| *x > 0.0).fold(f64::INFINITY, f64::min);
    let hi = xs().fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (
            10f64.powf(lo.log10().floor()),
            10f64.powf(hi.log10().ceil()),
        )
    } else {
        (0.1, 100.0)
    };
    let rules = [0.5, 0.95, 0.99]
        .into_iter()
        .map(|q| Rule {
            y: q,
            label: format!("p{}", (q * 100.0).round()),
            color: "#999999",
            dash: "2 3",
        })
        .collect();
    Chart {
        title: format!(
            "Latency CDF, request created → signed, open loop at {:.0}% of saturation",
            report.plan.latency_load * 100.0
        ),
        x_label: "milliseconds (log scale)".to_owned(),
        y_label: "fraction of requests".to_owned(),
        x_range: (lo, hi),
        y_range: (0.0, 1.0),
        x_ticks: log_ticks(lo, hi),
        y_ticks: vec![0.0, 0.25, 0.5, 0.75, 1.0],
        series,
        rules,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        let (top, ticks) = linear_ticks(1234.0);
        assert_eq!(top, 1500.0);
        assert_eq!(ticks.first(), Some(&0.0));
        assert_eq!(ticks.last(), Some(&1500.0));
        assert_eq!(
            log_ticks(0.1, 100.0),
            vec![0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
    }

    #[test]
    fn a_chart_is_one_svg_document_with_its_series() {
        let chart = Chart {
            title: "t <&>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_range: (1.0, 64.0),
            y_range: (0.0, 100.0),
            x_ticks: vec![1.0, 64.0],
            y_ticks: vec![0.0, 100.0],
            series: vec![Series {
                name: "s".into(),
                points: vec![(1.0, 10.0), (64.0, 90.0)],
                color: COLORS[0],
                markers: true,
            }],
            rules: vec![],
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        assert_eq!(svg.matches("<circle").count(), 2);
    }
}
