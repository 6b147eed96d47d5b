//! The dashboard's pages: the layout, the login form, and one handler per page (each reads
//! its numbers through `crate::dashboard` or the worker's queue statistics and renders them
//! with maud, which escapes every interpolated string).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::svg;
use super::{Officer, Unavailable, html, loaded};
use crate::dashboard;
use crate::http::AppState;

/// The navigation: (path, title).
const NAV: [(&str, &str); 6] = [
    ("/admin", "Security events"),
    ("/admin/auth", "Failed authentication"),
    ("/admin/rate-limits", "Rate limiting"),
    ("/admin/webhooks", "Webhooks"),
    ("/admin/queues", "Queues"),
    ("/admin/rotations", "Key rotations"),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            meta name="referrer" content="no-referrer";
            title { (title) " · gatehouse" }
            link rel="stylesheet" href="/admin/static/admin.css";
        }
    }
}

/// A signed-in page: navigation, the operator, the sign-out form, `body`.
fn layout(officer: &Officer, active: &str, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.top {
                    span.brand { "gatehouse" }
                    nav {
                        @for (path, name) in NAV {
                            @if path == active {
                                a.active href=(path) aria-current="page" { (name) }
                            } @else {
                                a href=(path) { (name) }
                            }
                        }
                    }
                    form.logout method="post" action="/admin/logout" {
                        input type="hidden" name="csrf" value=(officer.csrf);
                        span.who { (officer.principal.email.as_deref().unwrap_or("")) }
                        button type="submit" { "Sign out" }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page with one message (errors, 403).
pub fn message_page(title: &str, status: StatusCode, message: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                main.narrow {
                    h1 { (status.as_u16()) " " (title) }
                    p.message { (message) }
                    p { a href="/admin" { "Back to the dashboard" } }
                }
            }
        }
    }
}

/// The login form.
pub fn login_page(csrf: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body {
                main.narrow {
                    h1 { "gatehouse operator dashboard" }
                    @if let Some(error) = error {
                        p.error role="alert" { (error) }
                    }
                    form.login method="post" action="/admin/login" {
                        input type="hidden" name="csrf" value=(csrf);
                        label for="email" { "Email" }
                        input #email type="email" name="email" autocomplete="username" required;
                        label for="password" { "Password" }
                        input #password type="password" name="password" autocomplete="current-password" required;
                        button #signin type="submit" { "Sign in" }
                    }
                    p.hint { "For operators with the security:read or platform:admin scope." }
                }
            }
        }
    }
}

fn legend(kinds: &[&str]) -> Markup {
    html! {
        ul.legend {
            @for kind in kinds {
                li { (svg::swatch(svg::kind_color(kind))) " " (kind) }
            }
        }
    }
}

/// What every dashboard page answers (for the OpenAPI document).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum PageAnswers {
    /// The page.
    #[response(status = 200, content_type = "text/html")]
    Page(String),
    /// No session: to the login page.
    #[response(status = 303)]
    SignIn,
    /// The user lacks `security:read`.
    #[response(status = 403, content_type = "text/html")]
    Forbidden(String),
}

/// `/admin`: events per hour and kind over 48 hours, totals, the newest events.
#[utoipa::path(
    operation_id = "admin_overview",
    get,
    path = "/admin",
    tag = "admin",
    description = "The security-events timeline (per hour, by kind) and the newest events. HTML for users holding `security:read`.",
    responses(PageAnswers)
)]
pub async fn overview(
    State(state): State<Arc<AppState>>,
    officer: Officer,
) -> Result<Response, Unavailable> {
    let timeline = loaded(
        "cannot read the event timeline",
        dashboard::timeline(&state.pool, 48).await,
    )?;
    let recent = loaded(
        "cannot read recent events",
        dashboard::recent_events(&state.pool, 25).await,
    )?;
    let body = html! {
        section {
            h2 { "Per hour, by kind (last 48 hours, UTC)" }
            (svg::stacked_hours(&timeline, &svg::KINDS, "security events per hour by kind"))
            (legend(&svg::KINDS))
        }
        section {
            h2 { "Totals (last 48 hours)" }
            table #totals {
                thead { tr { th { "kind" } th.num { "events" } } }
                tbody {
                    @for kind in svg::KINDS {
                        tr { td { (kind) } td.num { (timeline.kind_total(kind)) } }
                    }
                }
            }
        }
        section {
            h2 { "Newest events" }
            table #recent {
                thead { tr { th { "time" } th { "kind" } th { "ip" } th { "email" } th { "tenant" } } }
                tbody {
                    @for e in &recent {
                        tr {
                            td { (e.occurred_at) }
                            td { (e.kind) }
                            td { (e.ip.as_deref().unwrap_or("")) }
                            td { (e.email.as_deref().unwrap_or("")) }
                            td { @if let Some(t) = e.tenant_id { (t) } }
                        }
                    }
                }
            }
        }
    };
    Ok(html(
        StatusCode::OK,
        layout(&officer, "/admin", "Security events", body),
    ))
}

/// `/admin/auth`: failed logins by hour of day × day, and the top source addresses.
#[utoipa::path(
    operation_id = "admin_failed_auth",
    get,
    path = "/admin/auth",
    tag = "admin",
    description = "Failed authentication: hour-of-day × day heatmap and top source addresses. HTML for users holding `security:read`.",
    responses(PageAnswers)
)]
pub async fn failed_auth(
    State(state): State<Arc<AppState>>,
    officer: Officer,
) -> Result<Response, Unavailable> {
    let map = loaded(
        "cannot read the failed-login heatmap",
        dashboard::failed_login_heatmap(&state.pool, 7).await,
    )?;
    let top = loaded(
        "cannot read top source addresses",
        dashboard::top_source_ips(&state.pool, "failed_login", 24 * 7, 10).await,
    )?;
    let bars: Vec<(String, i64)> = top.iter().map(|s| (s.ip.clone(), s.count)).collect();
    let body = html! {
        section {
            h2 { "Failed logins by hour of day and day (last 7 days, UTC): " (map.total()) }
            (svg::heatmap(&map, "failed logins by hour of day and day"))
        }
        section {
            h2 { "Top source addresses (last 7 days)" }
            (svg::hbars(&bars, svg::kind_color("failed_login"), "failed logins per source address"))
            table #top-ips {
                thead { tr { th { "ip" } th.num { "failed logins" } th.num { "emails tried" } th { "last seen" } } }
                tbody {
                    @for s in &top {
                        tr { td { (s.ip) } td.num { (s.count) } td.num { (s.emails) } td { (s.last_seen) } }
                    }
                }
            }
        }
    };
    Ok(html(
        StatusCode::OK,
        layout(&officer, "/admin/auth", "Failed authentication", body),
    ))
}

/// `/admin/rate-limits`: refusals per hour, per limit, and the most limited addresses.
#[utoipa::path(
    operation_id = "admin_rate_limits",
    get,
    path = "/admin/rate-limits",
    tag = "admin",
    description = "Rate-limit refusals per limit. HTML for users holding `security:read`.",
    responses(PageAnswers)
)]
pub async fn rate_limits(
    State(state): State<Arc<AppState>>,
    officer: Officer,
) -> Result<Response, Unavailable> {
    let timeline = loaded(
        "cannot read the event timeline",
        dashboard::timeline(&state.pool, 24).await,
    )?;
    let hits = loaded(
        "cannot read rate-limit statistics",
        dashboard::rate_limit_hits(&state.pool).await,
    )?;
    let top = loaded(
        "cannot read top source addresses",
        dashboard::top_source_ips(&state.pool, "rate_limit_exceeded", 24, 10).await,
    )?;
    let config = &state.config;
    let configured = [
        ("auth_ip", "RATE_LIMIT_LOGIN_IP", config.rate_limit_login_ip),
        (
            "failed_login",
            "RATE_LIMIT_LOGIN_EMAIL",
            config.rate_limit_login_email,
        ),
        ("user", "RATE_LIMIT_USER", config.rate_limit_user),
    ];
    let per_limit: Vec<(String, i64)> =
        hits.iter().map(|h| (h.limit.clone(), h.last_24h)).collect();
    let bars: Vec<(String, i64)> = top.iter().map(|s| (s.ip.clone(), s.count)).collect();
    let color = svg::kind_color("rate_limit_exceeded");
    let body = html! {
        section {
            h2 { "Refusals per hour (last 24 hours, UTC)" }
            (svg::stacked_hours(&timeline, &["rate_limit_exceeded"], "rate-limit refusals per hour"))
        }
        section {
            h2 { "Per limit" }
            (svg::hbars(&per_limit, color, "rate-limit refusals per limit, last 24 hours"))
            table #limits {
                thead { tr { th { "limit" } th { "variable" } th { "rate" } th.num { "refused, 24 h" } th.num { "refused, 7 days" } } }
                tbody {
                    @for (name, variable, rate) in configured {
                        @let h = hits.iter().find(|h| h.limit == name);
                        tr {
                            td { (name) } td { code { (variable) } } td { (rate.to_string()) }
                            td.num { (h.map_or(0, |h| h.last_24h)) }
                            td.num { (h.map_or(0, |h| h.last_7d)) }
                        }
                    }
                    @for h in hits.iter().filter(|h| !configured.iter().any(|(n, _, _)| *n == h.limit)) {
                        tr { td { (h.limit) } td {} td {} td.num { (h.last_24h) } td.num { (h.last_7d) } }
                    }
                }
            }
        }
        section {
            h2 { "Most limited addresses (last 24 hours)" }
            (svg::hbars(&bars, color, "rate-limit refusals per source address"))
        }
    };
    Ok(html(
        StatusCode::OK,
        layout(&officer, "/admin/rate-limits", "Rate limiting", body),
    ))
}

/// `/admin/webhooks`: signature verification per tenant.
#[utoipa::path(
    operation_id = "admin_webhooks",
    get,
    path = "/admin/webhooks",
    tag = "admin",
    description = "Webhook verification status per tenant. HTML for users holding `security:read`.",
    responses(PageAnswers)
)]
pub async fn webhooks(
    State(state): State<Arc<AppState>>,
    officer: Officer,
) -> Result<Response, Unavailable> {
    let tenants = loaded(
        "cannot read webhook status",
        dashboard::webhook_status(&state.pool).await,
    )?;
    let unknown = loaded(
        "cannot read webhook status",
        dashboard::webhook_unknown_tenant_refusals(&state.pool).await,
    )?;
    let bars: Vec<(String, i64)> = tenants
        .iter()
        .filter(|t| t.invalid_7d > 0)
        .map(|t| (t.name.clone(), t.invalid_7d))
        .collect();
    let body = html! {
        section {
            h2 { "Invalid signatures per tenant (last 7 days)" }
            (svg::hbars(&bars, svg::kind_color("invalid_webhook_signature"), "invalid webhook signatures per tenant"))
            p { "Invalid signatures for unknown tenant ids in the last 24 hours: " strong #unknown-tenants { (unknown) } }
        }
        section {
            h2 { "Status per tenant" }
            table #webhooks {
                thead { tr {
                    th { "tenant" } th { "status" } th { "signature" }
                    th.num { "invalid, 24 h" } th.num { "invalid, 7 days" } th { "last invalid" }
                    th.num { "verified messages, 24 h" } th { "last message" }
                } }
                tbody {
                    @for t in &tenants {
                        tr {
                            td { span.name { (t.name) } br; small { (t.tenant_id) } }
                            td { span class={"status " (t.verdict())} { (t.verdict()) } }
                            td { @if t.shared_key { "HMAC-SHA256 shared key + auth token" } @else { "auth token (HMAC-SHA1)" } }
                            td.num { (t.invalid_24h) }
                            td.num { (t.invalid_7d) }
                            td { (t.last_invalid.as_deref().unwrap_or("—")) }
                            td.num { (t.messages_24h) }
                            td { (t.last_message.as_deref().unwrap_or("—")) }
                        }
                    }
                }
            }
        }
    };
    Ok(html(
        StatusCode::OK,
        layout(&officer, "/admin/webhooks", "Webhook verification", body),
    ))
}

#[derive(Deserialize)]
pub struct QueuesQuery {
    notice: Option<String>,
}

/// `/admin/queues`: depth, in flight, retries and dead letters per queue, with a retry
/// button (a CSRF-guarded form) per dead job.
/// Tenants listed per queue under "Top tenants by backlog".
const TOP_TENANTS: usize = 10;

#[utoipa::path(
    operation_id = "admin_queues",
    get,
    path = "/admin/queues",
    tag = "admin",
    description = "Queues: depth, in flight, retries, dead letters (with retry buttons for `platform:admin`). HTML for users holding `security:read` or `platform:admin`.",
    responses(PageAnswers)
)]
pub async fn queues(
    State(state): State<Arc<AppState>>,
    officer: Officer,
    Query(query): Query<QueuesQuery>,
) -> Result<Response, Unavailable> {
    let mut redis = state.redis.clone();
    let shards = state.queues.layout();
    let stats = loaded(
        "cannot read queue statistics",
        crate::queue::stats::all_queue_stats(&mut redis, shards, &gatehouse_jobs::QUEUES).await,
    )?;
    let dead = loaded(
        "cannot list dead jobs",
        crate::queue::dead::list(&mut redis, shards, &gatehouse_jobs::QUEUES, 50).await,
    )?;
    let mut top_tenants: Vec<(&str, Vec<(String, u64)>)> = Vec::new();
    for queue in gatehouse_jobs::QUEUES {
        let top = loaded(
            "cannot read the tenants' backlogs",
            crate::queue::limits::top_waiting(&mut redis, shards, queue, TOP_TENANTS).await,
        )?;
        if !top.is_empty() {
            top_tenants.push((queue, top));
        }
    }
    let notice = match query.notice.as_deref() {
        Some("retried") => Some("The job is back on its queue."),
        Some("missing") => Some("No dead job with that id (already retried or purged)."),
        _ => None,
    };
    let depth: Vec<(String, i64)> = stats
        .iter()
        .map(|s| {
            (
                s.queue.clone(),
                i64::try_from(s.pending).unwrap_or(i64::MAX),
            )
        })
        .collect();
    let dead_bars: Vec<(String, i64)> = stats
        .iter()
        .map(|s| (s.queue.clone(), i64::try_from(s.dead).unwrap_or(i64::MAX)))
        .collect();
    let body = html! {
        @if let Some(notice) = notice {
            p.notice role="status" { (notice) }
        }
        section {
            h2 { "Queues" }
            table #queues {
                thead { tr {
                    th { "queue" } th.num { "depth" } th.num { "in flight" } th.num { "retrying" }
                    th.num { "dead" } th.num { "done (not yet vacuumed)" } th.num { "workers" }
                    th.num { "tenants waiting" } th.num { "tenants at their cap" }
                } }
                tbody {
                    @for s in &stats {
                        tr {
                            td { (s.queue) } td.num { (s.pending) } td.num { (s.in_flight) }
                            td.num { (s.retrying) } td.num { (s.dead) } td.num { (s.done) }
                            td.num { (s.workers) } td.num { (s.tenants_waiting) }
                            td.num { (s.tenants_capped) }
                        }
                    }
                }
            }
            div.charts {
                div { h3 { "Depth" } (svg::hbars(&depth, "#2563eb", "jobs waiting per queue")) }
                div { h3 { "Dead letters" } (svg::hbars(&dead_bars, "#dc2626", "dead jobs per queue")) }
            }
        }
        section {
            h2 { "Top tenants by backlog" }
            @if top_tenants.is_empty() {
                p { "No tenant has jobs waiting." }
            } @else {
                table #top-tenants {
                    thead { tr { th { "queue" } th { "tenant" } th.num { "jobs waiting" } } }
                    tbody {
                        @for (queue, top) in &top_tenants {
                            @for (tenant, waiting) in top {
                                tr { td { (queue) } td { code { (tenant) } } td.num { (waiting) } }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Dead letters (newest 50 per queue)" }
            @if dead.is_empty() {
                p { "No dead jobs." }
            } @else {
                table #dead {
                    thead { tr { th { "job" } th { "queue" } th.num { "attempts" } th { "last error" } th {} } }
                    tbody {
                        @for job in &dead {
                            tr {
                                td { code { (job.id) } }
                                td { (job.queue) }
                                td.num { (job.attempts) }
                                td.error { (job.last_error) }
                                td {
                                    @if officer.may_write() {
                                        form.retry method="post" action="/admin/queues/retry" {
                                            input type="hidden" name="csrf" value=(officer.csrf);
                                            input type="hidden" name="job_id" value=(job.id);
                                            button type="submit" { "Retry" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(html(
        StatusCode::OK,
        layout(&officer, "/admin/queues", "Queues", body),
    ))
}

/// `/admin/rotations`: key rotations and their progress.
#[utoipa::path(
    operation_id = "admin_rotations",
    get,
    path = "/admin/rotations",
    tag = "admin",
    description = "Key rotations and their progress. HTML for users holding `security:read`.",
    responses(PageAnswers)
)]
pub async fn rotations(
    State(state): State<Arc<AppState>>,
    officer: Officer,
) -> Result<Response, Unavailable> {
    let rotations = loaded(
        "cannot read key rotations",
        dashboard::rotations(&state.pool, 50).await,
    )?;
    let body = html! {
        section {
        h2 { "Newest 50, with progress (done and failed of total)" }
        @if rotations.is_empty() {
            p { "No key rotation yet." }
        } @else {
            table #rotations {
                thead { tr {
                    th { "rotation" } th { "status" } th { "target key" } th { "initiated by" }
                    th { "created" } th { "progress" } th.num { "done" } th.num { "failed" } th.num { "total" }
                    th { "last error" }
                } }
                tbody {
                    @for r in &rotations {
                        @let permille = r.progress_permille();
                        tr {
                            td { code { (r.id) } }
                            td { span class={"status " (r.status)} { (r.status) } }
                            td { code { (r.target_key_id) } }
                            td { (r.initiated_by.as_deref().unwrap_or("")) }
                            td { (r.created_at) }
                            td {
                                (svg::progress(r.done, r.failed, r.total, "rotation progress"))
                                " " (format!("{}.{}%", permille / 10, permille % 10))
                            }
                            td.num { (r.done) } td.num { (r.failed) } td.num { (r.total) }
                            td.error { (r.last_error.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
        }
    };
    Ok(html(
        StatusCode::OK,
        layout(&officer, "/admin/rotations", "Key rotations", body),
    ))
}
