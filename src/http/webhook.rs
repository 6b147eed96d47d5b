//! `POST /v1/webhooks/twilio/{tenant_id}/messages`: content type → size → parameter count →
//! signature → dedupe → enqueue, in that order (SPEC "Precise points", "Hostile traffic").

use std::sync::{Arc, LazyLock};

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::Response;
use gatehouse_jobs::InboundMessage;
use gatehouse_jobs::client::Enqueue;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::AppState;
use super::authz::{Ctx, count_refusal, read_limited, unauthenticated_budget};
use super::client_ip::client_ip;
use super::error::ApiError;
use super::key_cache::KeyCacheError;
use super::transport::{Origin, RequestId};
use crate::events::{EventType, SecurityEvent};
use crate::security::twilio::{self, FormPairs};

/// How long a MessageSid is remembered in Redis for deduplication (Twilio retries within
/// hours; the database's unique key is the lasting guarantee).
pub const DEDUPE_TTL_SECONDS: u64 = crate::config::WEBHOOK_DEDUPE_SECONDS;

/// The dedupe purpose of an inbound message, `inbound_message:{tenant}:{MessageSid}` (the key
/// is the queue shard's `:dedupe:{purpose}`), built with one allocation.
pub fn dedupe_purpose(tenant_id: Uuid, message_sid: &str) -> String {
    let mut tenant_text = Uuid::encode_buffer();
    [
        "inbound_message:",
        tenant_id.hyphenated().encode_lower(&mut tenant_text),
        ":",
        message_sid,
    ]
    .concat()
}

/// `gatehouse_webhook_verifications_total{result="valid"}`, registered once: it counts every
/// accepted webhook, the hottest path there is.
static VERIFIED: LazyLock<::metrics::Counter> = LazyLock::new(
    || ::metrics::counter!("gatehouse_webhook_verifications_total", "result" => "valid"),
);

/// Twilio's headers as constants: a lookup by `&str` parses and validates the name each time.
const X_TWILIO_SIGNATURE: HeaderName = HeaderName::from_static("x-twilio-signature");
const X_TWILIO_SIGNATURE_SETTINGS: HeaderName =
    HeaderName::from_static("x-twilio-webhooks-signature-settings");

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

/// The parameters of a verified request, by name; each field is taken out once.
enum Params<'a> {
    /// The form as parsed for the signature (verified, no longer needed): a value taken from
    /// it is moved, so a decoded one is not copied again.
    Form(FormPairs<'a>),
    Json(JsonParams),
}

impl Params<'_> {
    /// The first value of `name` (a form's repeats after it are ignored).
    fn take(&mut self, name: &str) -> Option<String> {
        match self {
            Self::Form(pairs) => pairs
                .iter_mut()
                .find(|(k, _)| k == name)
                .map(|(_, v)| std::mem::take(v).into_owned()),
            Self::Json(params) => params.take(name),
        }
    }
}

fn too_many_parameters() -> ApiError {
    ApiError::invalid_request(format!(
        "the body has more than {} parameters",
        twilio::MAX_FORM_PARAMS
    ))
}

/// The string members of a JSON body that [`fields`] reads (the last of a repeated name, as
/// `serde_json::Value` keeps it); every other member is skipped without being kept, and at
/// most [`twilio::MAX_FORM_PARAMS`] members are read.
#[derive(Default)]
struct JsonParams {
    message_sid: Option<String>,
    sms_sid: Option<String>,
    from: Option<String>,
    to: Option<String>,
    body: Option<String>,
}

impl JsonParams {
    fn take(&mut self, name: &str) -> Option<String> {
        match name {
            "MessageSid" => self.message_sid.take(),
            "SmsSid" => self.sms_sid.take(),
            "From" => self.from.take(),
            "To" => self.to.take(),
            "Body" => self.body.take(),
            _ => None,
        }
    }

    /// A verified JSON body's members: 400 when it is not JSON or has too many members; JSON
    /// other than an object has none.
    fn parse(raw: &[u8]) -> Result<Self, ApiError> {
        use serde::Deserializer as _;
        let invalid = || ApiError::invalid_request("the body is not valid JSON");
        if raw.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return serde_json::from_slice::<serde::de::IgnoredAny>(raw)
                .map(|_| Self::default())
                .map_err(|_| invalid());
        }
        let too_many = std::cell::Cell::new(false);
        let mut de = serde_json::Deserializer::from_slice(raw);
        let parsed = de
            .deserialize_map(JsonMembers {
                too_many: &too_many,
            })
            .and_then(|params| de.end().map(|()| params));
        match parsed {
            Ok(params) => Ok(params),
            Err(_) if too_many.get() => Err(too_many_parameters()),
            Err(_) => Err(invalid()),
        }
    }
}

struct JsonMembers<'a> {
    too_many: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::Visitor<'de> for JsonMembers<'_> {
    type Value = JsonParams;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<JsonParams, A::Error> {
        let mut params = JsonParams::default();
        let mut members = 0usize;
        while let Some(name) = map.next_key::<String>()? {
            members += 1;
            if members > twilio::MAX_FORM_PARAMS {
                self.too_many.set(true);
                return Err(serde::de::Error::custom("too many members"));
            }
            let slot = match name.as_ref() {
                "MessageSid" => &mut params.message_sid,
                "SmsSid" => &mut params.sms_sid,
                "From" => &mut params.from,
                "To" => &mut params.to,
                "Body" => &mut params.body,
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    continue;
                }
            };
            let value: serde_json::Value = map.next_value()?;
            *slot = value.as_str().map(str::to_owned);
        }
        Ok(params)
    }
}

fn fields(mut params: Params<'_>) -> Result<Fields, ApiError> {
    let mut get = |name: &str| params.take(name);
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

/// Longest verified URL kept in a refusal's event (the path and query are the client's).
const MAX_URL_DETAIL_CHARS: usize = 512;

/// The verified URL as a refusal's event keeps it: cut at [`MAX_URL_DETAIL_CHARS`]
/// characters, marked with `…` when cut.
fn verified_url_detail(url: &str) -> String {
    match url.char_indices().nth(MAX_URL_DETAIL_CHARS) {
        Some((at, _)) => format!("{}…", &url[..at]),
        None => url.to_owned(),
    }
}

fn twiml() -> Response {
    let mut response = Response::new(axum::body::Body::from(TWIML_EMPTY));
    // Room for the edge's headers too (`transport::depart`): one allocation, no regrowth.
    let headers = response.headers_mut();
    headers.reserve(super::transport::RESPONSE_HEADERS);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/xml; charset=utf-8"),
    );
    response
}

/// A Twilio inbound message: content type → size → parameter count (at most
/// [`twilio::MAX_FORM_PARAMS`], else 400) → signature (`X-Twilio-Signature` over the raw body)
/// → dedupe → enqueue. Answers empty TwiML.
#[utoipa::path(operation_id = "receive_twilio_message", post, path = "/v1/webhooks/twilio/{tenant_id}/messages", tag = "webhooks",
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
        (status = 429, description = "Too many refused requests from this address (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn twilio_message(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    // The parts are borrowed, not cloned: this is the hottest route.
    let (parts, body) = request.into_parts();
    let (uri, headers) = (&parts.uri, &parts.headers);
    let (peer, request_id) = Origin::of(&parts.extensions);
    let request_id = request_id.map(RequestId::as_str);
    // A client past its budget of refused requests is answered 429 here, before the tenant
    // key lookup (which can cost PostgreSQL work); each refusal below counts against it first.
    // A tenant whose keys are in memory skips that check: verifying it costs no PostgreSQL,
    // the genuine hot path pays no Redis round trip for it, and Twilio's addresses are shared
    // by every tenant, so one tenant's misconfigured token must not stop the others' messages.
    // A forgery for it still counts, and past the budget is answered 429.
    let ip = client_ip(peer, headers, &state.config.trusted_proxies);
    // The refusal budget's context, built on the paths that count against it (not the hot one).
    let ctx = || Ctx {
        ip,
        request_id: request_id.unwrap_or_default().to_owned(),
    };
    // A tenant whose keys are fresh in memory (the hot path) is looked up once.
    let tenant_id = Uuid::parse_str(&tenant).ok();
    let fresh = tenant_id.and_then(|id| state.key_cache.fresh(id));
    let in_memory = fresh.is_some()
        || match tenant_id {
            Some(id) => state.key_cache.holds_keys(id).await,
            None => false,
        };
    // The cold paths' futures are boxed (here, the refusal, the key lookup): kept inline they
    // would make this handler's future ~2.8 KB, copied each time it moves (BENCHMARKS §16).
    if !in_memory {
        Box::pin(unauthenticated_budget(&state, &ctx())).await?;
    }
    let kind = content_kind(headers).ok_or_else(|| {
        ApiError::unsupported_media_type("application/x-www-form-urlencoded or application/json")
    })?;
    let raw = read_limited(body, headers, state.config.max_body_bytes).await?;
    // Parsed once, for the signature and the fields, and counted as it is parsed: a form of
    // more than MAX_FORM_PARAMS parameters costs nothing more (SPEC "Hostile traffic").
    let pairs: FormPairs<'_> = match kind {
        Kind::Form => twilio::parse_form(&raw).map_err(|_| too_many_parameters())?,
        Kind::Json => Vec::new(),
    };

    // One record of a refusal: the security event (its log line, row and alert, within the
    // event budget), never a second log line per forged request as well.
    let reject =
        |tenant_id: Option<Uuid>, reason: &'static str, cause: Option<(String, String)>| {
            let mut event = SecurityEvent::new(EventType::InvalidWebhookSignature);
            event.ip = Some(ip);
            event.tenant_id = tenant_id;
            event.request_id = request_id.map(str::to_owned);
            event.details = match cause {
                Some((cause, url)) => json!({"reason": reason, "error": cause, "url": url}),
                None => json!({"reason": reason}),
            };
            state.events.spawn(event);
            ::metrics::counter!("gatehouse_webhook_verifications_total", "result" => "invalid")
                .increment(1);
            ApiError::invalid_signature()
        };

    // A refusal counts against the client's budget first; within it, it is recorded and
    // answered 403, past it answered 429 (recorded as a rate-limit hit, within its budget).
    let refuse =
        async |tenant_id: Option<Uuid>, reason: &'static str, cause: Option<(String, String)>| {
            match Box::pin(count_refusal(&state, &ctx())).await {
                Ok(()) => reject(tenant_id, reason, cause),
                Err(limited) => limited,
            }
        };

    let Some(tenant_id) = tenant_id else {
        return Err(refuse(None, "unknown tenant", None).await);
    };
    let Some(base) = state.public_base.as_deref() else {
        tracing::error!("PUBLIC_BASE_URL is not set; webhooks cannot be verified");
        return Err(ApiError::unavailable());
    };
    let looked_up = match fresh {
        Some(keys) => Ok(Some(keys)),
        None => {
            Box::pin(
                state
                    .key_cache
                    .get(&state.pool, &state.config.keyring, tenant_id),
            )
            .await
        }
    };
    let keys = match looked_up {
        Ok(Some(keys)) => keys,
        // No such tenant: the id in the path is the client's, not a tenant's, so the event
        // names none (and all such forgeries share one alert subject).
        Ok(None) => return Err(refuse(None, "unknown tenant", None).await),
        Err(KeyCacheError::Unavailable(error)) => {
            tracing::error!(tenant.id = %tenant_id, %error, "cannot load webhook keys");
            ::metrics::counter!("gatehouse_webhook_verifications_total", "result" => "unavailable")
                .increment(1);
            return Err(ApiError::unavailable());
        }
        Err(KeyCacheError::Tenant(error)) => {
            tracing::error!(tenant.id = %tenant_id, %error, "cannot open webhook keys");
            let mut event = SecurityEvent::new(EventType::EncryptionError);
            event.ip = Some(ip);
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
    let mut url =
        String::with_capacity(base.len() + uri.path().len() + 1 + uri.query().map_or(0, str::len));
    url.push_str(base);
    url.push_str(uri.path());
    if let Some(query) = uri.query() {
        url.push('?');
        url.push_str(query);
    }
    // A rotated secret's predecessor verifies until its overlap ends, checked now (a cached
    // entry never extends it).
    let now = OffsetDateTime::now_utc();
    let shared_keys = keys.shared_keys_at(now);
    let tenant_keys = twilio::TenantKeys {
        auth_token: &keys.auth_token,
        shared_keys: &shared_keys,
    };
    let signed_headers = twilio::Headers {
        signature: headers
            .get(X_TWILIO_SIGNATURE)
            .and_then(|v| v.to_str().ok()),
        signature_settings: headers
            .get(X_TWILIO_SIGNATURE_SETTINGS)
            .and_then(|v| v.to_str().ok()),
    };
    let signed_body = match kind {
        Kind::Form => twilio::Body::FormPairs(&pairs),
        Kind::Json => twilio::Body::Json(&raw),
    };
    let mut verified = twilio::verify(&url, signed_body, signed_headers, &tenant_keys);
    if matches!(verified, Err(twilio::SignatureError::BadSignature))
        && signed_headers.signature_settings.is_none()
        && let Some(previous) = keys.previous_auth_token_at(now)
    {
        let previous_keys = twilio::TenantKeys {
            auth_token: previous,
            shared_keys: &shared_keys,
        };
        verified = twilio::verify(&url, signed_body, signed_headers, &previous_keys);
    }
    if let Err(error) = verified {
        // The URL the signature was checked against, so an operator can compare it with the
        // one in Twilio's console (README "Connecting Twilio"); never a key or a signature.
        return Err(refuse(
            Some(tenant_id),
            "signature",
            Some((error.to_string(), verified_url_detail(&url))),
        )
        .await);
    }
    VERIFIED.increment(1);

    let params = match kind {
        Kind::Form => Params::Form(pairs),
        Kind::Json => Params::Json(JsonParams::parse(&raw)?),
    };
    let fields = fields(params)?;
    // Received when verified (the signature check took microseconds since `now`).
    let received_at = now.format(&Rfc3339).map_err(|_| ApiError::internal())?;
    let job = InboundMessage {
        tenant_id,
        message_sid: fields.message_sid,
        from: fields.from,
        to: fields.to,
        body: fields.body,
        received_at,
    };
    let dedupe = dedupe_purpose(tenant_id, &job.message_sid);
    let options = Enqueue {
        job_id: None,
        dedupe: Some((dedupe, DEDUPE_TTL_SECONDS)),
        request_id: request_id.map(str::to_owned),
    };
    // Sealed here, on this request's thread; sent with whatever else is ready.
    let enqueued = match state.queues.prepare(&job, options) {
        // Boxed too: the enqueue's future (~1.3 KB) would otherwise sit inside this one.
        Ok(prepared) => Box::pin(state.enqueuer.enqueue(prepared)).await,
        Err(error) => Err(error),
    }
    .map_err(|error| {
        tracing::error!(tenant.id = %tenant_id, %error, "cannot enqueue inbound message");
        ApiError::unavailable()
    })?;
    // DEBUG, like the edge's access line: at the default INFO level a line per accepted
    // webhook cost the ingress ~8 of its ~30 µs a webhook in figure 4 (BENCHMARKS §16), and
    // the worker already logs each message it stores (`inbound message stored`, job and
    // tenant ids).
    tracing::debug!(
        tenant.id = %tenant_id,
        job.id = %enqueued.job_id,
        job.created = enqueued.created,
        "webhook accepted"
    );
    Ok(twiml())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dedupe_purpose_names_tenant_and_message_sid() {
        let tenant = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(
            dedupe_purpose(tenant, "SMabc"),
            "inbound_message:01234567-89ab-cdef-0123-456789abcdef:SMabc"
        );
    }

    #[test]
    fn a_refusal_keeps_the_verified_url_cut_to_a_bound() {
        let url = "https://gh.example.com/v1/webhooks/twilio/x/messages";
        assert_eq!(verified_url_detail(url), url);
        let long = format!("{url}?{}", "é".repeat(1000));
        let kept = verified_url_detail(&long);
        assert_eq!(kept.chars().count(), MAX_URL_DETAIL_CHARS + 1);
        assert!(kept.starts_with(url) && kept.ends_with('…'));
    }
}
