//! In-process stores: moka, bounded by bytes, with the same URL → variants
//! structure as Redis. One serves while Redis is unavailable; another,
//! optional, is the near cache in front of Redis.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::HeaderMap;

use std::convert::Infallible;

use super::typed::{NearCopy, TypedNear};
use super::{EntryStore, Found, LockAttempt, LockPurpose, LockToken, Put, Target};
use crate::directives::ResponseDirectives;
use crate::entry::{ADDED_FIELDS, Entry};
use crate::freshness::{self, Rules};
use crate::key;

/// An entry as a store keeps it, shared by the copies it serves; in the
/// near tier, with the directives it is served by, parsed once.
#[derive(Debug)]
struct Kept {
    entry: Entry,
    directives: Option<ResponseDirectives>,
}

#[derive(Debug, Clone)]
struct Variants {
    /// `//host/path?query`.
    url: String,
    vary: String,
    entries: HashMap<String, (Arc<Kept>, Instant)>,
    tags: Vec<String>,
    /// The last soft purge (ms since the epoch).
    soft_purged: Option<u64>,
    weight: u32,
    /// This record's identity: a new one for every change.
    id: u64,
    /// When this record was stored (its time in the store counts from then).
    stored: Instant,
}

pub(crate) struct MemoryStore {
    urls: moka::sync::Cache<String, Arc<Variants>>,
    /// How long a record lives (besides its entries' own expiry).
    time_to_live: Option<Duration>,
    next_id: AtomicU64,
    /// The near tier's decoded data values, dropped with the records they
    /// were decoded from (see `typed.rs`).
    typed: Option<Arc<TypedNear>>,
    /// The near tier's rules: each entry's directives are parsed when it
    /// is kept, not on every hit.
    rules: Option<Rules>,
}

/// What an in-process purge selects.
enum Selector<'a> {
    Tag(&'a str),
    /// A path prefix (`/products/`), or a whole URL's path and query with
    /// `exact` (`/products/1?page=2`), on any host.
    Path {
        prefix: &'a str,
        exact: bool,
    },
    All,
}

impl Selector<'_> {
    fn matches(&self, variants: &Variants) -> bool {
        match self {
            Selector::Tag(tag) => variants.tags.iter().any(|t| t == tag),
            Selector::Path { prefix, exact } => {
                let path = key::path_of(&variants.url);
                if *exact {
                    path == *prefix
                } else {
                    path.starts_with(prefix)
                }
            }
            Selector::All => true,
        }
    }
}

impl Kept {
    /// A copy of the entry to serve, its fields with room for those a
    /// response adds ([`ADDED_FIELDS`]).
    fn served(&self) -> Entry {
        let stored = &self.entry;
        let mut headers = HeaderMap::with_capacity(stored.headers.len() + ADDED_FIELDS);
        headers.extend(
            stored
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        );
        Entry {
            status: stored.status,
            headers,
            body: stored.body.clone(),
            response_time_ms: stored.response_time_ms,
            initial_age: stored.initial_age,
            lifetime: stored.lifetime,
        }
    }

    /// Its bytes: the entry's, and the directives' when kept.
    fn weight(&self) -> u32 {
        let directives = self.directives.as_ref().map_or(0, |d| {
            std::mem::size_of::<ResponseDirectives>()
                + d.no_cache_fields
                    .iter()
                    .chain(&d.private_fields)
                    .map(|f| f.len() + std::mem::size_of::<String>())
                    .sum::<usize>()
        });
        self.entry
            .weight()
            .saturating_add(u32::try_from(directives).unwrap_or(u32::MAX))
    }
}

impl MemoryStore {
    /// A store of at most `max_bytes`, whose entries live at most
    /// `time_to_live` (besides their own expiry).
    pub(crate) fn new(max_bytes: u64, time_to_live: Option<Duration>) -> Self {
        let mut builder = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &String, value: &Arc<Variants>| value.weight);
        if let Some(ttl) = time_to_live {
            builder = builder.time_to_live(ttl);
        }
        Self {
            urls: builder.build(),
            time_to_live,
            next_id: AtomicU64::new(1),
            typed: None,
            rules: None,
        }
    }

    /// The near tier: a store of at most `max_bytes`, whose records live
    /// at most `time_to_live`, keeping decoded data values beside them,
    /// and each entry's directives under the HTTP cache's `rules`.
    pub(crate) fn near(max_bytes: u64, time_to_live: Duration, rules: Option<Rules>) -> Self {
        let mut store = Self::new(max_bytes, Some(time_to_live));
        store.typed = Some(Arc::new(TypedNear::new(max_bytes)));
        store.rules = rules;
        store
    }

    /// The decoded data values, on the near tier.
    pub(crate) fn typed(&self) -> Option<&TypedNear> {
        self.typed.as_deref()
    }

    /// Drops the decoded data value decoded from `url_hash`'s record.
    fn forget_typed(&self, url_hash: &str) {
        if let Some(typed) = &self.typed {
            typed.forget(url_hash);
        }
    }

    /// The entry of a URL without `Vary` (a data value's), with which
    /// record it is and when that record leaves the store.
    pub(crate) fn find_copy(&self, url_hash: &str, variant: &str) -> Option<(Entry, NearCopy)> {
        let variants = self.urls.get(url_hash)?;
        match variants.entries.get(variant) {
            Some((kept, expires)) if *expires > Instant::now() => {
                let mut entry = kept.entry.clone();
                if let Some(at) = variants.soft_purged {
                    entry.mark_stale_at(at);
                }
                let copy = NearCopy {
                    id: variants.id,
                    until: self.until(&variants, *expires),
                };
                Some((entry, copy))
            }
            _ => None,
        }
    }

    /// Whether record `id` is still `url_hash`'s.
    pub(crate) fn is_current(&self, url_hash: &str, id: u64) -> bool {
        self.urls.get(url_hash).is_some_and(|v| v.id == id)
    }

    /// When a record's entry leaves the store: its own expiry, or the
    /// record's time to live, whichever comes first.
    fn until(&self, variants: &Variants, expires: Instant) -> Instant {
        match self.time_to_live {
            Some(ttl) => expires.min(expiry(variants.stored, ttl)),
            None => expires,
        }
    }

    pub(crate) fn find(&self, url_hash: &str, request: &HeaderMap, extra: &str) -> Found {
        self.find_kept(url_hash, request, extra, false).0
    }

    /// [`find`](Self::find), with the entry's directives when the store
    /// keeps them (the near tier).
    pub(crate) fn find_judged(
        &self,
        url_hash: &str,
        request: &HeaderMap,
        extra: &str,
    ) -> (Found, Option<ResponseDirectives>) {
        self.find_kept(url_hash, request, extra, true)
    }

    fn find_kept(
        &self,
        url_hash: &str,
        request: &HeaderMap,
        extra: &str,
        with_directives: bool,
    ) -> (Found, Option<ResponseDirectives>) {
        let Some(variants) = self.urls.get(url_hash) else {
            return (Found::NoUrl, None);
        };
        let variant = key::variant(&variants.vary, request, extra);
        match variants.entries.get(&variant) {
            Some((kept, expires)) if *expires > Instant::now() => {
                let mut entry = kept.served();
                if let Some(at) = variants.soft_purged {
                    entry.mark_stale_at(at);
                }
                let directives = kept.directives.as_ref().filter(|_| with_directives);
                (Found::Entry(entry), directives.cloned())
            }
            _ => (Found::NoVariant, None),
        }
    }

    /// Stores an entry; returns its record's identity and when it leaves
    /// the store.
    pub(crate) fn insert(&self, put: &Put) -> NearCopy {
        let now = Instant::now();
        let mut variants = self
            .urls
            .get(&put.url_hash)
            .map(|v| Variants::clone(&v))
            .unwrap_or_else(|| Variants {
                url: put.url.clone(),
                vary: put.vary.clone(),
                entries: HashMap::new(),
                tags: Vec::new(),
                soft_purged: None,
                weight: 0,
                id: 0,
                stored: now,
            });
        if variants.vary != put.vary {
            variants.entries.clear();
            variants.vary.clone_from(&put.vary);
        }
        variants.entries.retain(|_, (_, expires)| *expires > now);
        // As in Redis (`put.lua`): a partial entry never replaces a fresh
        // complete one of the same variant.
        if put.entry.is_partial()
            && let Some((stored, expires)) = variants.entries.get(&put.variant)
            && !stored.entry.is_partial()
        {
            let mut stored = stored.entry.clone();
            if let Some(at) = variants.soft_purged {
                stored.mark_stale_at(at);
            }
            if stored.ttl(tower_redis_core::clock::now_ms()) > 0 {
                // The record stays as it is.
                return NearCopy {
                    id: variants.id,
                    until: self.until(&variants, *expires),
                };
            }
        }
        let kept = Kept {
            entry: put.entry.clone(),
            // A data value has no fields: nothing to parse, nor to charge.
            directives: self
                .rules
                .as_ref()
                .filter(|_| !put.entry.headers.is_empty())
                .map(|rules| freshness::directives_of(&put.entry.headers, rules)),
        };
        variants.entries.insert(
            put.variant.clone(),
            (Arc::new(kept), expiry(now, put.keep_for)),
        );
        for tag in &put.tags {
            if !variants.tags.contains(tag) {
                variants.tags.push(tag.clone());
            }
        }
        variants.weight = variants
            .entries
            .values()
            .map(|(kept, _)| kept.weight())
            .sum::<u32>()
            .saturating_add(u32::try_from(variants.url.len()).unwrap_or(u32::MAX))
            .max(1);
        variants.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        variants.stored = now;
        let copy = NearCopy {
            id: variants.id,
            until: self.until(&variants, expiry(now, put.keep_for)),
        };
        self.urls.insert(put.url_hash.clone(), Arc::new(variants));
        self.forget_typed(&put.url_hash);
        copy
    }

    pub(crate) fn remove(&self, url_hash: &str) {
        self.urls.invalidate(url_hash);
        self.forget_typed(url_hash);
    }

    /// Removes the URLs the selector matches; returns how many.
    fn purge_selected(&self, selector: &Selector<'_>) -> u64 {
        if matches!(selector, Selector::All) {
            let count = self.urls.entry_count();
            self.clear();
            return count;
        }
        let mut count = 0;
        for (url_hash, variants) in &self.urls {
            if selector.matches(&variants) {
                self.urls.invalidate(url_hash.as_str());
                self.forget_typed(&url_hash);
                count += 1;
            }
        }
        count
    }

    /// Marks the matching URLs' entries stale as of `at_ms`; returns how many URLs.
    fn soft_purge_selected(&self, selector: &Selector<'_>, at_ms: u64) -> u64 {
        let mut count = 0;
        for (url_hash, variants) in &self.urls {
            if selector.matches(&variants) {
                let mut marked = Variants::clone(&variants);
                marked.soft_purged = Some(at_ms);
                marked.id = self.next_id.fetch_add(1, Ordering::Relaxed);
                self.urls.insert(String::clone(&url_hash), Arc::new(marked));
                self.forget_typed(&url_hash);
                count += 1;
            }
        }
        count
    }

    /// Purges (or, with `soft_at`, marks stale as of then) a target's URLs;
    /// returns how many.
    pub(crate) fn purge_target(&self, target: &Target, soft_at: Option<u64>) -> u64 {
        let selector = match target {
            Target::Tag(tag) => Selector::Tag(tag),
            Target::Prefix(prefix) => Selector::Path {
                prefix,
                exact: false,
            },
            Target::Path(path) => Selector::Path {
                prefix: path,
                exact: true,
            },
            Target::Url(url) => {
                self.remove(&key::hash_url(url));
                return 1;
            }
            Target::All => Selector::All,
        };
        match soft_at {
            None => self.purge_selected(&selector),
            Some(at) => self.soft_purge_selected(&selector, at),
        }
    }

    pub(crate) fn clear(&self) {
        self.urls.invalidate_all();
        if let Some(typed) = &self.typed {
            typed.clear();
        }
    }

    /// Entries (URLs) and bytes held, approximately.
    pub(crate) fn size(&self) -> (u64, u64) {
        self.urls.run_pending_tasks();
        (self.urls.entry_count(), self.urls.weighted_size())
    }
}

/// The in-process side of the cache's verbs: it never fails, and it has no
/// cross-instance lock to take.
impl EntryStore for MemoryStore {
    type Error = Infallible;

    async fn lookup(
        &self,
        url_hash: &str,
        request: &HeaderMap,
        extra: &str,
        _vary_hint: Option<String>,
    ) -> Result<(Found, Option<String>), Infallible> {
        Ok((self.find(url_hash, request, extra), None))
    }

    async fn put(&self, put: &Put, _unlock: Option<&LockToken>) -> Result<(), Infallible> {
        self.insert(put);
        Ok(())
    }

    async fn invalidate(&self, url_hashes: &[String]) -> Result<(), Infallible> {
        for url_hash in url_hashes {
            self.remove(url_hash);
        }
        Ok(())
    }

    async fn purge(&self, target: &Target, soft_at: Option<u64>) -> Result<u64, Infallible> {
        Ok(self.purge_target(target, soft_at))
    }

    async fn lock(
        &self,
        _url_hash: &str,
        _variant: Option<&str>,
        _purpose: LockPurpose,
    ) -> Result<LockAttempt, Infallible> {
        Ok(LockAttempt::Unavailable)
    }

    async fn unlock(&self, _lock: LockToken, _url_hash: &str) -> Result<(), Infallible> {
        Ok(())
    }
}

/// `now + keep_for`, saturating far in the future instead of overflowing.
fn expiry(now: Instant, keep_for: Duration) -> Instant {
    now.checked_add(keep_for)
        .unwrap_or_else(|| now + Duration::from_secs(10 * 365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderName, HeaderValue, StatusCode};

    fn put(headers: &[(&'static str, &'static str)]) -> Put {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_static(value));
        }
        Put {
            url_hash: key::hash_url("//shop.example/p"),
            url: "//shop.example/p".to_owned(),
            vary: String::new(),
            variant: key::variant("", &HeaderMap::new(), ""),
            entry: Entry {
                status: StatusCode::OK,
                headers: map,
                body: Bytes::from_static(b"page"),
                response_time_ms: tower_redis_core::clock::now_ms(),
                initial_age: 0,
                lifetime: 60,
            },
            keep_for: Duration::from_secs(60),
            tags: Vec::new(),
        }
    }

    /// A copy served from either store is the entry as stored: every
    /// field, repeated ones in order, and the body.
    #[test]
    fn a_served_copy_is_the_stored_entry() {
        let put = put(&[
            ("cache-control", "max-age=60"),
            ("link", "</a.css>; rel=preload"),
            ("content-type", "text/html"),
            ("link", "</b.js>; rel=preload"),
        ]);
        let near = MemoryStore::near(1 << 20, Duration::from_secs(60), None);
        let outage = MemoryStore::new(1 << 20, None);
        for store in [&near, &outage] {
            store.insert(&put);
            let Found::Entry(entry) = store.find(&put.url_hash, &HeaderMap::new(), "") else {
                panic!("the entry was just stored");
            };
            assert_eq!(entry, put.entry);
            let links: Vec<_> = entry.headers.get_all("link").iter().collect();
            assert_eq!(links, ["</a.css>; rel=preload", "</b.js>; rel=preload"]);
        }
    }

    /// The near tier keeps each entry's directives as the layer's rules
    /// read them (its targeted fields, `store_set_cookie`), and a near hit
    /// is judged by them; the outage store keeps none.
    #[test]
    fn the_near_tier_keeps_the_directives_its_rules_read() {
        let rules = Rules {
            targeted_fields: vec![HeaderName::from_static("shop-cache-control")],
            heuristic: None,
            store_set_cookie: true,
        };
        let cases: [&[(&str, &str)]; 3] = [
            &[
                ("cache-control", "no-cache"),
                ("shop-cache-control", "max-age=60"),
            ],
            &[
                ("cache-control", "max-age=60"),
                ("shop-cache-control", "no-cache"),
            ],
            &[("cache-control", "max-age=60, private=\"set-cookie\"")],
        ];
        let near = MemoryStore::near(1 << 20, Duration::from_secs(60), Some(rules.clone()));
        let outage = MemoryStore::new(1 << 20, None);
        for headers in cases {
            let put = put(headers);
            near.insert(&put);
            outage.insert(&put);
            let (found, kept) = near.find_judged(&put.url_hash, &HeaderMap::new(), "");
            assert!(matches!(found, Found::Entry(_)), "{headers:?}");
            assert_eq!(
                kept,
                Some(freshness::directives_of(&put.entry.headers, &rules)),
                "{headers:?}"
            );
            let (found, kept) = outage.find_judged(&put.url_hash, &HeaderMap::new(), "");
            assert!(matches!(found, Found::Entry(_)), "{headers:?}");
            assert_eq!(kept, None, "{headers:?}");
            // The kept directives are charged to the near tier's budget.
            let (near_bytes, outage_bytes) = (near.size().1, outage.size().1);
            assert!(
                near_bytes >= outage_bytes + std::mem::size_of::<ResponseDirectives>() as u64,
                "{headers:?}: {near_bytes} bytes near, {outage_bytes} in the outage store"
            );
        }
        // A data value (no fields) has nothing to parse.
        let data = put(&[]);
        near.insert(&data);
        assert_eq!(
            near.find_judged(&data.url_hash, &HeaderMap::new(), "").1,
            None
        );
    }
}
