//! Finding the entry a request selects: the near cache first, then Redis
//! (one round trip, `Vary` resolution included) or, while Redis is
//! unavailable, the in-process store. The `Vary` hints remember each URL's
//! `Vary` names (or that it is absent and its answer not storable) so that
//! a Redis lookup is a plain `HMGET`; the lookup script resolves the variant
//! in Redis for a URL without a hint, and (a second round trip) for one
//! whose `Vary` is no longer the hinted one.

use std::time::Duration;

use http::HeaderMap;
use tower_redis_core::Served;
use tower_redis_core::redis;

use super::{CacheStore, EntryStore, Found, LARGE_ENTRY_BYTES, Lookup, Put, Tier, VaryHint};
use crate::directives::ResponseDirectives;
use crate::entry::Entry;
use crate::key;

impl CacheStore {
    /// One round trip (Vary resolution included; two when this instance's
    /// `Vary` hint is wrong), none from the near cache.
    pub(crate) fn lookup<'a>(
        &'a self,
        url_hash: &'a str,
        request: &'a HeaderMap,
        extra: &'a str,
    ) -> impl Future<Output = (Lookup, Tier)> + Send + 'a {
        self.lookup_after(url_hash, request, extra, false, false)
    }

    /// [`lookup`](Self::lookup) for a request that looks again: when
    /// Redis already failed it (`waited`: see
    /// [`waited_in_vain`](Self::waited_in_vain)) and still hangs, the
    /// in-process store answers at once; once an operation has succeeded
    /// since, the lookup is a plain one (the outage's queue written first).
    pub(crate) fn look_again<'a>(
        &'a self,
        url_hash: &'a str,
        request: &'a HeaderMap,
        extra: &'a str,
        waited: bool,
    ) -> impl Future<Output = (Lookup, Tier)> + Send + 'a {
        self.lookup_after(url_hash, request, extra, false, waited)
    }

    /// What the near tier holds for a request, read at once, without a
    /// look at Redis: what a lookup that starts now would find there.
    /// `None` when it was not read: there is no near tier, it cannot be
    /// trusted now, or an outage's writes are still to be caught up with
    /// (the lookup waits for them). An entry comes with the directives it
    /// is served by, parsed when it was kept.
    pub(crate) fn find_near(
        &self,
        url_hash: &str,
        request: &HeaderMap,
        extra: &str,
    ) -> Option<(Found, Option<ResponseDirectives>)> {
        self.bus.ensure_started();
        if !self.failover.is_caught_up() {
            return None;
        }
        let near = self.near.as_ref().filter(|_| self.bus.near_usable())?;
        Some(near.find_judged(url_hash, request, extra))
    }

    /// [`lookup`](Self::lookup); with `near_read`, after
    /// [`find_near`](Self::find_near) read the near tier and found no entry
    /// there, which is not read again.
    pub(crate) async fn lookup_after(
        &self,
        url_hash: &str,
        request: &HeaderMap,
        extra: &str,
        near_read: bool,
        waited: bool,
    ) -> (Lookup, Tier) {
        self.bus.ensure_started();
        // Redis is back: the outage's invalidations and purges are written
        // before this read, so that its answer already reflects them. One
        // atomic load while healthy. (Not for a request Redis failed while
        // it still hangs: `look_again`.)
        let caught_up = if waited && self.hangs() {
            false
        } else {
            self.failover.catch_up().await
        };
        // Taken before the near tier is judged usable: a tracking
        // connection lost after that check bumps the epoch, so a read that
        // then fell back to the pool (untracked) is not kept.
        let epoch = self.bus.epoch();
        // For a mark set below (a mark is checked against the trust now).
        let trust = self.bus.trust();
        let near = self.near.as_ref().filter(|_| self.bus.near_usable());
        if let Some(near) = near
            && !near_read
            && let Found::Entry(entry) = near.find(url_hash, request, extra)
        {
            return (Lookup::Hit(entry), Tier::Near);
        }
        let previous_hint = self.vary_hints.get(url_hash);
        // Known absent from Redis, and nothing written to it since: a miss
        // with no round trip.
        if near.is_some()
            && previous_hint
                .as_ref()
                .is_some_and(|hint| hint.is_known_absent(self.bus.trust()))
        {
            return (Lookup::UriMiss, Tier::Near);
        }
        let hinted_absent = previous_hint.as_ref().is_some_and(VaryHint::is_absent);
        let hint = previous_hint.as_ref().map(|hint| hint.names().to_owned());
        let alone = previous_hint.as_ref().is_some_and(VaryHint::is_large);
        // The Redis read is boxed apart: inlined, it made the future of
        // every request the cache handles (boxed by the service) larger
        // than the allocator's per-thread cache takes.
        let served =
            Box::pin(self.read_served(url_hash, request, extra, hint, alone, caught_up)).await;
        let tier = if served.is_fallback() {
            Tier::Degraded
        } else {
            Tier::Redis
        };
        let (found, vary_seen) = served.value;
        // Whether the URL's entries are large. A lookup only raises the
        // mark (a store sets it either way): the variants of one URL may
        // differ in size (a compressed one and a plain one), and a mark
        // that followed each lookup would be rewritten at every turn. An
        // absent variant says nothing of its siblings' size.
        let large =
            alone || matches!(&found, Found::Entry(entry) if entry.weight() > LARGE_ENTRY_BYTES);
        self.update_vary_hint(url_hash, previous_hint, vary_seen.as_deref(), large, tier);
        let lookup = match found {
            Found::Entry(entry) => {
                // An entry read from a replica may already be purged on
                // the primary: it is not kept in the near tier, where it
                // would outlive the replica's lag.
                if let (Some(near), Some(vary), Tier::Redis) = (near, vary_seen, tier)
                    && !self.read_from_replicas
                    && self.bus.epoch() == epoch
                {
                    let put = near_put(url_hash, request, extra, vary, &entry);
                    self.bus
                        .keep_at(epoch, || near.insert(&put), || near.remove(url_hash));
                }
                Lookup::Hit(entry)
            }
            Found::NoUrl => {
                // A URL hinted absent (its answers are not storable), read
                // on the tracking connection and found absent again: Redis
                // now tells this instance when any instance writes it, so
                // until then its lookups need no round trip. The same
                // checks as a near copy's, around the same race.
                if let (Some(near), true, Tier::Redis, Some(_)) =
                    (near, hinted_absent, tier, self.bus.tracking())
                    && self.bus.epoch() == epoch
                {
                    // As a near copy, the mark lives at most the tier's TTL.
                    let mark = VaryHint::KnownAbsent {
                        trust,
                        until: std::time::Instant::now() + near.time_to_live().unwrap_or_default(),
                    };
                    // Only over a hint that still says absent: a
                    // concurrent store's names stay.
                    let keep = || {
                        self.vary_hints.update(url_hash, |hint| {
                            if hint.is_absent() {
                                *hint = mark;
                            }
                        });
                    };
                    self.bus
                        .keep_at(epoch, keep, || self.bus.end_known_absence(url_hash));
                }
                Lookup::UriMiss
            }
            Found::NoVariant => Lookup::VaryMiss,
            Found::Corrupt(field) => {
                tracing::warn!(target: "tower_redis_cache", "deleting a corrupt or foreign cache entry");
                let key = self.redis().redis_key(url_hash);
                let mut delete = redis::cmd("HDEL");
                delete.arg(&key).arg(field);
                // Boxed, as the read: this rare command's future would
                // otherwise be part of every lookup's.
                let _ = Box::pin(self.redis().manager.query::<()>(&delete)).await;
                Lookup::VaryMiss
            }
        };
        (lookup, tier)
    }

    /// What a lookup finds in Redis, else (Redis unavailable) in the
    /// in-process store, and the `Vary` names seen. With `alone`, a hinted
    /// read is not gathered with others (the URL's entry is large).
    pub(crate) fn read_served<'a>(
        &'a self,
        url_hash: &'a str,
        request: &'a HeaderMap,
        extra: &'a str,
        hint: Option<String>,
        alone: bool,
        caught_up: bool,
    ) -> impl Future<Output = Served<(Found, Option<String>)>> + 'a {
        self.failover.run_caught_up(
            caught_up,
            move |redis| self.read_entry(redis, url_hash, request, extra, hint, alone),
            // Boxed: only a lookup during an outage pays for its state.
            move |memory, _| {
                Box::pin(async move {
                    let Ok(found) = memory.lookup(url_hash, request, extra, None).await;
                    found
                })
            },
        )
    }

    /// Records the `Vary` names a lookup saw and whether the URL's entries
    /// are `large`, written only when they change: a cache write costs
    /// more than a read. A URL found absent loses its names; one this
    /// instance marked absent ([`remember_absent`](Self::remember_absent))
    /// stays so.
    pub(super) fn update_vary_hint(
        &self,
        url_hash: &str,
        previous: Option<VaryHint>,
        seen: Option<&str>,
        large: bool,
        tier: Tier,
    ) {
        match (seen, previous) {
            (Some(vary), Some(VaryHint::Vary { names, large: was })) if names == vary => {
                if large && !was {
                    // Raised only over the hint this lookup started from: a
                    // store's or another lookup's newer hint stays.
                    self.vary_hints.update(url_hash, |hint| {
                        if let VaryHint::Vary { names, large } = hint
                            && names == vary
                        {
                            *large = true;
                        }
                    });
                }
            }
            (Some(vary), _) => self.vary_hints.insert(
                url_hash.to_owned(),
                VaryHint::Vary {
                    names: vary.to_owned(),
                    large,
                },
            ),
            (None, Some(VaryHint::Vary { .. })) if tier == Tier::Redis => {
                self.vary_hints.remove(url_hash);
            }
            (None, _) => {}
        }
    }

    /// Marks a URL that a Redis lookup found absent, and whose answer was
    /// then not stored because of the answer itself (a private page, say),
    /// as absent: its next lookups read the variant a response without
    /// `Vary` has in a plain `HMGET` instead of running the lookup script,
    /// which sends a digest of every request header. Such a URL usually
    /// stays absent; should it be stored with `Vary` later, one lookup
    /// runs the script as well (two round trips) and the hint follows.
    /// A hint already there is kept.
    pub(crate) fn remember_absent(&self, url_hash: &str) {
        self.vary_hints.insert_if_absent(url_hash, VaryHint::Absent);
    }
}

/// Copies an entry read from Redis into the near cache.
fn near_put(url_hash: &str, request: &HeaderMap, extra: &str, vary: String, entry: &Entry) -> Put {
    Put {
        url_hash: url_hash.to_owned(),
        url: String::new(),
        variant: key::variant(&vary, request, extra),
        vary,
        entry: entry.clone(),
        keep_for: Duration::from_secs(u64::from(u32::MAX)),
        tags: Vec::new(),
        asked: None,
    }
}
