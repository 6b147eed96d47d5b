//! Conversations and inbound messages: storing a classified message exactly once and
//! keeping each conversation's low-confidence streak with atomic SQL updates.

use gatehouse_jobs::InboundMessage;
use serde_json::Value;
use sqlx::PgPool;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::classify::{Classification, Classifier, ClassifyError, Intent};
use crate::fault::Fault;
use crate::security::blind_index::BlindIndex;
use crate::security::keyring::{Keyring, aad};

/// The blind index domain of `conversations.customer_number_index`.
pub const CUSTOMER_NUMBER_DOMAIN: &str = "conversations.customer_number";
/// The blind index domain of `messages.from_number_index`.
pub const FROM_NUMBER_DOMAIN: &str = "messages.from_number";

/// Consecutive low-confidence answers that hand a conversation to a person.
pub const HANDOFF_AFTER: i32 = 3;

/// Why an inbound message could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// PostgreSQL failed or could not be reached; a retry can help.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The payload can never succeed (unknown tenant, malformed time).
    #[error("{0}")]
    Permanent(String),
    /// The classifier gave no answer (the LLM timed out, failed or is misconfigured).
    #[error(transparent)]
    Classify(#[from] ClassifyError),
}

impl InboundError {
    /// Where the failure belongs (`crate::fault`).
    pub fn fault(&self) -> Fault {
        match self {
            Self::Database(error) => crate::fault::postgres(error),
            Self::Permanent(_) => Fault::Permanent,
            Self::Classify(error) => error.fault(),
        }
    }

    /// Whether retrying the job can help.
    pub fn is_retryable(&self) -> bool {
        self.fault() != Fault::Permanent
    }
}

/// What processing a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundOutcome {
    /// The message row was written and the conversation updated.
    Stored {
        message_id: Uuid,
        conversation_id: Uuid,
        low_confidence_count: i32,
        handoff: bool,
        /// The stored intent (`other` for a rejected answer).
        intent: Intent,
        /// Why the classifier's answer was rejected, if it was.
        rejected_reason: Option<String>,
    },
    /// This job id already committed its effect (a redelivery).
    AlreadyProcessed,
    /// Another job already stored this tenant's MessageSid.
    DuplicateMessage,
}

/// Everything the transaction needs besides the pool.
pub struct InboundContext<'a> {
    pub keyring: &'a Keyring,
    pub blind_index: &'a BlindIndex,
    pub min_confidence: f64,
    /// The worker's name, recorded with the processed-job marker.
    pub worker: &'a str,
}

/// Classifies an inbound message, then stores it with [`store_inbound`]. The classifier (an
/// LLM call, maybe) runs before the transaction opens; a job whose effect is already committed
/// (a redelivery) is acknowledged without asking a remote classifier again.
pub async fn process_inbound(
    pool: &PgPool,
    ctx: &InboundContext<'_>,
    job_id: &str,
    msg: &InboundMessage,
    classifier: &dyn Classifier,
) -> Result<InboundOutcome, InboundError> {
    // A local classifier costs less than this round trip, and `store_inbound` detects a
    // redelivery by itself; only a remote one is worth guarding.
    if classifier.is_remote() {
        let processed: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM processed_jobs WHERE job_id = $1)")
                .bind(job_id)
                .fetch_one(pool)
                .await?;
        if processed {
            return Ok(InboundOutcome::AlreadyProcessed);
        }
    }
    let classification = classifier.classify(&msg.body).await?;
    store_inbound(pool, ctx, job_id, msg, &classification).await
}

/// The whole effect of an inbound message as one statement, so one round trip and one commit:
/// - `marker`: the processed-job row, written only for a known tenant (an unknown tenant's
///   job goes to the dead letters unmarked, so an operator can retry it once the tenant
///   exists); none when this job id already committed.
/// - `fresh`: nothing more happens for a `MessageSid` this tenant already stored.
/// - `found`/`upd`/`ins`/`conv`: the conversation by the blind index of the customer's number,
///   per tenant. `found` takes the first of the index values the row may hold ($22, most
///   preferred first: the current per-tenant form, then the forms written before per-tenant
///   indexes or under `SECRET_KEY_PREVIOUS`, see `BlindIndex::lookups`), so a returning
///   customer keeps the conversation across a `SECRET_KEY` rotation and the upgrade. `upd`
///   applies the streak to it; with none, `ins` inserts it under the current form, and a
///   concurrent first message of the same customer meets it on the unique index and applies
///   the streak instead. Either way the streak is an atomic `n + 1` or reset on the latest
///   committed version, under the row lock that serializes one conversation's messages.
/// - `msg`: the message. A concurrent twin with the same `MessageSid` makes this insert fail
///   on the unique constraint, which rolls the whole statement back (streak included); the
///   caller maps that to [`InboundOutcome::DuplicateMessage`].
pub const STORE_INBOUND: &str = "
WITH marker AS (
    INSERT INTO processed_jobs (job_id, queue, worker)
    SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM tenants WHERE id = $4)
    ON CONFLICT DO NOTHING
    RETURNING job_id
), fresh AS (
    SELECT 1 FROM marker
    WHERE NOT EXISTS (SELECT 1 FROM messages WHERE tenant_id = $4 AND message_sid = $8)
), found AS (
    SELECT id FROM conversations
    WHERE tenant_id = $4 AND customer_number_index = ANY($22::bytea[])
    ORDER BY array_position($22::bytea[], customer_number_index)
    LIMIT 1
), upd AS (
    UPDATE conversations AS c SET
        low_confidence_count = CASE WHEN $20 THEN c.low_confidence_count + 1 ELSE 0 END,
        state = CASE WHEN $20 AND c.low_confidence_count + 1 >= $21 THEN 'handoff'
                     ELSE c.state END,
        last_message_at = GREATEST(c.last_message_at, $19),
        updated_at = now()
    FROM fresh
    WHERE c.id = (SELECT id FROM found)
    RETURNING c.id, c.low_confidence_count, c.state
), ins AS (
    INSERT INTO conversations AS c (id, tenant_id, customer_number, customer_number_index,
                                    customer_number_index_form,
                                    low_confidence_count, state, last_message_at)
    SELECT $5, $4, $6, $7, $23,
           CASE WHEN $20 THEN 1 ELSE 0 END,
           CASE WHEN $20 AND 1 >= $21 THEN 'handoff' ELSE 'bot' END,
           $19
    FROM fresh
    WHERE NOT EXISTS (SELECT 1 FROM found)
    ON CONFLICT (tenant_id, customer_number_index) DO UPDATE SET
        low_confidence_count = CASE WHEN $20 THEN c.low_confidence_count + 1 ELSE 0 END,
        state = CASE WHEN $20 AND c.low_confidence_count + 1 >= $21 THEN 'handoff'
                     ELSE c.state END,
        last_message_at = GREATEST(c.last_message_at, EXCLUDED.last_message_at),
        updated_at = now()
    RETURNING c.id, c.low_confidence_count, c.state
), conv AS (
    SELECT * FROM upd UNION ALL SELECT * FROM ins
), msg AS (
    INSERT INTO messages (id, tenant_id, conversation_id, message_sid, from_number,
                          from_number_index, from_number_index_form, to_number, body, intent,
                          confidence, slots, classifier, rejected_reason, job_id, received_at)
    SELECT $9, $4, conv.id, $8, $10, $11, $23, $12, $13, $14, $15, $16, $17, $18, $1, $19
    FROM conv
    RETURNING id
)
SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $4),
       EXISTS (SELECT 1 FROM marker),
       (SELECT id FROM msg),
       (SELECT id FROM conv),
       (SELECT low_confidence_count FROM conv),
       (SELECT state FROM conv)";

/// The unique constraint that makes a message exist once per tenant and `MessageSid`.
const MESSAGE_SID_UNIQUE: &str = "messages_tenant_id_message_sid_key";

/// What [`STORE_INBOUND`] answers: known tenant, fresh job, message, conversation, streak,
/// state.
type StoreRow = (
    bool,
    bool,
    Option<Uuid>,
    Option<Uuid>,
    Option<i32>,
    Option<String>,
);

/// Stores a classified inbound message atomically, in one statement (see [`STORE_INBOUND`]):
/// the processed-job marker, the conversation (upserted by the blind index of the customer's
/// number, which is sealed), the message (unique per tenant and MessageSid), and the atomic
/// streak update.
pub async fn store_inbound(
    pool: &PgPool,
    ctx: &InboundContext<'_>,
    job_id: &str,
    msg: &InboundMessage,
    classification: &Classification,
) -> Result<InboundOutcome, InboundError> {
    let received_at = OffsetDateTime::parse(&msg.received_at, &Rfc3339)
        .map_err(|_| InboundError::Permanent("received_at is not RFC 3339".into()))?;
    let low = classification.rejected_reason.is_some()
        || !classification.confidence.is_finite()
        || classification.confidence < ctx.min_confidence;

    let new_conversation = Uuid::new_v4();
    let sealed_number = ctx.keyring.seal(
        msg.from.as_bytes(),
        &aad(
            "conversations",
            "customer_number",
            &new_conversation.to_string(),
        ),
    );
    let number_index = ctx.blind_index.compute_for_tenant(
        CUSTOMER_NUMBER_DOMAIN,
        msg.tenant_id,
        msg.from.as_bytes(),
    );
    let number_lookups =
        ctx.blind_index
            .lookups(CUSTOMER_NUMBER_DOMAIN, msg.tenant_id, msg.from.as_bytes());
    let message_id = Uuid::new_v4();
    let sealed_from = ctx.keyring.seal(
        msg.from.as_bytes(),
        &aad("messages", "from_number", &message_id.to_string()),
    );
    let from_index =
        ctx.blind_index
            .compute_for_tenant(FROM_NUMBER_DOMAIN, msg.tenant_id, msg.from.as_bytes());

    let row: Result<StoreRow, sqlx::Error> = sqlx::query_as(STORE_INBOUND)
        .bind(job_id)
        .bind(<InboundMessage as gatehouse_jobs::Job>::QUEUE)
        .bind(ctx.worker)
        .bind(msg.tenant_id)
        .bind(new_conversation)
        .bind(sealed_number)
        .bind(number_index.to_vec())
        .bind(&msg.message_sid)
        .bind(message_id)
        .bind(sealed_from)
        .bind(from_index.to_vec())
        .bind(&msg.to)
        .bind(&msg.body)
        .bind(classification.intent.as_str())
        .bind(classification.confidence)
        .bind(Value::Object(classification.slots.clone()))
        .bind(&classification.classifier)
        .bind(&classification.rejected_reason)
        .bind(received_at)
        .bind(low)
        .bind(HANDOFF_AFTER)
        .bind(number_lookups)
        .bind(ctx.blind_index.form())
        .fetch_one(pool)
        .await;
    let (known_tenant, fresh_job, stored, conversation, count, state) = match row {
        Ok(row) => row,
        Err(sqlx::Error::Database(e)) if e.constraint() == Some(MESSAGE_SID_UNIQUE) => {
            return Ok(InboundOutcome::DuplicateMessage);
        }
        Err(e) => return Err(e.into()),
    };
    if !known_tenant {
        return Err(InboundError::Permanent(format!(
            "unknown tenant {}",
            msg.tenant_id
        )));
    }
    if !fresh_job {
        return Ok(InboundOutcome::AlreadyProcessed);
    }
    match (stored, conversation, count, state) {
        (Some(message_id), Some(conversation_id), Some(count), Some(state)) => {
            Ok(InboundOutcome::Stored {
                message_id,
                conversation_id,
                low_confidence_count: count,
                handoff: state == "handoff",
                intent: classification.intent,
                rejected_reason: classification.rejected_reason.clone(),
            })
        }
        _ => Ok(InboundOutcome::DuplicateMessage),
    }
}
