//! Sessions ended on any instance, announced to every instance.
//!
//! Each instance keeps in-process copies of the sessions it read, to serve
//! them while Redis is unavailable. A session that another instance logged
//! out, cycled (a login) or revoked must not be served from such a copy
//! during a later outage. So every end Redis acknowledges (a delete, the
//! take of a cycle, a `revoke_user` pass, their replays after an outage,
//! and a replayed change that finds its session gone) is announced on one
//! channel, and every instance ends its copy when it hears it.
//!
//! An announcement is best-effort: sent in its own task once the end is
//! acknowledged, so that neither a failure to publish (a Redis user
//! without the channel's permission) nor the request's cancellation
//! fails or undoes the end itself; a failure is logged.
//!
//! Messages published while an instance is not subscribed are lost, so
//! after each (re)subscription, once Redis answers commands again (its
//! breaker closed), the instance checks its copies against Redis (one
//! `EXISTS` each, pipelined) and ends those whose session is gone. The
//! copies of live sessions are kept: a subscription made again in the
//! middle of an outage (Redis loading its data, a flapping server, a
//! Cluster node down until its replica takes over: a failed check is made
//! again for up to 10 s after its first failure, the copies kept
//! meanwhile) logs nobody out. Copies pinned by changes still queued are left to the
//! queue: a replayed change that finds its session gone announces it.
//!
//! A message is `d` (ended) or `c` (cycled away), then the sessions'
//! storage keys, each after one space; at most [`PER_MESSAGE`] keys a
//! message. Anything else is ignored.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tower_redis_core::redis;
use tower_redis_core::{BreakerState, ListenOnce, RedisManager, Subscriber};

use super::local::LocalStore;
use super::redis::per_session;

/// The length of a storage key (base64url of a SHA-256, no padding).
const STORAGE_KEY_LEN: usize = 43;
/// The most storage keys one message names (about 44 KB).
pub(crate) const PER_MESSAGE: usize = 1000;
/// The most `EXISTS` one pipeline of the check sends.
const CHECK_BATCH: usize = 256;
/// How long after its first failure the check of the copies may keep
/// failing (or wait for Redis) before the copies are dropped unchecked:
/// long enough for a Cluster with a node timeout of a few seconds to
/// promote a replica (Redis' default `cluster-node-timeout`, 15 s, is
/// longer: there the copies still go).
const CHECK_FOR: Duration = Duration::from_secs(10);
/// The pause after the first failed check; doubled after each.
const CHECK_RETRY: Duration = Duration::from_millis(250);

/// Whether a failed announcement was already logged as a warning.
static WARNED: AtomicBool = AtomicBool::new(false);

/// The announcements' channel under a manager's prefix.
pub(crate) fn channel(manager: &RedisManager) -> String {
    manager.keys().key(&["session-ended"])
}

/// The messages announcing that the sessions of `storage_keys` ended
/// (`cycled`: their ids were cycled away).
fn messages(cycled: bool, storage_keys: &[String]) -> impl Iterator<Item = String> + '_ {
    storage_keys.chunks(PER_MESSAGE).map(move |chunk| {
        let mut message = String::from(if cycled { "c" } else { "d" });
        for storage_key in chunk {
            message.push(' ');
            message.push_str(storage_key);
        }
        message
    })
}

/// Publishes the end of `storage_keys` on `channel`, in a task of its own
/// (nothing without a Tokio runtime).
pub(crate) fn announce(
    manager: &RedisManager,
    channel: &str,
    cycled: bool,
    storage_keys: Vec<String>,
) {
    if storage_keys.is_empty() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (manager, channel) = (manager.clone(), channel.to_owned());
    runtime.spawn(async move {
        for message in messages(cycled, &storage_keys) {
            let publish = redis::cmd("PUBLISH").arg(&channel).arg(message).clone();
            if let Err(error) = manager.query::<()>(&publish).await {
                if WARNED.swap(true, Ordering::Relaxed) {
                    tracing::debug!(target: "tower_redis_session", %error, %channel, "an ended session was not announced");
                } else {
                    tracing::warn!(target: "tower_redis_session", %error, %channel, "an ended session was not announced to the other instances, which may serve it from their copies in an outage; if the Redis user lacks the channel's permission, grant it (ACL `&{channel}`)");
                }
                return;
            }
        }
    });
}

/// The listener of one store: ends the local copies of announced sessions.
pub(crate) struct Announcements {
    manager: RedisManager,
    channel: String,
    local: LocalStore,
    listening: ListenOnce,
    /// Itself, for the checks it spawns.
    me: Weak<Self>,
    /// Bumped at each new subscription: a check made for an older one
    /// stops (the newer check covers its gap).
    subscriptions: AtomicU64,
}

impl Announcements {
    pub(crate) fn new(manager: RedisManager, local: LocalStore) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            channel: channel(&manager),
            manager,
            local,
            listening: ListenOnce::new(),
            me: me.clone(),
            subscriptions: AtomicU64::new(0),
        })
    }

    /// Starts the listener once, from inside a Tokio runtime.
    pub(crate) fn ensure_started(self: &Arc<Self>) {
        self.listening.start(self);
    }
}

/// After a (re)subscription: once Redis answers commands, ends the copies
/// whose session Redis no longer holds. A failed check is made again (once
/// Redis answers again, after a pause), for at most [`CHECK_FOR`] from the
/// first failure; then, unchecked, every copy goes (a copy could have
/// missed an end; nothing could tell). Meanwhile the copies are kept, and
/// served in an outage, as they are in any outage that begins before a
/// check has passed: on a Redis Cluster with one node down, the keys of
/// that node's slots cannot be checked until a replica takes over, and
/// dropping every copy at the first failure logged out the sessions of
/// the healthy nodes for the rest of the outage. A check made for an older
/// subscription stops once a newer one begins.
async fn check_copies(announcements: Weak<Announcements>, subscription: u64) {
    // Set at the first failure: waiting for Redis to answer before the
    // first check has no bound (as in any outage, the copies serve).
    let mut deadline = None;
    let mut pause = CHECK_RETRY;
    loop {
        let Some(this) = announcements.upgrade() else {
            return;
        };
        let mut breaker = this.manager.subscribe();
        drop(this);
        let answers = async {
            while *breaker.borrow_and_update() != BreakerState::Closed {
                if breaker.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        let closed = match deadline {
            None => Ok(answers.await),
            Some(deadline) => tokio::time::timeout_at(deadline, answers).await,
        };
        let Some(this) = announcements.upgrade() else {
            return;
        };
        if this.subscriptions.load(Ordering::Acquire) != subscription {
            return;
        }
        let error = match closed {
            // The manager is gone.
            Ok(false) => return,
            Ok(true) => match check_once(&this).await {
                Ok(()) => return,
                Err(error) => error.to_string(),
            },
            Err(_) => "Redis did not answer".to_owned(),
        };
        let now = tokio::time::Instant::now();
        if now + pause >= *deadline.get_or_insert(now + CHECK_FOR) {
            tracing::debug!(target: "tower_redis_session", %error, "the session copies could not be checked after a new subscription; dropping them");
            this.local.drop_copies();
            return;
        }
        tracing::debug!(target: "tower_redis_session", %error, "the session copies could not be checked after a new subscription; checking again");
        drop(this);
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
}

/// One check of every copy: ends those whose session is gone.
async fn check_once(this: &Announcements) -> Result<(), tower_redis_core::Error> {
    let keys = this.local.copy_keys();
    for batch in keys.chunks(CHECK_BATCH) {
        let exist: Vec<bool> = per_session(&this.manager, batch, |key| {
            redis::cmd("EXISTS").arg(key).clone()
        })
        .await?;
        end_gone(&this.local, batch, exist);
    }
    Ok(())
}

/// Ends the copies of `keys` whose session a check found gone (`exist`,
/// in the same order).
fn end_gone(local: &LocalStore, keys: &[String], exist: Vec<bool>) {
    for (storage_key, exists) in keys.iter().zip(exist) {
        if !exists {
            // Only the copy: a read now finds the session gone too, and a
            // Redis that restarted empty would otherwise fill the memory of
            // ends with every session this instance held. Not a copy pinned
            // since the keys were listed: its session's changes (its
            // creation perhaps) still wait for Redis.
            local.end_unpinned_copy(storage_key);
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
        if connected && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let subscription = self.subscriptions.fetch_add(1, Ordering::AcqRel) + 1;
            runtime.spawn(check_copies(self.me.clone(), subscription));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower_redis_core::RedisManager;
    use tower_redis_core::Subscriber;

    use super::{Announcements, PER_MESSAGE, messages};
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

    /// A copy pinned while its check was on its way (its session made
    /// during the outage, its creation still queued, so Redis says it is
    /// absent) stays; the others found absent go.
    #[test]
    fn a_check_keeps_a_copy_pinned_meanwhile() {
        let local = local();
        let keys = local.copy_keys();
        assert_eq!(keys.len(), 4);
        assert!(local.pin(&key(1)));
        super::end_gone(&local, &keys, vec![false; keys.len()]);
        assert!(local.get(&key(1)).is_some(), "the pinned copy was dropped");
        for n in [0, 2, 3] {
            assert!(local.get(&key(n)).is_none(), "{n}");
        }
    }

    /// Ends and cycles end the copies they name; a message of another shape,
    /// or a word that is not a storage key, ends nothing.
    #[test]
    fn announced_sessions_end_and_nothing_else() {
        let local = local();
        let listener = Announcements::new(RedisManager::disabled(), local.clone());
        let message = |cycled, keys: &[String]| {
            let all: Vec<String> = messages(cycled, keys).collect();
            assert_eq!(all.len(), 1);
            all[0].clone().into_bytes()
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
        // A cycled id announced later as a delete (a replayed cycle) stays
        // known as cycled away.
        listener.on_message(&message(false, &[key(2)]));
        assert!(local.was_cycled(&key(2)));
        // A lost subscription alone changes nothing.
        listener.on_connected(false);
        assert!(local.get(&key(3)).is_some());
    }

    /// However many sessions end at once ("log out everywhere" of a user
    /// with many), no message names more than `PER_MESSAGE`.
    #[test]
    fn a_large_end_is_announced_in_bounded_messages() {
        let keys: Vec<String> = (0..2_500).map(|n| format!("{n:043}")).collect();
        let all: Vec<String> = messages(false, &keys).collect();
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|m| m.split(' ').count() <= PER_MESSAGE + 1));
        let named: usize = all.iter().map(|m| m.split(' ').count() - 1).sum();
        assert_eq!(named, keys.len());
    }

    /// A read that began before an end (announced or made here) does not
    /// bring the copy back when it returns.
    #[test]
    fn a_read_that_returns_after_the_end_makes_no_copy() {
        let local = local();
        let read = local.get(&key(0)).expect("copy");
        local.end_as(&key(0), false);
        local.refresh(&key(0), Some(&read), None, true, now_ms(), local.end_mark());
        assert!(local.get(&key(0)).is_none());
    }
}
