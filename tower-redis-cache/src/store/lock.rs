//! Fill locks: one request across the instances fills (or refreshes) a
//! URL's entry while the others wait for it. The lock is the `lk` field of
//! the URL's hash in Redis (see `redis_store.rs`); without Redis there is
//! no cross-instance coordination.

use http::HeaderMap;

use super::outage::OutageChange;
use super::redis_store::{self, Op, RedisStore};
use super::{CacheStore, EntryStore, LockAttempt, LockPurpose, LockToken};
use crate::bus::Bus;
use crate::key;

impl CacheStore {
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
        if !self.redis().manager.is_available() {
            return LockAttempt::Unavailable;
        }
        let token = LockToken::generate();
        let attempt = self.redis().lock(url_hash, variant, purpose, &token).await;
        self.lock_answered(url_hash, token, attempt)
    }

    /// What a lock attempt comes to. One that failed after it may have
    /// reached Redis (a timeout, a connection lost mid-command) may yet
    /// take the lock there: a hung Redis runs it when it wakes, for a
    /// request that gave up long before, and every request for the URL
    /// would wait out the lock's TTL for a fill that never comes. So its
    /// release is queued, written as soon as Redis answers again (with the
    /// announcement that wakes the waiters).
    pub(super) fn lock_answered(
        &self,
        url_hash: &str,
        token: LockToken,
        attempt: Result<LockAttempt, tower_redis_core::Error>,
    ) -> LockAttempt {
        match attempt {
            Ok(attempt) => attempt,
            Err(error) => {
                if error.may_have_run() {
                    self.defer([OutageChange::unlock(url_hash, token)]);
                }
                LockAttempt::Unavailable
            }
        }
    }

    /// Releases a fill lock without storing (the response was not
    /// storable) and wakes the waiters.
    pub(crate) async fn unlock(&self, lock: LockToken, url_hash: &str) {
        let _ = self.redis().unlock(lock, url_hash).await;
    }

    /// The variant field a request selects, when this instance knows the
    /// URL's `Vary`.
    pub(crate) fn known_variant(
        &self,
        url_hash: &str,
        request: &HeaderMap,
        extra: &str,
    ) -> Option<String> {
        match self.vary_hints.get(url_hash)? {
            super::VaryHint::Vary { names, .. } => Some(key::variant(&names, request, extra)),
            // Not known: the URL was absent when last looked up.
            super::VaryHint::Absent | super::VaryHint::KnownAbsent { .. } => None,
        }
    }
}

impl RedisStore {
    /// The lock script: `acquired`, `filled` or held by another.
    pub(super) async fn take_lock(
        &self,
        url_hash: &str,
        variant: Option<&str>,
        purpose: LockPurpose,
        token: &LockToken,
    ) -> Result<LockAttempt, tower_redis_core::Error> {
        self.run_lock(
            &redis_store::LOCK,
            url_hash,
            variant.unwrap_or(""),
            purpose,
            token,
        )
        .await
    }

    /// Runs a fill-lock script (`lock.lua`, or the data cache's, which take
    /// the same arguments) for the variant field `variant`.
    pub(super) async fn run_lock(
        &self,
        script: &tower_redis_core::redis::Script,
        url_hash: &str,
        variant: &str,
        purpose: LockPurpose,
        token: &LockToken,
    ) -> Result<LockAttempt, tower_redis_core::Error> {
        let ttl = self.lock_ttl_ms();
        let key = self.redis_key(url_hash);
        let mut invocation = script.key(&key);
        invocation
            .arg(token.as_str())
            .arg(ttl)
            .arg(variant)
            .arg(match purpose {
                LockPurpose::Fill => "fill",
                LockPurpose::Refresh(_) => "refresh",
            })
            .arg(match purpose {
                LockPurpose::Fill => Vec::new(),
                LockPurpose::Refresh(stored_at) => stored_at.to_be_bytes().to_vec(),
            });
        let answer = self.manager.invoke_script::<String>(&invocation).await?;
        Ok(match answer.as_str() {
            "filled" => LockAttempt::Filled,
            acquired if acquired.starts_with("acquired") => LockAttempt::Acquired(LockToken {
                token: token.as_str().to_owned(),
                taken_at_us: acquired
                    .strip_prefix("acquired:")
                    .and_then(|at| at.parse().ok()),
            }),
            _ => LockAttempt::Held,
        })
    }

    /// Releases the lock by its token and announces the URL, so that the
    /// waiters look again.
    pub(super) async fn release_lock(
        &self,
        lock: LockToken,
        url_hash: &str,
    ) -> Result<(), tower_redis_core::Error> {
        let key = self.redis_key(url_hash);
        let mut unlock = redis_store::UNLOCK.key(&key);
        unlock.arg(&lock.token);
        let ops = [
            Op::Script(unlock),
            redis_store::publish(&self.channel, &Bus::updated_message(url_hash)),
        ];
        self.run_ops(&ops).await.map(|_| ())
    }
}
