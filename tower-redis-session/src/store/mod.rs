//! [`SessionStore`]: sessions in Redis, with local copies and queued writes
//! while Redis is unavailable.
//!
//! One job per module:
//!
//! - [`Store`] (here): the verbs of session storage — `load`, `save`, `take`
//!   (a new id), `delete` — with the types they speak in.
//! - `redis`: the Redis implementation (the Lua scripts, the commands and
//!   the key layout).
//! - `local`: the in-process implementation: copies of recently read
//!   sessions, and the memory of sessions that ended.
//! - `failover`: the composite the layer talks to, over core's
//!   `degrade::Failover`. Redis answers when it can; otherwise the local
//!   copies do, and writes go to core's outage queue, which core writes to
//!   Redis when it is back.
//! - `change`: a change waiting in that queue (its weight, whether it is a
//!   deletion) and how the Redis side replays it.
//! - `users`: the per-user session index ("log out everywhere").

mod change;
mod ended;
mod ends;
mod failover;
mod local;
mod redis;
#[cfg(test)]
mod tests;
mod users;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use tower_redis_core::RedisManager;

use crate::config::Expiry;
pub(crate) use ends::{EndMark, Known};
use failover::Failover;
pub(crate) use failover::Loaded;

/// A session's stored content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// Entry name → JSON. Shared between copies (a read hands out a copy
    /// of the tracked or local record without copying its entries); a
    /// change copies them first when another copy shares them.
    pub(crate) fields: Arc<HashMap<String, String>>,
    pub(crate) created_ms: u64,
    pub(crate) user: Option<String>,
}

/// No entries: one map shared by every empty record, so that a new
/// session allocates none.
static NO_FIELDS: std::sync::LazyLock<Arc<HashMap<String, String>>> =
    std::sync::LazyLock::new(|| Arc::new(HashMap::new()));

impl Default for Record {
    fn default() -> Self {
        Self {
            fields: Arc::clone(&NO_FIELDS),
            created_ms: 0,
            user: None,
        }
    }
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

    /// The whole record as changes: every entry set, and the user.
    pub(crate) fn as_changes(&self) -> Changes {
        Changes {
            entries: self
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect(),
            user: self.user.clone(),
        }
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

    /// They put something in a new session (a value or a user): only then
    /// is a new session stored.
    pub(crate) fn creates(&self) -> bool {
        self.entries.values().any(Option::is_some) || self.user.is_some()
    }

    pub(crate) fn apply_to(&self, record: &mut Record) {
        if !self.entries.is_empty() {
            let fields = Arc::make_mut(&mut record.fields);
            for (name, value) in &self.entries {
                match value {
                    Some(json) => fields.insert(name.clone(), json.clone()),
                    None => fields.remove(name),
                };
            }
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
    /// Copies kept exact by Redis client tracking (0: tracking off).
    pub(crate) tracked_bytes: u64,
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
    /// The size of the copies of sessions whose changes wait for Redis,
    /// kept apart from the others so that no flood of new sessions evicts
    /// them: at most `local_capacity_bytes` plus `outage_queue_bytes`.
    /// Past that bound a copy stays with the others.
    pub pinned_copies_bytes: u64,
    /// The size of the copies kept exact by Redis client tracking (the
    /// zero-round-trip reads): at most
    /// [`tracked_capacity_bytes`](crate::SessionLayerBuilder::tracked_capacity_bytes).
    pub tracked_copies_bytes: u64,
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

/// A save: one request's changes to one session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Write<'a> {
    pub(crate) storage_key: &'a str,
    /// `Some(created_ms)` for a new session; `None` updates an existing one
    /// and never recreates it.
    pub(crate) create: Option<u64>,
    pub(crate) changes: &'a Changes,
    /// The session's user before the changes, when known.
    pub(crate) previous_user: Option<&'a str>,
    /// When the changes were made, for a replay of outage changes ("newer
    /// wins" entry by entry); `None`: now.
    pub(crate) at_ms: Option<u64>,
}

/// An id change: the old key is taken and the session continues under the
/// new one, with this request's changes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Take<'a> {
    pub(crate) old_storage_key: &'a str,
    pub(crate) new_storage_key: &'a str,
    /// The session as this request saw it, its changes applied.
    pub(crate) merged: &'a Record,
    pub(crate) changes: &'a Changes,
    /// The session's user as this request loaded it, before its changes:
    /// the user whose index holds the old id.
    pub(crate) previous_user: Option<&'a str>,
}

/// The verbs of session storage, implemented by Redis (`redis::RedisStore`)
/// and in process (`local::LocalStore`). [`Failover`] composes the two.
pub(crate) trait Store {
    /// Why an operation failed (`Infallible` in process).
    type Error;

    /// The session, unless it does not exist or is past its absolute
    /// timeout. `touch` renews its idle timeout where the store keeps one.
    fn load(
        &self,
        storage_key: &str,
        touch: bool,
    ) -> impl Future<Output = Result<Option<Record>, Self::Error>> + Send;

    /// Writes one request's changes.
    fn save(&self, write: &Write<'_>) -> impl Future<Output = Result<Saved, Self::Error>> + Send;

    /// Moves the session to a new id: [`Saved::Gone`] when the old one no
    /// longer exists (it is then not recreated).
    fn take(&self, take: &Take<'_>) -> impl Future<Output = Result<Saved, Self::Error>> + Send;

    /// Ends the session (and removes it from its user's index).
    fn delete(
        &self,
        storage_key: &str,
        user: Option<&str>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// The sessions' storage: Redis through the shared manager, and in process
/// while Redis is unavailable. Cheap to clone.
#[derive(Clone)]
pub struct SessionStore {
    inner: Failover,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("manager", self.inner.manager())
            .field("expiry", self.inner.expiry())
            .finish_non_exhaustive()
    }
}

impl SessionStore {
    #[cfg(test)]
    pub(crate) fn new(manager: RedisManager, expiry: Expiry, limits: LocalLimits) -> Self {
        Self::with_durability(manager, expiry, limits, crate::Durability::default())
    }

    pub(crate) fn with_durability(
        manager: RedisManager,
        expiry: Expiry,
        limits: LocalLimits,
        durability: crate::Durability,
    ) -> Self {
        Self {
            inner: Failover::with_durability(manager, expiry, limits, durability),
        }
    }

    /// How much of its in-process bounds the store uses: the outage queue
    /// and the local copies. For monitoring; not meant for every request.
    pub fn local_usage(&self) -> LocalUsage {
        self.inner.local_usage()
    }

    /// Whether this instance saw the session end (destroyed, cycled away,
    /// revoked) in the last two minutes. No Redis call.
    #[cfg(test)]
    pub(crate) fn has_ended(&self, storage_key: &str) -> bool {
        self.inner.has_ended(storage_key)
    }

    /// What a request takes when it begins, to ask
    /// [`ended_since`](Self::ended_since) later. No Redis call.
    pub(crate) fn end_mark(&self) -> EndMark {
        self.inner.local().end_mark()
    }

    /// Whether this instance saw the session end (destroyed, cycled away,
    /// revoked, here or on another instance) since `mark` was taken, or may
    /// have: its memory of ends forgot one that came after `mark` (a flood
    /// of ends). No Redis call.
    pub(crate) fn ended_since(&self, storage_key: &str, mark: EndMark) -> bool {
        self.inner.local().ended_since(storage_key, mark)
    }

    /// Whether this instance cycled the session's id away (a login) in the
    /// last two minutes: the session lives on under another id; or may have
    /// since `mark` was taken (its memory of ends forgot one that came
    /// after it). No Redis call.
    /// [`Known::Held`] when it did, [`Known::Forgotten`] when it may have.
    pub(crate) fn cycled_since(&self, storage_key: &str, mark: EndMark) -> Option<Known> {
        self.inner.local().cycled_since(storage_key, mark)
    }

    /// A session's record: [`load_now`](Self::load_now), then
    /// [`load_later`](Self::load_later).
    #[cfg(test)]
    pub(crate) async fn load(&self, storage_key: &str) -> Option<Record> {
        match self.load_now(storage_key) {
            Ok(record) => Some(record),
            Err(later) => self.load_later(storage_key, later).await.record,
        }
    }

    /// A session's record, counted. No round trip when tracking is on, no
    /// renewal is due and Redis has not said the session changed since this
    /// instance last read it: answered here, with no future. Else one round
    /// trip ([`load_later`](Self::load_later) with what this returns):
    /// `HGETALL`, pipelined with a `PEXPIRE` that renews the idle timeout
    /// when this instance has not renewed it lately. The absolute timeout is
    /// checked on the record.
    pub(crate) fn load_now(&self, storage_key: &str) -> Result<Record, failover::Later> {
        let record = self.inner.load_now(storage_key)?;
        counted_load(true);
        Ok(record)
    }

    /// The load [`load_now`](Self::load_now) could not answer, counted.
    ///
    /// Not an `async fn`, which would hold its arguments twice in the
    /// future of every load.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` would hold its arguments twice in its future"
    )]
    pub(crate) fn load_later(
        &self,
        storage_key: &str,
        later: failover::Later,
    ) -> impl Future<Output = Loaded> + Send {
        async move {
            let loaded = self.inner.load_later(storage_key, later).await;
            counted_load(loaded.record.is_some());
            loaded
        }
    }

    /// One round trip: the changes, entry by entry (plus the user index).
    /// `previous_user` is the session's user before the changes. `waited`:
    /// Redis already failed this request (see [`Loaded::waited`]), so the
    /// changes are queued without asking it again.
    pub(crate) async fn save(
        &self,
        storage_key: &str,
        create: Option<u64>,
        changes: &Changes,
        previous_user: Option<&str>,
        waited: bool,
    ) -> Saved {
        let write = Write {
            storage_key,
            create,
            changes,
            previous_user,
            at_ms: None,
        };
        let saved = self.inner.save(&write, waited).await;
        record_save(if create.is_some() { "created" } else { "saved" }, saved);
        saved
    }

    /// A new id for a session. The old key is taken (read and deleted
    /// atomically) first, so a session destroyed or revoked meanwhile is
    /// never recreated; then the record, with this request's changes, is
    /// written under the new key. Two round trips. `previous_user` is the
    /// session's user before the changes; `waited` as for
    /// [`save`](Self::save).
    pub(crate) async fn cycle(
        &self,
        old_storage_key: &str,
        new_storage_key: &str,
        merged: &Record,
        changes: &Changes,
        previous_user: Option<&str>,
        waited: bool,
    ) -> Saved {
        let take = Take {
            old_storage_key,
            new_storage_key,
            merged,
            changes,
            previous_user,
        };
        let saved = self.inner.take(&take, waited).await;
        record_save("cycled", saved);
        saved
    }

    /// Deletes a session (and its entry in the user index); `waited` as for
    /// [`save`](Self::save). True when Redis did not answer it in time (it
    /// is queued, and the request has waited for Redis).
    pub(crate) async fn delete(&self, storage_key: &str, user: Option<&str>, waited: bool) -> bool {
        let failed = self.inner.delete(storage_key, user, waited).await;
        tower_redis_core::record::counter(
            "tower_redis_session_saves_total",
            &[("kind", "deleted"), ("result", "written")],
            1,
        );
        record_on_span("saved", "deleted");
        failed
    }

    /// The live sessions of a user.
    pub async fn list_user_sessions(&self, user: &str) -> Result<Vec<UserSession>, StoreError> {
        self.inner.redis().list_user_sessions(user).await
    }

    /// Ends every session of a user ("log out everywhere"); returns how many
    /// were live. A login (or a write that sets the user) that an instance
    /// holds in its outage queue, made before the call or less than a
    /// second after it, is not written when Redis is back: the call records
    /// its time under the user (`{<sha256(user)>}:r`) for the absolute
    /// timeout. Where Redis refuses that record (out of memory, a Redis
    /// user without scripts), the sessions are still ended and a warning
    /// is logged.
    pub async fn revoke_user(&self, user: &str) -> Result<usize, StoreError> {
        let local = self.inner.local();
        self.inner
            .redis()
            .revoke_user(user, |handle| local.end(handle))
            .await
    }

    /// Waits until every change another instance made to a session before
    /// now (acknowledged to it) is known here: after `sync`, no read on this
    /// instance serves a session as it was before such a change. One `PING`
    /// on the tracking connection; nothing to wait for when tracking is off.
    ///
    /// Without it, a session changed on another instance is served as it
    /// was only until this instance's tracking connection has read Redis'
    /// invalidation, which Redis sends before it acknowledges the change.
    pub async fn sync(&self) -> Result<(), StoreError> {
        match self.inner.redis().tracking() {
            Some(tracking) if tracking.is_live() => {
                tracking.sync().await.map_err(StoreError::Unavailable)
            }
            _ => Ok(()),
        }
    }

    /// Writes the queued outage changes to Redis now, when it answers (the
    /// background task does it on recovery).
    #[cfg(test)]
    pub(crate) async fn reconcile(&self) {
        self.inner.reconcile().await;
    }
}

/// The wall clock in milliseconds since the Unix epoch: session times are
/// compared with those other instances (and Redis) wrote.
pub(crate) fn now_ms() -> u64 {
    #[cfg(test)]
    if let Some(now) = tests::clock::paused_ms() {
        return now;
    }
    tower_redis_core::clock::now_ms()
}

/// Whether a renewal of a session's idle timeout is due at `now_ms`, this
/// instance having last renewed it at `touched_ms` (0: not known),
/// renewing at most once per `every_ms`. A renewal stamped after `now_ms`
/// (the wall clock stepped back since) is due: trusting it would leave the
/// session unrenewed until the clock caught up.
pub(crate) fn renewal_due(touched_ms: u64, now_ms: u64, every_ms: u64) -> bool {
    now_ms
        .checked_sub(touched_ms)
        .is_none_or(|since| since >= every_ms)
}

/// Counts a write (`tower_redis_session_saves_total{kind,result}`) and
/// records it on the request's `session` span.
fn record_save(kind: &'static str, saved: Saved) {
    let result = match saved {
        Saved::Written => "written",
        Saved::Gone => "gone",
        Saved::Refused => "refused",
    };
    tower_redis_core::record::counter(
        "tower_redis_session_saves_total",
        &[("kind", kind), ("result", result)],
        1,
    );
    record_on_span("saved", kind);
    record_on_span("save_result", result);
}

/// Counts a load (`tower_redis_session_loads_total{result}`) and records
/// it on the request's span.
fn counted_load(found: bool) {
    // Keys built once: a load is the layer's most frequent operation.
    static LOADS: [tower_redis_core::record::Counter; 2] = [
        tower_redis_core::record::Counter::new(
            "tower_redis_session_loads_total",
            &[("result", "found")],
        ),
        tower_redis_core::record::Counter::new(
            "tower_redis_session_loads_total",
            &[("result", "missing")],
        ),
    ];
    LOADS[usize::from(!found)].increment(1);
    record_on_span("loaded", if found { "found" } else { "missing" });
}

/// Records `value` in the field `name` of the current span, when it is the
/// layer's `session` span (other spans have no such field and ignore it).
fn record_on_span(name: &'static str, value: &'static str) {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record(name, value);
    }
}
