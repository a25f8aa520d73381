//! Sessions ended on any instance, announced to every instance.
//!
//! Each instance keeps in-process copies of the sessions it read, to serve
//! them while Redis is unavailable. A session that another instance logged
//! out, cycled (a login) or revoked must not be served from such a copy
//! during a later outage. So every end written to Redis (a delete, the take
//! of a cycle, a `revoke_user` pass, and their replays after an outage) is
//! announced on one channel, in the same round trip, after the write
//! itself; every instance listens and ends its copy.
//!
//! Messages published while an instance is not subscribed are lost, so
//! each (re)subscription drops the copies (not the pinned ones, whose
//! changes still wait for Redis and are written behind the queue's rules),
//! and the tracked copies with them: each session's next request reads it
//! from Redis and makes its copy again.
//!
//! A message is `d` (ended) or `c` (cycled away), then the sessions'
//! storage keys, each after one space. Anything else is ignored.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tower_redis_core::redis;
use tower_redis_core::{RedisManager, Subscriber, TrackedCache};

use super::local::LocalStore;
use super::redis::Tracked;

/// The length of a storage key (base64url of a SHA-256, no padding).
const STORAGE_KEY_LEN: usize = 43;

/// The announcements' channel under a manager's prefix.
pub(crate) fn channel(manager: &RedisManager) -> String {
    manager.keys().key(&["session-ended"])
}

/// The `PUBLISH` announcing that the sessions of `storage_keys` ended
/// (`cycled`: their ids were cycled away).
pub(crate) fn announce<'k>(
    channel: &str,
    cycled: bool,
    storage_keys: impl IntoIterator<Item = &'k str>,
) -> redis::Cmd {
    let mut message = String::from(if cycled { "c" } else { "d" });
    for storage_key in storage_keys {
        message.push(' ');
        message.push_str(storage_key);
    }
    redis::cmd("PUBLISH").arg(channel).arg(message).clone()
}

/// The listener of one store: ends the local copies of announced sessions.
pub(crate) struct Announcements {
    manager: RedisManager,
    channel: String,
    local: LocalStore,
    /// The copies kept exact by tracking, emptied with the local ones: the
    /// next read of each session then goes to Redis and makes its local
    /// copy again.
    tracked: Option<TrackedCache<Arc<Tracked>>>,
    started: AtomicBool,
}

impl Announcements {
    pub(crate) fn new(
        manager: RedisManager,
        local: LocalStore,
        tracked: Option<TrackedCache<Arc<Tracked>>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            channel: channel(&manager),
            manager,
            local,
            tracked,
            started: AtomicBool::new(false),
        })
    }

    /// Starts the listener once, from inside a Tokio runtime.
    pub(crate) fn ensure_started(self: &Arc<Self>) {
        if self.started.load(Ordering::Acquire) || self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(tower_redis_core::listen(Arc::downgrade(self)));
            }
            Err(_) => self.started.store(false, Ordering::Release),
        }
    }
}

impl Subscriber for Announcements {
    fn manager(&self) -> &RedisManager {
        &self.manager
    }

    fn channel(&self) -> &str {
        &self.channel
    }

    fn on_message(&self, payload: &[u8]) {
        let mut words = payload.split(|&b| b == b' ');
        let cycled = match words.next() {
            Some(b"d") => false,
            Some(b"c") => true,
            _ => return,
        };
        for word in words {
            let well_formed = word.len() == STORAGE_KEY_LEN
                && word
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
            if well_formed && let Ok(storage_key) = std::str::from_utf8(word) {
                self.local.end_as(storage_key, cycled);
            }
        }
    }

    fn on_connected(&self, connected: bool) {
        if connected {
            self.local.drop_copies();
            // Else a session read on every request, answered by its
            // tracked copy, would have no local copy until its next
            // renewal, and none to serve in an outage that came first.
            if let Some(tracked) = &self.tracked {
                tracked.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower_redis_core::RedisManager;
    use tower_redis_core::Subscriber;

    use super::{Announcements, announce};
    use crate::store::local::LocalStore;
    use crate::store::{Record, now_ms};

    fn key(n: u8) -> String {
        format!("{n:043}")
    }

    fn local() -> LocalStore {
        let local = LocalStore::new(
            1 << 20,
            1 << 20,
            Duration::from_secs(60),
            Duration::from_secs(3600),
        );
        for n in 0..4 {
            let record = Record {
                created_ms: now_ms(),
                ..Record::default()
            };
            local.put(&key(n), record, 0);
        }
        local
    }

    /// Ends and cycles end the copies they name; a message of another shape,
    /// or a word that is not a storage key, ends nothing.
    #[test]
    fn announced_sessions_end_and_nothing_else() {
        let local = local();
        let listener = Announcements::new(RedisManager::disabled(), local.clone(), None);
        let message = |cycled, keys: &[String]| {
            let cmd = announce("channel", cycled, keys.iter().map(String::as_str));
            match cmd.args_iter().nth(2) {
                Some(tower_redis_core::redis::Arg::Simple(bytes)) => bytes.to_vec(),
                _ => panic!("PUBLISH channel message"),
            }
        };
        for junk in [
            b"x 0000000000000000000000000000000000000000000".to_vec(),
            b"d".to_vec(),
            format!("d {}0", key(0)).into_bytes(),
            format!("d {}", &key(0)[1..]).into_bytes(),
            [b"d ".as_slice(), &[0xff; 43]].concat(),
            format!("D {}", key(0)).into_bytes(),
        ] {
            listener.on_message(&junk);
            assert!(local.get(&key(0)).is_some(), "{junk:?}");
            assert!(!local.has_ended(&key(0)), "{junk:?}");
        }
        listener.on_message(&message(false, &[key(0), key(1)]));
        listener.on_message(&message(true, &[key(2)]));
        for n in 0..3 {
            assert!(local.get(&key(n)).is_none(), "{n}");
        }
        assert!(local.has_ended(&key(0)) && !local.was_cycled(&key(0)));
        assert!(local.was_cycled(&key(2)));
        assert!(local.get(&key(3)).is_some());
        // A new subscription drops every copy.
        listener.on_connected(false);
        assert!(local.get(&key(3)).is_some());
        listener.on_connected(true);
        assert!(local.get(&key(3)).is_none());
    }

    /// A read that began before an end (announced or made here) does not
    /// bring the copy back when it returns.
    #[test]
    fn a_read_that_returns_after_the_end_makes_no_copy() {
        let local = local();
        let read = local.get(&key(0)).expect("copy");
        local.end_as(&key(0), false);
        local.refresh(&key(0), Some(&read), None, true, now_ms());
        assert!(local.get(&key(0)).is_none());
    }
}
