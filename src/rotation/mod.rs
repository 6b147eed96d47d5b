//! Key rotation: four-eyes requests and approvals (`four_eyes.rs`), the re-encryption that
//! the `rotate_keys` job runs and its progress (`reencrypt.rs`: the sealed columns, then the
//! sealed job payloads in Redis), and the per-column key census of `gatehouse keys status`
//! (`census.rs`; the payloads' census is `crate::queue::at_rest`). Here: what they share — the sealed columns the
//! rotation walks, a rotation as stored, and why a rotation operation failed.

mod census;
mod four_eyes;
mod reencrypt;

pub use census::{KeyUsage, key_usage};
pub use four_eyes::{APPROVAL_TTL, Approved, approve, request};
pub use reencrypt::{
    BatchStatements, Reseal, RunContext, RunOutcome, STALL_LIMIT, Sweep, mark_failed, run,
};

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

/// A sealed column: `{table}.{column}`, keyed by the table's `id` (a UUID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedColumn {
    pub table: &'static str,
    pub column: &'static str,
}

impl SealedColumn {
    /// `table.column`.
    pub fn name(&self) -> String {
        format!("{}.{}", self.table, self.column)
    }
}

/// Every sealed column, in the order the rotation walks them.
pub const SEALED_COLUMNS: [SealedColumn; 7] = [
    SealedColumn {
        table: "tenants",
        column: "twilio_auth_token",
    },
    SealedColumn {
        table: "tenants",
        column: "twilio_auth_token_previous",
    },
    SealedColumn {
        table: "tenants",
        column: "webhook_shared_key_previous",
    },
    SealedColumn {
        table: "tenants",
        column: "store_api_key",
    },
    SealedColumn {
        table: "tenants",
        column: "webhook_shared_key",
    },
    SealedColumn {
        table: "conversations",
        column: "customer_number",
    },
    SealedColumn {
        table: "messages",
        column: "from_number",
    },
];

/// Why a rotation operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Reading or re-sealing the job payloads in Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("no such key rotation")]
    NotFound,
    #[error("a rotation cannot be approved by the user who requested it")]
    SelfApproval,
    #[error("the rotation is {0}, not pending approval")]
    NotPending(String),
    #[error("the rotation request expired before it was approved")]
    Expired,
    #[error("the approver is not an active user holding keys:rotate")]
    ApproverNotAuthorized,
    #[error("the initiator is no longer an active user holding keys:rotate")]
    InitiatorNotAuthorized,
    #[error("this process encrypts with key {current}, the rotation targets {target}")]
    WrongKey { current: String, target: String },
    #[error("the rotation is {0}; only approved rotations run")]
    NotApproved(String),
    /// Every value left was locked by other transactions for the run's whole stall limit.
    #[error(
        "no value could be re-sealed for {seconds} s: the rest are locked by other transactions"
    )]
    Stalled { seconds: u64 },
}

impl RotationError {
    /// Whether running the job again can help (the database coming back, or this worker
    /// being redeployed with the rotation's target key).
    pub fn is_retryable(&self) -> bool {
        self.fault() != crate::fault::Fault::Permanent
    }

    /// Where the failure belongs (`crate::fault`).
    pub fn fault(&self) -> crate::fault::Fault {
        use crate::fault::Fault;
        match self {
            Self::Database(error) => crate::fault::postgres(error),
            Self::Redis(error) => crate::fault::redis(error),
            Self::WrongKey { .. } | Self::Stalled { .. } => Fault::Retry,
            Self::NotFound
            | Self::SelfApproval
            | Self::NotPending(_)
            | Self::Expired
            | Self::ApproverNotAuthorized
            | Self::InitiatorNotAuthorized
            | Self::NotApproved(_) => Fault::Permanent,
        }
    }
}

/// A rotation as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Rotation {
    pub id: Uuid,
    pub status: String,
    pub initiated_by: Uuid,
    pub approved_by: Option<Uuid>,
    pub approved_at: Option<OffsetDateTime>,
    pub target_key_id: String,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    pub started_at: Option<OffsetDateTime>,
    pub completed_at: Option<OffsetDateTime>,
    pub total: i64,
    pub done: i64,
    pub failed: i64,
    pub last_error: Option<String>,
}

const ROTATION_COLUMNS: &str = "id, status, initiated_by, approved_by, approved_at, target_key_id, \
     created_at, expires_at, started_at, completed_at, total, done, failed, last_error";

/// Reads a rotation.
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<Rotation>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ROTATION_COLUMNS} FROM key_rotations WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_database_trouble_and_a_worker_on_the_wrong_key_are_worth_a_retry() {
        assert!(
            RotationError::WrongKey {
                current: "a".into(),
                target: "b".into()
            }
            .is_retryable()
        );
        assert!(!RotationError::NotApproved("pending_approval".into()).is_retryable());
        assert!(!RotationError::NotFound.is_retryable());
    }
}
