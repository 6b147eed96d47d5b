//! The ingress's in-memory cache of tenants' webhook verification keys.
//!
//! A fresh entry (younger than `TENANT_KEY_CACHE_SECONDS`) is used as is. An older one is
//! re-read from PostgreSQL; if PostgreSQL cannot answer, the old entry keeps serving for up
//! to `max_stale`, so signed messages keep flowing into Redis through an outage of minutes.
//! A tenant the cache has never seen cannot be verified during an outage: the caller
//! answers 503, never 200 and never a dropped message. Unknown tenants are cached too (as
//! such), so random tenant ids cannot hammer the database.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::RwLock;
use uuid::Uuid;

use crate::security::keyring::Keyring;
use crate::tenants::{TenantError, VerificationKeys, verification_keys};

/// At most this many tenants are cached; past it the oldest entries are dropped.
const MAX_ENTRIES: usize = 50_000;

#[derive(Clone)]
struct Entry {
    keys: Option<Arc<VerificationKeys>>,
    fetched: Instant,
}

/// Why keys could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyCacheError {
    #[error("the database is unavailable and no cached keys are recent enough")]
    Unavailable(#[source] sqlx::Error),
    #[error(transparent)]
    Tenant(TenantError),
}

pub struct KeyCache {
    entries: RwLock<HashMap<Uuid, Entry>>,
    ttl: Duration,
    max_stale: Duration,
}

impl KeyCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
            ttl,
            max_stale: (ttl * 12).max(Duration::from_secs(3600)),
        }
    }

    /// Drops a tenant's entry (after its keys change).
    pub async fn invalidate(&self, tenant_id: Uuid) {
        self.entries.write().await.remove(&tenant_id);
    }

    /// The tenant's keys, `None` for an unknown tenant.
    pub async fn get(
        &self,
        pool: &PgPool,
        keyring: &Keyring,
        tenant_id: Uuid,
    ) -> Result<Option<Arc<VerificationKeys>>, KeyCacheError> {
        let cached = self.entries.read().await.get(&tenant_id).cloned();
        if let Some(entry) = &cached
            && entry.fetched.elapsed() < self.ttl
        {
            return Ok(entry.keys.clone());
        }
        match verification_keys(pool, keyring, tenant_id).await {
            Ok(keys) => {
                let keys = keys.map(Arc::new);
                let mut entries = self.entries.write().await;
                if entries.len() >= MAX_ENTRIES {
                    let ttl = self.ttl;
                    entries.retain(|_, e| e.fetched.elapsed() < ttl);
                    if entries.len() >= MAX_ENTRIES {
                        entries.clear();
                    }
                }
                entries.insert(
                    tenant_id,
                    Entry {
                        keys: keys.clone(),
                        fetched: Instant::now(),
                    },
                );
                Ok(keys)
            }
            Err(TenantError::Database(error)) => match cached {
                Some(entry) if entry.fetched.elapsed() < self.max_stale => {
                    tracing::warn!(tenant.id = %tenant_id, %error, "database unavailable, using cached webhook keys");
                    Ok(entry.keys)
                }
                _ => Err(KeyCacheError::Unavailable(error)),
            },
            Err(other) => Err(KeyCacheError::Tenant(other)),
        }
    }
}
