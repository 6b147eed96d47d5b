//! The ingress's in-memory cache of tenants' webhook verification keys.
//!
//! An entry younger than `TENANT_KEY_CACHE_SECONDS` is used as is. An older one is still
//! used for the request at hand while one background task per tenant re-reads it from
//! PostgreSQL (stale-while-revalidate), so a slow or unreachable database adds no latency
//! to webhooks of tenants the ingress has recently served, and signed messages keep flowing
//! into Redis through an outage of minutes. Past `max_stale` an entry is no longer trusted
//! and is re-read inline. A tenant the cache has never seen cannot be verified during an
//! outage: the caller answers 503, never 200 and never a dropped message. Unknown tenants
//! are cached too (as such), so random tenant ids cannot hammer the database.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::RwLock;
use uuid::Uuid;

use crate::security::keyring::Keyring;
use crate::tenants::{TenantError, VerificationKeys, verification_keys};

/// At most this many tenants are cached; past it expired entries are dropped.
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
    /// Tenants whose background refresh is running (one at a time per tenant).
    refreshing: Mutex<HashSet<Uuid>>,
    ttl: Duration,
    max_stale: Duration,
}

impl KeyCache {
    pub fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            entries: RwLock::new(HashMap::new()),
            refreshing: Mutex::new(HashSet::new()),
            ttl,
            max_stale: (ttl * 12).max(Duration::from_secs(3600)),
        })
    }

    /// Drops a tenant's entry (after its keys change).
    pub async fn invalidate(&self, tenant_id: Uuid) {
        self.entries.write().await.remove(&tenant_id);
    }

    /// Whether the tenant's keys are in memory and still trusted, so [`KeyCache::get`] would
    /// answer without PostgreSQL (the webhook lets such a tenant's messages through from an
    /// address past its budget of refused requests).
    pub async fn holds_keys(&self, tenant_id: Uuid) -> bool {
        self.entries
            .read()
            .await
            .get(&tenant_id)
            .is_some_and(|e| e.keys.is_some() && e.fetched.elapsed() < self.max_stale)
    }

    /// The tenant's keys, `None` for an unknown tenant.
    pub async fn get(
        self: &Arc<Self>,
        pool: &PgPool,
        keyring: &Keyring,
        tenant_id: Uuid,
    ) -> Result<Option<Arc<VerificationKeys>>, KeyCacheError> {
        let cached = self.entries.read().await.get(&tenant_id).cloned();
        if let Some(entry) = cached {
            let age = entry.fetched.elapsed();
            if age < self.ttl {
                return Ok(entry.keys);
            }
            if age < self.max_stale {
                self.refresh_in_background(pool.clone(), keyring.clone(), tenant_id);
                return Ok(entry.keys);
            }
        }
        self.load(pool, keyring, tenant_id).await
    }

    async fn load(
        &self,
        pool: &PgPool,
        keyring: &Keyring,
        tenant_id: Uuid,
    ) -> Result<Option<Arc<VerificationKeys>>, KeyCacheError> {
        match verification_keys(pool, keyring, tenant_id).await {
            Ok(keys) => {
                let keys = keys.map(Arc::new);
                self.store(tenant_id, keys.clone()).await;
                Ok(keys)
            }
            Err(TenantError::Database(error)) => Err(KeyCacheError::Unavailable(error)),
            Err(other) => Err(KeyCacheError::Tenant(other)),
        }
    }

    async fn store(&self, tenant_id: Uuid, keys: Option<Arc<VerificationKeys>>) {
        let mut entries = self.entries.write().await;
        if entries.len() >= MAX_ENTRIES {
            let max_stale = self.max_stale;
            entries.retain(|_, e| e.fetched.elapsed() < max_stale);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(
            tenant_id,
            Entry {
                keys,
                fetched: Instant::now(),
            },
        );
    }

    fn refresh_in_background(self: &Arc<Self>, pool: PgPool, keyring: Keyring, tenant_id: Uuid) {
        let started = self
            .refreshing
            .lock()
            .map(|mut set| set.insert(tenant_id))
            .unwrap_or(false);
        if !started {
            return;
        }
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            match cache.load(&pool, &keyring, tenant_id).await {
                Ok(_) => {}
                Err(KeyCacheError::Unavailable(error)) => {
                    tracing::warn!(tenant.id = %tenant_id, %error, "database unavailable, serving cached webhook keys");
                }
                Err(KeyCacheError::Tenant(error)) => {
                    // Keys that no longer open are not kept: the next request re-reads
                    // inline and fails closed.
                    tracing::error!(tenant.id = %tenant_id, %error, "cannot refresh webhook keys");
                    cache.invalidate(tenant_id).await;
                }
            }
            if let Ok(mut set) = cache.refreshing.lock() {
                set.remove(&tenant_id);
            }
        });
    }
}
