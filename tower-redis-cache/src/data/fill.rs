//! `get_or_insert_with`: a hit (with eager refresh), else a coalesced fill:
//! one caller per instance leads, the leaders race for the key's fill lock
//! in Redis, the winner runs the factory and the others wait for its value
//! (woken by the bus, polling as a fallback, up to the coalescing wait).
//! The factory runs in a task of its own, so that it can finish in the
//! background after a timeout and its panic reaches no waiter.

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower_redis_core::clock;
use tracing::Instrument;

use super::value::{self, Stored};
use super::{Codec, DataCache, DataError, DataOptions, Lookup, count, put};
use crate::entry::Entry;
use crate::service::coalesce::{self as flight, FlightGuard, Joined, Outcome};
use crate::store::{LockAttempt, LockPurpose, LockToken, Put, Tier};

/// Why a fill has no value.
enum Fail<E> {
    Factory(E),
    Panicked,
    /// Another caller's factory failed (only reported when an expired
    /// value can be served instead).
    Elsewhere,
}

/// What a read came to: the value, or the miss to make.
enum Next<T, M> {
    Hit(T),
    Make(M),
}

/// What leading a fill across instances came to.
enum Led<T> {
    /// Another instance stored a fresh value meanwhile.
    Found(Entry, T),
    /// Run the factory, holding this lock (none: Redis unavailable, or
    /// waited too long).
    Lock(Option<LockToken>),
    /// Run the factory without the lock: a read or a lock attempt fell
    /// back while Redis hangs (Redis failed this call, which has waited for
    /// it as long as a call may), so Redis is asked for nothing more before
    /// the value is returned.
    Waited,
}

impl<C: Codec> DataCache<C> {
    /// The value of `key`: fresh from the cache (one Redis round trip, none
    /// from the near tier), else from `factory`, stored for
    /// [`DataOptions::ttl`]. Concurrent misses on every instance make one
    /// factory call; the others wait for its value. See [`DataOptions`] for
    /// fail-safe, timeouts and eager refresh.
    ///
    /// The factory runs in a task of its own (hence `Send + 'static`): it
    /// finishes in the background after a timeout, and if it panics the
    /// caller gets [`DataError::Panicked`] and the key is not held up for
    /// anyone else. A value whose encoding is larger than the limit is
    /// returned but not stored (one warning per key); a stored value that
    /// does not decode is a miss and is deleted.
    pub async fn get_or_insert_with<T, E, F, Fut>(
        &self,
        key: &str,
        options: &DataOptions,
        factory: F,
    ) -> Result<T, DataError<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        // A loop of near hits yields now and then (see `cooperate`).
        super::cooperate().await;
        // A near hit first, before anything else is built: the future of
        // a hit stays small (the rest of the work is boxed), as a near hit
        // is meant to cost what an in-process cache's lookup does.
        if options.near
            && let Some(value) = self
                .inner
                .store
                .data_near_hit::<C, T>(key, options.eager_refresh)
        {
            count(Lookup::Hit, Tier::Near);
            return Ok(value);
        }
        let span = tracing::debug_span!(target: "tower_redis_cache", "data", key);
        // Boxed as a trait object: the handler future that awaits this one
        // is `Send` by these bounds, with no need for the compiler to look
        // through every future inside (deep enough to pass its recursion
        // limit in an axum handler).
        let make: BoxFuture<'_, Result<T, DataError<E>>> = Box::pin(tower_redis_core::in_span(
            span,
            self.get_or_make(key, options, factory),
        ));
        make.await
    }

    async fn get_or_make<T, E, F, Fut>(
        &self,
        key: &str,
        options: &DataOptions,
        factory: F,
    ) -> Result<T, DataError<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let started = Instant::now();
        let url_hash = value::url_hash(key)?;
        let (found, tier) = self
            .read::<T>(key, &url_hash, options.near, options.eager_refresh)
            .await;
        // The miss is made by a boxed future that a plain function builds:
        // this future then holds none of the hit's values while it waits
        // (together they made one 2.2 KB box a hit, too large for the
        // allocator's per-thread cache).
        match self.hit_or_make(key, url_hash, options, factory, started, found, tier)? {
            Next::Hit(value) => Ok(value),
            Next::Make(make) => make.await,
        }
    }

    /// After the read: the fresh value (with an eager refresh started when
    /// one is due), or the miss to make.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn hit_or_make<'a, T, E, F, Fut>(
        &'a self,
        key: &'a str,
        url_hash: String,
        options: &'a DataOptions,
        factory: F,
        started: Instant,
        found: Option<(Stored, T)>,
        tier: Tier,
    ) -> Result<Next<T, Pin<Box<impl Future<Output = Result<T, DataError<E>>> + 'a>>>, DataError<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let now = clock::now_ms();
        let mut seen = None;
        let mut stale = None;
        if let Some((stored, value)) = found {
            if stored.is_fresh(now) {
                count(Lookup::Hit, tier);
                if let Some(fraction) = options.eager_refresh
                    && stored.age_ms(now) as f64 >= fraction * stored.ttl_ms as f64
                {
                    self.refresh(url_hash, value::url(key)?, &stored, options, factory);
                }
                return Ok(Next::Hit(value));
            }
            seen = Some(stored.stored_at);
            // Within the fail-safe window past its TTL, as this call's
            // options set it: the value's hash may live longer in Redis
            // (one stored within a removal's tombstone keeps it until the
            // tombstone's end), and a near copy for its own TTL.
            if let Some(window) = options.fail_safe
                && stored.age_ms(now) <= stored.ttl_ms.saturating_add(clock::duration_ms(window))
            {
                stale = Some((stored, value));
            }
        }
        count(
            if stale.is_some() {
                Lookup::Stale
            } else {
                Lookup::Miss
            },
            tier,
        );
        // A read that fell back while Redis hangs (`waited_in_vain`):
        // Redis failed this call, which has waited for it as long as a
        // call may. The fill asks Redis for no lock, and its value is
        // returned before it is stored.
        let waited = self.inner.store.waited_in_vain(tier);
        Ok(Next::Make(Box::pin(self.make(
            key, url_hash, options, factory, started, seen, stale, waited,
        ))))
    }

    /// A miss (or an expired value, `stale` when fail-safe may serve it):
    /// the fill, within the soft and hard timeouts.
    #[allow(clippy::too_many_arguments)]
    async fn make<T, E, F, Fut>(
        &self,
        key: &str,
        url_hash: String,
        options: &DataOptions,
        factory: F,
        started: Instant,
        seen: Option<u64>,
        stale: Option<(Stored, T)>,
        waited: bool,
    ) -> Result<T, DataError<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let stale_entry = stale.as_ref().map(|(stored, _)| stored.clone());
        let url = value::url(key)?;
        // Pinned in place: `make` is boxed already (by `hit_or_make`).
        let mut work =
            std::pin::pin!(self.fill(url_hash, url, options, factory, seen, stale_entry, waited));
        let soft = options.soft_timeout.filter(|_| stale.is_some());
        let timeout = match (soft, options.hard_timeout) {
            (Some(soft), Some(hard)) => Some(soft.min(hard)),
            (soft, hard) => soft.or(hard),
        };
        let result = match timeout {
            Some(limit) => match tokio::time::timeout_at(started + limit, &mut work).await {
                Ok(result) => result,
                Err(_) => {
                    return match stale {
                        Some((_, value)) => {
                            tracing::debug!(target: "tower_redis_cache", ?limit, "factory timed out: serving the expired value, the factory goes on in the background");
                            Ok(value)
                        }
                        None => Err(DataError::Timeout(limit)),
                    };
                }
            },
            None => work.await,
        };
        match (result, stale) {
            (Ok(value), _) => Ok(value),
            (Err(_), Some((_, value))) => {
                tracing::warn!(target: "tower_redis_cache", "the factory failed: serving the expired value (fail-safe)");
                Ok(value)
            }
            (Err(Fail::Factory(error)), None) => Err(DataError::Factory(error)),
            (Err(Fail::Panicked | Fail::Elsewhere), None) => Err(DataError::Panicked),
        }
    }

    /// A miss: follow this instance's flight or lead it; the leader takes
    /// the fill lock (or waits for another instance's value) and runs the
    /// factory. `seen`: the stored time of an expired value found, which
    /// the lock compares with (a newer one means it was refreshed).
    /// `waited`: the read fell back while Redis hangs
    /// (Redis failed this call): no lock is asked for, and the value is
    /// returned before it is stored.
    #[allow(clippy::too_many_arguments)]
    async fn fill<T, E, F, Fut>(
        &self,
        url_hash: String,
        url: String,
        options: &DataOptions,
        factory: F,
        seen: Option<u64>,
        stale: Option<Stored>,
        waited: bool,
    ) -> Result<T, Fail<E>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let deadline = Instant::now() + self.inner.wait;
        let mut waited = waited;
        let (guard, lock) = loop {
            match self.inner.flights.join(&url_hash, &url_hash) {
                Joined::Follower(flight) => {
                    match tokio::time::timeout_at(deadline, flight::wait(flight)).await {
                        Ok(Outcome::Done(Some(entry))) => {
                            match self.decode(Entry::clone(&entry)) {
                                Some((_, value)) => return Ok(value),
                                // Made as another type: make our own.
                                None => break (None, None),
                            }
                        }
                        Ok(Outcome::Failed(_)) if stale.is_some() => return Err(Fail::Elsewhere),
                        // The leader panicked, failed, or has nothing to
                        // share: lead (or follow) anew; without asking
                        // Redis for the lock if Redis hangs (the leader's
                        // wait was in vain, as this call's may be).
                        Ok(_) => waited |= self.inner.store.hangs(),
                        Err(_) => break (None, None),
                    }
                }
                Joined::Leader(guard) if waited => break (Some(guard), None),
                Joined::Leader(guard) => match self.lead(&url_hash, seen, deadline).await {
                    Led::Found(entry, value) => {
                        guard.complete(Some(Arc::new(entry)));
                        return Ok(value);
                    }
                    Led::Lock(lock) => break (Some(guard), lock),
                    Led::Waited => {
                        waited = true;
                        break (Some(guard), None);
                    }
                },
            }
        };
        let (sender, receiver) = oneshot::channel();
        let this = self.clone();
        let options = options.clone();
        let task = async move {
            this.complete(
                url_hash,
                url,
                options,
                factory,
                guard,
                lock,
                stale,
                Some(sender),
                waited,
            )
            .await;
        };
        tokio::spawn(task.in_current_span());
        match receiver.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(Fail::Factory(error)),
            Err(_) => Err(Fail::Panicked),
        }
    }

    /// Takes the fill lock, or waits for the instance holding it to store
    /// a value and reads it.
    async fn lead<T: DeserializeOwned + Clone + Send + Sync + 'static>(
        &self,
        url_hash: &str,
        seen: Option<u64>,
        deadline: Instant,
    ) -> Led<T> {
        let store = &self.inner.store;
        let purpose = seen.map_or(LockPurpose::Fill, LockPurpose::Refresh);
        let mut poll = Duration::from_millis(10);
        loop {
            let updated = store.bus.updated();
            tokio::pin!(updated);
            updated.as_mut().enable();
            match store.data_lock(url_hash, purpose).await {
                LockAttempt::Acquired(lock) => return Led::Lock(Some(lock)),
                attempt @ LockAttempt::Unavailable => {
                    return if store.lock_waited_in_vain(&attempt) {
                        Led::Waited
                    } else {
                        Led::Lock(None)
                    };
                }
                LockAttempt::Filled => {}
                LockAttempt::Held => {
                    let now = Instant::now();
                    if now >= deadline {
                        tracing::debug!(target: "tower_redis_cache", "data fill wait exceeded; running the factory");
                        return Led::Lock(None);
                    }
                    let _ = tokio::time::timeout_at(deadline.min(now + poll), updated).await;
                    poll = (poll * 2).min(Duration::from_millis(250));
                }
            }
            let (found, tier) = self.read::<T>("", url_hash, false, None).await;
            if let Some((stored, value)) = found
                && stored.is_fresh(clock::now_ms())
            {
                return Led::Found(stored.entry, value);
            }
            if tier == Tier::Degraded {
                // Redis failed this call (or the breaker opened): it asks
                // Redis for the lock no more.
                return if store.waited_in_vain(tier) {
                    Led::Waited
                } else {
                    Led::Lock(None)
                };
            }
            if Instant::now() >= deadline {
                return Led::Lock(None);
            }
        }
    }

    /// Eager refresh: one background factory call per instance (this
    /// flight) and across instances (the lock, which reports a value
    /// stored since `stored`).
    fn refresh<T, E, F, Fut>(
        &self,
        url_hash: String,
        url: String,
        stored: &Stored,
        options: &DataOptions,
        factory: F,
    ) where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let Joined::Leader(guard) = self
            .inner
            .flights
            .join(&format!("refresh {url_hash}"), &url_hash)
        else {
            return;
        };
        let this = self.clone();
        let options = options.clone();
        let stored_at = stored.stored_at;
        let task = async move {
            let lock = match this
                .inner
                .store
                .data_lock(&url_hash, LockPurpose::Refresh(stored_at))
                .await
            {
                LockAttempt::Acquired(lock) => Some(lock),
                LockAttempt::Unavailable => None,
                LockAttempt::Held | LockAttempt::Filled => return,
            };
            this.complete(
                url_hash,
                url,
                options,
                factory,
                Some(guard),
                lock,
                None,
                None,
                false,
            )
            .await;
        };
        tokio::spawn(task.in_current_span());
    }

    /// Runs the factory and stores its value (releasing the lock in the
    /// same write), or on failure re-stores the expired value for the
    /// fail-safe throttle; tells the flight and the caller: after the
    /// write, or before it when `answer_first` (Redis failed the call, which
    /// has waited for it as long as a call may; so have the calls that
    /// follow it in this process, which read Redis at the same time).
    #[allow(clippy::too_many_arguments)]
    async fn complete<T, E, F, Fut>(
        self,
        url_hash: String,
        url: String,
        options: DataOptions,
        factory: F,
        guard: Option<FlightGuard>,
        lock: Option<LockToken>,
        stale: Option<Stored>,
        mut caller: Option<oneshot::Sender<Result<T, E>>>,
        answer_first: bool,
    ) where
        T: Serialize + Send + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let store = Arc::clone(&self.inner.store);
        // A value made from what the factory read from now on: a removal
        // or purge after this makes it not stored (`put.lua`'s rule).
        let asked = std::time::SystemTime::now();
        let outcome = AssertUnwindSafe(async move { factory().await })
            .catch_unwind()
            .await;
        match outcome {
            Ok(Ok(value)) => {
                let encoded = self.inner.codec.encode(&value);
                let mut value = Some(value);
                let mut guard = guard;
                let (shared, put) = self.prepare_value(&url_hash, &url, encoded, &options, asked);
                if answer_first {
                    if let (Some(caller), Some(value)) = (caller.take(), value.take()) {
                        let _ = caller.send(Ok(value));
                    }
                    if let Some(guard) = guard.take() {
                        guard.complete(shared.clone());
                    }
                }
                match put {
                    Some(put) => store.data_put(put, lock).await,
                    None => {
                        if let Some(lock) = lock {
                            store.unlock(lock, &url_hash).await;
                        }
                    }
                }
                if let Some(guard) = guard {
                    guard.complete(shared);
                }
                if let (Some(caller), Some(value)) = (caller, value) {
                    let _ = caller.send(Ok(value));
                }
            }
            Ok(Err(error)) => {
                let mut error = Some(error);
                let mut guard = guard;
                if answer_first {
                    if let (Some(caller), Some(error)) = (caller.take(), error.take()) {
                        let _ = caller.send(Err(error));
                    }
                    // The followers serve their expired value, or make
                    // their own, without waiting for the write.
                    if let Some(guard) = guard.take() {
                        guard.fail(None);
                    }
                }
                match stale {
                    Some(stale) => {
                        let throttle = clock::duration_ms(options.fail_safe_throttle);
                        let entry =
                            value::entry(stale.bytes(), throttle, stale.near(), clock::now_ms());
                        let keep_for = options
                            .fail_safe_throttle
                            .saturating_add(options.fail_safe.unwrap_or_default());
                        store
                            .data_put(put(url_hash, url, entry, &options, keep_for, None), lock)
                            .await;
                    }
                    None => {
                        if let Some(lock) = lock {
                            store.unlock(lock, &url_hash).await;
                        }
                    }
                }
                if let Some(guard) = guard {
                    guard.fail(None);
                }
                if let (Some(caller), Some(error)) = (caller, error) {
                    let _ = caller.send(Err(error));
                }
            }
            Err(_) => {
                tracing::warn!(target: "tower_redis_cache", "a data cache factory panicked; the key is released");
                if let Some(lock) = lock {
                    store.unlock(lock, &url_hash).await;
                }
                drop(guard);
                drop(caller);
            }
        }
    }

    /// A value's entry for the in-process followers (also when it is too
    /// large to store), and the write that stores it (none when it does
    /// not encode or is too large).
    fn prepare_value(
        &self,
        url_hash: &str,
        url: &str,
        encoded: Result<Vec<u8>, super::CodecError>,
        options: &DataOptions,
        asked: std::time::SystemTime,
    ) -> (Option<Arc<Entry>>, Option<Put>) {
        let bytes = match encoded {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(target: "tower_redis_cache", %error, "a data cache value does not encode: not stored");
                return (None, None);
            }
        };
        let entry = value::entry(
            &bytes,
            clock::duration_ms(options.ttl),
            options.near,
            clock::now_ms(),
        );
        if bytes.len() > self.inner.max_value_bytes {
            if self.inner.warned.get(url_hash).is_none() {
                self.inner.warned.insert(url_hash.to_owned(), ());
                tracing::warn!(target: "tower_redis_cache", bytes = bytes.len(), limit = self.inner.max_value_bytes, "a data cache value is over the size limit: returned, not stored");
            }
            tower_redis_core::record::counter("tower_redis_cache_data_too_large_total", &[], 1);
            return (Some(Arc::new(entry)), None);
        }
        let shared = Arc::new(entry.clone());
        let put = put(
            url_hash.to_owned(),
            url.to_owned(),
            entry,
            options,
            options.keep_for(),
            Some(asked),
        );
        (Some(shared), Some(put))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower_redis_core::RedisManager;

    use super::super::{DataCache, DataOptions, value};

    /// glibc's per-thread cache takes blocks up to 1,032 bytes; a larger one
    /// takes the arena's lock, which two threads contend for under load.
    const THREAD_CACHE_BYTES: usize = 1032;

    /// A Redis-tier hit allocates its futures in blocks the allocator's
    /// per-thread cache takes: the hit's box (`get_or_make` with its span),
    /// and the Redis read's box (`read_data_entry`), the miss being boxed apart
    /// from both (one 2.2 KB box before). The sizes are those of this
    /// build's layout: a test build's, larger than a release build's.
    #[test]
    fn a_hits_boxed_futures_fit_the_allocators_thread_cache() {
        let cache = DataCache::new(RedisManager::disabled());
        let options = DataOptions::new(Duration::from_secs(60));
        let span = tracing::debug_span!(target: "tower_redis_cache", "data");
        let hit = tower_redis_core::in_span(
            span,
            cache.get_or_make::<(String, Vec<String>), std::io::Error, _, _>(
                "product:1",
                &options,
                || async { Ok((String::new(), Vec::new())) },
            ),
        );
        let size = std::mem::size_of_val(&hit);
        assert!(size <= THREAD_CACHE_BYTES, "the boxed hit is {size} bytes");
        let url_hash = value::url_hash("product:1").expect("a valid key");
        let read = cache.inner.store.read_data_entry(&url_hash, true);
        let size = std::mem::size_of_val(&read);
        assert!(size <= THREAD_CACHE_BYTES, "the boxed read is {size} bytes");
    }
}
