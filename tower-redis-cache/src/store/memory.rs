//! In-process stores: moka, bounded by bytes, with the same URL → variants
//! structure as Redis. One serves while Redis is unavailable; another,
//! optional, is the near cache in front of Redis.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};

use std::convert::Infallible;

use super::front;
use super::typed::{NearCopy, TypedNear};
use super::{EntryStore, Found, LockAttempt, LockPurpose, LockToken, MAX_VARIANTS, Put, Target};
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
    /// Bumped after every change this store makes to `urls` (a record
    /// stored, replaced or removed, a purge, everything emptied). A thread's
    /// own copy of a record ([`LocalRecord`]) is served only while the
    /// generation is the one read before the record was: so a read that
    /// starts after a change has returned never finds a copy from before
    /// it, on any thread.
    generation: Arc<AtomicU64>,
    /// Names this store's copies in the threads' fronts: the near tier's
    /// only.
    front_owner: Option<u64>,
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

    /// What a lookup finds: a copy to serve, stale as of the record's soft
    /// purge if it had one, and the directives when they are asked for.
    fn found(
        &self,
        soft_purged: Option<u64>,
        with_directives: bool,
    ) -> (Found, Option<ResponseDirectives>) {
        let mut entry = self.served();
        if let Some(at) = soft_purged {
            entry.mark_stale_at(at);
        }
        let directives = self.directives.as_ref().filter(|_| with_directives);
        (Found::Entry(entry), directives.cloned())
    }

    /// A copy whose fields and body are in buffers of its own, not slices
    /// of the ones the stored entry shares.
    fn local_copy(&self) -> Kept {
        let stored = &self.entry;
        let mut headers = HeaderMap::with_capacity(stored.headers.len() + ADDED_FIELDS);
        for (name, value) in &stored.headers {
            let name =
                HeaderName::from_bytes(name.as_str().as_bytes()).unwrap_or_else(|_| name.clone());
            let copied = match HeaderValue::from_bytes(value.as_bytes()) {
                Ok(mut copied) => {
                    copied.set_sensitive(value.is_sensitive());
                    copied
                }
                Err(_) => value.clone(),
            };
            headers.append(name, copied);
        }
        Kept {
            entry: Entry {
                status: stored.status,
                headers,
                body: bytes::Bytes::copy_from_slice(&stored.body),
                response_time_ms: stored.response_time_ms,
                initial_age: stored.initial_age,
                lifetime: stored.lifetime,
            },
            directives: self.directives.clone(),
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

thread_local! {
    /// This thread's copies of near records (`front.rs`).
    static RECORDS: std::cell::RefCell<front::Front<LocalRecord>> =
        const { std::cell::RefCell::new(front::Front::new()) };
}

/// A thread's own copy of a near record, held in its front: a hot URL read
/// on every core then writes no memory the cores share (the cache's
/// records of reads, the record's reference count, the reference counts of
/// the buffers its fields and body are slices of).
///
/// Served only while the store's generation is the one read before the
/// record was (see `MemoryStore::generation`), and each entry only until
/// it leaves the store. Its buffers are the thread's own: copied once, when
/// it is kept.
struct LocalRecord {
    url_hash: Box<str>,
    /// The record's identity (a new one for every change).
    id: u64,
    /// The store's generation when the record was last read as current,
    /// and the store's counter.
    generation: Cell<u64>,
    current: Arc<AtomicU64>,
    vary: String,
    soft_purged: Option<u64>,
    /// Each variant's entry, and when it leaves the store.
    entries: Vec<(String, Kept, Instant)>,
    /// What the copy holds: the record's charge, and the bookkeeping of its
    /// own copies of fields and variants (see [`LOCAL_OVERHEAD`]).
    weight: u32,
}

/// What a thread's copy holds beyond a record's charge: per field (its own
/// value buffer and map slot) and per variant (its key, entry and map).
const LOCAL_OVERHEAD: (usize, usize) = (64, 256);

impl LocalRecord {
    fn of(store: &MemoryStore, url_hash: &str, variants: &Variants, generation: u64) -> Self {
        let entries: Vec<(String, Kept, Instant)> = variants
            .entries
            .iter()
            .map(|(variant, (kept, expires))| {
                (
                    variant.clone(),
                    kept.local_copy(),
                    store.until(variants, *expires),
                )
            })
            .collect();
        Self {
            url_hash: url_hash.into(),
            id: variants.id,
            generation: Cell::new(generation),
            current: Arc::clone(&store.generation),
            vary: variants.vary.clone(),
            soft_purged: variants.soft_purged,
            entries,
            weight: Self::weight_of(variants),
        }
    }

    /// What a copy of `variants` is charged.
    fn weight_of(variants: &Variants) -> u32 {
        let (per_field, per_variant) = LOCAL_OVERHEAD;
        let overhead: usize = variants
            .entries
            .iter()
            .map(|(variant, (kept, _))| {
                per_variant + variant.len() + per_field * kept.entry.headers.len()
            })
            .sum();
        variants
            .weight
            .saturating_add(u32::try_from(overhead).unwrap_or(u32::MAX))
    }

    /// What a read of the store at `generation` finds in this copy; `None`
    /// when the copy is out of date, or has no live entry for the request
    /// (the store is read then).
    fn find(
        &self,
        generation: u64,
        request: &HeaderMap,
        extra: &str,
        with_directives: bool,
        now: Instant,
    ) -> Option<(Found, Option<ResponseDirectives>)> {
        if self.generation.get() != generation {
            return None;
        }
        let variant = key::variant_of(&self.vary, request, extra);
        let (_, kept, until) = self.entries.iter().find(|(v, ..)| *v == *variant)?;
        if *until <= now {
            return None;
        }
        Some(kept.found(self.soft_purged, with_directives))
    }

    /// Marks this copy current at `generation` if it is a copy of record
    /// `id`, read as the current one at that generation (records are never
    /// changed in place: a change makes a new record with a new identity).
    /// Whether it was.
    fn renew(&self, id: u64, generation: u64) -> bool {
        let same = self.id == id;
        if same {
            self.generation.set(generation);
        }
        same
    }
}

impl front::FrontCopy for LocalRecord {
    fn key(&self) -> &str {
        &self.url_hash
    }

    fn weight(&self) -> u32 {
        self.weight
    }

    fn is_spent(&self) -> bool {
        self.generation.get() != self.current.load(Ordering::Relaxed)
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
            generation: Arc::new(AtomicU64::new(0)),
            front_owner: None,
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
        store.front_owner = Some(front::owner_id());
        store
    }

    /// How long a record lives at most (besides its entries' own expiry).
    pub(crate) fn time_to_live(&self) -> Option<Duration> {
        self.time_to_live
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
        // Read before the record: a change after this makes the copy kept
        // below one that is not served.
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(owner) = self.front_owner
            && let Some(found) = front::get(&RECORDS, owner, url_hash, |copy| {
                copy.find(generation, request, extra, with_directives, Instant::now())
            })
        {
            return found;
        }
        let Some(variants) = self.urls.get(url_hash) else {
            return (Found::NoUrl, None);
        };
        let variant = key::variant_of(&variants.vary, request, extra);
        let found = match variants.entries.get(&*variant) {
            Some((kept, expires)) if *expires > Instant::now() => {
                kept.found(variants.soft_purged, with_directives)
            }
            _ => return (Found::NoVariant, None),
        };
        if let Some(owner) = self.front_owner {
            // A copy of this same record, out of date only because the
            // store changed elsewhere, is marked current again instead of
            // being copied anew: writes to other URLs do not make every hit
            // copy its record.
            let renewed = front::get(&RECORDS, owner, url_hash, |copy| {
                copy.renew(variants.id, generation).then_some(())
            });
            if renewed.is_none() && LocalRecord::weight_of(&variants) <= front::MAX_WEIGHT {
                let copy = LocalRecord::of(self, url_hash, &variants, generation);
                front::keep(&RECORDS, owner, copy);
            }
        }
        found
    }

    /// Marks a change of `urls`, made before this is called. Never before
    /// the change: a read that loads the new generation must find the
    /// change in `urls`, or it would keep a copy of the old record marked
    /// current at the new generation. (No test interleaves a read between
    /// a change and its mark; keep every call after its change.)
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
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
        // As in Redis (`put.lua`): past the most variants a URL keeps, its
        // entries start over, so a store stays O(MAX_VARIANTS) and one URL
        // whose `Vary` clients drive cannot fill the store.
        if !variants.entries.contains_key(&put.variant)
            && variants.entries.len() >= MAX_VARIANTS as usize
        {
            variants.entries.clear();
        }
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
        self.changed();
        self.forget_typed(&put.url_hash);
        copy
    }

    pub(crate) fn remove(&self, url_hash: &str) {
        self.urls.invalidate(url_hash);
        self.changed();
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
                self.changed();
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
                self.changed();
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
        self.changed();
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
        _token: &LockToken,
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
            asked: None,
        }
    }

    /// A `Vary` on a field clients choose cannot grow one URL's record in
    /// process (while Redis is down, or in the near tier) past the variants
    /// Redis keeps: each store of a new variant would otherwise copy and
    /// re-weigh all of them.
    #[test]
    fn a_url_keeps_at_most_max_variants_in_process() {
        let near = MemoryStore::near(64 << 20, Duration::from_secs(60), None);
        let outage = MemoryStore::new(64 << 20, None);
        for store in [&near, &outage] {
            let mut kept = 0;
            for i in 0..200 {
                let mut variant =
                    put(&[("cache-control", "max-age=60"), ("vary", "accept-encoding")]);
                variant.vary = "accept-encoding".to_owned();
                let mut asked = HeaderMap::new();
                asked.insert(
                    "accept-encoding",
                    HeaderValue::from_str(&format!("x{i}")).unwrap(),
                );
                variant.variant = key::variant("accept-encoding", &asked, "");
                store.insert(&variant);
                kept = store
                    .urls
                    .get(&variant.url_hash)
                    .map_or(0, |v| v.entries.len());
                assert!(
                    kept <= MAX_VARIANTS as usize,
                    "{kept} variants after {i} stores"
                );
            }
            assert!(kept > 0);
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
            // Twice: the near tier serves the second from this thread's
            // own copy of the record.
            for _ in 0..2 {
                let Found::Entry(entry) = store.find(&put.url_hash, &HeaderMap::new(), "") else {
                    panic!("the entry was just stored");
                };
                assert_eq!(entry, put.entry);
                let links: Vec<_> = entry.headers.get_all("link").iter().collect();
                assert_eq!(links, ["</a.css>; rel=preload", "</b.js>; rel=preload"]);
            }
        }
        let owner = near.front_owner.expect("the near tier has a front");
        assert_eq!(front::held(&RECORDS, owner).0, 1);
    }

    /// A thread's own copy of a near record is not served once the store
    /// has changed: each change, made on another thread, is seen by this
    /// thread's next read, which its earlier reads had answered from its
    /// copy.
    #[test]
    fn a_threads_copy_of_a_near_record_is_not_served_after_a_change() {
        type Change = fn(&MemoryStore, &Put);
        let changes: [(&str, Change, Option<&[u8]>); 7] = [
            (
                "stored again",
                |s, p| {
                    let _ = s.insert(&body(p, b"v2"));
                },
                Some(b"v2"),
            ),
            ("removed", |s, p| s.remove(&p.url_hash), None),
            ("emptied", |s, _| s.clear(), None),
            (
                "purged by tag",
                |s, _| {
                    let _ = s.purge_target(&Target::Tag("t".into()), None);
                },
                None,
            ),
            (
                "purged by path",
                |s, _| {
                    let _ = s.purge_target(&Target::Path("/p".into()), None);
                },
                None,
            ),
            (
                "purged by URL",
                |s, p| {
                    let _ = s.purge_target(&Target::Url(p.url.clone()), None);
                },
                None,
            ),
            (
                "soft purged",
                |s, _| {
                    let _ = s.purge_target(&Target::All, Some(tower_redis_core::clock::now_ms()));
                },
                Some(b"page"),
            ),
        ];
        for (change, make, after) in changes {
            let near = MemoryStore::near(1 << 20, Duration::from_secs(60), None);
            let owner = near.front_owner.expect("the near tier has a front");
            let mut stored = put(&[("cache-control", "max-age=60")]);
            stored.tags = vec!["t".to_owned()];
            near.insert(&stored);
            let read = || match near.find(&stored.url_hash, &HeaderMap::new(), "") {
                Found::Entry(entry) => Some(entry),
                _ => None,
            };
            for _ in 0..2 {
                assert_eq!(read().map(|e| e.body).as_deref(), Some(&b"page"[..]));
            }
            assert_eq!(
                front::held(&RECORDS, owner).0,
                1,
                "{change}: a copy is held"
            );
            std::thread::scope(|scope| scope.spawn(|| make(&near, &stored)).join())
                .expect("the change is made");
            // Twice: the second read may come from a copy of the changed
            // record.
            for _ in 0..2 {
                let found = read();
                assert_eq!(found.as_ref().map(|e| &e.body[..]), after, "{change}");
                if change == "soft purged" {
                    let entry = found.expect("a soft purge keeps the entry");
                    assert_eq!(entry.lifetime, 0, "{change}: the entry is stale");
                }
            }
        }
    }

    /// A thread's copy serves each request its own variant, with the
    /// directives the near tier kept for it.
    #[test]
    fn a_threads_copy_serves_each_variant_its_own_entry() {
        let rules = Rules {
            targeted_fields: Vec::new(),
            heuristic: None,
            store_set_cookie: false,
        };
        let near = MemoryStore::near(1 << 20, Duration::from_secs(60), Some(rules.clone()));
        let owner = near.front_owner.expect("the near tier has a front");
        let language = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("accept-language", HeaderValue::from_static(value));
            headers
        };
        let (en, de) = (language("en"), language("de"));
        for (headers, cache_control, body) in [
            (&en, "max-age=60", &b"hello"[..]),
            (&de, "max-age=30, must-revalidate", &b"hallo"[..]),
        ] {
            let mut stored = put(&[("cache-control", cache_control)]);
            stored.vary = "accept-language".to_owned();
            stored.variant = key::variant(&stored.vary, headers, "");
            stored.entry.body = Bytes::copy_from_slice(body);
            near.insert(&stored);
        }
        let url_hash = key::hash_url("//shop.example/p");
        for round in 0..3 {
            for (headers, body) in [(&en, &b"hello"[..]), (&de, &b"hallo"[..])] {
                let (found, directives) = near.find_judged(&url_hash, headers, "");
                let Found::Entry(entry) = found else {
                    panic!("round {round}: the variant was stored");
                };
                assert_eq!(&entry.body[..], body, "round {round}");
                assert_eq!(
                    directives,
                    Some(freshness::directives_of(&entry.headers, &rules)),
                    "round {round}"
                );
            }
        }
        assert_eq!(front::held(&RECORDS, owner).0, 1);
        let other = language("fr");
        assert!(matches!(near.find(&url_hash, &other, ""), Found::NoVariant));
    }

    /// A change to another URL sends the next read of a URL to the store,
    /// which finds the same record: the thread's copy of it is marked
    /// current again, not made anew (it serves the same buffers).
    #[test]
    fn a_copy_of_an_unchanged_record_is_kept_through_changes_elsewhere() {
        let near = MemoryStore::near(1 << 20, Duration::from_secs(60), None);
        let stored = put(&[("cache-control", "max-age=60")]);
        near.insert(&stored);
        let body = || match near.find(&stored.url_hash, &HeaderMap::new(), "") {
            Found::Entry(entry) => entry.body,
            _ => panic!("the entry was stored"),
        };
        body();
        let held = body();
        let mut elsewhere = put(&[]);
        elsewhere.url_hash = key::hash_url("//shop.example/elsewhere");
        near.insert(&elsewhere);
        assert_eq!(body(), held, "read from the store");
        let again = body();
        assert_eq!(again, held);
        assert_eq!(
            again.as_ptr(),
            held.as_ptr(),
            "served from the same copy as before the change elsewhere"
        );
    }

    /// A thread's copy of an entry is served until the entry leaves the
    /// store: its own end, or the near tier's time to live.
    #[test]
    fn a_threads_copy_of_an_entry_ends_when_the_entry_does() {
        for (keep_for, time_to_live) in [(10, 60), (60, 10)] {
            let near = MemoryStore::near(1 << 20, Duration::from_secs(time_to_live), None);
            let mut stored = put(&[]);
            stored.keep_for = Duration::from_secs(keep_for);
            near.insert(&stored);
            let record = near.urls.get(&stored.url_hash).expect("just stored");
            let generation = near.generation.load(Ordering::Acquire);
            let copy = LocalRecord::of(&near, &stored.url_hash, &record, generation);
            // The entry's end and the record's time to live both count
            // from when it was stored.
            let now = record.stored;
            let found = |at| {
                copy.find(generation, &HeaderMap::new(), "", false, at)
                    .is_some()
            };
            assert!(
                found(now + Duration::from_secs(9)),
                "{keep_for} / {time_to_live}"
            );
            assert!(
                !found(now + Duration::from_secs(11)),
                "{keep_for} / {time_to_live}"
            );
        }
    }

    /// A thread holds copies of records charged at most
    /// [`front::MAX_WEIGHT`]; a larger one is served from the store.
    #[test]
    fn a_thread_holds_no_copy_of_a_large_record() {
        let near = MemoryStore::near(1 << 20, Duration::from_secs(60), None);
        let owner = near.front_owner.expect("the near tier has a front");
        let large = body(&put(&[]), &[b'x'; front::MAX_WEIGHT as usize]);
        near.insert(&large);
        for _ in 0..2 {
            assert!(matches!(
                near.find(&large.url_hash, &HeaderMap::new(), ""),
                Found::Entry(_)
            ));
        }
        assert_eq!(front::held(&RECORDS, owner), (0, 0));
        // Small entries, but so many variants (as many as a URL keeps),
        // each with a few fields, that the copy's own bookkeeping is over
        // the bound.
        let mut tiny = put(&[
            ("cache-control", "max-age=60"),
            ("content-type", "text/plain"),
            ("x-a", "1"),
            ("x-b", "2"),
        ]);
        tiny.url_hash = key::hash_url("//shop.example/tiny");
        tiny.vary = "x-v".to_owned();
        for i in 0..MAX_VARIANTS {
            let mut request = HeaderMap::new();
            request.insert("x-v", HeaderValue::from(i));
            tiny.variant = key::variant(&tiny.vary, &request, "");
            near.insert(&tiny);
        }
        assert!(near.urls.get(&tiny.url_hash).expect("stored").weight < front::MAX_WEIGHT);
        let mut request = HeaderMap::new();
        request.insert("x-v", HeaderValue::from(7));
        for _ in 0..2 {
            assert!(matches!(
                near.find(&tiny.url_hash, &request, ""),
                Found::Entry(_)
            ));
        }
        assert_eq!(front::held(&RECORDS, owner), (0, 0));
    }

    fn body(put: &Put, body: &[u8]) -> Put {
        let mut put = put.clone();
        put.entry.body = Bytes::copy_from_slice(body);
        put
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
