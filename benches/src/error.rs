//! Why a benchmark run stopped.

use tower_redis_core::redis::RedisError;
use tower_redis_core::testing::TestRedisError;

/// Everything that can end a run early. A benchmark with failed operations
/// is not a result, so those end it too.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BenchError {
    /// No Redis to benchmark against.
    #[error("cannot start a test Redis: {0}")]
    TestRedis(#[from] TestRedisError),
    /// A Redis command made by the harness itself (setup, INFO) failed.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// The manager could not be built or used.
    #[error("tower-redis-core: {0}")]
    Manager(#[from] tower_redis_core::Error),
    /// The manager's configuration was rejected.
    #[error("configuration: {0}")]
    Config(#[from] tower_redis_core::ConfigError),
    /// A rate-limit layer's configuration was rejected.
    #[error("tower-redis-ratelimit configuration: {0}")]
    RateLimitConfig(#[from] tower_redis_ratelimit::ConfigError),
    /// A socket could not be bound or connected (in-process HTTP servers).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A latency histogram could not be made or merged.
    #[error("histogram: {0}")]
    Histogram(String),
    /// Operations failed while under load.
    #[error("{subject}: {errors} of {calls} operations failed; the first: {first}")]
    OperationsFailed {
        /// Which cell.
        subject: String,
        /// How many failed.
        errors: u64,
        /// How many were made.
        calls: u64,
        /// The first failure.
        first: String,
    },
    /// Something the benchmark checks did not hold.
    #[error("{0}")]
    Check(String),
}
