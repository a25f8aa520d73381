//! The store's decisions, in process: over `RedisManager::disabled()` (every
//! operation takes the in-process side) and over the local store itself.

use std::time::Duration;

use tower_redis_core::RedisManager;

use super::*;

/// A clock for the store's unit tests: the wall clock, moved forward by
/// [`advance`](clock::advance). The store's times are wall-clock
/// milliseconds (they are compared with times other instances and Redis
/// wrote), which tokio's paused clock does not move; this does, per thread
/// (a `current_thread` test runtime runs the test and its tasks on one).
pub(crate) mod clock {
    use std::cell::Cell;
    use std::time::Duration;

    thread_local! {
        static OFFSET_MS: Cell<u64> = const { Cell::new(0) };
    }

    pub(crate) fn offset_ms() -> u64 {
        OFFSET_MS.with(Cell::get)
    }

    pub(crate) fn advance(by: Duration) {
        OFFSET_MS.with(|offset| offset.set(offset.get() + super::millis(by)));
    }
}
