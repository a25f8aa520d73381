//! The memory of sessions that ended recently (here, or announced by
//! another instance), bounded by bytes, that knows what it forgot.
//!
//! A request that loaded a session before it ended must not put its copy
//! back, nor renew its cookie (a concurrent login may have set the id
//! that replaced it). It asks whether the session ended *since it began*:
//! every end is numbered, a request takes the newest number when it
//! begins ([`Ends::mark`]), and when room is made by forgetting an end
//! (the oldest goes first), the memory keeps the highest number it
//! forgot. An end it no longer holds may have come after a request's mark
//! only when that number is above the mark, and the request is then
//! answered "ended": a flood of ends (logins and logouts as fast as a
//! client can make them) cannot push the end of a session out of the
//! memory while a request that loaded it still runs. At worst, during
//! such a flood, a request started before more ends than the memory holds
//! renews no cookie, leaves no copy, and a change it makes with a cookie
//! whose session is gone is not stored as a new session (as if the id had
//! been cycled away), unless the request destroyed that session itself;
//! that is logged as a warning and counted
//! (`tower_redis_session_dropped_changes_total{reason="ends_forgotten"}`).
//!
//! Only ends after a request began are covered so: an end from before it
//! that a flood pushes out is forgotten, as in any bounded memory.
//!
//! An end is remembered for [`ENDED_FOR`]; one that simply grew that old
//! is not counted as forgotten.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tower_redis_core::sync;

/// How long an end is remembered: longer than any request that loaded the
/// session before can still be running.
pub(crate) const ENDED_FOR: Duration = Duration::from_secs(120);
/// The bound of the memory: about 19,000 ends of 43-byte storage keys
/// each recorded twice (an end an instance makes is recorded when it makes
/// it, and again when it hears its own announcement), or about 22,000
/// heard once (the ends of other instances).
pub(crate) const ENDED_BYTES: u64 = 4 * 1024 * 1024;
/// The bookkeeping of one remembered session beyond its key: the map's
/// slot and the shared key's allocation. Counted once however often its
/// end is recorded.
const KEPT_OVERHEAD: u64 = 112;
/// The bookkeeping of one record of an end: its place in the queue. An end
/// recorded again costs only this (its older place stays until the queue
/// moves past it).
const QUEUE_SLOT: u64 = 32;

/// What a request takes when it begins ([`Ends::mark`]): the low 32 bits
/// of the newest end's number, so that it fits in the padding of the
/// futures that carry it. The whole number is found again from the newest
/// one (fewer than 2^32 ends happen while a request runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EndMark(u32);

/// How the memory knows of an end since a request's mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    /// It holds the end.
    Held,
    /// It forgot an end numbered after the mark to make room (a flood):
    /// this one may have been among them.
    Forgotten,
}

#[derive(Default)]
pub(crate) struct Ends {
    inner: Mutex<Inner>,
    /// The number of the newest end, readable without the lock.
    newest: AtomicU64,
}

#[derive(Default)]
struct Inner {
    by_key: HashMap<Arc<str>, Ended>,
    /// Oldest first: the ends as they were recorded (an end recorded again
    /// leaves its older entry here, skipped when it comes out).
    order: VecDeque<(u64, Arc<str>)>,
    bytes: u64,
    /// The highest number of an end forgotten to make room.
    forgotten: u64,
    bound: u64,
}

#[derive(Clone, Copy)]
struct Ended {
    number: u64,
    at: Instant,
    /// The id was cycled away (a login): the session lives on under
    /// another id.
    cycled: bool,
}

impl Ended {
    fn live(&self, now: Instant) -> bool {
        now.duration_since(self.at) < ENDED_FOR
    }
}

impl Ends {
    pub(crate) fn new() -> Self {
        Self::with_bound(ENDED_BYTES)
    }

    pub(crate) fn with_bound(bound: u64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                bound,
                ..Inner::default()
            }),
            newest: AtomicU64::new(0),
        }
    }

    /// The number of the newest end so far: a request takes it before it
    /// reads a session, and asks [`ended_since`](Self::ended_since) with it.
    pub(crate) fn mark(&self) -> EndMark {
        EndMark(self.newest.load(Ordering::Acquire) as u32)
    }

    /// Remembers that the session of `storage_key` ended (`cycled`: its id
    /// was cycled away), replacing what was remembered of it: an end heard
    /// again (this instance's own, announced back to it; a revocation's
    /// second announcement, after its deletes) takes a new number, so that
    /// a request that read the session between the two still hears of it.
    pub(crate) fn record(&self, storage_key: &str, cycled: bool) {
        let now = Instant::now();
        let mut inner = sync::lock(&self.inner);
        let number = self.newest.load(Ordering::Relaxed) + 1;
        let key: Arc<str> = match inner.by_key.get_key_value(storage_key) {
            Some((key, _)) => Arc::clone(key),
            None => {
                inner.bytes += storage_key.len() as u64 + KEPT_OVERHEAD;
                Arc::from(storage_key)
            }
        };
        inner.bytes += QUEUE_SLOT;
        inner.order.push_back((number, Arc::clone(&key)));
        inner.by_key.insert(
            key,
            Ended {
                number,
                at: now,
                cycled,
            },
        );
        // Published under the lock: a request whose mark is below this
        // number finds this end, or the number among the forgotten.
        self.newest.store(number, Ordering::Release);
        while let Some((number, key)) = inner.order.front().cloned() {
            let full = inner.bytes > inner.bound;
            let current = inner.by_key.get(&key).copied();
            // An entry an end of the same key recorded again replaced.
            let stale = current.is_none_or(|ended| ended.number != number);
            let expired = current.is_some_and(|ended| !ended.live(now));
            if !(full || stale || expired) {
                break;
            }
            inner.order.pop_front();
            inner.bytes -= QUEUE_SLOT;
            if stale {
                continue;
            }
            inner.by_key.remove(&key);
            inner.bytes -= key.len() as u64 + KEPT_OVERHEAD;
            if !expired {
                inner.forgotten = inner.forgotten.max(number);
            }
        }
    }

    /// Whether the session ended within the last [`ENDED_FOR`], as far as
    /// this memory holds.
    pub(crate) fn holds(&self, storage_key: &str) -> bool {
        self.find(storage_key).is_some()
    }

    /// Whether the session ended after `mark` was taken, or may have: an
    /// end numbered above `mark` was forgotten to make room.
    pub(crate) fn ended_since(&self, storage_key: &str, mark: EndMark) -> bool {
        self.held_or_forgotten(storage_key, mark, |_| true)
            .is_some()
    }

    /// Whether the session's id was cycled away recently.
    pub(crate) fn was_cycled(&self, storage_key: &str) -> bool {
        self.find(storage_key).is_some_and(|ended| ended.cycled)
    }

    /// Whether the session's id was cycled away recently ([`Known::Held`]),
    /// or may have been since `mark` was taken ([`Known::Forgotten`]: an
    /// end numbered after it was forgotten).
    pub(crate) fn cycled_since(&self, storage_key: &str, mark: EndMark) -> Option<Known> {
        self.held_or_forgotten(storage_key, mark, |ended| ended.cycled)
    }

    /// Whether the memory holds an end of the session for which `held` is
    /// true, or else forgot an end numbered after `mark`: one look, under
    /// one lock.
    fn held_or_forgotten(
        &self,
        storage_key: &str,
        mark: EndMark,
        held: impl Fn(&Ended) -> bool,
    ) -> Option<Known> {
        let inner = sync::lock(&self.inner);
        let newest = self.newest.load(Ordering::Acquire);
        let mark = newest - u64::from((newest as u32).wrapping_sub(mark.0));
        if Self::live(&inner, storage_key).is_some_and(|ended| held(&ended)) {
            Some(Known::Held)
        } else if inner.forgotten > mark {
            Some(Known::Forgotten)
        } else {
            None
        }
    }

    fn find(&self, storage_key: &str) -> Option<Ended> {
        Self::live(&sync::lock(&self.inner), storage_key)
    }

    /// The end of the session the memory holds, unless it grew too old.
    fn live(inner: &Inner, storage_key: &str) -> Option<Ended> {
        inner
            .by_key
            .get(storage_key)
            .copied()
            .filter(|ended| ended.live(Instant::now()))
    }

    /// The bytes the memory counts (keys and bookkeeping).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        sync::lock(&self.inner).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: usize) -> String {
        format!("{n:043}")
    }

    /// The bytes `n` ends of [`key`]s take, each recorded once.
    fn room(n: u64) -> u64 {
        n * (43 + KEPT_OVERHEAD + QUEUE_SLOT)
    }

    /// A flood of ends (logins cycle ids, logouts) cannot hide the end of a
    /// session from a request that loaded it before: once an end newer than
    /// the request's mark is forgotten, the request is told "ended". A
    /// request that began after the flood is not.
    #[test]
    fn a_flood_of_ends_cannot_hide_an_end_from_a_request_that_began_before_it() {
        let ends = Ends::new();
        let before = ends.mark();
        ends.record("victim", false);
        for n in 0..30_000 {
            ends.record(&key(n), true);
        }
        assert!(!ends.holds("victim"), "the flood pushed it out");
        assert!(ends.ended_since("victim", before), "forgotten, and told so");
        assert_eq!(
            ends.cycled_since("victim", before),
            Some(Known::Forgotten),
            "perhaps cycled"
        );
        let after = ends.mark();
        assert!(!ends.ended_since("never-ended", after));
        assert!(ends.ended_since(&key(29_999), after));
        assert!(ends.bytes() <= ENDED_BYTES, "{} bytes", ends.bytes());
    }

    /// A mark keeps the low 32 bits of the number: one taken just before
    /// the numbers pass 2^32 still tells the ends after it.
    #[test]
    fn a_mark_holds_across_the_32_bit_wrap() {
        let ends = Ends::with_bound(room(10));
        ends.newest
            .store(u64::from(u32::MAX) - 2, Ordering::Release);
        let before = ends.mark();
        ends.record("victim", false);
        for n in 0..100 {
            ends.record(&key(n), false);
        }
        assert!(ends.mark().0 < 100, "wrapped");
        assert!(!ends.holds("victim"));
        assert!(ends.ended_since("victim", before));
        assert!(!ends.ended_since("victim", ends.mark()));
    }

    /// The newest end is always held, and an end recorded again replaces
    /// the old one (whose entry leaves as the queue moves) within the bound.
    #[test]
    fn the_newest_end_is_held_and_a_repeat_replaces_it() {
        let room = room(10);
        let ends = Ends::with_bound(room);
        for n in 0..1_000 {
            ends.record(&key(n), false);
            assert!(ends.holds(&key(n)), "end {n}");
            ends.record("again", n % 2 == 0);
        }
        assert!(ends.bytes() <= room);
        assert!(!ends.was_cycled("again"), "the last record says so");
        let mark = ends.mark();
        assert!(!ends.ended_since("other", mark));
        assert_eq!(ends.cycled_since("other", mark), None);
    }

    /// An end heard again after a request took its mark (a revocation
    /// announces before and after its deletes; a request may read the
    /// session between the two) counts as after the mark: once a flood has
    /// pushed it out, the request is still told "ended".
    #[test]
    fn an_end_heard_again_after_a_mark_is_not_lost_to_a_flood() {
        let ends = Ends::with_bound(room(10));
        let revoked = key(1_000_000);
        ends.record(&revoked, false);
        let mark = ends.mark();
        ends.record(&revoked, false);
        // Just enough to push the end out, and nothing recorded after it.
        for n in 0..10 {
            ends.record(&key(n), false);
        }
        assert!(!ends.holds(&revoked));
        assert!(ends.ended_since(&revoked, mark));
    }

    /// An end recorded again (this instance's own end heard back; a
    /// revocation's two announcements) costs only its place in the queue,
    /// not a second copy of what is kept of the session: an instance that
    /// hears its own ends holds nearly twice as many of them.
    #[test]
    fn an_end_recorded_again_costs_only_its_place_in_the_queue() {
        let ends = Ends::with_bound(100 * (43 + KEPT_OVERHEAD + 2 * QUEUE_SLOT));
        let before = ends.mark();
        for n in 0..100 {
            ends.record(&key(n), true);
            // Heard back from the channel a little later.
            if n >= 3 {
                ends.record(&key(n - 3), true);
            }
        }
        for n in 97..100 {
            ends.record(&key(n), true);
        }
        for n in 0..100 {
            assert!(ends.holds(&key(n)), "end {n} was pushed out");
        }
        assert!(
            !ends.ended_since("other", before),
            "nothing was forgotten to make room"
        );
        assert!(ends.bytes() <= 100 * (43 + KEPT_OVERHEAD + 2 * QUEUE_SLOT));
    }
}
