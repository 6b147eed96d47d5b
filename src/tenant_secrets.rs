//! Replacing a tenant's secrets (`gatehouse tenants rotate-secret`) and telling every ingress.
//!
//! The new value is sealed to its row and column like any tenant secret, in one transaction
//! that locks the row. For the Twilio auth token and the webhook shared key, the value being
//! replaced can keep verifying for an overlap (`--previous-valid-for`), as when Twilio's
//! secondary token is promoted: it moves, re-sealed under the `…_previous` column's AAD, with
//! the time its overlap ends; the webhook checks that time on every request, so no cache keeps
//! it alive longer. The store key has no overlap (gatehouse is the one that sends it).
//!
//! Every ingress keeps tenants' opened keys in memory (`http::key_cache`). After the commit, the
//! tenant id is published on `{ns}:tenant-keys` ([`notify`]); each ingress listens
//! (`http::key_notices`, reading them with [`decode_notice`]) and drops
//! that tenant's entry, so the next webhook reads the new keys (within milliseconds). If the
//! notice cannot be sent or an ingress was not listening at that moment, its entry is
//! refreshed within `TENANT_KEY_CACHE_SECONDS` anyway, and an ingress that reconnects marks
//! every entry for a refresh.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use uuid::Uuid;

use crate::security::keyring::{Keyring, aad};

/// A tenant secret that can be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secret {
    TwilioAuthToken,
    StoreApiKey,
    WebhookSharedKey,
}

impl Secret {
    /// The names `--secret` takes (and the stdin names of the new value).
    pub const NAMES: [&'static str; 3] =
        ["twilio_auth_token", "store_api_key", "webhook_shared_key"];

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "twilio_auth_token" => Some(Self::TwilioAuthToken),
            "store_api_key" => Some(Self::StoreApiKey),
            "webhook_shared_key" => Some(Self::WebhookSharedKey),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::TwilioAuthToken => "twilio_auth_token",
            Self::StoreApiKey => "store_api_key",
            Self::WebhookSharedKey => "webhook_shared_key",
        }
    }

    /// Whether the previous value may keep verifying for an overlap.
    pub fn has_overlap(self) -> bool {
        !matches!(self, Self::StoreApiKey)
    }
}

/// The new value of a secret.
pub enum NewValue {
    /// The Twilio auth token or the store key.
    Plain(SecretString),
    /// A webhook shared key and its key id.
    SharedKey { id: String, key: SecretString },
}

impl std::fmt::Debug for NewValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plain(_) => f.write_str("Plain(…)"),
            Self::SharedKey { id, .. } => f.debug_struct("SharedKey").field("id", id).finish(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("no such tenant")]
    UnknownTenant,
    #[error("{0}")]
    Invalid(String),
    #[error("the tenant's current {0} does not open with the configured keys")]
    CannotOpen(&'static str),
}

/// The longest overlap (`--previous-valid-for`): a week.
pub const MAX_OVERLAP: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a rotation did, for the operator's confirmation line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub keys_version: i64,
    /// Until when the previous value still verifies, if it does.
    pub previous_until: Option<time::OffsetDateTime>,
}

/// Replaces one secret of `tenant_id`. With `overlap` > 0 (Twilio token or shared key only),
/// the replaced value keeps verifying that long.
pub async fn rotate(
    pool: &PgPool,
    keyring: &Keyring,
    tenant_id: Uuid,
    secret: Secret,
    new: &NewValue,
    overlap: Duration,
) -> Result<Rotated, RotateError> {
    if !overlap.is_zero() && !secret.has_overlap() {
        return Err(RotateError::Invalid(
            "--previous-valid-for applies to twilio_auth_token and webhook_shared_key only: the store key is gatehouse's to send".into(),
        ));
    }
    if overlap > MAX_OVERLAP {
        return Err(RotateError::Invalid(
            "--previous-valid-for is at most 604800 seconds (a week)".into(),
        ));
    }
    let row = tenant_id.to_string();
    let seal = |column: &str, value: &[u8]| keyring.seal(value, &aad("tenants", column, &row));
    let mut tx = pool.begin().await?;
    #[derive(sqlx::FromRow)]
    struct Current {
        twilio_auth_token: Vec<u8>,
        webhook_shared_key_id: Option<String>,
        webhook_shared_key: Option<Vec<u8>>,
    }
    let current: Option<Current> = sqlx::query_as(
        "SELECT twilio_auth_token, webhook_shared_key_id, webhook_shared_key
         FROM tenants WHERE id = $1 FOR UPDATE",
    )
    .bind(tenant_id)
    .fetch_optional(&mut *tx)
    .await?;
    let current = current.ok_or(RotateError::UnknownTenant)?;
    // The replaced value, re-sealed for its `_previous` column (values are bound to their
    // column), when it keeps verifying.
    let reseal_previous = |column: &'static str, sealed: &[u8]| {
        keyring
            .open(sealed, &aad("tenants", column, &row))
            .map(|plain| seal(&format!("{column}_previous"), &plain))
            .map_err(|_| RotateError::CannotOpen(column))
    };
    let overlap_secs = overlap.as_secs_f64();
    let keys_version: i64 = match (secret, new) {
        (Secret::TwilioAuthToken, NewValue::Plain(token)) => {
            let token = token.expose_secret().trim();
            if token.is_empty() {
                return Err(RotateError::Invalid("twilio_auth_token is empty".into()));
            }
            let previous = if overlap.is_zero() {
                None
            } else {
                Some(reseal_previous(
                    "twilio_auth_token",
                    &current.twilio_auth_token,
                )?)
            };
            sqlx::query_scalar(
                "UPDATE tenants SET twilio_auth_token = $2,
                        twilio_auth_token_previous = $3,
                        twilio_auth_token_previous_until =
                            CASE WHEN $3::bytea IS NULL THEN NULL
                                 ELSE now() + make_interval(secs => $4) END,
                        keys_version = keys_version + 1
                 WHERE id = $1 RETURNING keys_version",
            )
            .bind(tenant_id)
            .bind(seal("twilio_auth_token", token.as_bytes()))
            .bind(previous)
            .bind(overlap_secs)
            .fetch_one(&mut *tx)
            .await?
        }
        (Secret::WebhookSharedKey, NewValue::SharedKey { id, key }) => {
            let id = id.trim();
            if id.is_empty() || key.expose_secret().is_empty() {
                return Err(RotateError::Invalid(
                    "webhook_shared_key_id and webhook_shared_key must not be empty".into(),
                ));
            }
            let previous = match (&current.webhook_shared_key_id, &current.webhook_shared_key) {
                (Some(kid), Some(sealed)) if !overlap.is_zero() => {
                    Some((kid.clone(), reseal_previous("webhook_shared_key", sealed)?))
                }
                _ => None,
            };
            let (previous_id, previous_key) = previous.unzip();
            sqlx::query_scalar(
                "UPDATE tenants SET webhook_shared_key_id = $2, webhook_shared_key = $3,
                        webhook_shared_key_previous_id = $4,
                        webhook_shared_key_previous = $5,
                        webhook_shared_key_previous_until =
                            CASE WHEN $5::bytea IS NULL THEN NULL
                                 ELSE now() + make_interval(secs => $6) END,
                        keys_version = keys_version + 1
                 WHERE id = $1 RETURNING keys_version",
            )
            .bind(tenant_id)
            .bind(id)
            .bind(seal("webhook_shared_key", key.expose_secret().as_bytes()))
            .bind(previous_id)
            .bind(previous_key)
            .bind(overlap_secs)
            .fetch_one(&mut *tx)
            .await?
        }
        (Secret::StoreApiKey, NewValue::Plain(key)) => {
            let key = key.expose_secret().trim();
            if key.is_empty() {
                return Err(RotateError::Invalid("store_api_key is empty".into()));
            }
            sqlx::query_scalar(
                "UPDATE tenants SET store_api_key = $2, keys_version = keys_version + 1
                 WHERE id = $1 RETURNING keys_version",
            )
            .bind(tenant_id)
            .bind(seal("store_api_key", key.as_bytes()))
            .fetch_one(&mut *tx)
            .await?
        }
        _ => {
            return Err(RotateError::Invalid(format!(
                "the new value does not fit {}",
                secret.as_str()
            )));
        }
    };
    let previous_until: Option<time::OffsetDateTime> = if overlap.is_zero() {
        None
    } else {
        let column = match secret {
            Secret::TwilioAuthToken => "twilio_auth_token_previous_until",
            _ => "webhook_shared_key_previous_until",
        };
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {column} FROM tenants WHERE id = $1"
        )))
        .bind(tenant_id)
        .fetch_one(&mut *tx)
        .await?
    };
    tx.commit().await?;
    Ok(Rotated {
        keys_version,
        previous_until,
    })
}

/// The channel tenant-key changes are published on.
pub fn channel(namespace: &str) -> String {
    format!("{namespace}:tenant-keys")
}

/// Tells every ingress that `tenant_id`'s keys changed. Returns how many listened.
pub async fn notify(
    redis: &mut impl redis::aio::ConnectionLike,
    namespace: &str,
    tenant_id: Uuid,
) -> Result<i64, redis::RedisError> {
    redis::cmd("PUBLISH")
        .arg(channel(namespace))
        .arg(tenant_id.to_string())
        .query_async(redis)
        .await
}

/// The tenant a notice on [`channel`] names (`None` for a payload that is not one).
pub fn decode_notice(payload: &str) -> Option<Uuid> {
    Uuid::parse_str(payload).ok()
}
