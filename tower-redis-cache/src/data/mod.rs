//! Cache-aside for data: [`DataCache`], typed values with the HTTP cache's
//! store, tags, coalescing and fallback.
//!
//! By job: `options.rs` (per-call [`DataOptions`]), `codec.rs` ([`Codec`],
//! [`Json`]), `value.rs` (a value as a cache entry: key URL and envelope),
//! `fill.rs` (a miss: the HTTP cache's in-process coalescing, the fill
//! lock across instances, the factory, its timeouts, fail-safe and eager
//! refresh), `error.rs`.

mod codec;
mod error;
mod fill;
mod options;
pub(crate) mod value;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tower_redis_core::{RedisManager, clock, record};

pub use codec::{Codec, CodecError, Json};
pub use error::{DataError, InsertError, InvalidKey};
pub use options::DataOptions;
pub use value::MAX_KEY_BYTES;

use crate::Purged;
use crate::key;
use crate::service::Flights;
use crate::store::{CacheStore, DATA_VARIANT, Put, StoreOptions, Target, Tier};
use value::Stored;

/// Keys warned about once (a value too large to store), at most.
const WARNED_CAPACITY: u64 = 10_000;

/// A typed cache-aside cache over the HTTP cache's store: the same Redis
/// keys (prefix and hash tags of the manager's key builder), tag indexes,
/// fill locks, pub/sub bus, near tier and in-process fallback. Obtain it
/// from [`CacheHandle::data`](crate::CacheHandle::data) to share a
/// [`CacheLayer`](crate::CacheLayer)'s store, or build one on a
/// [`RedisManager`] with [`DataCache::builder`]. Cheap to clone; clones
/// share their in-process coalescing.
///
/// ```
/// # #![recursion_limit = "256"]
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use tower_redis_cache::data::{DataCache, DataOptions};
/// use tower_redis_core::RedisManager;
///
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct Product { id: u32, name: String }
///
/// let cache = DataCache::new(RedisManager::disabled());
/// let options = DataOptions::new(Duration::from_secs(60)).tag("product-7");
/// let product = cache
///     .get_or_insert_with("product:7", &options, || async {
///         Ok::<_, std::io::Error>(Product { id: 7, name: "lamp".into() })
///     })
///     .await
///     .expect("the factory succeeds");
/// assert_eq!(product.name, "lamp");
/// let again: Option<Product> = cache.get("product:7").await.expect("a valid key");
/// assert_eq!(again.map(|p| p.id), Some(7));
/// cache.purge_tag("product-7").await;
/// assert!(cache.get::<Product>("product:7").await.expect("a valid key").is_none());
/// # }
/// ```
pub struct DataCache<C = Json> {
    inner: Arc<Inner<C>>,
}

struct Inner<C> {
    store: Arc<CacheStore>,
    flights: Arc<Flights>,
    codec: C,
    max_value_bytes: usize,
    /// How long a caller waits for another's fill before running its own.
    wait: Duration,
    /// Keys already warned about.
    warned: moka::sync::Cache<String, ()>,
}

impl<C> Clone for DataCache<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> std::fmt::Debug for DataCache<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataCache")
            .field("max_value_bytes", &self.inner.max_value_bytes)
            .finish_non_exhaustive()
    }
}

/// Configures a [`DataCache`] of its own (not sharing a layer's store).
#[derive(Debug)]
pub struct DataCacheBuilder {
    manager: RedisManager,
    memory_bytes: u64,
    near: Option<(u64, Duration)>,
    max_value_bytes: usize,
    lock_ttl: Duration,
    wait: Duration,
}

impl DataCacheBuilder {
    /// The in-process store used while Redis is unavailable (default 64 MiB).
    pub fn memory_capacity_bytes(mut self, bytes: u64) -> Self {
        self.memory_bytes = bytes.max(1);
        self
    }

    /// A near tier of at most `max_bytes`, each copy kept at most `ttl`,
    /// kept coherent like the HTTP cache's near cache (Redis client
    /// tracking; pub/sub on a cluster). Off by default.
    ///
    /// Besides `max_bytes`, each thread that reads the near tier holds the
    /// last 8 values it read there (values whose encoding is under about
    /// 16 KiB: about 128 KiB a thread, counted by encoded size), so that a
    /// key read on every core
    /// at once costs each read no write to memory the cores share. They
    /// go with the shared copies: no thread serves one after it is dropped.
    pub fn near_cache(mut self, max_bytes: u64, ttl: Duration) -> Self {
        self.near = Some((max_bytes.max(1), ttl.max(Duration::from_millis(1))));
        self
    }

    /// Encoded values larger than this are not stored (default 1 MiB).
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes.max(1);
        self
    }

    /// How long a fill lock lives if its holder dies (default 5 s). A
    /// removal's tombstone lives twelve times this, at least 2 s, and a
    /// value whose factory began longer ago than that (a second's margin
    /// counted) is returned but not stored when its fill does not hold the
    /// lock (lost, or never taken): a removal early in its making may have
    /// left a tombstone that is gone by then (counted in
    /// `tower_redis_cache_fills_dropped_total` with `kind="data"`,
    /// `reason="too_slow"`, and a warning at most once a minute; a factory
    /// that outlived its lock, which another fill then took, where the
    /// value holds an older removal or soft-purge mark, alike with
    /// `reason="lock_lost"`).
    /// Give every cache that shares the key prefix the same value.
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// How long a caller waits for another caller's fill (on any instance)
    /// before running its own factory (default 5 s).
    pub fn coalesce_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Builds the cache.
    pub fn build(self) -> DataCache {
        let store = CacheStore::new(
            self.manager,
            StoreOptions {
                memory_bytes: self.memory_bytes,
                near: self.near,
                index_depth: 4,
                lock_ttl: self.lock_ttl,
                outage_queue_bytes: 4 << 20,
                rules: None,
            },
        );
        DataCache::on_store(Arc::new(store), self.max_value_bytes, self.wait, Json)
    }
}

impl DataCache {
    /// A data cache of its own on `manager`, with the defaults. Its values
    /// are purged by the tag purges of any cache on the same Redis and key
    /// prefix, and the other way round.
    pub fn new(manager: RedisManager) -> Self {
        Self::builder(manager).build()
    }

    /// Configures a data cache of its own on `manager`.
    pub fn builder(manager: RedisManager) -> DataCacheBuilder {
        DataCacheBuilder {
            manager,
            memory_bytes: 64 << 20,
            near: None,
            max_value_bytes: 1 << 20,
            lock_ttl: Duration::from_secs(5),
            wait: Duration::from_secs(5),
        }
    }
}

impl<C: Codec> DataCache<C> {
    pub(crate) fn on_store(
        store: Arc<CacheStore>,
        max_value_bytes: usize,
        wait: Duration,
        codec: C,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                flights: Arc::new(store.flights.sharing_epochs()),
                store,
                codec,
                max_value_bytes,
                wait,
                warned: moka::sync::Cache::builder()
                    .max_capacity(WARNED_CAPACITY)
                    .build(),
            }),
        }
    }

    /// The same cache with another codec (values written by one codec
    /// and read by another are misses, and are deleted).
    pub fn with_codec<D: Codec>(self, codec: D) -> DataCache<D> {
        DataCache::on_store(
            Arc::clone(&self.inner.store),
            self.inner.max_value_bytes,
            self.inner.wait,
            codec,
        )
    }

    /// The fresh value of `key`, if there is one (one Redis round trip,
    /// none from the near tier, where it is kept decoded: a near hit is a
    /// clone of the `T`). A stored value that does not decode as a `T` is
    /// deleted and is `None`.
    pub async fn get<T>(&self, key: &str) -> Result<Option<T>, InvalidKey>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        // A loop of near hits yields now and then (see `cooperate`).
        cooperate().await;
        if let Some(value) = self.inner.store.data_near_hit::<C, T>(key, None) {
            count(Lookup::Hit, Tier::Near);
            return Ok(Some(value));
        }
        let url_hash = value::url_hash(key)?;
        let (found, tier) = self.read::<T>(key, &url_hash, true, None).await;
        Ok(match found {
            Some((stored, value)) if stored.is_fresh(clock::now_ms()) => {
                count(Lookup::Hit, tier);
                Some(value)
            }
            _ => {
                count(Lookup::Miss, tier);
                None
            }
        })
    }

    /// Stores `value` under `key` (one pipelined write), replacing what
    /// was there on every instance (near tiers included).
    pub async fn insert<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        options: &DataOptions,
    ) -> Result<(), InsertError> {
        let url = value::url(key)?;
        let bytes = self.inner.codec.encode(value)?;
        if bytes.len() > self.inner.max_value_bytes {
            return Err(InsertError::TooLarge {
                bytes: bytes.len(),
                limit: self.inner.max_value_bytes,
            });
        }
        let url_hash = key::hash_url(&url);
        let entry = value::entry(
            &bytes,
            clock::duration_ms(options.ttl),
            options.near,
            clock::now_ms(),
        );
        self.inner
            .store
            .data_put(
                put(url_hash, url, entry, options, options.keep_for(), None),
                None,
            )
            .await;
        Ok(())
    }

    /// Removes `key`'s value everywhere (while Redis is unavailable: in
    /// process now, in Redis when it is back).
    pub async fn remove(&self, key: &str) -> Result<(), InvalidKey> {
        self.inner.store.invalidate(&[value::url_hash(key)?]).await;
        Ok(())
    }

    /// Removes every value and every HTTP response tagged `tag`: the same
    /// purge as [`CacheHandle::purge_tag`](crate::CacheHandle::purge_tag).
    pub async fn purge_tag(&self, tag: &str) -> Purged {
        self.inner
            .store
            .purge(&Target::Tag(tag.to_owned()), None)
            .await
    }

    /// A value and its envelope, decoded; a stored value that does not
    /// decode is deleted and is a miss. A fresh value decoded from a near
    /// copy (or from a read that made one) is kept decoded beside it, so
    /// that the next near hit needs no decoding.
    async fn read<T>(
        &self,
        key: &str,
        url_hash: &str,
        near: bool,
        refresh: Option<f64>,
    ) -> (Option<(Stored, T)>, Tier)
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let found = self
            .inner
            .store
            .data_lookup(url_hash, near, value::may_live_near)
            .await;
        let tier = found.tier;
        let Some(entry) = found.entry else {
            return (None, tier);
        };
        match self.decode::<T>(entry) {
            Some((stored, value)) => {
                // The clock is read only for a value with a near copy:
                // a read from Redis alone needs no time here.
                if let Some(copy) = found.near {
                    let now = clock::now_ms();
                    if stored.is_fresh(now) {
                        self.inner.store.keep_decoded::<C, T>(
                            key,
                            url_hash,
                            copy,
                            value.clone(),
                            stored.entry.body.len(),
                            stored.age_ms(now),
                            stored.ttl_ms,
                            refresh,
                        );
                    }
                }
                (Some((stored, value)), tier)
            }
            None => {
                tracing::warn!(target: "tower_redis_cache", "a data cache value does not decode (its type changed?): deleted, treated as a miss");
                record::counter("tower_redis_cache_data_decode_failures_total", &[], 1);
                Box::pin(self.inner.store.delete_undecodable(url_hash)).await;
                (None, tier)
            }
        }
    }

    fn decode<T: DeserializeOwned>(&self, entry: crate::entry::Entry) -> Option<(Stored, T)> {
        let stored = Stored::of(entry)?;
        let value = self.inner.codec.decode(stored.bytes()).ok()?;
        Some((stored, value))
    }
}

/// Near hits per unit of a task's cooperative budget.
const NEAR_HITS_PER_UNIT: u32 = 16;

/// What a read spends of its task's cooperative budget before a near hit.
///
/// A near hit uses no Tokio resource, which would make its task yield now
/// and then: a loop of near hits would keep its thread from the runtime's
/// other tasks (Redis replies, timers) until it ends, and their deadlines
/// would pass. So every [`NEAR_HITS_PER_UNIT`]th read of a thread spends a
/// unit of the task's budget (a yield once the budget is gone, 128 units
/// on Tokio today); spending one on every read cost a near hit a third of
/// its speed on one task.
async fn cooperate() {
    thread_local! {
        static READS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    let due = READS
        .try_with(|reads| {
            let next = reads.get().wrapping_add(1);
            reads.set(next);
            next.is_multiple_of(NEAR_HITS_PER_UNIT)
        })
        .unwrap_or(true);
    if due {
        tokio::task::coop::consume_budget().await;
    }
}

/// The write of a value.
fn put(
    url_hash: String,
    url: String,
    entry: crate::entry::Entry,
    options: &DataOptions,
    keep_for: Duration,
    asked: Option<std::time::SystemTime>,
) -> Put {
    Put {
        url_hash,
        url,
        vary: String::new(),
        variant: DATA_VARIANT.clone(),
        entry,
        keep_for,
        tags: options.tags.clone(),
        asked,
    }
}

/// Counts a lookup (`tower_redis_cache_data_total`), without allocating:
/// a near hit costs about what an in-process cache's lookup does, and the
/// key of a counter with labels is as dear as the lookup.
fn count(result: Lookup, tier: Tier) {
    macro_rules! counters {
        ($($result:literal),*) => {
            [$([
                record::Counter::new("tower_redis_cache_data_total", &[("result", $result), ("tier", "redis")]),
                record::Counter::new("tower_redis_cache_data_total", &[("result", $result), ("tier", "near")]),
                record::Counter::new("tower_redis_cache_data_total", &[("result", $result), ("tier", "in-process")]),
            ]),*]
        };
    }
    static COUNTERS: [[record::Counter; 3]; 3] = counters!("hit", "miss", "stale");
    let column = match tier {
        Tier::Redis => 0,
        Tier::Near => 1,
        Tier::Degraded => 2,
    };
    COUNTERS[result as usize][column].increment(1);
}

/// What a lookup found, as `tower_redis_cache_data_total` counts it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lookup {
    Hit = 0,
    Miss = 1,
    Stale = 2,
}
