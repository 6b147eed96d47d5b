//! Four-eyes key rotation: the request and its approval.
//!
//! Four-eyes: a request records its initiator and the key id it rotates to (the requesting
//! ingress's current key). An approval is checked against the database at that moment, not
//! only against the caller's token: a different user, both active, both holding
//! `keys:rotate` through their platform role; the request still pending and unexpired. The
//! approval row is single use (its primary key is the rotation id) and bound to the request;
//! it commits with the status change and an outbox entry, so the job is relayed to Redis
//! after the commit however long Redis is away (see `outbox`).

use std::time::Duration;

use gatehouse_jobs::{Job, RotateKeys};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{ROTATION_COLUMNS, Rotation, RotationError};
use crate::access::{PlatformRole, Scope};
use crate::security::keyring::KeyId;

/// How long a request waits for its approval by default (`KEY_ROTATION_APPROVAL_TTL_SECONDS`).
pub const APPROVAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// Whether `user` is an active user whose platform role grants `keys:rotate`, read now.
async fn holds_rotate_scope(
    tx: &mut Transaction<'_, Postgres>,
    user: Uuid,
) -> Result<bool, sqlx::Error> {
    // FOR SHARE: a concurrent deactivation or role change waits for this approval (or
    // this approval waits for it), so the check holds at commit.
    let row: Option<(bool, Option<String>)> =
        sqlx::query_as("SELECT is_active, platform_role FROM users WHERE id = $1 FOR SHARE")
            .bind(user)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(match row {
        Some((true, Some(role))) => PlatformRole::parse(&role)
            .is_some_and(|role| role.scopes().contains(&Scope::KeysRotate)),
        _ => false,
    })
}

/// Records a request by `initiator` to re-encrypt everything under `target`, approvable
/// until `ttl` from now.
pub async fn request(
    pool: &PgPool,
    initiator: Uuid,
    target: KeyId,
    ttl: Duration,
) -> Result<Rotation, RotationError> {
    let mut tx = pool.begin().await?;
    if !holds_rotate_scope(&mut tx, initiator).await? {
        return Err(RotationError::InitiatorNotAuthorized);
    }
    let rotation: Rotation = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO key_rotations (initiated_by, target_key_id, expires_at)
         VALUES ($1, $2, now() + make_interval(secs => $3))
         RETURNING {ROTATION_COLUMNS}"
    )))
    .bind(initiator)
    .bind(target.to_hex())
    .bind(ttl.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rotation)
}

/// An approval that committed: the rotation (now `queued`) and its outbox job id.
#[derive(Debug, Clone)]
pub struct Approved {
    pub rotation: Rotation,
    pub job_id: String,
}

/// Approves `rotation_id` as `approver` (four-eyes, see the module docs). On success the
/// rotation is `queued` and an outbox entry for its `rotate_keys` job committed with it.
pub async fn approve(
    pool: &PgPool,
    rotation_id: Uuid,
    approver: Uuid,
) -> Result<Approved, RotationError> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, Uuid, bool)> = sqlx::query_as(
        "SELECT status, initiated_by, expires_at <= now() FROM key_rotations
         WHERE id = $1 FOR UPDATE",
    )
    .bind(rotation_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((status, initiator, expired)) = row else {
        return Err(RotationError::NotFound);
    };
    if approver == initiator {
        return Err(RotationError::SelfApproval);
    }
    if status != "pending_approval" {
        return Err(RotationError::NotPending(status));
    }
    if expired {
        sqlx::query("UPDATE key_rotations SET status = 'expired' WHERE id = $1")
            .bind(rotation_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        return Err(RotationError::Expired);
    }
    if !holds_rotate_scope(&mut tx, approver).await? {
        return Err(RotationError::ApproverNotAuthorized);
    }
    if !holds_rotate_scope(&mut tx, initiator).await? {
        return Err(RotationError::InitiatorNotAuthorized);
    }
    // Single use: the approval's primary key is the rotation (a second one cannot commit).
    sqlx::query(
        "INSERT INTO key_rotation_approvals (rotation_id, approved_by, initiated_by)
         VALUES ($1, $2, $3)",
    )
    .bind(rotation_id)
    .bind(approver)
    .bind(initiator)
    .execute(&mut *tx)
    .await?;
    let rotation: Rotation = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE key_rotations SET status = 'queued', approved_by = $2, approved_at = now()
         WHERE id = $1 RETURNING {ROTATION_COLUMNS}"
    )))
    .bind(rotation_id)
    .bind(approver)
    .fetch_one(&mut *tx)
    .await?;
    let job_id = Uuid::now_v7().to_string();
    let payload = serde_json::to_value(RotateKeys { rotation_id })
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query("INSERT INTO outbox (queue, job_id, payload) VALUES ($1, $2, $3)")
        .bind(RotateKeys::QUEUE)
        .bind(&job_id)
        .bind(payload)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Approved { rotation, job_id })
}
