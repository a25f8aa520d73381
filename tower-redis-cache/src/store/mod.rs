//! Where entries live: Redis (shared by every instance), and a bounded
//! in-process store while Redis is unavailable. The failover between them
//! is [`RedisManager::failover`]; when Redis answers again the in-process
//! entries are dropped and invalidations made meanwhile are replayed.

mod memory;
mod redis_store;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderMap;
use tower_redis_core::{RedisManager, Source};

use crate::entry::Entry;
pub(crate) use memory::MemoryStore;

/// Invalidations remembered during an outage, at most.
const MAX_PENDING_INVALIDATIONS: usize = 10_000;

/// The result of a lookup.
#[derive(Debug)]
pub(crate) enum Lookup {
    Hit(Entry),
    /// Nothing stored for the URL.
    UriMiss,
    /// The URL has entries, none for this request's variant.
    VaryMiss,
}

/// An entry to store: where, and for how long.
#[derive(Debug)]
pub(crate) struct Put {
    pub(crate) url_hash: String,
    pub(crate) vary: String,
    pub(crate) variant: String,
    pub(crate) entry: Entry,
    pub(crate) keep_for: Duration,
}

pub(crate) struct CacheStore {
    manager: RedisManager,
    memory: MemoryStore,
    /// The `Vary` names last seen per URL, so that a lookup is a plain
    /// `HMGET` instead of a script.
    vary_hints: moka::sync::Cache<String, String>,
    /// Set while the in-process store is in use; cleared (and the store
    /// emptied) on the first Redis answer after.
    degraded: AtomicBool,
    pending_invalidations: Mutex<Vec<String>>,
    /// Stores waiting for a response body to finish, for [`CacheStore::flushed`].
    in_flight: AtomicUsize,
    flushed: tokio::sync::Notify,
}

/// Counts one store in flight until dropped.
pub(crate) struct InFlight(Arc<CacheStore>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.flushed.notify_waiters();
        }
    }
}

impl std::fmt::Debug for CacheStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheStore")
            .field("manager", &self.manager)
            .finish_non_exhaustive()
    }
}

impl CacheStore {
    pub(crate) fn new(manager: RedisManager, memory_bytes: u64) -> Self {
        Self {
            manager,
            memory: MemoryStore::new(memory_bytes),
            vary_hints: moka::sync::Cache::new(100_000),
            degraded: AtomicBool::new(false),
            pending_invalidations: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            flushed: tokio::sync::Notify::new(),
        }
    }

    /// One round trip (Vary resolution included). The bool says whether the
    /// answer came from the in-process store.
    pub(crate) async fn lookup(
        &self,
        url_hash: &str,
        request: &HeaderMap,
        extra: &str,
    ) -> (Lookup, bool) {
        let key = self.redis_key(url_hash);
        let hint = self.vary_hints.get(url_hash);
        let served = self
            .manager
            .failover(
                |conn| redis_store::lookup(conn, &key, request, extra, hint),
                |_| async { (self.memory.lookup(url_hash, request, extra), None) },
            )
            .await;
        let degraded = self.after(served.source).await;
        let (found, vary_seen) = served.value;
        match vary_seen {
            Some(vary) => self.vary_hints.insert(url_hash.to_owned(), vary),
            None if served.source == Source::Redis => self.vary_hints.invalidate(url_hash),
            None => {}
        }
        let lookup = match found {
            redis_store::Found::Entry(entry) => Lookup::Hit(entry),
            redis_store::Found::NoUrl => Lookup::UriMiss,
            redis_store::Found::NoVariant => Lookup::VaryMiss,
            redis_store::Found::Corrupt(field) => {
                tracing::warn!(target: "tower_redis_cache", "deleting a corrupt or foreign cache entry");
                let _ = self
                    .manager
                    .query::<()>(tower_redis_core::redis::cmd("HDEL").arg(&key).arg(field))
                    .await;
                Lookup::VaryMiss
            }
        };
        (lookup, degraded)
    }

    /// Marks a store as started; it counts until the guard is dropped.
    pub(crate) fn start_store(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Waits until every store started so far has finished (stored, or
    /// given up because its body was too big or never completed).
    pub(crate) async fn flushed(&self) {
        loop {
            let notified = self.flushed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// One round trip.
    pub(crate) async fn put(&self, put: Put) {
        self.vary_hints
            .insert(put.url_hash.clone(), put.vary.clone());
        let key = self.redis_key(&put.url_hash);
        let served = self
            .manager
            .failover(
                |conn| redis_store::put(conn, &key, &put),
                |_| async { self.memory.put(&put) },
            )
            .await;
        self.after(served.source).await;
    }

    /// Deletes every variant of these URLs.
    pub(crate) async fn invalidate(&self, url_hashes: &[String]) {
        for url_hash in url_hashes {
            self.memory.remove(url_hash);
            let key = self.redis_key(url_hash);
            let served = self
                .manager
                .failover(
                    |mut conn| async move {
                        tower_redis_core::redis::cmd("DEL")
                            .arg(&key)
                            .query_async::<()>(&mut conn)
                            .await
                    },
                    |_| async {},
                )
                .await;
            if served.is_fallback() {
                self.degraded.store(true, Ordering::Release);
                let mut pending = lock(&self.pending_invalidations);
                if pending.len() < MAX_PENDING_INVALIDATIONS {
                    pending.push(url_hash.clone());
                } else {
                    tracing::warn!(target: "tower_redis_cache", "too many invalidations during the Redis outage; some stale entries may be served after it");
                }
            } else {
                self.after(served.source).await;
            }
        }
    }

    /// Keeps the degraded bookkeeping: returns true for a degraded answer.
    async fn after(&self, source: Source) -> bool {
        match source {
            Source::Fallback(_) => {
                self.degraded.store(true, Ordering::Release);
                true
            }
            Source::Redis => {
                if self.degraded.swap(false, Ordering::AcqRel) {
                    self.memory.clear();
                    let pending = std::mem::take(&mut *lock(&self.pending_invalidations));
                    let mut failed = Vec::new();
                    for url_hash in pending {
                        let key = self.redis_key(&url_hash);
                        let deleted = self
                            .manager
                            .query::<()>(tower_redis_core::redis::cmd("DEL").arg(&key))
                            .await;
                        if deleted.is_err() {
                            failed.push(url_hash);
                        }
                    }
                    if !failed.is_empty() {
                        // Tried again on the next answer from Redis.
                        lock(&self.pending_invalidations).extend(failed);
                        self.degraded.store(true, Ordering::Release);
                    }
                    tracing::info!(target: "tower_redis_cache", "Redis is back: in-process cache entries dropped");
                }
                false
            }
        }
    }

    fn redis_key(&self, url_hash: &str) -> String {
        self.manager.keys().key(&["c", url_hash])
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
