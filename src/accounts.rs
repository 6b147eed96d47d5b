//! People and producer services: registration, password login, service-account
//! credentials, and the `migrate` step that wraps legacy SHA-256 hashes.

use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use uuid::Uuid;

use crate::access::{PlatformRole, Scope};
use crate::security::password::{self, Hasher, PasswordError, Verified};

/// Shortest password accepted at registration (characters).
pub const MIN_PASSWORD_CHARS: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{0}")]
    Invalid(String),
    #[error("an account with this email already exists")]
    EmailTaken,
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("password hashing: {0}")]
    Password(#[from] PasswordError),
}

/// A user to create.
#[derive(Debug)]
pub struct NewUser {
    pub email: String,
    pub password: SecretString,
    pub first_name: String,
    pub last_name: String,
    pub platform_role: Option<PlatformRole>,
}

/// An email as stored: trimmed and lower-cased.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Whether a value typed into an email field has an email address's shape: at most 254
/// characters, exactly one `@` between a non-empty local part and a non-empty domain holding a
/// dot, no whitespace or control characters. Security events store an email only when it
/// does (a password typed into the wrong box must not end up in the event, the log or Sentry).
pub fn looks_like_email(value: &str) -> bool {
    if value.is_empty()
        || value.chars().count() > 254
        || value.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return false;
    }
    let mut parts = value.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
}

fn validate_email(email: &str) -> Result<(), AccountError> {
    let bad = || AccountError::Invalid("email must be an address like name@example.com".into());
    if email.len() < 3
        || email.len() > 320
        || email.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad());
    }
    let (local, domain) = email.rsplit_once('@').ok_or_else(bad)?;
    if local.is_empty() || local.len() > 64 || domain.is_empty() || domain.contains('@') {
        return Err(bad());
    }
    if !domain.contains('.') || domain.starts_with('.') || domain.ends_with('.') {
        return Err(bad());
    }
    Ok(())
}

fn validate_name(field: &str, value: &str) -> Result<(), AccountError> {
    let n = value.trim().chars().count();
    if n == 0 || n > 100 || value.chars().any(char::is_control) {
        return Err(AccountError::Invalid(format!(
            "{field} must be 1 to 100 characters without control characters"
        )));
    }
    Ok(())
}

fn validate_password(password: &SecretString) -> Result<(), AccountError> {
    let p = password.expose_secret();
    if p.chars().count() < MIN_PASSWORD_CHARS {
        return Err(AccountError::Invalid(format!(
            "password must be at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if p.len() > password::MAX_PASSWORD_BYTES {
        return Err(AccountError::Invalid(format!(
            "password must be at most {} bytes",
            password::MAX_PASSWORD_BYTES
        )));
    }
    Ok(())
}

impl NewUser {
    /// Checks every field; the error names the field, never the password.
    pub fn validate(&mut self) -> Result<(), AccountError> {
        self.email = normalize_email(&self.email);
        validate_email(&self.email)?;
        validate_name("first_name", &self.first_name)?;
        validate_name("last_name", &self.last_name)?;
        validate_password(&self.password)?;
        Ok(())
    }
}

/// Creates a user with an argon2id hash of its password.
pub async fn create_user(
    pool: &PgPool,
    hasher: &Hasher,
    mut new: NewUser,
) -> Result<Uuid, AccountError> {
    new.validate()?;
    let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM users WHERE email = $1")
        .bind(&new.email)
        .fetch_optional(pool)
        .await?;
    if exists.is_some() {
        return Err(AccountError::EmailTaken);
    }
    let hash = hasher.hash(&new.password).await?;
    let id = Uuid::new_v4();
    let inserted = sqlx::query(
        "INSERT INTO users (id, email, password_hash, first_name, last_name, platform_role)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (email) DO NOTHING",
    )
    .bind(id)
    .bind(&new.email)
    .bind(hash)
    .bind(new.first_name.trim())
    .bind(new.last_name.trim())
    .bind(new.platform_role.map(PlatformRole::as_str))
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(AccountError::EmailTaken);
    }
    Ok(id)
}

/// The result of a password login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    Ok(Uuid),
    /// Wrong password, unknown email, inactive account, or an unacceptable stored hash:
    /// all look the same to the caller. `user_id` is set when the account exists.
    Invalid {
        user_id: Option<Uuid>,
    },
}

/// Checks an email and password. Unknown emails cost the same argon2 work as wrong
/// passwords. A right password under a legacy or weaker hash replaces that hash.
pub async fn login(
    pool: &PgPool,
    hasher: &Hasher,
    email: &str,
    password: &SecretString,
) -> Result<Login, AccountError> {
    let email = normalize_email(email);
    let row: Option<(Uuid, String, bool)> =
        sqlx::query_as("SELECT id, password_hash, is_active FROM users WHERE email = $1")
            .bind(&email)
            .fetch_optional(pool)
            .await?;
    let (user_id, stored, active) = match row {
        Some((id, hash, active)) => (Some(id), Some(hash), active),
        None => (None, None, false),
    };
    let verified = match hasher.verify(stored.clone(), password).await {
        Ok(v) => v,
        Err(PasswordError::Malformed) => {
            tracing::error!(user.id = ?user_id, "stored password hash is malformed");
            Verified::Mismatch
        }
        Err(e) => return Err(e.into()),
    };
    let (Some(id), Some(old)) = (user_id, stored) else {
        return Ok(Login::Invalid { user_id: None });
    };
    match verified {
        Verified::Mismatch => Ok(Login::Invalid { user_id }),
        _ if !active => Ok(Login::Invalid { user_id }),
        Verified::Ok => Ok(Login::Ok(id)),
        Verified::OkRehash(new) => {
            // Compare-and-set: a concurrent login's upgrade is not overwritten.
            sqlx::query(
                "UPDATE users SET password_hash = $2, updated_at = now()
                 WHERE id = $1 AND password_hash = $3",
            )
            .bind(id)
            .bind(new)
            .bind(old)
            .execute(pool)
            .await?;
            tracing::info!(user.id = %id, "password hash upgraded");
            Ok(Login::Ok(id))
        }
    }
}

/// Wraps every bare legacy SHA-256 hash in argon2id; returns how many were wrapped. Safe to
/// run again and concurrently (each row is replaced only if it still holds the bare digest).
pub async fn wrap_legacy_hashes(pool: &PgPool, hasher: &Hasher) -> Result<u64, AccountError> {
    let mut wrapped = 0u64;
    loop {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT id, password_hash FROM users WHERE password_hash ~ '^[0-9a-fA-F]{64}$'
             ORDER BY id LIMIT 64",
        )
        .fetch_all(pool)
        .await?;
        if rows.is_empty() {
            return Ok(wrapped);
        }
        let hashed = futures::future::join_all(rows.iter().map(|(id, bare)| {
            let hasher = hasher.clone();
            let bare = bare.clone();
            let id = *id;
            async move { (id, hasher.wrap_legacy(bare).await) }
        }))
        .await;
        let mut progressed = false;
        for ((id, bare), (_, result)) in rows.iter().zip(hashed) {
            let new = result?;
            let done = sqlx::query(
                "UPDATE users SET password_hash = $2, updated_at = now()
                 WHERE id = $1 AND password_hash = $3",
            )
            .bind(id)
            .bind(new)
            .bind(bare)
            .execute(pool)
            .await?;
            if done.rows_affected() == 1 {
                wrapped += 1;
            }
            progressed = true;
        }
        if !progressed {
            return Ok(wrapped);
        }
    }
}

/// A new service account's credentials; the secret is shown once and stored hashed.
#[derive(Debug)]
pub struct ServiceCredentials {
    pub id: Uuid,
    pub client_id: String,
    pub client_secret: SecretString,
}

fn random_token(bytes: usize) -> String {
    use base64::Engine;
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// Which tenants a service account may enqueue for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantBinding {
    /// Every tenant (`--all-tenants`), explicitly.
    All,
    /// Only these (`--tenant`, at least one, each an existing tenant).
    Tenants(Vec<Uuid>),
}

/// Creates a platform-wide service account with `scopes` (only those a service may hold):
/// [`create_bound_service_account`] with [`TenantBinding::All`]. The CLI makes operators
/// choose a binding; this is for callers that mean every tenant.
pub async fn create_service_account(
    pool: &PgPool,
    hasher: &Hasher,
    name: &str,
    scopes: &[String],
) -> Result<ServiceCredentials, AccountError> {
    create_bound_service_account(pool, hasher, name, scopes, &TenantBinding::All).await
}

/// Creates a service account with `scopes`, bound to `binding`'s tenants. A bound account may
/// hold `jobs:enqueue` only (the other service scopes are platform-wide by nature); every
/// bound tenant must exist. Nothing is written when anything is refused.
pub async fn create_bound_service_account(
    pool: &PgPool,
    hasher: &Hasher,
    name: &str,
    scopes: &[String],
    binding: &TenantBinding,
) -> Result<ServiceCredentials, AccountError> {
    validate_name("name", name)?;
    if scopes.is_empty() {
        return Err(AccountError::Invalid(
            "at least one --scope is required".into(),
        ));
    }
    let mut parsed = Vec::new();
    for s in scopes {
        match Scope::parse(s) {
            Some(scope) if scope.grantable_to_service() => parsed.push(scope.as_str()),
            Some(_) => {
                return Err(AccountError::Invalid(format!(
                    "scope {s} cannot be held by a service account (tenant scopes come with a membership; keys:rotate needs people)"
                )));
            }
            None => return Err(AccountError::Invalid(format!("unknown scope {s}"))),
        }
    }
    parsed.sort_unstable();
    parsed.dedup();
    let mut tenants = match binding {
        TenantBinding::All => Vec::new(),
        TenantBinding::Tenants(tenants) => {
            if tenants.is_empty() {
                return Err(AccountError::Invalid(
                    "a service account is bound to at least one --tenant, or to --all-tenants"
                        .into(),
                ));
            }
            if let Some(wide) = parsed.iter().find(|s| **s != Scope::JobsEnqueue.as_str()) {
                return Err(AccountError::Invalid(format!(
                    "scope {wide} is platform-wide: an account holding it needs --all-tenants (--tenant binds jobs:enqueue only)"
                )));
            }
            tenants.clone()
        }
    };
    tenants.sort_unstable();
    tenants.dedup();
    if !tenants.is_empty() {
        let known: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM tenants WHERE id = ANY($1)")
            .bind(&tenants)
            .fetch_all(pool)
            .await?;
        let unknown: Vec<String> = tenants
            .iter()
            .filter(|t| !known.contains(t))
            .map(Uuid::to_string)
            .collect();
        if !unknown.is_empty() {
            return Err(AccountError::Invalid(format!(
                "no tenant with id {}",
                unknown.join(", ")
            )));
        }
    }
    let client_id = format!("gh_{}", random_token(12));
    let client_secret = SecretString::from(random_token(32));
    let hash = hasher.hash(&client_secret).await?;
    let id = Uuid::new_v4();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO service_accounts (id, name, client_id, secret_hash, scopes, all_tenants)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(name.trim())
    .bind(&client_id)
    .bind(hash)
    .bind(&parsed)
    .bind(*binding == TenantBinding::All)
    .execute(&mut *tx)
    .await?;
    // A tenant deleted since the check above fails the insert (foreign key): nothing stays.
    sqlx::query(
        "INSERT INTO service_account_tenants (service_account_id, tenant_id)
         SELECT $1, unnest($2::uuid[])",
    )
    .bind(id)
    .bind(&tenants)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(ServiceCredentials {
        id,
        client_id,
        client_secret,
    })
}

/// Checks a service account's client id and secret; `None` for any failure (unknown id,
/// wrong secret, inactive), after the same argon2 work.
pub async fn authenticate_service(
    pool: &PgPool,
    hasher: &Hasher,
    client_id: &str,
    secret: &SecretString,
) -> Result<Option<Uuid>, AccountError> {
    let row: Option<(Uuid, String, bool)> = if client_id.len() <= 128 {
        sqlx::query_as(
            "SELECT id, secret_hash, is_active FROM service_accounts WHERE client_id = $1",
        )
        .bind(client_id)
        .fetch_optional(pool)
        .await?
    } else {
        None
    };
    let stored = row.as_ref().map(|(_, h, _)| h.clone());
    let verified = match hasher.verify(stored, secret).await {
        Ok(v) => v,
        Err(PasswordError::Malformed) => Verified::Mismatch,
        Err(e) => return Err(e.into()),
    };
    match (row, verified) {
        (Some((id, _, true)), Verified::Ok | Verified::OkRehash(_)) => {
            // For `service-accounts list`: once per token, never per request. Losing this
            // write costs a stale time, never the token.
            if let Err(error) =
                sqlx::query("UPDATE service_accounts SET last_used_at = now() WHERE id = $1")
                    .bind(id)
                    .execute(pool)
                    .await
            {
                tracing::warn!(service_account.id = %id, %error, "cannot record last_used_at");
            }
            Ok(Some(id))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(email: &str, password: &str) -> NewUser {
        NewUser {
            email: email.into(),
            password: SecretString::from(password),
            first_name: "Ada".into(),
            last_name: "Lovelace".into(),
            platform_role: None,
        }
    }

    #[test]
    fn emails_are_normalized_and_checked() {
        let mut u = user("  Ada@Example.COM ", "a long enough password");
        assert!(u.validate().is_ok());
        assert_eq!(u.email, "ada@example.com");
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "ada@localhost",
            "a da@example.com",
            "ada@.com",
        ] {
            assert!(
                user(bad, "a long enough password").validate().is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_values_shaped_like_an_address_count_as_emails() {
        for good in ["ada@example.com", "a.b+c@sub.example.org"] {
            assert!(looks_like_email(good), "{good}");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        for bad in [
            "",
            "correct horse battery staple",
            "hunter2",
            "@example.com",
            "ada@",
            "ada@localhost",
            "a@b@example.com",
            "ada @example.com",
            "ada@example.com\n",
            "ada@.com",
            "ada@example.",
            long.as_str(),
        ] {
            assert!(!looks_like_email(bad), "{bad}");
        }
    }

    #[test]
    fn short_and_overlong_passwords_are_refused_without_echoing_them() {
        let err = user("a@example.com", "short").validate().err();
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("at least 12"), "{text}");
        assert!(!text.contains("short"));
        let long = "x".repeat(password::MAX_PASSWORD_BYTES + 1);
        assert!(user("a@example.com", &long).validate().is_err());
    }

    #[test]
    fn random_tokens_are_unique_and_url_safe() {
        let a = random_token(32);
        let b = random_token(32);
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }
}
