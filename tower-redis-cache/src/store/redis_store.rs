//! The Redis side.
//!
//! - A hash per URL (`c:<url hash>`): `vary` (the response's `Vary` names),
//!   one `e:<variant>` field per variant, and `sp`, the time of the last
//!   soft purge. Read with one `HMGET` (or, without a `Vary` hint, one
//!   script; a data value, whose soft purges are also written into its
//!   entry, with one `HGET`: `store/data.rs`) and
//!   written with one script. The entry is one bulk value of that reply,
//!   decoded without a copy (`Entry::decode_shared`). Measured on Redis
//!   7.0 (`redis-benchmark`, `INFO commandstats`), an `HMGET` of `vary`, a
//!   64 KiB entry and `sp` costs the server what a `GET` of a 64 KiB
//!   string costs on the same kind of connection (2.7 / 2.8 µs a call on
//!   one connection, 3.4 / 3.5 with 64 pipelined, 3.9 / 3.8 over 64
//!   connections): the server time of a hit follows the bytes waiting in
//!   the client's output buffer, not the command. So the entry stays a
//!   field of the URL's hash; a separate body key would add a command per
//!   hit and a key per variant that purges would have to find.
//! - Indexes (`ct:<tag>` per tag, `cx:<path prefix>` per directory level of
//!   the path, `/` included): sorted sets of URLs scored by when their entry
//!   expires, pruned of expired members on every write. A purge reads the
//!   index and deletes the URLs' hashes: O(entries under the tag or prefix),
//!   on Redis Cluster too (every command names one key).
//! - A fill lock per URL for request coalescing across instances: the
//!   `lk` field of the URL's hash (`token:expiry`), taken by a script that
//!   also reports an entry stored meanwhile, released by token when the
//!   entry is written. Being a field of the URL's hash keeps the check and
//!   the lock atomic on Redis Cluster; a holder that dies frees it by expiry.
//! - A pub/sub channel (`cache-events`) on which writers announce updated
//!   URLs, so that waiting instances wake up and near caches drop copies.

use std::borrow::Cow;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use tower_redis_core::redis::aio::ConnectionLike;
use tower_redis_core::redis::{self, Cmd, RedisResult, Script, ScriptInvocation, Value};
use tower_redis_core::{RedisConnection, RedisManager};

use super::purge::Removed;
use super::{EntryStore, Found, LockAttempt, LockPurpose, LockToken, MAX_VARIANTS, Put, Target};
use crate::bus::Bus;
use crate::entry::Entry;
use crate::key;

/// The lookup script's source: read-only, so a replica may run it
/// (`EVALSHA_RO`, see [`lookup`]).
const LOOKUP_SOURCE: &str = include_str!("lookup.lua");
pub(crate) static LOOKUP: LazyLock<Script> = LazyLock::new(|| Script::new(LOOKUP_SOURCE));
pub(crate) static PUT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("put.lua")));
pub(crate) static INDEX: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("index.lua")));
pub(crate) static LOCK: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lock.lua")));
pub(crate) static UNLOCK: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("unlock.lua")));
pub(crate) static DELETE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("delete.lua")));
pub(crate) static SOFT_PURGE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("soft_purge.lua")));

/// The shared side of the cache: entries, indexes, locks and
/// announcements in Redis.
#[derive(Debug)]
pub(crate) struct RedisStore {
    pub(crate) manager: RedisManager,
    /// The bus channel that writes are announced on.
    pub(super) channel: String,
    pub(super) index_depth: usize,
    pub(super) lock_ttl: Duration,
    /// When this store last warned of a fill it could not store.
    pub(super) dropped_warning: DroppedWarning,
}

impl RedisStore {
    /// [`EntryStore::lookup`] on a replica where the manager reads from
    /// replicas (a cluster), else on the primary; see
    /// `RedisManager::run_read` for the staleness this allows.
    pub(super) async fn lookup_on_replica(
        &self,
        url_hash: &str,
        request: &HeaderMap,
        extra: &str,
        vary_hint: Option<String>,
    ) -> Result<(Found, Option<String>), tower_redis_core::Error> {
        let key = self.redis_key(url_hash);
        let (key, hint) = (&key, &vary_hint);
        self.manager
            .run_read(|conn| lookup(conn, key, request, extra, hint.clone(), Reads::Replica))
            .await
    }

    pub(super) fn redis_key(&self, url_hash: &str) -> String {
        self.manager.keys().key(&["c", url_hash])
    }

    pub(super) fn index_key(&self, kind: &str, name: &str) -> String {
        self.manager.keys().key(&[kind, name])
    }

    pub(super) async fn run_ops(&self, ops: &[Op]) -> Result<Vec<Value>, tower_redis_core::Error> {
        self.manager
            .run(|mut conn| async move { run_ops(&mut conn, ops).await })
            .await
    }

    /// Deletes a URL's entries, leaving a tombstone for
    /// [`tombstone_ttl_ms`](Self::tombstone_ttl_ms), as `tombstone` says
    /// (see `delete.lua`).
    pub(super) fn delete(&self, url_hash: &str, tombstone: Tombstone) -> ScriptInvocation<'static> {
        let mut delete = DELETE.key(self.redis_key(url_hash));
        delete.arg(self.tombstone_ttl_ms()).arg(match tombstone {
            Tombstone::Stored => "stored",
            Tombstone::Always => "always",
            Tombstone::Locked => "locked",
        });
        delete
    }

    /// The fill lock's lifetime, in ms (at least 1).
    pub(super) fn lock_ttl_ms(&self) -> u64 {
        tower_redis_core::clock::duration_ms(self.lock_ttl).max(1)
    }

    /// How long a purge's tombstone lives, in ms: [`TOMBSTONE_LOCKS`] fill
    /// lock lifetimes, at least [`MIN_TOMBSTONE`]. A fill (or a data
    /// cache's factory) that asked longer ago than this, by its own
    /// account, is not stored (`put.lua`): a purge made early in its
    /// question may have left a tombstone that is gone by the time its
    /// answer comes.
    pub(super) fn tombstone_ttl_ms(&self) -> u64 {
        tombstone_ttl_ms(self.lock_ttl)
    }

    /// Deletes URLs' entries and announces each, in one round trip.
    pub(super) async fn delete_urls(
        &self,
        url_hashes: &[String],
        tombstone: Tombstone,
    ) -> Result<(), tower_redis_core::Error> {
        let ops = &self.delete_ops(url_hashes.iter().map(String::as_str), tombstone);
        self.manager
            .run(|mut conn| async move { run_ops(&mut conn, ops).await.map(|_| ()) })
            .await
    }

    /// Deletes URLs' entries and announces each.
    pub(super) fn delete_ops<'a>(
        &self,
        url_hashes: impl Iterator<Item = &'a str>,
        tombstone: Tombstone,
    ) -> Vec<Op> {
        let mut ops = Vec::new();
        for url_hash in url_hashes {
            ops.push(Op::Script(self.delete(url_hash, tombstone)));
            ops.push(publish(&self.channel, &Bus::updated_message(url_hash)));
        }
        ops
    }
}

/// Redis' own errors: [`CacheStore`](super::CacheStore) runs lookups,
/// writes and invalidations through core's failover (which counts the
/// fallback); purges and locks report the error (see `purge.rs` and
/// `lock.rs`).
impl EntryStore for RedisStore {
    type Error = tower_redis_core::Error;

    /// Not an `async fn`, which would hold its arguments twice in the
    /// future of every lookup (boxed per request).
    fn lookup(
        &self,
        url_hash: &str,
        request: &HeaderMap,
        extra: &str,
        vary_hint: Option<String>,
    ) -> impl Future<Output = Result<(Found, Option<String>), tower_redis_core::Error>> + Send {
        let key = self.redis_key(url_hash);
        async move {
            self.manager
                .run(|conn| lookup(conn, &key, request, extra, vary_hint, Reads::Primary))
                .await
        }
    }

    /// The entry, its index records, the lock release and the
    /// announcement: one pipelined round trip.
    async fn put(
        &self,
        put: &Put,
        unlock: Option<&LockToken>,
    ) -> Result<(), tower_redis_core::Error> {
        let key = self.redis_key(&put.url_hash);
        let mut indexes: Vec<String> = key::directories(&put.url, self.index_depth)
            .into_iter()
            .map(|dir| self.index_key("cx", dir))
            .collect();
        indexes.extend(put.tags.iter().map(|tag| self.index_key("ct", tag)));
        let message = Bus::updated_message(&put.url_hash);
        let extras = Extras {
            indexes: &indexes,
            url: &put.url,
            unlock: unlock.map(LockToken::as_str),
            announce: Some((&self.channel, &message)),
            tombstone_ms: self.tombstone_ttl_ms(),
            asked_ms_ago: None,
            lock_taken_at_us: put.asked.and(unlock.and_then(LockToken::taken_at_us)),
        };
        let (reply, index_purged, asked_ms_ago) = self
            .manager
            .run(|conn| self::put(conn, &key, put, &extras))
            .await?;
        self.finish_put(reply, index_purged, Kind::Page, put, asked_ms_ago)
            .await;
        Ok(())
    }

    async fn invalidate(&self, url_hashes: &[String]) -> Result<(), tower_redis_core::Error> {
        self.delete_urls(url_hashes, Tombstone::Stored).await
    }

    async fn purge(
        &self,
        target: &Target,
        soft_at: Option<u64>,
    ) -> Result<u64, tower_redis_core::Error> {
        self.purge_indexed(target, soft_at, &mut Removed::default(), false)
            .await
    }

    async fn lock(
        &self,
        url_hash: &str,
        variant: Option<&str>,
        purpose: LockPurpose,
        token: &LockToken,
    ) -> Result<LockAttempt, tower_redis_core::Error> {
        self.take_lock(url_hash, variant, purpose, token).await
    }

    async fn unlock(&self, lock: LockToken, url_hash: &str) -> Result<(), tower_redis_core::Error> {
        self.release_lock(lock, url_hash).await
    }
}

/// Finds the variant a request selects, in one round trip (two when the
/// hint is wrong).
///
/// With `vary_hint` (the `Vary` names this instance assumes: as last seen,
/// or empty for a URL it found absent) it is a plain
/// `HMGET key vary <variant> sp`; only when there is no hint does the
/// lookup script resolve the variant inside Redis, and after the `HMGET`
/// when the URL's `Vary` is not the hinted one. Returns what was found and
/// the `Vary` names seen.
///
/// A plain function, not an `async fn` (which would hold its arguments
/// twice); the script's path is boxed, so that neither is part of a hinted
/// lookup's future (a hit's, boxed per request).
pub(crate) fn lookup<'a>(
    mut conn: RedisConnection,
    key: &'a str,
    request: &'a HeaderMap,
    extra: &'a str,
    vary_hint: Option<String>,
    reads: Reads,
) -> impl Future<Output = RedisResult<(Found, Option<String>)>> + Send + 'a {
    use futures_util::future::Either;
    let Some(hint) = vary_hint else {
        return Either::Right(Box::pin(lookup_by_script(conn, key, request, extra, reads)));
    };
    Either::Left(async move {
        let query = (key.to_owned(), key::variant_of(&hint, request, extra));
        let reply = conn.req_packed_command(&hinted_command(&query)).await?;
        match hinted_found(reply, &hint, query.1)? {
            Some(found) => Ok(found),
            // The URL's Vary changed since this instance saw it.
            None => Box::pin(lookup_by_script(conn, key, request, extra, reads)).await,
        }
    })
}

/// The hinted lookup's `HMGET key vary <variant> sp`, for `(key, variant)`.
pub(super) fn hinted_command((key, field): &(String, Cow<'static, str>)) -> Cmd {
    // Sized up front: the command is built without growing its buffers.
    let mut command = redis::Cmd::with_capacity(5, 5 + key.len() + 4 + field.len() + 2);
    command
        .arg("HMGET")
        .arg(key)
        .arg("vary")
        .arg(field)
        .arg("sp");
    command
}

/// What the hinted `HMGET`'s reply says, with the `Vary` names seen; `None`
/// when the URL's `Vary` is not `hint` (the lookup script resolves it).
pub(super) fn hinted_found(
    reply: Value,
    hint: &str,
    field: Cow<'static, str>,
) -> RedisResult<Option<(Found, Option<String>)>> {
    let (vary, entry, soft_purged) = hinted_reply(reply)?;
    Ok(match vary {
        None => Some((Found::NoUrl, None)),
        Some(vary) if vary == hint => {
            Some((found(true, bulk(entry), field, soft_purged), Some(vary)))
        }
        Some(_) => None,
    })
}

/// The three values of the hinted `HMGET` reply (`vary`, the entry, `sp`):
/// the usual reply taken apart in place ([`super::plain_items`]), anything
/// else through redis-rs' own conversion, with its errors.
fn hinted_reply(reply: Value) -> RedisResult<(Option<String>, Value, Option<u64>)> {
    match super::plain_items(reply) {
        Ok([vary, entry, mark]) => Ok((
            redis::from_redis_value(vary)?,
            entry,
            redis::from_redis_value(mark)?,
        )),
        Err(reply) => Ok(redis::from_redis_value(reply.extract_error()?)?),
    }
}

/// The lookup script (no hint, or the URL's `Vary` changed): resolves the
/// variant inside Redis, on the primary or (`EVALSHA_RO`) a replica.
pub(super) async fn lookup_by_script(
    mut conn: RedisConnection,
    key: &str,
    request: &HeaderMap,
    extra: &str,
    reads: Reads,
) -> RedisResult<(Found, Option<String>)> {
    let mut invocation = LOOKUP.key(key);
    invocation.arg(key::value_digest(extra));
    // Digests of the values, not the values: no cookie or credential is
    // sent to Redis.
    let mut args: Vec<(&str, String)> = Vec::new();
    for name in request.keys() {
        if let Some(value) = key::selecting_value(request, name.as_str()) {
            args.push((name.as_str(), key::value_digest(&value)));
        }
    }
    let (vary, entry, field, soft_purged): (Option<String>, Value, Option<String>, Option<u64>) =
        match reads {
            Reads::Primary => {
                for (name, digest) in &args {
                    invocation.arg(*name).arg(digest);
                }
                invocation.invoke_async(&mut conn).await?
            }
            // `EVALSHA_RO`: a read-only command, which a replica runs (and
            // redis-rs routes to one); a replica that has not seen the
            // script yet gets its source once (`EVAL_RO` caches it).
            Reads::Replica => {
                let readonly = |command: &str, script: &str| {
                    let mut cmd = redis::cmd(command);
                    cmd.arg(script)
                        .arg(1)
                        .arg(key)
                        .arg(key::value_digest(extra));
                    for (name, digest) in &args {
                        cmd.arg(*name).arg(digest);
                    }
                    cmd
                };
                match readonly("EVALSHA_RO", LOOKUP.get_hash())
                    .query_async(&mut conn)
                    .await
                {
                    Err(error)
                        if error.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        readonly("EVAL_RO", LOOKUP_SOURCE)
                            .query_async(&mut conn)
                            .await?
                    }
                    other => other?,
                }
            }
        };
    Ok((
        found(
            vary.is_some(),
            bulk(entry),
            field.unwrap_or_default().into(),
            soft_purged,
        ),
        vary,
    ))
}

/// Where a lookup may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reads {
    /// The primary: `EVALSHA` for the script.
    Primary,
    /// A replica, where the manager reads from replicas: `EVALSHA_RO`.
    Replica,
}

/// A bulk string of a reply, taken over without a copy (`Bytes` owns the
/// buffer redis-rs read it into); anything else (nil, `false` from a
/// script) is none.
fn bulk(value: Value) -> Option<Bytes> {
    match value {
        Value::BulkString(bytes) => Some(Bytes::from(bytes)),
        _ => None,
    }
}

/// What a lookup's reply says: `has_url` when the URL's hash exists (its
/// `vary` field was there).
/// `field` names the variant, for a corrupt entry to be deleted: borrowed
/// for the variant of a URL without `Vary` (most), so that a hit copies
/// nothing of it.
fn found(
    has_url: bool,
    entry: Option<Bytes>,
    field: Cow<'static, str>,
    soft_purged: Option<u64>,
) -> Found {
    match (has_url, entry) {
        (false, _) => Found::NoUrl,
        (true, None) => Found::NoVariant,
        (true, Some(bytes)) => match Entry::decode_shared(bytes) {
            Ok(mut entry) => {
                if let Some(at) = soft_purged {
                    entry.mark_stale_at(at);
                }
                Found::Entry(entry)
            }
            Err(_) => Found::Corrupt(field.into_owned()),
        },
    }
}

/// One command of a batch: a script, a plain command, or an announcement
/// of the batch's writes (which must not be heard before they are done).
pub(crate) enum Op {
    Script(ScriptInvocation<'static>),
    Cmd(Cmd),
    Announce(Cmd),
}

/// Runs read commands on possibly different keys of a single server (not a
/// cluster, where a pipeline cannot span slots), answering with one reply
/// per command, in order: one pipeline.
pub(crate) async fn run_commands(
    mut conn: RedisConnection,
    commands: Vec<Cmd>,
) -> RedisResult<Vec<Value>> {
    let count = commands.len();
    let mut pipe = redis::pipe();
    for command in commands {
        pipe.add_command(command);
    }
    conn.req_packed_commands(&pipe, 0, count).await
}

/// Runs a batch of commands on possibly different keys, answering with
/// one value per command, in order: one pipeline on a single server (which
/// runs them in order, so an announcement placed after the writes it
/// announces is sent after they are done); on a cluster (where a pipeline
/// cannot span slots) the writes at once, each to its slot's node, and
/// only once every one is acknowledged the announcements. A subscriber that
/// hears of an update and reads the key at once (a near cache, an instance
/// waiting for a fill) then always reads the new value.
pub(crate) async fn run_ops(conn: &mut RedisConnection, ops: &[Op]) -> RedisResult<Vec<Value>> {
    if ops.is_empty() {
        return Ok(Vec::new());
    }
    if conn.is_cluster() {
        let is_announcement = |op: &&Op| matches!(op, Op::Announce(_));
        let writes = futures_util::future::try_join_all(
            ops.iter()
                .filter(|op| !is_announcement(op))
                .map(|op| send_one(conn.clone(), op)),
        )
        .await?;
        let announcements = futures_util::future::try_join_all(
            ops.iter()
                .filter(is_announcement)
                .map(|op| send_one(conn.clone(), op)),
        )
        .await?;
        let (mut writes, mut announcements) = (writes.into_iter(), announcements.into_iter());
        return Ok(ops
            .iter()
            .filter_map(|op| match op {
                Op::Announce(_) => announcements.next(),
                _ => writes.next(),
            })
            .collect());
    }
    let mut pipe = redis::pipe();
    for op in ops {
        match op {
            Op::Script(invocation) => {
                pipe.invoke_script(invocation);
            }
            Op::Cmd(cmd) | Op::Announce(cmd) => {
                pipe.add_command(cmd.clone());
            }
        }
    }
    tower_redis_core::pipeline_with_scripts(
        conn,
        &pipe,
        &[&PUT, &INDEX, &UNLOCK, &SOFT_PURGE, &DELETE],
    )
    .await
}

async fn send_one(mut conn: RedisConnection, op: &Op) -> RedisResult<Value> {
    match op {
        Op::Script(invocation) => invocation.invoke_async::<Value>(&mut conn).await,
        Op::Cmd(cmd) | Op::Announce(cmd) => cmd.query_async::<Value>(&mut conn).await,
    }
}

/// `PUBLISH channel message`, announcing the writes before it in its batch.
pub(crate) fn publish(channel: &str, message: &str) -> Op {
    let mut cmd = redis::cmd("PUBLISH");
    cmd.arg(channel).arg(message);
    Op::Announce(cmd)
}

/// Where a stored entry is also recorded, and what else goes into the
/// writing round trip.
pub(crate) struct Extras<'a> {
    /// Index keys (tags and path prefixes) and the URL to record in them.
    pub(crate) indexes: &'a [String],
    pub(crate) url: &'a str,
    /// The token of the fill lock to release.
    pub(crate) unlock: Option<&'a str>,
    /// The events channel and the message announcing the update.
    pub(crate) announce: Option<(&'a str, &'a str)>,
    /// How long a purge's tombstone lives (ms): a fill that asked longer
    /// ago is not stored.
    pub(crate) tombstone_ms: u64,
    /// How long ago the fill asked the origin ([`asked_ms_ago`], measured
    /// by [`put`] once it has a connection); `None` for a write that is no
    /// fill.
    pub(crate) asked_ms_ago: Option<u64>,
    /// When Redis granted the fill its lock (µs, Redis' clock), when it
    /// holds one and that is known: a surer bound on its question than
    /// [`asked_ms_ago`](Self::asked_ms_ago), with no margin.
    pub(crate) lock_taken_at_us: Option<u64>,
}

/// A purge's tombstone lives this many fill lock lifetimes: a fill that
/// lost its lock (its origin outlived it) is still checked against the
/// purges made while it waited, up to this long.
pub(crate) const TOMBSTONE_LOCKS: u32 = 12;

/// The shortest life of a tombstone, twice [`ASKED_MARGIN`]: with a fill
/// lock shorter than a sixth of a second, a fill without its lock is
/// stored when it took under a second.
pub(crate) const MIN_TOMBSTONE: Duration = Duration::from_secs(2);

/// See [`RedisStore::tombstone_ttl_ms`].
pub(crate) fn tombstone_ttl_ms(lock_ttl: Duration) -> u64 {
    let life = lock_ttl
        .checked_mul(TOMBSTONE_LOCKS)
        .unwrap_or(Duration::MAX)
        .max(MIN_TOMBSTONE);
    // Within what Lua's numbers hold exactly, and what `PEXPIRE` takes.
    tower_redis_core::clock::duration_ms(life).min(1 << 53)
}

/// Where a deletion leaves a tombstone (`delete.lua`), which a fill that
/// asked the origin before it finds (`put.lua`) and so drops its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tombstone {
    /// Where the URL had anything stored: a removal (a purge, an
    /// invalidation).
    Stored,
    /// Also where it had nothing: a purge of that one URL, which a fill
    /// may be asking the origin for.
    Always,
    /// Only where a fill lock (or a tombstone) was: a deletion that no
    /// fill must give way to (a value that does not decode).
    Locked,
}

/// How long ago a fill asked the origin, in ms, as `put.lua` takes it:
/// with [`ASKED_MARGIN`] for the time its write takes to reach Redis (in
/// the pool's queue, on the wire), which would otherwise place the
/// question later than it was. A clock set back since reads as the
/// longest time, longer than a tombstone lives: the fill is not stored
/// unless it still holds its lock.
pub(super) fn asked_ms_ago(asked: std::time::SystemTime) -> u64 {
    asked.elapsed().map_or(UNKNOWN_AGE_MS, |ago| {
        u64::try_from((ago + ASKED_MARGIN).as_millis()).unwrap_or(UNKNOWN_AGE_MS)
    })
}

/// See [`asked_ms_ago`]: a fill without its lock that asked the origin up
/// to this long after a purge reached Redis is dropped too, as one that
/// asked before it would be: losing such a fill costs a miss, storing one
/// that asked before would serve what the purge removed.
const ASKED_MARGIN: Duration = Duration::from_secs(1);

/// The age of a question whose time is unknown: older than any mark (a
/// thousand years, well within what Lua's numbers hold exactly).
const UNKNOWN_AGE_MS: u64 = 1000 * 365 * 24 * 3_600_000;

/// The whole write of an entry as one batch: the entry, its index
/// records, the lock release and the announcement. One round trip. Not on
/// a Redis Cluster, the index records go first and may leave the URL a
/// tombstone that the entry's script then finds (`index.lua`); on a
/// Cluster they go to their own nodes, and the answer says whether one of
/// them found a purge newer than the fill's question (the caller then
/// deletes what was stored).
pub(crate) async fn put(
    mut conn: RedisConnection,
    key: &str,
    put: &Put,
    extras: &Extras<'_>,
) -> RedisResult<(PutReply, bool, Option<u64>)> {
    // Measured once a connection is at hand: the margin it adds covers
    // the write's way from here on.
    let asked_ms_ago = put.asked.map(asked_ms_ago);
    let extras = &Extras {
        asked_ms_ago,
        ..*extras
    };
    let ttl = u64::try_from(put.keep_for.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let mut ops = Vec::with_capacity(extras.indexes.len() + 2);
    let mut store = PUT.key(key);
    store
        .arg(&put.vary)
        .arg(&put.variant)
        .arg(put.entry.encode())
        .arg(ttl)
        .arg(MAX_VARIANTS)
        .arg(extras.unlock.unwrap_or(""));
    match extras.asked_ms_ago {
        Some(ago) => store.arg(ago),
        None => store.arg(""),
    };
    store.arg(extras.tombstone_ms);
    let cluster = conn.is_cluster();
    let records = extras
        .indexes
        .iter()
        .map(|index| Op::Script(index_record(index, extras.url, ttl, extras, key, cluster)));
    if cluster {
        ops.push(Op::Script(store));
        ops.extend(records);
    } else {
        ops.extend(records);
        ops.push(Op::Script(store));
    }
    if let Some((channel, message)) = extras.announce {
        ops.push(publish(channel, message));
    }
    let replies = run_ops(&mut conn, &ops).await?;
    let (reply, index_purged) = put_replies(&replies, extras.indexes.len(), cluster);
    Ok((reply, index_purged, asked_ms_ago))
}

/// A fill's write read back, its ops in the order [`put`] sends them: the
/// store's answer, and whether an index record found a purge newer than
/// the fill's question that the store did not see (on a Cluster, where
/// the store goes first; on one server the records go first and the
/// store's own answer says so).
pub(crate) fn put_replies(replies: &[Value], indexes: usize, cluster: bool) -> (PutReply, bool) {
    if cluster {
        let mut records = replies.iter().skip(1).take(indexes);
        (
            PutReply::of(replies.first()),
            records.any(|reply| matches!(reply, Value::Int(0))),
        )
    } else {
        (PutReply::of(replies.get(indexes)), false)
    }
}

/// `index.lua`'s record of `url` (kept `ttl_ms`) under `index`, with what
/// it needs to tell a fill that a purge of the index came after its
/// question; `cluster`: the index may be on another node than the URL's
/// hash `url_key` (otherwise passed, to be given a tombstone then). On a
/// Cluster the lock's time and the mark's come from two nodes' clocks,
/// compared as they are: a skew between them of δ lets a locked fill whose
/// lock was granted within δ before the purge store (nodes kept in time by
/// NTP differ by milliseconds); a margin would instead drop every refill
/// that begins within it after a purge.
pub(crate) fn index_record(
    index: &str,
    url: &str,
    ttl_ms: u64,
    extras: &Extras<'_>,
    url_key: &str,
    cluster: bool,
) -> ScriptInvocation<'static> {
    let mut record = INDEX.key(index);
    if !cluster {
        record.key(url_key);
    }
    record.arg(url).arg(ttl_ms);
    match (extras.lock_taken_at_us, extras.asked_ms_ago) {
        (Some(at), _) => record.arg(at).arg(""),
        (None, Some(ago)) => record.arg("").arg(ago),
        (None, None) => record.arg("").arg(""),
    };
    record
        .arg(extras.tombstone_ms)
        .arg(extras.unlock.unwrap_or(""));
    record
}

impl RedisStore {
    /// After a fill's write ([`put_replies`]): deletes what it stored when
    /// an index record found a newer purge, then counts and reports the
    /// outcome ([`report_put`](Self::report_put)).
    pub(crate) async fn finish_put(
        &self,
        mut reply: PutReply,
        index_purged: bool,
        kind: Kind,
        put: &Put,
        asked_ms_ago: Option<u64>,
    ) {
        if index_purged && reply == PutReply::Stored {
            reply = self.drop_purged_fill(&put.url_hash).await;
        }
        self.report_put(reply, kind, put, asked_ms_ago);
    }

    /// A fill stored its entry on a Redis Cluster, and a tag purge (or one
    /// of everything) came after its question (the purge did not find the
    /// URL, stored after it read the index): the entry is deleted again,
    /// with a tombstone, and its removal announced.
    async fn drop_purged_fill(&self, url_hash: &str) -> PutReply {
        match self
            .delete_urls(&[url_hash.to_owned()], Tombstone::Stored)
            .await
        {
            Ok(()) => PutReply::Purged,
            Err(error) => {
                // Not an error of the store, which was written: the entry
                // stays until its TTL or the next purge.
                tracing::warn!(target: "tower_redis_cache", %error, url_hash, "a fill found a purge newer than its question, but what it stored could not be deleted");
                PutReply::Stored
            }
        }
    }
}

/// What `put.lua` (or the data cache's `DATA_PUT`) answered a fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PutReply {
    /// Stored (or a reply this version does not know: nothing to report).
    Stored,
    /// Dropped: a purge, removal or soft purge of the URL is newer than the
    /// fill's question.
    Purged,
    /// Dropped: the fill no longer held its lock and asked longer ago than
    /// a purge's tombstone lives, so it cannot tell whether a purge came
    /// while it asked.
    TooSlow,
    /// Dropped: the fill took the lock and lost it (its origin outlived
    /// `lock_ttl`) where the URL holds an older purge or soft-purge mark.
    LockLost,
}

impl PutReply {
    /// The scripts' answer: 1 stored, 0 purged, 2 too slow, 3 lock lost.
    pub(crate) fn of(reply: Option<&Value>) -> Self {
        match reply {
            Some(Value::Int(0)) => Self::Purged,
            Some(Value::Int(2)) => Self::TooSlow,
            Some(Value::Int(3)) => Self::LockLost,
            _ => Self::Stored,
        }
    }
}

/// Which cache a fill belongs to, for [`RedisStore::report_put`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Page,
    Data,
}

/// How often a store warns of fills it could not store because they took
/// too long: at most once a minute, with the number left unsaid since.
const DROPPED_WARNING_EVERY_MS: u64 = 60_000;

/// The last such warning (ms on a monotonic clock that starts with the
/// store, plus 1; 0: none yet) and the too-slow or lock-lost drops since
/// that were not warned of.
#[derive(Debug)]
pub(crate) struct DroppedWarning {
    origin: std::time::Instant,
    last_ms: AtomicU64,
    unsaid: AtomicU64,
}

impl Default for DroppedWarning {
    fn default() -> Self {
        Self {
            origin: std::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            unsaid: AtomicU64::new(0),
        }
    }
}

impl DroppedWarning {
    /// Now, for [`due`](Self::due): unmoved by changes to the wall clock.
    fn now_ms(&self) -> u64 {
        tower_redis_core::clock::duration_ms(self.origin.elapsed()).saturating_add(1)
    }

    /// Whether to warn now; if so, how many drops went unsaid before this
    /// one. One caller in a minute wins.
    fn due(&self, now_ms: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        if (last != 0 && now_ms.saturating_sub(last) < DROPPED_WARNING_EVERY_MS)
            || self
                .last_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.unsaid.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.unsaid.swap(0, Ordering::Relaxed))
    }
}

impl RedisStore {
    /// Counts a fill that was not stored
    /// (`tower_redis_cache_fills_dropped_total`) and says why: at debug
    /// level when a purge came while it asked (the purge did its job); as
    /// a warning, at most once a minute, when it took too long to be
    /// checked against purges (too slow, or its lock lost), which happens
    /// again at every such fill until `lock_ttl` is raised. The warning
    /// names a page by its URL without the query (which may carry secrets)
    /// and a data value by its URL hash; the debug line has the whole URL.
    pub(crate) fn report_put(
        &self,
        reply: PutReply,
        kind: Kind,
        put: &Put,
        asked_ms_ago: Option<u64>,
    ) {
        let kind = match kind {
            Kind::Page => "page",
            Kind::Data => "data",
        };
        let reason = match reply {
            PutReply::Stored => return,
            PutReply::Purged => "purged",
            PutReply::TooSlow => "too_slow",
            PutReply::LockLost => "lock_lost",
        };
        tower_redis_core::record::counter(
            "tower_redis_cache_fills_dropped_total",
            &[("kind", kind), ("reason", reason)],
            1,
        );
        tracing::debug!(target: "tower_redis_cache", kind, reason, url = %put.url, asked_ms_ago, "a fill was answered but not stored");
        if reply == PutReply::Purged {
            return;
        }
        let Some(unsaid) = self.dropped_warning.due(self.dropped_warning.now_ms()) else {
            return;
        };
        let page = match kind {
            "page" => put.url.split('?').next().unwrap_or_default(),
            _ => "",
        };
        tracing::warn!(
            target: "tower_redis_cache",
            kind,
            reason,
            page,
            url_hash = %put.url_hash,
            asked_ms_ago,
            lock_ttl_ms = self.lock_ttl_ms(),
            tombstone_ms = self.tombstone_ttl_ms(),
            unsaid,
            "an answer was served but not stored: it took longer than the fill lock (lock_lost) or a purge's tombstone (too_slow, twelve lock lifetimes) lives, so it could not be checked against purges; raise lock_ttl to cache it (CacheLayerBuilder's, or DataCacheBuilder's for a data cache built on its own; at most one such warning a minute, `unsaid` counts the others since the last)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, StatusCode};

    /// A store warns of fills it could not store at most once a minute,
    /// and says how many it left unsaid.
    #[test]
    fn dropped_fills_are_warned_of_once_a_minute() {
        let warning = DroppedWarning::default();
        let start = 1_700_000_000_000;
        assert_eq!(warning.due(start), Some(0));
        assert_eq!(warning.due(start + 1), None);
        assert_eq!(warning.due(start + DROPPED_WARNING_EVERY_MS - 1), None);
        assert_eq!(warning.due(start + DROPPED_WARNING_EVERY_MS), Some(2));
        assert_eq!(warning.due(start + DROPPED_WARNING_EVERY_MS + 1), None);
    }

    /// A tombstone lives twelve fill lock lifetimes, at least 2 s, and at
    /// most what Lua's numbers and `PEXPIRE` take.
    #[test]
    fn a_tombstone_lives_twelve_lock_lifetimes_at_least_two_seconds() {
        assert_eq!(tombstone_ttl_ms(Duration::from_secs(5)), 60_000);
        assert_eq!(tombstone_ttl_ms(Duration::from_millis(100)), 2_000);
        assert_eq!(tombstone_ttl_ms(Duration::from_millis(1)), 2_000);
        assert_eq!(tombstone_ttl_ms(Duration::MAX), 1 << 53);
    }

    /// A hit's body and header values are slices of the buffer redis-rs
    /// read the reply into: nothing of the entry is copied on the way.
    #[test]
    fn a_found_entry_shares_the_reply_buffer() {
        let mut headers = HeaderMap::new();
        headers.insert("etag", HeaderValue::from_static("\"v1\""));
        let entry = Entry {
            status: StatusCode::OK,
            headers,
            body: Bytes::from(vec![7u8; 4096]),
            response_time_ms: 1_700_000_000_000,
            initial_age: 0,
            lifetime: 60,
        };
        let reply = entry.encode();
        let range = reply.as_ptr_range();
        let Found::Entry(found) = found(
            true,
            bulk(Value::BulkString(reply)),
            Cow::Borrowed(""),
            None,
        ) else {
            panic!("the entry did not decode");
        };
        assert_eq!(found, entry);
        assert!(range.contains(&found.body.as_ptr()), "the body was copied");
        assert!(
            found
                .headers
                .values()
                .all(|v| range.contains(&v.as_bytes().as_ptr())),
            "a header value was copied"
        );
    }

    /// A URL that collects more variants than the bound starts over, but
    /// keeps its marks: the purge's tombstone, which a fill that asked the
    /// origin before the purge must still find (it used to go with the
    /// variants, and such a fill then stored the purged answer), the
    /// soft-purge mark and another instance's fill lock.
    #[tokio::test]
    async fn a_url_starting_over_keeps_its_marks() {
        let redis = tower_redis_core::testing::TestRedis::start().await;
        let mut conn = redis.connection().await.expect("connection");
        let marks = [
            ("lk", "other:1"),
            ("pg", "1700000000000"),
            ("sp", "1700000000001"),
        ];
        let mut fill = redis::cmd("HSET");
        fill.arg("url").arg("vary").arg("x-v");
        for variant in 0..=MAX_VARIANTS {
            fill.arg(format!("v{variant}")).arg("entry");
        }
        for (name, value) in marks {
            fill.arg(name).arg(value);
        }
        fill.query_async::<()>(&mut conn).await.expect("HSET");
        let long = 3_600_000;
        redis::cmd("PEXPIRE")
            .arg("url")
            .arg(long)
            .query_async::<()>(&mut conn)
            .await
            .expect("PEXPIRE");
        let stored: i64 = PUT
            .key("url")
            .arg("x-v")
            .arg("new")
            .arg("entry")
            .arg(60_000)
            .arg(MAX_VARIANTS)
            .arg("")
            .arg("")
            .invoke_async(&mut conn)
            .await
            .expect("put.lua");
        assert_eq!(stored, 1);
        let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg("url")
            .query_async(&mut conn)
            .await
            .expect("HGETALL");
        assert!(fields.len() < 10, "the variants started over: {fields:?}");
        assert_eq!(fields.get("new").map(String::as_str), Some("entry"));
        for (name, value) in marks {
            assert_eq!(fields.get(name).map(String::as_str), Some(value), "{name}");
        }
        // And they keep their lifetime, longer than the entry's.
        let ttl: i64 = redis::cmd("PTTL")
            .arg("url")
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        assert!(
            ttl > 60_000,
            "the marks' lifetime was cut to the entry's: {ttl} ms"
        );
    }

    #[test]
    fn only_a_bulk_string_is_an_entry() {
        assert_eq!(bulk(Value::Nil), None);
        assert_eq!(bulk(Value::Boolean(false)), None);
        assert_eq!(bulk(Value::Int(1)), None);
    }

    /// The hinted `HMGET` reply (`vary`, the entry, `sp`), taken apart in
    /// place when usual: whatever the reply, the answer is redis-rs' own
    /// conversion's, or an error of the same kind and text.
    #[test]
    fn the_hinted_reply_is_taken_apart_as_redis_rs_would() {
        let text = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        let entry = || text("entry");
        let error = || redis::parse_redis_value(b"-ERR no\r\n").expect("an error reply");
        assert!(matches!(error(), Value::ServerError(_)));
        let replies = [
            // The usual replies, taken apart in place.
            Value::Array(vec![text("accept"), entry(), text("1700000000000")]),
            Value::Array(vec![text(""), entry(), Value::Nil]),
            Value::Array(vec![text("accept"), Value::Nil, Value::Nil]),
            Value::Array(vec![Value::Nil, Value::Nil, Value::Nil]),
            // Values that do not convert: a mark that is not a number, a
            // `vary` that is not UTF-8.
            Value::Array(vec![text(""), entry(), text("x")]),
            Value::Array(vec![Value::BulkString(vec![0xff]), entry(), Value::Nil]),
            // Server errors: in place of the reply, or inside it.
            error(),
            Value::Array(vec![error(), entry(), Value::Nil]),
            Value::Array(vec![text(""), error(), Value::Nil]),
            Value::Array(vec![text(""), entry(), error()]),
            // Other arities and shapes, RESP3 ones included.
            Value::Array(vec![text(""), entry()]),
            Value::Array(vec![text(""), entry(), Value::Nil, Value::Nil]),
            Value::Array(vec![text(""), entry(), Value::Int(5)]),
            Value::Array(vec![Value::Int(1), entry(), Value::Nil]),
            Value::Set(vec![text(""), entry(), Value::Nil]),
            Value::Push {
                kind: redis::PushKind::Message,
                data: vec![text(""), entry(), Value::Nil],
            },
            Value::Nil,
            Value::Okay,
        ];
        crate::store::assert_same_as_redis_rs(replies, hinted_reply);
    }
}
