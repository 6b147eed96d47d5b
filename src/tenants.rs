//! Tenants: creation with sealed secrets, and the verification keys the webhook needs.

use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use uuid::Uuid;

use crate::security::keyring::{EnvelopeError, Keyring, aad};
use crate::security::net::UrlPolicy;
use crate::security::twilio::SharedKey;

/// Why a tenant operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("a sealed value of tenant {tenant_id} could not be opened: {source}")]
    Encryption {
        tenant_id: Uuid,
        column: &'static str,
        #[source]
        source: EnvelopeError,
    },
}

/// What it takes to create a tenant.
pub struct NewTenant {
    pub name: String,
    pub twilio_account_sid: String,
    pub twilio_auth_token: SecretString,
    pub store_url: Option<String>,
    pub store_api_key: Option<SecretString>,
    pub webhook_shared_key: Option<(String, SecretString)>,
    /// Whom an owner invitation is issued for ([`create_with_invitation`]): a record for the
    /// operator only, granting nothing to whoever holds the address.
    pub owner_email: Option<String>,
}

fn is_account_sid(sid: &str) -> bool {
    sid.len() == 34 && sid.starts_with("AC") && sid[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

impl NewTenant {
    /// Checks the fields before any I/O; every problem is named.
    pub fn validate(&self) -> Result<(), TenantError> {
        let mut problems = Vec::new();
        let name = self.name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            problems.push("name must be 1 to 200 characters");
        }
        if !is_account_sid(&self.twilio_account_sid) {
            problems.push("twilio_account_sid must be AC followed by 32 hex digits");
        }
        let token = self.twilio_auth_token.expose_secret();
        if token.len() < 16 || token.len() > 256 || token.chars().any(char::is_whitespace) {
            problems.push("twilio_auth_token must be 16 to 256 characters without spaces");
        }
        if let Some(url) = &self.store_url {
            match url::Url::parse(url) {
                Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {}
                _ => problems.push("store_url must be an http(s) URL"),
            }
        }
        if let Some((id, key)) = &self.webhook_shared_key {
            if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                problems.push("webhook_shared_key_id must be 1 to 128 printable characters");
            }
            if key.expose_secret().len() < 16 {
                problems.push("webhook_shared_key must be at least 16 characters");
            }
        }
        if let Some(email) = &self.owner_email
            && !crate::accounts::looks_like_email(&crate::accounts::normalize_email(email))
        {
            problems.push("owner_email must be an address like name@example.com");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TenantError::Invalid(problems.join("; ")))
        }
    }

    /// Checks `store_url` against the network rules (`security::net`): https (http only with
    /// `DEBUG=true`), no user info, no literal non-public address outside
    /// `STORE_ALLOWED_NETWORKS`, no `localhost`. The entry points (`POST /v1/tenants`,
    /// `tenants create`) call it before `create`; names are judged again by what they resolve
    /// to whenever a sync connects (`catalog`).
    pub fn check_store_url(&self, policy: &UrlPolicy) -> Result<(), TenantError> {
        match &self.store_url {
            None => Ok(()),
            Some(url) => policy
                .check(url)
                .map(drop)
                .map_err(|refusal| TenantError::Invalid(format!("store_url {refusal}"))),
        }
    }
}

/// The store-URL rules of this configuration.
pub fn store_url_policy(config: &crate::config::Config) -> UrlPolicy {
    UrlPolicy {
        allow_http: config.debug,
        allowed_networks: config.store_allowed_networks.clone(),
    }
}

/// A created tenant, with its owner invitation when an owner email was given.
#[derive(Debug)]
pub struct Created {
    pub id: Uuid,
    /// The token in it is shown once and stored only hashed.
    pub invitation: Option<crate::invitations::Issued>,
}

/// Creates a tenant without an owner (see [`create_with_invitation`]); a `NewTenant` naming
/// an owner email is refused here, since its invitation token would be lost.
pub async fn create(
    pool: &PgPool,
    keyring: &Keyring,
    new: &NewTenant,
) -> Result<Uuid, TenantError> {
    if new.owner_email.is_some() {
        return Err(TenantError::Invalid(
            "an owner email issues an invitation: use create_with_invitation".into(),
        ));
    }
    Ok(
        create_with_invitation(pool, keyring, new, std::time::Duration::ZERO)
            .await?
            .id,
    )
}

/// Creates a tenant, sealing its secrets under the current key; with an owner email, an owner
/// invitation valid for `invite_ttl` is issued in the same transaction (no account is looked
/// at: whoever accepts the token becomes the owner). The store URL's network rules depend on
/// the configuration: callers check them first (`NewTenant::check_store_url`).
pub async fn create_with_invitation(
    pool: &PgPool,
    keyring: &Keyring,
    new: &NewTenant,
    invite_ttl: std::time::Duration,
) -> Result<Created, TenantError> {
    new.validate()?;
    let id = Uuid::new_v4();
    let row = id.to_string();
    let token = keyring.seal(
        new.twilio_auth_token.expose_secret().as_bytes(),
        &aad("tenants", "twilio_auth_token", &row),
    );
    let store_key = new.store_api_key.as_ref().map(|k| {
        keyring.seal(
            k.expose_secret().as_bytes(),
            &aad("tenants", "store_api_key", &row),
        )
    });
    let (shared_id, shared_key) = match &new.webhook_shared_key {
        Some((kid, key)) => (
            Some(kid.clone()),
            Some(keyring.seal(
                key.expose_secret().as_bytes(),
                &aad("tenants", "webhook_shared_key", &row),
            )),
        ),
        None => (None, None),
    };
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO tenants (id, name, twilio_account_sid, twilio_auth_token, store_url,
                              store_api_key, webhook_shared_key_id, webhook_shared_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(new.name.trim())
    .bind(&new.twilio_account_sid)
    .bind(token)
    .bind(&new.store_url)
    .bind(store_key)
    .bind(shared_id)
    .bind(shared_key)
    .execute(&mut *tx)
    .await?;
    let invitation = match &new.owner_email {
        Some(email) => {
            let email = crate::accounts::normalize_email(email);
            Some(crate::invitations::issue(&mut tx, id, &email, invite_ttl).await?)
        }
        None => None,
    };
    tx.commit().await?;
    Ok(Created { id, invitation })
}

/// The URL Twilio must call for `tenant_id`'s inbound messages: exactly the URL the webhook
/// rebuilds and verifies signatures against (`PUBLIC_BASE_URL`, normalized without a trailing
/// slash, then the route's path).
pub fn webhook_url(public_base: &str, tenant_id: Uuid) -> String {
    format!(
        "{}/v1/webhooks/twilio/{tenant_id}/messages",
        public_base.trim_end_matches('/')
    )
}

/// Whether a tenant with this id exists.
pub async fn exists(pool: &PgPool, tenant_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)")
        .bind(tenant_id)
        .fetch_one(pool)
        .await
}

/// A tenant's webhook verification keys, opened.
#[derive(Clone)]
pub struct VerificationKeys {
    pub auth_token: SecretString,
    /// Keys of the newer shared-key signature form.
    pub shared_keys: Vec<SharedKey>,
    pub keys_version: i64,
    /// The Twilio auth token replaced by `tenants rotate-secret --previous-valid-for`, and
    /// until when it still verifies (checked at each request, never extended by a cache).
    pub previous_auth_token: Option<(SecretString, time::OffsetDateTime)>,
    /// The same for the webhook shared key.
    pub previous_shared_key: Option<(SharedKey, time::OffsetDateTime)>,
}

impl VerificationKeys {
    /// The previous Twilio auth token, if it still verifies at `now`.
    pub fn previous_auth_token_at(&self, now: time::OffsetDateTime) -> Option<&SecretString> {
        self.previous_auth_token
            .as_ref()
            .filter(|(_, until)| now < *until)
            .map(|(token, _)| token)
    }

    /// The shared keys that verify at `now`: the current ones, and the previous one while its
    /// overlap lasts.
    pub fn shared_keys_at(&self, now: time::OffsetDateTime) -> std::borrow::Cow<'_, [SharedKey]> {
        match &self.previous_shared_key {
            Some((key, until)) if now < *until => {
                let mut keys = self.shared_keys.clone();
                keys.push(key.clone());
                std::borrow::Cow::Owned(keys)
            }
            _ => std::borrow::Cow::Borrowed(&self.shared_keys),
        }
    }
}

impl std::fmt::Debug for VerificationKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKeys")
            .field("keys_version", &self.keys_version)
            .finish_non_exhaustive()
    }
}

fn open_text(
    keyring: &Keyring,
    tenant_id: Uuid,
    column: &'static str,
    sealed: &[u8],
) -> Result<SecretString, TenantError> {
    let plain = keyring
        .open(sealed, &aad("tenants", column, &tenant_id.to_string()))
        .map_err(|source| TenantError::Encryption {
            tenant_id,
            column,
            source,
        })?;
    let text = String::from_utf8(plain.to_vec())
        .map_err(|_| TenantError::Invalid(format!("{column} is not UTF-8")))?;
    Ok(SecretString::from(text))
}

/// Loads and opens a tenant's verification keys; `None` for an unknown tenant.
pub async fn verification_keys(
    pool: &PgPool,
    keyring: &Keyring,
    tenant_id: Uuid,
) -> Result<Option<VerificationKeys>, TenantError> {
    #[derive(sqlx::FromRow)]
    struct KeyRow {
        twilio_auth_token: Vec<u8>,
        webhook_shared_key_id: Option<String>,
        webhook_shared_key: Option<Vec<u8>>,
        keys_version: i64,
        twilio_auth_token_previous: Option<Vec<u8>>,
        twilio_auth_token_previous_until: Option<time::OffsetDateTime>,
        webhook_shared_key_previous_id: Option<String>,
        webhook_shared_key_previous: Option<Vec<u8>>,
        webhook_shared_key_previous_until: Option<time::OffsetDateTime>,
    }
    // Previous secrets only while their overlap lasts.
    let row: Option<KeyRow> = sqlx::query_as(
        "SELECT twilio_auth_token, webhook_shared_key_id, webhook_shared_key, keys_version,
                CASE WHEN twilio_auth_token_previous_until > now()
                     THEN twilio_auth_token_previous END AS twilio_auth_token_previous,
                twilio_auth_token_previous_until,
                webhook_shared_key_previous_id,
                CASE WHEN webhook_shared_key_previous_until > now()
                     THEN webhook_shared_key_previous END AS webhook_shared_key_previous,
                webhook_shared_key_previous_until
         FROM tenants WHERE id = $1",
    )
    .bind(tenant_id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let auth_token = open_text(
        keyring,
        tenant_id,
        "twilio_auth_token",
        &row.twilio_auth_token,
    )?;
    let keys_version = row.keys_version;
    let shared_keys = match (row.webhook_shared_key_id, row.webhook_shared_key) {
        (Some(kid), Some(sealed)) => {
            let key = open_text(keyring, tenant_id, "webhook_shared_key", &sealed)?;
            vec![SharedKey::new(kid, key.expose_secret().as_bytes().to_vec())]
        }
        _ => Vec::new(),
    };
    let previous_auth_token = match (
        row.twilio_auth_token_previous,
        row.twilio_auth_token_previous_until,
    ) {
        (Some(sealed), Some(until)) => Some((
            open_text(keyring, tenant_id, "twilio_auth_token_previous", &sealed)?,
            until,
        )),
        _ => None,
    };
    let previous_shared_key = match (
        row.webhook_shared_key_previous_id,
        row.webhook_shared_key_previous,
        row.webhook_shared_key_previous_until,
    ) {
        (Some(kid), Some(sealed), Some(until)) => {
            let key = open_text(keyring, tenant_id, "webhook_shared_key_previous", &sealed)?;
            Some((
                SharedKey::new(kid, key.expose_secret().as_bytes().to_vec()),
                until,
            ))
        }
        _ => None,
    };
    Ok(Some(VerificationKeys {
        auth_token,
        shared_keys,
        keys_version,
        previous_auth_token,
        previous_shared_key,
    }))
}
