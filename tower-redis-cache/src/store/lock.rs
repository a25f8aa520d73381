//! Fill locks: one request across the instances fills (or refreshes) a
//! URL's entry while the others wait for it. The lock is the `lk` field of
//! the URL's hash in Redis (see `redis_store.rs`); without Redis there is
//! no cross-instance coordination.

use http::HeaderMap;

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
        self.redis()
            .lock(url_hash, variant, purpose)
            .await
            .unwrap_or(LockAttempt::Unavailable)
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
    ) -> Result<LockAttempt, tower_redis_core::Error> {
        self.run_lock(&redis_store::LOCK, url_hash, variant.unwrap_or(""), purpose)
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
    ) -> Result<LockAttempt, tower_redis_core::Error> {
        let token = format!("{:016x}", rand::random::<u64>());
        let ttl = self.lock_ttl_ms();
        let key = self.redis_key(url_hash);
        let mut invocation = script.key(&key);
        invocation
            .arg(&token)
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
            "acquired" => LockAttempt::Acquired(LockToken { token }),
            "filled" => LockAttempt::Filled,
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
