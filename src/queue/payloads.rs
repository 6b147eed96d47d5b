//! Job payloads checked against the committed JSON Schemas of `gatehouse-jobs`, each compiled
//! once (Draft 2020-12, formats enforced). Errors name the failing field, never its value.

use std::collections::HashMap;

use serde_json::Value;

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("unknown queue {0:?}")]
    UnknownQueue(String),
    /// `field` is a JSON pointer (`/tenant_id`), or empty for the payload as a whole.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

/// A committed schema failed to compile (a build defect, caught by tests).
#[derive(Debug, thiserror::Error)]
#[error("the schema of queue {queue} does not compile: {message}")]
pub struct SchemaError {
    pub queue: &'static str,
    pub message: String,
}

/// One compiled validator per queue.
pub struct PayloadValidators {
    by_queue: HashMap<&'static str, jsonschema::Validator>,
}

impl PayloadValidators {
    /// Compiles every queue's committed schema.
    pub fn new() -> Result<Self, SchemaError> {
        let mut by_queue = HashMap::new();
        for queue in gatehouse_jobs::QUEUES {
            let text = gatehouse_jobs::committed_schema(queue).ok_or_else(|| SchemaError {
                queue,
                message: "no committed schema".into(),
            })?;
            let schema: Value = serde_json::from_str(text).map_err(|e| SchemaError {
                queue,
                message: e.to_string(),
            })?;
            let validator = jsonschema::draft202012::options()
                .should_validate_formats(true)
                .build(&schema)
                .map_err(|e| SchemaError {
                    queue,
                    message: e.to_string(),
                })?;
            by_queue.insert(queue, validator);
        }
        Ok(Self { by_queue })
    }

    /// Validates a payload for `queue`; the first failing field is reported.
    pub fn validate(&self, queue: &str, payload: &Value) -> Result<(), PayloadError> {
        let validator = self
            .by_queue
            .get(queue)
            .ok_or_else(|| PayloadError::UnknownQueue(queue.to_owned()))?;
        match validator.iter_errors(payload).next() {
            None => Ok(()),
            Some(error) => Err(PayloadError::Invalid {
                field: error.instance_path().to_string(),
                message: error.masked().to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn validators() -> PayloadValidators {
        PayloadValidators::new().expect("committed schemas compile")
    }

    fn inbound() -> Value {
        json!({
            "tenant_id": "7b0c5c5e-3f0a-4c5e-9a64-2f1f6f0b9d11",
            "message_sid": "SM0123456789abcdef0123456789abcdef",
            "from": "+14155550100",
            "to": "+14155550199",
            "body": "hello",
            "received_at": "2026-11-28T10:00:00Z"
        })
    }

    #[test]
    fn every_committed_schema_compiles_and_accepts_a_real_payload() {
        let v = validators();
        assert_eq!(v.validate("inbound_message", &inbound()), Ok(()));
        let sync = json!({"tenant_id": "7b0c5c5e-3f0a-4c5e-9a64-2f1f6f0b9d11",
                          "requested_by": "7b0c5c5e-3f0a-4c5e-9a64-2f1f6f0b9d12", "mode": "full"});
        assert_eq!(v.validate("sync_catalog", &sync), Ok(()));
        let rotate = json!({"rotation_id": "7b0c5c5e-3f0a-4c5e-9a64-2f1f6f0b9d11"});
        assert_eq!(v.validate("rotate_keys", &rotate), Ok(()));
    }

    #[test]
    fn a_bad_field_is_named_without_its_value() {
        let v = validators();
        let mut bad = inbound();
        bad["tenant_id"] = json!("not-a-uuid-secret-ish");
        match v.validate("inbound_message", &bad) {
            Err(PayloadError::Invalid { field, message }) => {
                assert_eq!(field, "/tenant_id");
                assert!(!message.contains("secret-ish"), "{message}");
            }
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn extra_missing_and_oversized_fields_are_refused() {
        let v = validators();
        let mut extra = inbound();
        extra["admin"] = json!(true);
        assert!(v.validate("inbound_message", &extra).is_err());
        let mut missing = inbound();
        missing.as_object_mut().expect("object").remove("from");
        assert!(v.validate("inbound_message", &missing).is_err());
        let mut long = inbound();
        long["body"] = json!("x".repeat(1601));
        assert!(matches!(
            v.validate("inbound_message", &long),
            Err(PayloadError::Invalid { field, .. }) if field == "/body"
        ));
        let mode = json!({"tenant_id": "7b0c5c5e-3f0a-4c5e-9a64-2f1f6f0b9d11",
                          "requested_by": "7b0c5c5e-3f0a-4c5e-9a64-2f1f6f0b9d12", "mode": "everything"});
        assert!(v.validate("sync_catalog", &mode).is_err());
        assert_eq!(
            v.validate("nope", &json!({})),
            Err(PayloadError::UnknownQueue("nope".into()))
        );
    }

    #[test]
    fn what_the_webhook_enqueues_satisfies_the_schema() {
        let job = gatehouse_jobs::InboundMessage {
            tenant_id: uuid::Uuid::new_v4(),
            message_sid: "SM0123456789abcdef0123456789abcdef".into(),
            from: "whatsapp:+14155550100".into(),
            to: String::new(),
            body: String::new(),
            received_at: "2026-11-28T10:00:00.123456789Z".into(),
        };
        let value = serde_json::to_value(&job).expect("serializes");
        assert_eq!(validators().validate("inbound_message", &value), Ok(()));
    }
}
