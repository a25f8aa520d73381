//! The crate's error types.

use std::time::Duration;

/// A configuration that cannot work. Returned before anything connects, so
/// an app fails fast on a typo instead of running on its fallbacks forever.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Redis configuration: `{field}` {problem}; {fix}")]
pub struct ConfigError {
    /// The option or environment variable at fault (`url`, `pool_size`, `REDIS_URL`, ...).
    pub field: &'static str,
    /// What is wrong with it. Never contains a password.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

impl ConfigError {
    pub(crate) fn new(
        field: &'static str,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            field,
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// Why a Redis operation did not produce a value.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The circuit breaker is open: Redis was failing, so no call was made.
    #[error("Redis is unavailable (circuit breaker open); the operation was not sent")]
    BreakerOpen,
    /// Redis did not answer within the command timeout.
    #[error("Redis did not answer within the command timeout of {0:?}")]
    Timeout(Duration),
    /// No connection to Redis could be made.
    #[error("cannot connect to Redis: {0}")]
    Connect(#[source] redis::RedisError),
    /// Redis answered with an error, or the connection failed mid-command.
    #[error("Redis command failed: {0}")]
    Redis(#[from] redis::RedisError),
    /// `require_redis` was set and Redis could not be reached at start.
    #[error(
        "Redis is required (`require_redis`) but could not be reached at start: {reason}; \
         start Redis or check the URL, or drop `require_redis` to start on the in-process fallbacks"
    )]
    Required {
        /// What went wrong while connecting.
        reason: String,
    },
}

impl Error {
    /// True when the error says nothing about Redis' health, only about the
    /// command (a wrong type, an out-of-memory refusal, a script error).
    pub fn is_command_error(&self) -> bool {
        matches!(self, Error::Redis(e) if !counts_against_breaker(e))
    }

    /// True when Redis did not answer in time, or was not asked because it
    /// has been failing (breaker open): a next command would most likely
    /// cost the caller the same wait, or fail at once.
    pub fn is_unanswered(&self) -> bool {
        matches!(self, Error::Timeout(_) | Error::BreakerOpen)
    }

    /// Whether Redis may have run the command although the caller got this
    /// error: it may have been sent and never answered (a timeout, a
    /// connection lost mid-command). False when nothing was sent (breaker
    /// open, no connection, configuration) or Redis answered with an error.
    pub fn may_have_run(&self) -> bool {
        match self {
            Error::BreakerOpen | Error::Config(_) | Error::Connect(_) | Error::Required { .. } => {
                false
            }
            Error::Timeout(_) => true,
            Error::Redis(_) => !self.is_command_error(),
        }
    }
}

/// Whether a Redis error means "Redis is unhealthy" (counted by the breaker)
/// rather than "this command was refused" (answered, so Redis is up).
pub(crate) fn counts_against_breaker(err: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    if err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
    {
        return true;
    }
    matches!(
        err.kind(),
        ErrorKind::Server(
            ServerErrorKind::ClusterDown
                | ServerErrorKind::TryAgain
                | ServerErrorKind::BusyLoading
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
        ) | ErrorKind::ClusterConnectionNotFound
            | ErrorKind::AuthenticationFailed
    )
}
