//! Request coalescing inside one instance: the first request that misses a
//! key leads, later ones follow and wait for its outcome. Across instances
//! the leader also takes a short Redis lock (see the store).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use tokio::sync::watch;
use tower_redis_core::sync::lock;

use crate::entry::Entry;

/// How a flight ended: with the entry it stored (shared only when it has
/// no `Vary`, so that it fits every follower), without one, or with the
/// origin failing (an error, or this status) while the leader revalidated.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    Pending,
    Done(Option<Arc<Entry>>),
    OriginFailed(Option<StatusCode>),
}

#[derive(Default, Debug)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, watch::Receiver<Outcome>>>,
}

pub(crate) enum Joined {
    Leader(FlightGuard),
    Follower(watch::Receiver<Outcome>),
}

impl Flights {
    /// Follows the flight on `key` if there is one, without ever leading:
    /// for requests whose own answer could not be stored.
    pub(crate) fn follow(&self, key: &str) -> Option<watch::Receiver<Outcome>> {
        lock(&self.map).get(key).cloned()
    }

    pub(crate) fn join(self: &Arc<Self>, key: &str) -> Joined {
        let mut map = lock(&self.map);
        if let Some(receiver) = map.get(key) {
            return Joined::Follower(receiver.clone());
        }
        let (sender, receiver) = watch::channel(Outcome::Pending);
        map.insert(key.to_owned(), receiver);
        Joined::Leader(FlightGuard {
            flights: Arc::clone(self),
            key: key.to_owned(),
            sender,
        })
    }
}

/// The leader's side of a flight; dropping it without
/// [`complete`](Self::complete) ends the flight with no entry.
pub(crate) struct FlightGuard {
    flights: Arc<Flights>,
    key: String,
    sender: watch::Sender<Outcome>,
}

impl FlightGuard {
    pub(crate) fn complete(self, entry: Option<Arc<Entry>>) {
        self.sender.send_replace(Outcome::Done(entry));
    }

    /// Ends the flight saying the origin failed (an error, or `status`).
    pub(crate) fn fail(self, status: Option<StatusCode>) {
        self.sender.send_replace(Outcome::OriginFailed(status));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        {
            let mut map = lock(&self.flights.map);
            if map
                .get(&self.key)
                .is_some_and(|r| r.same_channel(&self.sender.subscribe()))
            {
                map.remove(&self.key);
            }
        }
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
