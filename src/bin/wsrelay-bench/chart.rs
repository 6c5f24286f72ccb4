//! The chart of a rate sweep as SVG text: a pure function of the points, no I/O.
//!
//! Two panels side by side over the offered rate: delivered deliveries/s (with the
//! y = x line a relay that keeps up stays on), and p99 latency on a log scale. One
//! line per configuration, in colours that stay apart for colour-blind readers, with
//! a marker shape of its own so the lines read in grey too.
//!
//! The file must render offline in a browser and on GitHub (which shows it through
//! an `<img>`): no fonts, scripts, stylesheets or links, only presentation
//! attributes, a white background (GitHub's dark mode would otherwise put the black
//! text on black), and a fixed 800 px width with text sized for it.

use std::fmt::Write;

/// One measured point of a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Point {
    /// Deliveries/s the publishers offered.
    pub(crate) offered: f64,
    /// Deliveries/s the subscribers received.
    pub(crate) delivered: f64,
    /// 99th percentile of publish → delivery, in milliseconds.
    pub(crate) p99_ms: f64,
}

/// One configuration's points, drawn as one line in each panel.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<Point>,
}

const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 450.0;
/// The plot areas (left, right) and their common top and bottom. The left margin
/// of each holds its tick labels and the rotated axis title.
const PANELS: [(f64, f64); 2] = [(78.0, 378.0), (478.0, 778.0)];
const TOP: f64 = 124.0;
const BOTTOM: f64 = 384.0;
/// Okabe–Ito: distinguishable with the common colour-vision deficiencies.
const COLOURS: [&str; 6] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
];
const FONT: &str = "Helvetica, Arial, sans-serif";
const INK: &str = "#222222";
const GRID: &str = "#e4e4e4";

/// The chart: `title` and `subtitle` (the run's shape) above a legend and the two
/// panels. Series without points still get their legend entry.
pub(crate) fn render(title: &str, subtitle: &str, series: &[Series]) -> String {
    let points = || series.iter().flat_map(|s| &s.points);
    // Both axes of the left panel share one scale, so y = x is the diagonal.
    let rate_max = points()
        .flat_map(|p| [p.offered, p.delivered])
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let rate_ticks = linear_ticks(rate_max);
    let rate_top = *rate_ticks.last().expect("at least two ticks");
    let (decade_lo, decade_hi) = decades(points().map(|p| p.p99_ms));

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" font-family="{FONT}" fill="{INK}">"#
    );
    let _ = write!(
        svg,
        "\n<title>{}</title>\n<desc>{}</desc>",
        escape(title),
        escape(subtitle)
    );
    let _ = write!(
        svg,
        "\n<rect width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"#ffffff\"/>"
    );
    let _ = write!(
        svg,
        "\n<text x=\"24\" y=\"30\" font-size=\"17\" font-weight=\"bold\">{}</text>",
        escape(title)
    );
    let _ = write!(
        svg,
        "\n<text x=\"24\" y=\"51\" font-size=\"12\" fill=\"#555555\">{}</text>",
        escape(subtitle)
    );
    legend(&mut svg, series);

    // Left panel: delivered against offered, both linear from 0.
    let (l0, l1) = PANELS[0];
    let x_rate = |v: f64| l0 + (l1 - l0) * v / rate_top;
    let y_rate = |v: f64| BOTTOM - (BOTTOM - TOP) * v / rate_top;
    panel_title(&mut svg, l0, "Delivered vs offered");
    for &t in &rate_ticks {
        let y = y_rate(t);
        gridline_h(&mut svg, l0, l1, y);
        tick_label_y(&mut svg, l0, y, &si(t));
    }
    x_axis(&mut svg, l0, l1, &rate_ticks, x_rate);
    // y = x: every offered delivery arrived.
    let _ = write!(
        svg,
        "\n<line class=\"identity\" x1=\"{l0}\" y1=\"{BOTTOM}\" x2=\"{l1}\" y2=\"{TOP}\" stroke=\"#888888\" stroke-width=\"1.2\" stroke-dasharray=\"5 4\"/>"
    );
    // Its label above the line's top end: a relay that falls behind draws below it.
    let angle = -((BOTTOM - TOP) / (l1 - l0)).atan().to_degrees();
    let (lx, ly) = (x_rate(0.97 * rate_top) - 4.0, y_rate(0.97 * rate_top) - 7.0);
    let _ = write!(
        svg,
        "\n<text x=\"{x}\" y=\"{y}\" font-size=\"11\" fill=\"#666666\" text-anchor=\"end\" transform=\"rotate({a} {x} {y})\">y = x: all delivered</text>",
        x = f(lx),
        y = f(ly),
        a = f(angle)
    );
    frame(&mut svg, l0, l1);
    axis_title_y(&mut svg, l0 - 56.0, "delivered, deliveries/s");
    for (i, s) in series.iter().enumerate() {
        let xy: Vec<(f64, f64)> = sorted(&s.points)
            .filter(|p| p.delivered.is_finite())
            .map(|p| (x_rate(p.offered), y_rate(p.delivered)))
            .collect();
        let tips = sorted(&s.points)
            .filter(|p| p.delivered.is_finite())
            .map(|p| {
                format!(
                    "{}: {} offered, {} delivered",
                    s.name,
                    si(p.offered),
                    si(p.delivered)
                )
            });
        line(&mut svg, i, &s.name, &xy, tips);
    }

    // Right panel: p99 against offered, the latency on a log scale.
    let (r0, r1) = PANELS[1];
    let x_rate = |v: f64| r0 + (r1 - r0) * v / rate_top;
    let y_log = |ms: f64| {
        let d = ms.log10().clamp(f64::from(decade_lo), f64::from(decade_hi));
        BOTTOM - (BOTTOM - TOP) * (d - f64::from(decade_lo)) / f64::from(decade_hi - decade_lo)
    };
    panel_title(&mut svg, r0, "p99 latency, publish → delivery");
    for decade in decade_lo..=decade_hi {
        let v = 10f64.powi(decade);
        let y = y_log(v);
        gridline_h(&mut svg, r0, r1, y);
        tick_label_y(&mut svg, r0, y, &duration_ms(v));
        if decade < decade_hi {
            // Lighter lines at 2× and 5× each decade, labelled when there are few
            // decades (and so room).
            for m in [2.0, 5.0] {
                let y = y_log(m * v);
                let _ = write!(
                    svg,
                    "\n<line x1=\"{r0}\" y1=\"{y}\" x2=\"{r1}\" y2=\"{y}\" stroke=\"#f2f2f2\" stroke-width=\"1\"/>",
                    y = f(y)
                );
                if decade_hi - decade_lo <= 2 {
                    tick_label_y(&mut svg, r0, y, &duration_ms(m * v));
                }
            }
        }
    }
    x_axis(&mut svg, r0, r1, &rate_ticks, x_rate);
    frame(&mut svg, r0, r1);
    axis_title_y(&mut svg, r0 - 60.0, "p99 latency (log scale)");
    for (i, s) in series.iter().enumerate() {
        let ok = |p: &&Point| p.p99_ms.is_finite() && p.p99_ms > 0.0;
        let xy: Vec<(f64, f64)> = sorted(&s.points)
            .filter(ok)
            .map(|p| (x_rate(p.offered), y_log(p.p99_ms)))
            .collect();
        let tips = sorted(&s.points).filter(ok).map(|p| {
            format!(
                "{}: {} offered, p99 {}",
                s.name,
                si(p.offered),
                duration_ms(p.p99_ms)
            )
        });
        line(&mut svg, i, &s.name, &xy, tips);
    }
    svg.push_str("\n</svg>\n");
    svg
}

/// A series' points in order of offered rate, so its line runs left to right.
fn sorted(points: &[Point]) -> impl Iterator<Item = &Point> {
    let mut v: Vec<&Point> = points.iter().filter(|p| p.offered.is_finite()).collect();
    v.sort_by(|a, b| a.offered.total_cmp(&b.offered));
    v.into_iter()
}

/// One row of entries under the subtitle: the series' line and marker, then its name.
fn legend(svg: &mut String, series: &[Series]) {
    let mut x = 24.0;
    let y = 78.0;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let _ = write!(
            svg,
            "\n<g class=\"legend\"><line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{colour}\" stroke-width=\"2.5\"/>",
            f(x),
            f(x + 28.0)
        );
        marker(svg, i, x + 14.0, y, None);
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-size=\"13\">{}</text></g>",
            f(x + 36.0),
            f(y + 4.5),
            escape(&s.name)
        );
        // Helvetica at 13 px averages under 7.5 px a character.
        x += 36.0 + 7.5 * s.name.chars().count() as f64 + 26.0;
    }
}

/// A series' line (one `path`) and a marker on each point, with a tooltip.
fn line(
    svg: &mut String,
    index: usize,
    name: &str,
    xy: &[(f64, f64)],
    tips: impl Iterator<Item = String>,
) {
    let colour = COLOURS[index % COLOURS.len()];
    let _ = write!(svg, "\n<g data-series=\"{}\">", escape(name));
    if !xy.is_empty() {
        let d: Vec<String> = xy
            .iter()
            .enumerate()
            .map(|(j, (x, y))| format!("{}{},{}", if j == 0 { 'M' } else { 'L' }, f(*x), f(*y)))
            .collect();
        let _ = write!(
            svg,
            "<path class=\"series\" d=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2.5\" stroke-linejoin=\"round\"/>",
            d.join(" ")
        );
    }
    for (&(x, y), tip) in xy.iter().zip(tips) {
        marker(svg, index, x, y, Some(&tip));
    }
    svg.push_str("</g>");
}

/// Series `index`'s marker at (x, y): circle, square, diamond, triangle, and so on.
fn marker(svg: &mut String, index: usize, x: f64, y: f64, tip: Option<&str>) {
    let colour = COLOURS[index % COLOURS.len()];
    let tip = tip
        .map(|t| format!("<title>{}</title>", escape(t)))
        .unwrap_or_default();
    let style = format!("fill=\"{colour}\" stroke=\"#ffffff\" stroke-width=\"1\"");
    let polygon = |corners: &[(f64, f64)]| {
        let corners: Vec<String> = corners
            .iter()
            .map(|(dx, dy)| format!("{},{}", f(x + dx), f(y + dy)))
            .collect();
        format!(
            "<polygon points=\"{}\" {style}>{tip}</polygon>",
            corners.join(" ")
        )
    };
    let shape = match index % 4 {
        0 => format!(
            "<circle cx=\"{}\" cy=\"{}\" r=\"4.5\" {style}>{tip}</circle>",
            f(x),
            f(y)
        ),
        1 => format!(
            "<rect x=\"{}\" y=\"{}\" width=\"8\" height=\"8\" {style}>{tip}</rect>",
            f(x - 4.0),
            f(y - 4.0)
        ),
        2 => polygon(&[(0.0, -5.5), (5.5, 0.0), (0.0, 5.5), (-5.5, 0.0)]),
        _ => polygon(&[(0.0, -5.5), (5.0, 4.0), (-5.0, 4.0)]),
    };
    svg.push_str(&shape);
}

fn panel_title(svg: &mut String, left: f64, text: &str) {
    let _ = write!(
        svg,
        "\n<text x=\"{left}\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        f(TOP - 12.0),
        escape(text)
    );
}

fn gridline_h(svg: &mut String, left: f64, right: f64, y: f64) {
    let _ = write!(
        svg,
        "\n<line x1=\"{left}\" y1=\"{y}\" x2=\"{right}\" y2=\"{y}\" stroke=\"{GRID}\" stroke-width=\"1\"/>",
        y = f(y)
    );
}

fn tick_label_y(svg: &mut String, left: f64, y: f64, label: &str) {
    let _ = write!(
        svg,
        "\n<text class=\"tick\" x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"end\">{}</text>",
        f(left - 6.0),
        f(y + 4.0),
        escape(label)
    );
}

/// The offered-rate axis under a panel: tick marks, labels and the axis title.
fn x_axis(svg: &mut String, left: f64, right: f64, ticks: &[f64], x: impl Fn(f64) -> f64) {
    for &t in ticks {
        let xt = f(x(t));
        let _ = write!(
            svg,
            "\n<line x1=\"{xt}\" y1=\"{BOTTOM}\" x2=\"{xt}\" y2=\"{}\" stroke=\"{INK}\" stroke-width=\"1\"/>",
            f(BOTTOM + 5.0)
        );
        let _ = write!(
            svg,
            "\n<text class=\"tick\" x=\"{xt}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">{}</text>",
            f(BOTTOM + 19.0),
            escape(&si(t))
        );
    }
    let _ = write!(
        svg,
        "\n<text x=\"{}\" y=\"{}\" font-size=\"13\" text-anchor=\"middle\">offered, deliveries/s</text>",
        f((left + right) / 2.0),
        f(BOTTOM + 40.0)
    );
}

/// The plot area's left and bottom axis lines.
fn frame(svg: &mut String, left: f64, right: f64) {
    let _ = write!(
        svg,
        "\n<path d=\"M{left},{TOP} L{left},{BOTTOM} L{right},{BOTTOM}\" fill=\"none\" stroke=\"{INK}\" stroke-width=\"1\"/>"
    );
}

fn axis_title_y(svg: &mut String, x: f64, text: &str) {
    let y = f((TOP + BOTTOM) / 2.0);
    let x = f(x);
    let _ = write!(
        svg,
        "\n<text x=\"{x}\" y=\"{y}\" font-size=\"13\" text-anchor=\"middle\" transform=\"rotate(-90 {x} {y})\">{}</text>",
        escape(text)
    );
}

/// Ticks from 0 to the first round value at or above `max`, 1, 2, 2.5 or 5 times
/// a power of ten apart, at most 6 intervals.
pub(crate) fn linear_ticks(max: f64) -> Vec<f64> {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let magnitude = 10f64.powf((max / 6.0).log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|step| (max / step).ceil() <= 6.0)
        .unwrap_or(10.0 * magnitude);
    let n = (max / step - 1e-9).ceil().max(1.0) as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

/// The powers of ten (exponents) that enclose every finite, positive value; at
/// least one decade apart. No values: 1 ms to 1 s.
pub(crate) fn decades(values: impl Iterator<Item = f64>) -> (i32, i32) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return (0, 3);
    }
    let lo = lo.log10().floor() as i32;
    let hi = (hi.log10().ceil() as i32).max(lo + 1);
    (lo, hi)
}

/// 250000 → `250k`, 1500000 → `1.5M`.
pub(crate) fn si(v: f64) -> String {
    let (scaled, unit) = if v.abs() >= 1e6 {
        (v / 1e6, "M")
    } else if v.abs() >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    format!("{}{unit}", trim(scaled))
}

/// Milliseconds as a short duration: `0.1 ms`, `10 ms`, `1 s`.
fn duration_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{} s", trim(ms / 1000.0))
    } else {
        format!("{} ms", trim(ms))
    }
}

/// Up to two decimals, without trailing zeros.
fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

/// A coordinate with one decimal: enough at 800 px, and short.
fn f(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
}

/// Text and attribute values as XML wants them.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep() -> Vec<Series> {
        let point = |offered: f64, delivered: f64, p99_ms: f64| Point {
            offered,
            delivered,
            p99_ms,
        };
        vec![
            Series {
                name: "default".to_owned(),
                points: vec![
                    point(500e3, 498e3, 30.0),
                    point(100e3, 100e3, 9.5),
                    point(1e6, 610e3, 1900.0),
                ],
            },
            Series {
                name: "history <1000> & more".to_owned(),
                points: vec![
                    point(100e3, 100e3, 11.0),
                    point(500e3, 470e3, 45.0),
                    point(1e6, 580e3, 2400.0),
                ],
            },
        ]
    }

    /// A small checker of XML well-formedness: one root, every element closed in
    /// order, attribute values quoted, `<` never in text and `&` only as an entity.
    fn well_formed(xml: &str) -> Result<(), String> {
        fn entity_ok(rest: &str) -> bool {
            let Some(end) = rest.find(';') else {
                return false;
            };
            let name = &rest[1..end];
            matches!(name, "amp" | "lt" | "gt" | "quot" | "apos")
                || name
                    .strip_prefix('#')
                    .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        }
        let mut stack: Vec<&str> = Vec::new();
        let mut roots = 0;
        let mut rest = xml.trim();
        while !rest.is_empty() {
            if let Some(tag) = rest.strip_prefix('<') {
                let end = tag.find('>').ok_or("unclosed tag")?;
                let body = &tag[..end];
                rest = &tag[end + 1..];
                if let Some(name) = body.strip_prefix('/') {
                    let open = stack.pop().ok_or(format!("</{name}> closes nothing"))?;
                    if open != name.trim() {
                        return Err(format!("<{open}> closed by </{name}>"));
                    }
                    continue;
                }
                let self_closing = body.ends_with('/');
                let body = body.trim_end_matches('/');
                let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
                let name = &body[..name_end];
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(format!("bad element name {name:?}"));
                }
                // Attributes: name="value", separated by white space.
                let mut attrs = body[name_end..].trim();
                while !attrs.is_empty() {
                    let eq = attrs.find("=\"").ok_or(format!("unquoted in <{name}>"))?;
                    let key = &attrs[..eq];
                    if key.is_empty() || key.contains(char::is_whitespace) {
                        return Err(format!("bad attribute {key:?} in <{name}>"));
                    }
                    let value_end = attrs[eq + 2..].find('"').ok_or("unclosed value")?;
                    let value = &attrs[eq + 2..eq + 2 + value_end];
                    if value.contains('<')
                        || value
                            .match_indices('&')
                            .any(|(i, _)| !entity_ok(&value[i..]))
                    {
                        return Err(format!("unescaped value {value:?}"));
                    }
                    attrs = attrs[eq + 3 + value_end..].trim_start();
                }
                if stack.is_empty() {
                    roots += 1;
                }
                if !self_closing {
                    stack.push(name);
                }
            } else {
                let end = rest.find('<').unwrap_or(rest.len());
                let text = &rest[..end];
                if stack.is_empty() && !text.trim().is_empty() {
                    return Err(format!("text outside the root: {text:?}"));
                }
                if text.match_indices('&').any(|(i, _)| !entity_ok(&text[i..])) {
                    return Err(format!("unescaped text {text:?}"));
                }
                rest = &rest[end..];
            }
        }
        match (stack.last(), roots) {
            (Some(open), _) => Err(format!("<{open}> never closed")),
            (None, 1) => Ok(()),
            (None, n) => Err(format!("{n} root elements")),
        }
    }

    #[test]
    fn the_checker_catches_what_it_should() {
        assert!(well_formed("<a><b x=\"1\"/>t &amp; u</a>").is_ok());
        assert!(well_formed("<a><b></a>").is_err());
        assert!(well_formed("<a>t & u</a>").is_err());
        assert!(well_formed("<a x=1></a>").is_err());
        assert!(well_formed("<a></a><a></a>").is_err());
    }

    #[test]
    fn is_well_formed_svg() {
        let svg = render("A sweep", "2 nodes & 1,000 subscribers", &sweep());
        well_formed(&svg).unwrap();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.contains("2 nodes &amp; 1,000 subscribers"));
        // Self-contained: nothing fetched, nothing run.
        for outside in ["href", "<script", "<style", "@import", "url("] {
            assert!(!svg.contains(outside), "{outside}");
        }
    }

    #[test]
    fn one_path_per_series_and_panel() {
        let svg = render("t", "s", &sweep());
        assert_eq!(svg.matches("<path class=\"series\"").count(), 4);
        // Each series' group holds one line through all its points, left to right.
        let group = "<g data-series=\"default\">";
        assert_eq!(svg.matches(group).count(), 2);
        let start = svg.find(group).unwrap();
        let end = start + svg[start..].find("</g>").unwrap();
        let first = &svg[start..end];
        assert_eq!(first.matches("<path").count(), 1);
        assert_eq!(first.matches("<circle").count(), 3);
        let d = first
            .split("d=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let xs: Vec<f64> = d
            .split(' ')
            .map(|p| p[1..].split(',').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(xs.len(), 3);
        assert!(xs.windows(2).all(|w| w[0] < w[1]), "{d}");
        // A name is escaped wherever it appears.
        assert!(svg.contains("data-series=\"history &lt;1000&gt; &amp; more\""));
        assert!(svg.contains(">history &lt;1000&gt; &amp; more</text>"));
    }

    #[test]
    fn axis_ticks_and_labels() {
        let svg = render("t", "s", &sweep());
        let ticks: Vec<&str> = svg
            .split("<text class=\"tick\"")
            .skip(1)
            .map(|t| t.split('>').nth(1).unwrap().trim_end_matches("</text"))
            .collect();
        // Rates up to 1M: 0 to 1M by 200k on the left panel's y axis and both x axes.
        for label in ["0", "200k", "400k", "600k", "800k", "1M"] {
            assert_eq!(ticks.iter().filter(|t| **t == label).count(), 3, "{label}");
        }
        // p99 from 9.5 ms to 2.4 s: decades from 1 ms to 10 s.
        for label in ["1 ms", "10 ms", "100 ms", "1 s", "10 s"] {
            assert_eq!(ticks.iter().filter(|t| **t == label).count(), 1, "{label}");
        }
        for title in [
            "offered, deliveries/s",
            "delivered, deliveries/s",
            "p99 latency (log scale)",
            "y = x: all delivered",
        ] {
            assert!(svg.contains(title), "{title}");
        }
    }

    #[test]
    fn empty_and_odd_input_still_renders() {
        well_formed(&render("t", "s", &[])).unwrap();
        let series = vec![Series {
            name: "none yet".to_owned(),
            points: vec![Point {
                offered: 100e3,
                delivered: 0.0,
                p99_ms: f64::NAN,
            }],
        }];
        let svg = render("t", "s", &series);
        well_formed(&svg).unwrap();
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // The point has no latency: a line in the left panel only.
        assert_eq!(svg.matches("<path class=\"series\"").count(), 1);
    }

    #[test]
    fn tick_steps_and_formats() {
        assert_eq!(linear_ticks(1.5e6).len(), 7);
        assert_eq!(linear_ticks(1.5e6)[1], 250e3);
        assert_eq!(linear_ticks(750e3).last(), Some(&800e3));
        assert_eq!(linear_ticks(0.0).last(), Some(&1.0));
        assert_eq!(decades([0.4, 35.0].into_iter()), (-1, 2));
        assert_eq!(decades([10.0].into_iter()), (1, 2));
        assert_eq!(si(1.25e6), "1.25M");
        assert_eq!(si(250e3), "250k");
        assert_eq!(si(0.0), "0");
        assert_eq!(duration_ms(0.1), "0.1 ms");
        assert_eq!(duration_ms(1000.0), "1 s");
    }
}
