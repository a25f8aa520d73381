//! Server-assisted client-side caching: local copies of Redis keys that
//! Redis itself keeps exact (`CLIENT TRACKING`).
//!
//! One **tracking connection** per manager: a RESP3 multiplexed connection
//! with `CLIENT TRACKING on NOLOOP` (default mode: Redis remembers which keys
//! *this connection* read, and pushes an `invalidate` message on the same
//! connection when any client changes, deletes or expires one of them). The
//! reads whose answers are kept locally are sent on that connection
//! ([`Tracking::run`]), and so are the writes whose results a layer keeps
//! through a [`WriteTicket`] ([`TrackedCache::begin_write`]); everything
//! else keeps using the pool. Because the
//! read and its invalidation travel on one socket, in order, no pool
//! connection needs tracking and nothing has to be re-pointed when a
//! connection is replaced: a new tracking connection starts with every local
//! copy dropped.
//!
//! Layers keep their copies in a [`TrackedCache`] (bounded by bytes), made by
//! [`Tracking::cache`], or register any structure that implements
//! [`Invalidate`]. Every registered structure is told:
//!
//! - a key was invalidated (changed, deleted, expired or evicted in Redis,
//!   or dropped from the server's tracking table);
//! - **everything** is invalid: at every (re)connection of the tracking
//!   connection and whenever it is lost (closed, killed, no answer to the
//!   heartbeat `PING` within the command timeout), when the breaker opens,
//!   when the pool starts a new generation (a Sentinel `+switch-master`, a
//!   `READONLY` answer, a dropped pooled connection), and on `FLUSHALL` /
//!   `FLUSHDB` (Redis sends a null invalidation).
//!
//! # The guarantee
//!
//! When Redis executes instance A's write, it queues the invalidation to
//! instance B's tracking connection before it replies to A. So once A's
//! write is acknowledged, B serves the old value only until B's tracking
//! connection has read that message (normally well under a millisecond:
//! the same network path as any reply). Where even that window matters,
//! [`Tracking::sync`] closes it: a `PING` on the tracking connection whose
//! answer arrives after every invalidation queued before it, so a read on
//! B after A's acknowledgement and B's `sync` never sees the old value. A
//! tracking connection that goes silent without closing (a partition) is
//! found by the heartbeat: copies may be served for at most the heartbeat
//! interval plus the command timeout after the last sign of life.
//!
//! Reads race with invalidations: a read that Redis answered before a write
//! can land after the write's invalidation was applied here. A
//! [`TrackedCache`] therefore keeps an answer only through a [`Ticket`] taken
//! *before* the read: an invalidation of the key (or of everything) voids
//! every ticket outstanding for it, and a void ticket keeps nothing.
//!
//! # Writes on the tracking connection
//!
//! A layer that can compute what its own write leaves in Redis (the copy
//! with the write's changes) sends the write on the tracking connection
//! with a [`WriteTicket`], and keeps the result as the copy: the next read
//! costs no round trip. Redis reports a connection's own writes to nobody
//! on it (`NOLOOP`) and drops the key from its tracking table at the
//! write, so the write must read the key last, in the same atomic step (a
//! script's last command): the key stays tracked, and later changes by
//! others are still reported. The ticket voids the reads of the key in
//! flight and any overlapping write of it, and invalidates the key in the
//! other structures on the connection when the write begins and ends. The
//! connection is not used once the pool has moved to a new generation (a
//! Sentinel switch, a `READONLY` answer), so such a write never reaches a
//! demoted primary.
//!
//! # Topologies
//!
//! Standalone and Sentinel (the tracking connection follows the primary the
//! Sentinels name, like the pool). On a **Redis Cluster** tracking is off
//! ([`RedisManager::tracking`] returns `None`): a key read on one node is
//! tracked by that node only, and one connection cannot read every slot.
//! Layers then read from Redis every time, as without tracking.
//!
//! # Why not redis-rs' `cache-aio`
//!
//! It caches command replies per multiplexed connection, bounded by entry
//! count: with a pool of N connections that is N separate caches and N
//! times the server's tracking table, with no hook for the manager's own
//! events (breaker, Sentinel switch) and no way to keep a parsed value
//! (a session record, a cache entry with its freshness) instead of the raw
//! reply. The tracking connection here is one per manager, and each layer
//! keeps what it needs, bounded by bytes.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, RedisError, RedisResult, Value,
};

use crate::backend::Backend;
use crate::breaker::BreakerState;
use crate::bytes_cache::BytesCache;
use crate::connection::RedisConnection;
use crate::error::{Error, counts_against_breaker};
use crate::manager::{Inner, RedisManager};
use crate::sync::lock;

/// How often the tracking connection is checked with a `PING` while idle.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// The argument of the heartbeat `PING` (so that round-trip counts in
/// tests can tell it from a request's commands).
pub(crate) const HEARTBEAT_MESSAGE: &str = "tower-redis-tracking";
/// The first pause before reconnecting a lost tracking connection.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// The longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Told by the tracking connection what is no longer valid. Implemented by
/// [`TrackedCache`]; layers with their own structures implement it and
/// [`register`](Tracking::register) them.
///
/// Both methods are called from the connection's reader, in the order
/// Redis sent the messages: they must be quick and must not block.
pub trait Invalidate: Send + Sync + 'static {
    /// The key (a full Redis key, prefix included) changed in Redis.
    fn invalidate(&self, key: &[u8]);
    /// Everything may have changed: drop every copy.
    fn invalidate_all(&self);
}

/// The manager's tracking connection and the local structures it keeps
/// exact. Cheap to clone. See the [module docs](self) for the guarantee.
#[derive(Clone)]
pub struct Tracking {
    shared: Arc<Shared>,
}

struct Shared {
    manager: Weak<Inner>,
    /// The pool generation to follow (standalone / Sentinel): a new
    /// generation means the primary may have changed.
    generation: Option<Arc<AtomicU64>>,
    /// The current tracking connection, when live.
    conn: Mutex<Option<Live>>,
    /// Copies may be served and tickets given out.
    live: AtomicBool,
    /// The pool generation the live connection was made in: once the pool
    /// moves on (a Sentinel switch), the connection may point at a demoted
    /// primary, and is not used again (not even before the heartbeat
    /// notices).
    live_generation: AtomicU64,
    /// Which connection is current; a closing old connection's last message
    /// must not mark the new one lost.
    serial: AtomicU64,
    registered: Mutex<Vec<Weak<dyn Invalidate>>>,
    started: AtomicBool,
    /// Counts flushes, for tests and metrics.
    flushes: AtomicU64,
}

#[derive(Clone)]
struct Live {
    conn: MultiplexedConnection,
    serial: u64,
    /// The pool generation it was made in.
    generation: u64,
}

impl fmt::Debug for Tracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracking")
            .field("live", &self.is_live())
            .finish_non_exhaustive()
    }
}

impl RedisManager {
    /// The manager's tracking connection, made on first use (its task
    /// starts with the first call made inside a Tokio runtime). `None` on a
    /// Redis Cluster and on a disabled manager: see the
    /// [`tracking`](crate::tracking) module.
    ///
    /// ```
    /// # use tower_redis_core::RedisManager;
    /// assert!(RedisManager::disabled().tracking().is_none());
    /// ```
    pub fn tracking(&self) -> Option<Tracking> {
        let tracking = self
            .inner
            .tracking
            .get_or_init(|| {
                let generation = match &self.inner.backend {
                    Backend::Standalone { generation, .. } => Some(Arc::clone(generation)),
                    Backend::Cluster { .. } => {
                        // Said once: the layers that would read through
                        // tracking go to Redis on every read instead.
                        tracing::info!(
                            target: "tower_redis_core",
                            "client tracking is off on a Redis Cluster: session reads and the cache's near tier \
                             go to Redis on every read (0-round-trip reads need a standalone or Sentinel Redis)"
                        );
                        return None;
                    }
                    Backend::Disabled => return None,
                };
                Some(Tracking {
                    shared: Arc::new(Shared {
                        manager: Arc::downgrade(&self.inner),
                        generation,
                        conn: Mutex::new(None),
                        live: AtomicBool::new(false),
                        live_generation: AtomicU64::new(0),
                        serial: AtomicU64::new(0),
                        registered: Mutex::new(Vec::new()),
                        started: AtomicBool::new(false),
                        flushes: AtomicU64::new(0),
                    }),
                })
            })
            .clone()?;
        tracking.ensure_started();
        Some(tracking)
    }
}

/// The manager's slot for its tracking connection.
pub(crate) type TrackingSlot = OnceLock<Option<Tracking>>;

impl Tracking {
    /// Whether local copies can be trusted now: the tracking connection is
    /// up, has tracking on, and the breaker is closed.
    pub fn is_live(&self) -> bool {
        self.shared.live.load(Ordering::Acquire) && !self.shared.moved()
    }

    /// How many times every registered structure was told to drop
    /// everything (connection lost or replaced, breaker open, `FLUSHALL`).
    pub fn flushes(&self) -> u64 {
        self.shared.flushes.load(Ordering::Acquire)
    }

    /// Registers a structure to keep exact. It is told to drop everything
    /// at once (its copies were made under no tracking), and held weakly:
    /// dropping it unregisters it.
    pub fn register(&self, structure: Weak<dyn Invalidate>) {
        if let Some(structure) = structure.upgrade() {
            structure.invalidate_all();
        }
        let mut registered = lock(&self.shared.registered);
        registered.retain(|r| r.strong_count() > 0);
        registered.push(structure);
    }

    /// A byte-bounded local cache kept exact by this tracking connection.
    /// `weigh` gives an entry's size in bytes (the key's length is added).
    pub fn cache<V: Clone + Send + Sync + 'static>(
        &self,
        capacity_bytes: u64,
        weigh: fn(&V) -> usize,
    ) -> TrackedCache<V> {
        let inner = Arc::new(CacheInner {
            copies: BytesCache::new(capacity_bytes, move |key: &Arc<[u8]>, value: &V| {
                key.len() + weigh(value) + ENTRY_OVERHEAD
            }),
            pending: Mutex::new(Pending::default()),
            next_ticket: AtomicU64::new(1),
        });
        let weak: Weak<CacheInner<V>> = Arc::downgrade(&inner);
        self.register(weak);
        TrackedCache {
            inner,
            tracking: self.clone(),
        }
    }

    /// Waits until every invalidation Redis queued for this instance before
    /// now has been applied: one `PING` on the tracking connection. After
    /// another instance's write was acknowledged, a read made after `sync`
    /// never returns the old value from a local copy.
    ///
    /// Fails when the tracking connection is down (then no copy is served
    /// anyway) or does not answer within the command timeout (then it is
    /// dropped, and with it every copy).
    pub async fn sync(&self) -> Result<(), Error> {
        let Some(live) = self.current() else {
            return Err(Error::BreakerOpen);
        };
        let timeout = self.command_timeout();
        let mut conn = live.conn.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(timeout, ping.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                self.shared.lose(live.serial);
                Err(Error::Redis(error))
            }
            Err(_) => {
                self.shared.lose(live.serial);
                Err(Error::Timeout(timeout))
            }
        }
    }

    /// Runs a read on the tracking connection, within the command timeout
    /// and accounted to the breaker like [`RedisManager::run`], so that
    /// Redis tracks the keys it reads for this instance. When the tracking
    /// connection is not live, the read runs on the pool instead (its
    /// answer is then not tracked, and a [`Ticket`] taken before keeps
    /// nothing).
    ///
    /// Not an `async fn`, which would hold `op` twice in the future of
    /// every tracked read.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` would hold its arguments twice in its future"
    )]
    pub fn run<T, F, Fut>(&self, op: F) -> impl Future<Output = Result<T, Error>>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        async move {
            let Some(manager) = self.manager() else {
                return Err(Error::BreakerOpen);
            };
            let Some(live) = self.current() else {
                return manager.run(op).await;
            };
            if !manager.inner.breaker.allows_requests() {
                return Err(Error::BreakerOpen);
            }
            let timeout = manager.inner.command_timeout;
            // As in `RedisManager::run`: a caller that gives up first
            // sends the manager's canary.
            let abandoned = crate::failover::Abandoned::arm(&manager);
            let outcome =
                tokio::time::timeout(timeout, op(RedisConnection::standalone(live.conn))).await;
            std::mem::forget(abandoned);
            match outcome {
                Ok(Ok(value)) => {
                    manager.record_success();
                    Ok(value)
                }
                Ok(Err(error)) => {
                    if counts_against_breaker(&error) {
                        if error.is_io_error() || error.is_connection_dropped() {
                            self.shared.lose(live.serial);
                        } else if crate::failover::is_readonly(&error) {
                            // A demoted primary (a Sentinel failover): this
                            // connection and the pool's follow the new one.
                            self.shared.lose(live.serial);
                            manager.inner.backend.discard_connections();
                        }
                        manager.record_failure(&error);
                    } else {
                        manager.inner.breaker.on_success();
                    }
                    Err(Error::Redis(error))
                }
                Err(_) => {
                    self.shared.lose(live.serial);
                    Err(manager.record_timeout())
                }
            }
        }
    }

    fn manager(&self) -> Option<RedisManager> {
        self.shared
            .manager
            .upgrade()
            .map(|inner| RedisManager { inner })
    }

    fn command_timeout(&self) -> Duration {
        self.shared
            .manager
            .upgrade()
            .map_or(Duration::from_secs(1), |inner| inner.command_timeout)
    }

    fn current(&self) -> Option<Live> {
        if !self.shared.live.load(Ordering::Acquire) {
            return None;
        }
        let live = lock(&self.shared.conn).clone()?;
        if self.shared.moved_since(live.generation) {
            // The pool follows a new primary: so does the next connection.
            self.shared.lose(live.serial);
            return None;
        }
        Some(live)
    }

    fn ensure_started(&self) {
        if self.shared.started.load(Ordering::Acquire)
            || self.shared.started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(keep_connected(Arc::downgrade(&self.shared)));
            }
            Err(_) => self.shared.started.store(false, Ordering::Release),
        }
    }
}

impl Shared {
    /// The pool has moved to a new generation since the live connection
    /// was made (standalone and Sentinel only).
    fn moved(&self) -> bool {
        self.moved_since(self.live_generation.load(Ordering::Acquire))
    }

    /// The pool has moved to a new generation since `generation`.
    fn moved_since(&self, generation: u64) -> bool {
        self.generation
            .as_ref()
            .is_some_and(|now| now.load(Ordering::Acquire) != generation)
    }

    fn each(&self, f: impl Fn(&dyn Invalidate)) {
        let registered: Vec<Arc<dyn Invalidate>> = lock(&self.registered)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for structure in registered {
            f(&*structure);
        }
    }

    fn flush(&self) {
        self.flushes.fetch_add(1, Ordering::AcqRel);
        self.each(|s| s.invalidate_all());
        crate::record::counter("tower_redis_tracking_flushes_total", &[], 1);
    }

    /// The connection `serial` is no longer trusted: nothing is served
    /// from local copies until a new one is up.
    fn lose(&self, serial: u64) {
        let mut conn = lock(&self.conn);
        if self.serial.load(Ordering::Acquire) != serial {
            return;
        }
        // A new serial: the closing connection's late messages are ignored.
        self.serial.fetch_add(1, Ordering::AcqRel);
        self.live.store(false, Ordering::Release);
        *conn = None;
        drop(conn);
        self.flush();
    }

    fn on_push(&self, serial: u64, info: PushInfo) {
        match info.kind {
            PushKind::Invalidate => match info.data.first() {
                Some(Value::Array(keys)) => {
                    for key in keys {
                        if let Value::BulkString(key) = key {
                            self.each(|s| s.invalidate(key));
                        }
                    }
                }
                // FLUSHALL / FLUSHDB, or the server's tracking table dropped.
                _ => self.flush(),
            },
            PushKind::Disconnection => self.lose(serial),
            _ => {}
        }
    }
}

/// The background task: keeps one tracking connection up while the breaker
/// is closed, and drops every copy whenever trust is lost.
async fn keep_connected(shared: Weak<Shared>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let Some(inner) = strong.manager.upgrade() else {
            return;
        };
        let manager = RedisManager { inner };
        let mut breaker = manager.subscribe();
        if *breaker.borrow_and_update() != BreakerState::Closed {
            drop((strong, manager));
            // Waits for the breaker to close (or the manager to go).
            if breaker.changed().await.is_err() {
                return;
            }
            continue;
        }
        let generation = strong
            .generation
            .as_ref()
            .map(|g| g.load(Ordering::Acquire));
        let serial = strong.serial.load(Ordering::Acquire);
        let connected = connect(&manager, Arc::downgrade(&strong), serial).await;
        let conn = match connected {
            Ok(conn) => conn,
            Err(error) => {
                tracing::debug!(target: "tower_redis", %error, "cannot open the tracking connection; retrying");
                drop((strong, manager));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let installed = {
            let mut slot = lock(&strong.conn);
            // Lost while connecting (its reader already closed)?
            let installed = strong.serial.load(Ordering::Acquire) == serial;
            if installed {
                // Copies from before were made without this connection's
                // tracking: dropped before any new one can be made.
                strong.flush();
                *slot = Some(Live {
                    conn: conn.clone(),
                    serial,
                    generation: generation.unwrap_or(0),
                });
                strong
                    .live_generation
                    .store(generation.unwrap_or(0), Ordering::Release);
                strong.live.store(true, Ordering::Release);
            }
            installed
        };
        if !installed {
            // Retried with the backoff, as a failed connect is, so that a
            // server that drops every new connection is not asked in a loop.
            drop((strong, manager));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        backoff = MIN_BACKOFF;
        tracing::debug!(target: "tower_redis", "tracking connection up");
        let timeout = manager.inner.command_timeout;
        drop((strong, manager));
        watch(&shared, conn, serial, generation, breaker, timeout).await;
        let Some(strong) = shared.upgrade() else {
            return;
        };
        strong.lose(serial);
        tracing::debug!(target: "tower_redis", "tracking connection lost; reconnecting");
        drop(strong);
        tokio::time::sleep(MIN_BACKOFF).await;
    }
}

/// Returns when the connection `serial` can no longer be trusted.
async fn watch(
    shared: &Weak<Shared>,
    mut conn: MultiplexedConnection,
    serial: u64,
    generation: Option<u64>,
    mut breaker: tokio::sync::watch::Receiver<BreakerState>,
    timeout: Duration,
) {
    loop {
        tokio::select! {
            changed = breaker.changed() => {
                if changed.is_err() || *breaker.borrow_and_update() == BreakerState::Open {
                    return;
                }
            }
            () = tokio::time::sleep(HEARTBEAT) => {
                let Some(strong) = shared.upgrade() else { return };
                let moved = match (&strong.generation, generation) {
                    (Some(now), Some(then)) => now.load(Ordering::Acquire) != then,
                    _ => false,
                };
                if moved || strong.serial.load(Ordering::Acquire) != serial {
                    return;
                }
                drop(strong);
                let mut ping = redis::cmd("PING");
                ping.arg(HEARTBEAT_MESSAGE);
                let answered = tokio::time::timeout(timeout, ping.query_async::<()>(&mut conn)).await;
                if !matches!(answered, Ok(Ok(()))) {
                    return;
                }
            }
        }
    }
}

/// A RESP3 connection to the server (or the primary the Sentinels name),
/// with tracking on and its pushes applied by `shared` as they arrive.
async fn connect(
    manager: &RedisManager,
    shared: Weak<Shared>,
    serial: u64,
) -> Result<MultiplexedConnection, Error> {
    let connect_timeout = manager.connect_timeout();
    let client = match manager.inner.backend.sentinel() {
        Some(discovery) => {
            let found = tokio::time::timeout(connect_timeout, discovery.master_client()).await;
            match found {
                Ok(Ok(client)) => client,
                Ok(Err(error)) => return Err(Error::Connect(error)),
                Err(_) => return Err(Error::Timeout(connect_timeout)),
            }
        }
        None => manager
            .pubsub_clients()
            .current()
            .cloned()
            .ok_or(Error::BreakerOpen)?,
    };
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3)
        .set_skip_set_lib_name();
    let client = redis::Client::open(info.set_redis_settings(settings)).map_err(Error::Connect)?;
    let push = move |info: PushInfo| -> Result<(), RedisError> {
        if let Some(shared) = shared.upgrade() {
            shared.on_push(serial, info);
        }
        Ok(())
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(None)
        .set_push_sender(push);
    let setup = async {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        // NOLOOP: this connection's own writes (idle-TTL renewals, and the
        // writes whose results are kept through a `WriteTicket`) are not
        // reported to it; writes from the pool (this instance's own) are.
        redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .arg("NOLOOP")
            .query_async::<()>(&mut conn)
            .await?;
        Ok::<_, RedisError>(conn)
    };
    match tokio::time::timeout(connect_timeout, setup).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(error)) => Err(Error::Connect(error)),
        Err(_) => Err(Error::Timeout(connect_timeout)),
    }
}

/// The bookkeeping of one local copy beyond its key and value.
const ENTRY_OVERHEAD: usize = 64;

/// Local copies of Redis keys, bounded by bytes, kept exact by the
/// manager's tracking connection. Keys are full Redis keys (prefix
/// included), as Redis names them in invalidations.
///
/// Fill it only through a [`Ticket`] taken before the read, and read on the
/// tracking connection ([`Tracking::run`]):
///
/// ```
/// # use tower_redis_core::RedisManager;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let manager = RedisManager::disabled();
/// // Without tracking (a disabled manager, a cluster) there is no cache:
/// // the layer reads from Redis every time.
/// assert!(manager.tracking().is_none());
/// # }
/// ```
pub struct TrackedCache<V> {
    inner: Arc<CacheInner<V>>,
    tracking: Tracking,
}

impl<V> Clone for TrackedCache<V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            tracking: self.tracking.clone(),
        }
    }
}

impl<V: Clone> fmt::Debug for TrackedCache<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackedCache")
            .field("bytes", &self.inner.copies.bytes())
            .field("live", &self.tracking.is_live())
            .finish()
    }
}

struct CacheInner<V> {
    /// Weighed in bytes: the key, the value as the layer weighs it, and
    /// the bookkeeping.
    copies: BytesCache<Arc<[u8]>, V>,
    /// Reads and writes in flight. Also the lock that orders fills against
    /// invalidations.
    pending: Mutex<Pending>,
    next_ticket: AtomicU64,
}

/// What is in flight on the tracking connection, by key.
#[derive(Default)]
struct Pending {
    /// Key → the tickets still valid for it.
    tickets: HashMap<Arc<[u8]>, Vec<u64>>,
    /// Key → how many of this instance's writes of it are in flight. Redis
    /// sends no invalidation for them (`NOLOOP`), so while one is in flight
    /// no read of the key keeps its answer. An invalidation does not clear
    /// it: only the writes' ends do.
    writing: HashMap<Arc<[u8]>, usize>,
}

impl<V: Clone + Send + Sync + 'static> Invalidate for CacheInner<V> {
    fn invalidate(&self, key: &[u8]) {
        let mut pending = lock(&self.pending);
        pending.tickets.remove(key);
        self.copies.remove(key);
    }

    fn invalidate_all(&self) {
        let mut pending = lock(&self.pending);
        pending.tickets.clear();
        self.copies.clear();
    }
}

impl<V: Clone + Send + Sync + 'static> TrackedCache<V> {
    /// The local copy, when tracking is live and the key has not changed
    /// in Redis since it was read (as far as the tracking connection has
    /// told this instance: see [`Tracking::sync`]).
    pub fn get(&self, key: &str) -> Option<V> {
        if !self.tracking.is_live() {
            return None;
        }
        self.inner.copies.get(key.as_bytes())
    }

    /// Takes a ticket for a read of `key` about to be sent on the tracking
    /// connection. `None` when tracking is not live (the answer must not be
    /// kept).
    pub fn begin(&self, key: &str) -> Option<Ticket<V>> {
        self.ticket(key, |pending, key, id| {
            // While this instance writes the key, Redis will not say when
            // the write lands: an answer read meanwhile is not kept.
            if !pending.writing.contains_key(key) {
                pending.tickets.entry(Arc::clone(key)).or_default().push(id);
            }
        })
    }

    /// A ticket for `key`, marked in flight by `mark` under the lock that
    /// orders fills against invalidations. `None` when tracking is not
    /// live.
    fn ticket(
        &self,
        key: &str,
        mark: impl FnOnce(&mut Pending, &Arc<[u8]>, u64),
    ) -> Option<Ticket<V>> {
        if !self.tracking.is_live() {
            return None;
        }
        let id = self.inner.next_ticket.fetch_add(1, Ordering::Relaxed);
        let key: Arc<[u8]> = Arc::from(key.as_bytes());
        mark(&mut lock(&self.inner.pending), &key, id);
        // Lost between the check and the mark: the flush may have run before
        // the mark; check again so that the ticket is void.
        if !self.tracking.is_live() {
            self.inner.invalidate(&key);
        }
        Some(Ticket {
            cache: Arc::clone(&self.inner),
            key,
            id,
            done: false,
        })
    }

    /// Takes a ticket for a **write** of `key` about to be sent on the
    /// tracking connection, whose result this instance can compute (the
    /// copy with the write's changes applied): filled, the copy is current
    /// again without a read. `None` when tracking is not live.
    ///
    /// The connection has tracking `NOLOOP`, so Redis sends it no
    /// invalidation for its own write, and the write drops the key from
    /// the server's tracking table: the write must read the key after
    /// changing it, in the same atomic step (a script's last command), so
    /// that later changes by others are still reported.
    ///
    /// The ticket voids every read and write of the key in flight (their
    /// answers may predate this write, and Redis will not say so). The
    /// other structures kept exact by the same tracking connection hear of
    /// the write from here, not from Redis: the key is invalidated in each
    /// of them when the write begins and when it ends. While it
    /// is in flight no read of the key keeps its answer, and a second
    /// write of the key is void from the start (its base may lack the
    /// first's changes). Take the base copy with [`get`](Self::get)
    /// *after* this call: an invalidation after it voids the ticket.
    /// Dropped or filled in vain, the ticket drops the copy, which no
    /// longer matches Redis.
    pub fn begin_write(&self, key: &str) -> Option<WriteTicket<V>> {
        let ticket = self.ticket(key, |pending, key, id| {
            pending.tickets.remove(key);
            let writes = pending.writing.entry(Arc::clone(key)).or_default();
            *writes += 1;
            if *writes == 1 {
                pending.tickets.insert(Arc::clone(key), vec![id]);
            }
        })?;
        invalidate_siblings(&self.tracking, &self.inner, &ticket.key);
        Some(WriteTicket {
            ticket,
            tracking: self.tracking.clone(),
        })
    }

    /// Drops the copy of `key` (and voids the tickets of reads in flight),
    /// for a change this instance made: call it after the write was
    /// acknowledged, so that no later read here serves the old value even
    /// before Redis' own invalidation arrives.
    pub fn invalidate(&self, key: &str) {
        self.inner.invalidate(key.as_bytes());
    }

    /// This instance wrote `key` on the tracking connection outside a
    /// [`WriteTicket`] (Redis reports a connection's own writes to nobody
    /// on it, and forgets that it read the key): drops the key here and in
    /// every other structure on the connection.
    pub fn invalidate_written(&self, key: &str) {
        self.tracking
            .shared
            .each(|structure| structure.invalidate(key.as_bytes()));
    }

    /// Drops `key` in the other structures on the tracking connection, not
    /// in this one: for a write of this instance's on the connection whose
    /// answer this cache keeps through its own ticket (a read pipelined
    /// after the write).
    pub fn invalidate_others(&self, key: &str) {
        invalidate_siblings(&self.tracking, &self.inner, key.as_bytes());
    }

    /// Drops every copy.
    pub fn clear(&self) {
        self.inner.invalidate_all();
    }

    /// Reads and writes of this cache in flight (tickets outstanding and
    /// keys being written), for tests and diagnostics.
    pub fn in_flight(&self) -> usize {
        let pending = lock(&self.inner.pending);
        pending.tickets.values().map(Vec::len).sum::<usize>() + pending.writing.len()
    }

    /// The size of the copies, in bytes (as weighed).
    pub fn bytes(&self) -> u64 {
        self.inner.copies.bytes()
    }

    /// The tracking connection this cache follows.
    pub fn tracking(&self) -> &Tracking {
        &self.tracking
    }
}

/// A read in flight whose answer may be kept: valid until the key (or
/// everything) is invalidated. Dropped unused, it leaves nothing behind.
pub struct Ticket<V: Clone + Send + Sync + 'static> {
    cache: Arc<CacheInner<V>>,
    key: Arc<[u8]>,
    id: u64,
    done: bool,
}

impl<V: Clone + Send + Sync + 'static> fmt::Debug for Ticket<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket").field("id", &self.id).finish()
    }
}

impl<V: Clone + Send + Sync + 'static> Ticket<V> {
    /// Keeps `value` as the copy of the key, unless the key (or
    /// everything) was invalidated since the ticket was taken. True when
    /// kept.
    pub fn fill(mut self, value: V) -> bool {
        self.done = true;
        let mut pending = lock(&self.cache.pending);
        if !take_ticket(&mut pending.tickets, &self.key, self.id) {
            return false;
        }
        self.cache.copies.insert(Arc::clone(&self.key), value);
        true
    }
}

impl<V: Clone + Send + Sync + 'static> Drop for Ticket<V> {
    fn drop(&mut self) {
        if !self.done {
            take_ticket(&mut lock(&self.cache.pending).tickets, &self.key, self.id);
        }
    }
}

/// A write in flight whose result may be kept, from
/// [`TrackedCache::begin_write`].
pub struct WriteTicket<V: Clone + Send + Sync + 'static> {
    ticket: Ticket<V>,
    /// Whose other structures are told when the write ends.
    tracking: Tracking,
}

impl<V: Clone + Send + Sync + 'static> fmt::Debug for WriteTicket<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteTicket")
            .field("id", &self.ticket.id)
            .finish()
    }
}

impl<V: Clone + Send + Sync + 'static> WriteTicket<V> {
    /// Keeps `value` (the key as the acknowledged write left it) as the
    /// copy, unless the ticket was voided meanwhile. True when kept; when
    /// not, the copy is dropped.
    pub fn fill(mut self, value: V) -> bool {
        self.end(Some(value))
    }

    /// Ends the write: keeps `value` as the copy when the ticket is still
    /// valid, else drops the copy; then tells the other structures.
    fn end(&mut self, value: Option<V>) -> bool {
        self.ticket.done = true;
        let cache = &self.ticket.cache;
        let key = &self.ticket.key;
        let mut pending = lock(&cache.pending);
        let valid = take_ticket(&mut pending.tickets, key, self.ticket.id);
        match value {
            Some(value) if valid => cache.copies.insert(Arc::clone(key), value),
            _ => {
                cache.copies.remove(key);
            }
        }
        end_write(&mut pending, key);
        drop(pending);
        invalidate_siblings(&self.tracking, cache, key);
        valid
    }
}

impl<V: Clone + Send + Sync + 'static> Drop for WriteTicket<V> {
    fn drop(&mut self) {
        if !self.ticket.done {
            // Not filled: whatever the write did, the copy may not match it.
            self.end(None);
        }
    }
}

/// Invalidates `key` in every structure registered on `tracking` but
/// `cache`: Redis does not report this connection's own writes to them.
fn invalidate_siblings<V: Clone + Send + Sync + 'static>(
    tracking: &Tracking,
    cache: &Arc<CacheInner<V>>,
    key: &[u8],
) {
    tracking.shared.each(|structure| {
        if !std::ptr::addr_eq(structure, Arc::as_ptr(cache)) {
            structure.invalidate(key);
        }
    });
}

/// One write of `key` is over.
fn end_write(pending: &mut Pending, key: &[u8]) {
    if let Some(writes) = pending.writing.get_mut(key) {
        *writes -= 1;
        if *writes == 0 {
            pending.writing.remove(key);
        }
    }
}

/// Removes ticket `id` of `key`; false when it was void.
fn take_ticket<K: Eq + Hash + std::borrow::Borrow<[u8]>>(
    pending: &mut HashMap<K, Vec<u64>>,
    key: &[u8],
    id: u64,
) -> bool {
    let Some(ids) = pending.get_mut(key) else {
        return false;
    };
    let Some(position) = ids.iter().position(|&t| t == id) else {
        return false;
    };
    ids.swap_remove(position);
    if ids.is_empty() {
        pending.remove(key);
    }
    true
}
