//! Removing entries: RFC 9111 invalidations (after unsafe requests) and
//! the admin purges, by tag, path prefix, path, URL or everything, hard or
//! soft. In Redis a purge reads the tag's or directory's index and deletes
//! (or marks stale) the URLs it lists, a page at a time.

use std::sync::LazyLock;

use tower_redis_core::redis::{self, Script, Value};

use super::redis_store::{self, Op, RedisStore, Tombstone};
use super::{CacheStore, EntryStore, OutageChange, Purged, Target};
use crate::bus::Bus;
use crate::key;

/// URLs deleted per pipeline in a purge.
const PURGE_BATCH: usize = 500;

/// The member of an index that marks its newest purge (`index.lua`): no
/// URL starts with a NUL byte.
const PURGE_MARK_MEMBER: &str = "\0purged";

/// Leaves a purge's mark in a tag's index (or the root's, for a purge of
/// everything), before the purge reads it: the member `\0purged`, scored
/// minus Redis' time in µs (the newest mark kept; µs, so that a lock
/// granted in the same millisecond after the mark is told apart), and the
/// index kept at least as long as the mark lives. A fill of a URL the
/// index does not name yet (nothing stored) that asked the origin before
/// the mark learns of the purge when it records its URL there
/// (`index.lua`), and is not kept.
/// KEYS[1] the index; ARGV[1] how long the mark lives (a tombstone's
/// life, ms).
static PURGE_MARK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZADD', KEYS[1], 'LT', -now_us, '\0purged')
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 1
",
    )
});

/// How many purged URLs the purging instance drops one by one from its
/// near tier; a purge of more empties the tier instead.
const NEAR_REMOVALS: usize = 4096;

/// The URLs a purge found in Redis, named as the near tier names them
/// (their hashes), up to [`NEAR_REMOVALS`]: near copies record neither
/// their URL nor their tags, so a purge by tag, prefix or path learns here
/// which copies to drop. Bounded: past the bound only the fact remains.
/// The default notes nothing (no near tier to drop copies from).
#[derive(Default)]
pub(super) struct Removed {
    noting: bool,
    url_hashes: Vec<String>,
    too_many: bool,
}

impl Removed {
    fn noting() -> Self {
        Self {
            noting: true,
            ..Self::default()
        }
    }

    fn note(&mut self, url_hash: &str) {
        if !self.noting {
            return;
        }
        if self.url_hashes.len() < NEAR_REMOVALS {
            self.url_hashes.push(url_hash.to_owned());
        } else {
            self.too_many = true;
        }
    }
}

impl CacheStore {
    /// Deletes every variant of these URLs (RFC 9111 §4.4 invalidation).
    /// As with a purge, a fill of these URLs that asked the origin before
    /// neither lands after it nor serves later callers.
    pub(crate) async fn invalidate(&self, url_hashes: &[String]) {
        self.remove(url_hashes, Tombstone::Stored).await;
    }

    /// Deletes a data value that does not decode: as an invalidation, but
    /// it leaves a tombstone only where a fill lock was (as deletions did
    /// before purges left one everywhere), so that a fill without the lock
    /// (of a value that does decode) may store after it.
    pub(crate) async fn delete_undecodable(&self, url_hash: &str) {
        self.remove(&[url_hash.to_owned()], Tombstone::Locked).await;
    }

    async fn remove(&self, url_hashes: &[String], tombstone: Tombstone) {
        self.flights.detach(url_hashes.iter().map(String::as_str));
        let Ok(()) = self.memory().invalidate(url_hashes).await;
        if let Some(near) = &self.near {
            let Ok(()) = near.invalidate(url_hashes).await;
        }
        if url_hashes.is_empty() {
            return;
        }
        let served = self
            .failover
            .run(
                |redis| redis.delete_urls(url_hashes, tombstone),
                |_, _| async {},
            )
            .await;
        if served.is_fallback() {
            self.defer(
                url_hashes
                    .iter()
                    .map(|url_hash| OutageChange::invalidate(url_hash)),
            );
        } else {
            // A near copy a lookup of this instance refilled from what it
            // read before the removal goes now, as after a purge (below).
            if let Some(near) = &self.near {
                self.bus.bump_epoch();
                let Ok(()) = near.invalidate(url_hashes).await;
            }
        }
    }

    /// Purges (or, with `soft_at`, marks stale) the target's entries
    /// everywhere: Redis, this instance's in-process stores, and (through
    /// the announcements) the other instances' near caches. `soft_at` is
    /// this instance's time, used only for its in-process store (whose
    /// entries carry its own clock); in Redis the mark is Redis' time, the
    /// clock stored entries are stamped with, and near-cache copies are
    /// dropped, so that no instance's clock decides what a soft purge makes
    /// stale.
    ///
    /// A fill that asked the origin before the purge neither lands after
    /// it (in Redis its lock is gone, so `put.lua` drops the entry) nor
    /// serves this instance's later callers (its flight is detached).
    pub(crate) async fn purge(&self, target: &Target, soft_at: Option<u64>) -> Purged {
        self.flights.detach_all();
        // A URL's copy goes at once. Those of a tag, prefix or path are
        // found after the Redis part (near copies record neither URL nor
        // tags), which names the URLs it purged.
        if let (Some(near), Target::Url(_) | Target::All) = (&self.near, target) {
            let Ok(_) = near.purge(target, None).await;
        }
        let Ok(local_count) = self.memory().purge(target, soft_at).await;
        let mut removed = if self.near.is_some() {
            Removed::noting()
        } else {
            Removed::default()
        };
        match self
            .redis()
            .purge_indexed(target, soft_at, &mut removed, false)
            .await
        {
            Ok(urls) => {
                self.drop_near_copies(target, &removed).await;
                Purged {
                    urls,
                    deferred: false,
                }
            }
            Err(error) => {
                // Some URLs may be purged in Redis already: their copies
                // go as after a purge. Those the replay purges go with
                // Redis' invalidations of them (or, on a Cluster, with the
                // replay's announcements), as another instance's purge.
                self.drop_near_copies(target, &removed).await;
                tracing::warn!(target: "tower_redis_cache", %error, "purge deferred: Redis is unavailable; purged in process, replayed on Redis when it is back");
                self.defer([OutageChange::purge(target, soft_at)]);
                Purged {
                    urls: local_count,
                    deferred: true,
                }
            }
        }
    }

    /// After the Redis part of a purge: a lookup of this instance that
    /// read Redis before the removal may have refilled the near tier since
    /// (Redis' invalidation, or on a Cluster the announcement, may not have
    /// arrived yet). The epoch makes the lookups under way drop their
    /// copies (those already keeping one finish first), and what is
    /// already kept goes now. Near copies carry neither their URL nor
    /// their tags: those of a purge by tag, prefix or path are the URLs it
    /// found in Redis (too many of them, and the tier is emptied).
    async fn drop_near_copies(&self, target: &Target, removed: &Removed) {
        let Some(near) = &self.near else {
            return;
        };
        self.bus.bump_epoch();
        match target {
            Target::All => {
                let Ok(_) = near.purge(target, None).await;
            }
            _ if removed.too_many => near.clear(),
            _ => {
                for url_hash in &removed.url_hashes {
                    near.remove(url_hash);
                }
            }
        }
    }
}

/// Where a purge finds its URLs in Redis: an index, and which of its URLs
/// it selects.
struct Indexed<'a> {
    index: String,
    /// A path prefix, or a whole path with `exact`.
    filter: Option<(&'a str, bool)>,
}

impl Indexed<'_> {
    fn selects(&self, url: &str) -> bool {
        if url == PURGE_MARK_MEMBER {
            // The purge mark (`PURGE_MARK`), not a URL.
            return false;
        }
        match self.filter {
            None => true,
            Some((prefix, false)) => key::path_of(url).starts_with(prefix),
            Some((path, true)) => key::path_of(url) == path,
        }
    }
}

impl RedisStore {
    /// The Redis side of a purge; returns how many URLs had entries, and
    /// notes in `removed` those it purged. `replay`: a purge made during an
    /// outage, written once Redis answers again (see [`purge_urls`]).
    ///
    /// [`purge_urls`]: Self::purge_urls
    pub(super) async fn purge_indexed(
        &self,
        target: &Target,
        soft_at: Option<u64>,
        removed: &mut Removed,
        replay: bool,
    ) -> Result<u64, tower_redis_core::Error> {
        let indexed = match target {
            Target::Url(url) => {
                return self
                    .purge_urls(std::slice::from_ref(url), soft_at, (true, replay), removed)
                    .await;
            }
            Target::Tag(tag) => Indexed {
                index: self.index_key("ct", tag),
                filter: None,
            },
            Target::Prefix(prefix) => Indexed {
                index: self.index_key("cx", key::directory_for_prefix(prefix, self.index_depth)),
                filter: Some((prefix.as_str(), false)),
            },
            Target::Path(path) => Indexed {
                index: self.index_key("cx", key::directory_for_prefix(path, self.index_depth)),
                filter: Some((path.as_str(), true)),
            },
            Target::All => Indexed {
                index: self.index_key("cx", "/"),
                filter: None,
            },
        };
        // A tag's index names exactly the URLs under the tag, and the
        // root's every URL: a mark there concerns the fills it reaches. A
        // directory's index holds more than a prefix or path selects, and
        // a mark in it would drop the fills of URLs the purge does not
        // name (the root's, for a top-level path), so those leave none.
        if !replay && matches!(target, Target::Tag(_) | Target::All) {
            let mut mark = PURGE_MARK.key(&indexed.index);
            mark.arg(self.tombstone_ttl_ms());
            match self.manager.invoke_script::<i64>(&mark).await {
                Ok(_) => {}
                // Redis did not answer (or the breaker is open): its pages
                // would not be answered either, and the caller would wait a
                // second command timeout for them. The purge is left to
                // the caller's failure path (a deferred purge).
                Err(error) if error.is_unanswered() => return Err(error),
                // Refused (out of memory, no scripts): the purge goes on,
                // and what it finds it removes all the same.
                Err(error) => {
                    tracing::warn!(target: "tower_redis_cache", %error, "a purge could not leave its mark in its index: a fill under way of a URL with nothing stored may store after it");
                }
            }
        }
        let count = self.purge_pages(&indexed, soft_at, removed, replay).await?;
        if matches!(target, Target::All) && soft_at.is_none() {
            self.manager
                .query::<()>(
                    redis::cmd("PUBLISH")
                        .arg(&self.channel)
                        .arg(Bus::ALL_MESSAGE),
                )
                .await?;
        }
        Ok(count)
    }

    /// Purges the selected URLs of an index, a page at a time.
    async fn purge_pages(
        &self,
        indexed: &Indexed<'_>,
        soft_at: Option<u64>,
        removed: &mut Removed,
        replay: bool,
    ) -> Result<u64, tower_redis_core::Error> {
        let index = &indexed.index;
        let mut count = 0;
        let mut start = 0isize;
        loop {
            // Pages by rank; a hard purge removes what it read, so it always
            // reads the first page.
            let page: Vec<String> = self
                .manager
                .query(
                    redis::cmd("ZRANGE")
                        .arg(index)
                        .arg(start)
                        .arg(start + PURGE_BATCH as isize - 1),
                )
                .await?;
            if page.is_empty() {
                break;
            }
            let selected: Vec<&String> = page.iter().filter(|url| indexed.selects(url)).collect();
            let urls: Vec<String> = selected.iter().map(|url| (*url).clone()).collect();
            // A path names a URL per host, like a URL purge.
            let exact = matches!(indexed.filter, Some((_, true)));
            count += self
                .purge_urls(&urls, soft_at, (exact, replay), removed)
                .await?;
            let done = page.len() < PURGE_BATCH;
            if soft_at.is_none() {
                // Drop what was purged from the index, so the next page is new.
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(index);
                let mut removed = 0;
                for url in &selected {
                    zrem.arg(url.as_str());
                    removed += 1;
                }
                if removed > 0 {
                    self.manager.query::<()>(&zrem).await?;
                }
                start += (page.len() - removed) as isize;
            } else {
                start += page.len() as isize;
            }
            if done {
                break;
            }
        }
        Ok(count)
    }

    /// Deletes (or soft-purges) URLs' entries and announces each; returns
    /// how many existed. A hard purge also takes the URLs out of the root
    /// index, which counts the live entries.
    ///
    /// A URL with something stored is left as a tombstone (`delete.lua`),
    /// which a fill that asked the origin before the purge finds; with
    /// `exact` (a purge of one URL or path) every URL is, as a fill of it
    /// may be under way though nothing is stored yet.
    ///
    /// A `replay` of a tag or prefix purge made during an outage deletes
    /// with a plain `DEL` instead, leaving no tombstone: a new primary runs
    /// it without first loading the script (one round trip more per node,
    /// on a cluster), within the one command timeout that a lookup waits
    /// for the replay. A fill another instance asked for before the replay
    /// may then store after it (see the crate docs).
    async fn purge_urls(
        &self,
        urls: &[String],
        soft_at: Option<u64>,
        (exact, replay): (bool, bool),
        removed: &mut Removed,
    ) -> Result<u64, tower_redis_core::Error> {
        let mut count = 0;
        for chunk in urls.chunks(PURGE_BATCH) {
            let mut ops = Vec::with_capacity(chunk.len() * 2 + 1);
            for url in chunk {
                let url_hash = &key::hash_url(url);
                removed.note(url_hash);
                let key = self.redis_key(url_hash);
                ops.push(match soft_at {
                    None if replay && !exact => {
                        let mut del = redis::cmd("DEL");
                        del.arg(&key);
                        Op::Cmd(del)
                    }
                    None => Op::Script(self.delete(
                        url_hash,
                        if exact {
                            Tombstone::Always
                        } else {
                            Tombstone::Stored
                        },
                    )),
                    Some(_) => {
                        let mut soft = redis_store::SOFT_PURGE.key(&key);
                        // A data value's entry carries the mark too: a
                        // hit reads the entry alone (`store/data.rs`).
                        soft.arg(if crate::data::value::is_data_url(url) {
                            super::DATA_VARIANT.as_str()
                        } else {
                            ""
                        });
                        Op::Script(soft)
                    }
                });
                ops.push(redis_store::publish(
                    &self.channel,
                    &Bus::updated_message(url_hash),
                ));
            }
            let pairs = ops.len();
            if soft_at.is_none() {
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(self.index_key("cx", "/")).arg(chunk);
                ops.push(Op::Cmd(zrem));
            }
            let results = self.run_ops(&ops).await?;
            // Every other answer is a PUBLISH count.
            count += results[..pairs]
                .iter()
                .step_by(2)
                .filter(|v| matches!(v, Value::Int(n) if *n > 0))
                .count() as u64;
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::{NEAR_REMOVALS, Removed};

    #[test]
    fn a_purge_notes_the_urls_it_removed_up_to_a_bound() {
        let mut removed = Removed::noting();
        for n in 0..NEAR_REMOVALS {
            removed.note(&format!("hash-{n}"));
        }
        assert!(!removed.too_many);
        assert_eq!(removed.url_hashes.len(), NEAR_REMOVALS);
        removed.note("one-more");
        assert!(removed.too_many, "past the bound");
        assert_eq!(removed.url_hashes.len(), NEAR_REMOVALS, "bounded");
        let mut ignored = Removed::default();
        ignored.note("hash");
        assert!(ignored.url_hashes.is_empty() && !ignored.too_many);
    }
}
