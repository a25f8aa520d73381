//! Each thread's fronts of the near tier: the few copies this thread read
//! last, held by the thread itself. One front per kind of copy, each of
//! [`SLOTS`] copies charged at most [`MAX_WEIGHT`] bytes (larger ones stay
//! shared only), so about `SLOTS × MAX_WEIGHT` (128 KiB) per kind, per
//! thread that reads it:
//! - the data cache's decoded values (`typed.rs`), charged their encoded
//!   size (an estimate of the decoded one);
//! - the HTTP cache's near records (`memory.rs`), charged the record's
//!   bytes and the bookkeeping of the thread's own copies of its fields and
//!   variants.
//!
//! Why: every read of shared copies writes shared memory (the cache's
//! records of reads, the copy's reference count, the reference counts of
//! the buffers it shares). When one hot key is read on every core, those
//! words are cache lines that the cores hand to each other on every read,
//! and a near hit at 64 tasks on 2 CPUs ran at 0.6 of the same lookup on
//! one. A front hit writes nothing shared.
//!
//! Exact, each kind in its own way:
//! - a decoded value: a drop retires the copy before it leaves the shared
//!   cache, every copy that is not retired can be found by a drop
//!   (`typed.rs`), and a front serves no retired copy. The copy's own end
//!   (`until`), codec, type and eager-refresh fraction are checked as for a
//!   shared copy;
//! - a near record: it is served only while the store's generation, which
//!   every change of the store bumps, is the one read before the record was
//!   (`memory.rs`), and each entry only until it leaves the store.
//!
//! So a read that starts after a drop or change has returned finds no
//! front copy from before it, on any thread. A copy may outlive its shared
//! one (evicted, or its cache gone) until this thread reuses the slot or
//! ends, and a near record may be served after the shared cache evicted it
//! (not after it was dropped or changed). A new copy takes, in this order,
//! the slot of the same key, a free or spent one, then the slots in turn.
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
