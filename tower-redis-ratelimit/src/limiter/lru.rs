//! A map bounded by bytes that evicts its least recently used entry, for
//! the in-process state a client can grow (the local limiter's counters
//! and the blocked-key cache).
//!
//! Every operation is O(1) amortised: a hash lookup and a few index
//! updates in a doubly linked list kept in a slab. It is not synchronised;
//! its owners keep it behind the mutex their decisions need anyway.
//!
//! Why not moka: both owners already hold a mutex around each decision
//! (the local limiter must read and write several counters all or none),
//! and under it this map keeps the bound exactly at every moment, where
//! moka applies its bound in batched upkeep; it is also about ten times
//! faster in unoptimised builds, which keeps the million-key tests short.

use std::collections::HashMap;
use std::sync::Arc;

const NIL: usize = usize::MAX;

/// What a key's shared allocation costs besides its bytes: the reference
/// counts, rounding up, and the allocator's own bookkeeping.
const KEY_ALLOCATION_OVERHEAD: usize = 48;

/// How many expired entries at the old end one insert removes, so that
/// entries nobody asks for again leave without waiting for eviction.
const PRUNE_PER_INSERT: usize = 2;

pub(crate) struct Lru<V> {
    index: HashMap<Arc<str>, usize>,
    slots: Vec<Slot<V>>,
    /// Slots of removed entries, reused before the slab grows.
    free: Vec<usize>,
    /// Most recently used.
    head: usize,
    /// Least recently used: the next to be evicted.
    tail: usize,
    bytes: u64,
    max_bytes: u64,
}

struct Slot<V> {
    /// `None` in a free slot.
    key: Option<Arc<str>>,
    value: V,
    weight: u32,
    prev: usize,
    next: usize,
}

impl<V> Lru<V> {
    /// An empty map that will hold at most `max_bytes` (see [`Lru::weight`]).
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            bytes: 0,
            max_bytes,
        }
    }

    /// The bytes an entry under `key` is counted for: the key's allocation,
    /// and twice its slab slot, its index bucket (at the index's load
    /// factor of 7/8) and its free-list slot, since the slab and the index
    /// grow by doubling. So the memory the map holds stays within its bound
    /// whatever its history.
    pub(crate) fn weight(key: &str) -> u64 {
        let slot = size_of::<Slot<V>>();
        let bucket = (size_of::<(Arc<str>, usize)>() + 1) * 8 / 7 + 1;
        let free = size_of::<usize>();
        (key.len() + KEY_ALLOCATION_OVERHEAD + 2 * (slot + bucket + free)) as u64
    }

    /// The value under `key` when `live` says it still counts; it becomes
    /// the most recently used. A value that no longer counts is removed.
    pub(crate) fn get(&mut self, key: &str, live: impl Fn(&V) -> bool) -> Option<&V> {
        let slot = *self.index.get(key)?;
        if !live(&self.slots[slot].value) {
            self.remove_slot(slot);
            return None;
        }
        self.unlink(slot);
        self.push_front(slot);
        Some(&self.slots[slot].value)
    }

    /// Stores `value` under `key` as the most recently used entry, evicting
    /// the least recently used ones until it fits. Also drops a few entries
    /// at the old end that `live` says no longer count.
    ///
    /// `key` is taken as it is when it is already shared (an `Arc<str>`),
    /// and copied once otherwise, only when it is new here.
    pub(crate) fn insert(
        &mut self,
        key: impl AsRef<str> + Into<Arc<str>>,
        value: V,
        live: impl Fn(&V) -> bool,
    ) {
        if let Some(&slot) = self.index.get(key.as_ref()) {
            self.slots[slot].value = value;
            self.unlink(slot);
            self.push_front(slot);
            return;
        }
        for _ in 0..PRUNE_PER_INSERT {
            if self.tail == NIL || live(&self.slots[self.tail].value) {
                break;
            }
            self.remove_slot(self.tail);
        }
        let weight = Self::weight(key.as_ref());
        if weight > self.max_bytes {
            return;
        }
        while self.bytes + weight > self.max_bytes && self.tail != NIL {
            self.remove_slot(self.tail);
        }
        let key: Arc<str> = key.into();
        let slot = Slot {
            key: Some(Arc::clone(&key)),
            value,
            weight: u32::try_from(weight).unwrap_or(u32::MAX),
            prev: NIL,
            next: NIL,
        };
        let slot = match self.free.pop() {
            Some(free) => {
                self.slots[free] = slot;
                free
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.push_front(slot);
        self.index.insert(key, slot);
        self.bytes += weight;
    }

    /// Stores `value` under `key` as the most recently used entry, like
    /// [`Lru::insert`], and hands back the entries evicted to make room
    /// (their owner may still have something to do with them).
    pub(crate) fn insert_evicting(
        &mut self,
        key: impl AsRef<str> + Into<Arc<str>>,
        value: V,
    ) -> Vec<(Arc<str>, V)>
    where
        V: Clone,
    {
        let mut evicted = Vec::new();
        if !self.index.contains_key(key.as_ref()) {
            let weight = Self::weight(key.as_ref());
            while self.bytes + weight > self.max_bytes && self.tail != NIL {
                evicted.extend(self.take_slot(self.tail));
            }
        }
        self.insert(key, value, |_| true);
        evicted
    }

    /// The value under `key`, made the most recently used, to change in place.
    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        let slot = *self.index.get(key)?;
        self.unlink(slot);
        self.push_front(slot);
        Some(&mut self.slots[slot].value)
    }

    /// Removes and returns the least recently used entry when `old` says so.
    pub(crate) fn pop_oldest_if(&mut self, old: impl Fn(&V) -> bool) -> Option<(Arc<str>, V)>
    where
        V: Clone,
    {
        if self.tail == NIL || !old(&self.slots[self.tail].value) {
            return None;
        }
        self.take_slot(self.tail)
    }

    /// Removes and returns every entry.
    pub(crate) fn drain(&mut self) -> Vec<(Arc<str>, V)>
    where
        V: Clone,
    {
        let mut all = Vec::with_capacity(self.index.len());
        while self.tail != NIL {
            all.extend(self.take_slot(self.tail));
        }
        *self = Self::new(self.max_bytes);
        all
    }

    fn take_slot(&mut self, slot: usize) -> Option<(Arc<str>, V)>
    where
        V: Clone,
    {
        let key = self.slots[slot].key.clone()?;
        let value = self.slots[slot].value.clone();
        self.remove_slot(slot);
        Some((key, value))
    }

    /// Forgets every entry and gives their memory back.
    #[cfg(test)]
    pub(crate) fn clear(&mut self) {
        *self = Self::new(self.max_bytes);
    }

    /// How many entries are held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// The bytes the held entries are counted for; never above the bound.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The heap memory the map holds now, counted from its capacities: the
    /// slab, the free list, the index (one control byte per bucket) and
    /// each key's shared allocation (header and bytes, rounded up to 8).
    #[cfg(test)]
    pub(crate) fn allocated_bytes(&self) -> u64 {
        let keys: usize = self
            .index
            .keys()
            .map(|key| 16 + key.len().div_ceil(8) * 8)
            .sum();
        let total = self.slots.capacity() * size_of::<Slot<V>>()
            + self.free.capacity() * size_of::<usize>()
            + self.index.capacity() * (size_of::<(Arc<str>, usize)>() + 1)
            + keys;
        total as u64
    }

    fn remove_slot(&mut self, slot: usize) {
        self.unlink(slot);
        if let Some(key) = self.slots[slot].key.take() {
            self.index.remove(&*key);
        }
        self.bytes -= u64::from(self.slots[slot].weight);
        self.free.push(slot);
    }

    fn unlink(&mut self, slot: usize) {
        let (prev, next) = (self.slots[slot].prev, self.slots[slot].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next].prev = prev;
        }
        self.slots[slot].prev = NIL;
        self.slots[slot].next = NIL;
    }

    fn push_front(&mut self, slot: usize) {
        self.slots[slot].next = self.head;
        self.slots[slot].prev = NIL;
        if self.head != NIL {
            self.slots[self.head].prev = slot;
        }
        self.head = slot;
        if self.tail == NIL {
            self.tail = slot;
        }
    }
}

impl<V> std::fmt::Debug for Lru<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lru")
            .field("entries", &self.index.len())
            .field("bytes", &self.bytes)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn always(_: &u32) -> bool {
        true
    }

    #[test]
    fn the_least_recently_used_entry_is_evicted_at_the_bound() {
        let weight = Lru::<u32>::weight("k0");
        let mut lru = Lru::new(3 * weight);
        lru.insert("k0", 0, always);
        lru.insert("k1", 1, always);
        lru.insert("k2", 2, always);
        // k0 is used again: k1 is now the oldest.
        assert_eq!(lru.get("k0", always), Some(&0));
        lru.insert("k3", 3, always);
        assert_eq!(lru.len(), 3);
        assert_eq!(lru.bytes(), 3 * weight);
        assert_eq!(lru.get("k1", always), None);
        for (key, value) in [("k0", 0), ("k2", 2), ("k3", 3)] {
            assert_eq!(lru.get(key, always), Some(&value), "{key}");
        }
    }

    #[test]
    fn replacing_a_value_keeps_the_weight_and_freshens_it() {
        let weight = Lru::<u32>::weight("a");
        let mut lru = Lru::new(2 * weight);
        lru.insert("a", 1, always);
        lru.insert("b", 2, always);
        lru.insert("a", 10, always);
        assert_eq!(lru.bytes(), 2 * weight);
        lru.insert("c", 3, always);
        assert_eq!(lru.get("a", always), Some(&10));
        assert_eq!(lru.get("b", always), None);
    }

    #[test]
    fn entries_that_no_longer_count_are_removed_on_read_and_at_the_old_end() {
        let mut lru = Lru::new(1 << 20);
        for i in 0..4 {
            lru.insert(format!("k{i}").as_str(), i, always);
        }
        let live = |v: &u32| *v >= 2;
        assert_eq!(lru.get("k3", live), Some(&3));
        // k0 and k1 (the oldest) no longer count: the next insert drops them.
        lru.insert("k4", 4, live);
        assert_eq!(lru.len(), 3);
        assert_eq!(lru.get("k2", |_| false), None);
        assert_eq!(lru.len(), 2);
        assert_eq!(lru.bytes(), 2 * Lru::<u32>::weight("k3"));
    }

    #[test]
    fn an_entry_larger_than_the_bound_is_not_stored_and_clear_forgets_all() {
        let mut lru = Lru::new(Lru::<u32>::weight("k") + 1);
        lru.insert("x".repeat(100).as_str(), 1, always);
        assert_eq!(lru.len(), 0);
        lru.insert("k", 1, always);
        assert_eq!(lru.len(), 1);
        lru.clear();
        assert_eq!((lru.len(), lru.bytes()), (0, 0));
        lru.insert("k", 2, always);
        assert_eq!(lru.get("k", always), Some(&2));
    }
}
