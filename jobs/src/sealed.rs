//! Sealed payloads: customer data never rests in Redis in plaintext (SPEC "Customer data in
//! Redis").
//!
//! A queue's row in [`crate::spec::QUEUE_SPECS`] names the payload fields that identify a
//! customer (`sealed`; for `inbound_message`: `from`, `to` and `body`). In Redis those fields
//! are absent and one property, [`SEALED`], carries them: standard base64 of an envelope
//! ([`crate::envelope`]) whose plaintext is the whole payload as the producer wrote it, with
//! the AAD `"job.{queue}:{job_id}"`. One envelope per job: a sealed value moved to another job
//! fails to open, the fields cannot be swapped with each other, and the fields left in the open
//! (`tenant_id`, …) are authenticated too — opening checks that they still equal the sealed
//! copies, so a payload moved to another tenant, or edited in Redis, is refused. The committed schemas say the
//! same: `jobs/schemas/{queue}.json` (what a producer writes) marks each sealed field with
//! `"x-gatehouse-sealed": true`, and `jobs/schemas/at-rest/{queue}.json` is the payload as it
//! rests in Redis.
//!
//! Whoever enqueues seals ([`seal_job`], [`seal_value`]: the enqueue client does it for every
//! job given the key); only the job's handler opens ([`Sealed::open`]). Everything in between — retries, the
//! scheduled set, orphan rescue, the dead set, `jobs retry`, the outbox — moves the bytes as
//! they are, so nothing is re-sealed on a retry. A key rotation re-seals under the new key
//! ([`reseal`]). No error here carries a value: they name a field or a check, never content.
//!
//! ```
//! use gatehouse_jobs::envelope::{EncryptionKey, Keyring};
//! use gatehouse_jobs::{InboundMessage, sealed::{Sealed, seal_job}};
//! let key = EncryptionKey::generate();
//! let job = InboundMessage {
//!     tenant_id: uuid::Uuid::nil(),
//!     message_sid: format!("SM{}", "0".repeat(32)),
//!     from: "+14155550100".into(),
//!     to: "+14155550199".into(),
//!     body: "hello".into(),
//!     received_at: "2026-12-05T10:00:00Z".into(),
//! };
//! let payload = seal_job(&job, "job-1", Some(&key)).unwrap();
//! assert!(!payload.contains("\"from\"") && payload.contains("\"sealed\""));
//!
//! // Only the keyring opens it, and only for the job it was sealed for.
//! let keyring = Keyring::new(key, vec![]);
//! let rest: Sealed<InboundMessage> = serde_json::from_str(&payload).unwrap();
//! assert_eq!(rest.open("job-1", &keyring).unwrap(), job);
//! let moved: Sealed<InboundMessage> = serde_json::from_str(&payload).unwrap();
//! assert!(moved.open("job-2", &keyring).is_err());
//! ```

use std::collections::BTreeMap;
use std::marker::PhantomData;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::zeroize::Zeroizing;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::Job;
use crate::envelope::{EncryptionKey, EnvelopeError, KeyId, Keyring, envelope_key_id, job_aad};
use crate::spec;

/// The property that carries a payload's sealed fields in Redis.
pub const SEALED: &str = "sealed";

/// The sealed fields of `queue` (empty for a queue that seals nothing or is unknown).
pub fn sealed_fields(queue: &str) -> &'static [&'static str] {
    spec::spec(queue).map_or(&[], |s| s.sealed)
}

/// Why a payload could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A payload is a JSON object.
    #[error("the payload is not a JSON object")]
    NotAnObject,
    /// Sealing twice would hide the first seal's fields from the handler.
    #[error("the payload already has a `sealed` property")]
    AlreadySealed,
    /// The payload does not serialize (serde_json's serialization errors name types, not
    /// values).
    #[error("payload: {0}")]
    Json(#[from] serde_json::Error),
    /// The queue seals customer data and no key was given.
    #[error(
        "queue {queue} seals customer data: give the enqueue client the encryption key \
         (`Queues::sealing_with`)"
    )]
    NoKey {
        /// The queue.
        queue: String,
    },
}

/// Why a payload could not be opened. Never carries a value.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A payload is a JSON object.
    #[error("the payload is not a JSON object")]
    NotAnObject,
    /// The payload has no `sealed` property (a producer that did not seal), or has a sealed
    /// field in plaintext beside it.
    #[error("the payload is not sealed: {0}")]
    NotSealed(&'static str),
    /// `sealed` is not a string of standard base64.
    #[error("`sealed` is not a string of standard base64")]
    NotBase64,
    /// No configured key opens the envelope (unknown key, wrong job, tampered).
    #[error("{0}")]
    Envelope(#[from] EnvelopeError),
    /// The envelope opened, but its content is not the payload it travels in: a field left in
    /// the open differs from its sealed copy (the payload was edited, or moved to another
    /// tenant), or the content is not a JSON object.
    #[error("the sealed content does not match the payload it travels in")]
    Content,
    /// The opened payload does not fit the queue's payload type (the serde error's category
    /// only: its message could quote a value).
    #[error("the opened payload does not fit the {queue} payload type ({category})")]
    Payload {
        /// The queue.
        queue: &'static str,
        /// `data`, `syntax`, `eof` or `io`.
        category: &'static str,
    },
}

impl OpenError {
    /// A short, stable name for the failure, for events and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotAnObject => "not_an_object",
            Self::NotSealed(_) => "not_sealed",
            Self::NotBase64 => "not_base64",
            Self::Envelope(EnvelopeError::TooShort) => "too_short",
            Self::Envelope(EnvelopeError::UnsupportedVersion(_)) => "unsupported_version",
            Self::Envelope(EnvelopeError::UnknownKey(_)) => "unknown_key",
            Self::Envelope(EnvelopeError::Decrypt) => "decrypt",
            Self::Content => "content",
            Self::Payload { .. } => "payload",
        }
    }
}

/// A payload's top-level fields, borrowed from its text (no `Value` tree is built).
type Fields<'a> = BTreeMap<&'a str, &'a RawValue>;

/// The one sealing step: `plaintext`, the payload's JSON text as the producer wrote it, becomes
/// the payload as it rests in Redis — its sealed fields removed, the others copied as they are,
/// and [`SEALED`] carrying the whole text sealed for job `job_id` of `queue`.
fn seal_text(
    queue: &str,
    job_id: &str,
    plaintext: &[u8],
    key: &EncryptionKey,
) -> Result<String, SealError> {
    let fields = sealed_fields(queue);
    let seal = || key.seal(plaintext, &job_aad(queue, job_id));
    // The common case (serde_json's own compact text, plain names) without building a map:
    // the same bytes as the general path, which a test holds it to.
    match compact_members(plaintext) {
        Some(members) => compact_at_rest(members, fields, seal),
        None => general_at_rest(plaintext, fields, seal),
    }
}

/// The at-rest text of any JSON object text (through a map of its members).
fn general_at_rest(
    plaintext: &[u8],
    fields: &[&str],
    seal: impl FnOnce() -> Vec<u8>,
) -> Result<String, SealError> {
    let mut open: Fields<'_> =
        serde_json::from_slice(plaintext).map_err(|_| SealError::NotAnObject)?;
    if open.contains_key(SEALED) {
        return Err(SealError::AlreadySealed);
    }
    open.retain(|name, _| !fields.contains(name));
    // Base64 needs no JSON escaping: quoting it makes a JSON string.
    let sealed = RawValue::from_string(format!("\"{}\"", STANDARD.encode(seal())))?;
    open.insert(SEALED, &sealed);
    Ok(serde_json::to_string(&open)?)
}

/// The top-level members of `json` as (name, value text) pairs, sorted by name, when it is an
/// object as serde_json writes one (no whitespace) whose names need no unescaping and appear
/// once; `None` for anything else, which the general path then handles (or refuses). The value
/// texts are found by skipping strings (with their escapes) and counting brackets: the input is
/// the serializer's own output, never a client's, and anything unexpected falls back.
fn compact_members(json: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let (&b'{', mut rest) = json.split_first()? else {
        return None;
    };
    let mut members: Vec<(&[u8], &[u8])> = Vec::with_capacity(8);
    if rest == b"}" {
        return Some(members);
    }
    loop {
        let (&b'"', after_quote) = rest.split_first()? else {
            return None;
        };
        let name_len = memchr::memchr2(b'"', b'\\', after_quote)?;
        let (name, after_name) = after_quote.split_at(name_len);
        let [b'"', b':', value_and_rest @ ..] = after_name else {
            return None;
        };
        let value_len = value_len(value_and_rest)?;
        let (value, after_value) = value_and_rest.split_at(value_len);
        members.push((name, value));
        match after_value {
            [b',', next @ ..] => rest = next,
            [b'}'] => break,
            _ => return None,
        }
    }
    members.sort_unstable_by(|a, b| a.0.cmp(b.0));
    if members.windows(2).any(|pair| pair[0].0 == pair[1].0) {
        return None;
    }
    Some(members)
}

/// The length of the JSON value `text` starts with, up to the `,` or `}` that ends it at depth
/// zero; `None` when it never ends.
fn value_len(text: &[u8]) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        match b {
            b'"' => i += string_len(&text[i..])?,
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' if depth > 0 => {
                depth -= 1;
                i += 1;
            }
            b',' | b'}' if depth == 0 => return (i > 0).then_some(i),
            _ => i += 1,
        }
    }
    None
}

/// The length of the JSON string `text` starts with (its quotes included): the next quote not
/// escaped, found a chunk at a time.
fn string_len(text: &[u8]) -> Option<usize> {
    let mut i = 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', text.get(i..)?)?;
        if text[i] == b'"' {
            return Some(i + 1);
        }
        // A backslash escapes the one character after it (`\uXXXX`'s digits need no care).
        i += 2;
    }
}

/// The at-rest text from [`compact_members`]: the sealed fields dropped, [`SEALED`] added in
/// its place in the order, as `serde_json::to_string` of the general path's map writes it.
fn compact_at_rest(
    members: Vec<(&[u8], &[u8])>,
    fields: &[&str],
    seal: impl FnOnce() -> Vec<u8>,
) -> Result<String, SealError> {
    if members.iter().any(|(name, _)| *name == SEALED.as_bytes()) {
        return Err(SealError::AlreadySealed);
    }
    let envelope = seal();
    let mut out = Vec::with_capacity(
        members
            .iter()
            .map(|(name, value)| name.len() + value.len() + 4)
            .sum::<usize>()
            + base64::encoded_len(envelope.len(), true).unwrap_or(0)
            + 16,
    );
    let mut sealed_written = false;
    for (name, value) in members {
        if !sealed_written && name > SEALED.as_bytes() {
            push_sealed(&mut out, &envelope);
            sealed_written = true;
        }
        if !fields.iter().any(|field| field.as_bytes() == name) {
            push_member(&mut out, name, &[value]);
        }
    }
    if !sealed_written {
        push_sealed(&mut out, &envelope);
    }
    out.push(b'}');
    // The parts are cut from UTF-8 text at ASCII delimiters, or are base64: this only fails for
    // a plaintext that was not UTF-8, which the general path refuses too.
    String::from_utf8(out).map_err(|_| SealError::NotAnObject)
}

/// Appends the `sealed` member, its base64 written straight into `out` (base64 needs no JSON
/// escaping: quoted, it is a JSON string).
fn push_sealed(out: &mut Vec<u8>, envelope: &[u8]) {
    push_member(out, SEALED.as_bytes(), &[b"\""]);
    let start = out.len();
    let len = base64::encoded_len(envelope.len(), true).unwrap_or(0);
    out.resize(start + len, 0);
    match STANDARD.encode_slice(envelope, &mut out[start..]) {
        Ok(written) => out.truncate(start + written),
        // Sized by `encoded_len`, so this does not happen; were it to, the slow way.
        Err(_) => {
            out.truncate(start);
            out.extend_from_slice(STANDARD.encode(envelope).as_bytes());
        }
    }
    out.push(b'"');
}

/// Appends `"name":value` (the value in parts) to an object being written.
fn push_member(out: &mut Vec<u8>, name: &[u8], value: &[&[u8]]) {
    out.push(if out.is_empty() { b'{' } else { b',' });
    out.push(b'"');
    out.extend_from_slice(name);
    out.extend_from_slice(b"\":");
    for part in value {
        out.extend_from_slice(part);
    }
}

/// Seals a typed job for job `job_id` and returns the payload as it will rest in Redis (the
/// enqueue client's path): the job is serialized once, and that text is the sealed plaintext.
/// A queue that seals nothing gets its plain JSON; one that seals needs `key`.
pub fn seal_job<J: Job>(
    job: &J,
    job_id: &str,
    key: Option<&EncryptionKey>,
) -> Result<String, SealError> {
    if sealed_fields(J::QUEUE).is_empty() {
        return Ok(serde_json::to_string(job)?);
    }
    let key = key.ok_or_else(|| SealError::NoKey {
        queue: J::QUEUE.to_owned(),
    })?;
    // Room for a typical job at once: no regrowth copying the plaintext (each copy it leaves
    // behind is freed without being wiped; a larger job still grows as before).
    let mut plaintext = secrecy::zeroize::Zeroizing::new(Vec::with_capacity(PLAINTEXT_ROOM));
    serde_json::to_writer(&mut *plaintext, job)?;
    seal_text(J::QUEUE, job_id, &plaintext, key)
}

/// What [`seal_job`] reserves for a job's JSON text: an inbound message with a long body fits.
const PLAINTEXT_ROOM: usize = 1024;

/// [`seal_job`] for a payload already parsed (`POST /v1/jobs`): a JSON object, sealed with
/// `key` when its queue seals (`None` is an error then, never a plaintext payload).
pub fn seal_value(
    queue: &str,
    job_id: &str,
    payload: &Value,
    key: Option<&EncryptionKey>,
) -> Result<String, SealError> {
    if sealed_fields(queue).is_empty() {
        return Ok(payload.to_string());
    }
    let key = key.ok_or_else(|| SealError::NoKey {
        queue: queue.to_owned(),
    })?;
    let plaintext = secrecy::zeroize::Zeroizing::new(serde_json::to_vec(payload)?);
    seal_text(queue, job_id, &plaintext, key)
}

/// Whether two JSON texts hold the same value: the same text, or (another producer's
/// formatting, escapes) the same parsed value.
fn same_json(a: &RawValue, b: &RawValue) -> bool {
    a.get() == b.get()
        || matches!(
            (serde_json::from_str::<Value>(a.get()), serde_json::from_str::<Value>(b.get())),
            (Ok(x), Ok(y)) if x == y
        )
}

/// The envelope in a payload's [`SEALED`] property; `NotSealed` when there is none or a
/// sealed field sits in the open.
fn envelope_of(queue: &str, outer: &Fields<'_>) -> Result<Vec<u8>, OpenError> {
    if sealed_fields(queue).iter().any(|f| outer.contains_key(f)) {
        return Err(OpenError::NotSealed("its customer data is in plaintext"));
    }
    let sealed = outer
        .get(SEALED)
        .ok_or(OpenError::NotSealed("no `sealed` property"))?;
    let sealed: String = serde_json::from_str(sealed.get()).map_err(|_| OpenError::NotBase64)?;
    STANDARD.decode(sealed).map_err(|_| OpenError::NotBase64)
}

/// The one opening step: the payload `json` of job `job_id` of `queue`, as it rests in Redis,
/// back to the text its producer sealed — once the fields left in the open are found equal to
/// their sealed copies. A queue that seals nothing gets its text as it is.
fn open_text(
    queue: &str,
    job_id: &str,
    json: &str,
    keyring: &Keyring,
) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    let fields = sealed_fields(queue);
    if fields.is_empty() {
        return Ok(Zeroizing::new(json.as_bytes().to_vec()));
    }
    let outer: Fields<'_> = serde_json::from_str(json).map_err(|_| OpenError::NotAnObject)?;
    let envelope = envelope_of(queue, &outer)?;
    let plaintext = keyring.open(&envelope, &job_aad(queue, job_id))?;
    let inner: Fields<'_> = serde_json::from_slice(&plaintext).map_err(|_| OpenError::Content)?;
    let mut in_the_open = 0;
    for (name, value) in &inner {
        if fields.contains(name) {
            continue;
        }
        match outer.get(name) {
            Some(outer_value) if same_json(outer_value, value) => in_the_open += 1,
            _ => return Err(OpenError::Content),
        }
    }
    if in_the_open + 1 != outer.len() {
        return Err(OpenError::Content);
    }
    Ok(plaintext)
}

/// What a payload at rest holds, read without opening anything (`keys status`, the rotation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AtRest {
    /// Its queue seals nothing.
    Unsealed,
    /// Sealed under this key.
    Sealed(KeyId),
    /// Its queue seals, and it is not sealed (a producer that did not seal).
    Plaintext,
    /// Not a JSON object, or `sealed` is not a well-formed envelope.
    Malformed,
}

/// What the payload `json` of `queue` holds at rest.
pub fn at_rest(queue: &str, json: &str) -> AtRest {
    if sealed_fields(queue).is_empty() {
        return AtRest::Unsealed;
    }
    let Ok(outer) = serde_json::from_str::<Fields<'_>>(json) else {
        return AtRest::Malformed;
    };
    match envelope_of(queue, &outer) {
        Ok(envelope) => envelope_key_id(&envelope).map_or(AtRest::Malformed, AtRest::Sealed),
        Err(OpenError::NotSealed(_)) => AtRest::Plaintext,
        Err(_) => AtRest::Malformed,
    }
}

/// What [`reseal`] did with a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resealed {
    /// Already under the current key (or its queue seals nothing): nothing to do.
    Current,
    /// The payload re-sealed under the current key (a plaintext one sealed).
    New(String),
}

/// Re-seals the payload `json` of job `job_id` under the keyring's current key: opened with
/// whichever key sealed it, sealed again with a fresh nonce. A plaintext payload (from a
/// producer that did not seal) is sealed. The payload's other fields are kept as they are.
pub fn reseal(
    queue: &str,
    job_id: &str,
    json: &str,
    keyring: &Keyring,
) -> Result<Resealed, OpenError> {
    let plaintext = match at_rest(queue, json) {
        AtRest::Unsealed => return Ok(Resealed::Current),
        AtRest::Sealed(id) if id == keyring.current_id() => return Ok(Resealed::Current),
        AtRest::Plaintext => Zeroizing::new(json.as_bytes().to_vec()),
        AtRest::Sealed(_) | AtRest::Malformed => open_text(queue, job_id, json, keyring)?,
    };
    seal_text(queue, job_id, &plaintext, keyring.current())
        .map(Resealed::New)
        .map_err(|_| OpenError::Content)
}

/// A job's payload as it rests in Redis: a JSON object whose customer data is sealed. The
/// handler's argument; [`Sealed::open`] is the only way to the payload. Any JSON value
/// decodes into it (its text is kept as it is), so a payload that is not an object reaches the
/// handler and is refused there, reported like one no key opens.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sealed<J> {
    payload: Box<RawValue>,
    #[serde(skip)]
    job: PhantomData<fn() -> J>,
}

impl<J> std::fmt::Debug for Sealed<J> {
    /// The field names only: a payload's values stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fields: Vec<&str> = serde_json::from_str::<Fields<'_>>(self.payload.get())
            .map(|fields| fields.into_keys().collect())
            .unwrap_or_default();
        f.debug_struct("Sealed").field("fields", &fields).finish()
    }
}

impl<J: Job> Sealed<J> {
    /// Opens the payload of job `job_id` with `keyring` and decodes it.
    pub fn open(self, job_id: &str, keyring: &Keyring) -> Result<J, OpenError> {
        let plaintext = open_text(J::QUEUE, job_id, self.payload.get(), keyring)?;
        serde_json::from_slice(&plaintext).map_err(|error| OpenError::Payload {
            queue: J::QUEUE,
            // The category only: serde_json's message could quote a value.
            category: match error.classify() {
                serde_json::error::Category::Io => "io",
                serde_json::error::Category::Syntax => "syntax",
                serde_json::error::Category::Data => "data",
                serde_json::error::Category::Eof => "eof",
            },
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::{InboundMessage, SyncCatalog, SyncMode};

    const MARKER_FROM: &str = "+15005550199";
    const MARKER_BODY: &str = "marker body 7c1e";

    fn job() -> InboundMessage {
        InboundMessage {
            tenant_id: uuid::Uuid::nil(),
            message_sid: format!("SM{}", "a".repeat(32)),
            from: MARKER_FROM.into(),
            to: "+14155550100".into(),
            body: MARKER_BODY.into(),
            received_at: "2026-12-05T10:00:00Z".into(),
        }
    }

    /// Sealed through the JSON path (`POST /v1/jobs`); the typed path is `seal_job`.
    fn sealed(job_id: &str, key: &EncryptionKey) -> String {
        let value = serde_json::to_value(job()).unwrap();
        seal_value("inbound_message", job_id, &value, Some(key)).unwrap()
    }

    fn open(json: &str, job_id: &str, ring: &Keyring) -> Result<InboundMessage, OpenError> {
        serde_json::from_str::<Sealed<InboundMessage>>(json)
            .unwrap()
            .open(job_id, ring)
    }

    #[test]
    fn a_sealed_payload_holds_no_customer_data_and_opens_for_its_job() {
        let key = EncryptionKey::generate();
        let json = sealed("j1", &key);
        assert!(
            !json.contains(MARKER_FROM) && !json.contains(MARKER_BODY),
            "{json}"
        );
        assert!(!json.contains("\"from\"") && !json.contains("\"body\""));
        let ring = Keyring::new(key.clone(), vec![]);
        assert_eq!(open(&json, "j1", &ring).unwrap(), job());
        assert_eq!(at_rest("inbound_message", &json), AtRest::Sealed(key.id()));
    }

    #[test]
    fn a_sealed_payload_moved_to_another_job_or_queue_fails_to_open() {
        let key = EncryptionKey::generate();
        let ring = Keyring::new(key.clone(), vec![]);
        let json = sealed("j1", &key);
        let err = open(&json, "j2", &ring).unwrap_err();
        assert_eq!(err.reason(), "decrypt");
        // The same bytes under another queue's AAD fail too.
        let Value::Object(mut map) = serde_json::from_str::<Value>(&json).unwrap() else {
            panic!()
        };
        let envelope = STANDARD.decode(map[SEALED].as_str().unwrap()).unwrap();
        assert!(
            ring.open(&envelope, &job_aad("sync_catalog", "j1"))
                .is_err()
        );
        assert!(
            ring.open(&envelope, &job_aad("inbound_message", "j1"))
                .is_ok()
        );
        map.insert("from".into(), Value::String("x".into()));
        let err = open(&Value::Object(map).to_string(), "j1", &ring).unwrap_err();
        assert_eq!(err.reason(), "not_sealed");
    }

    #[test]
    fn an_unknown_key_a_plaintext_payload_and_garbage_are_refused_without_values() {
        let ring = Keyring::new(EncryptionKey::generate(), vec![]);
        let other = sealed("j1", &EncryptionKey::generate());
        let err = open(&other, "j1", &ring).unwrap_err();
        assert_eq!(err.reason(), "unknown_key");
        let plain = serde_json::to_string(&job()).unwrap();
        assert_eq!(at_rest("inbound_message", &plain), AtRest::Plaintext);
        for (json, reason) in [
            (plain.as_str(), "not_sealed"),
            (r#"{"sealed": 7}"#, "not_base64"),
            (r#"{"sealed": "!!"}"#, "not_base64"),
            (r#"{"sealed": "AQID"}"#, "too_short"),
        ] {
            let err = open(json, "j1", &ring).unwrap_err();
            assert_eq!(err.reason(), reason, "{json}");
            let text = err.to_string();
            assert!(
                !text.contains(MARKER_FROM) && !text.contains(MARKER_BODY),
                "{text}"
            );
        }
        assert_eq!(at_rest("inbound_message", "[1]"), AtRest::Malformed);
        assert_eq!(
            at_rest("inbound_message", r#"{"sealed":"AQID"}"#),
            AtRest::Malformed
        );
    }

    #[test]
    fn the_fields_left_in_the_open_are_authenticated_too() {
        let key = EncryptionKey::generate();
        let ring = Keyring::new(key.clone(), vec![]);
        let json = sealed("j1", &key);
        let edits: [(&str, Option<Value>); 4] = [
            // Moved to another tenant.
            ("tenant_id", Some(uuid::Uuid::max().to_string().into())),
            ("message_sid", Some(format!("SM{}", "b".repeat(32)).into())),
            ("received_at", None),
            ("extra", Some(true.into())),
        ];
        for (field, value) in edits {
            let Value::Object(mut map) = serde_json::from_str::<Value>(&json).unwrap() else {
                panic!()
            };
            match value {
                Some(v) => map.insert(field.into(), v),
                None => map.remove(field),
            };
            let err = open(&Value::Object(map).to_string(), "j1", &ring).unwrap_err();
            assert_eq!(err.reason(), "content", "{field}");
        }
        assert_eq!(open(&json, "j1", &ring).unwrap(), job());
    }

    #[test]
    fn a_payload_that_opens_but_does_not_fit_names_no_value() {
        let key = EncryptionKey::generate();
        let ring = Keyring::new(key.clone(), vec![]);
        let mut bad = serde_json::to_value(job()).unwrap();
        bad["body"] = serde_json::json!({"secret": MARKER_BODY});
        let json = seal_value("inbound_message", "j1", &bad, Some(&key)).unwrap();
        let err = open(&json, "j1", &ring).unwrap_err();
        assert_eq!(err.reason(), "payload");
        assert!(!err.to_string().contains(MARKER_BODY));
    }

    #[test]
    fn queues_that_seal_nothing_are_left_as_they_are() {
        let key = EncryptionKey::generate();
        let sync = SyncCatalog {
            tenant_id: uuid::Uuid::nil(),
            requested_by: uuid::Uuid::nil(),
            mode: SyncMode::Full,
        };
        let value = serde_json::to_value(&sync).unwrap();
        assert_eq!(
            seal_value("sync_catalog", "j", &value, None).unwrap(),
            value.to_string()
        );
        assert_eq!(
            at_rest("sync_catalog", &value.to_string()),
            AtRest::Unsealed
        );
        let ring = Keyring::new(key, vec![]);
        let opened: SyncCatalog = serde_json::from_value::<Sealed<SyncCatalog>>(value)
            .unwrap()
            .open("j", &ring)
            .unwrap();
        assert_eq!(opened, sync);
    }

    #[test]
    fn a_queue_that_seals_refuses_to_go_without_a_key() {
        let value = serde_json::to_value(job()).unwrap();
        let err = seal_value("inbound_message", "j", &value, None).unwrap_err();
        assert!(matches!(err, SealError::NoKey { .. }));
        assert!(!err.to_string().contains(MARKER_FROM));
    }

    #[test]
    fn reseal_moves_a_payload_to_the_current_key_and_seals_plaintext() {
        let old = EncryptionKey::generate();
        let new = EncryptionKey::generate();
        let ring = Keyring::new(new.clone(), vec![old.clone()]);
        let json = sealed("j1", &old);
        let Resealed::New(again) = reseal("inbound_message", "j1", &json, &ring).unwrap() else {
            panic!("an old key's payload is re-sealed")
        };
        assert_eq!(at_rest("inbound_message", &again), AtRest::Sealed(new.id()));
        assert_eq!(open(&again, "j1", &ring).unwrap(), job());
        assert_eq!(
            reseal("inbound_message", "j1", &again, &ring).unwrap(),
            Resealed::Current
        );
        let plain = serde_json::to_string(&job()).unwrap();
        let Resealed::New(sealed_now) = reseal("inbound_message", "j1", &plain, &ring).unwrap()
        else {
            panic!("plaintext is sealed")
        };
        assert!(!sealed_now.contains(MARKER_FROM));
        assert_eq!(open(&sealed_now, "j1", &ring).unwrap(), job());
        let unknown = sealed("j1", &EncryptionKey::generate());
        assert_eq!(
            reseal("inbound_message", "j1", &unknown, &ring)
                .unwrap_err()
                .reason(),
            "unknown_key"
        );
    }

    #[test]
    fn the_typed_and_the_json_paths_seal_alike_and_other_formatting_still_opens() {
        let key = EncryptionKey::generate();
        let ring = Keyring::new(key.clone(), vec![]);
        let typed = seal_job(&job(), "j1", Some(&key)).unwrap();
        let from_json = sealed("j1", &key);
        let fields = |json: &str| -> Vec<String> {
            let Value::Object(map) = serde_json::from_str::<Value>(json).unwrap() else {
                panic!()
            };
            map.keys().cloned().collect()
        };
        assert_eq!(fields(&typed), fields(&from_json));
        assert!(!typed.contains(MARKER_FROM) && !typed.contains(MARKER_BODY));
        assert_eq!(open(&typed, "j1", &ring).unwrap(), job());
        assert_eq!(at_rest("inbound_message", &typed), AtRest::Sealed(key.id()));
        // Another producer's JSON: escaped characters and slashes, spaces, another order.
        let Value::Object(map) = serde_json::from_str::<Value>(&typed).unwrap() else {
            panic!()
        };
        let sid = map["message_sid"]
            .as_str()
            .unwrap()
            .replacen('S', "\\u0053", 1);
        let other = format!(
            r#"{{ "sealed" : "{}", "received_at":"2026-12-05T10:00:00Z", "message_sid": "{sid}", "tenant_id":"{}" }}"#,
            map["sealed"].as_str().unwrap().replace('/', "\\/"),
            uuid::Uuid::nil()
        );
        assert_eq!(open(&other, "j1", &ring).unwrap(), job());
        assert!(matches!(
            seal_job(&job(), "j1", None),
            Err(SealError::NoKey { .. })
        ));
    }

    /// Both at-rest paths for one plaintext and one envelope: the compact one only where it
    /// applies (`None` otherwise).
    fn both_paths(
        plaintext: &[u8],
        fields: &[&str],
    ) -> (Option<Result<String, String>>, Result<String, String>) {
        let envelope = b"\x01 not really an envelope".to_vec();
        let compact = compact_members(plaintext)
            .map(|m| compact_at_rest(m, fields, || envelope.clone()).map_err(|e| e.to_string()));
        let general =
            general_at_rest(plaintext, fields, || envelope.clone()).map_err(|e| e.to_string());
        (compact, general)
    }

    #[test]
    fn the_compact_path_writes_what_the_general_path_writes() {
        let typed = serde_json::to_vec(&job()).unwrap();
        let catalog = serde_json::to_vec(&SyncCatalog {
            tenant_id: uuid::Uuid::nil(),
            requested_by: uuid::Uuid::nil(),
            mode: SyncMode::Full,
        })
        .unwrap();
        let cases: Vec<Vec<u8>> = vec![
            typed,
            catalog,
            br#"{}"#.to_vec(),
            br#"{"body":"a \"quoted\" }, {\\ ]","from":"x","z":[1,{"a":"}"}],"a":null}"#.to_vec(),
            br#"{"zeta":1,"sealedx":2,"seale":3,"to":{"nested":{"deep":[[]]}}}"#.to_vec(),
            "{\"body\":\"é ✓ 😀\",\"tenant_id\":\"t\"}"
                .as_bytes()
                .to_vec(),
        ];
        let fields = sealed_fields("inbound_message");
        for case in &cases {
            let (compact, general) = both_paths(case, fields);
            let compact = compact.unwrap_or_else(|| {
                panic!("compact path refused {}", String::from_utf8_lossy(case))
            });
            assert_eq!(compact, general, "{}", String::from_utf8_lossy(case));
        }
        // What the compact path leaves to the general one, and what both refuse.
        for refused in [
            &br#"{"sealed":"x","a":1}"#[..],
            br#"[1,2]"#,
            br#"{"a":1,"a":2}"#,
            br#"{ "a":1}"#,
            br#"{"\u0061":1}"#,
            br#"{"a":1"#,
            b"{\"a\":\"\xff\"}",
        ] {
            let (compact, general) = both_paths(refused, fields);
            if let Some(compact) = compact {
                assert_eq!(compact, general, "{}", String::from_utf8_lossy(refused));
            }
        }
        assert!(matches!(
            compact_at_rest(
                compact_members(br#"{"sealed":1}"#).unwrap(),
                fields,
                Vec::new
            ),
            Err(SealError::AlreadySealed)
        ));
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[\"\\\\{}\\[\\],:a-z ]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[\"\\\\a-z{}]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn the_compact_path_agrees_with_the_general_path_on_any_object(
            members in proptest::collection::btree_map("[\"\\\\a-z_é]{0,8}", json_value(), 0..8),
        ) {
            let plain_names = members.keys().all(|name| !name.contains(['"', '\\']));
            let object = Value::Object(members.into_iter().collect());
            let plaintext = serde_json::to_vec(&object).unwrap();
            let (compact, general) = both_paths(&plaintext, &["from", "to", "body", "b"]);
            // Names needing no escape always take the compact path.
            proptest::prop_assert_eq!(compact.is_some(), plain_names);
            if let Some(compact) = compact {
                proptest::prop_assert_eq!(compact, general);
            }
        }
    }

    #[test]
    fn debug_shows_field_names_only() {
        let json = serde_json::to_string(&job()).unwrap();
        let rest: Sealed<InboundMessage> = serde_json::from_str(&json).unwrap();
        let text = format!("{rest:?}");
        assert!(
            text.contains("from") && !text.contains(MARKER_FROM),
            "{text}"
        );
    }
}
