//! The per-queue table: each queue's facts in one row — its name, what it does, its payload
//! schema, its default retry policy and the names of the variables that override it.
//!
//! Data only, so every floor can read it: the configuration reads the retry variables by
//! looping over [`QUEUE_SPECS`], the enqueue client records a job's attempt budget from it,
//! and the worker registers one worker per row. A new queue is a new payload type and a new
//! row here (plus its handler).

use schemars::JsonSchema;

use crate::{InboundMessage, Job, RotateKeys, SyncCatalog};

/// A queue's default retry policy: exponential backoff with full jitter, the wait after
/// failed attempt `n` drawn from `0..=min(cap, base·2^(n-1))`, dead-lettered after
/// `max_attempts` runs (the first included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryDefaults {
    pub base_ms: u64,
    pub cap_ms: u64,
    pub max_attempts: u32,
}

/// The variables that override a queue's [`RetryDefaults`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryVariables {
    /// `JOB_RETRY_BASE_MS_{QUEUE}`.
    pub base_ms: &'static str,
    /// `JOB_RETRY_CAP_MS_{QUEUE}`.
    pub cap_ms: &'static str,
    /// `JOB_MAX_ATTEMPTS_{QUEUE}`.
    pub max_attempts: &'static str,
}

/// One queue's facts.
#[derive(Debug, Clone, Copy)]
pub struct QueueSpec {
    /// The stable queue name (`Job::QUEUE`).
    pub name: &'static str,
    /// What a job of this queue does.
    pub about: &'static str,
    /// The payload's JSON Schema (Draft 2020-12), generated from its type.
    pub schema: fn() -> serde_json::Value,
    /// The committed schema file's text (`jobs/schemas/{queue}.json`).
    pub committed_schema: &'static str,
    /// The payload fields that identify a customer, sealed in Redis ([`crate::sealed`]).
    pub sealed: &'static [&'static str],
    /// The committed schema of the payload as it rests in Redis
    /// (`jobs/schemas/at-rest/{queue}.json`, [`at_rest_schema`]).
    pub committed_at_rest_schema: &'static str,
    /// The default retry policy.
    pub retry: RetryDefaults,
    /// The variables that override it.
    pub variables: RetryVariables,
    /// `QUEUE_SHARDS_{QUEUE}`: how many shards the queue is split into (default 1).
    pub shards_variable: &'static str,
    /// `TENANT_MAX_IN_FLIGHT_{QUEUE}`: the most jobs of one tenant in flight at once, across
    /// every worker (default: no cap).
    pub max_in_flight_variable: &'static str,
}

fn schema_of<J: JsonSchema>() -> serde_json::Value {
    schemars::schema_for!(J).to_value()
}

/// Every queue gatehouse runs, in a stable order.
pub const QUEUE_SPECS: [QueueSpec; 3] = [
    QueueSpec {
        name: InboundMessage::QUEUE,
        about: "classify and store an inbound SMS/WhatsApp message a tenant's webhook received",
        schema: schema_of::<InboundMessage>,
        committed_schema: include_str!("../schemas/inbound_message.json"),
        sealed: &["from", "to", "body"],
        committed_at_rest_schema: include_str!("../schemas/at-rest/inbound_message.json"),
        retry: RetryDefaults {
            base_ms: 5_000,
            cap_ms: 600_000,
            max_attempts: 4,
        },
        variables: RetryVariables {
            base_ms: "JOB_RETRY_BASE_MS_INBOUND_MESSAGE",
            cap_ms: "JOB_RETRY_CAP_MS_INBOUND_MESSAGE",
            max_attempts: "JOB_MAX_ATTEMPTS_INBOUND_MESSAGE",
        },
        shards_variable: "QUEUE_SHARDS_INBOUND_MESSAGE",
        max_in_flight_variable: "TENANT_MAX_IN_FLIGHT_INBOUND_MESSAGE",
    },
    QueueSpec {
        name: SyncCatalog::QUEUE,
        about: "synchronize a tenant's product catalog from its online store",
        schema: schema_of::<SyncCatalog>,
        committed_schema: include_str!("../schemas/sync_catalog.json"),
        sealed: &[],
        committed_at_rest_schema: include_str!("../schemas/at-rest/sync_catalog.json"),
        retry: RetryDefaults {
            base_ms: 60_000,
            cap_ms: 3_600_000,
            max_attempts: 4,
        },
        variables: RetryVariables {
            base_ms: "JOB_RETRY_BASE_MS_SYNC_CATALOG",
            cap_ms: "JOB_RETRY_CAP_MS_SYNC_CATALOG",
            max_attempts: "JOB_MAX_ATTEMPTS_SYNC_CATALOG",
        },
        shards_variable: "QUEUE_SHARDS_SYNC_CATALOG",
        max_in_flight_variable: "TENANT_MAX_IN_FLIGHT_SYNC_CATALOG",
    },
    QueueSpec {
        name: RotateKeys::QUEUE,
        about: "re-encrypt every sealed value under the current key, for an approved rotation",
        schema: schema_of::<RotateKeys>,
        committed_schema: include_str!("../schemas/rotate_keys.json"),
        sealed: &[],
        committed_at_rest_schema: include_str!("../schemas/at-rest/rotate_keys.json"),
        retry: RetryDefaults {
            base_ms: 30_000,
            cap_ms: 1_800_000,
            max_attempts: 4,
        },
        variables: RetryVariables {
            base_ms: "JOB_RETRY_BASE_MS_ROTATE_KEYS",
            cap_ms: "JOB_RETRY_CAP_MS_ROTATE_KEYS",
            max_attempts: "JOB_MAX_ATTEMPTS_ROTATE_KEYS",
        },
        shards_variable: "QUEUE_SHARDS_ROTATE_KEYS",
        max_in_flight_variable: "TENANT_MAX_IN_FLIGHT_ROTATE_KEYS",
    },
];

/// The schema of a queue's payload as it rests in Redis: the producer's schema with the sealed
/// fields replaced by the one `sealed` property that carries them (identical for a queue that
/// seals nothing). `x-gatehouse-sealed` on that property names the AAD, the sealed fields and
/// the schema of the sealed plaintext (the whole payload).
pub fn at_rest_schema(spec: &QueueSpec) -> serde_json::Value {
    use serde_json::{Value, json};
    let mut schema = (spec.schema)();
    if spec.sealed.is_empty() {
        return schema;
    }
    // The sealed plaintext is the whole payload as the producer wrote it.
    let plaintext = {
        let mut plain = schema.clone();
        if let Value::Object(map) = &mut plain {
            for meta in ["$schema", "title", "description"] {
                map.remove(meta);
            }
            if let Some(Value::Object(properties)) = map.get_mut("properties") {
                for property in properties.values_mut() {
                    if let Value::Object(p) = property {
                        p.remove("x-gatehouse-sealed");
                    }
                }
            }
        }
        plain
    };
    if let Some(Value::Object(properties)) = schema.get_mut("properties") {
        for field in spec.sealed {
            properties.remove(*field);
        }
    }
    if let Some(Value::Array(required)) = schema.get_mut("required") {
        required.retain(|name| !name.as_str().is_some_and(|n| spec.sealed.contains(&n)));
        required.push(json!(crate::sealed::SEALED));
    }
    let fields = spec
        .sealed
        .iter()
        .map(|f| format!("`{f}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let aad = format!("job.{}:{{job_id}}", spec.name);
    let sealed = json!({
        "description": format!(
            "The customer data of the job ({fields}), sealed: standard base64 of an envelope \
             (0x01 ‖ key id, 8 bytes ‖ nonce, 12 bytes ‖ AES-256-GCM ciphertext ‖ tag, 16 bytes; \
             SPEC \"Encryption at rest\") whose plaintext is the whole payload as the producer \
             wrote it (`x-gatehouse-sealed.plaintext`), with the AAD `{aad}`. The fields left \
             in the open must equal their sealed copies. Only the job's handler opens it."
        ),
        "type": "string",
        "contentEncoding": "base64",
        "pattern": "^[A-Za-z0-9+/]*={0,2}$",
        // The base64 of the smallest envelope of `{}`: 39 bytes.
        "minLength": 52,
        "x-gatehouse-sealed": {
            "aad": aad,
            "fields": spec.sealed,
            "plaintext": plaintext,
        },
    });
    if let Some(Value::Object(properties)) = schema.get_mut("properties") {
        properties.insert(crate::sealed::SEALED.to_owned(), sealed);
    }
    if let Some(Value::String(title)) = schema.get_mut("title") {
        title.push_str(" (at rest in Redis)");
    }
    schema
}

/// The attempt budget recorded with a job of a queue the table does not know.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;

/// The row of `queue`, if it is one of gatehouse's.
pub fn spec(queue: &str) -> Option<&'static QueueSpec> {
    QUEUE_SPECS.iter().find(|spec| spec.name == queue)
}

/// The default attempt budget of `queue`, recorded with each of its jobs when enqueued (the
/// workers' `JOB_MAX_ATTEMPTS_{QUEUE}` is what decides when a failing job is dead-lettered).
pub fn default_max_attempts(queue: &str) -> u32 {
    spec(queue).map_or(DEFAULT_MAX_ATTEMPTS, |s| s.retry.max_attempts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_names_its_own_variables() {
        for spec in QUEUE_SPECS {
            let upper = spec.name.to_ascii_uppercase();
            assert_eq!(spec.variables.base_ms, format!("JOB_RETRY_BASE_MS_{upper}"));
            assert_eq!(spec.variables.cap_ms, format!("JOB_RETRY_CAP_MS_{upper}"));
            assert_eq!(
                spec.variables.max_attempts,
                format!("JOB_MAX_ATTEMPTS_{upper}")
            );
            assert_eq!(spec.shards_variable, format!("QUEUE_SHARDS_{upper}"));
            assert_eq!(
                spec.max_in_flight_variable,
                format!("TENANT_MAX_IN_FLIGHT_{upper}")
            );
            assert!(spec.retry.base_ms <= spec.retry.cap_ms, "{}", spec.name);
        }
    }

    #[test]
    fn names_are_unique_and_found() {
        for spec in QUEUE_SPECS {
            assert_eq!(super::spec(spec.name).map(|s| s.name), Some(spec.name));
        }
        assert!(super::spec("nope").is_none());
        assert_eq!(default_max_attempts("nope"), DEFAULT_MAX_ATTEMPTS);
    }
}
