//! Locking that survives a panic elsewhere.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, taking the guard even if a previous holder panicked.
///
/// Every mutex in tower-redis guards state that stays consistent between
/// statements (counters, queues, LRU maps), so a panic in one request must
/// not turn every later request into a panic too.
///
/// ```
/// use std::sync::Mutex;
/// use tower_redis_core::sync::lock;
///
/// let counter = Mutex::new(0);
/// *lock(&counter) += 1;
/// assert_eq!(*lock(&counter), 1);
/// ```
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_still_hands_out_its_value() {
        let mutex = Mutex::new(vec![1, 2]);
        let panicked = std::panic::catch_unwind(|| {
            let mut guard = lock(&mutex);
            guard.push(3);
            panic!("a holder panics");
        });
        assert!(panicked.is_err());
        assert!(mutex.is_poisoned());
        assert_eq!(*lock(&mutex), [1, 2, 3]);
    }
}
