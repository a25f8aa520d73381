//! The breaker-guarded way to Redis: [`RedisManager::run`] (one operation
//! within the command timeout, accounted to the breaker) and
//! [`RedisManager::failover`] (the same, with an in-process fallback), and
//! the [`Served`] values they give.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::{RedisError, RedisResult};
use tokio::time::timeout;

use crate::breaker::Failure;
use crate::connection::RedisConnection;
use crate::error::{Error, counts_against_breaker};
use crate::manager::RedisManager;

/// Where a [`Served`] value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Redis answered.
    Redis,
    /// The fallback answered, for this reason.
    Fallback(FallbackReason),
}

/// Why an operation was served by its fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FallbackReason {
    /// The breaker was open (or the manager has no Redis): nothing was sent.
    BreakerOpen,
    /// Redis did not answer within the command timeout.
    Timeout,
    /// No connection could be made, or it broke during the operation.
    ConnectionFailed,
    /// Redis refused the command (out of memory, wrong type, script error, ...).
    CommandFailed,
}

impl FallbackReason {
    /// The lower-case name used in logs, metrics and response headers.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::BreakerOpen => "breaker_open",
            FallbackReason::Timeout => "timeout",
            FallbackReason::ConnectionFailed => "connection_failed",
            FallbackReason::CommandFailed => "command_failed",
        }
    }

    pub(crate) fn of(error: &Error) -> Self {
        match error {
            Error::BreakerOpen | Error::Config(_) | Error::Required { .. } => {
                FallbackReason::BreakerOpen
            }
            Error::Timeout(_) => FallbackReason::Timeout,
            Error::Connect(_) => FallbackReason::ConnectionFailed,
            Error::Redis(e) if counts_against_breaker(e) => FallbackReason::ConnectionFailed,
            Error::Redis(_) => FallbackReason::CommandFailed,
        }
    }
}

/// An operation under way in [`RedisManager::run`] (or a tracked read,
/// or a replica read): forgotten when it ends, dropped when its caller
/// gave up on it first (see `RedisManager::on_abandoned`).
pub(crate) struct Abandoned<'a>(&'a RedisManager);

impl<'a> Abandoned<'a> {
    /// Armed until [`forget`](std::mem::forget)ten.
    pub(crate) fn arm(manager: &'a RedisManager) -> Self {
        Self(manager)
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        self.0.on_abandoned();
    }
}

/// A value from [`RedisManager::failover`], with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served<T> {
    /// The value, from Redis or from the fallback.
    pub value: T,
    /// Which of the two produced it.
    pub source: Source,
}

impl<T> Served<T> {
    /// True when the fallback produced the value.
    pub fn is_fallback(&self) -> bool {
        matches!(self.source, Source::Fallback(_))
    }
}

impl RedisManager {
    /// Runs one operation against Redis, within the command timeout, and
    /// tells the breaker how it went.
    ///
    /// The operation gets a connection of its own (a cheap clone of a
    /// multiplexed connection). While the breaker is open this returns
    /// [`Error::BreakerOpen`] without calling Redis.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_redis_core::{RedisConfig, RedisManager};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_redis_core::Error;
    ///
    /// // No Redis: nothing is sent, and the caller decides what to do.
    /// let manager = RedisManager::disabled();
    /// let result = manager
    ///     .run(|mut conn| async move { redis::cmd("PING").query_async::<String>(&mut conn).await })
    ///     .await;
    /// assert!(matches!(result, Err(Error::BreakerOpen)));
    /// # Ok(()) }
    /// ```
    pub fn run<T, F, Fut>(&self, op: F) -> impl Future<Output = Result<T, Error>>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        // Not an `async fn`: it would hold `op` (and everything it
        // captures) beside `run_within`'s own copy.
        self.run_within(self.inner.command_timeout, op)
    }

    /// Runs one read-only operation, on a replica where the topology has
    /// replicas this manager reads from, else as [`run`](Self::run) does.
    ///
    /// On a Redis Cluster the operation first goes to a replica of its
    /// slot (a `READONLY` connection; redis-rs routes read-only commands —
    /// `GET`, `HMGET`, `EVALSHA_RO`, … — to a random replica and anything
    /// else to the primary). If the replica fails or does not answer within
    /// half the command timeout, the operation runs on the primary within
    /// what is left of it, so the whole stays within the command timeout;
    /// a failed replica read is not counted by the breaker (the primary is
    /// what the breaker watches), and replica reads pause for a second
    /// after one fails. With a standalone server or Sentinel this is
    /// [`run`](Self::run): reads stay on the primary.
    ///
    /// **Staleness:** a replica applies the primary's writes asynchronously,
    /// so a read may return what the primary has already changed or
    /// deleted (replication lag, usually under a millisecond, unbounded
    /// while a replica's link is down). Use it only for reads that may be
    /// that stale; writes, locks and scripts that write go through
    /// [`run`](Self::run).
    ///
    /// ```
    /// # use tower_redis_core::{RedisManager, Error};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let manager = RedisManager::disabled();
    /// let read = manager
    ///     .run_read(|mut conn| async move {
    ///         redis::cmd("GET").arg("k").query_async::<Option<String>>(&mut conn).await
    ///     })
    ///     .await;
    /// assert!(matches!(read, Err(Error::BreakerOpen)));
    /// # }
    /// ```
    pub async fn run_read<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: Fn(RedisConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let inner = &self.inner;
        let Some(replicas) = inner.backend.replicas() else {
            return self.run(op).await;
        };
        if !inner.breaker.allows_requests() {
            return Err(Error::BreakerOpen);
        }
        let started = tokio::time::Instant::now();
        if !replicas.paused()
            && let Some(conn) = replicas.checkout()
        {
            let abandoned = Abandoned::arm(self);
            let read = timeout(inner.command_timeout / 2, op(conn)).await;
            std::mem::forget(abandoned);
            if let Ok(Ok(value)) = read {
                crate::record::counter("tower_redis_replica_reads_total", &[], 1);
                return Ok(value);
            }
            tracing::debug!(target: "tower_redis", "a replica read failed; reading from the primary");
            replicas.failed();
        }
        let left = inner.command_timeout.saturating_sub(started.elapsed());
        self.run_within(left, op).await
    }

    async fn run_within<T, F, Fut>(&self, budget: Duration, op: F) -> Result<T, Error>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.inner.breaker.allows_requests() {
            return Err(Error::BreakerOpen);
        }
        // One span per operation, with OpenTelemetry's database client
        // attributes; the connection records `db.operation.name` (the
        // command, or PIPELINE) when it sends. Disabled, it costs a check.
        let span = tracing::debug_span!(
            target: "tower_redis",
            "redis",
            "db.system.name" = "redis",
            "db.operation.name" = tracing::field::Empty,
            "server.address" = self.inner.server.0.as_str(),
            "server.port" = self.inner.server.1,
            "error.type" = tracing::field::Empty,
        );
        // Forgotten once the operation has ended: dropped before, its
        // caller gave up on it (see `on_abandoned`).
        let abandoned = Abandoned::arm(self);
        // One timer for checkout and command together: a second one per
        // operation showed up in profiles at high concurrency. The attempt
        // is built inside the awaited expression: a named local would stay
        // in this future beside the timer's copy of it.
        let outcome = crate::in_span(
            span.clone(),
            timeout(budget, async {
                let (conn, broken) = self
                    .inner
                    .backend
                    .checkout()
                    .await
                    .map_err(Attempt::Connect)?;
                op(conn)
                    .await
                    .map_err(|error| Attempt::Command(error, broken))
            }),
        )
        .await;
        std::mem::forget(abandoned);
        if !span.is_disabled() {
            let error_type = match &outcome {
                Ok(Ok(_)) => None,
                Ok(Err(Attempt::Connect(_))) => Some("connect"),
                Ok(Err(Attempt::Command(error, _))) => Some(error_type(error)),
                Err(_) => Some("timeout"),
            };
            if let Some(error_type) = error_type {
                span.record("error.type", error_type);
            }
        }
        match outcome {
            Ok(Ok(value)) => {
                self.record_success();
                Ok(value)
            }
            Ok(Err(Attempt::Connect(error))) => {
                self.record_failure(&error);
                Err(Error::Connect(error))
            }
            Ok(Err(Attempt::Command(error, broken))) => {
                if counts_against_breaker(&error) {
                    // A Cluster node's response timeout says nothing of the
                    // connection, which reconnects its nodes itself: a new
                    // one would wait for the node that hangs, and every
                    // key, on every node, with it. One that reads the slot
                    // map afresh is made in the background instead.
                    let node_timeout = self.is_cluster() && error.is_timeout();
                    if !node_timeout
                        && (error.is_io_error()
                            || error.is_connection_dropped()
                            || is_readonly(&error))
                    {
                        // A multiplexed connection does not recover, and when
                        // one drops the server has usually restarted, so the
                        // others from before are dead too: replace them all.
                        // READONLY means the server was demoted to a replica
                        // (a Sentinel failover): the next connection asks
                        // the Sentinels where the primary is now.
                        if let Some(broken) = broken {
                            broken.store(true, Ordering::Release);
                        }
                        self.inner.backend.discard_connections();
                    }
                    self.record_failure(&error);
                    if node_timeout {
                        self.on_node_timeout();
                    }
                } else {
                    // Not an answer that tells a node's hang from the
                    // cluster's (`on_answer`): redis-rs makes some of these
                    // errors itself.
                    self.inner.breaker.on_success();
                }
                Err(Error::Redis(error))
            }
            Err(_) => {
                let error = self.record_timeout();
                // On a Cluster, most likely a node that hangs (its own
                // response timeout ended in the same tick as this one).
                self.on_node_timeout();
                Err(error)
            }
        }
    }

    /// Runs `op` against Redis when the breaker allows it, and `fallback`
    /// otherwise or when Redis fails or times out. Never waits longer than
    /// the command timeout for Redis; never turns a Redis problem into an error.
    pub async fn failover<T, F, Fut, G, GFut>(&self, op: F, fallback: G) -> Served<T>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
        G: FnOnce(FallbackReason) -> GFut,
        GFut: Future<Output = T>,
    {
        match self.run(op).await {
            Ok(value) => Served {
                value,
                source: Source::Redis,
            },
            Err(error) => {
                let reason = FallbackReason::of(&error);
                if reason != FallbackReason::BreakerOpen {
                    tracing::debug!(target: "tower_redis", %error, "Redis operation failed; using the fallback");
                }
                record_fallback(reason);
                Served {
                    value: fallback(reason).await,
                    source: Source::Fallback(reason),
                }
            }
        }
    }

    /// An operation whose caller went away before it ended (a client that
    /// disconnected, a timeout shorter than the command timeout around the
    /// layer): nothing tells the breaker how it would have ended. If every
    /// caller gives up that way while Redis hangs, no operation ever times
    /// out, the breaker never opens, and every request waits until its
    /// caller gives up instead of being served from memory. So the manager
    /// sends a `PING` of its own (a canary: checkout and command within
    /// the command timeout), at most one a command timeout, only while the
    /// breaker is closed, and only within a Tokio runtime. It reports a
    /// hang and nothing else: its timeout (or a connection's or the pool's)
    /// counts as an operation's would, its success as a success; any other
    /// error is ignored (on a Redis Cluster, where `PING` goes to every
    /// primary, one node that refuses connections does not open the
    /// breaker for the others). It is skipped when the count of failures
    /// changed between its being sent and its start (after one yield):
    /// the caller that dropped the operation (the outage queue's catch-up,
    /// whose own timeout ends first) most likely reported the hang itself
    /// in the same poll; that is likely, not certain (another worker may
    /// start the canary first), and then one hang counts twice. It asks
    /// the primaries, so a replica that hangs alone (see
    /// [`run_read`](Self::run_read)) is not found this way: its reads keep
    /// going to it until one fails within half the command timeout. The
    /// Redis user must be allowed `PING`, as the breaker's probe needs it
    /// too.
    fn on_abandoned(&self) {
        let inner = &self.inner;
        if !inner.breaker.allows_requests() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let now = tokio::time::Instant::now();
        {
            let mut sent = crate::sync::lock(&inner.canary_sent);
            if sent.is_some_and(|at| now < at + inner.command_timeout) {
                return;
            }
            *sent = Some(now);
        }
        let manager = self.clone();
        let failures = inner.breaker.consecutive_failures();
        runtime.spawn(async move {
            let inner = &manager.inner;
            // The task that dropped the operation goes on first.
            tokio::task::yield_now().await;
            if !inner.breaker.allows_requests() || inner.breaker.consecutive_failures() != failures
            {
                return;
            }
            let ping = async {
                let (mut conn, _) = inner.backend.checkout().await?;
                redis::cmd("PING").query_async::<()>(&mut conn).await
            };
            match timeout(inner.command_timeout, ping).await {
                Ok(Ok(())) => manager.record_success(),
                Ok(Err(error)) if error.is_timeout() => {
                    manager.record_failure(&error);
                    manager.on_node_timeout();
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    let _ = manager.record_timeout();
                    manager.on_node_timeout();
                }
            }
        });
    }

    /// A Cluster node may hang: while the breaker still lets requests
    /// through, a replacement connection is made in the background
    /// ([`Backend::on_node_timeout`](crate::backend::Backend::on_node_timeout)).
    fn on_node_timeout(&self) {
        if self.inner.breaker.allows_requests() {
            self.inner.backend.on_node_timeout();
        }
    }

    /// An operation Redis answered: the breaker's count ends, and on a
    /// Cluster the answer is remembered (see [`timed_out`](Self::timed_out)).
    pub(crate) fn record_success(&self) {
        self.inner.breaker.on_success();
        self.inner.backend.on_answer();
    }

    pub(crate) fn record_timeout(&self) -> Error {
        let timeout = self.inner.command_timeout;
        let message = format!("no answer within {timeout:?}");
        if self.inner.breaker.on_failure(self.timed_out(), &message) {
            self.on_opened();
        }
        Error::Timeout(timeout)
    }

    /// What a timeout tells the breaker. On a Redis Cluster where another
    /// operation succeeded within the last two command timeouts (so during
    /// this one's wait, or just before it), a node hangs, not the cluster:
    /// [`Failure::NodeTimedOut`], which does not count toward the threshold
    /// and does not open the breaker for the other nodes' keys. Before, a
    /// few of that node's timeouts ending together, with no success between
    /// them, opened it for every node. Anywhere else, and on a Cluster on
    /// which nothing has succeeded for two command timeouts, a timeout
    /// counts toward the threshold as before. Two windows rather than one:
    /// when every caller waits on the hung node (a closed loop), the last
    /// success came just before their operations began. The rule cannot
    /// tell one hung node from all but one: while anything succeeds, no
    /// timeout opens the breaker.
    fn timed_out(&self) -> Failure {
        if self
            .inner
            .backend
            .answered_within(self.inner.command_timeout * 2)
        {
            Failure::NodeTimedOut
        } else {
            Failure::TimedOut
        }
    }

    pub(crate) fn record_failure(&self, error: &RedisError) {
        let failure = if error.is_connection_refusal() {
            Failure::Refused
        } else if error.is_timeout() {
            // The client's own timeouts (a connection's, the pool's, a
            // cluster node's response): Redis was waited for.
            self.timed_out()
        } else {
            Failure::Counted
        };
        if self.inner.breaker.on_failure(failure, &error.to_string()) {
            self.on_opened();
        }
    }

    fn on_opened(&self) {
        self.inner.backend.discard_connections();
        self.start_probe();
    }
}

/// A write sent to a replica: the primary this connection was made to has
/// been demoted.
pub(crate) fn is_readonly(error: &RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

/// How an operation failed inside its time budget.
enum Attempt {
    /// No connection could be had.
    Connect(RedisError),
    /// The command failed; the connection's broken flag, if pooled.
    Command(RedisError, Option<Arc<AtomicBool>>),
}

/// OpenTelemetry's `error.type` of a failed command: the Redis error code
/// (`NOSCRIPT`, `WRONGTYPE`, …) or the kind of failure.
pub(crate) fn error_type(error: &RedisError) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else if error.is_io_error() || error.is_connection_dropped() {
        "io"
    } else if error.is_connection_refusal() {
        "connection_refused"
    } else if error.code().is_some() {
        // An error reply: WRONGTYPE, NOSCRIPT, OOM, …
        "server"
    } else if error.kind() == redis::ErrorKind::Parse {
        "parse"
    } else {
        "other"
    }
}

pub(crate) fn record_fallback(reason: FallbackReason) {
    // Keys built once: while Redis is down every operation falls back, and
    // the degraded path should cost no more than the Redis one.
    macro_rules! fallbacks {
        ($reason:literal) => {
            crate::record::Counter::new("tower_redis_fallbacks_total", &[("reason", $reason)])
        };
    }
    static FALLBACKS: [crate::record::Counter; 4] = [
        fallbacks!("breaker_open"),
        fallbacks!("timeout"),
        fallbacks!("connection_failed"),
        fallbacks!("command_failed"),
    ];
    let index = match reason {
        FallbackReason::BreakerOpen => 0,
        FallbackReason::Timeout => 1,
        FallbackReason::ConnectionFailed => 2,
        FallbackReason::CommandFailed => 3,
    };
    FALLBACKS[index].increment(1);
}
