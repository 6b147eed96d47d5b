//! The wire contract of gatehouse jobs: payload types, queue names, JSON Schemas, the
//! per-queue table (`spec`), the Redis key layout (`keys`), the envelope that seals customer
//! data (`envelope`, `sealed`) and the enqueue client that producer services link against.
//!
//! Payloads carry ids and the facts a job needs, never derived state. Fields are only ever
//! added as optional; a breaking change is a new job name. Queue names are constants here,
//! never Rust type names (apalis-redis otherwise keys queues by `type_name`, which is not
//! stable across refactors).
//!
//! ```
//! use gatehouse_jobs::{Job, SyncCatalog, SyncMode};
//! let job = SyncCatalog {
//!     tenant_id: uuid::Uuid::nil(),
//!     requested_by: uuid::Uuid::nil(),
//!     mode: SyncMode::Full,
//! };
//! assert_eq!(SyncCatalog::QUEUE, "sync_catalog");
//! assert!(serde_json::to_value(&job).is_ok());
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

#[cfg(feature = "redis")]
pub mod client;
pub mod envelope;
pub mod keys;
pub mod sealed;
pub mod spec;

/// A job type: its payload, its queue and its schema.
pub trait Job: Serialize + DeserializeOwned + JsonSchema + Send + Sync + 'static {
    /// The queue's stable name; the queue's other facts are its row in [`spec::QUEUE_SPECS`].
    const QUEUE: &'static str;
    /// The tenant the job belongs to, which picks its queue shard (`keys::shard_of`): one
    /// tenant's jobs stay on one shard, in order. `None` (jobs of no tenant): shard 0.
    fn tenant(&self) -> Option<Uuid> {
        None
    }
}

/// An inbound SMS/WhatsApp message that Twilio delivered to a tenant's webhook. `from`, `to`
/// and `body` identify a customer: they are sealed in Redis (the `sealed` module).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct InboundMessage {
    /// The tenant whose webhook received the message.
    pub tenant_id: Uuid,
    /// Twilio's message SID (two letters and 32 hex digits); unique per tenant.
    #[schemars(regex(pattern = r"^[A-Z]{2}[0-9a-fA-F]{32}$"))]
    pub message_sid: String,
    /// The customer's address (`+14155550100` or `whatsapp:+14155550100`); sealed in Redis.
    #[schemars(extend("x-gatehouse-sealed" = true))]
    #[schemars(length(min = 1, max = 64))]
    pub from: String,
    /// The tenant's address the message was sent to (empty if Twilio did not say); sealed in Redis.
    #[schemars(extend("x-gatehouse-sealed" = true))]
    #[schemars(length(max = 64))]
    pub to: String,
    /// The message text (Twilio allows 1600 characters); sealed in Redis.
    #[schemars(extend("x-gatehouse-sealed" = true))]
    #[schemars(length(max = 1600))]
    pub body: String,
    /// When the ingress received it, RFC 3339.
    #[schemars(regex(
        pattern = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$"
    ))]
    pub received_at: String,
}

impl Job for InboundMessage {
    const QUEUE: &'static str = "inbound_message";
    fn tenant(&self) -> Option<Uuid> {
        Some(self.tenant_id)
    }
}

/// How much of a catalog to synchronize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Upsert everything and delete products the store no longer has.
    Full,
    /// Upsert what the store returns; delete nothing.
    Incremental,
}

/// Synchronize a tenant's product catalog from its online store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct SyncCatalog {
    /// The tenant whose catalog is synchronized.
    pub tenant_id: Uuid,
    /// The user or service account that asked for it.
    pub requested_by: Uuid,
    /// Full or incremental.
    pub mode: SyncMode,
}

impl Job for SyncCatalog {
    const QUEUE: &'static str = "sync_catalog";
    fn tenant(&self) -> Option<Uuid> {
        Some(self.tenant_id)
    }
}

/// Re-encrypt every sealed value under the current key, for an approved rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RotateKeys {
    /// The approved `key_rotations` row.
    pub rotation_id: Uuid,
}

impl Job for RotateKeys {
    const QUEUE: &'static str = "rotate_keys";
}

/// Every queue gatehouse runs, in a stable order (the names of [`spec::QUEUE_SPECS`]).
pub const QUEUES: [&str; spec::QUEUE_SPECS.len()] = {
    let mut names = [""; spec::QUEUE_SPECS.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = spec::QUEUE_SPECS[i].name;
        i += 1;
    }
    names
};

/// The JSON Schema (Draft 2020-12) of a queue's payload, as committed under `jobs/schemas/`.
pub fn schema_for_queue(queue: &str) -> Option<serde_json::Value> {
    spec::spec(queue).map(|s| (s.schema)())
}

/// The committed schema file's text for a queue (what `jobs/schemas/{queue}.json` holds).
pub fn committed_schema(queue: &str) -> Option<&'static str> {
    spec::spec(queue).map(|s| s.committed_schema)
}

/// The JSON Schema of a queue's payload as it rests in Redis (its customer data sealed), as
/// committed under `jobs/schemas/at-rest/`.
pub fn at_rest_schema_for_queue(queue: &str) -> Option<serde_json::Value> {
    spec::spec(queue).map(spec::at_rest_schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pretty(value: serde_json::Value) -> String {
        serde_json::to_string_pretty(&value).expect("schema serializes") + "\n"
    }

    #[test]
    fn committed_schemas_match_the_payload_types() {
        let mut stale = Vec::new();
        for spec in spec::QUEUE_SPECS {
            let queue = spec.name;
            for (want, have, path) in [
                (
                    pretty((spec.schema)()),
                    spec.committed_schema,
                    format!("schemas/{queue}.json"),
                ),
                (
                    pretty(spec::at_rest_schema(&spec)),
                    spec.committed_at_rest_schema,
                    format!("schemas/at-rest/{queue}.json"),
                ),
            ] {
                if want != have {
                    if std::env::var_os("UPDATE_SCHEMAS").is_some() {
                        let path = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
                        std::fs::write(&path, &want).expect("write schema");
                    }
                    stale.push(path);
                }
            }
        }
        assert!(
            stale.is_empty(),
            "schemas out of date for {stale:?}; run UPDATE_SCHEMAS=1 cargo test -p gatehouse-jobs"
        );
    }

    #[test]
    fn schemas_close_every_object() {
        for queue in QUEUES {
            let schema = schema_for_queue(queue).expect("known queue");
            assert_eq!(
                schema["additionalProperties"],
                serde_json::json!(false),
                "{queue}"
            );
        }
    }

    #[test]
    fn the_at_rest_schema_carries_sealed_fields_only_inside_the_envelope() {
        let schema = at_rest_schema_for_queue("inbound_message").expect("known queue");
        let properties = schema["properties"].as_object().expect("properties");
        for field in ["from", "to", "body"] {
            assert!(!properties.contains_key(field), "{field} is sealed");
            assert_eq!(
                schema["properties"]["sealed"]["x-gatehouse-sealed"]["plaintext"]["properties"]
                    [field]["type"],
                "string"
            );
            let plain = schema_for_queue("inbound_message").expect("known queue");
            assert_eq!(
                plain["properties"][field]["x-gatehouse-sealed"],
                serde_json::json!(true)
            );
        }
        assert!(
            schema["required"]
                .as_array()
                .expect("required")
                .contains(&serde_json::json!("sealed"))
        );
        assert_eq!(
            schema["properties"]["sealed"]["x-gatehouse-sealed"]["aad"],
            "job.inbound_message:{job_id}"
        );
        for queue in ["sync_catalog", "rotate_keys"] {
            assert_eq!(at_rest_schema_for_queue(queue), schema_for_queue(queue));
        }
    }

    #[test]
    fn unknown_queues_have_no_schema() {
        assert!(schema_for_queue("nope").is_none());
        assert!(committed_schema("nope").is_none());
    }
}
