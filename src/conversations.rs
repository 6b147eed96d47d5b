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
    /// The message's group ended without an answer for it (its statement ran past its time
    /// limit): whether it committed is unknown, and the job's next attempt finds out from its
    /// processed-job marker.
    #[error("{0}")]
    Unanswered(String),
}

impl InboundError {
    /// Where the failure belongs (`crate::fault`).
    pub fn fault(&self) -> Fault {
        match self {
            Self::Database(error) => crate::fault::postgres(error),
            Self::Permanent(_) => Fault::Permanent,
            Self::Classify(error) => error.fault(),
            Self::Unanswered(_) => Fault::Retry,
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
    match classify_unless_applied(pool, job_id, msg, classifier).await? {
        Some(classification) => store_inbound(pool, ctx, job_id, msg, &classification).await,
        None => Ok(InboundOutcome::AlreadyProcessed),
    }
}

/// The message's classification, or `None` when a remote classifier would be asked about a
/// job whose effect is already committed (a redelivery).
pub async fn classify_unless_applied(
    pool: &PgPool,
    job_id: &str,
    msg: &InboundMessage,
    classifier: &dyn Classifier,
) -> Result<Option<Classification>, InboundError> {
    // A local classifier costs less than this round trip, and `store_inbound` detects a
    // redelivery by itself; only a remote one is worth guarding.
    if classifier.is_remote() {
        let processed: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM processed_jobs WHERE job_id = $1)")
                .bind(job_id)
                .fetch_one(pool)
                .await?;
        if processed {
            return Ok(None);
        }
    }
    Ok(Some(classifier.classify(&msg.body).await?))
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

/// One classified inbound message, ready to store: every value its statement binds, sealed
/// and indexed. Preparing it does all of a job's CPU work outside any transaction, so a group
/// of them (`store_group`) holds its connection only for the statement.
#[derive(Debug, Clone)]
pub struct PreparedInbound {
    job_id: String,
    worker: String,
    tenant_id: Uuid,
    new_conversation: Uuid,
    sealed_number: Vec<u8>,
    number_index: Vec<u8>,
    /// The index values a stored conversation of this customer may hold, most preferred
    /// first (`BlindIndex::lookups`).
    number_lookups: Vec<Vec<u8>>,
    index_form: String,
    message_sid: String,
    message_id: Uuid,
    sealed_from: Vec<u8>,
    from_index: Vec<u8>,
    to: String,
    body: String,
    intent: Intent,
    confidence: f64,
    slots: Value,
    classifier: String,
    rejected_reason: Option<String>,
    received_at: OffsetDateTime,
    low: bool,
}

impl PreparedInbound {
    /// Seals and indexes a classified message for `job_id`. A malformed `received_at` is
    /// permanent.
    pub fn new(
        ctx: &InboundContext<'_>,
        job_id: &str,
        msg: &InboundMessage,
        classification: &Classification,
    ) -> Result<Self, InboundError> {
        let received_at = OffsetDateTime::parse(&msg.received_at, &Rfc3339)
            .map_err(|_| InboundError::Permanent("received_at is not RFC 3339".into()))?;
        let low = classification.rejected_reason.is_some()
            || !classification.confidence.is_finite()
            || classification.confidence < ctx.min_confidence;
        let number = msg.from.as_bytes();
        let new_conversation = Uuid::new_v4();
        let message_id = Uuid::new_v4();
        let index = ctx.blind_index;
        Ok(Self {
            job_id: job_id.to_owned(),
            worker: ctx.worker.to_owned(),
            tenant_id: msg.tenant_id,
            new_conversation,
            sealed_number: ctx.keyring.seal(
                number,
                &aad(
                    "conversations",
                    "customer_number",
                    &new_conversation.to_string(),
                ),
            ),
            number_index: index
                .compute_for_tenant(CUSTOMER_NUMBER_DOMAIN, msg.tenant_id, number)
                .to_vec(),
            number_lookups: index.lookups(CUSTOMER_NUMBER_DOMAIN, msg.tenant_id, number),
            index_form: index.form().to_owned(),
            message_sid: msg.message_sid.clone(),
            message_id,
            sealed_from: ctx.keyring.seal(
                number,
                &aad("messages", "from_number", &message_id.to_string()),
            ),
            from_index: index
                .compute_for_tenant(FROM_NUMBER_DOMAIN, msg.tenant_id, number)
                .to_vec(),
            to: msg.to.clone(),
            body: msg.body.clone(),
            intent: classification.intent,
            confidence: classification.confidence,
            slots: Value::Object(classification.slots.clone()),
            classifier: classification.classifier.clone(),
            rejected_reason: classification.rejected_reason.clone(),
            received_at,
            low,
        })
    }

    /// The job this message belongs to.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// What two messages must not share to be stored by one statement: the job, the
    /// tenant's `MessageSid`, and the customer's conversation (one statement can neither
    /// upsert a row twice nor apply one customer's two messages in order).
    pub fn group_keys(&self) -> [GroupKey; 3] {
        [
            GroupKey::Job(self.job_id.clone()),
            GroupKey::MessageSid(self.tenant_id, self.message_sid.clone()),
            GroupKey::Customer(self.tenant_id, self.number_index.clone()),
        ]
    }

    /// What the stored row says, as the job's outcome.
    fn outcome(&self, row: StoreRow) -> Result<InboundOutcome, InboundError> {
        let (known_tenant, fresh_job, stored, conversation, count, state) = row;
        if !known_tenant {
            return Err(InboundError::Permanent(format!(
                "unknown tenant {}",
                self.tenant_id
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
                    intent: self.intent,
                    rejected_reason: self.rejected_reason.clone(),
                })
            }
            _ => Ok(InboundOutcome::DuplicateMessage),
        }
    }

    /// Stores this message alone, in one statement and so one transaction
    /// ([`STORE_INBOUND`]).
    pub async fn store(&self, pool: &PgPool) -> Result<InboundOutcome, InboundError> {
        let row: Result<StoreRow, sqlx::Error> = sqlx::query_as(STORE_INBOUND)
            .bind(&self.job_id)
            .bind(<InboundMessage as gatehouse_jobs::Job>::QUEUE)
            .bind(&self.worker)
            .bind(self.tenant_id)
            .bind(self.new_conversation)
            .bind(&self.sealed_number)
            .bind(&self.number_index)
            .bind(&self.message_sid)
            .bind(self.message_id)
            .bind(&self.sealed_from)
            .bind(&self.from_index)
            .bind(&self.to)
            .bind(&self.body)
            .bind(self.intent.as_str())
            .bind(self.confidence)
            .bind(&self.slots)
            .bind(&self.classifier)
            .bind(&self.rejected_reason)
            .bind(self.received_at)
            .bind(self.low)
            .bind(HANDOFF_AFTER)
            .bind(&self.number_lookups)
            .bind(&self.index_form)
            .fetch_one(pool)
            .await;
        match row {
            Ok(row) => self.outcome(row),
            Err(sqlx::Error::Database(e)) if e.constraint() == Some(MESSAGE_SID_UNIQUE) => {
                Ok(InboundOutcome::DuplicateMessage)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// What may not appear twice in one group (`PreparedInbound::group_keys`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GroupKey {
    Job(String),
    MessageSid(Uuid, String),
    Customer(Uuid, Vec<u8>),
}

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
    PreparedInbound::new(ctx, job_id, msg, classification)?
        .store(pool)
        .await
}

/// [`STORE_INBOUND`] for a group of messages at once: one statement, one plan, one round trip
/// and one commit for all of them, each with its own processed-job marker. The group's
/// messages share no [`GroupKey`] (the caller sees to it), so every row the statement writes
/// is written once. `input` is the group, numbered by `ord`, each message with its lookup
/// index values (`$21`/`$22` flatten them: the message's `ord`, then the value, in order of
/// preference). Every lookup of an existing row (tenant, duplicate message, conversation,
/// lock) is a per-message subquery on a unique index, never a join the planner could turn
/// into a scan of the table: the cached plan outlives the statistics it was made with
/// (a hash anti-join over `messages`, planned while the table was small, was measured scanning
/// all of it for every group, BENCHMARKS.md §16). Conversations found are locked in id order
/// first (`locked`) and new ones inserted in index order, so two groups in different
/// processes meet in one order; a
/// deadlock that still happens (one group waiting on another's new row, say) fails the
/// statement, and the caller falls back to one statement per message. Any failure rolls the
/// whole group back: nothing of it is applied.
pub const STORE_INBOUND_GROUP: &str = "
WITH input AS (
    SELECT t.*,
           ARRAY(SELECT l.v FROM unnest($21::int8[], $22::bytea[]) WITH ORDINALITY AS l(o, v, pos)
                 WHERE l.o = t.ord ORDER BY l.pos) AS lookups
    FROM unnest($1::text[], $2::text[], $3::uuid[], $4::uuid[], $5::bytea[],
                $6::bytea[], $7::text[], $8::text[], $9::uuid[], $10::bytea[],
                $11::bytea[], $12::text[], $13::text[], $14::text[], $15::float8[],
                $16::jsonb[], $17::text[], $18::text[], $19::timestamptz[], $20::bool[])
        WITH ORDINALITY AS t(job_id, worker, tenant_id, new_conversation, customer_number,
                             number_index, index_form, message_sid, message_id, from_number,
                             from_index, to_number, body, intent, confidence,
                             slots, classifier, rejected_reason, received_at, low, ord)
), marker AS (
    INSERT INTO processed_jobs (job_id, queue, worker)
    SELECT i.job_id, $23, i.worker FROM input i
    WHERE (SELECT true FROM tenants WHERE id = i.tenant_id)
    ORDER BY i.job_id
    ON CONFLICT DO NOTHING
    RETURNING job_id
), fresh AS (
    SELECT i.* FROM input i JOIN marker m ON m.job_id = i.job_id
    WHERE (SELECT true FROM messages
           WHERE tenant_id = i.tenant_id AND message_sid = i.message_sid) IS NULL
), found AS (
    SELECT f.ord,
           (SELECT c.id FROM conversations c
            WHERE c.tenant_id = f.tenant_id AND c.customer_number_index = ANY(f.lookups)
            ORDER BY array_position(f.lookups, c.customer_number_index)
            LIMIT 1) AS id
    FROM fresh f
), locked AS (
    SELECT c.id
    FROM (SELECT id FROM found WHERE id IS NOT NULL ORDER BY id) AS o,
         LATERAL (SELECT c.id FROM conversations c WHERE c.id = o.id FOR UPDATE) AS c
), upd AS (
    UPDATE conversations AS c SET
        low_confidence_count = CASE WHEN f.low THEN c.low_confidence_count + 1 ELSE 0 END,
        state = CASE WHEN f.low AND c.low_confidence_count + 1 >= $24 THEN 'handoff'
                     ELSE c.state END,
        last_message_at = GREATEST(c.last_message_at, f.received_at),
        updated_at = now()
    FROM locked l JOIN found ON found.id = l.id JOIN fresh f ON f.ord = found.ord
    WHERE c.id = l.id
    RETURNING f.ord, c.id, c.low_confidence_count, c.state
), ins AS (
    INSERT INTO conversations AS c (id, tenant_id, customer_number, customer_number_index,
                                    customer_number_index_form,
                                    low_confidence_count, state, last_message_at)
    SELECT f.new_conversation, f.tenant_id, f.customer_number, f.number_index, f.index_form,
           CASE WHEN f.low THEN 1 ELSE 0 END,
           CASE WHEN f.low AND 1 >= $24 THEN 'handoff' ELSE 'bot' END,
           f.received_at
    FROM fresh f JOIN found ON found.ord = f.ord
    WHERE found.id IS NULL
    ORDER BY f.tenant_id, f.number_index
    ON CONFLICT (tenant_id, customer_number_index) DO UPDATE SET
        low_confidence_count = CASE WHEN EXCLUDED.low_confidence_count > 0
                                    THEN c.low_confidence_count + 1 ELSE 0 END,
        state = CASE WHEN EXCLUDED.low_confidence_count > 0
                          AND c.low_confidence_count + 1 >= $24 THEN 'handoff'
                     ELSE c.state END,
        last_message_at = GREATEST(c.last_message_at, EXCLUDED.last_message_at),
        updated_at = now()
    RETURNING c.tenant_id, c.customer_number_index, c.id, c.low_confidence_count, c.state
), conv AS (
    SELECT ord, id, low_confidence_count, state FROM upd
    UNION ALL
    SELECT f.ord, ins.id, ins.low_confidence_count, ins.state
    FROM ins JOIN fresh f
      ON f.tenant_id = ins.tenant_id AND f.number_index = ins.customer_number_index
), msg AS (
    INSERT INTO messages (id, tenant_id, conversation_id, message_sid, from_number,
                          from_number_index, from_number_index_form, to_number, body, intent,
                          confidence, slots, classifier, rejected_reason, job_id, received_at)
    SELECT f.message_id, f.tenant_id, conv.id, f.message_sid, f.from_number, f.from_index,
           f.index_form, f.to_number, f.body, f.intent, f.confidence, f.slots, f.classifier,
           f.rejected_reason, f.job_id, f.received_at
    FROM fresh f JOIN conv ON conv.ord = f.ord
    RETURNING id
)
SELECT (SELECT true FROM tenants WHERE id = i.tenant_id) IS NOT NULL,
       EXISTS (SELECT 1 FROM marker m WHERE m.job_id = i.job_id),
       (SELECT id FROM msg WHERE msg.id = i.message_id),
       conv.id, conv.low_confidence_count, conv.state
FROM input i LEFT JOIN conv ON conv.ord = i.ord
ORDER BY i.ord";

/// Stores a group of messages with one statement ([`STORE_INBOUND_GROUP`]) and answers each
/// one's outcome, in order. `Err` is the statement's failure, which applied nothing: the
/// caller stores the messages one by one instead, so one message's failure stays its own.
pub async fn store_group(
    pool: &PgPool,
    group: &[PreparedInbound],
) -> Result<Vec<Result<InboundOutcome, InboundError>>, sqlx::Error> {
    fn column<'a, T: 'a>(
        group: &'a [PreparedInbound],
        f: impl Fn(&'a PreparedInbound) -> T,
    ) -> Vec<T> {
        group.iter().map(f).collect()
    }
    let (mut lk_ord, mut lk_value) = (Vec::new(), Vec::new());
    for (ord, p) in (1i64..).zip(group) {
        for value in &p.number_lookups {
            lk_ord.push(ord);
            lk_value.push(value.as_slice());
        }
    }
    let rows: Vec<StoreRow> = sqlx::query_as(STORE_INBOUND_GROUP)
        .bind(column(group, |p| p.job_id.as_str()))
        .bind(column(group, |p| p.worker.as_str()))
        .bind(column(group, |p| p.tenant_id))
        .bind(column(group, |p| p.new_conversation))
        .bind(column(group, |p| p.sealed_number.as_slice()))
        .bind(column(group, |p| p.number_index.as_slice()))
        .bind(column(group, |p| p.index_form.as_str()))
        .bind(column(group, |p| p.message_sid.as_str()))
        .bind(column(group, |p| p.message_id))
        .bind(column(group, |p| p.sealed_from.as_slice()))
        .bind(column(group, |p| p.from_index.as_slice()))
        .bind(column(group, |p| p.to.as_str()))
        .bind(column(group, |p| p.body.as_str()))
        .bind(column(group, |p| p.intent.as_str()))
        .bind(column(group, |p| p.confidence))
        .bind(column(group, |p| &p.slots))
        .bind(column(group, |p| p.classifier.as_str()))
        .bind(column(group, |p| p.rejected_reason.as_deref()))
        .bind(column(group, |p| p.received_at))
        .bind(column(group, |p| p.low))
        .bind(lk_ord)
        .bind(lk_value)
        .bind(<InboundMessage as gatehouse_jobs::Job>::QUEUE)
        .bind(HANDOFF_AFTER)
        .fetch_all(pool)
        .await?;
    if rows.len() != group.len() {
        return Err(sqlx::Error::Protocol(format!(
            "a group of {} messages answered {} rows",
            group.len(),
            rows.len()
        )));
    }
    Ok(group
        .iter()
        .zip(rows)
        .map(|(p, row)| p.outcome(row))
        .collect())
}
