//! Where entries live: Redis (shared by every instance), an optional near
//! cache in front of it, and a bounded in-process store while Redis is
//! unavailable. The failover between Redis and the in-process store is
//! [`RedisManager::failover`]; when Redis answers again the in-process
//! entries are dropped and invalidations and purges made meanwhile are
//! replayed.

mod memory;
mod redis_store;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use tower_redis_core::redis::{self, Value};
use tower_redis_core::{RedisManager, Source};

use crate::entry::Entry;
use crate::events::Events;
use crate::freshness;
use crate::key;
pub(crate) use memory::{MemoryStore, Selector};
use redis_store::Op;

/// The `Vary` hints (the names last seen per URL) take at most this share
/// of `memory_capacity_bytes`, weighed by bytes like every store a client
/// can grow: 1 MiB of the default 64 MiB, some thousands of URLs. A URL
/// without a hint is looked up by the script instead of a plain `HMGET`:
/// one round trip either way.
const VARY_HINT_SHARE: u64 = 64;
/// The least the hints may take, however small the store.
const MIN_VARY_HINT_BYTES: u64 = 16 << 10;
/// The bookkeeping of one hint beyond its URL hash and names.
const VARY_HINT_OVERHEAD: usize = 96;

/// Invalidations and purges remembered during an outage, at most.
const MAX_PENDING: usize = 10_000;
/// URLs deleted per pipeline in a purge.
const PURGE_BATCH: usize = 500;

/// The result of a lookup.
#[derive(Debug)]
pub(crate) enum Lookup {
    Hit(Entry),
    /// Nothing stored for the URL.
    UriMiss,
    /// The URL has entries, none for this request's variant.
    VaryMiss,
}

/// Which store answered a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    Redis,
    Near,
    /// The in-process store, because Redis is unavailable.
    Degraded,
}

/// An entry to store: where, and for how long.
#[derive(Debug, Clone)]
pub(crate) struct Put {
    pub(crate) url_hash: String,
    /// `//host/path?query`, for the indexes.
    pub(crate) url: String,
    pub(crate) vary: String,
    pub(crate) variant: String,
    pub(crate) entry: Entry,
    pub(crate) keep_for: Duration,
    pub(crate) tags: Vec<String>,
}

/// A fill lock held in Redis.
#[derive(Debug)]
pub(crate) struct LockToken {
    token: String,
}

/// Why a lock is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockPurpose {
    /// Filling a missing entry.
    Fill,
    /// Refreshing a stale entry (stored at this time, ms) in the background.
    Refresh(u64),
}

/// The answer to a fill-lock request.
#[derive(Debug)]
pub(crate) enum LockAttempt {
    Acquired(LockToken),
    /// Another request (on any instance) is filling.
    Held,
    /// An entry was stored since the caller's lookup.
    Filled,
    /// Redis is unavailable: no cross-instance coordination.
    Unavailable,
}

/// What a purge selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Tag(String),
    /// Every URL whose path (and query) starts with this, on any host.
    Prefix(String),
    /// One URL's path and query, on any host.
    Path(String),
    /// One URL, as its key (`//host/path?query`).
    Url(String),
    All,
}

/// How a purge went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Purged {
    /// URLs whose entries were removed (or marked stale, for a soft purge),
    /// counted where the purge ran: Redis, or the in-process store.
    pub urls: u64,
    /// Redis was unavailable: the purge ran on this instance's in-process
    /// store and is replayed on Redis when it answers again.
    pub deferred: bool,
}

/// Counters of this instance, for [`crate::CacheHandle::stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) stale_hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) stores: AtomicU64,
}

/// Tuning that the store needs.
#[derive(Debug, Clone)]
pub(crate) struct StoreOptions {
    pub(crate) memory_bytes: u64,
    pub(crate) near: Option<(u64, Duration)>,
    pub(crate) index_depth: usize,
    pub(crate) lock_ttl: Duration,
}

pub(crate) struct CacheStore {
    manager: RedisManager,
    memory: MemoryStore,
    near: Option<Arc<MemoryStore>>,
    pub(crate) events: Arc<Events>,
    options: StoreOptions,
    /// The `Vary` names last seen per URL, so that a lookup is a plain
    /// `HMGET` instead of a script.
    vary_hints: moka::sync::Cache<String, String>,
    /// Set while the in-process store is in use; cleared (and the store
    /// emptied) on the first Redis answer after.
    degraded: AtomicBool,
    pending: Mutex<Vec<Pending>>,
    /// Stores waiting for a response body to finish, for [`CacheStore::flushed`].
    in_flight: AtomicUsize,
    flushed: tokio::sync::Notify,
    pub(crate) counters: Counters,
}

/// A write that could not reach Redis, replayed when it answers again.
#[derive(Debug, Clone)]
enum Pending {
    Invalidate(String),
    Purge(Target, Option<u64>),
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
    pub(crate) fn new(manager: RedisManager, options: StoreOptions) -> Self {
        let near = options
            .near
            .map(|(bytes, ttl)| Arc::new(MemoryStore::new(bytes, Some(ttl))));
        let events = Arc::new(Events::new(manager.clone(), near.clone()));
        let vary_hint_bytes = (options.memory_bytes / VARY_HINT_SHARE).max(MIN_VARY_HINT_BYTES);
        Self {
            memory: MemoryStore::new(options.memory_bytes, None),
            near,
            events,
            options,
            manager,
            vary_hints: moka::sync::Cache::builder()
                .max_capacity(vary_hint_bytes)
                .weigher(|url_hash: &String, vary: &String| {
                    u32::try_from(url_hash.len() + vary.len() + VARY_HINT_OVERHEAD)
                        .unwrap_or(u32::MAX)
                })
                .build(),
            degraded: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            flushed: tokio::sync::Notify::new(),
            counters: Counters::default(),
        }
    }

    /// One round trip (Vary resolution included), none from the near cache.
    pub(crate) async fn lookup(
        &self,
        url_hash: &str,
        request: &HeaderMap,
        extra: &str,
    ) -> (Lookup, Tier) {
        self.events.ensure_started();
        if self.degraded.load(Ordering::Acquire) && self.manager.is_available() {
            // Redis is back: replay the outage's invalidations and purges
            // before reading, so this answer already reflects them.
            self.after(Source::Redis).await;
        }
        let near = self.near.as_ref().filter(|_| self.events.near_usable());
        if let Some(near) = near
            && let redis_store::Found::Entry(entry) = near.lookup(url_hash, request, extra)
        {
            return (Lookup::Hit(entry), Tier::Near);
        }
        let epoch = self.events.epoch();
        let key = self.redis_key(url_hash);
        let hint = self.vary_hints.get(url_hash);
        let previous_hint = hint.clone();
        let served = self
            .manager
            .failover(
                |conn| redis_store::lookup(conn, &key, request, extra, hint),
                |_| async { (self.memory.lookup(url_hash, request, extra), None) },
            )
            .await;
        let tier = if self.after(served.source).await {
            Tier::Degraded
        } else {
            Tier::Redis
        };
        let (found, vary_seen) = served.value;
        match &vary_seen {
            // Written only when it changes: a cache write costs more than a read.
            Some(vary) if previous_hint.as_ref() == Some(vary) => {}
            Some(vary) => self.vary_hints.insert(url_hash.to_owned(), vary.clone()),
            None if tier == Tier::Redis && previous_hint.is_some() => {
                self.vary_hints.invalidate(url_hash);
            }
            None => {}
        }
        let lookup = match found {
            redis_store::Found::Entry(entry) => {
                if let (Some(near), Some(vary), Tier::Redis) = (near, vary_seen, tier)
                    && self.events.epoch() == epoch
                {
                    near.put(&Put {
                        url_hash: url_hash.to_owned(),
                        url: String::new(),
                        variant: key::variant(&vary, request, extra),
                        vary,
                        entry: entry.clone(),
                        keep_for: Duration::from_secs(u64::from(u32::MAX)),
                        tags: Vec::new(),
                    });
                }
                Lookup::Hit(entry)
            }
            redis_store::Found::NoUrl => Lookup::UriMiss,
            redis_store::Found::NoVariant => Lookup::VaryMiss,
            redis_store::Found::Corrupt(field) => {
                tracing::warn!(target: "tower_redis_cache", "deleting a corrupt or foreign cache entry");
                let _ = self
                    .manager
                    .query::<()>(redis::cmd("HDEL").arg(&key).arg(field))
                    .await;
                Lookup::VaryMiss
            }
        };
        (lookup, tier)
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

    /// Stores an entry, records it in its indexes, releases the fill lock
    /// and announces the update: one pipelined round trip.
    pub(crate) async fn put(&self, put: Put, lock: Option<LockToken>) {
        self.vary_hints
            .insert(put.url_hash.clone(), put.vary.clone());
        self.counters.stores.fetch_add(1, Ordering::Relaxed);
        let key = self.redis_key(&put.url_hash);
        let mut indexes: Vec<String> = key::directories(&put.url, self.options.index_depth)
            .into_iter()
            .map(|dir| self.index_key("cx", dir))
            .collect();
        indexes.extend(put.tags.iter().map(|tag| self.index_key("ct", tag)));
        let message = Events::updated_message(&put.url_hash);
        let extras = redis_store::Extras {
            indexes: &indexes,
            url: &put.url,
            unlock: lock.as_ref().map(|l| l.token.as_str()),
            announce: Some((self.events.channel(), &message)),
        };
        if let Some(near) = &self.near {
            near.remove(&put.url_hash);
        }
        let served = self
            .manager
            .failover(
                |conn| redis_store::put(conn, &key, &put, &extras),
                |_| async { self.memory.put(&put) },
            )
            .await;
        self.after(served.source).await;
    }

    /// Takes the fill lock of a URL (one round trip). For a `fill`, an
    /// entry stored for `variant` since the caller's lookup is reported
    /// instead; `variant` is `None` when the caller does not know the URL's
    /// `Vary` (then any stored entry counts).
    pub(crate) async fn try_lock(
        &self,
        url_hash: &str,
        variant: Option<&str>,
        purpose: LockPurpose,
    ) -> LockAttempt {
        if !self.manager.is_available() {
            return LockAttempt::Unavailable;
        }
        let token = format!("{:016x}", rand::random::<u64>());
        let ttl = u64::try_from(self.options.lock_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let key = self.redis_key(url_hash);
        let mut invocation = redis_store::LOCK.key(&key);
        invocation
            .arg(&token)
            .arg(ttl)
            .arg(variant.unwrap_or(""))
            .arg(match purpose {
                LockPurpose::Fill => "fill",
                LockPurpose::Refresh(_) => "refresh",
            })
            .arg(match purpose {
                LockPurpose::Fill => Vec::new(),
                LockPurpose::Refresh(stored_at) => stored_at.to_be_bytes().to_vec(),
            });
        match self.manager.invoke_script::<String>(&invocation).await {
            Ok(answer) if answer == "acquired" => LockAttempt::Acquired(LockToken { token }),
            Ok(answer) if answer == "filled" => LockAttempt::Filled,
            Ok(_) => LockAttempt::Held,
            Err(_) => LockAttempt::Unavailable,
        }
    }

    /// The variant field a request selects, when this instance knows the
    /// URL's `Vary`.
    pub(crate) fn known_variant(
        &self,
        url_hash: &str,
        request: &HeaderMap,
        extra: &str,
    ) -> Option<String> {
        self.vary_hints
            .get(url_hash)
            .map(|vary| key::variant(&vary, request, extra))
    }

    /// Releases a fill lock without storing (the response was not
    /// storable) and wakes the waiters.
    pub(crate) async fn unlock(&self, lock: LockToken, url_hash: &str) {
        let key = self.redis_key(url_hash);
        let mut unlock = redis_store::UNLOCK.key(&key);
        unlock.arg(&lock.token);
        let ops = [
            Op::Script(unlock),
            redis_store::publish(self.events.channel(), &Events::updated_message(url_hash)),
        ];
        let _ = self.run_ops(&ops).await;
    }

    /// Deletes every variant of these URLs (RFC 9111 §4.4 invalidation).
    pub(crate) async fn invalidate(&self, url_hashes: &[String]) {
        for url_hash in url_hashes {
            self.memory.remove(url_hash);
            if let Some(near) = &self.near {
                near.remove(url_hash);
            }
        }
        if url_hashes.is_empty() {
            return;
        }
        let ops = self.delete_ops(url_hashes.iter().map(String::as_str));
        let ops = &ops;
        let served = self
            .manager
            .failover(
                |mut conn| async move { redis_store::run_ops(&mut conn, ops).await.map(|_| ()) },
                |_| async {},
            )
            .await;
        if served.is_fallback() {
            self.defer(url_hashes.iter().cloned().map(Pending::Invalidate));
        } else {
            self.after(served.source).await;
        }
    }

    /// Purges (or, with `soft_at`, marks stale) the target's entries
    /// everywhere: Redis, this instance's in-process stores, and (through
    /// the announcements) the other instances' near caches. `soft_at` is
    /// this instance's time, used only for its in-process store (whose
    /// entries carry its own clock); in Redis the mark is Redis' time, the
    /// clock stored entries are stamped with, and near-cache copies are
    /// dropped, so that no instance's clock decides what a soft purge makes
    /// stale.
    pub(crate) async fn purge(&self, target: &Target, soft_at: Option<u64>) -> Purged {
        let selector = match target {
            Target::Tag(tag) => Some(Selector::Tag(tag)),
            Target::Prefix(prefix) => Some(Selector::Path {
                prefix,
                exact: false,
            }),
            Target::Path(path) => Some(Selector::Path {
                prefix: path,
                exact: true,
            }),
            Target::Url(_) => None,
            Target::All => Some(Selector::All),
        };
        let local = |store: &MemoryStore, soft_at: Option<u64>| match (&selector, target, soft_at) {
            (Some(selector), _, None) => store.purge(selector),
            (Some(selector), _, Some(at)) => store.soft_purge(selector, at),
            (None, Target::Url(url), _) => {
                store.remove(&key::hash_url(url));
                1
            }
            (None, _, _) => 0,
        };
        if let Some(near) = &self.near {
            local(near, None);
        }
        let local_count = local(&self.memory, soft_at);
        match self.purge_redis(target, soft_at).await {
            Ok(urls) => Purged {
                urls,
                deferred: false,
            },
            Err(error) => {
                tracing::warn!(target: "tower_redis_cache", %error, "purge deferred: Redis is unavailable; purged in process, replayed on Redis when it is back");
                self.defer([Pending::Purge(target.clone(), soft_at)]);
                Purged {
                    urls: local_count,
                    deferred: true,
                }
            }
        }
    }

    async fn purge_redis(
        &self,
        target: &Target,
        soft_at: Option<u64>,
    ) -> Result<u64, tower_redis_core::Error> {
        let (index, filter): (String, Option<(&str, bool)>) = match target {
            Target::Url(url) => {
                return self.purge_urls(std::slice::from_ref(url), soft_at).await;
            }
            Target::Tag(tag) => (self.index_key("ct", tag), None),
            Target::Prefix(prefix) => (
                self.index_key(
                    "cx",
                    key::directory_for_prefix(prefix, self.options.index_depth),
                ),
                Some((prefix.as_str(), false)),
            ),
            Target::Path(path) => (
                self.index_key(
                    "cx",
                    key::directory_for_prefix(path, self.options.index_depth),
                ),
                Some((path.as_str(), true)),
            ),
            Target::All => (self.index_key("cx", "/"), None),
        };
        let mut count = 0;
        let mut start = 0isize;
        loop {
            // Pages by rank; a hard purge removes what it read, so it always
            // reads the first page.
            let page: Vec<String> = self
                .manager
                .query(
                    redis::cmd("ZRANGE")
                        .arg(&index)
                        .arg(start)
                        .arg(start + PURGE_BATCH as isize - 1),
                )
                .await?;
            if page.is_empty() {
                break;
            }
            let selected: Vec<&String> = page
                .iter()
                .filter(|url| match filter {
                    None => true,
                    Some((prefix, false)) => key::path_of(url).starts_with(prefix),
                    Some((path, true)) => key::path_of(url) == path,
                })
                .collect();
            let urls: Vec<String> = selected.iter().map(|url| (*url).clone()).collect();
            count += self.purge_urls(&urls, soft_at).await?;
            let done = page.len() < PURGE_BATCH;
            if soft_at.is_none() {
                // Drop what was purged from the index, so the next page is new.
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(&index);
                let mut removed = 0;
                for url in &selected {
                    zrem.arg(url.as_str());
                    removed += 1;
                }
                if removed > 0 {
                    self.manager.query::<()>(&zrem).await?;
                }
                start += (page.len() - removed) as isize;
            } else {
                start += page.len() as isize;
            }
            if done {
                break;
            }
        }
        if matches!(target, Target::All) && soft_at.is_none() {
            self.manager
                .query::<()>(
                    redis::cmd("PUBLISH")
                        .arg(self.events.channel())
                        .arg(Events::ALL_MESSAGE),
                )
                .await?;
        }
        Ok(count)
    }

    /// Deletes (or soft-purges) URLs' entries and announces each; returns
    /// how many existed. A hard purge also takes the URLs out of the root
    /// index, which counts the live entries.
    async fn purge_urls(
        &self,
        urls: &[String],
        soft_at: Option<u64>,
    ) -> Result<u64, tower_redis_core::Error> {
        let mut count = 0;
        for chunk in urls.chunks(PURGE_BATCH) {
            let mut ops = Vec::with_capacity(chunk.len() * 2 + 1);
            for url in chunk {
                let url_hash = &key::hash_url(url);
                let key = self.redis_key(url_hash);
                ops.push(match soft_at {
                    None => {
                        let mut del = redis::cmd("DEL");
                        del.arg(&key);
                        Op::Cmd(del)
                    }
                    Some(_) => Op::Script(redis_store::SOFT_PURGE.key(&key)),
                });
                ops.push(redis_store::publish(
                    self.events.channel(),
                    &Events::updated_message(url_hash),
                ));
            }
            let pairs = ops.len();
            if soft_at.is_none() {
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(self.index_key("cx", "/")).arg(chunk);
                ops.push(Op::Cmd(zrem));
            }
            let results = self.run_ops(&ops).await?;
            // Every other answer is a PUBLISH count.
            count += results[..pairs]
                .iter()
                .step_by(2)
                .filter(|v| matches!(v, Value::Int(n) if *n > 0))
                .count() as u64;
        }
        Ok(count)
    }

    /// An entry for the admin surface: the variant with no request headers.
    pub(crate) async fn inspect(&self, url_hash: &str) -> Option<(Entry, Tier)> {
        match self.lookup(url_hash, &HeaderMap::new(), "").await {
            (Lookup::Hit(entry), tier) => Some((entry, tier)),
            _ => None,
        }
    }

    /// Live URLs and an estimate of their bytes in Redis (sampled with
    /// `MEMORY USAGE`), or in the in-process store while Redis is down.
    pub(crate) async fn size(&self) -> (u64, u64, bool) {
        let root = self.index_key("cx", "/");
        let now_ms = freshness::epoch_ms(SystemTime::now());
        let counted = async {
            let entries: u64 = self
                .manager
                .query(redis::cmd("ZCOUNT").arg(&root).arg(now_ms).arg("+inf"))
                .await?;
            let sample: Vec<String> = self
                .manager
                .query(
                    redis::cmd("ZRANGE")
                        .arg(&root)
                        .arg("+inf")
                        .arg(now_ms)
                        .arg("BYSCORE")
                        .arg("REV")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(64),
                )
                .await?;
            let ops: Vec<Op> = sample
                .iter()
                .map(|url| {
                    let mut usage = redis::cmd("MEMORY");
                    usage.arg("USAGE").arg(self.redis_key(&key::hash_url(url)));
                    Op::Cmd(usage)
                })
                .collect();
            let found: Vec<u64> = self
                .run_ops(&ops)
                .await?
                .into_iter()
                .filter_map(|v| match v {
                    Value::Int(n) => u64::try_from(n).ok(),
                    _ => None,
                })
                .collect();
            let average = if found.is_empty() {
                0
            } else {
                found.iter().sum::<u64>() / found.len() as u64
            };
            Ok::<_, tower_redis_core::Error>((entries, entries * average))
        }
        .await;
        match counted {
            Ok((entries, bytes)) => (entries, bytes, false),
            Err(_) => {
                let (entries, bytes) = self.memory.size();
                (entries, bytes, true)
            }
        }
    }

    fn delete_ops<'a>(&self, url_hashes: impl Iterator<Item = &'a str>) -> Vec<Op> {
        let mut ops = Vec::new();
        for url_hash in url_hashes {
            let mut del = redis::cmd("DEL");
            del.arg(self.redis_key(url_hash));
            ops.push(Op::Cmd(del));
            ops.push(redis_store::publish(
                self.events.channel(),
                &Events::updated_message(url_hash),
            ));
        }
        ops
    }

    async fn run_ops(&self, ops: &[Op]) -> Result<Vec<Value>, tower_redis_core::Error> {
        self.manager
            .run(|mut conn| async move { redis_store::run_ops(&mut conn, ops).await })
            .await
    }

    fn defer(&self, writes: impl IntoIterator<Item = Pending>) {
        self.degraded.store(true, Ordering::Release);
        let mut pending = lock(&self.pending);
        for write in writes {
            if pending.len() < MAX_PENDING {
                pending.push(write);
            } else {
                tracing::warn!(target: "tower_redis_cache", "too many invalidations during the Redis outage; some stale entries may be served after it");
                break;
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
                if self.degraded.load(Ordering::Acquire)
                    && self.degraded.swap(false, Ordering::AcqRel)
                {
                    self.memory.clear();
                    self.replay().await;
                    tracing::info!(target: "tower_redis_cache", "Redis is back: in-process cache entries dropped");
                }
                false
            }
        }
    }

    /// Replays what could not reach Redis during the outage.
    async fn replay(&self) {
        let pending = std::mem::take(&mut *lock(&self.pending));
        let mut failed = Vec::new();
        for write in pending {
            let result = match &write {
                Pending::Invalidate(url_hash) => self
                    .run_ops(&self.delete_ops(std::iter::once(url_hash.as_str())))
                    .await
                    .map(|_| 0),
                Pending::Purge(target, soft_at) => self.purge_redis(target, *soft_at).await,
            };
            if result.is_err() {
                failed.push(write);
            }
        }
        if !failed.is_empty() {
            // Tried again on the next answer from Redis.
            lock(&self.pending).extend(failed);
            self.degraded.store(true, Ordering::Release);
        }
    }

    fn redis_key(&self, url_hash: &str) -> String {
        self.manager.keys().key(&["c", url_hash])
    }

    fn index_key(&self, kind: &str, name: &str) -> String {
        self.manager.keys().key(&[kind, name])
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::StatusCode;
    use tower_redis_core::testing::TestRedis;

    async fn store(redis: &TestRedis) -> CacheStore {
        let manager = RedisManager::connect(redis.config().build().unwrap())
            .await
            .unwrap();
        CacheStore::new(
            manager,
            StoreOptions {
                memory_bytes: 1 << 20,
                near: None,
                index_depth: 4,
                lock_ttl: Duration::from_secs(5),
            },
        )
    }

    fn put(url: &str, response_time_ms: u64) -> Put {
        Put {
            url_hash: key::hash_url(url),
            url: url.to_owned(),
            vary: String::new(),
            variant: key::variant("", &HeaderMap::new(), ""),
            entry: Entry {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body: Bytes::from_static(b"page"),
                response_time_ms,
                initial_age: 0,
                lifetime: 3600,
            },
            keep_for: Duration::from_secs(3600),
            tags: Vec::new(),
        }
    }

    /// Item 16 of issue 15: the soft-purge mark was the purging instance's
    /// clock, compared with the storing instance's response time. An entry
    /// stored by an instance whose clock runs ahead, or purged by one whose
    /// clock runs behind, stayed fresh after a soft purge.
    #[tokio::test]
    async fn a_soft_purge_is_ignored_by_entries_from_a_skewed_instance_clock() {
        let redis = TestRedis::start().await;
        let store = store(&redis).await;
        let now = freshness::epoch_ms(SystemTime::now());
        for (url, stored_at, purged_at) in [
            ("//shop.example/ahead", now + 60_000, now),
            ("//shop.example/behind", now, now - 60_000),
        ] {
            store.put(put(url, stored_at), None).await;
            let purged = store
                .purge(&Target::Url(url.to_owned()), Some(purged_at))
                .await;
            assert_eq!(purged.urls, 1);
            let (found, tier) = store
                .lookup(&key::hash_url(url), &HeaderMap::new(), "")
                .await;
            assert_eq!(tier, Tier::Redis);
            let Lookup::Hit(entry) = found else {
                panic!("{url}: a soft purge keeps the entry, stale: {found:?}");
            };
            let ttl = entry.ttl(freshness::epoch_ms(SystemTime::now()));
            assert!(
                ttl <= 0,
                "{url}: still fresh for {ttl} s after a soft purge"
            );
        }
    }
}
