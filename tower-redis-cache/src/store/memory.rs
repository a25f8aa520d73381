//! The in-process store used while Redis is unavailable: moka, bounded by
//! bytes, with the same URL → variants structure as Redis.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use http::HeaderMap;

use super::Put;
use super::redis_store::Found;
use crate::entry::Entry;
use crate::key;

#[derive(Debug, Clone)]
struct Variants {
    vary: String,
    entries: HashMap<String, (Arc<Entry>, Instant)>,
    weight: u32,
}

pub(crate) struct MemoryStore {
    urls: moka::sync::Cache<String, Arc<Variants>>,
}

impl MemoryStore {
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            urls: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_key: &String, value: &Arc<Variants>| value.weight)
                .build(),
        }
    }

    pub(crate) fn lookup(&self, url_hash: &str, request: &HeaderMap, extra: &str) -> Found {
        let Some(variants) = self.urls.get(url_hash) else {
            return Found::NoUrl;
        };
        let variant = key::variant(&variants.vary, request, extra);
        match variants.entries.get(&variant) {
            Some((entry, expires)) if *expires > Instant::now() => {
                Found::Entry(Entry::clone(entry))
            }
            _ => Found::NoVariant,
        }
    }

    pub(crate) fn put(&self, put: &Put) {
        let now = Instant::now();
        let mut variants = self
            .urls
            .get(&put.url_hash)
            .map(|v| Variants::clone(&v))
            .unwrap_or_else(|| Variants {
                vary: put.vary.clone(),
                entries: HashMap::new(),
                weight: 0,
            });
        variants.vary.clone_from(&put.vary);
        variants.entries.retain(|_, (_, expires)| *expires > now);
        variants.entries.insert(
            put.variant.clone(),
            (Arc::new(put.entry.clone()), expiry(now, put.keep_for)),
        );
        variants.weight = variants
            .entries
            .values()
            .map(|(e, _)| e.weight())
            .sum::<u32>()
            .max(1);
        self.urls.insert(put.url_hash.clone(), Arc::new(variants));
    }

    pub(crate) fn remove(&self, url_hash: &str) {
        self.urls.invalidate(url_hash);
    }

    pub(crate) fn clear(&self) {
        self.urls.invalidate_all();
    }
}

/// `now + keep_for`, saturating far in the future instead of overflowing.
fn expiry(now: Instant, keep_for: std::time::Duration) -> Instant {
    now.checked_add(keep_for)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(10 * 365 * 24 * 3600))
}
