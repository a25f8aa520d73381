//! Coalescing inside one instance: the first caller that misses a key
//! leads, later ones follow and wait for its outcome. Across instances the
//! leader also takes the key's fill lock in Redis (see `fill.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tower_redis_core::sync::lock;

use crate::entry::Entry;

/// How a flight ended.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    Pending,
    /// With this entry (stored, or too large to store), or, without one,
    /// with nothing to share (the leader panicked or went away).
    Done(Option<Arc<Entry>>),
    /// The factory failed.
    Failed,
}

/// The flights under way, one per key: as many as concurrent callers at
/// most, removed when they end.
#[derive(Default, Debug)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, watch::Receiver<Outcome>>>,
}

pub(crate) enum Joined {
    Leader(Guard),
    Follower(watch::Receiver<Outcome>),
}

impl Flights {
    pub(crate) fn join(self: &Arc<Self>, key: &str) -> Joined {
        let mut map = lock(&self.map);
        if let Some(receiver) = map.get(key) {
            return Joined::Follower(receiver.clone());
        }
        let (sender, receiver) = watch::channel(Outcome::Pending);
        map.insert(key.to_owned(), receiver);
        Joined::Leader(Guard {
            flights: Arc::clone(self),
            key: key.to_owned(),
            sender,
        })
    }
}

/// The leader's side; dropped without an outcome (a panic, a caller that
/// went away) it ends the flight with nothing, and a follower leads next.
pub(crate) struct Guard {
    flights: Arc<Flights>,
    key: String,
    sender: watch::Sender<Outcome>,
}

impl Guard {
    pub(crate) fn complete(self, entry: Option<Arc<Entry>>) {
        self.end(Outcome::Done(entry));
    }

    pub(crate) fn fail(self) {
        self.end(Outcome::Failed);
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
            .is_some_and(|r| r.same_channel(&self.sender.subscribe()))
        {
            map.remove(&self.key);
        }
    }
}

impl Drop for Guard {
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

/// Waits for the flight's outcome (never `Pending`).
pub(crate) async fn wait(mut receiver: watch::Receiver<Outcome>) -> Outcome {
    match receiver.wait_for(|o| !matches!(o, Outcome::Pending)).await {
        Ok(outcome) => outcome.clone(),
        Err(_) => Outcome::Done(None),
    }
}
