//! The data cache's verbs on the store (see `crate::data`): a data value is
//! an entry without `Vary` under a URL of its own, so tags, purges, the
//! near tier and the outage fallback are the HTTP cache's own. Its reads,
//! writes and fill locks are cut to what a value needs:
//!
//! - a read is `HGET <hash> <field>` (the field is the same for every
//!   value: no `Vary`), on the tracking connection when the near tier
//!   follows tracking; a soft purge writes its mark into a value's entry
//!   as well as into the hash (`soft_purge.lua`), so the read needs no
//!   second field;
//! - a near hit first looks for the value already decoded (`typed.rs`):
//!   one lookup by the caller's key, a clone of the `T`;
//! - a write is one pipeline: one script storing the entry (and releasing
//!   the fill lock), the root index (a purge of everything finds values
//!   there) and one index per tag. Values are not recorded under their
//!   path's directories: a data key is no path that a prefix purge names.
//!   The update is announced (`PUBLISH`) only when some instance waits for
//!   it (a waiter marks the value's hash when it finds the lock held), or
//!   on a cluster, where the announcement is also what keeps the other
//!   near tiers exact (without a cluster they follow client tracking);
//! - the fill lock is the HTTP cache's `lk` field, taken by a script that
//!   skips the checks a value that does not exist yet cannot need.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use tower_redis_core::RedisConnection;
use tower_redis_core::redis::{self, RedisResult, Script, Value};

use super::redis_store::{self, INDEX, Kind, Op, RedisStore};
use super::typed::{NearCopy, Typed};
use super::{
    CacheStore, EntryStore, Found, LARGE_ENTRY_BYTES, LockAttempt, LockPurpose, LockToken, Put,
    Tier, VaryHint,
};
use crate::bus::Bus;
use crate::entry::Entry;

/// The variant field of every data value (no `Vary`, no extra key parts).
pub(crate) static DATA_VARIANT: LazyLock<String> =
    LazyLock::new(|| crate::key::variant("", &HeaderMap::new(), ""));

/// Stores a value's entry, releases the fill lock, and announces the
/// update when an instance waits for it.
/// KEYS[1] the value's hash; ARGV[1] the variant field; ARGV[2] the entry;
/// ARGV[3] keep-for (ms); ARGV[4] the fill lock's token ('' for none);
/// ARGV[5] the events channel; ARGV[6] the announcement ('' when the
/// caller announces it itself).
/// The entry's response time (bytes 7..14, ms since the epoch, big-endian)
/// is replaced with Redis' own clock, as `put.lua` does. The hash holds
/// `vary`, one entry, and at times `lk`, `lw` (waiters) and `sp` (a soft
/// purge): no bound on variants is needed. As in `put.lua`, a fill whose
/// value was removed or purged after it took its lock (a tombstone `pg`,
/// or a soft-purge mark `sp`, and not its lock) drops its value: it was
/// made before the removal. ARGV[7], as `put.lua`'s: how long ago (ms) the
/// factory began, margin included ('' for a `set`); with it, a fill
/// without a lock drops its value when a mark is newer than that (a mark
/// that is not a number counts as newer). ARGV[8], as `put.lua`'s: how
/// long a tombstone lives (ms); a fill without its lock whose factory began
/// longer ago than that drops its value, and a value stored within a
/// tombstone's life keeps the hash until the tombstone's end.
/// Returns 1 when stored, else why not, as `put.lua` (waiters are still
/// woken).
static DATA_PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local held = redis.call('HMGET', KEYS[1], 'lk', 'lw', 'pg', 'sp')
local release = ARGV[4] ~= '' and held[1] and string.sub(held[1], 1, #ARGV[4] + 1) == ARGV[4] .. ':'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ago = ARGV[7] or ''
-- How long a removal's tombstone here has left (ms; none: 0).
local tombstone_left = 0
if held[3] then tombstone_left = (tonumber(held[3]) or 0) + tonumber(ARGV[8]) - now end
-- Why the value is dropped, as put.lua answers: 0 a removal or soft
-- purge newer than the factory's start; 2 began longer ago than a
-- tombstone lives; 3 took the lock and lost it where the hash holds an
-- older mark. nil: stored.
local dropped = nil
if not release then
  local asked = ago ~= '' and now - tonumber(ago) or nil
  local function newer(mark)
    return mark and asked and (tonumber(mark) or asked) >= asked
  end
  if newer(held[3]) or newer(held[4]) then
    dropped = 0
  elseif ago ~= '' and tonumber(ago) >= tonumber(ARGV[8]) then
    dropped = 2
  elseif ARGV[4] ~= '' and (held[3] or held[4]) then
    dropped = 3
  end
end
if dropped then
  if held[2] then
    redis.call('HDEL', KEYS[1], 'lw')
    if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
  end
  return dropped
end
local entry = ARGV[2]
if string.sub(entry, 1, 3) == 'TRC' and #entry >= 14 then
  local bytes = {}
  for i = 8, 1, -1 do
    bytes[i] = string.char(now % 256)
    now = math.floor(now / 256)
  end
  entry = string.sub(entry, 1, 6) .. table.concat(bytes) .. string.sub(entry, 15)
end
redis.call('HSET', KEYS[1], 'vary', '', ARGV[1], entry)
-- A removal's tombstone (`pg`) keeps its life: a value kept for less
-- must not take it along, or a fill from before the removal would find
-- no mark and store. (So a value stored within a tombstone's life may
-- stay in Redis past its own window until that tombstone's end, using
-- memory; once it has passed, the value's own. Fail-safe does not serve
-- it past its window: readers check its age.)
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[3]), tombstone_left))
if release and held[2] then
  redis.call('HDEL', KEYS[1], 'lk', 'lw')
elseif release then
  redis.call('HDEL', KEYS[1], 'lk')
elseif held[2] then
  redis.call('HDEL', KEYS[1], 'lw')
end
if held[2] and ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return 1
",
    )
});

/// Takes a value's fill lock: `put.lua`'s `lk` field (`token:expiry`), so
/// that the HTTP cache's release (`unlock.lua`) and its readers agree.
/// KEYS[1] the value's hash; ARGV[1] token; ARGV[2] lock TTL (ms);
/// ARGV[3] the variant field; ARGV[4] 'fill' (report a value stored
/// meanwhile) or 'refresh' (report the value replaced since: its stored
/// time, bytes 7..14 of the entry, later than ARGV[5], both 8-byte
/// big-endian). A caller that finds the lock held marks the hash (`lw`),
/// so that the holder announces its value.
/// Returns 'acquired:<µs>' (Redis' time in µs), 'held' or 'filled'.
static DATA_LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then
  local found = redis.call('HMGET', KEYS[1], ARGV[3], 'lk')
  if ARGV[4] == 'fill' then
    if found[1] then return 'filled' end
  elseif found[1] and string.sub(found[1], 7, 14) > ARGV[5] then
    return 'filled'
  end
  if found[2] then
    local expires = tonumber(string.match(found[2], ':(%d+)$'))
    if expires and expires > now then
      redis.call('HSET', KEYS[1], 'lw', '1')
      return 'held'
    end
  end
end
redis.call('HSET', KEYS[1], 'lk', ARGV[1] .. ':' .. (now + tonumber(ARGV[2])))
-- A lock taken in a tombstone outlives it (as `lock.lua`'s).
if pttl < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 'acquired:' .. string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
",
    )
});

/// What a data lookup found.
pub(crate) struct DataFound {
    pub(crate) entry: Option<Entry>,
    pub(crate) tier: Tier,
    /// The near copy the entry is (or was copied into), for keeping its
    /// decoded value beside it.
    pub(crate) near: Option<NearCopy>,
}

impl CacheStore {
    /// A fresh value of `key` already decoded as a `T` (through codec
    /// `C`) in the near tier, when the near tier may be read and no eager
    /// refresh (at `refresh` of the TTL) is due: no Redis, no decoding.
    pub(crate) fn data_near_hit<C: 'static, T: Clone + 'static>(
        &self,
        key: &str,
        refresh: Option<f64>,
    ) -> Option<T> {
        let typed = self.near.as_ref()?.typed()?;
        if self.failover.is_degraded() || !self.bus.near_usable() {
            return None;
        }
        match typed.get::<C, T>(key, refresh) {
            Typed::Fresh(value) => Some(value),
            Typed::Absent => None,
        }
    }

    /// Keeps `value`, decoded from the near copy `copy` of `url_hash`, in
    /// the near tier beside it (unless that copy is gone or replaced).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn keep_decoded<C: 'static, T: Clone + Send + Sync + 'static>(
        &self,
        key: &str,
        url_hash: &str,
        copy: NearCopy,
        value: T,
        encoded_bytes: usize,
        age_ms: u64,
        ttl_ms: u64,
        refresh: Option<f64>,
    ) -> bool {
        let Some(near) = self.near.as_ref() else {
            return false;
        };
        let Some(typed) = near.typed() else {
            return false;
        };
        typed.keep::<C, T>(
            key,
            url_hash,
            copy,
            |id| near.is_current(url_hash, id),
            value,
            encoded_bytes,
            age_ms,
            ttl_ms,
            refresh,
        )
    }

    /// A data value's entry: the near tier first (when `near` allows it),
    /// else one `HGET` on Redis, else the in-process store while Redis is
    /// unavailable; a value read from Redis is copied into the near tier
    /// when `near` and `keep_near` allow it. A stored value that is not an
    /// entry is deleted and is a miss.
    pub(crate) async fn data_lookup(
        &self,
        url_hash: &str,
        near: bool,
        keep_near: fn(&Entry) -> bool,
    ) -> DataFound {
        self.bus.ensure_started();
        let caught_up = self.failover.catch_up().await;
        let near = self
            .near
            .as_ref()
            .filter(|_| near && self.bus.near_usable());
        if let Some(near) = near
            && let Some((entry, copy)) = near.find_copy(url_hash, &DATA_VARIANT)
        {
            return DataFound {
                entry: Some(entry),
                tier: Tier::Near,
                near: Some(copy),
            };
        }
        let epoch = self.bus.epoch();
        // Boxed on its own (about 1 KB): inlined, it made the data cache's
        // boxed hit future 2.2 KB, too large for the allocator's per-thread
        // cache.
        let served = Box::pin(self.read_data_entry(url_hash, caught_up)).await;
        let tier = if served.is_fallback() {
            Tier::Degraded
        } else {
            Tier::Redis
        };
        match served.value {
            Found::Entry(entry) => {
                let mut copy = None;
                if let (Some(near), Tier::Redis) = (near, tier)
                    && keep_near(&entry)
                    && self.bus.epoch() == epoch
                {
                    let put = Put {
                        url_hash: url_hash.to_owned(),
                        url: String::new(),
                        vary: String::new(),
                        variant: DATA_VARIANT.clone(),
                        entry: entry.clone(),
                        keep_for: Duration::from_secs(u64::from(u32::MAX)),
                        tags: Vec::new(),
                        asked: None,
                    };
                    copy = self
                        .bus
                        .keep_at(epoch, || near.insert(&put), || near.remove(url_hash));
                }
                DataFound {
                    entry: Some(entry),
                    tier,
                    near: copy,
                }
            }
            Found::NoUrl | Found::NoVariant => DataFound {
                entry: None,
                tier,
                near: None,
            },
            Found::Corrupt(field) => {
                tracing::warn!(target: "tower_redis_cache", "deleting a corrupt or foreign data cache entry");
                let key = self.redis().redis_key(url_hash);
                // Boxed: a healthy lookup's future carries none of its state.
                let _ = Box::pin(
                    self.redis()
                        .manager
                        .query::<()>(redis::cmd("HDEL").arg(&key).arg(field)),
                )
                .await;
                DataFound {
                    entry: None,
                    tier,
                    near: None,
                }
            }
        }
    }

    /// A value's entry from Redis, else (Redis unavailable) from the
    /// in-process store.
    pub(crate) fn read_data_entry<'a>(
        &'a self,
        url_hash: &'a str,
        caught_up: bool,
    ) -> impl Future<Output = tower_redis_core::Served<Found>> + 'a {
        self.failover.run_caught_up(
            caught_up,
            move |redis| self.read_value(redis, url_hash),
            // Boxed: only a lookup during an outage pays for its state.
            move |memory, _| {
                Box::pin(async move {
                    let Ok((found, _)) = memory.lookup(url_hash, &HeaderMap::new(), "", None).await;
                    found
                })
            },
        )
    }

    /// One `HGET` of a value: on the tracking connection when the near
    /// tier follows tracking (so that Redis tells this instance when it
    /// changes), else on the pool; sent together with the reads that
    /// arrive with it ([`CacheStore::read_gathered`]), unless the value was
    /// large when last seen here ([`LARGE_ENTRY_BYTES`]).
    async fn read_value(
        &self,
        redis: &RedisStore,
        url_hash: &str,
    ) -> Result<Found, tower_redis_core::Error> {
        let key = redis.redis_key(url_hash);
        let large = self.is_large_value(url_hash);
        let reply = self
            .read_gathered(&self.data_reads, redis, &key, read_command, large)
            .await?;
        let Some(bytes) = entry_bytes(reply)? else {
            self.note_value_size(url_hash, None, large);
            return Ok(Found::NoUrl);
        };
        let entry = Entry::decode_shared(Bytes::from(bytes));
        self.note_value_size(url_hash, entry.as_ref().ok().map(Entry::weight), large);
        Ok(match entry {
            Ok(entry) if crate::data::value::lacks_its_marks(&entry) => {
                // Boxed: only a value stored by an earlier version pays for it.
                Found::Entry(
                    Box::pin(super::read_on(
                        self.bus.tracking(),
                        &redis.manager,
                        |conn| with_the_hash_mark(conn, &key, entry),
                    ))
                    .await?,
                )
            }
            Ok(entry) => Found::Entry(entry),
            Err(_) => Found::Corrupt(DATA_VARIANT.clone()),
        })
    }

    /// Stores a value: the entry, its root and tag index records, the lock
    /// release and (when some instance waits) the announcement in one
    /// pipelined round trip; in process while Redis is unavailable.
    pub(crate) async fn data_put(&self, put: Put, lock: Option<LockToken>) {
        self.counters
            .stores
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let large = self.is_large_value(&put.url_hash);
        self.note_value_size(&put.url_hash, Some(put.entry.weight()), large);
        if let Some(near) = &self.near {
            near.remove(&put.url_hash);
        }
        let put = &put;
        self.failover
            .run(
                |redis| redis.put_value(put, lock.as_ref()),
                |memory, _| async move {
                    let Ok(()) = memory.put(put, None).await;
                },
            )
            .await;
        self.after_write(&put.url_hash);
    }

    /// Whether a value was larger than [`LARGE_ENTRY_BYTES`] when this
    /// instance last read or stored it: one atomic load until some value
    /// was.
    fn is_large_value(&self, url_hash: &str) -> bool {
        self.large_values.load(std::sync::atomic::Ordering::Relaxed)
            && self
                .vary_hints
                .get(url_hash)
                .is_some_and(|hint| hint.is_large())
    }

    /// Records a value's size as read or stored (its entry's weight;
    /// `None`: absent or unreadable), when it changes whether the value is
    /// large (`was_large`).
    fn note_value_size(&self, url_hash: &str, weight: Option<u32>, was_large: bool) {
        let large = weight.is_some_and(|weight| weight > LARGE_ENTRY_BYTES);
        if large && !was_large {
            self.large_values
                .store(true, std::sync::atomic::Ordering::Relaxed);
            self.vary_hints.insert(
                url_hash.to_owned(),
                VaryHint::Vary {
                    names: String::new(),
                    large: true,
                },
            );
        } else if was_large && !large {
            self.vary_hints.remove(url_hash);
        }
    }

    /// Takes a value's fill lock (one round trip), or reports it held or
    /// the value stored meanwhile.
    pub(crate) async fn data_lock(&self, url_hash: &str, purpose: LockPurpose) -> LockAttempt {
        if !self.redis().manager.is_available() {
            return LockAttempt::Unavailable;
        }
        let token = LockToken::generate();
        let attempt = self.redis().lock_value(url_hash, purpose, &token).await;
        self.lock_answered(url_hash, token, attempt)
    }
}

impl RedisStore {
    async fn put_value(
        &self,
        put: &Put,
        unlock: Option<&LockToken>,
    ) -> Result<(), tower_redis_core::Error> {
        let key = self.redis_key(&put.url_hash);
        let ttl = u64::try_from(put.keep_for.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let message = Bus::updated_message(&put.url_hash);
        let entry = put.entry.encode();
        let tombstone_ms = self.tombstone_ttl_ms();
        let (reply, index_purged, asked_ms_ago) = self
            .manager
            .run(|mut conn| async move {
                // Measured once a connection is at hand: the margin it
                // adds covers the write's way from here on.
                let asked_ms_ago = put.asked.map(redis_store::asked_ms_ago);
                let extras = redis_store::Extras {
                    indexes: &[],
                    url: &put.url,
                    unlock: unlock.map(LockToken::as_str),
                    announce: None,
                    tombstone_ms,
                    asked_ms_ago,
                    lock_taken_at_us: put.asked.and(unlock.and_then(LockToken::taken_at_us)),
                };
                let cluster = conn.is_cluster();
                let mut ops = Vec::with_capacity(put.tags.len() + 3);
                let mut store = DATA_PUT.key(&key);
                store
                    .arg(&put.variant)
                    .arg(entry)
                    .arg(ttl)
                    .arg(unlock.map_or("", LockToken::as_str))
                    .arg(&self.channel)
                    // On a cluster the announcement goes after every write
                    // (below), always: it keeps the near tiers exact there.
                    .arg(if cluster { "" } else { message.as_str() });
                match asked_ms_ago {
                    Some(ago) => store.arg(ago),
                    None => store.arg(""),
                };
                store.arg(tombstone_ms);
                // As for pages (`redis_store::put`): not on a Cluster, the
                // index records go first, and may leave the value a
                // tombstone that the store then finds.
                let indexes = 1 + put.tags.len();
                let mut store = Some(store);
                if cluster {
                    ops.extend(store.take().map(Op::Script));
                }
                for index in std::iter::once(self.index_key("cx", "/"))
                    .chain(put.tags.iter().map(|tag| self.index_key("ct", tag)))
                {
                    ops.push(Op::Script(redis_store::index_record(
                        &index, &put.url, ttl, &extras, &key, cluster,
                    )));
                }
                if cluster {
                    ops.push(redis_store::publish(&self.channel, &message));
                }
                ops.extend(store.take().map(Op::Script));
                let replies = if cluster {
                    redis_store::run_ops(&mut conn, &ops).await?
                } else {
                    let mut pipe = redis::pipe();
                    for op in &ops {
                        if let Op::Script(invocation) = op {
                            pipe.invoke_script(invocation);
                        }
                    }
                    tower_redis_core::pipeline_with_scripts::<Vec<Value>>(
                        &mut conn,
                        &pipe,
                        &[&DATA_PUT, &INDEX],
                    )
                    .await?
                };
                let (reply, index_purged) = redis_store::put_replies(&replies, indexes, cluster);
                Ok((reply, index_purged, asked_ms_ago))
            })
            .await?;
        self.finish_put(reply, index_purged, Kind::Data, put, asked_ms_ago)
            .await;
        Ok(())
    }

    async fn lock_value(
        &self,
        url_hash: &str,
        purpose: LockPurpose,
        token: &LockToken,
    ) -> Result<LockAttempt, tower_redis_core::Error> {
        self.run_lock(&DATA_LOCK, url_hash, &DATA_VARIANT, purpose, token)
            .await
    }
}

/// `HGET <hash> <field>`: the entry, decoded without a copy of its bytes.
/// A soft purge writes its mark into a value's entry (`soft_purge.lua`),
/// so the hash's `sp` field need not be read (but for a value stored by an
/// earlier version, `data::value::lacks_its_marks`): one bulk string is
/// the whole reply, as a `GET`'s. A reply that is an array (`HMGET`'s) is
/// an allocation and a parse more, made on the connection's task and freed
/// on the caller's, often another thread: at high concurrency that showed
/// as contention on the allocator's locks.
/// `HGET` of a value's entry.
#[allow(
    clippy::ptr_arg,
    reason = "a gathered read's query is the key, a `String`"
)]
fn read_command(key: &String) -> redis::Cmd {
    // Sized up front: the command is built without growing its buffers.
    let mut command = redis::Cmd::with_capacity(3, 4 + key.len() + DATA_VARIANT.len());
    command.arg("HGET").arg(key).arg(&*DATA_VARIANT);
    command
}

/// A value stored by an earlier version, with the hash's soft-purge mark
/// applied (one more `HGET`): a soft purge made before the upgrade may not
/// be written into its entry.
async fn with_the_hash_mark(
    mut conn: RedisConnection,
    key: &str,
    mut entry: Entry,
) -> RedisResult<Entry> {
    let mark: Option<u64> = redis::cmd("HGET")
        .arg(key)
        .arg("sp")
        .query_async(&mut conn)
        .await?;
    if let Some(at) = mark {
        entry.mark_stale_at(at);
    }
    Ok(entry)
}

/// The `HGET` reply's entry: the usual reply (a bulk string or nil) taken
/// as it is; anything else through redis-rs' own conversion, with its
/// errors (a server error, a reply of another shape).
fn entry_bytes(reply: Value) -> RedisResult<Option<Vec<u8>>> {
    match reply {
        Value::BulkString(bytes) => Ok(Some(bytes)),
        Value::Nil => Ok(None),
        other => Ok(redis::from_redis_value(other.extract_error()?)?),
    }
}

#[cfg(test)]
mod tests {
    use super::{DATA_VARIANT, Value, entry_bytes, redis};
    use crate::entry::Entry;
    use crate::store::redis_store::SOFT_PURGE;

    /// A soft purge writes into a data value's entry what a reader that
    /// applies the hash's mark computes (`Entry::mark_stale_at`), byte for
    /// byte: a value stored long before the mark, one whose freshness had
    /// ended already, one with an initial age, one stored after the mark,
    /// and one whose age takes three bytes. An HTTP URL's entries (no field
    /// named) are left as they are.
    #[tokio::test]
    async fn a_soft_purge_writes_the_readers_mark_into_a_value() {
        let redis = tower_redis_core::testing::TestRedis::start().await;
        let mut conn = redis.connection().await.expect("a connection");
        let now = redis.time_ms().await.expect("Redis' clock");
        let value = |stored_ms: u64, initial_age: u64, lifetime: u64| {
            let mut entry = crate::data::value::entry(b"{}", lifetime * 1000, true, stored_ms);
            entry.initial_age = initial_age;
            entry
        };
        let cases = [
            ("long-before", value(now - 90_500, 0, 3_600)),
            ("ended", value(now - 90_500, 0, 60)),
            ("aged", value(now - 10_000, 30, 3_600)),
            ("after", value(now + 60_000, 0, 3_600)),
            // An age that takes three bytes.
            ("wide", value(now - 3_000_000_500, 70_000, 10_000_000)),
        ];
        for (name, stored) in &cases {
            for field in [DATA_VARIANT.as_str(), ""] {
                let key = format!("soft:{name}:{}", field.is_empty());
                let _: () = redis::cmd("HSET")
                    .arg(&key)
                    .arg("vary")
                    .arg("")
                    .arg(&*DATA_VARIANT)
                    .arg(stored.encode())
                    .query_async(&mut conn)
                    .await
                    .expect("HSET");
                let marked: i64 = SOFT_PURGE
                    .key(&key)
                    .arg(field)
                    .invoke_async(&mut conn)
                    .await
                    .expect("the soft purge");
                assert_eq!(marked, 1);
                let (bytes, at): (Vec<u8>, u64) = redis::cmd("HMGET")
                    .arg(&key)
                    .arg(&*DATA_VARIANT)
                    .arg("sp")
                    .query_async(&mut conn)
                    .await
                    .expect("HMGET");
                let read = Entry::decode_shared(bytes.into()).expect("an entry");
                let mut expected = stored.clone();
                if !field.is_empty() {
                    expected.mark_stale_at(at);
                }
                assert_eq!(read, expected, "{name}, field {field:?}");
                // What a reader of the hash computes is unchanged.
                let mut applied = read.clone();
                applied.mark_stale_at(at);
                let mut from_the_hash = stored.clone();
                from_the_hash.mark_stale_at(at);
                assert_eq!(applied, from_the_hash, "{name}, field {field:?}");
            }
        }
        // The cases mark what they are meant to.
        let lifetime = |name: &str, at: u64| {
            let (_, stored) = cases.iter().find(|(n, _)| *n == name).expect("a case");
            let mut marked = stored.clone();
            marked.mark_stale_at(at);
            (marked.lifetime, stored.lifetime)
        };
        assert_eq!(lifetime("long-before", now), (90, 3_600));
        assert_eq!(lifetime("ended", now), (60, 60));
        assert_eq!(lifetime("aged", now), (40, 3_600));
        assert_eq!(lifetime("after", now), (3_600, 3_600));
        assert_eq!(lifetime("wide", now), (3_070_000, 10_000_000));
    }

    /// Whatever the reply, the answer is redis-rs' own conversion's (the
    /// one `query_async` made before): the same values, or an error of the
    /// same kind and text.
    #[test]
    fn the_read_reply_is_taken_apart_as_redis_rs_would() {
        let entry = || Value::BulkString(b"entry".to_vec());
        let error = || redis::parse_redis_value(b"-ERR no\r\n").expect("an error reply");
        assert!(matches!(error(), Value::ServerError(_)));
        let replies = [
            // The usual replies, taken as they are.
            entry(),
            Value::BulkString(Vec::new()),
            Value::Nil,
            // A server error in place of the reply.
            error(),
            // Other shapes, RESP3 ones included.
            Value::SimpleString("entry".to_owned()),
            Value::Okay,
            Value::Int(5),
            Value::Array(vec![entry(), Value::Nil]),
            Value::Array(vec![error()]),
            Value::Set(vec![entry()]),
            Value::Map(vec![(entry(), Value::Nil)]),
            Value::Push {
                kind: redis::PushKind::Message,
                data: vec![entry()],
            },
        ];
        crate::store::assert_same_as_redis_rs(replies, entry_bytes);
    }
}
