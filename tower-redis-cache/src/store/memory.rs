//! In-process stores: moka, bounded by bytes, with the same URL → variants
//! structure as Redis. One serves while Redis is unavailable; another,
//! optional, is the near cache in front of Redis.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;

use std::convert::Infallible;

use super::{EntryStore, Found, LockAttempt, LockPurpose, LockToken, Put, Target};
use crate::entry::Entry;
use crate::key;

#[derive(Debug, Clone)]
struct Variants {
    /// `//host/path?query`.
    url: String,
    vary: String,
    entries: HashMap<String, (Arc<Entry>, Instant)>,
    tags: Vec<String>,
    /// The last soft purge (ms since the epoch).
    soft_purged: Option<u64>,
    weight: u32,
}

pub(crate) struct MemoryStore {
    urls: moka::sync::Cache<String, Arc<Variants>>,
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
        }
    }

    pub(crate) fn find(&self, url_hash: &str, request: &HeaderMap, extra: &str) -> Found {
        let Some(variants) = self.urls.get(url_hash) else {
            return Found::NoUrl;
        };
        let variant = key::variant(&variants.vary, request, extra);
        match variants.entries.get(&variant) {
            Some((entry, expires)) if *expires > Instant::now() => {
                let mut entry = Entry::clone(entry);
                if let Some(at) = variants.soft_purged {
                    entry.mark_stale_at(at);
                }
                Found::Entry(entry)
            }
            _ => Found::NoVariant,
        }
    }

    pub(crate) fn insert(&self, put: &Put) {
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
            });
        if variants.vary != put.vary {
            variants.entries.clear();
            variants.vary.clone_from(&put.vary);
        }
        variants.entries.retain(|_, (_, expires)| *expires > now);
        // As in Redis (`put.lua`): a partial entry never replaces a fresh
        // complete one of the same variant.
        if put.entry.is_partial()
            && let Some((stored, _)) = variants.entries.get(&put.variant)
            && !stored.is_partial()
        {
            let mut stored = Entry::clone(stored);
            if let Some(at) = variants.soft_purged {
                stored.mark_stale_at(at);
            }
            if stored.ttl(tower_redis_core::clock::now_ms()) > 0 {
                return;
            }
        }
        variants.entries.insert(
            put.variant.clone(),
            (Arc::new(put.entry.clone()), expiry(now, put.keep_for)),
        );
        for tag in &put.tags {
            if !variants.tags.contains(tag) {
                variants.tags.push(tag.clone());
            }
        }
        variants.weight = variants
            .entries
            .values()
            .map(|(e, _)| e.weight())
            .sum::<u32>()
            .saturating_add(u32::try_from(variants.url.len()).unwrap_or(u32::MAX))
            .max(1);
        self.urls.insert(put.url_hash.clone(), Arc::new(variants));
    }

    pub(crate) fn remove(&self, url_hash: &str) {
        self.urls.invalidate(url_hash);
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
                self.urls.insert(String::clone(&url_hash), Arc::new(marked));
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
