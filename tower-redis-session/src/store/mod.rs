//! [`SessionStore`]: sessions in Redis, with local copies and queued writes
//! while Redis is unavailable.
//!
//! Redis layout (all keys under the app's prefix):
//!
//! - `{<sha256(id)>}:s` — a hash per session: `d:<name>` the JSON value of
//!   each entry, `t:<name>` the time of its last change (kept after removal),
//!   `_c` the creation time, `_u` the user. Its TTL is the idle timeout,
//!   capped by the absolute one.
//! - `{<sha256(user)>}:u` — a set of the user's session hashes, for "log out
//!   everywhere".
//!
//! Per-entry writes in one Lua script are what keep concurrent requests of
//! one session from losing each other's changes.

mod local;
mod queue;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use tower_redis_core::redis::{self, Script};
use tower_redis_core::{
    BreakerState, RedisConnection, RedisManager, Source, pipeline_with_scripts,
};

use crate::config::Expiry;
pub(crate) use local::LocalStore;
use queue::{Pending, QueueFull};

static SAVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("save.lua")));
static TAKE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("take.lua")));

/// A session's stored content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Record {
    /// Entry name → JSON.
    pub(crate) fields: HashMap<String, String>,
    pub(crate) created_ms: u64,
    pub(crate) user: Option<String>,
}

impl Record {
    /// What counts toward the session size limit: entry names, JSON values
    /// and the user id, in bytes.
    pub(crate) fn size(&self) -> usize {
        let fields: usize = self
            .fields
            .iter()
            .map(|(name, json)| name.len() + json.len())
            .sum();
        fields + self.user.as_ref().map_or(0, String::len)
    }
}

/// What one request changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// Entry name → new JSON, or `None` for a removal.
    pub(crate) entries: HashMap<String, Option<String>>,
    pub(crate) user: Option<String>,
}

impl Changes {
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.user.is_none()
    }

    pub(crate) fn apply_to(&self, record: &mut Record) {
        for (name, value) in &self.entries {
            match value {
                Some(json) => record.fields.insert(name.clone(), json.clone()),
                None => record.fields.remove(name),
            };
        }
        if let Some(user) = &self.user {
            record.user = Some(user.clone());
        }
    }
}

/// Whether a save found its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Saved {
    Written,
    /// The session no longer exists (destroyed, cycled or expired meanwhile);
    /// nothing was written, so it is not resurrected.
    Gone,
    /// Redis is unavailable and the outage queue has no room for it: nothing
    /// was kept (a new session is not created, an existing one is unchanged).
    Refused,
}

/// The byte bounds of the store's in-process side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LocalLimits {
    /// Local copies of sessions, for reading through an outage.
    pub(crate) copies_bytes: u64,
    /// Changes made during an outage, waiting for Redis.
    pub(crate) queue_bytes: usize,
}

/// How much of its in-process bounds a [`SessionStore`] uses, from
/// [`SessionStore::local_usage`]. Sizes are estimates of the memory taken
/// (data plus bookkeeping), the same ones the bounds are enforced on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalUsage {
    /// Changes made while Redis was unavailable, queued or being written.
    pub queued_changes: usize,
    /// Their size. At most
    /// [`outage_queue_bytes`](crate::SessionLayerBuilder::outage_queue_bytes),
    /// except that log outs are never refused: those of sessions this
    /// instance held copies of can take it over the bound.
    pub queued_bytes: usize,
    /// The outage queue's bound.
    pub queue_limit_bytes: usize,
    /// The size of the local copies of sessions: at most
    /// [`local_capacity_bytes`](crate::SessionLayerBuilder::local_capacity_bytes).
    pub local_copies_bytes: u64,
    /// Their bound.
    pub local_copies_limit_bytes: u64,
}

/// One of a user's sessions, from [`SessionStore::list_user_sessions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSession {
    /// An opaque handle (a hash, never the session id).
    pub handle: String,
    /// When the session began.
    pub created: SystemTime,
}

/// Why a store-level operation could not be done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Redis is unavailable, and the operation needs it (the in-process
    /// store cannot see other instances' sessions).
    #[error("Redis is unavailable; try again when it is back: {0}")]
    Unavailable(#[source] tower_redis_core::Error),
}

/// The sessions' storage: Redis through the shared manager, and in process
/// while Redis is unavailable. Cheap to clone.
#[derive(Clone)]
pub struct SessionStore {
    inner: Arc<StoreInner>,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("manager", &self.inner.manager)
            .field("expiry", &self.inner.expiry)
            .finish_non_exhaustive()
    }
}

struct StoreInner {
    manager: RedisManager,
    expiry: Expiry,
    limits: LocalLimits,
    local: LocalStore,
    reconciler_started: AtomicBool,
    /// Wakes the reconciler when a write had to be queued, whether or not
    /// the breaker moved.
    wake: Arc<tokio::sync::Notify>,
}

impl SessionStore {
    pub(crate) fn new(manager: RedisManager, expiry: Expiry, limits: LocalLimits) -> Self {
        Self {
            inner: Arc::new(StoreInner {
                manager,
                expiry,
                limits,
                local: LocalStore::new(limits.copies_bytes, limits.queue_bytes, expiry.idle),
                reconciler_started: AtomicBool::new(false),
                wake: Arc::new(tokio::sync::Notify::new()),
            }),
        }
    }

    /// How much of its in-process bounds the store uses: the outage queue
    /// and the local copies. For monitoring; not meant for every request.
    pub fn local_usage(&self) -> LocalUsage {
        LocalUsage {
            queued_changes: self.inner.local.pending_len(),
            queued_bytes: self.inner.local.queue_bytes(),
            queue_limit_bytes: self.inner.limits.queue_bytes,
            local_copies_bytes: self.inner.local.copies_bytes(),
            local_copies_limit_bytes: self.inner.limits.copies_bytes,
        }
    }

    /// Whether this instance saw the session end (destroyed, cycled away,
    /// revoked) in the last two minutes. No Redis call.
    pub(crate) fn has_ended(&self, storage_key: &str) -> bool {
        self.inner.local.has_ended(storage_key)
    }

    fn keys(&self) -> &tower_redis_core::Keyspace {
        self.inner.manager.keys()
    }

    fn session_key(&self, storage_key: &str) -> String {
        self.keys().tagged(storage_key, &["s"])
    }

    fn user_key(&self, user: &str) -> String {
        self.keys().tagged(
            &URL_SAFE_NO_PAD.encode(Sha256::digest(user.as_bytes())),
            &["u"],
        )
    }

    fn idle_ms(&self) -> u64 {
        millis(self.inner.expiry.idle)
    }

    fn absolute_ms(&self) -> u64 {
        millis(self.inner.expiry.absolute)
    }

    /// How often this instance renews a session's idle timeout in Redis:
    /// 1/100 of the idle timeout, at most a minute. Between renewals a read
    /// is a single `HGETALL`.
    fn touch_every_ms(&self) -> u64 {
        (self.idle_ms() / 100).min(60_000)
    }

    /// One round trip: `HGETALL`, pipelined with a `PEXPIRE` that renews the
    /// idle timeout when this instance has not renewed it for
    /// [`touch_every_ms`](Self::touch_every_ms). The absolute timeout is
    /// checked on the record.
    pub(crate) async fn load(&self, storage_key: &str) -> Option<Record> {
        self.start_reconciler();
        if self.inner.local.has_pending(storage_key) {
            // Changes from an outage are still on their way to Redis: this
            // instance's copy is the newer one.
            return self.inner.local.get(storage_key, self.absolute_ms());
        }
        let copy = self.inner.local.copy(storage_key);
        let started_ms = now_ms();
        let touch = copy
            .as_ref()
            .is_none_or(|copy| started_ms.saturating_sub(copy.touched_ms) >= self.touch_every_ms());
        let key = self.session_key(storage_key);
        let served = self
            .inner
            .manager
            .failover(
                |mut conn| {
                    let key = key.clone();
                    async move {
                        // One round trip of plain commands: renewing the
                        // idle TTL never rewrites the data.
                        let mut pipe = redis::pipe();
                        if touch {
                            pipe.cmd("PEXPIRE").arg(&key).arg(self.idle_ms()).ignore();
                        }
                        let (fields,): (Vec<(String, String)>,) =
                            pipe.cmd("HGETALL").arg(&key).query_async(&mut conn).await?;
                        if fields.is_empty() {
                            return Ok(None);
                        }
                        let record = record_from_fields(fields);
                        let deadline = record.created_ms.saturating_add(self.absolute_ms());
                        let now = now_ms();
                        if deadline <= now {
                            // Past the absolute timeout: ended, whatever its use.
                            redis::cmd("DEL")
                                .arg(&key)
                                .query_async::<()>(&mut conn)
                                .await?;
                            return Ok(None);
                        }
                        if touch && deadline - now < self.idle_ms() {
                            // Near the absolute timeout the key must not outlive it.
                            redis::cmd("PEXPIRE")
                                .arg(&key)
                                .arg(deadline - now)
                                .query_async::<()>(&mut conn)
                                .await?;
                        }
                        Ok(Some(record))
                    }
                },
                |_| async { self.inner.local.get(storage_key, self.absolute_ms()) },
            )
            .await;
        if served.source == Source::Redis {
            match (&served.value, copy) {
                // Unchanged and not renewed: the copy is already right.
                (Some(record), Some(copy)) if !touch && copy.record == *record => {}
                // A copy for reading through an outage.
                (Some(record), copy) => {
                    let touched_ms = match copy {
                        Some(copy) if !touch => copy.touched_ms,
                        _ => started_ms,
                    };
                    self.inner
                        .local
                        .put(storage_key, record.clone(), touched_ms);
                }
                (None, _) => self.inner.local.remove(storage_key),
            }
        }
        served.value
    }

    /// One round trip: the changes, entry by entry (plus the user index).
    /// `previous_user` is the session's user before the changes.
    pub(crate) async fn save(
        &self,
        storage_key: &str,
        create: Option<u64>,
        changes: &Changes,
        previous_user: Option<&str>,
    ) -> Saved {
        self.start_reconciler();
        let key = self.session_key(storage_key);
        let (value, queue) = if self.inner.local.has_pending(storage_key) {
            // Behind the session's earlier changes: see `has_pending`.
            (Saved::Written, true)
        } else {
            let served = self
                .inner
                .manager
                .failover(
                    |mut conn| async move {
                        let commands = self.save_commands(
                            &key,
                            storage_key,
                            create,
                            changes,
                            previous_user,
                            None,
                        );
                        commands.run(&mut conn).await
                    },
                    |_| async { Saved::Written },
                )
                .await;
            let queue = served.is_fallback();
            (served.value, queue)
        };
        if queue {
            if let Err(full) = self
                .inner
                .local
                .queue(storage_key, create, changes, now_ms())
            {
                refused(full, create.is_some());
                return Saved::Refused;
            }
            self.inner.wake.notify_one();
        }
        if value == Saved::Written {
            self.inner.local.apply(storage_key, create, changes);
        } else {
            self.inner.local.end(storage_key);
        }
        value
    }

    /// A new id for a session. The old key is taken (read and deleted
    /// atomically) first, so a session destroyed or revoked meanwhile is
    /// never recreated; then the record, with this request's changes, is
    /// written under the new key. Two round trips.
    pub(crate) async fn cycle(
        &self,
        old_storage_key: &str,
        new_storage_key: &str,
        merged: &Record,
        changes: &Changes,
    ) -> Saved {
        self.start_reconciler();
        let old_key = self.session_key(old_storage_key);
        let new_key = self.session_key(new_storage_key);
        let pending = self.inner.local.has_pending(old_storage_key);
        let (value, queue) = if pending {
            // Behind the session's earlier changes: see `has_pending`.
            (Saved::Written, true)
        } else {
            let served = self
                .inner
                .manager
                .failover(
                    |mut conn| async move {
                        let taken: Option<Vec<(String, String)>> = TAKE
                            .key(&old_key)
                            .arg(self.absolute_ms())
                            .invoke_async(&mut conn)
                            .await?;
                        let Some(taken) = taken else {
                            return Ok(Saved::Gone);
                        };
                        // What Redis held (with other requests' changes), then ours.
                        let mut record = record_from_fields(taken);
                        let previous_user = record.user.clone();
                        changes.apply_to(&mut record);
                        let full = Changes {
                            entries: record
                                .fields
                                .iter()
                                .map(|(k, v)| (k.clone(), Some(v.clone())))
                                .collect(),
                            user: record.user.clone(),
                        };
                        let mut commands = self.save_commands(
                            &new_key,
                            new_storage_key,
                            Some(record.created_ms),
                            &full,
                            previous_user.as_deref(),
                            None,
                        );
                        if let Some(user) = &previous_user {
                            commands.extras.push(
                                redis::cmd("SREM")
                                    .arg(self.user_key(user))
                                    .arg(old_storage_key)
                                    .clone(),
                            );
                        }
                        commands.run(&mut conn).await
                    },
                    |_| async { Saved::Written },
                )
                .await;
            let queue = served.is_fallback();
            (served.value, queue)
        };
        let full = Changes {
            entries: merged
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect(),
            user: merged.user.clone(),
        };
        if queue {
            if let Err(full) = self.inner.local.queue_cycle(
                old_storage_key,
                merged.user.as_deref(),
                new_storage_key,
                merged.created_ms,
                &full,
                now_ms(),
            ) {
                // Neither half is queued: the session keeps its old id.
                refused(full, false);
                return Saved::Refused;
            }
            self.inner.wake.notify_one();
        }
        self.inner.local.end(old_storage_key);
        if value == Saved::Written {
            self.inner
                .local
                .apply(new_storage_key, Some(merged.created_ms), &full);
        }
        value
    }

    /// Deletes a session (and its entry in the user index).
    pub(crate) async fn delete(&self, storage_key: &str, user: Option<&str>) {
        self.start_reconciler();
        let key = self.session_key(storage_key);
        let user_key = user.map(|u| self.user_key(u));
        // Behind the session's earlier changes: see `has_pending`.
        let queue = self.inner.local.has_pending(storage_key)
            || self
                .inner
                .manager
                .failover(
                    |mut conn| async move {
                        let mut extras = vec![redis::cmd("DEL").arg(&key).clone()];
                        if let Some(user_key) = &user_key {
                            extras.push(redis::cmd("SREM").arg(user_key).arg(storage_key).clone());
                        }
                        SaveCommands {
                            script: None,
                            extras,
                        }
                        .run(&mut conn)
                        .await
                        .map(|_| ())
                    },
                    |_| async {},
                )
                .await
                .is_fallback();
        if queue {
            self.inner.local.queue_delete(storage_key, user);
            self.inner.wake.notify_one();
        }
        self.inner.local.end(storage_key);
    }

    /// The EVALSHA of one save, and the user-index update when the user is set.
    fn save_commands(
        &self,
        key: &str,
        storage_key: &str,
        create: Option<u64>,
        changes: &Changes,
        previous_user: Option<&str>,
        at_ms: Option<u64>,
    ) -> SaveCommands {
        let mut invocation = SAVE.key(key);
        invocation
            .arg(if create.is_some() { "create" } else { "update" })
            .arg(self.idle_ms())
            .arg(self.absolute_ms())
            .arg(changes.user.as_deref().unwrap_or(""))
            .arg(create.map(|c| c.to_string()).unwrap_or_default())
            .arg(at_ms.map(|t| t.to_string()).unwrap_or_default());
        let sets: Vec<(&String, &String)> = changes
            .entries
            .iter()
            .filter_map(|(name, value)| value.as_ref().map(|v| (name, v)))
            .collect();
        invocation.arg(sets.len());
        for (name, value) in sets {
            invocation.arg(name).arg(value);
        }
        let removals: Vec<&String> = changes
            .entries
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| n)
            .collect();
        invocation.arg(removals.len());
        for name in removals {
            invocation.arg(name);
        }
        let mut script = redis::pipe();
        script.invoke_script(&invocation);
        let mut extras = Vec::new();
        if let Some(user) = &changes.user {
            let user_key = self.user_key(user);
            extras.push(redis::cmd("SADD").arg(&user_key).arg(storage_key).clone());
            extras.push(
                redis::cmd("PEXPIRE")
                    .arg(&user_key)
                    .arg(self.absolute_ms())
                    .clone(),
            );
            // A session that changes hands leaves the previous user's index.
            if let Some(previous) = previous_user.filter(|p| *p != user) {
                extras.push(
                    redis::cmd("SREM")
                        .arg(self.user_key(previous))
                        .arg(storage_key)
                        .clone(),
                );
            }
        }
        SaveCommands {
            script: Some(script),
            extras,
        }
    }

    /// The live sessions of a user.
    pub async fn list_user_sessions(&self, user: &str) -> Result<Vec<UserSession>, StoreError> {
        let user_key = self.user_key(user);
        let members: Vec<String> = self
            .inner
            .manager
            .query(redis::cmd("SMEMBERS").arg(&user_key))
            .await
            .map_err(StoreError::Unavailable)?;
        let mut sessions = Vec::with_capacity(members.len());
        for handle in members {
            let created: Option<u64> = self
                .inner
                .manager
                .query(redis::cmd("HGET").arg(self.session_key(&handle)).arg("_c"))
                .await
                .map_err(StoreError::Unavailable)?;
            match created {
                Some(created) => sessions.push(UserSession {
                    handle,
                    created: UNIX_EPOCH + Duration::from_millis(created),
                }),
                // Expired: tidy the index.
                None => {
                    let _ = self
                        .inner
                        .manager
                        .query::<()>(redis::cmd("SREM").arg(&user_key).arg(&handle))
                        .await;
                }
            }
        }
        Ok(sessions)
    }

    /// Ends every session of a user ("log out everywhere"); returns how many
    /// were live.
    pub async fn revoke_user(&self, user: &str) -> Result<usize, StoreError> {
        let user_key = self.user_key(user);
        let members: Vec<String> = self
            .inner
            .manager
            .query(redis::cmd("SMEMBERS").arg(&user_key))
            .await
            .map_err(StoreError::Unavailable)?;
        let mut revoked = 0;
        for handle in &members {
            let deleted: usize = self
                .inner
                .manager
                .query(redis::cmd("DEL").arg(self.session_key(handle)))
                .await
                .map_err(StoreError::Unavailable)?;
            revoked += deleted;
            self.inner.local.end(handle);
        }
        self.inner
            .manager
            .query::<()>(redis::cmd("DEL").arg(&user_key))
            .await
            .map_err(StoreError::Unavailable)?;
        Ok(revoked)
    }

    /// Starts, once, the task that writes changes made during an outage to
    /// Redis when it is back.
    fn start_reconciler(&self) {
        if self.inner.reconciler_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let wake = Arc::clone(&self.inner.wake);
        let mut states = self.inner.manager.subscribe();
        tokio::spawn(async move {
            loop {
                // The task holds the store only while it works, so dropping
                // the layer ends it.
                let retry = {
                    let Some(inner) = weak.upgrade() else { return };
                    let store = SessionStore { inner };
                    if *states.borrow_and_update() == BreakerState::Closed {
                        store.reconcile().await;
                    }
                    store.inner.local.pending_len() > 0
                };
                tokio::select! {
                    changed = states.changed() => if changed.is_err() { return },
                    () = wake.notified() => {}
                    // Writes that failed while Redis was up are retried soon.
                    () = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
                }
            }
        });
    }

    /// Writes the queued outage changes to Redis, oldest first. A change
    /// older than what Redis holds is skipped entry by entry; a session that
    /// no longer exists in Redis is not recreated unless it was created
    /// during the outage.
    pub(crate) async fn reconcile(&self) {
        let pending = self.inner.local.take_pending();
        if pending.is_empty() {
            return;
        }
        let total = pending.len();
        let mut requeue: Vec<queue::Queued> = Vec::new();
        // Sessions with a change that could not be written in this pass:
        // their later changes wait behind it, in order. Replaying them now
        // could find the session absent (its creation still queued) and
        // drop them as changes to a session that ended.
        let mut blocked = std::collections::HashSet::new();
        for queued in pending {
            let storage_key = queued.storage_key.as_str();
            if blocked.contains(storage_key) {
                requeue.push(queued);
                continue;
            }
            let result = match &queued.change {
                Pending::Delete { user } => {
                    let mut extras =
                        vec![redis::cmd("DEL").arg(self.session_key(storage_key)).clone()];
                    if let Some(user) = user {
                        extras.push(
                            redis::cmd("SREM")
                                .arg(self.user_key(user))
                                .arg(storage_key)
                                .clone(),
                        );
                    }
                    let commands = SaveCommands {
                        script: None,
                        extras,
                    };
                    self.inner
                        .manager
                        .run(|mut conn| async move { commands.run(&mut conn).await })
                        .await
                        .map(|_| ())
                }
                Pending::Save {
                    create,
                    changes,
                    at_ms,
                } => {
                    let commands = self.save_commands(
                        &self.session_key(storage_key),
                        storage_key,
                        *create,
                        changes,
                        None,
                        Some(*at_ms),
                    );
                    self.inner
                        .manager
                        .run(|mut conn| async move { commands.run(&mut conn).await })
                        .await
                        .map(|_| ())
                }
            };
            if result.is_err() {
                blocked.insert(storage_key.to_owned());
                requeue.push(queued);
            } else {
                self.inner.local.reconciled(&queued);
            }
        }
        let failed = requeue.len();
        self.inner.local.requeue(requeue);
        tracing::info!(
            target: "tower_redis_session",
            written = total - failed,
            still_queued = failed,
            "wrote session changes made during the Redis outage"
        );
        record_reconciled(total - failed);
    }
}

/// A save's script and the commands on other keys (the user index, the
/// replaced session) that go with it.
struct SaveCommands {
    script: Option<redis::Pipeline>,
    extras: Vec<redis::Cmd>,
}

impl SaveCommands {
    /// One pipelined round trip on a single server. On a cluster the other
    /// keys live in other slots, so they follow the script one by one.
    async fn run(&self, conn: &mut RedisConnection) -> redis::RedisResult<Saved> {
        if conn.is_cluster() {
            let saved = match &self.script {
                Some(script) => pipeline_with_scripts(conn, script, &[&SAVE]).await?,
                None => Saved::Written,
            };
            for cmd in &self.extras {
                cmd.query_async::<()>(conn).await?;
            }
            return Ok(saved);
        }
        let mut pipe = self.script.clone().unwrap_or_else(redis::pipe);
        for cmd in &self.extras {
            pipe.add_command(cmd.clone()).ignore();
        }
        if self.script.is_some() {
            pipeline_with_scripts(conn, &pipe, &[&SAVE]).await
        } else {
            pipe.query_async::<()>(conn).await.map(|()| Saved::Written)
        }
    }
}

impl redis::FromRedisValue for Saved {
    fn from_redis_value(value: redis::Value) -> Result<Self, redis::ParsingError> {
        // The pipeline's only non-ignored reply is the script's 1 or 0.
        let written: Vec<i64> = redis::FromRedisValue::from_redis_value(value)?;
        Ok(if written.first() == Some(&1) {
            Saved::Written
        } else {
            Saved::Gone
        })
    }
}

fn record_from_fields(pairs: Vec<(String, String)>) -> Record {
    let mut record = Record::default();
    for (field, value) in pairs {
        if let Some(name) = field.strip_prefix("d:") {
            record.fields.insert(name.to_owned(), value);
        } else if field == "_c" {
            record.created_ms = value.parse().unwrap_or(0);
        } else if field == "_u" {
            record.user = Some(value);
        }
    }
    record
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

/// Says why a change made during an outage was not kept.
fn refused(full: QueueFull, create: bool) {
    tracing::warn!(
        target: "tower_redis_session",
        limit_bytes = full.limit_bytes,
        "Redis is unavailable and the session outage queue is full; {} (raise SessionLayerBuilder::outage_queue_bytes if this happens in normal outages)",
        if create {
            "a new session was not created: the visitor gets a fresh, empty session on the next request"
        } else {
            "a session change was not kept"
        }
    );
    record_refused();
}

#[cfg(feature = "metrics")]
fn record_refused() {
    metrics::counter!("tower_redis_session_refused_total").increment(1);
}

#[cfg(not(feature = "metrics"))]
fn record_refused() {}

#[cfg(feature = "metrics")]
fn record_reconciled(count: usize) {
    metrics::counter!("tower_redis_session_reconciled_total").increment(count as u64);
}

#[cfg(not(feature = "metrics"))]
fn record_reconciled(_count: usize) {}
