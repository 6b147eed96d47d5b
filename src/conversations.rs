//! Conversations and inbound messages: storing a classified message exactly once and
//! keeping each conversation's low-confidence streak with atomic SQL updates.

use gatehouse_jobs::InboundMessage;
use serde_json::Value;
use sqlx::PgPool;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::classify::{Classification, Classifier, ClassifyError, Intent};
use crate::security::blind_index::BlindIndex;
use crate::security::keyring::{Keyring, aad};

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
    /// Whether retrying the job can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Database(_) => true,
            Self::Permanent(_) => false,
            Self::Classify(error) => error.is_retryable(),
        }
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
/// (a redelivery) is acknowledged without asking it again.
pub async fn process_inbound(
    pool: &PgPool,
    ctx: &InboundContext<'_>,
    job_id: &str,
    msg: &InboundMessage,
    classifier: &dyn Classifier,
) -> Result<InboundOutcome, InboundError> {
    let processed: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM processed_jobs WHERE job_id = $1)")
            .bind(job_id)
            .fetch_one(pool)
            .await?;
    if processed {
        return Ok(InboundOutcome::AlreadyProcessed);
    }
    let classification = classifier.classify(&msg.body).await?;
    store_inbound(pool, ctx, job_id, msg, &classification).await
}

/// Stores a classified inbound message in one transaction: the processed-job marker, the
/// conversation (upserted by the blind index of the customer's number, which is sealed),
/// the message (unique per tenant and MessageSid), and the atomic streak update.
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

    let mut tx = pool.begin().await?;
    let fresh = sqlx::query(
        "INSERT INTO processed_jobs (job_id, queue, worker) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(job_id)
    .bind(<InboundMessage as gatehouse_jobs::Job>::QUEUE)
    .bind(ctx.worker)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if fresh == 0 {
        tx.rollback().await?;
        return Ok(InboundOutcome::AlreadyProcessed);
    }
    let tenant: Option<Uuid> = sqlx::query_scalar("SELECT id FROM tenants WHERE id = $1")
        .bind(msg.tenant_id)
        .fetch_optional(&mut *tx)
        .await?;
    if tenant.is_none() {
        return Err(InboundError::Permanent(format!(
            "unknown tenant {}",
            msg.tenant_id
        )));
    }

    // Cheap duplicate check first, so a redelivered MessageSid does not touch the
    // conversation row at all; the unique constraint below is the real guarantee.
    let seen: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM messages WHERE tenant_id = $1 AND message_sid = $2")
            .bind(msg.tenant_id)
            .bind(&msg.message_sid)
            .fetch_optional(&mut *tx)
            .await?;
    if seen.is_some() {
        tx.commit().await?;
        return Ok(InboundOutcome::DuplicateMessage);
    }

    let number_index = ctx
        .blind_index
        .compute("conversations.customer_number", msg.from.as_bytes());
    let new_conversation = Uuid::new_v4();
    let sealed_number = ctx.keyring.seal(
        msg.from.as_bytes(),
        &aad(
            "conversations",
            "customer_number",
            &new_conversation.to_string(),
        ),
    );
    // Upsert and lock the conversation row: messages of one conversation serialize here.
    let conversation_id: Uuid = sqlx::query_scalar(
        "INSERT INTO conversations (id, tenant_id, customer_number, customer_number_index)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (tenant_id, customer_number_index) DO UPDATE SET updated_at = now()
         RETURNING id",
    )
    .bind(new_conversation)
    .bind(msg.tenant_id)
    .bind(sealed_number)
    .bind(number_index.to_vec())
    .fetch_one(&mut *tx)
    .await?;

    let message_id = Uuid::new_v4();
    let sealed_from = ctx.keyring.seal(
        msg.from.as_bytes(),
        &aad("messages", "from_number", &message_id.to_string()),
    );
    let from_index = ctx
        .blind_index
        .compute("messages.from_number", msg.from.as_bytes());
    let inserted = sqlx::query(
        "INSERT INTO messages (id, tenant_id, conversation_id, message_sid, from_number,
                               from_number_index, to_number, body, intent, confidence, slots,
                               classifier, rejected_reason, job_id, received_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         ON CONFLICT (tenant_id, message_sid) DO NOTHING",
    )
    .bind(message_id)
    .bind(msg.tenant_id)
    .bind(conversation_id)
    .bind(&msg.message_sid)
    .bind(sealed_from)
    .bind(from_index.to_vec())
    .bind(&msg.to)
    .bind(&msg.body)
    .bind(classification.intent.as_str())
    .bind(classification.confidence)
    .bind(Value::Object(classification.slots.clone()))
    .bind(&classification.classifier)
    .bind(&classification.rejected_reason)
    .bind(job_id)
    .bind(received_at)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        tx.commit().await?;
        return Ok(InboundOutcome::DuplicateMessage);
    }

    // Atomic streak update: no read-modify-write in Rust.
    let (count, state): (i32, String) = sqlx::query_as(
        "UPDATE conversations SET
             low_confidence_count = CASE WHEN $2 THEN low_confidence_count + 1 ELSE 0 END,
             state = CASE WHEN $2 AND low_confidence_count + 1 >= $3 THEN 'handoff' ELSE state END,
             last_message_at = GREATEST(last_message_at, $4),
             updated_at = now()
         WHERE id = $1
         RETURNING low_confidence_count, state",
    )
    .bind(conversation_id)
    .bind(low)
    .bind(HANDOFF_AFTER)
    .bind(received_at)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(InboundOutcome::Stored {
        message_id,
        conversation_id,
        low_confidence_count: count,
        handoff: state == "handoff",
        intent: classification.intent,
        rejected_reason: classification.rejected_reason.clone(),
    })
}
