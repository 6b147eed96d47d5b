//! The ingress's in-memory cache of tenants' webhook verification keys.
//!
//! An entry younger than `TENANT_KEY_CACHE_SECONDS` is used as is. An older one is still
//! used for the request at hand while one background task per tenant re-reads it from
//! PostgreSQL (stale-while-revalidate), so a slow or unreachable database adds no latency
//! to webhooks of tenants the ingress has recently served, and signed messages keep flowing
//! into Redis through an outage of minutes. Past `max_stale` an entry is no longer trusted
//! and is re-read inline. A tenant the cache has never seen cannot be verified during an
//! outage: the caller answers 503, never 200 and never a dropped message.
//!
//! Unknown tenants are cached too (as such), so random tenant ids cannot hammer the database,
//! but apart: in a least-recently-used set of at most [`MAX_UNKNOWN`] ids. Known tenants live
//! in their own map, bounded by the real tenant count, so no number of unknown ids evicts a
//! known tenant's keys.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use uuid::Uuid;

use crate::security::keyring::Keyring;
use crate::tenants::{TenantError, VerificationKeys, verification_keys};

/// At most this many unknown tenant ids are remembered (least recently used go first).
pub const MAX_UNKNOWN: usize = 10_000;

/// Past this many known tenants, entries too old to be trusted are dropped (known tenants are
/// real rows, so this is only a guard against a very long-lived process).
const MAX_KNOWN: usize = 1_000_000;

#[derive(Clone)]
struct Entry {
    keys: Arc<VerificationKeys>,
    fetched: Instant,
}

/// Tenant ids the database did not know, least recently used first out.
#[derive(Debug)]
struct UnknownIds {
    capacity: usize,
    /// id → (when it was looked up, its use stamp).
    ids: HashMap<Uuid, (Instant, u64)>,
    /// use stamp → id, oldest first.
    order: BTreeMap<u64, Uuid>,
    stamp: u64,
}

impl UnknownIds {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            ids: HashMap::new(),
            order: BTreeMap::new(),
            stamp: 0,
        }
    }

    fn next_stamp(&mut self) -> u64 {
        self.stamp += 1;
        self.stamp
    }

    /// When `id` was looked up, marking it used.
    fn get(&mut self, id: Uuid) -> Option<Instant> {
        let stamp = self.next_stamp();
        let (fetched, old) = self.ids.get_mut(&id).map(|e| {
            let old = e.1;
            e.1 = stamp;
            (e.0, old)
        })?;
        self.order.remove(&old);
        self.order.insert(stamp, id);
        Some(fetched)
    }

    fn insert(&mut self, id: Uuid, fetched: Instant) {
        let stamp = self.next_stamp();
        if let Some((_, old)) = self.ids.insert(id, (fetched, stamp)) {
            self.order.remove(&old);
        } else if self.ids.len() > self.capacity
            && let Some((_, oldest)) = self.order.pop_first()
        {
            self.ids.remove(&oldest);
        }
        self.order.insert(stamp, id);
    }

    fn remove(&mut self, id: Uuid) {
        if let Some((_, stamp)) = self.ids.remove(&id) {
            self.order.remove(&stamp);
        }
    }
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
    /// A plain (blocking) lock: no guard is held across an await, and every webhook reads it,
    /// where an async lock's release would also take its waiter list's mutex.
    known: RwLock<HashMap<Uuid, Entry>>,
    unknown: Mutex<UnknownIds>,
    /// Tenants whose background refresh is running (one at a time per tenant).
    refreshing: Mutex<HashSet<Uuid>>,
    ttl: Duration,
    max_stale: Duration,
}

impl KeyCache {
    pub fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            known: RwLock::new(HashMap::new()),
            unknown: Mutex::new(UnknownIds::new(MAX_UNKNOWN)),
            refreshing: Mutex::new(HashSet::new()),
            ttl,
            max_stale: (ttl * 12).max(Duration::from_secs(3600)),
        })
    }

    /// The known tenants (a panic elsewhere while holding the lock left the map whole: every
    /// write is one `insert`, `remove` or `retain`).
    fn read_known(&self) -> RwLockReadGuard<'_, HashMap<Uuid, Entry>> {
        self.known.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_known(&self) -> RwLockWriteGuard<'_, HashMap<Uuid, Entry>> {
        self.known.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops a tenant's entry (after its keys change).
    pub async fn invalidate(&self, tenant_id: Uuid) {
        self.write_known().remove(&tenant_id);
        if let Ok(mut unknown) = self.unknown.lock() {
            unknown.remove(tenant_id);
        }
    }

    /// Marks every cached entry for a refresh on its next use (served meanwhile, re-read in
    /// the background): after a change notice may have been missed.
    pub async fn mark_all_stale(&self) {
        let Some(stale) = Instant::now().checked_sub(self.ttl) else {
            return;
        };
        for entry in self.write_known().values_mut() {
            entry.fetched = entry.fetched.min(stale);
        }
        if let Ok(mut unknown) = self.unknown.lock() {
            *unknown = UnknownIds::new(unknown.capacity);
        }
    }

    /// The tenant's keys when they are in memory and younger than the cache's TTL: what
    /// [`KeyCache::get`] would answer at once, without PostgreSQL or a refresh (one lookup for
    /// the webhook's hot path).
    pub fn fresh(&self, tenant_id: Uuid) -> Option<Arc<VerificationKeys>> {
        self.read_known()
            .get(&tenant_id)
            .filter(|e| e.fetched.elapsed() < self.ttl)
            .map(|e| e.keys.clone())
    }

    /// Whether the tenant's keys are in memory and still trusted, so [`KeyCache::get`] would
    /// answer without PostgreSQL (the webhook lets such a tenant's messages through from an
    /// address past its budget of refused requests).
    pub async fn holds_keys(&self, tenant_id: Uuid) -> bool {
        self.read_known()
            .get(&tenant_id)
            .is_some_and(|e| e.fetched.elapsed() < self.max_stale)
    }

    /// The tenant's keys, `None` for an unknown tenant.
    pub async fn get(
        self: &Arc<Self>,
        pool: &PgPool,
        keyring: &Keyring,
        tenant_id: Uuid,
    ) -> Result<Option<Arc<VerificationKeys>>, KeyCacheError> {
        let known = self
            .read_known()
            .get(&tenant_id)
            .map(|e| (Some(e.keys.clone()), e.fetched));
        let cached = known.or_else(|| {
            self.unknown
                .lock()
                .ok()
                .and_then(|mut u| u.get(tenant_id))
                .map(|fetched| (None, fetched))
        });
        if let Some((keys, fetched)) = cached {
            let age = fetched.elapsed();
            if age < self.ttl {
                return Ok(keys);
            }
            if age < self.max_stale {
                self.refresh_in_background(pool.clone(), keyring.clone(), tenant_id);
                return Ok(keys);
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
        let fetched = Instant::now();
        match keys {
            Some(keys) => {
                if let Ok(mut unknown) = self.unknown.lock() {
                    unknown.remove(tenant_id);
                }
                let mut known = self.write_known();
                if known.len() >= MAX_KNOWN && !known.contains_key(&tenant_id) {
                    let max_stale = self.max_stale;
                    known.retain(|_, e| e.fetched.elapsed() < max_stale);
                }
                known.insert(tenant_id, Entry { keys, fetched });
            }
            None => {
                // A tenant that is gone stops being known.
                self.write_known().remove(&tenant_id);
                if let Ok(mut unknown) = self.unknown.lock() {
                    unknown.insert(tenant_id, fetched);
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_ids_evict_the_least_recently_used_first_and_stay_bounded() {
        let mut ids = UnknownIds::new(3);
        let [a, b, c, d] = [0u128, 1, 2, 3].map(Uuid::from_u128);
        let now = Instant::now();
        ids.insert(a, now);
        ids.insert(b, now);
        ids.insert(c, now);
        // Using `a` makes `b` the least recently used.
        assert!(ids.get(a).is_some());
        ids.insert(d, now);
        assert!(ids.get(b).is_none());
        assert!(ids.get(a).is_some() && ids.get(c).is_some() && ids.get(d).is_some());
        assert_eq!((ids.ids.len(), ids.order.len()), (3, 3));
        // Re-inserting an id refreshes it without growing the set.
        ids.insert(c, now);
        assert_eq!((ids.ids.len(), ids.order.len()), (3, 3));
        ids.remove(c);
        assert_eq!((ids.ids.len(), ids.order.len()), (2, 2));
    }
}
