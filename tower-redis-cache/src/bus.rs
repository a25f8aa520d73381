//! The pub/sub side: writers announce updated URLs on one channel; every
//! instance listens, to wake requests waiting for a fill. A lost connection
//! is reconnected with a backoff.
//!
//! The near tier's copies are kept exact by **Redis client tracking**
//! (`tower_redis_core::tracking`): lookups that may fill the near tier are
//! read on the manager's tracking connection, and Redis itself tells this
//! instance when such an entry changes, is purged (hard or soft), expires
//! or is deleted by any instance, in the order it ran the commands. So a
//! near copy no longer depends on the writer's own announcement (which was
//! published in the same pipeline as the write, and could be lost or
//! overtaken). While tracking is not live (connection lost, breaker open)
//! the near tier is not used, and it is emptied whenever trust is lost
//! (see the core module). On a Redis Cluster, where tracking is off, the
//! near tier falls back to the announcements: emptied on every
//! (re)connection of the subscription, not used while it is down.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, Weak};

use tokio::sync::Notify;
use tower_redis_core::{Invalidate, ListenOnce, RedisManager, Subscriber, Tracking};

use tower_redis_core::bytes_cache::BytesCache;

use crate::store::{MemoryStore, VaryHint};

pub(crate) struct Bus {
    manager: RedisManager,
    channel: String,
    near: Option<Arc<MemoryStore>>,
    listening: ListenOnce,
    connected: AtomicBool,
    /// Bumped by every message and every (re)connection: a near-cache copy
    /// read before a bump may be outdated and is not kept.
    epoch: AtomicU64,
    /// Held (shared) by a lookup from its epoch check to the end of keeping
    /// its copy; every bump then takes it alone once, so that when a bump
    /// returns, no copy read under an older epoch can still land.
    keeps: RwLock<()>,
    /// Woken by every update message.
    updated: Notify,
    /// When the near tier follows Redis client tracking (not on a cluster).
    tracking: Option<Tracking>,
    /// `<prefix>:c:`: the keys of entries, as tracking names them.
    entry_prefix: String,
    /// The store's `Vary` hints, whose known-absent marks a write ends.
    hints: Arc<BytesCache<String, VaryHint>>,
    /// Bumped whenever tracking says anything may have changed
    /// ([`Invalidate::invalidate_all`]: the near tier is emptied then): a
    /// known-absent mark set before holds no more.
    trust: AtomicU64,
}

impl Bus {
    /// With a near tier, registers it with the manager's tracking
    /// connection when there is one.
    pub(crate) fn new(
        manager: RedisManager,
        near: Option<Arc<MemoryStore>>,
        hints: Arc<BytesCache<String, VaryHint>>,
    ) -> Arc<Self> {
        let channel = manager.keys().key(&["cache-events"]);
        let tracking = near.as_ref().and_then(|_| manager.tracking());
        let entry_prefix = format!("{}:", manager.keys().key(&["c"]));
        let bus = Arc::new(Self {
            manager,
            channel,
            near,
            listening: ListenOnce::new(),
            connected: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            keeps: RwLock::new(()),
            updated: Notify::new(),
            tracking,
            entry_prefix,
            hints,
            trust: AtomicU64::new(0),
        });
        if let Some(tracking) = &bus.tracking {
            let weak: Weak<Bus> = Arc::downgrade(&bus);
            tracking.register(weak);
        }
        bus
    }

    /// The tracking connection near-tier lookups are read on, when the
    /// near tier follows tracking.
    pub(crate) fn tracking(&self) -> Option<&Tracking> {
        self.tracking.as_ref()
    }

    /// Starts the listener once, from inside a Tokio runtime.
    pub(crate) fn ensure_started(self: &Arc<Self>) {
        self.listening.start(self);
    }

    /// Whether a near-cache copy can be trusted now.
    pub(crate) fn near_usable(&self) -> bool {
        let following = match &self.tracking {
            Some(tracking) => tracking.is_live(),
            None => self.connected.load(Ordering::Acquire),
        };
        following && self.manager.is_available()
    }

    /// Sequentially consistent, as the bumps in [`Invalidate`]: a lookup
    /// that keeps something (a copy, a mark) and then reads the epoch, and
    /// an invalidation that bumps it and then removes what was kept, never
    /// both miss each other.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The trust a known-absent mark is valid under (see
    /// [`VaryHint::KnownAbsent`]).
    pub(crate) fn trust(&self) -> u64 {
        self.trust.load(Ordering::SeqCst)
    }

    /// Ends a URL's known absence: it was written in Redis, or may have
    /// been. Its next lookup reads Redis again.
    pub(crate) fn end_known_absence(&self, url_hash: &str) {
        // Most URLs written have no hint here (and a data value none, or
        // only the mark that it is large): `update` makes no entry then.
        self.hints.update(url_hash, |hint| {
            if matches!(hint, VaryHint::KnownAbsent { .. }) {
                *hint = VaryHint::Absent;
            }
        });
    }

    /// Held while a lookup checks the epoch and keeps what it read (a near
    /// copy, a known-absent mark), until it has checked again: see
    /// [`bump_epoch`](Self::bump_epoch). Never held across an `.await`.
    fn keeping(&self) -> RwLockReadGuard<'_, ()> {
        self.keeps.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps what a lookup read under `epoch` (`keep`: a near copy, a
    /// known-absent mark) unless the epoch moved since: from the check to
    /// the end of the keeping, a purge, a write or an invalidation waits
    /// ([`bump_epoch`](Self::bump_epoch)), so that nothing it removed lands
    /// after it. `None` when nothing was kept. Belt and braces: should the
    /// epoch have moved all the same, `undo` takes the kept thing out.
    pub(crate) fn keep_at<T>(
        &self,
        epoch: u64,
        keep: impl FnOnce() -> T,
        undo: impl FnOnce(),
    ) -> Option<T> {
        let _keeping = self.keeping();
        if self.epoch() != epoch {
            return None;
        }
        let kept = keep();
        if self.epoch() == epoch {
            Some(kept)
        } else {
            undo();
            None
        }
    }

    /// Makes every lookup under way skip the near tier (after this
    /// instance removed entries from Redis, or Redis said they changed),
    /// and waits for those already keeping a copy to finish: a copy that
    /// passed its epoch check just before the bump may land after the
    /// caller's removal, and a request could read it before the lookup's
    /// second check took it out again. Once this returns, what the caller
    /// removes next stays removed. Test:
    /// `a_bump_of_the_epoch_waits_for_the_copies_being_kept`.
    pub(crate) fn bump_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        drop(self.keeps.write().unwrap_or_else(PoisonError::into_inner));
    }

    /// Resolves at the next update message.
    pub(crate) fn updated(&self) -> tokio::sync::futures::Notified<'_> {
        self.updated.notified()
    }

    /// The message announcing that a URL's entries changed.
    pub(crate) fn updated_message(url_hash: &str) -> String {
        format!("u {url_hash}")
    }

    /// The message announcing that every entry is gone.
    pub(crate) const ALL_MESSAGE: &'static str = "a";
}

/// The channel's announcements: an updated URL wakes the requests waiting
/// for its fill (and, on a cluster, drops its near copies).
impl Subscriber for Bus {
    fn manager(&self) -> &RedisManager {
        &self.manager
    }

    fn channel(&self) -> &str {
        &self.channel
    }

    fn on_message(&self, payload: &[u8]) {
        if self.tracking.is_some() {
            // Near copies follow tracking; the message wakes waiters, and
            // ends the URL's known absence now (the tracking invalidation
            // comes on another connection, maybe after the waiters look).
            if let [b'u', b' ', url_hash @ ..] = payload
                && let Ok(url_hash) = std::str::from_utf8(url_hash)
            {
                self.end_known_absence(url_hash);
            }
            self.updated.notify_waiters();
            return;
        }
        self.bump_epoch();
        match payload {
            [b'u', b' ', url_hash @ ..] => {
                if let (Some(near), Ok(url_hash)) = (&self.near, std::str::from_utf8(url_hash)) {
                    near.remove(url_hash);
                }
            }
            _ => {
                if let Some(near) = &self.near {
                    near.clear();
                }
            }
        }
        self.updated.notify_waiters();
    }

    fn on_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
        if self.tracking.is_some() {
            return;
        }
        self.bump_epoch();
        if let Some(near) = &self.near {
            near.clear();
        }
    }
}

/// Redis client tracking's word on the near tier: an entry's key changed
/// (its URL's near copies go), or everything may have.
impl Invalidate for Bus {
    fn invalidate(&self, key: &[u8]) {
        let Some(url_hash) = key.strip_prefix(self.entry_prefix.as_bytes()) else {
            return;
        };
        // A lookup that began before this does not fill the near tier.
        self.bump_epoch();
        if let Ok(url_hash) = std::str::from_utf8(url_hash) {
            if let Some(near) = &self.near {
                near.remove(url_hash);
            }
            self.end_known_absence(url_hash);
        }
    }

    fn invalidate_all(&self) {
        self.bump_epoch();
        self.trust.fetch_add(1, Ordering::SeqCst);
        if let Some(near) = &self.near {
            near.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    use tower_redis_core::RedisManager;
    use tower_redis_core::testing::TestRedis;

    use super::Bus;

    /// A bump of the epoch (a purge, a store, an invalidation) returns
    /// only once no lookup is keeping a copy under the older epoch: one
    /// that passed its check just before the bump finishes first, and the
    /// caller's removal that follows the bump comes after its copy.
    #[tokio::test]
    async fn a_bump_of_the_epoch_waits_for_the_copies_being_kept() {
        let redis = TestRedis::start().await;
        let manager = RedisManager::connect(redis.config().build().unwrap())
            .await
            .unwrap();
        let bus = Bus::new(
            manager,
            None,
            Arc::new(tower_redis_core::bytes_cache::BytesCache::new(
                1 << 20,
                |_: &String, _: &crate::store::VaryHint| 1,
            )),
        );
        let before = bus.epoch();
        let keeping = bus.keeping();
        let bumped = Arc::new(AtomicBool::new(false));
        let (done, finished) = mpsc::channel();
        std::thread::spawn({
            let bus = Arc::clone(&bus);
            let bumped = Arc::clone(&bumped);
            move || {
                bus.bump_epoch();
                bumped.store(true, Ordering::SeqCst);
                let _ = done.send(());
            }
        });
        // The bump itself is at once: a lookup that checks now skips the
        // near tier.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while bus.epoch() == before {
            assert!(std::time::Instant::now() < deadline, "no bump in 10 s");
            std::thread::yield_now();
        }
        assert!(
            finished.recv_timeout(Duration::from_millis(200)).is_err(),
            "the bump returned while a copy was being kept"
        );
        assert!(!bumped.load(Ordering::SeqCst));
        drop(keeping);
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the bump returns once the copy is kept");
        assert_eq!(bus.epoch(), before + 1);
    }
}
