//! Small server-rendered SVG bar charts (per-day series), readable without JavaScript: every bar
//! has a `<title>` with its day and value, and the chart has an accessible name.

use std::fmt::Write as _;

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 120.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 18.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A bar chart of `(label, value)` pairs, oldest first, titled `title`.
#[must_use]
pub fn bars(title: &str, points: &[(String, i64)]) -> String {
    let max = points.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let n = points.len().max(1);
    #[allow(clippy::cast_precision_loss)]
    let slot = WIDTH / n as f64;
    let plot = HEIGHT - TOP - BOTTOM;
    let mut svg = format!(
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{t}" xmlns="http://www.w3.org/2000/svg"><title>{t}</title>"#,
        t = escape(title)
    );
    let _ = write!(
        svg,
        r##"<text x="0" y="10" font-size="10" fill="#5b6670">max {max}</text><line x1="0" y1="{y}" x2="{WIDTH}" y2="{y}" stroke="#d5dbe0"/>"##,
        y = HEIGHT - BOTTOM
    );
    for (i, (label, value)) in points.iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        let h = plot * (*value as f64) / (max as f64);
        #[allow(clippy::cast_precision_loss)]
        let x = slot * i as f64 + slot * 0.15;
        let _ = write!(
            svg,
            r##"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="#0b5fad"><title>{l}: {value}</title></rect>"##,
            y = HEIGHT - BOTTOM - h,
            w = slot * 0.7,
            l = escape(label),
        );
    }
    if let (Some((first, _)), Some((last, _))) = (points.first(), points.last()) {
        let _ = write!(
            svg,
            r##"<text x="0" y="{y}" font-size="10" fill="#5b6670">{a}</text><text x="{WIDTH}" y="{y}" font-size="10" fill="#5b6670" text-anchor="end">{b}</text>"##,
            y = HEIGHT - 4.0,
            a = escape(first),
            b = escape(last),
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::bars;

    #[test]
    fn bars_scale_to_the_largest_value_and_label_every_day() {
        let svg = bars(
            "Requests per day",
            &[
                ("2026-11-01".into(), 0),
                ("2026-11-02".into(), 4),
                ("2026-11-03".into(), 2),
            ],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<rect").count(), 3);
        assert!(svg.contains("<title>2026-11-02: 4</title>"));
        // The largest bar fills the plot height (120 - 14 - 18 = 88), the half one half of it.
        assert!(svg.contains(r#"height="88.0""#), "{svg}");
        assert!(svg.contains(r#"height="44.0""#), "{svg}");
        assert!(svg.contains(r#"height="0.0""#), "{svg}");
        assert!(svg.contains("max 4"));
    }

    #[test]
    fn titles_are_escaped() {
        let svg = bars("<b>&", &[]);
        assert!(svg.contains("&lt;b&gt;&amp;"), "{svg}");
        assert!(!svg.contains("<b>"));
    }
}
