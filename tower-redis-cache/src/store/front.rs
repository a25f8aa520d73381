//! Each thread's front of the near tier: the few copies this thread read
//! last, held by the thread itself. One front per kind of copy: the data
//! cache's decoded values (`typed.rs`) and the HTTP cache's records
//! (`memory.rs`, whose exactness comes from the store's generation; see
//! there). What follows is about the decoded values.
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::LocalKey;

/// Copies held per thread.
pub(crate) const SLOTS: usize = 8;
/// The largest charge (see [`FrontCopy::weight`]) of a copy a front holds.
pub(crate) const MAX_WEIGHT: u32 = 16 << 10;

/// What a front holds.
pub(crate) trait FrontCopy {
    /// The key it is found by.
    fn key(&self) -> &str;
    /// What it is charged.
    fn weight(&self) -> u32;
    /// Whether it may no longer be served: its place is taken first.
    fn is_spent(&self) -> bool;
}

/// One thread's copies of one kind, each with the name of its owner.
pub(crate) struct Front<T> {
    held: [Option<(u64, T)>; SLOTS],
    /// The slot the next new copy takes.
    next: usize,
}

impl<T> Front<T> {
    pub(crate) const fn new() -> Self {
        Self {
            held: [const { None }; SLOTS],
            next: 0,
        }
    }
}

/// A thread's front of copies of kind `T`.
pub(crate) type Local<T> = LocalKey<RefCell<Front<T>>>;

/// A new owner's name: never reused, so that a copy left by a dropped
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
pub(crate) fn get<T: FrontCopy, R>(
    front: &'static Local<T>,
    owner: u64,
    key: &str,
    read: impl FnOnce(&T) -> Option<R>,
) -> Option<R> {
    front
        .try_with(|front| {
            let front = front.try_borrow().ok()?;
            let (_, held) = front
                .held
                .iter()
                .flatten()
                .find(|(held_for, held)| *held_for == owner && held.key() == key)?;
            read(held)
        })
        .ok()
        .flatten()
}

/// Holds `copy` as this thread's copy of its key for `owner`, unless it is
/// charged more than [`MAX_WEIGHT`].
pub(crate) fn keep<T: FrontCopy>(front: &'static Local<T>, owner: u64, copy: T) {
    if copy.weight() > MAX_WEIGHT {
        return;
    }
    let _ = front.try_with(|front| {
        let Ok(mut front) = front.try_borrow_mut() else {
            return;
        };
        let same_key = |held: &Option<(u64, T)>| {
            held.as_ref()
                .is_some_and(|(held_for, held)| *held_for == owner && held.key() == copy.key())
        };
        let unused =
            |held: &Option<(u64, T)>| held.as_ref().is_none_or(|(_, held)| held.is_spent());
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
        let replaced = front.held[at].replace((owner, copy));
        drop(front);
        drop(replaced);
    });
}

/// How many copies this thread holds for `owner`, and their charges.
#[cfg(test)]
pub(crate) fn held<T: FrontCopy>(front: &'static Local<T>, owner: u64) -> (usize, u64) {
    front.with(|front| {
        let front = front.borrow();
        let mine = front
            .held
            .iter()
            .flatten()
            .filter(|(held_for, _)| *held_for == owner);
        mine.fold((0, 0), |(count, bytes), (_, held)| {
            (count + 1, bytes + u64::from(held.weight()))
        })
    })
}
