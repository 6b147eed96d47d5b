//! `GET /v1/admin/security-events`: security events read back newest first, for callers with
//! `security:read`, filtered by `type` and `since`, paged with `limit` and the `before` cursor.

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::AppState;
use super::authz::Caller;
use super::error::ApiError;
use crate::access::Scope;
use crate::events::{self, EventFilter, EventType, StoredEvent};

/// Events per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: u32 = 100;
/// The largest `limit`.
pub const MAX_LIMIT: u32 = 1000;

/// The response header carrying the cursor of the next (older) page, when there is one.
pub const NEXT_CURSOR_HEADER: &str = "x-next-before";

/// The cursor naming an event's place in the order: `(occurred_at, id)`, opaque to clients.
pub fn cursor(event: &StoredEvent) -> String {
    let at = event.occurred_at.unix_timestamp_nanos();
    URL_SAFE_NO_PAD.encode(format!("{at}|{}", event.id))
}

fn parse_cursor(raw: &str) -> Option<(OffsetDateTime, Uuid)> {
    let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (at, id) = text.split_once('|')?;
    let at = OffsetDateTime::from_unix_timestamp_nanos(at.parse().ok()?).ok()?;
    Some((at, Uuid::parse_str(id).ok()?))
}

/// Parses the query string; every problem is a 400 `invalid_request` naming the parameter.
fn parse_filter(query: Option<&str>) -> Result<EventFilter, ApiError> {
    let mut filter = EventFilter {
        limit: DEFAULT_LIMIT,
        ..EventFilter::default()
    };
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if seen.iter().any(|s| *s == name) {
            return Err(ApiError::invalid_request(format!(
                "`{name}` is given more than once"
            )));
        }
        match name.as_ref() {
            "type" => {
                filter.kind = Some(EventType::parse(&value).ok_or_else(|| {
                    ApiError::invalid_request("`type` is not a security event type")
                })?);
            }
            "since" => {
                filter.since =
                    Some(OffsetDateTime::parse(&value, &Rfc3339).map_err(|_| {
                        ApiError::invalid_request("`since` must be an RFC 3339 time")
                    })?);
            }
            "limit" => {
                filter.limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid_request(format!(
                            "`limit` must be a whole number from 1 to {MAX_LIMIT}"
                        ))
                    })?;
            }
            "before" => {
                filter.before = Some(parse_cursor(&value).ok_or_else(|| {
                    ApiError::invalid_request("`before` is not a cursor this API returned")
                })?);
            }
            _ => {
                return Err(ApiError::invalid_request(
                    "unknown query parameter (allowed: type, since, limit, before)",
                ));
            }
        }
        seen.push(name.into_owned());
    }
    Ok(filter)
}

/// Security events, newest first.
#[utoipa::path(
    operation_id = "list_security_events",
    get,
    path = "/v1/admin/security-events",
    tag = "security",
    security(("bearer" = [])),
    params(
        ("type" = Option<String>, Query, description = "Only events of this type: `failed_login`, `permission_denied`, `invalid_webhook_signature`, `rate_limit_exceeded`, `suspicious_activity` (alerts), `four_eyes_violation`, `encryption_error`, `key_rotation_started`, `key_rotation_completed`, `tenant_secret_rotated`, `invitation_accepted`, `user_deactivated`, `user_activated`, `platform_role_changed`, `service_account_created` or `service_account_revoked`."),
        ("since" = Option<String>, Query, description = "Only events at or after this RFC 3339 time (e.g. `2026-11-29T00:00:00Z`; encode `+` as `%2B`)."),
        ("limit" = Option<u32>, Query, description = "At most this many events (default 100)."),
        ("before" = Option<String>, Query, description = "The cursor from the previous page's `X-Next-Before` header (or its `Link: rel=\"next\"`): only events older than that page's last event."),
    ),
    responses(
        (status = 200, description = "Events, newest first. When more (older) events remain, `X-Next-Before` carries the cursor for `before` and `Link` the next page's URL (`rel=\"next\"`).", body = Vec<StoredEvent>,
            headers(
                ("X-Next-Before" = String, description = "The cursor of the next page; absent on the last page"),
                ("Link" = String, description = "`</v1/admin/security-events?…&before=…>; rel=\"next\"`; absent on the last page"),
            )),
        (status = 400, description = "A bad `type`, `since`, `limit` or `before` (`invalid_request`)", body = super::error::ErrorBody),
        (status = 401, description = "No valid bearer token", body = super::error::ErrorBody),
        (status = 403, description = "The caller lacks `security:read`", body = super::error::ErrorBody),
        (status = 503, description = "PostgreSQL unavailable", body = super::error::ErrorBody),
    )
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    caller.require(&state, Scope::SecurityRead)?;
    let filter = parse_filter(query.as_deref())?;
    let events = events::list(&state.pool, &filter).await.map_err(|error| {
        tracing::error!(%error, "cannot read security events");
        ApiError::unavailable()
    })?;
    // SPEC's body is the array itself; the next page is named in headers.
    let next = if events.len() == filter.limit as usize {
        events.last().map(cursor)
    } else {
        None
    };
    let mut response = Json(events).into_response();
    if let Some(next) = next {
        let mut link = form_urlencoded::Serializer::new(String::new());
        for (name, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
            if name != "before" {
                link.append_pair(&name, &value);
            }
        }
        link.append_pair("before", &next);
        let link = format!(
            "</v1/admin/security-events?{}>; rel=\"next\"",
            link.finish()
        );
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&next) {
            headers.insert(NEXT_CURSOR_HEADER, value);
        }
        if let Ok(value) = HeaderValue::from_str(&link) {
            headers.insert(header::LINK, value);
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_to_its_time_and_id() {
        let event = StoredEvent {
            id: Uuid::new_v4(),
            kind: "failed_login".into(),
            occurred_at: OffsetDateTime::from_unix_timestamp_nanos(1_795_000_000_123_456_000)
                .expect("valid time"),
            ip: None,
            user_id: None,
            email: None,
            tenant_id: None,
            details: serde_json::json!({}),
        };
        assert_eq!(
            parse_cursor(&cursor(&event)),
            Some((event.occurred_at, event.id))
        );
        assert_eq!(parse_cursor("not-a-cursor"), None);
    }

    #[test]
    fn bad_parameters_are_refused_and_good_ones_read() {
        for bad in [
            "type=nope",
            "since=yesterday",
            "limit=0",
            "limit=1001",
            "limit=-1",
            "before=xyz",
            "colour=red",
            "limit=5&limit=6",
        ] {
            assert!(parse_filter(Some(bad)).is_err(), "{bad}");
        }
        let f = parse_filter(Some("type=failed_login&since=2026-11-29T00:00:00Z&limit=5"))
            .expect("valid");
        assert_eq!(f.kind, Some(EventType::FailedLogin));
        assert_eq!(f.limit, 5);
        assert!(f.since.is_some());
        assert_eq!(parse_filter(None).expect("empty").limit, DEFAULT_LIMIT);
    }
}
