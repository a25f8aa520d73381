//! The per-user session index: `{<sha256(user)>}:u`, a set of the user's
//! session hashes, kept by every save that sets a user. It serves "list my
//! sessions" and "log out everywhere", which need Redis (the in-process
//! store cannot see other instances' sessions).

use std::collections::HashSet;
use std::sync::LazyLock;
use std::time::{Duration, UNIX_EPOCH};

use tower_redis_core::redis::{self, Script};

use super::redis::{RedisStore, on_each, per_session, session_commands};
use super::{StoreError, UserSession};

/// How many times a revocation reads the user's index: the sessions made
/// or cycled while one pass ran are ended by the next.
const REVOKE_PASSES: usize = 4;

/// How many of a user's sessions are read or ended at once, as one
/// operation of the manager ([`per_session`]): one time budget
/// and one outcome for the breaker, rather than one round trip each.
const BATCH: usize = 256;

/// Records when a user was logged out everywhere: Redis' time (ms), kept
/// for ARGV[1] ms (the absolute timeout, which no session outlives).
static MARK_REVOKED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], now, 'PX', ARGV[1])
return now
",
    )
});

/// 1 when the user was logged out everywhere ARGV[1] ms ago or later (the
/// mark is Redis' time; the age is a duration, which clocks that disagree
/// still agree on; a mark that is not a number counts as recent), else 0.
static REVOKED_SINCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
local mark = tonumber(value)
if not mark then return 1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if mark >= now - tonumber(ARGV[1]) then return 1 end
return 0
",
    )
});

/// Added to the age of a queued change naming a user when it is compared
/// with the user's revocation (see [`RedisStore::revoked_since`]): a
/// change made up to this long after a "log out everywhere" is dropped as
/// if made before it, which costs a login; the other way would keep one.
pub(crate) const REVOKED_MARGIN_MS: u64 = 1_000;

/// How many members of a user's index a login checks, in a task of its
/// own ([`RedisStore::tidy_user_index`]).
const TIDY_SAMPLE: usize = 8;

impl RedisStore {
    /// A revocation's wait for the replicas (`Durability`): a `WAIT` that
    /// fails (refused, or a Cluster primary that does not answer) is
    /// logged, and the revocation goes on: its writes are on the primary,
    /// and stopping would leave the user's other sessions live.
    async fn replicate_or_warn(&self, conn: &mut tower_redis_core::RedisConnection) {
        if let Err(error) = self.replicate(conn, "log out everywhere").await {
            tracing::warn!(
                target: "tower_redis_session",
                %error,
                "\"log out everywhere\" could not wait for the replicas; a failover now could lose part of it"
            );
        }
    }

    /// After a login of `user`: a few members of the user's index, picked
    /// at random, are checked (`SRANDMEMBER`, then `EXISTS` of their
    /// sessions) and those whose session is gone leave it, in a task of its
    /// own (the login does not wait; a failure changes nothing).
    ///
    /// Sessions that time out leave no trace in the index, and every login
    /// renews the index's TTL, so without this the index of a user who logs
    /// in again and again (a script, a shared account) grew by a dead id a
    /// login, and with it every listing and revocation. A login removes
    /// about [`TIDY_SAMPLE`] × the share of dead ids, and adds one: the
    /// index stays within a small multiple of the user's live sessions.
    pub(crate) fn tidy_user_index(&self, user: &str) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let manager = self.manager().clone();
        let user_key = self.user_key(user);
        tokio::spawn(async move {
            let Ok(sample) = manager
                .query::<Vec<String>>(redis::cmd("SRANDMEMBER").arg(&user_key).arg(TIDY_SAMPLE))
                .await
            else {
                return;
            };
            if sample.is_empty() {
                return;
            }
            let Ok(exist) = per_session::<bool>(&manager, &sample, |key| {
                redis::cmd("EXISTS").arg(key).clone()
            })
            .await
            else {
                return;
            };
            let gone: Vec<&String> = sample
                .iter()
                .zip(exist)
                .filter_map(|(handle, exists)| (!exists).then_some(handle))
                .collect();
            if !gone.is_empty() {
                let _ = manager
                    .query::<()>(redis::cmd("SREM").arg(&user_key).arg(gone))
                    .await;
            }
        });
    }

    /// The live sessions of a user; expired ones found in the index are
    /// removed from it.
    pub(crate) async fn list_user_sessions(
        &self,
        user: &str,
    ) -> Result<Vec<UserSession>, StoreError> {
        let manager = self.manager();
        let user_key = self.user_key(user);
        let members: Vec<String> = manager
            .query(redis::cmd("SMEMBERS").arg(&user_key))
            .await
            .map_err(StoreError::Unavailable)?;
        let mut sessions = Vec::with_capacity(members.len());
        for chunk in members.chunks(BATCH) {
            let created: Vec<Option<u64>> = per_session(manager, chunk, |key| {
                redis::cmd("HGET").arg(key).arg("_c").clone()
            })
            .await
            .map_err(StoreError::Unavailable)?;
            let mut expired = Vec::new();
            for (handle, created) in chunk.iter().zip(created) {
                match created {
                    Some(created) => sessions.push(UserSession {
                        handle: handle.clone(),
                        created: UNIX_EPOCH + Duration::from_millis(created),
                    }),
                    None => expired.push(handle.as_str()),
                }
            }
            // Expired: tidy the index.
            if !expired.is_empty() {
                let _ = manager
                    .query::<()>(redis::cmd("SREM").arg(&user_key).arg(&expired))
                    .await;
            }
        }
        Ok(sessions)
    }

    /// Ends every session of a user; `ended` hears of each one as its batch
    /// is sent (whether or not Redis acknowledged it),
    /// and each pass announces the ids it ends to every instance, before
    /// and after its deletes (see `ended.rs`). Returns how many were live.
    ///
    /// Not one atomic step (the user's index and sessions may live on other
    /// shards), so the index is read again after each pass: a session made
    /// or cycled (a login's new id) while a pass ran is ended by the next
    /// one when its id is in the index by then, up to [`REVOKE_PASSES`].
    /// Only the ids a pass ended leave the index, so one that comes later
    /// stays listed, and revocable by another call, rather than live and
    /// unlisted.
    pub(crate) async fn revoke_user(
        &self,
        user: &str,
        ended: impl Fn(&str),
    ) -> Result<usize, StoreError> {
        let manager = self.manager();
        let user_key = self.user_key(user);
        // First: a login (or a write naming the user) that waits in an
        // instance's outage queue, not in the index yet, finds it when it
        // is replayed, and is dropped (`change.rs`). A mark Redis refuses
        // (out of memory, or a Redis user without scripts) does not stop
        // the revocation itself, which only deletes.
        let revoked_key = self.revoked_key(user);
        let absolute_ms = self.absolute_ms().max(1);
        // Like the deletes below, waited for by the replicas as logouts are
        // (`Durability`): a failover that lost the mark would let a queued
        // login survive.
        let marked = manager
            .run(|mut conn| async move {
                MARK_REVOKED
                    .key(&revoked_key)
                    .arg(absolute_ms)
                    .invoke_async::<u64>(&mut conn)
                    .await?;
                self.replicate_or_warn(&mut conn).await;
                Ok(())
            })
            .await;
        match marked {
            Ok(()) => {}
            // Redis did not answer (or the breaker is open): the index
            // would not be read either, after a second command timeout.
            // (With replicas to wait for, the mark's call includes their
            // wait, and a timeout may be theirs: the revocation goes on.)
            Err(error) if error.is_unanswered() && !self.waits_for_replicas() => {
                return Err(StoreError::Unavailable(error));
            }
            Err(error) => {
                tracing::warn!(
                    target: "tower_redis_session",
                    %error,
                    "the time of a \"log out everywhere\" could not be recorded: a login of that user queued during an outage may survive it"
                );
            }
        }
        let mut revoked = 0;
        let mut seen = HashSet::new();
        for _ in 0..REVOKE_PASSES {
            let members: Vec<String> = manager
                .query(redis::cmd("SMEMBERS").arg(&user_key))
                .await
                .map_err(StoreError::Unavailable)?;
            let fresh: Vec<String> = members
                .into_iter()
                .filter(|handle| !seen.contains(handle))
                .collect();
            if fresh.is_empty() {
                break;
            }
            // Announced before the deletes too (the memory of ends keeps a
            // read that begins meanwhile from making a copy), so that a
            // call cancelled or failing among them still reached everyone.
            self.announce_ended(false, fresh.clone());
            for chunk in fresh.chunks(BATCH) {
                let deletes =
                    session_commands(manager, chunk, |key| redis::cmd("DEL").arg(key).clone());
                let deleted: Result<Vec<usize>, _> = manager
                    .run(|mut conn| async move {
                        let deleted = on_each(&mut conn, &deletes).await?;
                        self.replicate_or_warn(&mut conn).await;
                        Ok(deleted)
                    })
                    .await;
                // Acknowledged or not (a delete that timed out may have
                // run): no copy here outlives them.
                for handle in chunk {
                    self.forget(handle);
                    ended(handle);
                }
                revoked += deleted
                    .map_err(StoreError::Unavailable)?
                    .into_iter()
                    .sum::<usize>();
            }
            // And after them: nothing read before them keeps a copy.
            self.announce_ended(false, fresh.clone());
            for chunk in fresh.chunks(BATCH) {
                manager
                    .query::<()>(redis::cmd("SREM").arg(&user_key).arg(chunk))
                    .await
                    .map_err(StoreError::Unavailable)?;
            }
            seen.extend(fresh);
        }
        Ok(revoked)
    }

    /// Whether `user` was logged out everywhere `ago_ms` ago or later: a
    /// change naming the user, made that long ago and queued since, is
    /// then not written.
    pub(crate) async fn revoked_since(
        &self,
        user: &str,
        ago_ms: u64,
    ) -> Result<bool, tower_redis_core::Error> {
        let key = self.revoked_key(user);
        self.manager()
            .run(|mut conn| async move {
                let since: u8 = REVOKED_SINCE
                    .key(&key)
                    .arg(ago_ms)
                    .invoke_async(&mut conn)
                    .await?;
                Ok(since == 1)
            })
            .await
    }
}
