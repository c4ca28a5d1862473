//! The built-in status page (`GET /` on the metrics address), for households without Grafana:
//! what `cync-gateway status` shows — effective percentage, the latch, per path its devices,
//! success, p99 and budget, the last rollback check, recent audit entries — and a chart of the
//! last hour per path.
//!
//! Invariants:
//! - Self-contained: one HTML document with inline CSS and inline SVG charts, no script, no
//!   external asset, so it works offline and behind any proxy; it refreshes itself every
//!   [`REFRESH_S`] seconds with a `<meta http-equiv="refresh">`.
//! - Read-only: it shows state and offers no action (mutations stay on the admin API, whose
//!   socket permissions are its authentication).
//! - Everything that comes from outside (reasons, actors, setting values) is HTML-escaped.
//! - Pure: [`render`] takes the figures and returns the page; [`Admin::page_data`] gathers them.

use std::fmt::Write as _;
use std::time::Duration;

use html_escape::encode_text as esc;
use tokio::time::Instant;

use super::admin::{Admin, Status};
use super::audit;
use crate::telemetry::labels::{Label, Transport};
use crate::telemetry::slo::Slo;

/// Seconds between the page's own reloads.
pub const REFRESH_S: u32 = 10;

/// Audit entries shown, newest first.
pub const RECENT: usize = 10;

/// One minute of one path in the chart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Minute {
    pub commands: u64,
    /// Good share; `None` when the minute had no commands.
    pub success: Option<f64>,
}

/// One path's extra figures for the page.
#[derive(Debug, Clone, PartialEq)]
pub struct PathExtra {
    pub transport: String,
    /// Command latency p99 in seconds since start, from the histogram; `None` before the
    /// first answered command (or with per-device series).
    pub p99_s: Option<f64>,
    /// The last 60 minutes, oldest first.
    pub minutes: Vec<Minute>,
}

/// Everything the page shows.
#[derive(Debug, Clone)]
pub struct PageData {
    pub status: Status,
    pub extra: Vec<PathExtra>,
    pub recent: Vec<audit::Entry>,
    /// When the page was made (RFC 3339).
    pub generated_at: String,
}

fn pct(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{:.2} %", v * 100.0),
        None => "no commands".into(),
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{:.0} ms", v * 1000.0),
        None => "—".into(),
    }
}

/// An SVG bar chart of commands per minute, each bar coloured by its success.
fn chart(minutes: &[Minute]) -> String {
    const W: f64 = 360.0;
    const H: f64 = 60.0;
    let max = minutes.iter().map(|m| m.commands).max().unwrap_or(0).max(1) as f64;
    let bar = W / minutes.len().max(1) as f64;
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"commands per minute, last hour\">"
    );
    for (i, m) in minutes.iter().enumerate() {
        if m.commands == 0 {
            continue;
        }
        let h = (m.commands as f64 / max * (H - 2.0)).max(1.0);
        let colour = match m.success {
            Some(s) if s >= 0.999 => "#2e7d32",
            Some(s) if s >= 0.99 => "#f9a825",
            _ => "#c62828",
        };
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{colour}\"><title>{} commands, {}</title></rect>",
            i as f64 * bar,
            H - h,
            (bar - 1.0).max(1.0),
            m.commands,
            pct(m.success)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The page.
pub fn render(d: &PageData) -> String {
    let s = &d.status;
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>cync-gateway status</title><style>\
body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}}\
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left}}\
th{{background:#f4f4f4}}.latched{{background:#c62828;color:#fff;padding:.5em 1em;display:inline-block}}\
.ok{{background:#2e7d32;color:#fff;padding:.5em 1em;display:inline-block}}pre{{white-space:pre-wrap;background:#f8f8f8;padding:.5em}}\
.chart{{background:#fafafa;border:1px solid #ddd}}</style></head><body>"
    );
    let _ = write!(
        h,
        "<h1>cync-gateway</h1><p>Canary: configured <b id=\"configured\">{:.2} %</b>, in force <b id=\"effective\">{:.2} %</b>.</p>",
        s.configured_percent, s.effective_percent
    );
    if s.latch.latched {
        let _ = write!(
            h,
            "<p id=\"latch\" class=\"latched\">Rollback latch SET{}{}{} — every device is on legacy until an operator resumes.</p>",
            s.latch.since.as_deref().map(|t| format!(" since {}", esc(t))).unwrap_or_default(),
            s.latch.actor.as_deref().map(|a| format!(" by {}", esc(a))).unwrap_or_default(),
            s.latch.reason.as_deref().map(|r| format!(": {}", esc(r))).unwrap_or_default(),
        );
    } else {
        let _ = write!(
            h,
            "<p id=\"latch\" class=\"ok\">Rollback latch clear{}</p>",
            if s.rollback_enabled {
                " — automatic rollback is on"
            } else {
                " — automatic rollback is OFF"
            }
        );
    }
    h.push_str("<h2>Paths</h2><table id=\"paths\"><tr><th>path</th><th>devices</th><th>commands 5 m</th><th>success 5 m</th><th>success 1 h</th><th>success 30 d</th><th>p99 (since start)</th><th>success budget left</th><th>last hour</th></tr>");
    for p in &s.paths {
        let w = |label: &str| p.windows.iter().find(|w| w.window == label);
        let extra = d.extra.iter().find(|e| e.transport == p.transport);
        let budget = p
            .budget_remaining
            .iter()
            .find(|(slo, _)| slo == Slo::Success.label())
            .map(|(_, b)| format!("{:.1} %", b * 100.0))
            .unwrap_or_else(|| "—".into());
        let _ = write!(
            h,
            "<tr class=\"path\" data-path=\"{t}\"><td>{t}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{budget}</td><td>{}</td></tr>",
            p.connections,
            w("5m").map_or(0, |w| w.commands),
            pct(w("5m").and_then(|w| w.success)),
            pct(w("1h").and_then(|w| w.success)),
            pct(w("30d").and_then(|w| w.success)),
            ms(extra.and_then(|e| e.p99_s)),
            extra.map(|e| chart(&e.minutes)).unwrap_or_default(),
            t = esc(&p.transport),
        );
    }
    h.push_str("</table>");
    h.push_str("<h2>Last rollback check</h2>");
    match &s.last_check {
        Some(c) => {
            let _ = write!(
                h,
                "<p id=\"check\">{} at {} (failures in a row: {} of {})</p><pre>{}</pre>",
                esc(&c.result),
                esc(&c.at),
                c.streak,
                c.max_violations,
                esc(&c.summary)
            );
        }
        None => h.push_str("<p id=\"check\">none yet</p>"),
    }
    h.push_str("<h2>Recent changes</h2><table id=\"audit\"><tr><th>when</th><th>who</th><th>what</th><th>why</th></tr>");
    if d.recent.is_empty() {
        h.push_str("<tr><td colspan=\"4\">none</td></tr>");
    }
    for e in &d.recent {
        let changes: Vec<String> = e
            .changes
            .iter()
            .map(|c| format!("{} {} → {}", c.key, c.old, c.new))
            .collect();
        let what = if changes.is_empty() {
            e.action.clone()
        } else {
            format!("{}: {}", e.action, changes.join(", "))
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&e.time),
            esc(&e.actor),
            esc(&what),
            esc(&e.reason)
        );
    }
    let _ = writeln!(
        h,
        "</table><p><small>Generated {} · refreshes every {REFRESH_S} s · <a href=\"/metrics\">/metrics</a></small></p></body></html>",
        esc(&d.generated_at)
    );
    h
}

impl crate::telemetry::http::StatusPage for Admin {
    fn render(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send + '_>> {
        Box::pin(async move { render(&self.page_data().await) })
    }
}

impl Admin {
    /// The figures of the status page, now.
    pub async fn page_data(&self) -> PageData {
        let status = self.status().await;
        let now = Instant::now();
        let minute = Duration::from_secs(60);
        let extra = [Transport::New, Transport::Legacy]
            .into_iter()
            .map(|t| {
                // Minute i (0 = the current one) is the difference of two windows ending now.
                let upto: Vec<_> = (0..=60u32)
                    .map(|i| self.slo.window(now, t, minute * i))
                    .collect();
                let minutes = (0..60)
                    .rev()
                    .map(|i| {
                        let c = upto[i + 1] - upto[i];
                        Minute {
                            commands: c.commands,
                            success: (c.commands > 0)
                                .then(|| c.successes as f64 / c.commands as f64),
                        }
                    })
                    .collect();
                PathExtra {
                    transport: t.label().into(),
                    p99_s: self.metrics.command_quantile(t, 0.99),
                    minutes,
                }
            })
            .collect();
        let dir = self.live.config().state_dir.clone();
        let recent = tokio::task::spawn_blocking(move || audit::read(&dir, Some(RECENT)))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|h| h.entries.into_iter().rev().collect())
            .unwrap_or_default();
        PageData {
            status,
            extra,
            recent,
            generated_at: self.slo.clock().rfc3339(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::admin::{CheckView, LatchView, PathView, WindowView};

    fn data(latched: bool, reason: &str) -> PageData {
        let path = |t: &str, n: u64| PathView {
            transport: t.into(),
            connections: n,
            windows: vec![WindowView {
                window: "5m".into(),
                commands: 120,
                success: Some(0.9875),
                latency: Some(1.0),
            }],
            budget_remaining: vec![("success".into(), 0.5)],
            success_burn_1h: 0.0,
            p99_s: None,
        };
        PageData {
            status: Status {
                configured_percent: 25.0,
                effective_percent: if latched { 0.0 } else { 25.0 },
                latch: LatchView {
                    latched,
                    since: Some("2026-12-01T10:00:00Z".into()),
                    reason: Some(reason.into()),
                    actor: Some("controller".into()),
                },
                rollback_enabled: true,
                check_interval_s: 1.0,
                window_s: 30.0,
                paths: vec![path("new", 7), path("legacy", 21)],
                last_check: Some(CheckView {
                    at: "2026-12-01T10:00:00Z".into(),
                    result: "fail".into(),
                    streak: 3,
                    max_violations: 3,
                    summary: "success 72.9 % < 99 %".into(),
                }),
                rollout: None,
            },
            extra: vec![PathExtra {
                transport: "new".into(),
                p99_s: Some(0.1234),
                minutes: vec![
                    Minute {
                        commands: 10,
                        success: Some(1.0)
                    };
                    60
                ],
            }],
            recent: Vec::new(),
            generated_at: "2026-12-01T10:00:01Z".into(),
        }
    }

    #[test]
    fn the_page_shows_the_percentages_the_latch_and_each_paths_figures() {
        let page = render(&data(true, "success below the floor"));
        assert!(page.contains("configured <b id=\"configured\">25.00 %</b>"));
        assert!(page.contains("in force <b id=\"effective\">0.00 %</b>"));
        assert!(page.contains(
            "Rollback latch SET since 2026-12-01T10:00:00Z by controller: success below the floor"
        ));
        assert!(page.contains("<td>new</td><td>7</td><td>120</td><td>98.75 %</td>"));
        assert!(page.contains("<td>123 ms</td><td>50.0 %</td>"));
        assert_eq!(page.matches("<rect ").count(), 60, "one bar per minute");
        assert!(page.contains("fail at 2026-12-01T10:00:00Z (failures in a row: 3 of 3)"));
    }

    #[test]
    fn text_from_outside_is_escaped_and_nothing_is_loaded_from_elsewhere() {
        let page = render(&data(true, "<script>alert(1)</script>"));
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("&lt;script&gt;"));
        for outside in ["src=", "http://", "https://", "@import"] {
            assert!(!page.contains(outside), "{outside}");
        }
    }
}
