//! Request coalescing inside one instance: the first request that misses a
//! key leads, later ones follow and wait for its outcome. Across instances
//! the leader also takes a short Redis lock (see the store).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::entry::Entry;

/// How a flight ended: with the entry it stored (shared only when it has
/// no `Vary`, so that it fits every follower), or without one.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    Pending,
    Done(Option<Arc<Entry>>),
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

/// Waits for the flight's outcome.
pub(crate) async fn wait(mut receiver: watch::Receiver<Outcome>) -> Option<Arc<Entry>> {
    match receiver.wait_for(|o| matches!(o, Outcome::Done(_))).await {
        Ok(outcome) => match &*outcome {
            Outcome::Done(entry) => entry.clone(),
            Outcome::Pending => None,
        },
        Err(_) => None,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
