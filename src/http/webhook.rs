//! `POST /v1/webhooks/twilio/{tenant_id}/messages`: content type → size → signature →
//! dedupe → enqueue, in that order (SPEC "Precise points").

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gatehouse_jobs::InboundMessage;
use gatehouse_jobs::client::Enqueue;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::AppState;
use super::authz::read_limited;
use super::client_ip::client_ip;
use super::error::ApiError;
use super::key_cache::KeyCacheError;
use super::transport::RequestId;
use crate::events::{EventType, SecurityEvent};
use crate::security::twilio;

/// How long a MessageSid is remembered in Redis for deduplication (Twilio retries within
/// hours; the database's unique key is the lasting guarantee).
pub const DEDUPE_TTL_SECONDS: u64 = crate::config::WEBHOOK_DEDUPE_SECONDS;

/// `gatehouse_webhook_verifications_total{result="valid"}`, registered once: it counts every
/// accepted webhook, the hottest path there is.
static VERIFIED: LazyLock<::metrics::Counter> = LazyLock::new(
    || ::metrics::counter!("gatehouse_webhook_verifications_total", "result" => "valid"),
);

const TWIML_EMPTY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Form,
    Json,
}

fn content_kind(headers: &HeaderMap) -> Option<Kind> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mime = value.split(';').next()?.trim();
    if mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Some(Kind::Form)
    } else if mime.eq_ignore_ascii_case("application/json") {
        Some(Kind::Json)
    } else {
        None
    }
}

struct Fields {
    message_sid: String,
    from: String,
    to: String,
    body: String,
}

/// The form pairs of a body, parsed once for the signature check and for the fields.
type FormPairs<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

/// The parameters of a verified request, by name.
enum Params<'a> {
    Form(&'a FormPairs<'a>),
    Json(serde_json::Value),
}

impl Params<'_> {
    fn get(&self, name: &str) -> Option<String> {
        match self {
            Self::Form(pairs) => pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone().into_owned()),
            Self::Json(value) => value.get(name).and_then(|v| v.as_str()).map(str::to_owned),
        }
    }
}

fn fields(params: &Params<'_>) -> Result<Fields, ApiError> {
    let get = |name: &str| params.get(name);
    let sid = get("MessageSid")
        .or_else(|| get("SmsSid"))
        .ok_or_else(|| ApiError::invalid_request("MessageSid is required"))?;
    let valid_sid = sid.len() == 34
        && sid[..2].bytes().all(|b| b.is_ascii_uppercase())
        && sid[2..].bytes().all(|b| b.is_ascii_hexdigit());
    if !valid_sid {
        return Err(ApiError::invalid_request(
            "MessageSid must be two letters and 32 hex digits",
        ));
    }
    let from = get("From").ok_or_else(|| ApiError::invalid_request("From is required"))?;
    if from.is_empty() || from.chars().count() > 64 {
        return Err(ApiError::invalid_request("From must be 1 to 64 characters"));
    }
    let to = get("To").unwrap_or_default();
    if to.chars().count() > 64 {
        return Err(ApiError::invalid_request(
            "To must be at most 64 characters",
        ));
    }
    let body = get("Body").unwrap_or_default();
    if body.chars().count() > 1600 {
        return Err(ApiError::invalid_request(
            "Body must be at most 1600 characters",
        ));
    }
    Ok(Fields {
        message_sid: sid,
        from,
        to,
        body,
    })
}

fn twiml() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        TWIML_EMPTY,
    )
        .into_response()
}

/// A Twilio inbound message: content type → size → signature (`X-Twilio-Signature` over the
/// raw body) → dedupe → enqueue. Answers empty TwiML.
#[utoipa::path(post, path = "/v1/webhooks/twilio/{tenant_id}/messages", tag = "webhooks",
    params(
        ("tenant_id" = Uuid, Path),
        ("X-Twilio-Signature" = String, Header, description = "Twilio's request signature"),
    ),
    request_body(content = String, description = "Twilio's form fields (or JSON)",
        content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "Accepted (empty TwiML)", content_type = "text/xml"),
        super::error::BodyErrors,
        (status = 403, description = "Forbidden (missing scope, or `invalid_signature`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn twilio_message(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(tenant): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    // The parts are borrowed, not cloned: this is the hottest route.
    let (parts, body) = request.into_parts();
    let (uri, headers) = (&parts.uri, &parts.headers);
    let request_id = parts.extensions.get::<RequestId>().map(|id| id.0.as_str());
    let kind = content_kind(headers).ok_or_else(|| {
        ApiError::unsupported_media_type("application/x-www-form-urlencoded or application/json")
    })?;
    let raw = read_limited(body, headers, state.config.max_body_bytes).await?;

    let reject = |tenant_id: Option<Uuid>, reason: &'static str| {
        let mut event = SecurityEvent::new(EventType::InvalidWebhookSignature);
        event.ip = Some(client_ip(peer, headers, &state.config.trusted_proxies));
        event.tenant_id = tenant_id;
        event.request_id = request_id.map(str::to_owned);
        event.details = json!({"reason": reason});
        state.events.spawn(event);
        ::metrics::counter!("gatehouse_webhook_verifications_total", "result" => "invalid")
            .increment(1);
        ApiError::invalid_signature()
    };

    let Ok(tenant_id) = Uuid::parse_str(&tenant) else {
        return Err(reject(None, "unknown tenant"));
    };
    let Some(base) = state.public_base.as_deref() else {
        tracing::error!("PUBLIC_BASE_URL is not set; webhooks cannot be verified");
        return Err(ApiError::unavailable());
    };
    let keys = match state
        .key_cache
        .get(&state.pool, &state.config.keyring, tenant_id)
        .await
    {
        Ok(Some(keys)) => keys,
        // No such tenant: the id in the path is the client's, not a tenant's, so the event
        // names none (and all such forgeries share one alert subject).
        Ok(None) => return Err(reject(None, "unknown tenant")),
        Err(KeyCacheError::Unavailable(error)) => {
            tracing::error!(tenant.id = %tenant_id, %error, "cannot load webhook keys");
            ::metrics::counter!("gatehouse_webhook_verifications_total", "result" => "unavailable")
                .increment(1);
            return Err(ApiError::unavailable());
        }
        Err(KeyCacheError::Tenant(error)) => {
            tracing::error!(tenant.id = %tenant_id, %error, "cannot open webhook keys");
            let mut event = SecurityEvent::new(EventType::EncryptionError);
            event.ip = Some(client_ip(peer, headers, &state.config.trusted_proxies));
            event.tenant_id = Some(tenant_id);
            event.request_id = request_id.map(str::to_owned);
            event.details = match &error {
                crate::tenants::TenantError::Encryption { column, source, .. } => json!({
                    "operation": "open_webhook_keys",
                    "table": "tenants",
                    "column": column,
                    "row_id": tenant_id,
                    "reason": source.to_string(),
                }),
                _ => json!({"operation": "open_webhook_keys"}),
            };
            state.events.spawn(event);
            return Err(ApiError::unavailable());
        }
    };

    // Exactly what Twilio called: the public base, then the raw path and query as received.
    let mut url = format!("{base}{}", uri.path());
    if let Some(query) = uri.query() {
        url.push('?');
        url.push_str(query);
    }
    let tenant_keys = twilio::TenantKeys {
        auth_token: &keys.auth_token,
        shared_keys: &keys.shared_keys,
    };
    let signed_headers = twilio::Headers {
        signature: headers
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok()),
        signature_settings: headers
            .get("x-twilio-webhooks-signature-settings")
            .and_then(|v| v.to_str().ok()),
    };
    let pairs: FormPairs<'_> = match kind {
        Kind::Form => form_urlencoded::parse(&raw).collect(),
        Kind::Json => Vec::new(),
    };
    let signed_body = match kind {
        Kind::Form => twilio::Body::FormPairs(&pairs),
        Kind::Json => twilio::Body::Json(&raw),
    };
    if let Err(error) = twilio::verify(&url, signed_body, signed_headers, &tenant_keys) {
        tracing::warn!(tenant.id = %tenant_id, reason = %error, "webhook signature rejected");
        return Err(reject(Some(tenant_id), "signature"));
    }
    VERIFIED.increment(1);

    let params = match kind {
        Kind::Form => Params::Form(&pairs),
        Kind::Json => Params::Json(
            serde_json::from_slice(&raw)
                .map_err(|_| ApiError::invalid_request("the body is not valid JSON"))?,
        ),
    };
    let fields = fields(&params)?;
    let received_at = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .map_err(|_| ApiError::internal())?;
    let job = InboundMessage {
        tenant_id,
        message_sid: fields.message_sid,
        from: fields.from,
        to: fields.to,
        body: fields.body,
        received_at,
    };
    let dedupe = state
        .queues
        .dedupe_key(&format!("inbound_message:{tenant_id}:{}", job.message_sid));
    let mut redis = state.redis.clone();
    let enqueued = state
        .queues
        .enqueue(
            &mut redis,
            &job,
            Enqueue {
                job_id: None,
                dedupe: Some((dedupe, DEDUPE_TTL_SECONDS)),
                request_id: request_id.map(str::to_owned),
            },
        )
        .await
        .map_err(|error| {
            tracing::error!(tenant.id = %tenant_id, %error, "cannot enqueue inbound message");
            ApiError::unavailable()
        })?;
    tracing::info!(
        tenant.id = %tenant_id,
        job.id = %enqueued.job_id,
        job.created = enqueued.created,
        "webhook accepted"
    );
    Ok(twiml())
}
