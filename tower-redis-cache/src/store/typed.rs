//! The near tier's decoded data values.
//!
//! A data value copied into the near tier (see `data.rs`) is also kept
//! decoded, as the `T` it was read as, keyed by its data key: a near hit
//! then hands back a clone of that `T`, found with one lookup by the key
//! the caller gave, instead of hashing the key's URL, finding the encoded
//! entry and decoding it.
//!
//! A decoded copy lives exactly as long as the near copy it was made from
//! (the encoded entry, in the near [`MemoryStore`](super::MemoryStore)):
//! every change of that store drops the decoded copies of the URLs it
//! touches (an entry stored or removed, a purge, a soft purge, everything
//! emptied), whoever asked for it: Redis client tracking, the pub/sub bus
//! on a cluster, this instance's own writes and purges. A decoded copy is
//! only kept while its near copy is still the current one (checked under
//! the lock that those drops take, so that a drop cannot pass unseen
//! between the check and the keeping), and it ends when the near copy's
//! time in the near tier ends at the latest.
//!
//! A copy is typed: kept for one codec and one `T` (their `TypeId`s). A
//! read of the same key as another type, or through another codec, finds
//! no decoded copy and decodes the near copy as before.
//!
//! Bounded by bytes: each copy is charged its key (twice: the cache's key
//! and the copy's own), its URL hash and the encoded size of its value (the
//! decoded size is not measurable for an arbitrary `T`; the encoding is its
//! estimate), plus a fixed overhead, within a budget as large as the near
//! tier's own.
//!
//! In front of the shared copies, each thread holds the few it read last
//! (`front.rs`), so that a hot key read on every core writes no shared
//! memory. A drop retires the copy it drops (a flag in the copy, which a
//! front checks before serving it).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tower_redis_core::sync::lock;

use super::front;

/// The bookkeeping of one decoded copy beyond its key, URL hash and bytes.
const SLOT_OVERHEAD: usize = 160;

/// A decoded data value in the near tier.
pub(crate) struct Slot {
    /// The data key.
    key: Box<str>,
    /// `TypeId` of the codec and of the value's type.
    kind: (TypeId, TypeId),
    /// Set when the copy is dropped or replaced: a thread's front may
    /// still hold it, and must not serve it from then on. Shared with the
    /// drops' index (`keys`), which sets it without holding the copy.
    retired: Arc<AtomicBool>,
    /// The eager-refresh fraction the lifetime was set for (`f64` bits).
    refresh: Option<u64>,
    value: Box<dyn Any + Send + Sync>,
    /// What the copy is charged against the byte budget (see the module
    /// docs).
    weight: u32,
    /// When it ends: the first of the value's staleness, its eager refresh
    /// and the near copy's end. A lookup checks it: the cache has no expiry
    /// of its own, because one makes every read write the entry's access
    /// time, and readers of one hot key on several threads then contend for
    /// its cache line (a near hit at 64 tasks on 2 CPUs ran at 0.66 of
    /// `moka` alone with it). A copy found past its end is removed then; one
    /// never looked up again goes with the next keeping, a drop or the byte
    /// bound.
    until: Instant,
}

thread_local! {
    /// This thread's front of decoded copies (`front.rs`).
    static FRONT: std::cell::RefCell<front::Front<Arc<Slot>>> =
        const { std::cell::RefCell::new(front::Front::new()) };
}

impl front::FrontCopy for Arc<Slot> {
    fn key(&self) -> &str {
        &self.key
    }

    fn weight(&self) -> u32 {
        self.weight
    }

    fn is_spent(&self) -> bool {
        self.is_retired()
    }
}

impl Slot {
    /// Whether it was dropped or replaced (see `retired`).
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// The value, if it is fresh, not retired, and kept for codec `C`, type
    /// `T` and the eager-refresh fraction `refresh`.
    pub(crate) fn value<C: 'static, T: 'static>(
        &self,
        refresh: Option<u64>,
        now: Instant,
    ) -> Option<&T> {
        if now >= self.until
            || self.is_retired()
            || self.kind != (TypeId::of::<C>(), TypeId::of::<T>())
            || self.refresh != refresh
        {
            return None;
        }
        self.value.downcast_ref::<T>()
    }
}

/// What a lookup of a decoded copy found.
pub(crate) enum Typed<T> {
    /// A fresh value, not due for an eager refresh.
    Fresh(T),
    /// Nothing usable: read the near tier (and Redis) as usual.
    Absent,
}

/// Which near copy a value was decoded from, and until when it lives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NearCopy {
    /// The near record's identity (see `MemoryStore::record_id`).
    pub(crate) id: u64,
    /// When it leaves the near tier.
    pub(crate) until: Instant,
}

/// The decoded copies: by data key, and the data key of each URL hash for
/// the drops (which name URL hashes).
pub(crate) struct TypedNear {
    slots: moka::sync::Cache<String, Arc<Slot>>,
    /// URL hash → data key, and the retired flag of the copy kept for it
    /// (the flag only: a copy's value never goes while this lock is held,
    /// and its `Drop` may read the cache). Taken by every drop and by every
    /// keeping (see the module docs). Pruned of keys without a copy when it
    /// grows past twice the copies. A copy leaves it only retired, so that
    /// every copy a front may serve is one a drop can retire.
    keys: Mutex<HashMap<String, (String, Arc<AtomicBool>)>>,
    /// Names this instance's copies in the threads' fronts.
    id: u64,
}

impl TypedNear {
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            slots: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_: &String, slot: &Arc<Slot>| slot.weight)
                .build(),
            keys: Mutex::new(HashMap::new()),
            id: front::owner_id(),
        }
    }

    /// A fresh decoded copy of `key` as a `T` through codec `C`, kept for
    /// the same eager-refresh fraction `refresh` (so that none is due).
    pub(crate) fn get<C: 'static, T: Clone + 'static>(
        &self,
        key: &str,
        refresh: Option<f64>,
    ) -> Typed<T> {
        self.get_at::<C, T>(key, refresh, Instant::now())
    }

    /// [`get`](Self::get) at `now`.
    fn get_at<C: 'static, T: Clone + 'static>(
        &self,
        key: &str,
        refresh: Option<f64>,
        now: Instant,
    ) -> Typed<T> {
        let refresh = refresh.map(f64::to_bits);
        if let Some(value) = front::get(&FRONT, self.id, key, |slot| {
            slot.value::<C, T>(refresh, now).cloned()
        }) {
            return Typed::Fresh(value);
        }
        let Some(slot) = self.slots.get(key) else {
            return Typed::Absent;
        };
        if now >= slot.until {
            // Ended: removed here, so that it does not wait for the byte
            // bound to make room for live copies.
            self.slots.invalidate(key);
            return Typed::Absent;
        }
        let Some(value) = slot.value::<C, T>(refresh, now).cloned() else {
            return Typed::Absent;
        };
        front::keep(&FRONT, self.id, slot);
        Typed::Fresh(value)
    }

    /// Keeps `value`, decoded from the near copy `copy` of `url_hash`, as
    /// the decoded copy of `key`, if `current` (asked under the drops' lock)
    /// says that near copy is still the one in the near tier.
    /// `encoded_bytes`: the size of its entry's body (what it is charged
    /// for its value); `age_ms`: the value's age now; `ttl_ms`: its TTL;
    /// `refresh`: the eager-refresh fraction of the reads it serves.
    /// Nothing is kept for a value that is stale or due for a refresh.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn keep<C: 'static, T: Send + Sync + 'static>(
        &self,
        key: &str,
        url_hash: &str,
        copy: NearCopy,
        current: impl FnOnce(u64) -> bool,
        value: T,
        encoded_bytes: usize,
        age_ms: u64,
        ttl_ms: u64,
        refresh: Option<f64>,
    ) -> bool {
        let now = Instant::now();
        let mut left_ms = ttl_ms.saturating_sub(age_ms);
        if let Some(fraction) = refresh {
            // Saturating float-to-int: a negative or NaN product is 0.
            let due_ms = (fraction * ttl_ms as f64) as u64;
            left_ms = left_ms.min(due_ms.saturating_sub(age_ms));
        }
        let until = copy.until.min(
            now.checked_add(Duration::from_millis(left_ms))
                .unwrap_or(copy.until),
        );
        if until <= now {
            return false;
        }
        let slot = Arc::new(Slot {
            key: key.into(),
            kind: (TypeId::of::<C>(), TypeId::of::<T>()),
            refresh: refresh.map(f64::to_bits),
            value: Box::new(value),
            weight: u32::try_from(2 * key.len() + encoded_bytes + 43 + SLOT_OVERHEAD)
                .unwrap_or(u32::MAX),
            retired: Arc::new(AtomicBool::new(false)),
            until,
        });
        let mut keys = lock(&self.keys);
        if !current(copy.id) {
            return false;
        }
        if keys.len() > 1024 && keys.len() as u64 > 2 * self.slots.entry_count() {
            keys.retain(|_, (key, slot)| {
                let kept = self.slots.contains_key(key.as_str());
                if !kept {
                    retire(slot);
                }
                kept
            });
        }
        let replaced = keys.insert(
            url_hash.to_owned(),
            (key.to_owned(), Arc::clone(&slot.retired)),
        );
        if let Some((_, replaced)) = replaced {
            // Out of `keys`, no drop would find it.
            retire(&replaced);
        }
        self.slots.insert(key.to_owned(), slot);
        true
    }

    /// Drops the decoded copy of the data value at `url_hash`, if any.
    /// Called after its near copy changed or went.
    pub(crate) fn forget(&self, url_hash: &str) {
        let mut keys = lock(&self.keys);
        if let Some((key, slot)) = keys.remove(url_hash) {
            // Retired before it leaves the cache: a read that still finds
            // it there sees it retired, or was under way before the drop.
            retire(&slot);
            self.slots.invalidate(key.as_str());
        }
    }

    /// Drops every decoded copy. Called after the near tier was emptied.
    pub(crate) fn clear(&self) {
        let mut keys = lock(&self.keys);
        for (key, slot) in keys.values() {
            retire(slot);
            self.slots.invalidate(key.as_str());
        }
        keys.clear();
        self.slots.invalidate_all();
    }
}

impl Drop for TypedNear {
    /// The copies of a data cache that is gone are retired: a front then
    /// gives their places to new copies first.
    fn drop(&mut self) {
        for (_, retired) in lock(&self.keys).values() {
            retire(retired);
        }
    }
}

/// Marks a copy retired (see `Slot::retired`).
fn retire(retired: &AtomicBool) {
    retired.store(true, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Codec;

    /// Keeps `value` as `key`'s decoded copy (URL hash `url_hash`) for a
    /// minute.
    fn keep(near: &TypedNear, key: &str, url_hash: &str, value: u32) {
        keep_sized(near, key, url_hash, value, 4);
    }

    /// `keep` of a value of any type whose encoding was `encoded_bytes`
    /// long.
    fn keep_sized<T: Send + Sync + 'static>(
        near: &TypedNear,
        key: &str,
        url_hash: &str,
        value: T,
        encoded_bytes: usize,
    ) {
        let copy = NearCopy {
            id: 1,
            until: Instant::now() + Duration::from_secs(60),
        };
        assert!(near.keep::<Codec, T>(
            key,
            url_hash,
            copy,
            |_| true,
            value,
            encoded_bytes,
            0,
            60_000,
            None
        ));
    }

    fn get(near: &TypedNear, key: &str) -> Option<u32> {
        match near.get::<Codec, u32>(key, None) {
            Typed::Fresh(value) => Some(value),
            Typed::Absent => None,
        }
    }

    #[test]
    fn a_copy_this_thread_holds_is_not_served_after_a_drop() {
        let near = TypedNear::new(1 << 20);
        keep(&near, "product:1", "hash-1", 7);
        // The first read takes the copy into this thread's front, the
        // second is answered there.
        assert_eq!(get(&near, "product:1"), Some(7));
        assert_eq!(get(&near, "product:1"), Some(7));
        near.forget("hash-1");
        assert_eq!(get(&near, "product:1"), None, "served after its drop");
        keep(&near, "product:1", "hash-1", 8);
        assert_eq!(get(&near, "product:1"), Some(8));
        assert_eq!(get(&near, "product:1"), Some(8));
        // Gone from the shared cache too: `clear` still finds it.
        near.slots.invalidate("product:1");
        near.clear();
        assert_eq!(
            get(&near, "product:1"),
            None,
            "served after everything went"
        );
    }

    #[test]
    fn a_copy_dropped_while_another_thread_holds_it_is_not_served_there() {
        let near = Arc::new(TypedNear::new(1 << 20));
        keep(&near, "product:1", "hash-1", 7);
        let (ask, asked) = std::sync::mpsc::channel::<()>();
        let (answer, answers) = std::sync::mpsc::channel();
        let reader = std::thread::spawn({
            let near = Arc::clone(&near);
            move || {
                while asked.recv().is_ok() {
                    answer.send(get(&near, "product:1")).unwrap();
                }
            }
        });
        let read = || {
            ask.send(()).unwrap();
            answers.recv_timeout(Duration::from_secs(10)).unwrap()
        };
        assert_eq!(read(), Some(7));
        assert_eq!(read(), Some(7));
        near.forget("hash-1");
        assert_eq!(read(), None, "the reader's thread served a dropped copy");
        drop(ask);
        reader.join().unwrap();
    }

    #[test]
    fn each_data_cache_reads_its_own_copies() {
        let one = TypedNear::new(1 << 20);
        let two = TypedNear::new(1 << 20);
        keep(&one, "product:1", "hash-1", 1);
        keep(&two, "product:1", "hash-1", 2);
        for _ in 0..3 {
            assert_eq!(get(&one, "product:1"), Some(1));
            assert_eq!(get(&two, "product:1"), Some(2));
        }
        two.forget("hash-1");
        assert_eq!(get(&one, "product:1"), Some(1));
        assert_eq!(get(&two, "product:1"), None);
    }

    #[test]
    fn a_copy_is_read_as_the_type_it_was_kept_for() {
        let near = TypedNear::new(1 << 20);
        keep(&near, "product:1", "hash-1", 7);
        assert_eq!(get(&near, "product:1"), Some(7));
        assert!(matches!(
            near.get::<Codec, u64>("product:1", None),
            Typed::Absent
        ));
        assert!(matches!(
            near.get::<(), u32>("product:1", None),
            Typed::Absent
        ));
        assert!(matches!(
            near.get::<Codec, u32>("product:1", Some(0.5)),
            Typed::Absent
        ));
        assert_eq!(get(&near, "product:1"), Some(7));
    }

    #[test]
    fn a_threads_copies_are_bounded_by_count_and_bytes() {
        let near = TypedNear::new(64 << 20);
        for i in 0..3 * front::SLOTS {
            let key = format!("product:{i}");
            keep_sized(&near, &key, &format!("hash-{i}"), 1_u32, 12 << 10);
            assert_eq!(get(&near, &key), Some(1));
        }
        let (count, bytes) = front::held(&FRONT, near.id);
        assert_eq!(count, front::SLOTS);
        assert!(bytes <= (front::SLOTS as u64) * u64::from(front::MAX_WEIGHT));
        // A value charged more than a front copy may be is read from the
        // shared copies only.
        let before = front::held(&FRONT, near.id);
        keep_sized(
            &near,
            "large",
            "hash-large",
            2_u32,
            front::MAX_WEIGHT as usize,
        );
        assert_eq!(get(&near, "large"), Some(2));
        assert_eq!(get(&near, "large"), Some(2));
        assert_eq!(front::held(&FRONT, near.id), before);
    }

    #[test]
    fn a_thread_holds_the_keys_it_read_last() {
        let near = TypedNear::new(1 << 20);
        let keys: Vec<String> = (0..front::SLOTS + 3)
            .map(|i| format!("product:{i}"))
            .collect();
        for (i, key) in keys.iter().enumerate() {
            keep(&near, key, &format!("hash-{i}"), i as u32);
        }
        // More keys than a front holds, read twice round: each is answered
        // with its own value, whether from the front or the shared copies.
        for _ in 0..2 {
            for (i, key) in keys.iter().enumerate() {
                assert_eq!(get(&near, key), Some(i as u32), "{key}");
            }
        }
        // Read again, a key keeps its place: the thread still holds 8.
        assert_eq!(front::held(&FRONT, near.id).0, front::SLOTS);
        assert_eq!(get(&near, &keys[0]), Some(0));
        assert_eq!(front::held(&FRONT, near.id).0, front::SLOTS);
    }

    #[test]
    fn a_copy_this_thread_holds_ends_when_its_time_does() {
        let near = TypedNear::new(1 << 20);
        keep(&near, "product:1", "hash-1", 7);
        let now = Instant::now();
        assert!(matches!(
            near.get_at::<Codec, u32>("product:1", None, now),
            Typed::Fresh(7)
        ));
        assert!(matches!(
            near.get_at::<Codec, u32>("product:1", None, now),
            Typed::Fresh(7)
        ));
        let later = now + Duration::from_secs(61);
        assert!(
            matches!(
                near.get_at::<Codec, u32>("product:1", None, later),
                Typed::Absent
            ),
            "served past its end"
        );
    }

    #[test]
    fn a_copy_gone_from_the_shared_cache_is_still_dropped_everywhere() {
        let near = TypedNear::new(1 << 20);
        keep(&near, "product:1", "hash-1", 7);
        assert_eq!(get(&near, "product:1"), Some(7));
        // Evicted from the shared cache (by the byte bound, say), while this
        // thread holds it.
        near.slots.invalidate("product:1");
        assert_eq!(get(&near, "product:1"), Some(7));
        near.forget("hash-1");
        assert_eq!(get(&near, "product:1"), None, "served after its drop");
    }

    #[test]
    fn a_copy_kept_again_as_another_type_leaves_no_older_copy_to_serve() {
        let near = TypedNear::new(1 << 20);
        keep(&near, "product:1", "hash-1", 7);
        assert_eq!(get(&near, "product:1"), Some(7));
        keep_sized::<u64>(&near, "product:1", "hash-1", 8, 4);
        near.forget("hash-1");
        assert_eq!(get(&near, "product:1"), None, "the older copy was served");
    }

    #[test]
    fn a_copy_pruned_from_the_drop_index_is_retired() {
        let near = TypedNear::new(64 << 20);
        keep(&near, "product:0", "hash-0", 7);
        assert_eq!(get(&near, "product:0"), Some(7));
        for i in 1..1100 {
            keep(&near, &format!("product:{i}"), &format!("hash-{i}"), 1);
        }
        // Every copy leaves the shared cache; the next keeping prunes the
        // URL hashes that have none.
        near.slots.invalidate_all();
        near.slots.run_pending_tasks();
        keep(&near, "product:new", "hash-new", 1);
        assert!(lock(&near.keys).len() < 1100, "nothing was pruned");
        near.forget("hash-0");
        assert_eq!(get(&near, "product:0"), None, "a pruned copy was served");
    }

    /// A value whose `clone` reads the same decoded copies.
    struct Reentrant(u32);

    static REENTRANT_NEAR: std::sync::OnceLock<TypedNear> = std::sync::OnceLock::new();

    impl Clone for Reentrant {
        fn clone(&self) -> Self {
            if let Some(near) = REENTRANT_NEAR.get() {
                // A new copy each time: the read below is never a front
                // hit, so it takes the copy into the front.
                keep(near, "other", "hash-other", 1);
                assert_eq!(get(near, "other"), Some(1));
            }
            Reentrant(self.0)
        }
    }

    #[test]
    fn a_value_that_reads_the_cache_as_it_is_copied_is_served() {
        let near = REENTRANT_NEAR.get_or_init(|| TypedNear::new(1 << 20));
        keep_sized(near, "product:1", "hash-1", Reentrant(7), 4);
        for _ in 0..3 {
            match near.get::<Codec, Reentrant>("product:1", None) {
                Typed::Fresh(value) => assert_eq!(value.0, 7),
                Typed::Absent => panic!("not served"),
            }
        }
    }
}
