//! Incident tools: shut a user or a producer out, or change a user's platform role, with effect
//! on the very next request of every token and dashboard session the principal holds, on every
//! ingress process.
//!
//! Every request resolves its principal through the versioned scope cache
//! ([`crate::access::ScopeCache`]), whose version key every ingress reads from the shared
//! Redis, and an inactive principal is refused like an invalid token. So a change here is the
//! row update plus the same two version bumps as a role change (see `crate::access`): one
//! before the commit (no change commits while Redis cannot be told; nothing is changed then)
//! and one after (an entry filled from the old rows in between is never read). Tokens are not
//! listed anywhere: the principal's state is what the next request checks.

use redis::aio::ConnectionLike;
use serde_json::json;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::access::{PlatformRole, ScopeCache};
use crate::accounts::normalize_email;
use crate::events::{EventType, SecurityEvent};

#[derive(Debug, thiserror::Error)]
pub enum PrincipalError {
    #[error("no user with email {0}")]
    UnknownUser(String),
    #[error("no service account with client id {0}")]
    UnknownServiceAccount(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("Redis cannot be told of the change (nothing was changed): {0}")]
    Cache(#[from] redis::RedisError),
}

/// What a change did, for the operator's confirmation line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub id: Uuid,
    /// False when the principal already was in the requested state (nothing to do, but the
    /// versions are bumped anyway, which is harmless).
    pub changed: bool,
}

async fn bump_after<C: ConnectionLike + Send>(cache: &ScopeCache, redis: &mut C, id: Uuid) {
    if let Err(error) = cache.bump(redis, id).await {
        // The first bump already retired every entry older than the change; only an entry
        // filled between that bump and the commit can linger, for at most the cache TTL.
        tracing::error!(principal.id = %id, %error, "cannot bump the scope version after a change");
    }
}

/// Deactivates (`active = false`) or reactivates the user `email`. A deactivated user's
/// tokens and sessions are refused from the next request on, and its logins fail as a wrong
/// password does.
pub async fn set_user_active<C: ConnectionLike + Send>(
    pool: &PgPool,
    redis: &mut C,
    cache: &ScopeCache,
    email: &str,
    active: bool,
) -> Result<Changed, PrincipalError> {
    let email = normalize_email(email);
    let mut tx = pool.begin().await?;
    let row: Option<(Uuid, bool)> =
        sqlx::query_as("SELECT id, is_active FROM users WHERE email = $1 FOR UPDATE")
            .bind(&email)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((id, was)) = row else {
        return Err(PrincipalError::UnknownUser(email));
    };
    sqlx::query(
        "UPDATE users SET is_active = $2, scope_version = scope_version + 1, updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(active)
    .execute(&mut *tx)
    .await?;
    cache.bump(redis, id).await?;
    tx.commit().await?;
    bump_after(cache, redis, id).await;
    Ok(Changed {
        id,
        changed: was != active,
    })
}

/// A platform-role change: the user and the role it had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChange {
    pub id: Uuid,
    pub previous: Option<String>,
}

/// Grants, changes or (with `None`) removes the user's platform role.
pub async fn set_platform_role<C: ConnectionLike + Send>(
    pool: &PgPool,
    redis: &mut C,
    cache: &ScopeCache,
    email: &str,
    role: Option<PlatformRole>,
) -> Result<RoleChange, PrincipalError> {
    let email = normalize_email(email);
    let mut tx = pool.begin().await?;
    let row: Option<(Uuid, Option<String>)> =
        sqlx::query_as("SELECT id, platform_role FROM users WHERE email = $1 FOR UPDATE")
            .bind(&email)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((id, previous)) = row else {
        return Err(PrincipalError::UnknownUser(email));
    };
    sqlx::query(
        "UPDATE users SET platform_role = $2, scope_version = scope_version + 1,
         updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(role.map(PlatformRole::as_str))
    .execute(&mut *tx)
    .await?;
    cache.bump(redis, id).await?;
    tx.commit().await?;
    bump_after(cache, redis, id).await;
    Ok(RoleChange { id, previous })
}

/// Revokes the service account `client_id`: its tokens are refused from the next request on
/// and `/v1/auth/token` gives it no new ones. There is no un-revoke: create a new account.
pub async fn revoke_service_account<C: ConnectionLike + Send>(
    pool: &PgPool,
    redis: &mut C,
    cache: &ScopeCache,
    client_id: &str,
) -> Result<Changed, PrincipalError> {
    let mut tx = pool.begin().await?;
    let row: Option<(Uuid, bool)> = if client_id.len() <= 128 {
        sqlx::query_as("SELECT id, is_active FROM service_accounts WHERE client_id = $1 FOR UPDATE")
            .bind(client_id)
            .fetch_optional(&mut *tx)
            .await?
    } else {
        None
    };
    let Some((id, was_active)) = row else {
        return Err(PrincipalError::UnknownServiceAccount(client_id.to_owned()));
    };
    sqlx::query(
        "UPDATE service_accounts SET is_active = false, revoked_at = coalesce(revoked_at, now())
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    cache.bump(redis, id).await?;
    tx.commit().await?;
    bump_after(cache, redis, id).await;
    Ok(Changed {
        id,
        changed: was_active,
    })
}

/// One service account as `service-accounts list` shows it (never its secret).
#[derive(Debug, Clone)]
pub struct ServiceAccountInfo {
    pub id: Uuid,
    pub client_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub all_tenants: bool,
    pub tenants: Vec<Uuid>,
    pub active: bool,
    pub created_at: OffsetDateTime,
    pub last_used_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
}

type InfoRow = (
    Uuid,
    String,
    String,
    Vec<String>,
    bool,
    Vec<Uuid>,
    bool,
    OffsetDateTime,
    Option<OffsetDateTime>,
    Option<OffsetDateTime>,
);

/// Every service account, oldest first.
pub async fn list_service_accounts(pool: &PgPool) -> Result<Vec<ServiceAccountInfo>, sqlx::Error> {
    let rows: Vec<InfoRow> = sqlx::query_as(
        "SELECT s.id, s.client_id, s.name, s.scopes, s.all_tenants,
                coalesce(array_agg(t.tenant_id ORDER BY t.tenant_id)
                         FILTER (WHERE t.tenant_id IS NOT NULL), '{}'::uuid[]),
                s.is_active, s.created_at, s.last_used_at, s.revoked_at
         FROM service_accounts s
         LEFT JOIN service_account_tenants t ON t.service_account_id = s.id
         GROUP BY s.id
         ORDER BY s.created_at, s.id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(
                id,
                client_id,
                name,
                scopes,
                all_tenants,
                tenants,
                active,
                created_at,
                last_used_at,
                revoked_at,
            )| ServiceAccountInfo {
                id,
                client_id,
                name,
                scopes,
                all_tenants,
                tenants,
                active,
                created_at,
                last_used_at,
                revoked_at,
            },
        )
        .collect())
}

/// An operator's action as a security event (no IP: it came from the command line).
pub fn event(
    kind: EventType,
    subject: Uuid,
    email: Option<String>,
    details: serde_json::Value,
) -> SecurityEvent {
    let mut event = SecurityEvent::new(kind);
    event.user_id = Some(subject);
    event.email = email;
    let mut details = details;
    details["via"] = json!("cli");
    event.details = details;
    event
}
