//! The Redis side of the store: the scripts and commands of each verb.
//!
//! Redis layout (all keys under the app's prefix):
//!
//! - `{<sha256(id)>}:s` — a hash per session: `d:<name>` the JSON value of
//!   each entry, `t:<name>` the time of its last change (`h:<sha1(name)>`
//!   for a name longer than 64 bytes; kept after removal while the hash has
//!   fewer than 2,048 fields: see `save.lua`), `_c` the creation time, `_u`
//!   the user. Its TTL is the idle timeout, capped by the absolute one.
//! - `{<sha256(id)>}:cycled` — left by a login's id cycle (`take.lua`, or
//!   its replay after an outage, `end_cycled.lua`) for the idle timeout:
//!   the new id, so that a cycle queued after its first step reached Redis
//!   finds its own work when it is replayed. A login whose cycle Redis
//!   acknowledged whole deletes it at once.
//! - `{<sha256(user)>}:u` — a set of the user's session hashes, for "log out
//!   everywhere".
//! - `{<sha256(user)>}:r` — when the user was last logged out everywhere
//!   (Redis' clock, ms), for the absolute timeout: a login or a session
//!   write naming the user that waited in an outage queue since before
//!   then is not replayed (see `users.rs`).
//!
//! Per-entry writes in one Lua script are what keep concurrent requests of
//! one session from losing each other's changes.
//!
//! Each verb exists twice: `*_on` runs on a connection the caller checked
//! out, and the [`Store`] implementation checks one out itself through
//! [`RedisManager::run`] (which accounts the outcome to the breaker); the
//! [`Failover`](super::failover::Failover) runs those under core's
//! failover, which adds the fallback metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use tower_redis_core::clock::duration_ms;
use tower_redis_core::redis::{self, Script};
use tower_redis_core::{
    Error, RedisConnection, RedisManager, TrackedCache, pipeline_with_scripts, query_script,
};

use super::{Record, Saved, Store, Take, Write, now_ms};
use crate::config::{Durability, Expiry};

static SAVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("save.lua")));
static TAKE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("take.lua")));
static END_CYCLED: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("end_cycled.lua")));

/// Sessions in Redis, through the shared manager.
pub(crate) struct RedisStore {
    manager: RedisManager,
    expiry: Expiry,
    durability: Durability,
    /// Copies of session hashes kept exact by Redis client tracking (keyed
    /// by the Redis key), when on: a read of a session unchanged since this
    /// instance last read it costs no round trip.
    tracked: Option<TrackedCache<Arc<Tracked>>>,
    /// Where ended sessions are announced (see `ended.rs`).
    ended_channel: String,
    /// This instance's copies, which the replay of the outage queue ends at
    /// once where it ends a session (not only through the announcement,
    /// which a Redis that refuses `PUBLISH` would lose): the copy of a
    /// session with queued changes holds them.
    local: Option<super::local::LocalStore>,
}

/// A session as Redis last answered it, with when its key expires.
#[derive(Debug)]
pub(crate) struct Tracked {
    record: Record,
    /// The key's expiry (`PTTL` at the read, from its start): no copy
    /// outlives the key, even before the expiry's invalidation arrives.
    expires_ms: u64,
    /// When this instance last renewed the idle timeout, as far as this
    /// copy knows (0: not known): the start of the renewing read (as the
    /// local copy records it, within microseconds) or of the renewing
    /// change, or, after a read that renewed nothing, the local copy's time
    /// that told it so ([`RedisStore::renewed_at`]). A read that finds it
    /// recent enough needs no look at the local copy to know that no
    /// renewal is due. The local copy's may be
    /// older (a change does not move it): that only makes a renewal due
    /// sooner.
    touched_ms: AtomicU64,
}

/// The bookkeeping of one tracked copy beyond its data.
const TRACKED_OVERHEAD: usize = 160;
/// The bookkeeping of one entry of a tracked copy.
const TRACKED_FIELD_OVERHEAD: usize = 48;

fn tracked_weight(copy: &Arc<Tracked>) -> usize {
    copy.record.size() + copy.record.fields.len() * TRACKED_FIELD_OVERHEAD + TRACKED_OVERHEAD
}

impl RedisStore {
    /// `tracked_bytes`: the bound of the tracked copies; 0 turns tracking
    /// off (and so does a cluster or a disabled manager).
    pub(crate) fn new(manager: RedisManager, expiry: Expiry, tracked_bytes: u64) -> Self {
        let tracked = match tracked_bytes {
            0 => None,
            bytes => manager
                .tracking()
                .map(|tracking| tracking.cache(bytes, tracked_weight)),
        };
        Self {
            ended_channel: super::ended::channel(&manager),
            manager,
            expiry,
            durability: Durability::Primary,
            tracked,
            local: None,
        }
    }

    /// With this instance's copies (see the field).
    pub(crate) fn with_local(mut self, local: super::local::LocalStore) -> Self {
        self.local = Some(local);
        self
    }

    /// Takes a session out of `user`'s index (one `SREM`): the replay's,
    /// for the user a session had when the change that gave it another is
    /// dropped and the session ends.
    pub(crate) async fn leave_index(
        &self,
        user: &str,
        storage_key: &str,
    ) -> Result<(), tower_redis_core::Error> {
        self.manager
            .query::<()>(redis::cmd("SREM").arg(self.user_key(user)).arg(storage_key))
            .await
    }

    /// The replay of the outage queue ended a session: this instance's
    /// copy goes now (the announcement ends the other instances').
    pub(crate) fn end_here(&self, storage_key: &str) {
        if let Some(local) = &self.local {
            local.end(storage_key);
        }
    }

    /// Logins and logouts wait for replicas as `durability` says.
    pub(crate) fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// With [`Durability::Replicated`]: `WAIT` on the connection that just
    /// wrote, within the same operation (one more round trip). Fewer
    /// confirmations than asked is logged, not an error: the write is on
    /// the primary.
    /// Whether logins and logouts wait for replicas (`Durability`).
    pub(crate) fn waits_for_replicas(&self) -> bool {
        matches!(self.durability, Durability::Replicated { .. })
    }

    pub(crate) async fn replicate(
        &self,
        conn: &mut RedisConnection,
        what: &str,
    ) -> redis::RedisResult<()> {
        let Durability::Replicated { replicas, timeout } = self.durability else {
            return Ok(());
        };
        let confirmed: i64 = redis::cmd("WAIT")
            .arg(replicas)
            .arg(duration_ms(timeout))
            .query_async(conn)
            .await?;
        if confirmed < i64::from(replicas) {
            tracing::warn!(target: "tower_redis", what, confirmed, wanted = replicas, ?timeout, "a session write was not confirmed by enough replicas in time; a failover now could lose it");
        }
        Ok(())
    }

    /// The tracked copy of a session, when tracking is live and Redis has
    /// not said it changed: no round trip. With it, when this instance
    /// last renewed the idle timeout as far as the copy knows (0: not
    /// known).
    pub(crate) fn tracked(&self, storage_key: &str, now_ms: u64) -> Option<(Record, u64)> {
        let tracked = self.tracked.as_ref()?;
        tower_redis_core::sync::with_scratch(&SESSION_KEY, |key| {
            write_session_key(&self.manager, key, storage_key);
            let copy = tracked.get(key)?;
            let deadline = copy.record.created_ms.saturating_add(self.absolute_ms());
            if now_ms >= copy.expires_ms || now_ms >= deadline {
                tracked.invalidate(key);
                return None;
            }
            Some((copy.record.clone(), copy.touched_ms.load(Ordering::Relaxed)))
        })
    }

    /// Tells the tracked copy of a session, if there is one, that this
    /// instance renewed the session's idle timeout at `renewed_ms` (as the
    /// local copy knows, which told a read that no renewal was due). A
    /// copy filled by such a read knows of no renewal otherwise, and each
    /// read it answered would look the local copy up as well. A later
    /// renewal known to the copy stays.
    pub(crate) fn renewed_at(&self, storage_key: &str, renewed_ms: u64) {
        let Some(tracked) = &self.tracked else { return };
        tower_redis_core::sync::with_scratch(&SESSION_KEY, |key| {
            write_session_key(&self.manager, key, storage_key);
            if let Some(copy) = tracked.get(key) {
                copy.touched_ms.fetch_max(renewed_ms, Ordering::Relaxed);
            }
        });
    }

    /// Drops this instance's tracked copy of a session it just changed,
    /// after Redis acknowledged (or refused) the change: later reads here
    /// do not wait for Redis' own invalidation.
    pub(crate) fn forget(&self, storage_key: &str) {
        if let Some(tracked) = &self.tracked {
            tracked.invalidate(&self.session_key(storage_key));
        }
    }

    /// The tracked copies' size in bytes (0 when tracking is off).
    pub(crate) fn tracked_bytes(&self) -> u64 {
        self.tracked.as_ref().map_or(0, TrackedCache::bytes)
    }

    /// The tracking connection the copies follow, when tracking is on.
    pub(crate) fn tracking(&self) -> Option<&tower_redis_core::Tracking> {
        self.tracked.as_ref().map(TrackedCache::tracking)
    }

    pub(crate) fn manager(&self) -> &RedisManager {
        &self.manager
    }

    pub(crate) fn expiry(&self) -> &Expiry {
        &self.expiry
    }

    /// Tells every instance (this one too) that the sessions of
    /// `storage_keys` ended (`cycled`: their ids were cycled away), once
    /// Redis has acknowledged it: see `ended.rs`.
    pub(crate) fn announce_ended(&self, cycled: bool, storage_keys: Vec<String>) {
        super::ended::announce(&self.manager, &self.ended_channel, cycled, storage_keys);
    }

    pub(crate) fn session_key(&self, storage_key: &str) -> String {
        session_key(&self.manager, storage_key)
    }

    /// The marker a cycle leaves when it takes the old id (`take.lua`,
    /// `end_cycled.lua`): the new id, under the old one's hash tag.
    fn cycled_key(&self, old_storage_key: &str) -> String {
        self.manager.keys().tagged(old_storage_key, &["cycled"])
    }

    /// How long that marker lives: the idle timeout.
    fn cycled_marker_ms(&self) -> u64 {
        duration_ms(self.expiry.idle).max(1)
    }

    pub(crate) fn user_key(&self, user: &str) -> String {
        self.user_tagged(user, "u")
    }

    /// When the user was last logged out everywhere (see `users.rs`),
    /// under the same hash tag as the user's index.
    pub(crate) fn revoked_key(&self, user: &str) -> String {
        self.user_tagged(user, "r")
    }

    fn user_tagged(&self, user: &str, suffix: &str) -> String {
        self.manager.keys().tagged(
            &URL_SAFE_NO_PAD.encode(Sha256::digest(user.as_bytes())),
            &[suffix],
        )
    }

    fn idle_ms(&self) -> u64 {
        duration_ms(self.expiry.idle)
    }

    pub(crate) fn absolute_ms(&self) -> u64 {
        duration_ms(self.expiry.absolute)
    }

    /// One round trip: `HGETALL`, pipelined with a `PEXPIRE` that renews the
    /// idle timeout when `touch`. A record past the absolute timeout is
    /// deleted and reads as absent.
    /// With `ttl`, the key's `PTTL` is read in the same round trip (for a
    /// tracked copy's expiry) and returned with the record; `None` when a
    /// write followed the read (the copy must not be kept).
    pub(crate) async fn load_on(
        &self,
        conn: &mut RedisConnection,
        storage_key: &str,
        touch: bool,
        ttl: bool,
    ) -> redis::RedisResult<Option<(Record, Option<u64>)>> {
        let key = self.session_key(storage_key);
        // One round trip of plain commands: renewing the idle TTL never
        // rewrites the data.
        // Each command sized up front: built without growing its buffers.
        let command = |name: &str, args: usize, bytes: usize| {
            let mut command = redis::Cmd::with_capacity(2 + args, name.len() + key.len() + bytes);
            command.arg(name).arg(&key);
            command
        };
        let (fields, pttl): (Vec<(String, String)>, Option<i64>) = if !touch && !ttl {
            // The usual read between renewals, untracked: one command, not
            // a pipeline of one (no reply list to build and take apart).
            (command("HGETALL", 0, 0).query_async(conn).await?, None)
        } else {
            let mut pipe = redis::Pipeline::with_capacity(3);
            if touch {
                pipe.add_command(command("PEXPIRE", 1, 20))
                    .arg(self.idle_ms())
                    .ignore();
            }
            pipe.add_command(command("HGETALL", 0, 0));
            if ttl {
                pipe.add_command(command("PTTL", 0, 0))
                    .query_async(conn)
                    .await?
            } else {
                let (fields,): (Vec<(String, String)>,) = pipe.query_async(conn).await?;
                (fields, None)
            }
        };
        if fields.is_empty() {
            return Ok(None);
        }
        let mut pttl = pttl.and_then(|pttl| u64::try_from(pttl).ok());
        let record = record_from_fields(fields);
        let deadline = record.created_ms.saturating_add(self.absolute_ms());
        let now = now_ms();
        let past = deadline <= now;
        if past || (touch && deadline - now < self.idle_ms()) {
            // Rare, and boxed: their state is not part of every load's.
            Box::pin(async {
                if past {
                    // Past the absolute timeout: ended, whatever its use.
                    redis::cmd("DEL").arg(&key).query_async::<()>(conn).await
                } else {
                    // Near the absolute timeout the key must not outlive it.
                    redis::cmd("PEXPIRE")
                        .arg(&key)
                        .arg(deadline - now)
                        .query_async::<()>(conn)
                        .await
                }
            })
            .await?;
            if past {
                return Ok(None);
            }
            // That `PEXPIRE` came after the read: on the tracking connection
            // it took the key out of the server's tracking table (its own
            // writes are not reported), so this answer is not kept.
            pttl = None;
        }
        Ok(Some((record, pttl)))
    }

    /// One round trip: the changes, entry by entry (plus the user index).
    pub(crate) async fn save_on(
        &self,
        conn: &mut RedisConnection,
        write: &Write<'_>,
    ) -> redis::RedisResult<SaveReply> {
        let key = self.session_key(write.storage_key);
        Box::pin(self.send_save(&key, write, true, conn)).await
    }

    /// A save's commands, built and sent. Every caller boxes this future:
    /// inlined, with its commands, the future of a session write was 1,512
    /// bytes, over the 1,032 the allocator's per-thread cache takes (a
    /// larger block comes from the shared arena, and first makes it
    /// consolidate its small free blocks).
    pub(crate) async fn send_save(
        &self,
        key: &str,
        write: &Write<'_>,
        renew: bool,
        conn: &mut RedisConnection,
    ) -> redis::RedisResult<SaveReply> {
        self.save_commands(key, write, renew).run(conn).await
    }

    /// A save that leaves this instance's tracked copy current, when it
    /// can: a plain update (no new session, no login, no replayed outage
    /// change) of a session this instance holds a tracked copy of. The
    /// script runs on the tracking connection, whose own writes Redis does
    /// not report (`NOLOOP`); it reads the key last, so the key stays
    /// tracked. When the write ticket survives the round trip, nobody else
    /// changed the session between the copy's read and the script, so the
    /// copy with this request's changes is what Redis holds: kept, and the
    /// next read here costs no round trip. The save renews the idle timeout
    /// only when the copy knows of no renewal by this instance within
    /// [`Expiry::renew_every_ms`], as a read does; a session changed on
    /// every request then costs Redis no `PEXPIRE` between renewals.
    /// `None`: not such a save.
    async fn save_tracked(&self, write: &Write<'_>) -> Option<Result<Saved, Error>> {
        let tracked = self.tracked.as_ref()?;
        if write.create.is_some() || write.changes.user.is_some() || write.at_ms.is_some() {
            return None;
        }
        let key = self.session_key(write.storage_key);
        let ticket = tracked.begin_write(&key)?;
        // After the ticket: an invalidation from here on voids it.
        let base = tracked.get(&key)?;
        let started_ms = now_ms();
        let base_touched_ms = base.touched_ms.load(Ordering::Relaxed);
        let renew = super::renewal_due(base_touched_ms, started_ms, self.expiry.renew_every_ms());
        let key = &key;
        let reply = tracked
            .tracking()
            .run(|mut conn| async move {
                // Boxed: see `send_save`.
                Box::pin(self.send_save(key, write, renew, &mut conn)).await
            })
            .await;
        Some(reply.map(|reply| {
            if let SaveReply::Written {
                ttl_ms: Some(ttl_ms),
                applied: true,
            } = reply
            {
                let mut record = base.record.clone();
                write.changes.apply_to(&mut record);
                ticket.fill(Arc::new(Tracked {
                    record,
                    expires_ms: started_ms.saturating_add(ttl_ms),
                    touched_ms: AtomicU64::new(if renew { started_ms } else { base_touched_ms }),
                }));
            }
            Saved::from(reply)
        }))
    }

    /// Two round trips: the old key is taken (read and deleted atomically),
    /// then what Redis held, with this request's changes, is written under
    /// the new key.
    pub(crate) async fn take_on(
        &self,
        conn: &mut RedisConnection,
        take: &Take<'_>,
    ) -> redis::RedisResult<Saved> {
        let taken: Option<Vec<(String, String)>> = TAKE
            .key(self.session_key(take.old_storage_key))
            .key(self.cycled_key(take.old_storage_key))
            .arg(self.absolute_ms())
            .arg(take.new_storage_key)
            .arg(self.cycled_marker_ms())
            .invoke_async(conn)
            .await?;
        let Some(taken) = taken else {
            return Ok(Saved::Gone);
        };
        // What Redis held (with other requests' changes), then ours.
        let mut record = record_from_fields(taken);
        let previous_user = record.user.clone();
        take.changes.apply_to(&mut record);
        let full = record.as_changes();
        let new_key = self.session_key(take.new_storage_key);
        let mut commands = self.save_commands(
            &new_key,
            &Write {
                storage_key: take.new_storage_key,
                create: Some(record.created_ms),
                changes: &full,
                previous_user: previous_user.as_deref(),
                at_ms: None,
            },
            true,
        );
        if let Some(user) = &previous_user {
            commands.extras.push(
                redis::cmd("SREM")
                    .arg(self.user_key(user))
                    .arg(take.old_storage_key)
                    .clone(),
            );
        }
        commands.run(conn).await.map(Saved::from)
    }

    /// One round trip: `DEL`, and the `SREM` from the user's index.
    pub(crate) async fn delete_on(
        &self,
        conn: &mut RedisConnection,
        storage_key: &str,
        user: Option<&str>,
    ) -> redis::RedisResult<()> {
        let mut extras = vec![redis::cmd("DEL").arg(self.session_key(storage_key)).clone()];
        if let Some(user) = user {
            extras.push(
                redis::cmd("SREM")
                    .arg(self.user_key(user))
                    .arg(storage_key)
                    .clone(),
            );
        }
        SaveCommands {
            script: None,
            extras,
        }
        .run(conn)
        .await
        .map(|_| ())
    }

    /// Ends the old id of a cycle made during an outage, as the outage
    /// queue is written (its key, its place in the index of the user Redis
    /// held with it and of `user`, the one the login read), and
    /// announces the end. True when Redis still held it (or this cycle
    /// already took it: a retry after a lost reply), false when it was
    /// gone. The marker the script leaves lives for the idle timeout.
    pub(crate) async fn end_cycled(
        &self,
        old_storage_key: &str,
        user: Option<&str>,
        new_storage_key: &str,
    ) -> Result<bool, tower_redis_core::Error> {
        let taken = self
            .manager
            .run(|mut conn| async move {
                let (taken, held): (i64, Option<String>) = END_CYCLED
                    .key(self.session_key(old_storage_key))
                    .key(self.cycled_key(old_storage_key))
                    .arg(new_storage_key)
                    .arg(self.cycled_marker_ms())
                    .invoke_async(&mut conn)
                    .await?;
                // The old id leaves the index of the user Redis held with
                // it (another request may have set one since this login
                // read the session), and of the one this login read.
                let mut users = vec![held.as_deref(), user];
                users.dedup();
                for user in users.into_iter().flatten() {
                    redis::cmd("SREM")
                        .arg(self.user_key(user))
                        .arg(old_storage_key)
                        .query_async::<()>(&mut conn)
                        .await?;
                }
                let taken = taken == 1;
                self.replicate(&mut conn, "id cycle").await?;
                Ok(taken)
            })
            .await;
        self.forget(old_storage_key);
        if let Ok(taken) = taken {
            self.announce_ended(taken, vec![old_storage_key.to_owned()]);
        }
        taken
    }

    /// The EVALSHA of one save, and the user-index update when the user is
    /// set. Without `renew`, an update leaves the key's TTL as it is (a new
    /// session always gets one).
    fn save_commands(&self, key: &str, write: &Write<'_>, renew: bool) -> SaveCommands {
        let changes = write.changes;
        let sets = changes.entries.iter().filter(|(_, value)| value.is_some());
        let removals = changes.entries.iter().filter(|(_, value)| value.is_none());
        let (set_count, removed_count) = (sets.clone().count(), removals.clone().count());
        // Sized up front: the command is the only buffer the save's
        // arguments are copied into.
        let entry_bytes: usize = changes
            .entries
            .iter()
            .map(|(name, value)| name.len() + value.as_ref().map_or(0, String::len))
            .sum();
        let mut script = tower_redis_core::script_cmd(
            &SAVE,
            &[key],
            8 + 2 * set_count + removed_count,
            64 + changes.user.as_ref().map_or(0, String::len) + entry_bytes,
        );
        script
            .arg(if write.create.is_some() {
                "create"
            } else {
                "update"
            })
            .arg(if renew || write.create.is_some() {
                self.idle_ms().to_string()
            } else {
                String::new()
            })
            .arg(self.absolute_ms())
            .arg(changes.user.as_deref().unwrap_or(""))
            .arg(write.create.map(|c| c.to_string()).unwrap_or_default())
            .arg(write.at_ms.map(|t| t.to_string()).unwrap_or_default())
            .arg(set_count);
        for (name, value) in sets {
            script.arg(name).arg(value.as_deref().unwrap_or_default());
        }
        script.arg(removed_count);
        for (name, _) in removals {
            script.arg(name);
        }
        SaveCommands {
            script: Some(script),
            extras: self.user_index_commands(write),
        }
    }

    /// The user-index update of a save that sets the user.
    fn user_index_commands(&self, write: &Write<'_>) -> Vec<redis::Cmd> {
        let mut extras = Vec::new();
        if let Some(user) = &write.changes.user {
            let user_key = self.user_key(user);
            extras.push(
                redis::cmd("SADD")
                    .arg(&user_key)
                    .arg(write.storage_key)
                    .clone(),
            );
            extras.push(
                redis::cmd("PEXPIRE")
                    .arg(&user_key)
                    .arg(self.absolute_ms())
                    .clone(),
            );
            // A session that changes hands leaves the previous user's index.
            if let Some(previous) = write.previous_user.filter(|p| *p != user) {
                extras.push(
                    redis::cmd("SREM")
                        .arg(self.user_key(previous))
                        .arg(write.storage_key)
                        .clone(),
                );
            }
        }
        extras
    }
}

impl Store for RedisStore {
    type Error = tower_redis_core::Error;

    /// Not an `async fn`, which would hold its arguments twice in the
    /// future of every load.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` would hold its arguments twice in its future"
    )]
    fn load(
        &self,
        storage_key: &str,
        touch: bool,
    ) -> impl Future<Output = Result<Option<Record>, Self::Error>> + Send {
        async move {
            let Some(tracked) = &self.tracked else {
                let loaded = self
                    .manager
                    .run(|mut conn| async move {
                        self.load_on(&mut conn, storage_key, touch, false).await
                    })
                    .await?;
                return Ok(loaded.map(|(record, _)| record));
            };
            // The ticket before the read: an invalidation that lands before the
            // answer voids it, so an answer older than a change is never kept.
            let key = self.session_key(storage_key);
            let ticket = tracked.begin(&key);
            let started_ms = now_ms();
            let loaded =
                tracked
                    .tracking()
                    .run(|mut conn| async move {
                        self.load_on(&mut conn, storage_key, touch, true).await
                    })
                    .await?;
            let Some((record, pttl)) = loaded else {
                // Absent, or deleted here past its absolute timeout.
                tracked.invalidate_written(&key);
                return Ok(None);
            };
            if pttl.is_none() {
                // Its TTL capped after the read: no longer tracked here.
                tracked.invalidate_written(&key);
            } else if touch {
                // The renewal came before the read, which refills this
                // cache; the other structures on the connection heard of
                // nothing.
                tracked.invalidate_others(&key);
            }
            if let (Some(ticket), Some(pttl)) = (ticket, pttl) {
                ticket.fill(Arc::new(Tracked {
                    record: record.clone(),
                    expires_ms: started_ms.saturating_add(pttl),
                    touched_ms: AtomicU64::new(if touch { started_ms } else { 0 }),
                }));
            }
            Ok(Some(record))
        }
    }

    async fn save(&self, write: &Write<'_>) -> Result<Saved, Self::Error> {
        if let Some(saved) = self.save_tracked(write).await {
            return saved;
        }
        let saved = self
            .manager
            .run(|mut conn| async move {
                let saved = Saved::from(self.save_on(&mut conn, write).await?);
                // Setting the user is a login.
                if matches!(saved, Saved::Written) && write.changes.user.is_some() {
                    self.replicate(&mut conn, "login").await?;
                }
                Ok(saved)
            })
            .await;
        self.forget(write.storage_key);
        if let (Ok(Saved::Written), Some(user)) = (&saved, &write.changes.user) {
            self.tidy_user_index(user);
        }
        saved
    }

    async fn take(&self, take: &Take<'_>) -> Result<Saved, Self::Error> {
        let taken = self
            .manager
            .run(|mut conn| async move {
                let saved = self.take_on(&mut conn, take).await?;
                if matches!(saved, Saved::Written) {
                    self.replicate(&mut conn, "id cycle").await?;
                }
                Ok(saved)
            })
            .await;
        self.forget(take.old_storage_key);
        self.forget(take.new_storage_key);
        if let (Ok(Saved::Written), Some(user)) = (&taken, &take.merged.user) {
            self.tidy_user_index(user);
        }
        if matches!(taken, Ok(Saved::Written)) {
            self.announce_ended(true, vec![take.old_storage_key.to_owned()]);
            // The cycle is whole in Redis (the replicas' wait included):
            // nothing will replay it, so its marker goes (in a task of its
            // own: the login does not wait for it; one that fails lives
            // out the idle timeout). Not before: a cycle that fails after
            // its take is queued, and its replay needs the marker.
            let manager = self.manager.clone();
            let marker = redis::cmd("DEL")
                .arg(self.cycled_key(take.old_storage_key))
                .clone();
            tokio::spawn(async move {
                let _ = manager.query::<()>(&marker).await;
            });
        }
        taken
    }

    async fn delete(&self, storage_key: &str, user: Option<&str>) -> Result<(), Self::Error> {
        let deleted = self
            .manager
            .run(|mut conn| async move {
                self.delete_on(&mut conn, storage_key, user).await?;
                self.replicate(&mut conn, "logout").await
            })
            .await;
        self.forget(storage_key);
        if deleted.is_ok() {
            self.announce_ended(false, vec![storage_key.to_owned()]);
        }
        deleted
    }
}

/// The Redis key of a session's hash.
/// One command per session of `batch` (`command` of its Redis key, for
/// their storage keys), as one operation of the manager: a pipeline (one
/// round trip), or on a Cluster, where the sessions live on other slots,
/// the commands at once. One time budget and one outcome for the breaker
/// however many commands: a stalled Redis costs one failure, not one a
/// session.
pub(crate) async fn per_session<T: redis::FromRedisValue + Send>(
    manager: &RedisManager,
    batch: &[String],
    command: impl Fn(String) -> redis::Cmd,
) -> Result<Vec<T>, Error> {
    let commands = session_commands(manager, batch, command);
    manager
        .run(|mut conn| async move { on_each(&mut conn, &commands).await })
        .await
}

/// `command` of the Redis key of each session of `batch`.
pub(crate) fn session_commands(
    manager: &RedisManager,
    batch: &[String],
    command: impl Fn(String) -> redis::Cmd,
) -> Vec<redis::Cmd> {
    batch
        .iter()
        .map(|storage_key| command(session_key(manager, storage_key)))
        .collect()
}

/// [`per_session`]'s commands on `conn`: pipelined, or at once on a
/// Cluster.
pub(crate) async fn on_each<T: redis::FromRedisValue + Send>(
    conn: &mut RedisConnection,
    commands: &[redis::Cmd],
) -> redis::RedisResult<Vec<T>> {
    if conn.is_cluster() {
        futures_util::future::try_join_all(commands.iter().map(|command| {
            let mut conn = conn.clone();
            async move { command.query_async::<T>(&mut conn).await }
        }))
        .await
    } else {
        let mut pipe = redis::pipe();
        for command in commands {
            pipe.add_command(command.clone());
        }
        pipe.query_async::<Vec<T>>(conn).await
    }
}

/// The last part of a session's key.
const SESSION_PART: &str = "s";

pub(crate) fn session_key(manager: &RedisManager, storage_key: &str) -> String {
    manager.keys().tagged(storage_key, &[SESSION_PART])
}

thread_local! {
    /// This thread's buffer for [`write_session_key`]: a lookup on every
    /// read needs the key only for a moment.
    static SESSION_KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// [`session_key`], appended to `key`.
fn write_session_key(manager: &RedisManager, key: &mut String, storage_key: &str) {
    manager
        .keys()
        .tagged_into(key, storage_key, &[SESSION_PART]);
}

/// A save's script and the commands on other keys (the user index, the
/// replaced session) that go with it.
struct SaveCommands {
    /// The save script's `EVALSHA` ([`tower_redis_core::script_cmd`]).
    script: Option<redis::Cmd>,
    extras: Vec<redis::Cmd>,
}

impl SaveCommands {
    /// One round trip on a single server: the script alone (the common
    /// save: no pipeline to build, copy or take apart), or pipelined with
    /// the other commands. On a cluster the other keys live in other slots,
    /// so they follow the script one by one.
    async fn run(&self, conn: &mut RedisConnection) -> redis::RedisResult<SaveReply> {
        if conn.is_cluster() || self.extras.is_empty() {
            let saved = match &self.script {
                Some(script) => query_script(conn, &SAVE, script).await?,
                None => SaveReply::DONE,
            };
            for cmd in &self.extras {
                cmd.query_async::<()>(conn).await?;
            }
            return Ok(saved);
        }
        let mut pipe = redis::pipe();
        if let Some(script) = &self.script {
            pipe.add_command(script.clone());
        }
        for cmd in &self.extras {
            pipe.add_command(cmd.clone()).ignore();
        }
        if self.script.is_some() {
            pipeline_with_scripts(conn, &pipe, &[&SAVE]).await
        } else {
            pipe.query_async::<()>(conn).await.map(|()| SaveReply::DONE)
        }
    }
}

/// What a save's script answered (see `save.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SaveReply {
    /// The session no longer exists: nothing was written.
    Gone,
    Written {
        /// The key's TTL as the script left it (`None`: not known).
        ttl_ms: Option<u64>,
        /// Every change was applied (none was older than the stored one).
        applied: bool,
    },
}

impl SaveReply {
    /// Written, by commands with nothing to tell (no script).
    const DONE: Self = Self::Written {
        ttl_ms: None,
        applied: true,
    };
}

impl From<SaveReply> for Saved {
    fn from(reply: SaveReply) -> Self {
        match reply {
            SaveReply::Gone => Saved::Gone,
            SaveReply::Written { .. } => Saved::Written,
        }
    }
}

impl redis::FromRedisValue for SaveReply {
    fn from_redis_value(value: redis::Value) -> Result<Self, redis::ParsingError> {
        // The script's reply (alone, or a pipeline's only non-ignored
        // one): 0 when the session is gone, the TTL as set when every
        // change was applied, -1 when one was kept out.
        let reply = match value {
            redis::Value::Int(reply) => reply,
            pipeline => {
                let replies: Vec<i64> = redis::FromRedisValue::from_redis_value(pipeline)?;
                let Some(&reply) = replies.first() else {
                    return Err("a session save's pipeline answered nothing".into());
                };
                reply
            }
        };
        Ok(match reply {
            0 => SaveReply::Gone,
            ttl if ttl > 0 => SaveReply::Written {
                ttl_ms: u64::try_from(ttl).ok(),
                applied: true,
            },
            _ => SaveReply::Written {
                ttl_ms: None,
                applied: false,
            },
        })
    }
}

fn record_from_fields(pairs: Vec<(String, String)>) -> Record {
    let (mut created_ms, mut user) = (0, None);
    let mut fields = HashMap::new();
    for (mut field, value) in pairs {
        if field.starts_with("d:") {
            // The name in place, without a copy.
            field.drain(..2);
            fields.insert(field, value);
        } else if field == "_c" {
            created_ms = value.parse().unwrap_or(0);
        } else if field == "_u" {
            user = Some(value);
        }
    }
    Record {
        fields: Arc::new(fields),
        created_ms,
        user,
    }
}
