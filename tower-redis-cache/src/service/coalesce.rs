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
/// A purge detaches the flights under way (every one, or one key's): a
/// caller that comes after it never follows a flight that asked the
/// origin before it, and leads a new one instead. Each flight remembers
/// the purge epoch it started in; joining compares it with the current
/// one, so detaching everything costs one atomic add.
#[derive(Default, Debug)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, (watch::Receiver<Outcome>, u64)>>,
    epoch: Arc<AtomicU64>,
}

pub(crate) enum Joined {
    Leader(FlightGuard),
    Follower(watch::Receiver<Outcome>),
}

impl Flights {
    /// Follows the flight on `key` if there is one, without ever leading:
    /// for requests whose own answer could not be stored.
    pub(crate) fn follow(&self, key: &str) -> Option<watch::Receiver<Outcome>> {
        let epoch = self.epoch.load(Ordering::Acquire);
        lock(&self.map)
            .get(key)
            .filter(|(_, started)| *started == epoch)
            .map(|(receiver, _)| receiver.clone())
    }

    pub(crate) fn join(self: &Arc<Self>, key: &str) -> Joined {
        let epoch = self.epoch.load(Ordering::Acquire);
        let mut map = lock(&self.map);
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

    /// Flights that share this one's purge epoch (the HTTP cache's and the
    /// data cache's, over one store).
    pub(crate) fn sharing_epoch(&self) -> Self {
        Self {
            map: Mutex::default(),
            epoch: Arc::clone(&self.epoch),
        }
    }

    /// Detaches every flight under way (a purge of a tag, a prefix, a path,
    /// a URL or everything).
    pub(crate) fn detach_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Detaches the flights on these keys (an invalidation of one URL).
    pub(crate) fn detach(&self, keys: impl IntoIterator<Item = String>) {
        let mut map = lock(&self.map);
        for key in keys {
            map.remove(&key);
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
