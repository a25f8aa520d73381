//! What the cache queues while Redis is unavailable, through core's
//! [`Failover`]: the invalidations and purges Redis missed, and the
//! releases of fill locks whose attempt may have reached it
//! ([`OutageChange`]), written by [`RedisStore`]'s [`Replay`] once it
//! answers (before the next lookup: see `lookup.rs`), and the in-process
//! store dropped by [`MemoryStore`]'s [`Recovered`] when the outage ends.
//!
//! Every change is a delete, so core never refuses nor drops one. The queue
//! still stays bounded by bytes (`outage_queue_bytes`) through an explicit
//! overflow policy: once its bytes pass the bound, ONE soft purge of
//! everything this layer stored is queued ([`OutageChange::collapsed`]),
//! and from then until it is written the invalidations and soft purges that
//! follow are left out: the soft purge covers them (it marks stale every
//! entry stored before it runs, so nothing from before the outage is served
//! as fresh afterwards). Hard purges are still queued one by one (a soft
//! purge does not cover them; only the admin surface makes them).

use tower_redis_core::RedisManager;
use tower_redis_core::degrade::{Deferred, Failover, Recovered, Replay, ReplayError};

use super::memory::MemoryStore;
use super::purge::Removed;
use super::redis_store::{RedisStore, Tombstone};
use super::{CacheStore, LockToken, Target};

/// The pair the cache talks to: Redis, or the in-process store.
pub(crate) type StoreFailover = Failover<RedisStore, MemoryStore>;

/// The bookkeeping of one queued change beyond its key (and target).
const CHANGE_OVERHEAD: usize = 96;

/// The key of the overflow's soft purge of everything.
const COLLAPSED_KEY: &str = "outage:collapsed";

/// An invalidation or purge Redis missed, written when it answers again.
#[derive(Debug, Clone)]
pub(crate) struct OutageChange {
    /// The URL hash of an invalidation; the target (and hardness) of a
    /// purge: a later change of the same key replaces a queued one.
    key: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Invalidate,
    Purge(Target, Option<u64>),
    /// The overflow policy's soft purge of everything (the time it was
    /// queued, this instance's clock, for the log; Redis marks with its own).
    Collapsed(u64),
    /// The release of a fill lock whose attempt failed after it may have
    /// reached Redis: the URL hash and the attempt's token.
    Unlock(String, String),
}

impl OutageChange {
    pub(crate) fn invalidate(url_hash: &str) -> Self {
        Self {
            key: url_hash.to_owned(),
            kind: Kind::Invalidate,
        }
    }

    pub(crate) fn purge(target: &Target, soft_at: Option<u64>) -> Self {
        let hardness = if soft_at.is_some() { "soft" } else { "hard" };
        let target_key = match target {
            Target::Tag(tag) => format!("tag:{tag}"),
            Target::Prefix(prefix) => format!("prefix:{prefix}"),
            Target::Path(path) => format!("path:{path}"),
            Target::Url(url) => format!("url:{url}"),
            Target::All => "all".to_owned(),
        };
        Self {
            // Hard and soft apart: a soft purge must not replace a hard one.
            key: format!("purge:{hardness}:{target_key}"),
            kind: Kind::Purge(target.clone(), soft_at),
        }
    }

    /// The release of the fill lock `token` of a URL, if Redis gave it.
    pub(crate) fn unlock(url_hash: &str, token: LockToken) -> Self {
        Self {
            // One per attempt: which of several attempts Redis ran is
            // not known.
            key: format!("unlock:{url_hash}:{}", token.as_str()),
            kind: Kind::Unlock(url_hash.to_owned(), token.as_str().to_owned()),
        }
    }

    /// "Mark stale everything this layer stored before now": what the
    /// queue collapses into when it passes its bound.
    pub(crate) fn collapsed(at_ms: u64) -> Self {
        Self {
            key: COLLAPSED_KEY.to_owned(),
            kind: Kind::Collapsed(at_ms),
        }
    }

    /// Whether the overflow's soft purge of everything makes this change
    /// unnecessary.
    fn is_covered_by_collapse(&self) -> bool {
        match &self.kind {
            // A lock not released expires with its TTL: only waiting
            // longer, which a queue over its bound accepts.
            Kind::Invalidate | Kind::Collapsed(_) | Kind::Unlock(..) => true,
            Kind::Purge(_, soft_at) => soft_at.is_some(),
        }
    }
}

impl Deferred for OutageChange {
    fn key(&self) -> &str {
        &self.key
    }

    fn weight(&self) -> usize {
        let target = match &self.kind {
            Kind::Purge(
                Target::Tag(s) | Target::Prefix(s) | Target::Path(s) | Target::Url(s),
                _,
            ) => s.len(),
            Kind::Unlock(url_hash, token) => url_hash.len() + token.len(),
            _ => 0,
        };
        self.key.len() + target + CHANGE_OVERHEAD
    }

    fn is_delete(&self) -> bool {
        true
    }
}

impl Replay for RedisStore {
    type Change = OutageChange;

    /// Oldest first; consecutive invalidations go in one pipeline.
    async fn replay(
        &self,
        _manager: &RedisManager,
        changes: &[OutageChange],
    ) -> Result<(), ReplayError> {
        let mut written = 0;
        while written < changes.len() {
            let rest = &changes[written..];
            let invalidations = rest
                .iter()
                .take_while(|change| matches!(change.kind, Kind::Invalidate))
                .count();
            let result = match &rest[0].kind {
                Kind::Invalidate => self
                    .run_ops(&self.delete_ops(
                        rest[..invalidations].iter().map(|c| c.key()),
                        Tombstone::Stored,
                    ))
                    .await
                    .map(|_| ()),
                Kind::Purge(target, soft_at) => self
                    .purge_indexed(target, *soft_at, &mut Removed::default(), true)
                    .await
                    .map(|_| ()),
                Kind::Collapsed(at_ms) => self
                    .purge_indexed(&Target::All, Some(*at_ms), &mut Removed::default(), true)
                    .await
                    .map(|_| ()),
                Kind::Unlock(url_hash, token) => {
                    self.release_lock(LockToken::from_token(token), url_hash)
                        .await
                }
            };
            result.map_err(|error| ReplayError { written, error })?;
            written += invalidations.max(1);
        }
        Ok(())
    }
}

impl Recovered for MemoryStore {
    /// Redis answers again: the in-process entries are dropped at once, not
    /// when the queue is written. From now on other instances may purge
    /// these pages in Redis, which this store does not hear of; were Redis
    /// to fail again, they must not be served from here.
    fn answered(&self) {
        self.clear();
        tracing::debug!(target: "tower_redis_cache", "Redis answers again: in-process cache entries dropped");
    }

    /// Redis is back and has every outage change: what a fallback stored
    /// since it first answered goes too.
    fn recovered(&self) {
        self.clear();
        tracing::info!(target: "tower_redis_cache", "Redis is back: in-process cache entries dropped");
    }
}

impl CacheStore {
    /// Queues invalidations or purges for Redis (and marks the outage),
    /// with the overflow policy of the [module](self).
    pub(super) fn defer(&self, changes: impl IntoIterator<Item = OutageChange>) {
        let failover = &self.failover;
        // Only a collapse still queued covers what comes now: one being
        // written may already have passed the pages these changes touch.
        let collapsed = failover.is_queued(COLLAPSED_KEY);
        let changes: Vec<OutageChange> = changes
            .into_iter()
            .filter(|change| !(collapsed && change.is_covered_by_collapse()))
            .collect();
        if !changes.is_empty() {
            // Deletes only: never refused.
            let _ = failover.defer_all(changes);
        }
        let usage = failover.queue_usage();
        if !collapsed && usage.bytes > usage.limit_bytes {
            tracing::warn!(
                target: "tower_redis_cache",
                limit_bytes = usage.limit_bytes,
                "the outage queue is full: when Redis is back, every entry stored before is marked stale instead of invalidated one by one"
            );
            let now = tower_redis_core::clock::now_ms();
            let _ = failover.defer(OutageChange::collapsed(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_keys_keep_hard_and_soft_apart_and_never_meet_url_hashes() {
        let hard = OutageChange::purge(&Target::Tag("a".into()), None);
        let soft = OutageChange::purge(&Target::Tag("a".into()), Some(1));
        assert_ne!(hard.key(), soft.key());
        assert_eq!(
            hard.key(),
            OutageChange::purge(&Target::Tag("a".into()), None).key()
        );
        assert_ne!(
            OutageChange::purge(&Target::Url("a".into()), None).key(),
            OutageChange::purge(&Target::Path("a".into()), None).key()
        );
        let invalidation = OutageChange::invalidate(&crate::key::hash_url("//h/a"));
        assert!(!invalidation.key().contains(':'));
        assert!(hard.is_delete() && invalidation.is_delete());
        assert!(invalidation.is_covered_by_collapse() && soft.is_covered_by_collapse());
        assert!(!hard.is_covered_by_collapse());
    }
}
