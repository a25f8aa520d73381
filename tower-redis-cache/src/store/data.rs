//! The data cache's verbs on the store (see `crate::data`): a data value is
//! an entry without `Vary` under a URL of its own, so lookups, writes,
//! locks, tags, purges, the near tier and the outage fallback are the
//! HTTP cache's own.

use http::HeaderMap;
use tower_redis_core::redis;

use super::{CacheStore, EntryStore, Found, Put, Tier};
use crate::entry::Entry;

impl CacheStore {
    /// A data value's entry: the near tier first (when `near` allows it),
    /// else one `HMGET` on Redis, else the in-process store while Redis is
    /// unavailable; a value read from Redis is copied into the near tier
    /// when `near` and `keep_near` allow it. A stored value that does not
    /// decode is deleted and is a miss.
    pub(crate) async fn data_lookup(
        &self,
        url_hash: &str,
        near: bool,
        keep_near: fn(&Entry) -> bool,
    ) -> (Option<Entry>, Tier) {
        self.bus.ensure_started();
        self.failover.catch_up().await;
        let headers = HeaderMap::new();
        let near = self
            .near
            .as_ref()
            .filter(|_| near && self.bus.near_usable());
        if let Some(near) = near
            && let Found::Entry(entry) = near.find(url_hash, &headers, "")
        {
            return (Some(entry), Tier::Near);
        }
        let epoch = self.bus.epoch();
        let headers = &headers;
        let served = self
            .failover
            .run(
                // Data entries have no `Vary`: the lookup is a plain HMGET.
                |redis| self.read_entry(redis, url_hash, headers, "", Some(String::new())),
                |memory, _| async move {
                    let Ok(found) = memory.lookup(url_hash, headers, "", None).await;
                    found
                },
            )
            .await;
        let tier = if served.is_fallback() {
            Tier::Degraded
        } else {
            Tier::Redis
        };
        match served.value.0 {
            Found::Entry(entry) => {
                if let (Some(near), Tier::Redis) = (near, tier)
                    && self.bus.epoch() == epoch
                    && keep_near(&entry)
                {
                    near.insert(&Put {
                        url_hash: url_hash.to_owned(),
                        url: String::new(),
                        vary: String::new(),
                        variant: crate::key::variant("", headers, ""),
                        entry: entry.clone(),
                        keep_for: std::time::Duration::from_secs(u64::from(u32::MAX)),
                        tags: Vec::new(),
                    });
                }
                (Some(entry), tier)
            }
            Found::NoUrl | Found::NoVariant => (None, tier),
            Found::Corrupt(field) => {
                tracing::warn!(target: "tower_redis_cache", "deleting a corrupt or foreign data cache entry");
                let key = self.redis().redis_key(url_hash);
                let _ = self
                    .redis()
                    .manager
                    .query::<()>(redis::cmd("HDEL").arg(&key).arg(field))
                    .await;
                (None, tier)
            }
        }
    }
}
