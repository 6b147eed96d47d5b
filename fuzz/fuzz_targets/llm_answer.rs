//! Fuzzes the LLM answer pipeline (parse → schema → checks → sanitize) with arbitrary text: it
//! must never panic, and whatever it accepts must satisfy the contract (SPEC "Jobs").
#![no_main]

// The pipeline is compiled in directly, with the intent whitelist it names, so fuzzing does
// not build sqlx, axum or apalis.
#[path = "../../src/classify.rs"]
#[allow(dead_code)]
mod classify;
// classify.rs names `crate::fault` and `crate::circuit` (a classifier error's fault class, a
// remote classifier's circuit breaker); the pipeline uses neither, so they are stand-ins here.
#[allow(dead_code)]
mod fault {
    pub enum Dependency {
        Llm,
    }
    pub enum Fault {
        Outage(Dependency),
        Retry,
        Permanent,
    }
}
#[allow(dead_code)]
mod circuit {
    pub struct Circuit;
}
#[path = "../../src/llm/validate.rs"]
#[allow(dead_code)]
mod validate;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(answer) = validate::validate_answer(&text) else {
        return;
    };
    // Accepted: the raw text was one JSON object of exactly the allowed shape…
    let raw: Value = serde_json::from_str(&text).expect("accepted text is JSON");
    let object = raw.as_object().expect("accepted text is an object");
    assert!(object
        .keys()
        .all(|k| matches!(k.as_str(), "intent" | "confidence" | "slots")));
    assert_eq!(
        object.get("intent").and_then(Value::as_str),
        Some(answer.intent.as_str())
    );
    // …and the answer is bounded and sanitized.
    assert!(answer.confidence.is_finite() && (0.0..=1.0).contains(&answer.confidence));
    assert!(answer.slots.len() <= validate::MAX_SLOTS);
    for (name, value) in &answer.slots {
        assert!(validate::is_slot_name(name), "{name:?}");
        match value {
            Value::String(s) => {
                assert!(s.chars().count() <= validate::MAX_SLOT_VALUE_CHARS);
                assert!(!s.chars().any(validate::is_stripped), "{s:?}");
                assert!(unicode_normalization::is_nfc(s), "{s:?}");
                assert_eq!(s.trim(), s);
            }
            Value::Number(n) => {
                let f = n.as_f64().expect("a number");
                assert!(f.is_finite() && f.abs() <= validate::MAX_SLOT_NUMBER);
            }
            Value::Bool(_) => {}
            other => panic!("accepted slot value {other:?}"),
        }
    }
});
