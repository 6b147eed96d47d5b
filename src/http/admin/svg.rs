//! Server-drawn SVG charts for the operator dashboard: stacked hourly bars, the hour × day
//! heatmap, horizontal bars and progress bars. Geometry goes into attributes (no `style`
//! attributes, which the CSP forbids); labels are maud text, so they are escaped.

use maud::{Markup, html};

use crate::dashboard::{Heatmap, Timeline};

/// The fill of each event kind (a fixed palette, stable across pages).
pub fn kind_color(kind: &str) -> &'static str {
    match kind {
        "failed_login" => "#d62728",
        "permission_denied" => "#ff7f0e",
        "invalid_webhook_signature" => "#9467bd",
        "rate_limit_exceeded" => "#1f77b4",
        "suspicious_activity" => "#8c564b",
        "four_eyes_violation" => "#e377c2",
        "encryption_error" => "#7f7f7f",
        "key_rotation_started" => "#bcbd22",
        "key_rotation_completed" => "#17becf",
        "invitation_accepted" => "#2ca02c",
        _ => "#444444",
    }
}

/// The kinds of security event, in legend order.
pub const KINDS: [&str; 10] = [
    "failed_login",
    "permission_denied",
    "invalid_webhook_signature",
    "rate_limit_exceeded",
    "suspicious_activity",
    "four_eyes_violation",
    "encryption_error",
    "key_rotation_started",
    "key_rotation_completed",
    "invitation_accepted",
];

fn f(v: f64) -> String {
    format!("{v:.1}")
}

/// A "nice" axis maximum at or above `max`.
fn axis_max(max: i64) -> i64 {
    let max = max.max(1);
    let mut step = 1;
    while step * 10 < max {
        step *= 10;
    }
    for m in [1, 2, 5, 10] {
        if step * m >= max {
            return step * m;
        }
    }
    step * 10
}

/// The non-empty segments of one hour's bar: (kind, count below it, count).
fn segments<'a>(timeline: &Timeline, hour: i64, kinds: &[&'a str]) -> Vec<(&'a str, i64, i64)> {
    let mut base = 0;
    let mut out = Vec::new();
    for kind in kinds {
        let n = timeline.count(hour, kind);
        if n > 0 {
            out.push((*kind, base, n));
            base += n;
        }
    }
    out
}

/// Stacked bars: one bar per hour of `timeline`, one segment per kind in `kinds`.
pub fn stacked_hours(timeline: &Timeline, kinds: &[&str], label: &str) -> Markup {
    let (width, height) = (960.0, 260.0);
    let (left, right, top, bottom) = (44.0, 8.0, 10.0, 28.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let hours: Vec<i64> = (timeline.start_hour()..=timeline.end_hour).collect();
    let max = hours
        .iter()
        .map(|h| kinds.iter().map(|k| timeline.count(*h, k)).sum::<i64>())
        .max()
        .unwrap_or(0);
    let ymax = axis_max(max);
    let slot = plot_w / hours.len().max(1) as f64;
    let bar_w = (slot * 0.8).max(1.0);
    let y = |v: i64| top + plot_h - (v as f64 / ymax as f64) * plot_h;
    html! {
        svg.chart xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
            viewBox={"0 0 " (width) " " (height)} role="img" aria-label=(label) {
            title { (label) }
            @for i in 0..=4i64 {
                @let v = ymax * i / 4;
                line.grid x1=(f(left)) x2=(f(width - right)) y1=(f(y(v))) y2=(f(y(v))) {}
                text.axis x=(f(left - 6.0)) y=(f(y(v) + 4.0)) text-anchor="end" { (v) }
            }
            @for (i, hour) in hours.iter().enumerate() {
                @let x = left + slot * i as f64 + (slot - bar_w) / 2.0;
                @for (kind, base, n) in segments(timeline, *hour, kinds) {
                    rect.bar x=(f(x)) y=(f(y(base + n))) width=(f(bar_w))
                        height=(f(y(base) - y(base + n))) fill=(kind_color(kind)) {
                        title { (format!("{:02}:00 UTC", hour.rem_euclid(24))) " " (kind) ": " (n) }
                    }
                }
                @if hour.rem_euclid(24) % 6 == 0 {
                    text.axis x=(f(x + bar_w / 2.0)) y=(f(height - 8.0)) text-anchor="middle" {
                        (format!("{:02}:00", hour.rem_euclid(24)))
                    }
                }
            }
            line.axisline x1=(f(left)) x2=(f(width - right)) y1=(f(y(0))) y2=(f(y(0))) {}
        }
    }
}

/// A colour from white to dark red for `n` of `max`.
fn heat(n: i64, max: i64) -> String {
    if n <= 0 || max <= 0 {
        return "#f3f4f6".to_owned();
    }
    let t = (n as f64 / max as f64).clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        lerp(254.0, 153.0),
        lerp(224.0, 27.0),
        lerp(210.0, 27.0)
    )
}

/// Hour of day (columns) × day (rows), shaded by count.
pub fn heatmap(map: &Heatmap, label: &str) -> Markup {
    let (cell_w, cell_h) = (34.0, 24.0);
    let (left, top) = (92.0, 22.0);
    let width = left + cell_w * 24.0 + 8.0;
    let height = top + cell_h * map.days.len() as f64 + 8.0;
    let max = map.max();
    html! {
        svg.chart.heatmap xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
            viewBox={"0 0 " (width) " " (height)} role="img" aria-label=(label) {
            title { (label) }
            @for hour in 0..24u32 {
                @if hour % 3 == 0 {
                    text.axis x=(f(left + cell_w * f64::from(hour) + cell_w / 2.0)) y="14"
                        text-anchor="middle" { (format!("{hour:02}h")) }
                }
            }
            @for (d, day) in map.days.iter().enumerate() {
                text.axis x=(f(left - 8.0)) y=(f(top + cell_h * d as f64 + cell_h / 2.0 + 4.0))
                    text-anchor="end" { (day) }
                @for hour in 0..24u32 {
                    @let n = map.count(d, hour);
                    rect.cell x=(f(left + cell_w * f64::from(hour) + 1.0))
                        y=(f(top + cell_h * d as f64 + 1.0)) width=(f(cell_w - 2.0))
                        height=(f(cell_h - 2.0)) fill=(heat(n, max)) {
                        title { (day) " " (format!("{hour:02}:00")) " UTC: " (n) }
                    }
                }
            }
        }
    }
}

/// Horizontal bars, one per (label, value), longest first as given.
pub fn hbars(items: &[(String, i64)], color: &str, label: &str) -> Markup {
    let (left, right, row) = (190.0, 60.0, 24.0);
    let width = 720.0;
    let height = (row * items.len().max(1) as f64) + 8.0;
    let max = items.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    let plot = width - left - right;
    html! {
        svg.chart xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
            viewBox={"0 0 " (width) " " (height)} role="img" aria-label=(label) {
            title { (label) }
            @if items.is_empty() {
                text.axis x="8" y="18" { "nothing recorded" }
            }
            @for (i, (name, n)) in items.iter().enumerate() {
                @let y = 4.0 + row * i as f64;
                @let w = (*n as f64 / max as f64 * plot).max(1.0);
                text.axis x=(f(left - 8.0)) y=(f(y + row / 2.0 + 4.0)) text-anchor="end" { (name) }
                rect.bar x=(f(left)) y=(f(y + 3.0)) width=(f(w)) height=(f(row - 6.0)) fill=(color) {
                    title { (name) ": " (n) }
                }
                text.value x=(f(left + w + 6.0)) y=(f(y + row / 2.0 + 4.0)) { (n) }
            }
        }
    }
}

/// A progress bar: `done` and `failed` of `total`.
pub fn progress(done: i64, failed: i64, total: i64, label: &str) -> Markup {
    let width = 240.0;
    let height = 16.0;
    let total = total.max(0);
    let part = |n: i64| {
        if total == 0 {
            0.0
        } else {
            (n.clamp(0, total) as f64 / total as f64) * width
        }
    };
    let done_w = part(done);
    let failed_w = part(failed).min(width - done_w);
    html! {
        svg.chart.progress xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
            viewBox={"0 0 " (width) " " (height)} role="img" aria-label=(label) {
            title { (label) }
            rect x="0" y="0" width=(f(width)) height=(f(height)) fill="#e5e7eb" rx="3" {}
            rect.done x="0" y="0" width=(f(done_w)) height=(f(height)) fill="#16a34a" rx="3" {}
            rect.failed x=(f(done_w)) y="0" width=(f(failed_w)) height=(f(height)) fill="#dc2626" {}
        }
    }
}

/// A small colour swatch for legends.
pub fn swatch(color: &str) -> Markup {
    html! {
        svg.swatch xmlns="http://www.w3.org/2000/svg" width="12" height="12" viewBox="0 0 12 12"
            aria-hidden="true" {
            rect x="0" y="0" width="12" height="12" fill=(color) {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round_numbers_at_or_above_the_data() {
        assert_eq!(axis_max(0), 1);
        assert_eq!(axis_max(1), 1);
        assert_eq!(axis_max(3), 5);
        assert_eq!(axis_max(7), 10);
        assert_eq!(axis_max(11), 20);
        assert_eq!(axis_max(480), 500);
        assert_eq!(axis_max(501), 1000);
    }

    #[test]
    fn chart_labels_are_escaped() {
        let items = vec![("<script>alert(1)</script>".to_owned(), 3)];
        let svg = hbars(&items, "#000", "x\"><b>").into_string();
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;"), "{svg}");
        assert!(!svg.contains("\"><b>"), "{svg}");
    }

    #[test]
    fn heat_runs_from_pale_to_dark() {
        assert_eq!(heat(0, 10), "#f3f4f6");
        assert_eq!(heat(10, 10), "#991b1b");
    }
}
