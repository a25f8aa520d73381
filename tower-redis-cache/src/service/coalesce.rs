//! Coalescing inside one instance, for the HTTP cache and the data cache
//! alike: the first caller that misses a key leads, later ones follow and
//! wait for its outcome. Across instances the leader also takes the key's
//! short Redis lock (see the store, and `data/fill.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::StatusCode;
use tokio::sync::watch;
use tower_redis_core::sync::lock;

use crate::entry::Entry;

/// How a flight ended: with the entry it stored (for the HTTP cache shared
/// only when it has no `Vary`, so that it fits every follower), without
/// one (nothing to share, or the leader panicked or went away), or with the
/// origin or the data factory failing (an error, or this status).
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    Pending,
    Done(Option<Arc<Entry>>),
    Failed(Option<StatusCode>),
}

/// The flights under way, one per key: as many as concurrent callers at
/// most, removed when they end.
///
/// A purge detaches the flights under way (every one, or one URL's): a
/// caller that comes after it never follows a flight that asked the origin
/// before it, and leads a new one instead. Each flight remembers the purge
/// epoch it started in, that of everything plus that of its URL's stripe;
/// joining compares it with the current one, so detaching costs one atomic
/// add and no walk over the flights.
#[derive(Default, Debug)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, (watch::Receiver<Outcome>, u64)>>,
    epochs: Arc<Epochs>,
}

/// Stripes of per-URL purge epochs: an invalidation of one URL detaches the
/// flights of the URLs that share its stripe (a few extra origin calls at
/// worst), in constant time and memory.
const STRIPES: usize = 64;

#[derive(Debug)]
struct Epochs {
    all: AtomicU64,
    stripes: [AtomicU64; STRIPES],
}

impl Default for Epochs {
    fn default() -> Self {
        Self {
            all: AtomicU64::new(0),
            stripes: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Epochs {
    fn stripe(url_hash: &str) -> usize {
        let folded = url_hash.bytes().take(8).fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        folded % STRIPES
    }

    /// Changes whenever everything or the URL's stripe is detached.
    fn of(&self, url_hash: &str) -> u64 {
        self.all
            .load(Ordering::Acquire)
            .wrapping_add(self.stripes[Self::stripe(url_hash)].load(Ordering::Acquire))
    }
}

pub(crate) enum Joined {
    Leader(FlightGuard),
    Follower(watch::Receiver<Outcome>),
}

impl Flights {
    /// Follows the flight on `key` (of the URL `url_hash`) if there is one,
    /// without ever leading: for requests whose own answer could not be
    /// stored.
    pub(crate) fn follow(&self, key: &str, url_hash: &str) -> Option<watch::Receiver<Outcome>> {
        let map = lock(&self.map);
        let epoch = self.epochs.of(url_hash);
        map.get(key)
            .filter(|(_, started)| *started == epoch)
            .map(|(receiver, _)| receiver.clone())
    }

    /// Joins the flight on `key` (of the URL `url_hash`), or leads one.
    pub(crate) fn join(self: &Arc<Self>, key: &str, url_hash: &str) -> Joined {
        let mut map = lock(&self.map);
        // Read under the lock: a caller that read an older epoch cannot
        // replace a flight that started after the purge.
        let epoch = self.epochs.of(url_hash);
        if let Some((receiver, started)) = map.get(key)
            && *started == epoch
        {
            return Joined::Follower(receiver.clone());
        }
        // A flight from before a purge stays with its own followers; its
        // leader's `leave` finds it replaced and leaves the new one alone.
        let (sender, receiver) = watch::channel(Outcome::Pending);
        map.insert(key.to_owned(), (receiver, epoch));
        Joined::Leader(FlightGuard {
            flights: Arc::clone(self),
            key: key.to_owned(),
            sender,
        })
    }

    /// Flights that share this one's purge epochs (the HTTP cache's and the
    /// data cache's, over one store).
    pub(crate) fn sharing_epochs(&self) -> Self {
        Self {
            map: Mutex::default(),
            epochs: Arc::clone(&self.epochs),
        }
    }

    /// Detaches every flight under way (a purge of a tag, a prefix, a path,
    /// a URL or everything).
    pub(crate) fn detach_all(&self) {
        self.epochs.all.fetch_add(1, Ordering::AcqRel);
    }

    /// Detaches the flights of these URLs (an invalidation).
    pub(crate) fn detach<'a>(&self, url_hashes: impl IntoIterator<Item = &'a str>) {
        for url_hash in url_hashes {
            self.epochs.stripes[Epochs::stripe(url_hash)].fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// The leader's side of a flight; dropping it without an outcome (a panic,
/// a caller that went away) ends the flight with no entry, and a follower
/// that joins again leads next.
pub(crate) struct FlightGuard {
    flights: Arc<Flights>,
    key: String,
    sender: watch::Sender<Outcome>,
}

impl FlightGuard {
    pub(crate) fn complete(self, entry: Option<Arc<Entry>>) {
        self.end(Outcome::Done(entry));
    }

    /// Ends the flight saying the origin failed (an error, or `status`).
    pub(crate) fn fail(self, status: Option<StatusCode>) {
        self.end(Outcome::Failed(status));
    }

    /// Leaves the map first, so that a woken follower that joins again
    /// starts a new flight instead of finding this finished one.
    fn end(self, outcome: Outcome) {
        self.leave();
        self.sender.send_replace(outcome);
    }

    fn leave(&self) {
        let mut map = lock(&self.flights.map);
        if map
            .get(&self.key)
            .is_some_and(|(r, _)| r.same_channel(&self.sender.subscribe()))
        {
            map.remove(&self.key);
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.leave();
        self.sender.send_if_modified(|outcome| {
            if matches!(outcome, Outcome::Pending) {
                *outcome = Outcome::Done(None);
                true
            } else {
                false
            }
        });
    }
}

impl std::fmt::Debug for FlightGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightGuard")
            .field("key", &self.key)
            .finish()
    }
}

/// Waits for the flight's outcome (never `Pending`).
pub(crate) async fn wait(mut receiver: watch::Receiver<Outcome>) -> Outcome {
    match receiver.wait_for(|o| !matches!(o, Outcome::Pending)).await {
        Ok(outcome) => outcome.clone(),
        Err(_) => Outcome::Done(None),
    }
}
