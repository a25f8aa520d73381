//! Each thread's front of the decoded data copies (`typed.rs`): the few
//! copies this thread read last, held by the thread itself.
//!
//! Why: every read of the shared decoded copies writes shared memory (the
//! cache's records of reads, the copy's reference count). When one hot key
//! is read on every core, those words are one cache line that the cores
//! hand to each other on every read, and a near hit at 64 tasks on 2 CPUs
//! ran at 0.6 of the same lookup on one. A front hit writes nothing shared:
//! it reads the copy, which is written once, when it is retired.
//!
//! Exact: a drop retires the copy before it leaves the shared cache, every
//! copy that is not retired can be found by a drop (`typed.rs`), and a
//! front serves no retired copy. So a read that starts after a drop has
//! returned finds no front copy from before it, on any thread. The copy's
//! own end (`until`), codec, type and eager-refresh fraction are checked as
//! for a shared copy.
//!
//! Bounded: [`SLOTS`] copies per thread, of values charged at most
//! [`MAX_WEIGHT`] bytes each (larger ones stay shared only), so about
//! `SLOTS × MAX_WEIGHT` (128 KiB) per thread that reads a data cache with a
//! near tier. The charge is the value's encoded size, an estimate of the
//! decoded one. A copy outlives its shared one (evicted, dropped, or its
//! data cache gone) only until this thread reuses the slot or ends; it is
//! never served after a drop. A new copy takes, in this order, the slot of
//! the same key, a free or retired one, then the slots in turn.
//!
//! A value whose `Drop` is run by a front may run it when the thread ends,
//! while the thread's locals are being destroyed.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::typed::Slot;

/// Copies held per thread.
pub(crate) const SLOTS: usize = 8;
/// The largest charge (see `Slot::weight`) of a copy a front holds.
pub(crate) const MAX_WEIGHT: u32 = 16 << 10;

/// A front copy, and whose it is.
struct Held {
    owner: u64,
    slot: Arc<Slot>,
}

struct Front {
    held: [Option<Held>; SLOTS],
    /// The slot the next new copy takes.
    next: usize,
}

thread_local! {
    static FRONT: RefCell<Front> = const {
        RefCell::new(Front {
            held: [const { None }; SLOTS],
            next: 0,
        })
    };
}

/// A new owner's name: never reused, so that a copy left by a dropped data
/// cache is never taken for another's.
pub(crate) fn owner_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// What `read` makes of this thread's copy of `key` held for `owner`;
/// `None` without one.
///
/// `read` runs with the front borrowed: a call back into the front from it
/// (a value whose `Clone` reads a data cache) finds it as usual, and one
/// that would change it changes nothing.
pub(crate) fn get<R>(owner: u64, key: &str, read: impl FnOnce(&Slot) -> Option<R>) -> Option<R> {
    FRONT
        .try_with(|front| {
            let front = front.try_borrow().ok()?;
            let held = front
                .held
                .iter()
                .flatten()
                .find(|held| held.owner == owner && held.slot.key() == key)?;
            read(&held.slot)
        })
        .ok()
        .flatten()
}

/// Holds `slot` as this thread's copy of its key for `owner`.
pub(crate) fn keep(owner: u64, slot: Arc<Slot>) {
    if slot.weight() > MAX_WEIGHT {
        return;
    }
    let _ = FRONT.try_with(|front| {
        let Ok(mut front) = front.try_borrow_mut() else {
            return;
        };
        let same_key = |held: &Option<Held>| {
            held.as_ref()
                .is_some_and(|held| held.owner == owner && held.slot.key() == slot.key())
        };
        let unused = |held: &Option<Held>| held.as_ref().is_none_or(|held| held.slot.is_retired());
        let at = match front
            .held
            .iter()
            .position(same_key)
            .or_else(|| front.held.iter().position(unused))
        {
            Some(at) => at,
            None => {
                let at = front.next;
                front.next = (at + 1) % SLOTS;
                at
            }
        };
        // The copy it replaces is dropped after the front is released: its
        // value's `Drop` may read a data cache.
        let replaced = front.held[at].replace(Held { owner, slot });
        drop(front);
        drop(replaced);
    });
}

/// How many copies this thread holds for `owner`, and their charges.
#[cfg(test)]
pub(crate) fn held(owner: u64) -> (usize, u64) {
    FRONT.with(|front| {
        let front = front.borrow();
        let mine = front
            .held
            .iter()
            .flatten()
            .filter(|held| held.owner == owner);
        mine.fold((0, 0), |(count, bytes), held| {
            (count + 1, bytes + u64::from(held.slot.weight()))
        })
    })
}
