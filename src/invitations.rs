//! Owner invitations (SPEC "Tenant boundary"): a single-use, expiring token that makes the
//! signed-in user who presents it a tenant's `owner`.
//!
//! The token is 32 random bytes (URL-safe base64 without padding), shown once to whoever
//! created the tenant; only its SHA-256 hash is stored (`tenant_invitations.token_hash`). The
//! email an invitation was issued for is the operator's record, nothing more: holding that
//! address grants nothing. Accepting happens in one transaction: the invitation row locked
//! (`FOR UPDATE`), checked unused and unexpired, the membership upserted as `owner`, the row
//! marked accepted, and the user's scope version bumped before and after the commit (as
//! [`access::set_member_role`] does), so the new membership counts from the user's next
//! request. Unknown, used and expired tokens are one answer to the caller ([`Refusal`] tells
//! them apart for the security event only).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use redis::aio::ConnectionLike;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::access::{self, ScopeCache, TenantRole};

/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;
/// Longest token looked at: anything longer is not one of ours (43 characters are).
const MAX_TOKEN_CHARS: usize = 128;

/// Why a presented token was refused (the caller sees one answer for all of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    Used,
    Expired,
}

impl From<access::BumpError> for InvitationError {
    fn from(error: access::BumpError) -> Self {
        match error {
            access::BumpError::Database(e) => InvitationError::Database(e),
            access::BumpError::Cache(e) => InvitationError::Cache(e),
        }
    }
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unknown => "unknown",
            Refusal::Used => "used",
            Refusal::Expired => "expired",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InvitationError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the scope cache (Redis) cannot be updated: {0}")]
    Cache(#[from] redis::RedisError),
    /// Unknown, used or expired; `tenant_id` and `invitation_id` when the token was ours.
    #[error("no such invitation")]
    Refused {
        refusal: Refusal,
        invitation_id: Option<Uuid>,
        tenant_id: Option<Uuid>,
    },
}

/// A freshly issued invitation. `token` is shown once and never stored.
pub struct Issued {
    pub id: Uuid,
    pub token: SecretString,
    pub expires_at: OffsetDateTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("id", &self.id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// An accepted invitation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub invitation_id: Uuid,
    pub tenant_id: Uuid,
    pub role: TenantRole,
}

/// The stored form of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn new_token() -> SecretString {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    SecretString::from(URL_SAFE_NO_PAD.encode(bytes))
}

/// Issues an owner invitation to `tenant_id` for `email` (the record of whom it was meant
/// for), valid for `ttl`, inside the caller's transaction.
pub async fn issue(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    email: &str,
    ttl: Duration,
) -> Result<Issued, sqlx::Error> {
    let token = new_token();
    let hash = token_hash(token.expose_secret());
    let ttl_seconds = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
    let (id, expires_at): (Uuid, OffsetDateTime) = sqlx::query_as(
        "INSERT INTO tenant_invitations (tenant_id, email, token_hash, expires_at)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4::double precision))
         RETURNING id, expires_at",
    )
    .bind(tenant_id)
    .bind(email)
    .bind(&hash[..])
    .bind(ttl_seconds as f64)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Issued {
        id,
        token,
        expires_at,
    })
}

/// Makes `user_id` the owner of the tenant `token` invites to, and uses the invitation up,
/// in one transaction; concurrent accepts of one token serialize on its row, and exactly one
/// wins. Fails without changing anything when Redis cannot take the first scope bump.
pub async fn accept<C: ConnectionLike + Send>(
    pool: &PgPool,
    redis: &mut C,
    cache: &ScopeCache,
    token: &str,
    user_id: Uuid,
) -> Result<Accepted, InvitationError> {
    let refused = |refusal, invitation_id, tenant_id| InvitationError::Refused {
        refusal,
        invitation_id,
        tenant_id,
    };
    if token.is_empty() || token.len() > MAX_TOKEN_CHARS {
        return Err(refused(Refusal::Unknown, None, None));
    }
    let hash = token_hash(token);
    let mut tx = pool.begin().await?;
    let row: Option<(Uuid, Uuid, Vec<u8>, bool, bool)> = sqlx::query_as(
        "SELECT id, tenant_id, token_hash, accepted_at IS NOT NULL, expires_at <= now()
           FROM tenant_invitations WHERE token_hash = $1 FOR UPDATE",
    )
    .bind(&hash[..])
    .fetch_optional(&mut *tx)
    .await?;
    let Some((id, tenant_id, stored, used, expired)) = row else {
        return Err(refused(Refusal::Unknown, None, None));
    };
    // The index found it by hash; the secret-derived comparison itself is constant time.
    if !bool::from(stored.as_slice().ct_eq(&hash[..])) {
        return Err(refused(Refusal::Unknown, None, None));
    }
    if used {
        return Err(refused(Refusal::Used, Some(id), Some(tenant_id)));
    }
    if expired {
        return Err(refused(Refusal::Expired, Some(id), Some(tenant_id)));
    }
    // The lock every membership change takes first (`access::set_member_role`).
    sqlx::query("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
        .bind(tenant_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2, 'owner')
         ON CONFLICT (tenant_id, user_id) DO UPDATE SET role = 'owner', updated_at = now()",
    )
    .bind(tenant_id)
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE tenant_invitations SET accepted_at = now(), accepted_by = $2 WHERE id = $1",
    )
    .bind(id)
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    access::bump_scope_version(&mut tx, redis, cache, user_id).await?;
    tx.commit().await?;
    access::bump_after_commit(redis, cache, user_id).await;
    Ok(Accepted {
        invitation_id: id,
        tenant_id,
        role: TenantRole::Owner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_32_random_bytes_url_safe_and_unique() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a.expose_secret(), b.expose_secret());
        let raw = URL_SAFE_NO_PAD
            .decode(a.expose_secret())
            .unwrap_or_default();
        assert_eq!(raw.len(), TOKEN_BYTES);
        assert!(
            a.expose_secret()
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }

    #[test]
    fn the_stored_hash_is_sha256_of_the_token() {
        assert_eq!(
            hex(&token_hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
