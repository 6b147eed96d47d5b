//! The LLM answer pipeline as one pure function: JSON parse → a compiled-once Draft 2020-12
//! schema → the checks a schema cannot express → sanitize → a typed [`Answer`], or a
//! [`Rejection`] naming the first step that failed.
//!
//! An LLM answer is attacker-influenced text (the customer writes the prompt's content), so it
//! is treated like any hostile input. This module does no I/O and keeps no state besides the
//! compiled schema; it depends on nothing of the crate but `crate::classify::Intent`, so the
//! fuzz target (`fuzz/fuzz_targets/llm_answer.rs`) compiles it directly.
//!
//! Choices where the contract is silent:
//! - JSON wrapped in prose or a Markdown code fence is rejected (`malformed_json`), never dug
//!   out: the answer must be exactly one JSON object, optionally surrounded by whitespace.
//!   Extracting "the JSON part" would let the customer's text decide which part that is.
//! - A key that appears twice in one object is rejected (`duplicate_key`): parsers disagree
//!   about which one wins, and the schema would only see one of them.
//! - `slots` may be omitted (no slots); `intent` and `confidence` are required.
//! - Numeric slot values must be integers or decimals of magnitude at most 2^53 − 1, the range
//!   every JSON reader represents the same way.
//! - Sanitizing replaces tab, CR, LF and the Unicode line/paragraph separators with a space and
//!   removes every other control character (general category Cc) and every bidirectional
//!   formatting character (ALM, LRM, RLM, the embeddings, overrides and isolates), then
//!   NFC-normalizes and trims. NFC can lengthen a string, so the 500-character bound is checked
//!   again on the sanitized value.

use std::collections::HashSet;
use std::fmt;
use std::sync::LazyLock;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value, json};
use unicode_normalization::UnicodeNormalization;

use crate::classify::Intent;

/// The longest answer (the `content` string) that is parsed at all, in bytes. A valid answer
/// written plainly is far shorter (20 slots of 500 characters is about 12 KiB of ASCII).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// At most this many slots.
pub const MAX_SLOTS: usize = 20;
/// A slot name is 1 to this many of `a`–`z` and `_`.
pub const MAX_SLOT_NAME_CHARS: usize = 64;
/// A string slot value is at most this many characters (Unicode scalar values), before and
/// after sanitizing.
pub const MAX_SLOT_VALUE_CHARS: usize = 500;
/// The largest magnitude of a numeric slot value: 2^53 − 1.
pub const MAX_SLOT_NUMBER: f64 = 9_007_199_254_740_991.0;

/// Why an answer was rejected. The names (`as_str`) are stable: they are stored in
/// `messages.rejected_reason`, logged, and label the rejection metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The HTTP response body exceeded its cap (it was not read further).
    ResponseTooLarge,
    /// The HTTP response was not a chat completion with a string at
    /// `choices[0].message.content` (including a refusal with no content).
    MalformedResponse,
    /// The provider refused this request (400, 413, 422): something about the message itself.
    RequestRefused,
    /// The answer exceeded [`MAX_ANSWER_BYTES`].
    AnswerTooLarge,
    /// Not exactly one JSON document: syntax errors, prose or code fences around the JSON,
    /// `NaN`, nesting deeper than the parser allows, trailing text.
    MalformedJson,
    /// A number too large for a finite double (`1e400`).
    NumberOutOfRange,
    /// One object repeats a key.
    DuplicateKey,
    /// The answer is JSON but not an object (array, string, number, boolean, null).
    NotAnObject,
    /// A property outside `intent`, `confidence`, `slots`.
    UnexpectedProperty,
    /// `intent` or `confidence` is missing.
    MissingProperty,
    /// `intent` is not a string from the whitelist.
    UnknownIntent,
    /// `confidence` is not a number in [0, 1].
    InvalidConfidence,
    /// `slots` is not an object.
    InvalidSlots,
    /// More than [`MAX_SLOTS`] slots.
    TooManySlots,
    /// A slot name outside `^[a-z_]{1,64}$`.
    InvalidSlotName,
    /// A slot value that is not a string, an in-range number or a boolean (null, an array, an
    /// object, a number beyond ±(2^53 − 1)).
    InvalidSlotValue,
    /// A string slot value longer than [`MAX_SLOT_VALUE_CHARS`] characters.
    SlotValueTooLong,
    /// The schema refused the answer for a reason not listed above.
    SchemaViolation,
}

impl Rejection {
    /// Every reason, in a stable order (the metric's label values).
    pub const ALL: [Rejection; 18] = [
        Self::ResponseTooLarge,
        Self::MalformedResponse,
        Self::RequestRefused,
        Self::AnswerTooLarge,
        Self::MalformedJson,
        Self::NumberOutOfRange,
        Self::DuplicateKey,
        Self::NotAnObject,
        Self::UnexpectedProperty,
        Self::MissingProperty,
        Self::UnknownIntent,
        Self::InvalidConfidence,
        Self::InvalidSlots,
        Self::TooManySlots,
        Self::InvalidSlotName,
        Self::InvalidSlotValue,
        Self::SlotValueTooLong,
        Self::SchemaViolation,
    ];

    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ResponseTooLarge => "response_too_large",
            Self::MalformedResponse => "malformed_response",
            Self::RequestRefused => "request_refused",
            Self::AnswerTooLarge => "answer_too_large",
            Self::MalformedJson => "malformed_json",
            Self::NumberOutOfRange => "number_out_of_range",
            Self::DuplicateKey => "duplicate_key",
            Self::NotAnObject => "not_an_object",
            Self::UnexpectedProperty => "unexpected_property",
            Self::MissingProperty => "missing_property",
            Self::UnknownIntent => "unknown_intent",
            Self::InvalidConfidence => "invalid_confidence",
            Self::InvalidSlots => "invalid_slots",
            Self::TooManySlots => "too_many_slots",
            Self::InvalidSlotName => "invalid_slot_name",
            Self::InvalidSlotValue => "invalid_slot_value",
            Self::SlotValueTooLong => "slot_value_too_long",
            Self::SchemaViolation => "schema_violation",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated, sanitized answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub intent: Intent,
    /// Finite, in [0, 1].
    pub confidence: f64,
    /// At most [`MAX_SLOTS`]; names match `^[a-z_]{1,64}$`; values are sanitized strings of at
    /// most [`MAX_SLOT_VALUE_CHARS`] characters, numbers within ±(2^53 − 1), or booleans.
    pub slots: Map<String, Value>,
}

/// The answer's JSON Schema (Draft 2020-12). Every object is closed with
/// `additionalProperties: false`; `slots` admits only names matching the pattern (through
/// `patternProperties`, and `propertyNames` says so explicitly).
pub fn answer_schema() -> Value {
    let intents: Vec<&str> = Intent::ALL.iter().map(|i| i.as_str()).collect();
    let slot_name = format!("^[a-z_]{{1,{MAX_SLOT_NAME_CHARS}}}$");
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://gatehouse.invalid/schemas/llm-answer.json",
        "title": "LLM intent classification answer",
        "type": "object",
        "additionalProperties": false,
        "required": ["intent", "confidence"],
        "properties": {
            "intent": { "type": "string", "enum": intents },
            "confidence": { "type": "number", "minimum": 0, "maximum": 1 },
            "slots": {
                "type": "object",
                "maxProperties": MAX_SLOTS,
                "propertyNames": { "type": "string", "pattern": slot_name },
                "patternProperties": {
                    slot_name.clone(): {
                        "anyOf": [
                            { "type": "string", "maxLength": MAX_SLOT_VALUE_CHARS },
                            {
                                "type": "number",
                                "minimum": -MAX_SLOT_NUMBER,
                                "maximum": MAX_SLOT_NUMBER
                            },
                            { "type": "boolean" }
                        ]
                    }
                },
                "additionalProperties": false
            }
        }
    })
}

static VALIDATOR: LazyLock<jsonschema::Validator> = LazyLock::new(|| {
    // A constant schema: a unit test compiles it, so this cannot fail at run time.
    jsonschema::draft202012::new(&answer_schema()).expect("the LLM answer schema compiles")
});

/// Parses, validates and sanitizes one LLM answer. Never panics; never returns anything the
/// schema forbids.
pub fn validate_answer(raw: &str) -> Result<Answer, Rejection> {
    if raw.len() > MAX_ANSWER_BYTES {
        return Err(Rejection::AnswerTooLarge);
    }
    // 1. Parse: exactly one JSON document, no duplicate keys.
    let value = parse_strict(raw)?;
    if !value.is_object() {
        return Err(Rejection::NotAnObject);
    }
    // 2. Schema.
    if let Some(error) = VALIDATOR.iter_errors(&value).next() {
        return Err(reason_for(&error, &value));
    }
    // 3. What the schema cannot say (and, defensively, what it already said).
    let Value::Object(object) = value else {
        return Err(Rejection::NotAnObject);
    };
    if object
        .keys()
        .any(|k| !matches!(k.as_str(), "intent" | "confidence" | "slots"))
    {
        return Err(Rejection::UnexpectedProperty);
    }
    let intent = object
        .get("intent")
        .and_then(Value::as_str)
        .and_then(Intent::parse)
        .ok_or(Rejection::UnknownIntent)?;
    let confidence = object
        .get("confidence")
        .and_then(Value::as_f64)
        .filter(|c| c.is_finite() && (0.0..=1.0).contains(c))
        .ok_or(Rejection::InvalidConfidence)?;
    let mut slots = Map::new();
    match object.get("slots") {
        None => {}
        Some(Value::Object(raw_slots)) => {
            if raw_slots.len() > MAX_SLOTS {
                return Err(Rejection::TooManySlots);
            }
            for (name, value) in raw_slots {
                if !is_slot_name(name) {
                    return Err(Rejection::InvalidSlotName);
                }
                // 4. Sanitize.
                let clean = match value {
                    Value::String(text) => {
                        let text = sanitize(text);
                        if text.chars().count() > MAX_SLOT_VALUE_CHARS {
                            return Err(Rejection::SlotValueTooLong);
                        }
                        Value::String(text)
                    }
                    Value::Number(n) => {
                        let in_range = n
                            .as_f64()
                            .is_some_and(|f| f.is_finite() && f.abs() <= MAX_SLOT_NUMBER);
                        if !in_range {
                            return Err(Rejection::InvalidSlotValue);
                        }
                        Value::Number(n.clone())
                    }
                    Value::Bool(b) => Value::Bool(*b),
                    Value::Null | Value::Array(_) | Value::Object(_) => {
                        return Err(Rejection::InvalidSlotValue);
                    }
                };
                slots.insert(name.clone(), clean);
            }
        }
        Some(_) => return Err(Rejection::InvalidSlots),
    }
    Ok(Answer {
        intent,
        // -0.0 becomes 0.0.
        confidence: confidence + 0.0,
        slots,
    })
}

/// Whether `name` matches `^[a-z_]{1,64}$`.
pub fn is_slot_name(name: &str) -> bool {
    (1..=MAX_SLOT_NAME_CHARS).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// Whether sanitizing removes `c` (or turns it into a space).
pub fn is_stripped(c: char) -> bool {
    c.is_control() || is_bidi_control(c) || matches!(c, '\u{2028}' | '\u{2029}')
}

/// The bidirectional formatting characters: ALM, LRM, RLM, LRE/RLE/PDF/LRO/RLO, LRI/RLI/FSI/PDI.
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// Strips control and bidi formatting characters (whitespace controls and line/paragraph
/// separators become a space), NFC-normalizes, trims.
pub fn sanitize(text: &str) -> String {
    let stripped: String = text
        .chars()
        .filter_map(|c| match c {
            '\t' | '\n' | '\r' | '\u{2028}' | '\u{2029}' => Some(' '),
            c if is_stripped(c) => None,
            c => Some(c),
        })
        .collect();
    let normalized: String = stripped.nfc().collect();
    normalized.trim().to_owned()
}

/// The rejection for the first schema error.
fn reason_for(error: &jsonschema::ValidationError<'_>, value: &Value) -> Rejection {
    let path = error.instance_path().as_str();
    let keyword = error.kind().keyword();
    let mut segments = path.split('/').skip(1);
    match (segments.next(), segments.next(), keyword) {
        (None, _, "additionalProperties") => Rejection::UnexpectedProperty,
        (None, _, "required") => Rejection::MissingProperty,
        (None, _, "type") => Rejection::NotAnObject,
        (Some("intent"), None, _) => Rejection::UnknownIntent,
        (Some("confidence"), None, _) => Rejection::InvalidConfidence,
        (Some("slots"), None, "maxProperties") => Rejection::TooManySlots,
        (Some("slots"), None, "propertyNames" | "additionalProperties" | "pattern") => {
            Rejection::InvalidSlotName
        }
        (Some("slots"), None, _) => Rejection::InvalidSlots,
        (Some("slots"), Some(_), "pattern") => Rejection::InvalidSlotName,
        (Some("slots"), Some(_), _) => match value.pointer(path) {
            Some(Value::String(_)) => Rejection::SlotValueTooLong,
            _ => Rejection::InvalidSlotValue,
        },
        _ => Rejection::SchemaViolation,
    }
}

const DUPLICATE_KEY: &str = "gatehouse: duplicate key";

/// Parses exactly one JSON document (surrounding whitespace allowed) into a `Value`, refusing
/// duplicate keys. serde_json's recursion limit (128) bounds nesting.
fn parse_strict(raw: &str) -> Result<Value, Rejection> {
    let mut de = serde_json::Deserializer::from_str(raw);
    let parsed = StrictValue::deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(StrictValue(value)) => Ok(value),
        Err(error) => {
            let message = error.to_string();
            Err(if message.starts_with(DUPLICATE_KEY) {
                Rejection::DuplicateKey
            } else if message.starts_with("number out of range") {
                Rejection::NumberOutOfRange
            } else {
                Rejection::MalformedJson
            })
        }
    }
}

/// A `serde_json::Value` whose deserialization refuses duplicate object keys.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(DUPLICATE_KEY));
            }
            let StrictValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = r#"{"intent":"product_question","confidence":0.92,"slots":{"size":"42","color":"blue","quantity":2,"gift":false}}"#;

    fn slots_with(n: usize) -> String {
        let names = [
            "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q",
            "r", "s", "t", "u", "v", "w", "x", "y", "z",
        ];
        let slots: Vec<String> = names[..n].iter().map(|k| format!("\"{k}\":1")).collect();
        format!(
            r#"{{"intent":"other","confidence":0.5,"slots":{{{}}}}}"#,
            slots.join(",")
        )
    }

    fn with_slot(value: &str) -> String {
        format!(r#"{{"intent":"other","confidence":0.5,"slots":{{"note":{value}}}}}"#)
    }

    #[test]
    fn the_schema_compiles_as_draft_2020_12() {
        assert!(jsonschema::draft202012::new(&answer_schema()).is_ok());
        assert!(validate_answer(r#"{"intent":"greeting","confidence":1}"#).is_ok());
    }

    #[test]
    fn every_object_in_the_schema_is_closed() {
        fn walk(v: &Value, closed: &mut usize) {
            if let Value::Object(o) = v {
                if o.get("type") == Some(&json!("object")) {
                    assert_eq!(o.get("additionalProperties"), Some(&json!(false)), "{v}");
                    *closed += 1;
                }
                o.values().for_each(|c| walk(c, closed));
            } else if let Value::Array(a) = v {
                a.iter().for_each(|c| walk(c, closed));
            }
        }
        let mut closed = 0;
        walk(&answer_schema(), &mut closed);
        assert_eq!(closed, 2, "the answer and its slots");
    }

    #[test]
    fn a_good_answer_is_accepted_with_its_slots() {
        let answer = validate_answer(GOOD).expect("accepted");
        assert_eq!(answer.intent, Intent::ProductQuestion);
        assert_eq!(answer.confidence, 0.92);
        assert_eq!(
            Value::Object(answer.slots),
            json!({"size":"42","color":"blue","quantity":2,"gift":false})
        );
    }

    #[test]
    fn every_whitelisted_intent_and_the_confidence_bounds_are_accepted() {
        for intent in Intent::ALL {
            for confidence in ["0", "1", "0.0", "1.0", "0.5", "-0.0", "1e-3"] {
                let raw = format!(
                    r#" {{"intent":"{}","confidence":{confidence}}}
"#,
                    intent.as_str()
                );
                let answer = validate_answer(&raw).expect("accepted");
                assert_eq!(answer.intent, intent);
                assert!(answer.confidence.is_sign_positive());
                assert!(answer.slots.is_empty());
            }
        }
        let twenty = validate_answer(&slots_with(20)).expect("20 slots are allowed");
        assert_eq!(twenty.slots.len(), 20);
        let long_name = "z".repeat(64);
        let raw = format!(r#"{{"intent":"other","confidence":0.1,"slots":{{"{long_name}":"x"}}}}"#);
        assert!(validate_answer(&raw).is_ok(), "a 64-character name");
        let value = format!("\"{}\"", "é".repeat(500));
        assert!(
            validate_answer(&with_slot(&value)).is_ok(),
            "500 characters, 1000 bytes"
        );
        for number in ["9007199254740991", "-9007199254740991", "1.5e3", "-0.25"] {
            assert!(validate_answer(&with_slot(number)).is_ok(), "{number}");
        }
    }

    #[test]
    fn hostile_answers_are_rejected_with_their_reason() {
        use Rejection::*;
        let a_mib = format!(
            r#"{{"intent":"other","confidence":0.5,"slots":{{"note":"{}"}}}}"#,
            "A".repeat(1 << 20)
        );
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let deep_object = format!(
            r#"{{"intent":"other","confidence":0.5,"slots":{{"x":{}1{}}}}}"#,
            r#"{"a":"#.repeat(50),
            "}".repeat(50)
        );
        let long_name = format!(
            r#"{{"intent":"other","confidence":0.5,"slots":{{"{}":1}}}}"#,
            "a".repeat(65)
        );
        let too_long = with_slot(&format!("\"{}\"", "x".repeat(501)));
        let cases: Vec<(&str, String, Rejection)> = vec![
            ("empty", String::new(), MalformedJson),
            ("whitespace", "  \n ".into(), MalformedJson),
            (
                "truncated",
                r#"{"intent":"greeting","confidence":0.9"#.into(),
                MalformedJson,
            ),
            (
                "single quotes",
                "{'intent':'greeting','confidence':0.9}".into(),
                MalformedJson,
            ),
            (
                "trailing comma",
                r#"{"intent":"greeting","confidence":0.9,}"#.into(),
                MalformedJson,
            ),
            (
                "comment",
                r#"{"intent":"greeting","confidence":0.9} // sure"#.into(),
                MalformedJson,
            ),
            (
                "two documents",
                r#"{"intent":"greeting","confidence":0.9}{}"#.into(),
                MalformedJson,
            ),
            (
                "json in prose",
                r#"Sure! Here is the answer: {"intent":"greeting","confidence":0.9}"#.into(),
                MalformedJson,
            ),
            (
                "json in a code fence",
                "```json\n{\"intent\":\"greeting\",\"confidence\":0.9}\n```".into(),
                MalformedJson,
            ),
            (
                "byte order mark",
                "\u{feff}{\"intent\":\"greeting\",\"confidence\":0.9}".into(),
                MalformedJson,
            ),
            (
                "NaN confidence",
                r#"{"intent":"greeting","confidence":NaN}"#.into(),
                MalformedJson,
            ),
            (
                "Infinity confidence",
                r#"{"intent":"greeting","confidence":Infinity}"#.into(),
                MalformedJson,
            ),
            (
                "lone surrogate",
                r#"{"intent":"other","confidence":0.5,"slots":{"x":"\ud800"}}"#.into(),
                MalformedJson,
            ),
            ("deep nesting", deep, MalformedJson),
            (
                "huge number",
                r#"{"intent":"greeting","confidence":1e400}"#.into(),
                NumberOutOfRange,
            ),
            ("huge slot number", with_slot("-1e400"), NumberOutOfRange),
            (
                "duplicate intent",
                r#"{"intent":"greeting","intent":"complaint","confidence":0.9}"#.into(),
                DuplicateKey,
            ),
            (
                "duplicate slot",
                r#"{"intent":"other","confidence":0.5,"slots":{"a":1,"a":2}}"#.into(),
                DuplicateKey,
            ),
            ("null", "null".into(), NotAnObject),
            (
                "array",
                r#"[{"intent":"greeting","confidence":0.9}]"#.into(),
                NotAnObject,
            ),
            ("string", r#""greeting""#.into(), NotAnObject),
            ("number", "0.9".into(), NotAnObject),
            ("boolean", "true".into(), NotAnObject),
            (
                "extra property",
                r#"{"intent":"greeting","confidence":0.9,"reply":"ok"}"#.into(),
                UnexpectedProperty,
            ),
            (
                "__proto__",
                r#"{"intent":"greeting","confidence":0.9,"__proto__":{}}"#.into(),
                UnexpectedProperty,
            ),
            (
                "missing confidence",
                r#"{"intent":"greeting"}"#.into(),
                MissingProperty,
            ),
            (
                "missing intent",
                r#"{"confidence":0.9}"#.into(),
                MissingProperty,
            ),
            ("empty object", "{}".into(), MissingProperty),
            (
                "intent outside the whitelist",
                r#"{"intent":"refund_everything","confidence":0.9}"#.into(),
                UnknownIntent,
            ),
            (
                "intent in capitals",
                r#"{"intent":"Greeting","confidence":0.9}"#.into(),
                UnknownIntent,
            ),
            (
                "intent padded",
                r#"{"intent":" greeting","confidence":0.9}"#.into(),
                UnknownIntent,
            ),
            (
                "intent null",
                r#"{"intent":null,"confidence":0.9}"#.into(),
                UnknownIntent,
            ),
            (
                "intent array",
                r#"{"intent":["greeting"],"confidence":0.9}"#.into(),
                UnknownIntent,
            ),
            (
                "confidence 7",
                r#"{"intent":"greeting","confidence":7}"#.into(),
                InvalidConfidence,
            ),
            (
                "confidence -1",
                r#"{"intent":"greeting","confidence":-1}"#.into(),
                InvalidConfidence,
            ),
            (
                "confidence just above 1",
                r#"{"intent":"greeting","confidence":1.0000001}"#.into(),
                InvalidConfidence,
            ),
            (
                "confidence as a string",
                r#"{"intent":"greeting","confidence":"0.9"}"#.into(),
                InvalidConfidence,
            ),
            (
                "confidence null",
                r#"{"intent":"greeting","confidence":null}"#.into(),
                InvalidConfidence,
            ),
            (
                "confidence true",
                r#"{"intent":"greeting","confidence":true}"#.into(),
                InvalidConfidence,
            ),
            (
                "slots an array",
                r#"{"intent":"other","confidence":0.5,"slots":["a"]}"#.into(),
                InvalidSlots,
            ),
            (
                "slots null",
                r#"{"intent":"other","confidence":0.5,"slots":null}"#.into(),
                InvalidSlots,
            ),
            ("21 slots", slots_with(21), TooManySlots),
            (
                "slot name Bad-Key",
                r#"{"intent":"other","confidence":0.5,"slots":{"Bad-Key":"x"}}"#.into(),
                InvalidSlotName,
            ),
            (
                "empty slot name",
                r#"{"intent":"other","confidence":0.5,"slots":{"":"x"}}"#.into(),
                InvalidSlotName,
            ),
            (
                "slot name with a newline",
                r#"{"intent":"other","confidence":0.5,"slots":{"size\n":"x"}}"#.into(),
                InvalidSlotName,
            ),
            (
                "slot name with a digit",
                r#"{"intent":"other","confidence":0.5,"slots":{"size2":"x"}}"#.into(),
                InvalidSlotName,
            ),
            (
                "slot name in another script",
                r#"{"intent":"other","confidence":0.5,"slots":{"ѕize":"x"}}"#.into(),
                InvalidSlotName,
            ),
            ("65-character slot name", long_name, InvalidSlotName),
            ("501-character value", too_long, SlotValueTooLong),
            ("null slot value", with_slot("null"), InvalidSlotValue),
            (
                "array slot value",
                with_slot(r#"["a","b"]"#),
                InvalidSlotValue,
            ),
            ("empty array slot value", with_slot("[]"), InvalidSlotValue),
            (
                "nested object slot value",
                with_slot(r#"{"evil":"x"}"#),
                InvalidSlotValue,
            ),
            ("deeply nested slot value", deep_object, InvalidSlotValue),
            (
                "number past 2^53",
                with_slot("9007199254740993"),
                InvalidSlotValue,
            ),
            (
                "large integer",
                with_slot("100000000000000000000000"),
                InvalidSlotValue,
            ),
            ("large double", with_slot("1e300"), InvalidSlotValue),
            ("a MiB answer", a_mib, AnswerTooLarge),
        ];
        for (name, raw, want) in cases {
            assert_eq!(validate_answer(&raw), Err(want), "{name}");
        }
    }

    #[test]
    fn control_and_bidi_characters_are_stripped_and_text_is_nfc_normalized() {
        let raw = with_slot(
            r#"" \u0000cafe\u0301\u0007\u001b[31m \u202Egnp.exe\u202C\u2066x\u2069\u200F\t\r\nline\u2028two\u0085 ""#,
        );
        let answer = validate_answer(&raw).expect("accepted after sanitizing");
        let note = answer.slots["note"].as_str().expect("a string");
        assert_eq!(note, "caf\u{e9}[31m gnp.exex   line two");
        assert!(unicode_normalization::is_nfc(note));
        assert!(!note.chars().any(is_stripped));
    }

    #[test]
    fn a_value_that_nfc_lengthens_past_500_characters_is_rejected() {
        // U+FB2C composes to three code points under NFC (a composition exclusion).
        let raw = with_slot(&format!("\"{}\"", "\u{FB2C}".repeat(200)));
        assert_eq!(validate_answer(&raw), Err(Rejection::SlotValueTooLong));
        let raw = with_slot(&format!("\"{}\"", "\u{FB2C}".repeat(166)));
        assert!(validate_answer(&raw).is_ok());
    }

    #[test]
    fn a_value_that_is_only_control_characters_becomes_empty() {
        let answer = validate_answer(&with_slot(r#""\u0000\u202E\u0001""#)).expect("accepted");
        assert_eq!(answer.slots["note"], json!(""));
    }

    #[test]
    fn rejection_names_are_unique_snake_case() {
        let mut seen = HashSet::new();
        for r in Rejection::ALL {
            let name = r.as_str();
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
            assert!(seen.insert(name), "{name} twice");
            assert_eq!(r.to_string(), name);
        }
    }

    // ---- property tests -------------------------------------------------------------

    /// The contract, written independently of the schema: what an accepted answer must
    /// have looked like before sanitizing.
    fn conforms(raw: &Value) -> bool {
        let Value::Object(o) = raw else { return false };
        let keys_ok = o
            .keys()
            .all(|k| matches!(k.as_str(), "intent" | "confidence" | "slots"));
        let intent_ok = o
            .get("intent")
            .and_then(Value::as_str)
            .is_some_and(|i| Intent::parse(i).is_some());
        let confidence_ok = o
            .get("confidence")
            .and_then(Value::as_f64)
            .is_some_and(|c| (0.0..=1.0).contains(&c));
        let slots_ok = match o.get("slots") {
            None => true,
            Some(Value::Object(s)) => {
                s.len() <= MAX_SLOTS
                    && s.iter().all(|(k, v)| {
                        is_slot_name(k)
                            && match v {
                                Value::String(t) => t.chars().count() <= MAX_SLOT_VALUE_CHARS,
                                Value::Number(n) => {
                                    n.as_f64().is_some_and(|f| f.abs() <= MAX_SLOT_NUMBER)
                                }
                                Value::Bool(_) => true,
                                _ => false,
                            }
                    })
            }
            Some(_) => false,
        };
        keys_ok && intent_ok && confidence_ok && slots_ok
    }

    /// What every accepted answer must look like after sanitizing.
    fn well_formed(answer: &Answer) -> bool {
        answer.confidence.is_finite()
            && (0.0..=1.0).contains(&answer.confidence)
            && answer.slots.len() <= MAX_SLOTS
            && answer.slots.iter().all(|(k, v)| {
                is_slot_name(k)
                    && match v {
                        Value::String(t) => {
                            t.chars().count() <= MAX_SLOT_VALUE_CHARS
                                && !t.chars().any(is_stripped)
                                && unicode_normalization::is_nfc(t)
                                && t.trim() == t
                        }
                        Value::Number(n) => n
                            .as_f64()
                            .is_some_and(|f| f.is_finite() && f.abs() <= MAX_SLOT_NUMBER),
                        Value::Bool(_) => true,
                        _ => false,
                    }
            })
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
            (0.0f64..=1.0).prop_map(|f| json!(f)),
            prop_oneof![Just(-0.5f64), Just(1.5), Just(7.0), Just(-1.0)].prop_map(|f| json!(f)),
            ".{0,40}".prop_map(Value::String),
            "[a-z_]{1,8}".prop_map(Value::String),
            proptest::sample::select(Intent::ALL.map(|i| i.as_str()).to_vec())
                .prop_map(|s| json!(s)),
            (0usize..520).prop_map(|n| json!("x".repeat(n))),
            "[\\u{0}-\\u{1f}\\u{202a}-\\u{202e}\\u{2066}-\\u{2069} a\\u{301}e]{0,20}"
                .prop_map(Value::String),
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => proptest::sample::select(vec!["intent", "confidence", "slots"]).prop_map(str::to_owned),
            2 => "[a-z_]{1,10}",
            1 => ".{0,8}",
            1 => "[a-z_]{60,70}",
        ]
    }

    fn any_json() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(4, 64, 24, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(key(), inner, 0..24)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn slot_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => ".{0,40}".prop_map(Value::String),
            2 => "[\\u{0}-\\u{1f}\\u{7f}-\\u{9f}\\u{202a}-\\u{202e}\\u{2066}-\\u{2069}\\u{2028} a\\u{301}e]{0,20}"
                .prop_map(Value::String),
            1 => (495usize..506).prop_map(|n| json!("x".repeat(n))),
            1 => (160usize..172).prop_map(|n| json!("\u{FB2C}".repeat(n))),
            2 => (-MAX_SLOT_NUMBER as i64..=MAX_SLOT_NUMBER as i64).prop_map(|n| json!(n)),
            1 => any::<i64>().prop_map(|n| json!(n)),
            1 => any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
            2 => any::<bool>().prop_map(Value::Bool),
            1 => leaf(),
        ]
    }

    /// Mostly-valid answers, so acceptance is common and the boundaries are exercised.
    fn near_answer() -> impl Strategy<Value = Value> {
        let intent = prop_oneof![
            8 => proptest::sample::select(Intent::ALL.map(|i| i.as_str()).to_vec()).prop_map(|s| json!(s)),
            1 => leaf(),
        ];
        let confidence = prop_oneof![
            8 => (0.0f64..=1.0).prop_map(|f| json!(f)),
            1 => prop_oneof![Just(json!(0)), Just(json!(1)), Just(json!(-0.0))],
            1 => leaf(),
        ];
        let slot_key = prop_oneof![
            8 => "[a-z_]{1,12}",
            1 => "[a-z_]{60,66}",
            1 => key(),
        ];
        let slots = prop_oneof![
            8 => proptest::collection::btree_map(slot_key, slot_value(), 0..23)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            1 => leaf(),
        ];
        (
            intent,
            confidence,
            proptest::option::weighted(0.8, slots),
            proptest::option::weighted(0.1, (key(), leaf())),
        )
            .prop_map(|(intent, confidence, slots, extra)| {
                let mut o = Map::new();
                o.insert("intent".into(), intent);
                o.insert("confidence".into(), confidence);
                if let Some(slots) = slots {
                    o.insert("slots".into(), slots);
                }
                if let Some((k, v)) = extra {
                    o.insert(k, v);
                }
                Value::Object(o)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn the_validator_never_panics_on_arbitrary_text(raw in ".{0,300}") {
            let _ = validate_answer(&raw);
        }

        #[test]
        fn the_validator_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = validate_answer(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn an_accepted_value_conforms_and_a_conforming_value_is_accepted(value in prop_oneof![any_json(), near_answer()]) {
            let raw = value.to_string();
            let verdict = validate_answer(&raw);
            match &verdict {
                Ok(answer) => {
                    prop_assert!(conforms(&value), "accepted what the contract forbids: {raw}");
                    prop_assert!(well_formed(answer), "unsanitized output for {raw}: {answer:?}");
                    let schema_ok = VALIDATOR.is_valid(&value);
                    prop_assert!(schema_ok, "accepted what the schema forbids: {raw}");
                }
                Err(Rejection::SlotValueTooLong) => {} // may be NFC growth of a conforming value
                Err(reason) => prop_assert!(!conforms(&value), "rejected a conforming answer ({reason}): {raw}"),
            }
        }

        #[test]
        fn answers_wrapped_in_text_are_rejected(prefix in "[^ \\t\\n\\r]{1,10}", value in near_answer()) {
            let raw = format!("{prefix}{value}");
            prop_assert!(validate_answer(&raw).is_err());
        }
    }
}
