//! [`BytesCache`]: a concurrent map bounded by bytes, for what a layer
//! keeps in process and reads on every request (the tracked copies of
//! [`crate::tracking`], the cache layer's `Vary` hints).
//!
//! Built on `quick_cache`: a read takes one shard's read lock and marks the
//! entry used, with no log of reads to replay and no upkeep on the read
//! path (moka, which the tracked copies used before, records every read
//! and applies the records in batches on the reading threads: most of what
//! a tracked session read cost in profiles). Eviction is CLOCK-PRO: a new
//! entry is always admitted (as cold), and entries read again (hot, up to
//! 97% of the bound) are kept over entries read once, so a flood of new
//! keys read once does not push out the copies in use.
//!
//! The bound is split between shards: the largest power of two that
//! leaves each at least 256 KiB, at most eight. An entry heavier than 97%
//! of its shard's share is not kept: this suits copies that are only a
//! shortcut (a miss reads Redis), not data kept nowhere else. Entries
//! carry no expiry.

use std::hash::Hash;
use std::sync::Arc;

pub use quick_cache::Equivalent;

/// The least share of the bound one shard has.
const SHARD_BYTES: u64 = 256 * 1024;
/// The most shards.
const MAX_SHARDS: u64 = 8;
/// An entry's expected weight, for sizing the record of recently evicted
/// keys (which lets an entry that comes back soon be kept over a new one).
const TYPICAL_ENTRY_BYTES: u64 = 512;

/// A concurrent map bounded by the weight of its entries, in bytes, as
/// `weigh` gives it (the key's and the value's, bookkeeping included).
///
/// ```
/// use tower_redis_core::bytes_cache::BytesCache;
///
/// let cache = BytesCache::new(1024, |key: &String, value: &String| {
///     key.len() + value.len() + 64
/// });
/// cache.insert("a".to_owned(), "one".to_owned());
/// assert_eq!(cache.get("a").as_deref(), Some("one"));
/// assert_eq!(cache.bytes(), 68);
/// cache.insert("big".to_owned(), "x".repeat(4096));
/// assert!(cache.get("big").is_none(), "heavier than the bound: not kept");
/// assert!(cache.bytes() <= 1024);
/// ```
pub struct BytesCache<K, V> {
    entries: quick_cache::sync::Cache<K, V, Weigh<K, V>>,
}

/// The weigher: the layer's function, in bytes.
type WeighFn<K, V> = dyn Fn(&K, &V) -> usize + Send + Sync;

struct Weigh<K, V>(Arc<WeighFn<K, V>>);

impl<K, V> Clone for Weigh<K, V> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<K, V> quick_cache::Weighter<K, V> for Weigh<K, V> {
    fn weight(&self, key: &K, value: &V) -> u64 {
        // At least 1: the cache takes a weight of 0 as "never evicted".
        u64::try_from((self.0)(key, value))
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

impl<K: Eq + Hash + Clone, V: Clone> BytesCache<K, V> {
    /// Empty, holding at most `capacity_bytes` as `weigh` counts them.
    pub fn new(
        capacity_bytes: u64,
        weigh: impl Fn(&K, &V) -> usize + Send + Sync + 'static,
    ) -> Self {
        // A power of two (the cache would round up, shrinking the shares).
        let shards = (capacity_bytes / SHARD_BYTES).clamp(1, MAX_SHARDS);
        let shards = 1_u64 << (63 - shards.leading_zeros());
        let options = quick_cache::OptionsBuilder::new()
            .shards(usize::try_from(shards).unwrap_or(1))
            // At least 32 per shard, or the cache merges its shards.
            .estimated_items_capacity(
                usize::try_from((capacity_bytes / TYPICAL_ENTRY_BYTES).max(32 * shards))
                    .unwrap_or(usize::MAX),
            )
            .weight_capacity(capacity_bytes)
            .build()
            .expect("every option is set");
        Self {
            entries: quick_cache::sync::Cache::with_options(
                options,
                Weigh(Arc::new(weigh)),
                quick_cache::DefaultHashBuilder::default(),
                quick_cache::sync::DefaultLifecycle::default(),
            ),
        }
    }

    /// The value of `key` (a clone), marked as used.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        self.entries.get(key)
    }

    /// Keeps `value` for `key` (replacing any), evicting others past the
    /// bound; not kept (and any older value of `key` removed) when heavier
    /// than 97% of its shard's share of the bound.
    pub fn insert(&self, key: K, value: V) {
        self.entries.insert(key, value);
    }

    /// Whether `key` has a value (not marked as used).
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        self.entries.contains_key(key)
    }

    /// Changes the value of `key` in place with `change`, atomically (no
    /// other change of `key` lands between its read and its write); nothing
    /// when `key` has no value. For changes that keep the entry's weight:
    /// the weight is counted again after, but nothing is evicted for a
    /// heavier value (use [`insert`](Self::insert) to grow one).
    pub fn update<Q>(&self, key: &Q, change: impl FnOnce(&mut V))
    where
        Q: Hash + Equivalent<K> + ToOwned<Owned = K> + ?Sized,
    {
        // Most keys asked for have no value: a read lock, not a write one.
        if !self.entries.contains_key(key) {
            return;
        }
        // No wait for a value being loaded (nothing here loads one).
        let _: quick_cache::sync::EntryResult<'_, K, V, _, _, _, ()> =
            self.entries
                .entry(key, Some(std::time::Duration::ZERO), |_, value| {
                    change(value);
                    quick_cache::sync::EntryAction::Retain(())
                });
    }

    /// Keeps `value` for `key` unless `key` already has one, atomically.
    pub fn insert_if_absent<Q>(&self, key: &Q, value: V)
    where
        Q: Hash + Equivalent<K> + ToOwned<Owned = K> + ?Sized,
    {
        // Usually there: a read lock, not a write one.
        if self.entries.contains_key(key) {
            return;
        }
        let found = self
            .entries
            .entry(key, Some(std::time::Duration::ZERO), |_, _| {
                quick_cache::sync::EntryAction::Retain(())
            });
        if let quick_cache::sync::EntryResult::Vacant(slot) = found {
            // Refused only when too heavy to keep at all.
            let _ = slot.insert(value);
        }
    }

    /// How many entries there are now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Removes `key`, returning its value.
    pub fn remove<Q>(&self, key: &Q) -> Option<V>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        self.entries.remove(key).map(|(_, value)| value)
    }

    /// Removes `key` if `remove` says so of its value, atomically (a value
    /// inserted meanwhile is not removed unseen).
    pub fn remove_if<Q>(&self, key: &Q, remove: impl FnOnce(&V) -> bool) -> Option<V>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        self.entries.remove_if(key, remove).map(|(_, value)| value)
    }

    /// Removes every entry.
    pub fn clear(&self) {
        self.entries.clear();
    }

    /// The weight of the entries now, in bytes.
    pub fn bytes(&self) -> u64 {
        self.entries.weight()
    }

    /// The bound, in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.entries.capacity()
    }

    /// The entries now (clones), for the rare walks over all of them.
    pub fn entries(&self) -> impl Iterator<Item = (K, V)> + '_ {
        self.entries.iter()
    }
}

impl<K, V> std::fmt::Debug for BytesCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BytesCache").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::BytesCache;

    #[allow(clippy::ptr_arg)] // the cache's key and value types
    fn weigh(key: &String, value: &String) -> usize {
        key.len() + value.len()
    }

    /// However many entries are put in, the weight stays within the bound,
    /// and the newest entry is kept (admitted, not refused for the old).
    #[test]
    fn the_bound_holds_and_a_new_entry_is_admitted() {
        for capacity in [1024_u64, 64 * 1024, 4 << 20] {
            let cache: BytesCache<String, String> = BytesCache::new(capacity, weigh);
            for n in 0..20_000 {
                let key = format!("key-{n:08}");
                cache.insert(key.clone(), "v".repeat(100));
                assert!(cache.bytes() <= capacity, "{} > {capacity}", cache.bytes());
                assert!(cache.get(key.as_str()).is_some(), "entry {n} was refused");
            }
            assert_eq!(cache.capacity_bytes(), capacity);
        }
    }

    /// An entry read again survives a flood of entries read once.
    #[test]
    fn an_entry_in_use_outlives_a_flood() {
        let cache: BytesCache<String, String> = BytesCache::new(64 * 1024, weigh);
        cache.insert("used".to_owned(), "u".repeat(100));
        for n in 0..10_000 {
            assert!(cache.get("used").is_some(), "evicted after {n} others");
            cache.insert(format!("flood-{n:08}"), "f".repeat(100));
        }
    }

    /// `update` changes a value in place and makes none; `insert_if_absent`
    /// keeps a value already there.
    #[test]
    fn update_changes_only_a_value_there_and_insert_if_absent_keeps_one() {
        let cache: BytesCache<String, String> = BytesCache::new(1024, weigh);
        cache.update("absent", |value| value.push('!'));
        assert!(!cache.contains_key("absent"));
        cache.insert("k".to_owned(), "old".to_owned());
        cache.update("k", |value| value.push_str("er"));
        assert_eq!(cache.get("k").as_deref(), Some("older"));
        assert_eq!(cache.bytes(), 6, "weighed again after the change");
        cache.insert_if_absent("k", "new".to_owned());
        assert_eq!(cache.get("k").as_deref(), Some("older"));
        cache.insert_if_absent("fresh", "v".to_owned());
        assert_eq!(cache.get("fresh").as_deref(), Some("v"));
        assert_eq!(cache.len(), 2);
    }

    /// `remove_if` leaves a value it was not asked to remove.
    #[test]
    fn remove_if_removes_only_what_it_is_asked_to() {
        let cache: BytesCache<String, String> = BytesCache::new(1024, weigh);
        cache.insert("k".to_owned(), "new".to_owned());
        assert_eq!(cache.remove_if("k", |v| v == "old"), None);
        assert_eq!(cache.get("k").as_deref(), Some("new"));
        assert_eq!(cache.remove_if("k", |v| v == "new").as_deref(), Some("new"));
        assert_eq!(cache.get("k"), None);
        cache.insert("a".to_owned(), "1".to_owned());
        cache.clear();
        assert_eq!(cache.bytes(), 0);
        assert_eq!(cache.entries().count(), 0);
    }
}
