//! Each thread's front of the decoded data copies (`typed.rs`): the few
//! copies this thread read last, held by the thread itself.
//!
//! Why: every read of the shared decoded copies writes shared memory (the
//! cache's records of reads, the copy's reference count). When one hot key
//! is read on every core, those words are one cache line that the cores
//! hand to each other on every read, and a near hit at 64 tasks on 2 CPUs
//! ran at 0.6 of the same lookup on one. A front hit writes nothing shared:
//! it reads its instance's generation, which only a drop writes, and the
//! thread's own copies.
//!
//! Exact: a front copy is served only while its instance's generation is
//! the one read before the copy was taken from the shared copies. Every
//! drop moves the generation on after it has removed the shared copy, so a
//! read that starts after a drop has returned finds no front copy from
//! before it, on any thread. The copy's own end (`until`), codec, type and
//! eager-refresh fraction are checked as for a shared copy.
//!
//! Bounded by bytes: [`SLOTS`] copies per thread, of values charged at most
//! [`MAX_WEIGHT`] bytes each (larger ones stay shared only), so at most
//! `SLOTS × MAX_WEIGHT` (128 KiB) per thread that reads a data cache with a
//! near tier. A copy outlives its shared one (evicted, dropped, or its data
//! cache gone) only until this thread reuses the slot or ends; it is never
//! served after a drop. Reuse goes round the slots in turn, which costs a
//! hot key one shared read after the thread has read eight other keys.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::typed::Slot;

/// Copies held per thread.
pub(crate) const SLOTS: usize = 8;
/// The largest charge (see `Slot::weight`) of a copy a front holds.
pub(crate) const MAX_WEIGHT: u32 = 16 << 10;

/// A front copy: whose, taken in which generation.
struct Held {
    owner: u64,
    generation: u64,
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

/// What `read` makes of this thread's copy of `key`, held for `owner` and
/// taken in `generation`; `None` without one.
///
/// `read` runs with the front borrowed: a call back into the front from it
/// (a value whose `Clone` reads a data cache) finds it as usual, and one
/// that would change it changes nothing.
pub(crate) fn get<R>(
    owner: u64,
    generation: u64,
    key: &str,
    read: impl FnOnce(&Slot) -> Option<R>,
) -> Option<R> {
    FRONT
        .try_with(|front| {
            let front = front.try_borrow().ok()?;
            let held = front.held.iter().flatten().find(|held| {
                held.owner == owner && held.generation == generation && held.slot.key() == key
            })?;
            read(&held.slot)
        })
        .ok()
        .flatten()
}

/// Holds `slot` as this thread's copy of its key for `owner`, taken in
/// `generation` (read before `slot` was taken from the shared copies).
pub(crate) fn keep(owner: u64, generation: u64, slot: Arc<Slot>) {
    if slot.weight() > MAX_WEIGHT {
        return;
    }
    let _ = FRONT.try_with(|front| {
        let Ok(mut front) = front.try_borrow_mut() else {
            return;
        };
        let at = match front.held.iter().position(|held| {
            held.as_ref()
                .is_some_and(|held| held.owner == owner && held.slot.key() == slot.key())
        }) {
            Some(at) => at,
            None => {
                let at = front.next;
                front.next = (at + 1) % SLOTS;
                at
            }
        };
        // The copy it replaces is dropped after the front is released: its
        // value's `Drop` may read a data cache.
        let replaced = front.held[at].replace(Held {
            owner,
            generation,
            slot,
        });
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
