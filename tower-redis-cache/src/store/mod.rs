//! Where entries live: Redis (shared by every instance), an optional near
//! cache in front of it, and a bounded in-process store while Redis is
//! unavailable.
//!
//! [`EntryStore`] is the cache's verbs on one place entries live, with a
//! Redis ([`RedisStore`]) and a memory ([`MemoryStore`]) implementation.
//! [`CacheStore`] composes the two for the service through core's
//! [`Failover`](tower_redis_core::degrade::Failover): Redis when it
//! answers, else the in-process store; invalidations and purges Redis
//! missed are queued and written when it answers again (before the next
//! lookup), then the in-process entries are dropped. By job: `lookup.rs`,
//! `purge.rs` (and invalidation), `lock.rs` (fill locks), `outage.rs` (the
//! queued changes, their replay and the queue's overflow policy).

mod data;
pub(crate) mod front;
mod lock;
mod lookup;
mod memory;
mod outage;
mod purge;
mod redis_store;
mod typed;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::HeaderMap;
use tower_redis_core::RedisConnection;
use tower_redis_core::bytes_cache::BytesCache;
use tower_redis_core::redis::RedisResult;
use tower_redis_core::redis::aio::ConnectionLike;
use tower_redis_core::redis::{self, Value};
use tower_redis_core::sync::Gather;
use tower_redis_core::{RedisManager, Subscriber};

use crate::bus::Bus;
use crate::entry::Entry;
use crate::freshness::Rules;
use crate::key;
pub(crate) use data::DATA_VARIANT;
pub(crate) use memory::MemoryStore;
pub(crate) use outage::OutageChange;
use outage::StoreFailover;
use redis_store::{Op, RedisStore};
use tower_redis_core::clock;

/// Variants kept per URL before the URL's entries start over, in Redis
/// (`put.lua`) and in process alike: a `Vary` on a field clients choose
/// (`Accept-Encoding`, `Accept-Language`) cannot grow one URL's record.
pub(crate) const MAX_VARIANTS: u32 = 32;

/// The `Vary` hints ([`VaryHint`]: the names last seen per URL, or that it
/// is absent and not storable) take at most this share of
/// `memory_capacity_bytes`, weighed by bytes like every store a client can
/// grow: 1 MiB of the default 64 MiB, some thousands of URLs. A URL without
/// a hint is looked up by the script instead of a plain `HMGET`: one round
/// trip either way (two when a hint turns out wrong).
const VARY_HINT_SHARE: u64 = 64;
/// The least the hints may take, however small the store.
const MIN_VARY_HINT_BYTES: u64 = 16 << 10;
/// The bookkeeping of one hint beyond its URL hash and names.
const VARY_HINT_OVERHEAD: usize = 96;

/// The cache's verbs on one place entries live. Implemented by
/// [`RedisStore`] (shared, may fail) and [`MemoryStore`] (this instance,
/// never fails, no cross-instance lock); [`CacheStore`] composes them.
pub(crate) trait EntryStore {
    type Error;

    /// The entry a request selects, and the URL's `Vary` names when the
    /// store knows them. `vary_hint` is the caller's guess of those names.
    fn lookup(
        &self,
        url_hash: &str,
        request: &HeaderMap,
        extra: &str,
        vary_hint: Option<String>,
    ) -> impl Future<Output = Result<(Found, Option<String>), Self::Error>> + Send;

    /// Stores an entry (and releases the fill lock `unlock`).
    fn put(
        &self,
        put: &Put,
        unlock: Option<&LockToken>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Deletes every variant of these URLs.
    fn invalidate(
        &self,
        url_hashes: &[String],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Deletes (or, with `soft_at`, marks stale) a target's entries;
    /// returns how many URLs had some.
    fn purge(
        &self,
        target: &Target,
        soft_at: Option<u64>,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// Takes a URL's fill lock, held under `token` when acquired.
    fn lock(
        &self,
        url_hash: &str,
        variant: Option<&str>,
        purpose: LockPurpose,
        token: &LockToken,
    ) -> impl Future<Output = Result<LockAttempt, Self::Error>> + Send;

    /// Releases a fill lock without storing, waking its waiters.
    fn unlock(
        &self,
        lock: LockToken,
        url_hash: &str,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// What a store holds for a request.
pub(crate) enum Found {
    Entry(Entry),
    NoUrl,
    NoVariant,
    /// A value that does not decode: its field, for deletion.
    Corrupt(String),
}

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
    /// When the response was asked of the origin (this instance's clock):
    /// a fill that asked before a purge of its URL does not store after
    /// it (`put.lua`). `None` for a write that is no fill.
    pub(crate) asked: Option<std::time::SystemTime>,
}

/// A fill lock held in Redis.
#[derive(Debug)]
pub(crate) struct LockToken {
    token: String,
    /// When Redis granted it (µs, Redis' clock), when known: its fill asks
    /// the origin no earlier, so a purge mark newer than this may be newer
    /// than the question (`index.lua`).
    taken_at_us: Option<u64>,
}

impl LockToken {
    /// A new random token: whose lock a holder releases.
    pub(crate) fn generate() -> Self {
        Self {
            token: format!("{:016x}", rand::random::<u64>()),
            taken_at_us: None,
        }
    }

    /// A token known from an earlier attempt.
    pub(crate) fn from_token(token: &str) -> Self {
        Self {
            token: token.to_owned(),
            taken_at_us: None,
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.token
    }

    /// When Redis granted the lock (µs, Redis' clock), when known.
    pub(crate) fn taken_at_us(&self) -> Option<u64> {
        self.taken_at_us
    }
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
    /// The bound of the outage queue (see `outage.rs`).
    pub(crate) outage_queue_bytes: usize,
    /// The HTTP cache's rules, by which the near tier parses each entry's
    /// directives once (`None`: a data cache's own store).
    pub(crate) rules: Option<Rules>,
}

/// What this instance knows of a URL in Redis: the hint that makes its
/// next lookup a plain `HMGET` of the variant the request selects (the
/// lookup script resolves the variant in Redis when there is no hint, or,
/// a second round trip, when the `HMGET` shows the URL's `Vary` is not the
/// hinted one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VaryHint {
    /// The URL's `Vary` names as a lookup or a store last saw them
    /// (normalised; empty without `Vary`), and whether its entry is large
    /// (above [`LARGE_ENTRY_BYTES`]: as this instance last stored it, or
    /// as a lookup since found one of its variants): such a URL's lookups
    /// are read alone, not gathered.
    Vary { names: String, large: bool },
    /// A lookup found the URL absent and its answer was not storable
    /// ([`CacheStore::remember_absent`]). Its next lookup reads the variant
    /// a response without `Vary` is stored under: what a URL that is still
    /// absent, or was stored since without `Vary`, answers in one round
    /// trip. A private page is looked up so on every request, without the
    /// script and the digest of every request header it takes.
    Absent,
    /// [`Absent`](Self::Absent), and known to be so: a lookup read on the
    /// tracking connection found it absent again, so Redis tells this
    /// instance when any instance writes it ([`Bus`] then makes it
    /// `Absent`). Its lookups make no round trip while the near tier is
    /// usable, this instance's trust in it is the one this mark was set
    /// under ([`Bus::trust`]: a lost tracking connection, a failover or a
    /// `FLUSHALL` ends every mark at once), and until the mark's deadline:
    /// as a near copy, it lives at most the near tier's time to live.
    KnownAbsent {
        trust: u64,
        until: std::time::Instant,
    },
}

impl VaryHint {
    /// The names a lookup assumes.
    pub(crate) fn names(&self) -> &str {
        match self {
            Self::Vary { names, .. } => names,
            Self::Absent | Self::KnownAbsent { .. } => "",
        }
    }

    /// Whether the URL's entries are large (see [`VaryHint::Vary`]).
    pub(crate) fn is_large(&self) -> bool {
        matches!(self, Self::Vary { large: true, .. })
    }

    /// Whether this instance last found the URL absent, its answer not
    /// storable.
    pub(crate) fn is_absent(&self) -> bool {
        matches!(self, Self::Absent | Self::KnownAbsent { .. })
    }

    /// Whether this is a known-absent mark that holds under `trust` now.
    pub(crate) fn is_known_absent(&self, trust: u64) -> bool {
        matches!(self, Self::KnownAbsent { trust: set, until } if *set == trust && *until > std::time::Instant::now())
    }
}

pub(crate) struct CacheStore {
    /// Redis, or the in-process store while it is unavailable.
    failover: StoreFailover,
    near: Option<Arc<MemoryStore>>,
    pub(crate) bus: Arc<Bus>,
    /// What this instance last saw of each URL in Redis, so that a lookup
    /// is a plain `HMGET` instead of a script; and, under a data value's
    /// hash, that the value is large (a hint without names).
    vary_hints: Arc<BytesCache<String, VaryHint>>,
    /// Whether this instance has read or stored a data value larger than
    /// [`LARGE_ENTRY_BYTES`]: only then does a data read look for the
    /// hint (in `vary_hints`, under the value's hash) that it is large.
    large_values: AtomicBool,
    /// Stores waiting for a response body to finish, for [`CacheStore::flushed`].
    in_flight: AtomicUsize,
    flushed: tokio::sync::Notify,
    pub(crate) counters: Counters,
    /// The HTTP cache's in-process flights, which purges detach (see
    /// `service/coalesce.rs`).
    pub(crate) flights: Arc<crate::service::Flights>,
    /// Lookups read from replicas (`CacheLayerBuilder::read_from_replicas`).
    pub(crate) read_from_replicas: bool,
    /// The data cache's reads that arrive while another is in flight,
    /// sent together (`data.rs`).
    data_reads: Gather<redis::Cmd, Result<Value, tower_redis_core::Error>>,
    /// The HTTP cache's hinted lookups (their `HMGET`s), gathered alike
    /// (`lookup.rs`).
    lookups: Gather<redis::Cmd, Result<Value, tower_redis_core::Error>>,
}

/// The most reads one pipeline of gathered reads takes besides its
/// leader's; later reads go alone until the next one forms. As many as
/// the rate limiter's batches: the replies share one connection (and wait
/// behind a large one) whether they are gathered or not.
const MAX_GATHERED_READS: usize = 255;

/// An entry heavier than this ([`Entry::weight`]: fields, body and a fixed
/// overhead) is read alone, not gathered with other reads, once this
/// instance has seen it so (the URL's [`VaryHint`] remembers it; a data
/// value's hint is one without names). A pipeline of large
/// replies is read into one growing buffer and answered only when its last
/// reply is in, and that cost more than the round trips it shares. Over
/// HTTP at 64 concurrent hits (the benches' `cache` suite, one cell at a
/// time, two runs each), hits read alone were 9–26 % faster than gathered
/// ones with 16 KiB entries and 33–67 % faster with 64 KiB ones, and
/// 1–6 % slower with 4 KiB ones.
pub(crate) const LARGE_ENTRY_BYTES: u32 = 8 * 1024;

/// Runs a read on the tracking connection (`tracking`: the bus's, when the
/// near tier follows tracking, so that Redis tells this instance when what
/// it read changes), else on the manager's pool. Not an `async fn`, which
/// would hold `op` beside the future that holds it too.
pub(crate) fn read_on<'a, T, F, Fut>(
    tracking: Option<&'a tower_redis_core::Tracking>,
    manager: &'a RedisManager,
    op: F,
) -> impl Future<Output = Result<T, tower_redis_core::Error>> + 'a
where
    F: FnOnce(RedisConnection) -> Fut + 'a,
    Fut: Future<Output = RedisResult<T>> + 'a,
    T: 'a,
{
    use futures_util::future::Either;
    match tracking {
        Some(tracking) => Either::Left(tracking.run(op)),
        None => Either::Right(manager.run(op)),
    }
}

/// A pipeline's replies, or the first error among them that says Redis is
/// unhealthy (`LOADING`, `MASTERDOWN`, …): that one fails the pipeline's
/// run, so that the breaker counts it as it would count a read's own. A
/// command's own error (a wrong type) stays in its reply, its reader's.
fn healthy(replies: Vec<Value>) -> RedisResult<Vec<Value>> {
    for reply in &replies {
        if let Value::ServerError(_) = reply
            && let Err(error) = reply.clone().extract_error()
            && !tower_redis_core::Error::Redis(error.clone()).is_command_error()
        {
            return Err(error);
        }
    }
    Ok(replies)
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
            .field("manager", &self.redis().manager)
            .finish_non_exhaustive()
    }
}

/// The items of an `HMGET` reply of `N` fields, taken apart in place when
/// the reply is the usual one (an array of `N` bulk strings or nils); any
/// other reply (a server error in place of it or inside it, another arity
/// or type) is given back for redis-rs' own conversion. That conversion
/// would first copy the array to look for errors in it, then convert each
/// value: an allocation and most of a hit's reply handling.
pub(crate) fn plain_items<const N: usize>(reply: Value) -> Result<[Value; N], Value> {
    let plain = |value: &Value| matches!(value, Value::BulkString(_) | Value::Nil);
    match reply {
        Value::Array(items) if items.iter().all(plain) => {
            <[Value; N]>::try_from(items).map_err(Value::Array)
        }
        other => Err(other),
    }
}

impl CacheStore {
    pub(crate) fn new(manager: RedisManager, options: StoreOptions) -> Self {
        let near = options
            .near
            .map(|(bytes, ttl)| Arc::new(MemoryStore::near(bytes, ttl, options.rules.clone())));
        let vary_hint_bytes = (options.memory_bytes / VARY_HINT_SHARE).max(MIN_VARY_HINT_BYTES);
        let vary_hints = Arc::new(BytesCache::new(
            vary_hint_bytes,
            |url_hash: &String, hint: &VaryHint| {
                url_hash.len() + hint.names().len() + VARY_HINT_OVERHEAD
            },
        ));
        let bus = Bus::new(manager.clone(), near.clone(), Arc::clone(&vary_hints));
        // A gathered read's member waits out its pipeline's run (within the
        // command timeout) with room to spare, then reads alone.
        let patience = manager.command_timeout().saturating_mul(2);
        let redis = RedisStore {
            channel: bus.channel().to_owned(),
            manager: manager.clone(),
            index_depth: options.index_depth,
            lock_ttl: options.lock_ttl,
            dropped_warning: Default::default(),
        };
        let memory = MemoryStore::new(options.memory_bytes, None);
        Self {
            failover: StoreFailover::builder(manager, redis, memory)
                .queue_bytes(options.outage_queue_bytes)
                .name("cache")
                .build(),
            near,
            bus,
            vary_hints,
            large_values: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            flushed: tokio::sync::Notify::new(),
            counters: Counters::default(),
            flights: Arc::default(),
            read_from_replicas: false,
            data_reads: Gather::new(MAX_GATHERED_READS, patience),
            lookups: Gather::new(MAX_GATHERED_READS, patience),
        }
    }

    /// Lookups read from replicas where the manager can (see
    /// `CacheLayerBuilder::read_from_replicas`).
    pub(crate) fn with_replica_reads(mut self, on: bool) -> Self {
        self.read_from_replicas = on;
        self
    }

    /// Whether a read served from `tier` fell back while the breaker still
    /// lets calls through and Redis hangs (the last operation to end timed
    /// out, none having succeeded since: `RedisManager::is_hanging`): the
    /// request has waited for Redis as long as a request may, and asks it
    /// for no fill lock or second read. An error that came at once (a
    /// `READONLY` after a failover) cost no wait: the request goes on.
    pub(crate) fn waited_in_vain(&self, tier: Tier) -> bool {
        tier == Tier::Degraded && self.hangs()
    }

    /// [`waited_in_vain`](Self::waited_in_vain) for a lock attempt.
    pub(crate) fn lock_waited_in_vain(&self, attempt: &LockAttempt) -> bool {
        matches!(attempt, LockAttempt::Unavailable) && self.hangs()
    }

    /// The breaker lets calls through, and Redis hangs.
    pub(crate) fn hangs(&self) -> bool {
        self.redis().manager.is_hanging()
    }

    fn redis(&self) -> &RedisStore {
        self.failover.redis()
    }

    /// A Redis lookup. When the near tier follows Redis client tracking it
    /// is read on the tracking connection, so that Redis tells this
    /// instance when the entry changes (see `bus.rs`); otherwise on the pool.
    ///
    /// A plain function that picks the read's future: an `async fn` would
    /// hold its arguments twice in the future of every lookup.
    fn read_entry<'a>(
        &'a self,
        redis: &'a RedisStore,
        url_hash: &'a str,
        request: &'a HeaderMap,
        extra: &'a str,
        vary_hint: Option<String>,
        alone: bool,
    ) -> impl Future<Output = Result<(Found, Option<String>), tower_redis_core::Error>> + Send + 'a
    {
        use futures_util::future::Either;
        if self.read_from_replicas && self.bus.tracking().is_none() {
            // Boxed: reads from replicas are a configuration few use.
            return Either::Right(Box::pin(
                redis.lookup_on_replica(url_hash, request, extra, vary_hint),
            ));
        }
        Either::Left(self.read_primary(redis, url_hash, request, extra, vary_hint, alone))
    }

    /// A lookup on the primary ([`read_on`]). With a
    /// `Vary` hint it is one `HMGET`, sent together with the lookups that
    /// arrive with it ([`read_gathered`](Self::read_gathered)), or on its
    /// own when `alone` (a large entry, [`LARGE_ENTRY_BYTES`]); the lookup
    /// script (no hint, or the URL's `Vary` changed) runs on its own.
    async fn read_primary(
        &self,
        redis: &RedisStore,
        url_hash: &str,
        request: &HeaderMap,
        extra: &str,
        vary_hint: Option<String>,
        alone: bool,
    ) -> Result<(Found, Option<String>), tower_redis_core::Error> {
        let key = redis.redis_key(url_hash);
        let Some(hint) = vary_hint else {
            return self.by_script(redis, key, request, extra).await;
        };
        // Borrowed for a URL without `Vary`: nothing copied.
        let query = (key, key::variant_of(&hint, request, extra));
        let reply = self
            .read_gathered(
                &self.lookups,
                redis,
                &query,
                redis_store::hinted_command,
                alone,
            )
            .await?;
        let (key, field) = query;
        match redis_store::hinted_found(reply, &hint, field)? {
            Some(found) => Ok(found),
            // The URL's Vary changed since this instance saw it.
            None => self.by_script(redis, key, request, extra).await,
        }
    }

    /// A lookup by the lookup script, on the primary. Boxed: it is not
    /// part of a hinted lookup's future.
    fn by_script<'a>(
        &'a self,
        redis: &'a RedisStore,
        key: String,
        request: &'a HeaderMap,
        extra: &'a str,
    ) -> BoxFuture<'a, Result<(Found, Option<String>), tower_redis_core::Error>> {
        Box::pin(read_on(
            self.bus.tracking(),
            &redis.manager,
            move |conn| async move {
                redis_store::lookup_by_script(
                    conn,
                    &key,
                    request,
                    extra,
                    redis_store::Reads::Primary,
                )
                .await
            },
        ))
    }

    fn memory(&self) -> &MemoryStore {
        self.failover.memory()
    }

    /// The reply to one read command (`command(query)`), as
    /// [`read_on`] runs it: alone, or, when other reads
    /// of `reads` are in flight, with those that arrive with it in one
    /// pipeline. Each
    /// caller parses its own reply; a failed call is every caller's error.
    /// While Redis is unavailable every read goes alone: the breaker
    /// answers it at once, with nothing to wait for. On a Redis Cluster
    /// every read goes alone too, each to its slot's node; and so does one
    /// told to go `alone`.
    ///
    /// Not an `async fn`, which would hold its arguments beside the
    /// closures that hold them too.
    fn read_gathered<'a, Q: Sync>(
        &'a self,
        reads: &'a Gather<redis::Cmd, Result<Value, tower_redis_core::Error>>,
        redis: &'a RedisStore,
        query: &'a Q,
        command: fn(&Q) -> redis::Cmd,
        alone: bool,
    ) -> impl Future<Output = Result<Value, tower_redis_core::Error>> + 'a {
        use futures_util::future::Either;
        // An error reply fails the read inside the run, so that the breaker
        // counts it by its kind, as any command's.
        let read_alone = move || {
            read_on(
                self.bus.tracking(),
                &redis.manager,
                move |mut conn| async move {
                    conn.req_packed_command(&command(query))
                        .await?
                        .extract_error()
                },
            )
        };
        if alone || !redis.manager.is_available() || redis.manager.is_cluster() {
            // Nothing to share: while Redis is unavailable the breaker
            // answers at once; on a cluster a pipeline cannot span slots.
            // A read told to go `alone` (a large reply) waits for no batch.
            return Either::Left(read_alone());
        }
        Either::Right(reads.run(
            // A member hands the batch its command, built once: the
            // leader pipelines the commands as they are.
            move || command(query),
            read_alone,
            // The batch's call owns what it reads with (it goes on when
            // its leader is cancelled); only a leader clones them.
            move |commands| {
                let (bus, manager) = (Arc::clone(&self.bus), redis.manager.clone());
                async move {
                    let count = commands.len();
                    let read = |conn| async move {
                        healthy(redis_store::run_commands(conn, commands).await?)
                    };
                    let replies = read_on(bus.tracking(), &manager, read).await;
                    match replies {
                        Ok(replies) => replies.into_iter().map(Ok).collect(),
                        Err(error) => (0..count).map(|_| Err(error.clone())).collect(),
                    }
                }
            },
        ))
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
    #[cfg(test)]
    pub(crate) async fn put(&self, put: Put, lock: Option<LockToken>) {
        self.put_caught_up(put, lock, true).await;
    }

    /// [`put`](Self::put) for a request that Redis may already have failed:
    /// unless `caught_up`, and while no operation has succeeded since the
    /// last failure, the entry goes to the in-process store without asking
    /// Redis (`Failover::run_caught_up`), as it would after a timeout.
    /// A fill lock held means Redis answered this request: it is asked.
    pub(crate) async fn put_caught_up(&self, put: Put, lock: Option<LockToken>, caught_up: bool) {
        let caught_up = caught_up || lock.is_some();
        self.vary_hints.insert(
            put.url_hash.clone(),
            VaryHint::Vary {
                names: put.vary.clone(),
                large: put.entry.weight() > LARGE_ENTRY_BYTES,
            },
        );
        self.counters.stores.fetch_add(1, Ordering::Relaxed);
        if let Some(near) = &self.near {
            near.remove(&put.url_hash);
        }
        let put = &put;
        self.failover
            .run_caught_up(
                caught_up,
                |redis| redis.put(put, lock.as_ref()),
                |memory, _| async move {
                    let Ok(()) = memory.put(put, None).await;
                },
            )
            .await;
        self.after_write(&put.url_hash);
    }

    /// After this instance wrote a URL's entry: a lookup that read the
    /// previous one before the write may be keeping it in the near tier.
    /// Redis reports the write on the tracking connection, but that word
    /// comes after the lookup's answer, and may come after the write's
    /// acknowledgement: until then this instance would serve the old
    /// copy after its own write. The epoch makes lookups under way drop
    /// their copies, and what one kept goes. Tests:
    /// `a_lookup_answered_before_this_instance_stored_keeps_no_copy_of_the_old_page`
    /// (`tests/features.rs`),
    /// `a_read_answered_before_this_instance_s_write_keeps_no_copy_of_the_old_value`
    /// (`tests/data.rs`).
    pub(crate) fn after_write(&self, url_hash: &str) {
        if let Some(near) = &self.near {
            self.bus.bump_epoch();
            near.remove(url_hash);
        }
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
        let root = self.redis().index_key("cx", "/");
        let now_ms = clock::now_ms();
        let counted = async {
            let entries: u64 = self
                .redis()
                .manager
                .query(redis::cmd("ZCOUNT").arg(&root).arg(now_ms).arg("+inf"))
                .await?;
            let sample: Vec<String> = self
                .redis()
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
                    usage
                        .arg("USAGE")
                        .arg(self.redis().redis_key(&key::hash_url(url)));
                    Op::Cmd(usage)
                })
                .collect();
            let found: Vec<u64> = self
                .redis()
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
                let (entries, bytes) = self.memory().size();
                (entries, bytes, true)
            }
        }
    }
}

/// For the tests of a reply taken apart with [`plain_items`]: whatever
/// the reply, `ours` answers what redis-rs' own conversion (the one
/// `query_async` made before) does: the same values, or an error of the
/// same kind and text.
#[cfg(test)]
pub(crate) fn assert_same_as_redis_rs<T>(
    replies: impl IntoIterator<Item = Value>,
    ours: fn(Value) -> redis::RedisResult<T>,
) where
    T: redis::FromRedisValue + PartialEq + std::fmt::Debug,
{
    for reply in replies {
        let theirs: redis::RedisResult<T> = reply
            .clone()
            .extract_error()
            .and_then(|reply| Ok(redis::from_redis_value(reply)?));
        let ours = ours(reply.clone());
        match (&ours, &theirs) {
            (Ok(ours), Ok(theirs)) => assert_eq!(ours, theirs, "{reply:?}"),
            (Err(ours), Err(theirs)) => {
                assert_eq!(ours.kind(), theirs.kind(), "{reply:?}");
                assert_eq!(ours.to_string(), theirs.to_string(), "{reply:?}");
            }
            _ => panic!("{reply:?}: {ours:?} against redis-rs' {theirs:?}"),
        }
    }
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
                outage_queue_bytes: 1 << 20,
                rules: None,
            },
        )
    }

    /// A known-absent mark holds only under the trust it was set under,
    /// and only until its deadline (the near tier's time to live).
    #[test]
    fn a_known_absent_mark_holds_under_its_trust_until_its_deadline() {
        let now = std::time::Instant::now();
        let mark = |trust, until| VaryHint::KnownAbsent { trust, until };
        let later = now + Duration::from_secs(60);
        assert!(mark(3, later).is_known_absent(3));
        assert!(!mark(3, later).is_known_absent(4), "after a loss of trust");
        assert!(!mark(3, now).is_known_absent(3), "past its deadline");
        assert!(!VaryHint::Absent.is_known_absent(3));
        let vary = |large| VaryHint::Vary {
            names: String::new(),
            large,
        };
        assert!(!vary(false).is_known_absent(3));
        assert!(vary(true).is_large() && !vary(false).is_large());
        for hint in [mark(3, later), VaryHint::Absent] {
            assert!(hint.is_absent() && hint.names().is_empty());
        }
    }

    /// A URL marked absent keeps a hint already there (a store's names);
    /// a lookup that found a large entry raises `large` only over the
    /// names it started from, not over a store's newer ones.
    #[tokio::test]
    async fn hint_changes_keep_what_a_store_wrote_meanwhile() {
        let redis = TestRedis::start().await;
        let store = store(&redis).await;
        let url = key::hash_url("//shop.example/p");
        let vary = |names: &str, large| VaryHint::Vary {
            names: names.to_owned(),
            large,
        };
        let hint = || store.vary_hints.get(url.as_str());
        // A lookup that began with the names `accept` found a large entry.
        let found_large = || {
            store.update_vary_hint(
                &url,
                Some(vary("accept", false)),
                Some("accept"),
                true,
                Tier::Redis,
            );
        };
        store.vary_hints.insert(url.clone(), vary("accept", false));
        store.remember_absent(&url);
        assert_eq!(hint(), Some(vary("accept", false)));
        found_large();
        assert_eq!(hint(), Some(vary("accept", true)));
        // A store wrote other names after the lookup began.
        store.vary_hints.insert(url.clone(), vary("cookie", false));
        found_large();
        assert_eq!(hint(), Some(vary("cookie", false)));
        store.remember_absent("//never-seen");
        assert_eq!(store.vary_hints.get("//never-seen"), Some(VaryHint::Absent));
    }

    /// The `Vary` hints, known-absent marks included, cannot grow past
    /// their share of the store's bytes, however many distinct URLs a
    /// client makes.
    #[tokio::test]
    async fn vary_hints_and_known_absent_marks_are_bounded_by_bytes() {
        let redis = TestRedis::start().await;
        let store = store(&redis).await;
        for i in 0..100_000 {
            let hint = if i % 2 == 0 {
                VaryHint::KnownAbsent {
                    trust: 0,
                    until: std::time::Instant::now(),
                }
            } else {
                VaryHint::Vary {
                    names: "accept-encoding".to_owned(),
                    large: false,
                }
            };
            store
                .vary_hints
                .insert(key::hash_url(&format!("//shop.example/u/{i}")), hint);
        }
        let bound = ((1 << 20) / VARY_HINT_SHARE).max(MIN_VARY_HINT_BYTES);
        let held = store.vary_hints.bytes();
        assert!(held <= bound, "{held} bytes of hints, bound {bound}");
        // Each weighed by its bytes, not counted as one.
        let least = (key::hash_url("//shop.example/u/0").len() + VARY_HINT_OVERHEAD) as u64;
        let count = store.vary_hints.len() as u64;
        assert!(count > 50, "{count}");
        assert!(
            count * least <= bound,
            "{count} hints of at least {least} bytes"
        );
    }

    /// A store whose breaker opens at the first failure, with an outage
    /// queue of `queue_bytes`.
    async fn failing_fast(redis: &TestRedis, queue_bytes: usize) -> CacheStore {
        let config = redis.config().failure_threshold(1).build().unwrap();
        CacheStore::new(
            RedisManager::connect(config).await.unwrap(),
            StoreOptions {
                memory_bytes: 1 << 20,
                near: None,
                index_depth: 4,
                lock_ttl: Duration::from_secs(5),
                outage_queue_bytes: queue_bytes,
                rules: None,
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
            asked: None,
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
        let now = clock::now_ms();
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
            let ttl = entry.ttl(clock::now_ms());
            assert!(
                ttl <= 0,
                "{url}: still fresh for {ttl} s after a soft purge"
            );
        }
    }

    /// The in-process entries go at Redis's first answer after an outage,
    /// even while the outage queue cannot be written yet: once Redis is
    /// back, other instances may purge those pages there, so a later
    /// fallback must not serve them.
    #[tokio::test]
    async fn in_process_entries_are_dropped_at_redis_first_answer_not_when_the_queue_is_written() {
        let redis = TestRedis::start().await;
        let store = failing_fast(&redis, 1 << 20).await;
        let url = "//shop.example/page";
        let other = "//shop.example/other";
        store.put(put(other, clock::now_ms()), None).await;
        // Redis out of memory refuses writes (and answers reads): the soft
        // purge queued below cannot be written when it is back.
        redis.config_set("maxmemory", "1").await.unwrap();
        redis.pause().await;
        store.put(put(url, clock::now_ms()), None).await;
        assert_eq!(store.memory().size().0, 1, "stored in process");
        let other = Target::Url(other.to_owned());
        store.purge(&other, Some(clock::now_ms())).await;
        redis.resume().await;
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let (_, tier) = store
                    .lookup(&key::hash_url(url), &HeaderMap::new(), "")
                    .await;
                if tier == Tier::Redis {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("Redis answers a lookup");
        assert!(store.failover.is_degraded(), "the queue is not written yet");
        assert_eq!(store.memory().size().0, 0, "dropped at the first answer");
    }

    /// More invalidations during an outage than the queue holds: the queue
    /// stays bounded (past its bound, one soft purge of everything instead
    /// of the rest), and once Redis is back no entry stored before the
    /// outage is served as fresh: each is either gone or stale.
    #[tokio::test]
    async fn an_outage_with_more_invalidations_than_fit_leaves_no_entry_fresh() {
        let redis = TestRedis::start().await;
        let store = failing_fast(&redis, 2_000).await;
        let now = clock::now_ms();
        let urls: Vec<String> = (0..100)
            .map(|i| format!("//shop.example/item/{i}"))
            .collect();
        for url in &urls {
            store.put(put(url, now), None).await;
        }
        redis.pause().await;
        for url in &urls {
            store.invalidate(&[key::hash_url(url)]).await;
        }
        let usage = store.failover.queue_usage();
        assert!(store.failover.is_degraded());
        assert!(
            usage.bytes <= usage.limit_bytes + 400 && usage.changes < 20,
            "the queue grew past its bound: {usage:?}"
        );
        redis.resume().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while !store.redis().manager.is_available() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "Redis never came back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let now = clock::now_ms();
        for url in &urls {
            let (found, tier) = store
                .lookup(&key::hash_url(url), &HeaderMap::new(), "")
                .await;
            assert_eq!(tier, Tier::Redis, "{url}");
            if let Lookup::Hit(entry) = found {
                let ttl = entry.ttl(now);
                assert!(
                    ttl <= 0,
                    "{url}: invalidated during the outage, yet fresh for {ttl} s"
                );
            }
        }
        assert_eq!(store.failover.queue_usage().changes, 0);
        assert!(!store.failover.is_degraded());
    }

    /// An entry kept in process during one outage is dropped when Redis is
    /// back: the next outage does not serve it (Redis may since hold newer).
    #[tokio::test]
    async fn the_in_process_store_is_dropped_when_redis_is_back() {
        let redis = TestRedis::start().await;
        let config = redis.config().failure_threshold(1).build().unwrap();
        let manager = RedisManager::connect(config).await.unwrap();
        let store = CacheStore::new(
            manager.clone(),
            StoreOptions {
                memory_bytes: 1 << 20,
                near: None,
                index_depth: 4,
                lock_ttl: Duration::from_secs(5),
                outage_queue_bytes: 1 << 20,
                rules: None,
            },
        );
        let url = "//shop.example/outage-only";
        let hash = key::hash_url(url);
        let now = clock::now_ms();
        redis.pause().await;
        store.put(put(url, now), None).await;
        let (found, tier) = store.lookup(&hash, &HeaderMap::new(), "").await;
        assert!(matches!(found, Lookup::Hit(_)) && tier == Tier::Degraded);
        redis.resume().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (found, tier) = store.lookup(&hash, &HeaderMap::new(), "").await;
            if tier == Tier::Redis {
                assert!(matches!(found, Lookup::UriMiss), "{found:?}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Redis never came back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!store.failover.is_degraded());
        redis.pause().await;
        let (found, tier) = store.lookup(&hash, &HeaderMap::new(), "").await;
        assert_eq!(tier, Tier::Degraded);
        assert!(
            matches!(found, Lookup::UriMiss),
            "an entry from the previous outage was kept: {found:?}"
        );
        redis.resume().await;
    }
}
