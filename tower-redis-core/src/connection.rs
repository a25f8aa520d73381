//! The connections handed to operations, and the pool behind standalone mode.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, Value};

/// A connection to Redis, standalone or cluster, for one operation.
///
/// It implements redis-rs' [`ConnectionLike`], so commands, pipelines and
/// scripts run on it directly. It is a cheap clone of a multiplexed
/// connection: hold it only for the operation it was given for.
#[derive(Clone)]
pub struct RedisConnection {
    kind: ConnectionKind,
}

#[derive(Clone)]
enum ConnectionKind {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl RedisConnection {
    pub(crate) fn standalone(conn: MultiplexedConnection) -> Self {
        Self {
            kind: ConnectionKind::Standalone(conn),
        }
    }

    pub(crate) fn cluster(conn: ClusterConnection) -> Self {
        Self {
            kind: ConnectionKind::Cluster(conn),
        }
    }

    /// Whether this connection talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, ConnectionKind::Cluster(_))
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ConnectionKind::Standalone(_) => "standalone",
            ConnectionKind::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisConnection")
            .field("kind", &kind)
            .finish()
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("db.operation.name", operation_name(cmd));
        }
        let sent = match &mut self.kind {
            ConnectionKind::Standalone(c) => c.req_packed_command(cmd),
            ConnectionKind::Cluster(c) => c.req_packed_command(cmd),
        };
        timed(
            || operation_name(cmd),
            sent,
            |v| matches!(v, Value::ServerError(_)),
        )
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        tracing::Span::current().record("db.operation.name", "PIPELINE");
        let sent = match &mut self.kind {
            ConnectionKind::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            ConnectionKind::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        };
        timed(
            || "PIPELINE",
            sent,
            |vs| vs.iter().any(|v| matches!(v, Value::ServerError(_))),
        )
    }

    fn get_db(&self) -> i64 {
        match &self.kind {
            ConnectionKind::Standalone(c) => c.get_db(),
            ConnectionKind::Cluster(c) => c.get_db(),
        }
    }
}

/// The commands the layers send, by name; anything else is `other`, so that
/// the histogram's series stay few whatever an application sends.
const KNOWN_COMMANDS: &[&str] = &[
    "GET", "SET", "DEL", "UNLINK", "EXPIRE", "PEXPIRE", "INCR", "INCRBY", "MGET", "EXISTS", "HGET",
    "HSET", "HDEL", "HMGET", "HGETALL", "SADD", "SREM", "SMEMBERS", "ZADD", "ZREM", "ZRANGE",
    "ZCOUNT", "EVAL", "EVALSHA", "SCRIPT", "PUBLISH", "PING", "TIME", "INFO",
];

/// OpenTelemetry's `db.operation.name` of a command: its name in capitals
/// when it is one of [`KNOWN_COMMANDS`], `other` otherwise.
fn operation_name(cmd: &Cmd) -> &'static str {
    let Some(redis::Arg::Simple(first)) = cmd.args_iter().next() else {
        return "other";
    };
    KNOWN_COMMANDS
        .iter()
        .find(|known| known.as_bytes().eq_ignore_ascii_case(first))
        .copied()
        .unwrap_or("other")
}

/// With the `metrics` feature: the request, timed into
/// `db.client.operation.duration`. Without it: the request as it is.
#[cfg(feature = "metrics")]
fn timed<'a, T: Send + 'a>(
    name: impl FnOnce() -> &'static str,
    sent: RedisFuture<'a, T>,
    server_error: fn(&T) -> bool,
) -> RedisFuture<'a, T> {
    let name = name();
    Box::pin(async move {
        let started = std::time::Instant::now();
        let result = sent.await;
        let seconds = started.elapsed().as_secs_f64();
        let histogram = crate::record::DB_CLIENT_OPERATION_DURATION;
        match &result {
            // redis-rs hands a server's error reply back as a value.
            Ok(value) if server_error(value) => crate::record::histogram(
                histogram,
                &[
                    ("db.system.name", "redis"),
                    ("db.operation.name", name),
                    ("error.type", "server"),
                ],
                seconds,
            ),
            Ok(_) => crate::record::histogram(
                histogram,
                &[("db.system.name", "redis"), ("db.operation.name", name)],
                seconds,
            ),
            Err(error) => crate::record::histogram(
                histogram,
                &[
                    ("db.system.name", "redis"),
                    ("db.operation.name", name),
                    ("error.type", crate::failover::error_type(error)),
                ],
                seconds,
            ),
        }
        result
    })
}

#[cfg(not(feature = "metrics"))]
#[inline]
fn timed<'a, T>(
    _name: impl FnOnce() -> &'static str,
    sent: RedisFuture<'a, T>,
    _server_error: fn(&T) -> bool,
) -> RedisFuture<'a, T> {
    sent
}

/// A pooled multiplexed connection with the marks that decide whether the
/// pool may hand it out again.
pub(crate) struct PooledConnection {
    pub(crate) conn: MultiplexedConnection,
    /// Set when an operation on any clone of this connection hit an I/O
    /// error: a multiplexed connection does not recover, so it is dropped.
    pub(crate) broken: Arc<AtomicBool>,
    /// The pool generation it was made in. Opening the breaker starts a new
    /// generation, so connections from before an outage are never reused.
    generation: u64,
}

impl PooledConnection {
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}

/// bb8's view of how to make and judge standalone connections.
///
/// bb8-redis' manager is not used because it never reports a connection as
/// broken, and it PINGs on every checkout unless told otherwise; this one
/// checks nothing on checkout (one round trip per operation) and discards a
/// connection after an I/O error or an outage.
pub(crate) struct StandaloneConnector {
    client: redis::Client,
    config: AsyncConnectionConfig,
    pub(crate) generation: Arc<AtomicU64>,
}

impl StandaloneConnector {
    pub(crate) fn new(client: redis::Client, connect_timeout: Duration) -> Self {
        // Response timeouts are applied around each whole operation by the
        // manager, so the client's own (500 ms by default) is turned off.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(None);
        Self {
            client,
            config,
            generation: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl bb8::ManageConnection for StandaloneConnector {
    type Connection = PooledConnection;
    type Error = redis::RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        let generation = self.generation.load(Ordering::Acquire);
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        Ok(PooledConnection {
            conn,
            broken: Arc::new(AtomicBool::new(false)),
            generation,
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        redis::cmd("PING").query_async::<()>(&mut conn.conn).await
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.broken.load(Ordering::Acquire)
            || conn.generation != self.generation.load(Ordering::Acquire)
    }
}

/// Sends bb8's background connection errors to `tracing` at debug level; the
/// breaker already reports outages once, at warn.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TracingErrorSink;

impl bb8::ErrorSink<redis::RedisError> for TracingErrorSink {
    fn sink(&self, error: redis::RedisError) {
        tracing::debug!(target: "tower_redis", %error, "background Redis connection attempt failed");
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<redis::RedisError>> {
        Box::new(*self)
    }
}
