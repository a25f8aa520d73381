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
//! Bounded by bytes: each copy is charged its key, its URL hash and the
//! encoded size of its value (the decoded size is not measurable for an
//! arbitrary `T`; the encoding is its estimate), plus a fixed overhead,
//! within a budget as large as the near tier's own.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tower_redis_core::sync::lock;

use crate::entry::Entry;

/// The bookkeeping of one decoded copy beyond its key, URL hash and bytes.
const SLOT_OVERHEAD: usize = 160;

/// A decoded data value in the near tier.
pub(crate) struct Slot {
    /// `TypeId` of the codec and of the value's type.
    kind: (TypeId, TypeId),
    /// The eager-refresh fraction the lifetime was set for (`f64` bits).
    refresh: Option<u64>,
    value: Box<dyn Any + Send + Sync>,
    /// The near copy's entry (its body is the near copy's, shared).
    pub(crate) entry: Entry,
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
    /// URL hash → data key. Taken by every drop and by every keeping (see
    /// the module docs). Pruned of keys without a copy when it grows past
    /// twice the copies.
    keys: Mutex<HashMap<String, String>>,
}

impl TypedNear {
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            slots: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|key: &String, slot: &Arc<Slot>| {
                    u32::try_from(key.len() + slot.entry.body.len() + 43 + SLOT_OVERHEAD)
                        .unwrap_or(u32::MAX)
                })
                .build(),
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh decoded copy of `key` as a `T` through codec `C`, kept for
    /// the same eager-refresh fraction `refresh` (so that none is due).
    pub(crate) fn get<C: 'static, T: Clone + 'static>(
        &self,
        key: &str,
        refresh: Option<f64>,
    ) -> Typed<T> {
        let Some(slot) = self.slots.get(key) else {
            return Typed::Absent;
        };
        if Instant::now() >= slot.until {
            // Ended: removed here, so that it does not wait for the byte
            // bound to make room for live copies.
            self.slots.invalidate(key);
            return Typed::Absent;
        }
        if slot.kind != (TypeId::of::<C>(), TypeId::of::<T>())
            || slot.refresh != refresh.map(f64::to_bits)
        {
            return Typed::Absent;
        }
        match slot.value.downcast_ref::<T>() {
            Some(value) => Typed::Fresh(value.clone()),
            None => Typed::Absent,
        }
    }

    /// Keeps `value`, decoded from the near copy `copy` of `url_hash`, as
    /// the decoded copy of `key`, if `current` (asked under the drops' lock)
    /// says that near copy is still the one in the near tier. `age_ms`: the
    /// value's age now; `ttl_ms`: its TTL; `refresh`: the eager-refresh
    /// fraction of the reads it serves. Nothing is kept for a value that is
    /// stale or due for a refresh.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn keep<C: 'static, T: Send + Sync + 'static>(
        &self,
        key: &str,
        url_hash: &str,
        copy: NearCopy,
        current: impl FnOnce(u64) -> bool,
        value: T,
        entry: Entry,
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
            kind: (TypeId::of::<C>(), TypeId::of::<T>()),
            refresh: refresh.map(f64::to_bits),
            value: Box::new(value),
            entry,
            until,
        });
        let mut keys = lock(&self.keys);
        if !current(copy.id) {
            return false;
        }
        if keys.len() > 1024 && keys.len() as u64 > 2 * self.slots.entry_count() {
            keys.retain(|_, key| self.slots.contains_key(key.as_str()));
        }
        keys.insert(url_hash.to_owned(), key.to_owned());
        self.slots.insert(key.to_owned(), slot);
        true
    }

    /// Drops the decoded copy of the data value at `url_hash`, if any.
    /// Called after its near copy changed or went.
    pub(crate) fn forget(&self, url_hash: &str) {
        let mut keys = lock(&self.keys);
        if let Some(key) = keys.remove(url_hash) {
            self.slots.invalidate(key.as_str());
        }
    }

    /// Drops every decoded copy. Called after the near tier was emptied.
    pub(crate) fn clear(&self) {
        let mut keys = lock(&self.keys);
        for key in keys.values() {
            self.slots.invalidate(key.as_str());
        }
        keys.clear();
        self.slots.invalidate_all();
    }
}
