//! [`Session`]: the handle a handler uses. Nothing is loaded until it is
//! used, and nothing is written unless something changed.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use crate::id::SessionId;
use crate::store::{Changes, Record, Saved, SessionStore, now_ms};

/// Why a session operation failed. Redis trouble is never one of them: the
/// session falls back to the in-process store instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// A value could not be turned into JSON, or a stored value into the
    /// requested type.
    #[error("session entry {key:?}: {source}")]
    Serde {
        /// The entry.
        key: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

/// The session of the current request.
///
/// Cheap to clone; clones share state. Get it from the request extensions,
/// or as an axum extractor.
#[derive(Clone)]
pub struct Session {
    state: Arc<Mutex<State>>,
    store: SessionStore,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    /// The id the request's cookie carried (unverified until loaded).
    cookie_id: Option<SessionId>,
    phase: Phase,
    /// The id the session has in the store, once it is known to exist.
    id: Option<SessionId>,
    record: Record,
    changes: Changes,
    /// Set by `cycle_id`: the session moves to a new id on save.
    cycle: bool,
    /// Set by `destroy`: the stored session to delete (and its user).
    delete: Option<(SessionId, Option<String>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Untouched,
    Loaded,
    Destroyed,
}

/// What the layer must do to the response after the handler ran.
#[derive(Debug)]
pub(crate) enum CookieUpdate {
    /// Send this id.
    Set(SessionId),
    /// Tell the browser to drop the cookie.
    Remove,
}

impl Session {
    pub(crate) fn new(store: SessionStore, cookie_id: Option<SessionId>) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                cookie_id,
                phase: Phase::Untouched,
                id: None,
                record: Record::default(),
                changes: Changes::default(),
                cycle: false,
                delete: None,
            })),
            store,
        }
    }

    /// Loads the session on first use: one round trip, and only when the
    /// request carried a well-formed id. An id the store does not know is
    /// never adopted.
    async fn loaded(&self) -> tokio::sync::MutexGuard<'_, State> {
        let mut state = self.state.lock().await;
        if state.phase == Phase::Untouched {
            state.phase = Phase::Loaded;
            if let Some(cookie_id) = state.cookie_id.clone()
                && let Some(record) = self.store.load(&cookie_id.storage_key()).await
            {
                state.id = Some(cookie_id);
                state.record = record;
            }
        }
        state
    }

    /// The value of `key`, if the session has one.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        let state = self.loaded().await;
        let json = match state.changes.entries.get(key) {
            Some(change) => change.as_deref(),
            None => state.record.fields.get(key).map(String::as_str),
        };
        json.map(|json| serde_json::from_str(json).map_err(|source| serde_error(key, source)))
            .transpose()
    }

    /// Sets `key` to `value`.
    pub async fn insert<T: Serialize>(&self, key: &str, value: T) -> Result<(), SessionError> {
        let json = serde_json::to_string(&value).map_err(|source| serde_error(key, source))?;
        let mut state = self.loaded().await;
        // Writing after `destroy` starts a new session.
        state.phase = Phase::Loaded;
        state.changes.entries.insert(key.to_owned(), Some(json));
        Ok(())
    }

    /// Removes `key`, returning its value.
    pub async fn remove<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        let previous = self.get(key).await?;
        let mut state = self.loaded().await;
        state.changes.entries.insert(key.to_owned(), None);
        Ok(previous)
    }

    /// Removes every entry (the session and its id stay).
    pub async fn clear(&self) {
        let mut state = self.loaded().await;
        let names: Vec<String> = state
            .record
            .fields
            .keys()
            .chain(state.changes.entries.keys())
            .cloned()
            .collect();
        for name in names {
            state.changes.entries.insert(name, None);
        }
    }

    /// Gives the session a new id, for privilege changes (log in, sudo): the
    /// old id stops working when this response is sent.
    pub async fn cycle_id(&self) {
        let mut state = self.loaded().await;
        state.cycle = true;
    }

    /// Ends the session (log out): it is deleted from the store and the
    /// browser is told to drop the cookie.
    pub async fn destroy(&self) {
        let mut state = self.loaded().await;
        if let Some(id) = state.id.take() {
            let user = state.record.user.clone();
            state.delete = Some((id, user));
        }
        state.phase = Phase::Destroyed;
        state.record = Record::default();
        state.changes = Changes::default();
        state.cycle = false;
    }

    /// Associates the session with a user, for
    /// [`SessionStore::list_user_sessions`] and [`SessionStore::revoke_user`].
    pub async fn set_user(&self, user: &str) {
        let mut state = self.loaded().await;
        // Like `insert`, after `destroy` this starts a new session.
        state.phase = Phase::Loaded;
        state.changes.user = Some(user.to_owned());
    }

    /// The user set with [`set_user`](Self::set_user), if any.
    pub async fn user(&self) -> Option<String> {
        let state = self.loaded().await;
        state
            .changes
            .user
            .clone()
            .or_else(|| state.record.user.clone())
    }

    /// The store behind this session (for "log out everywhere" and such).
    pub fn store(&self) -> &SessionStore {
        &self.store
    }

    /// Writes what the handler changed; says what the cookie must become.
    pub(crate) async fn finish(&self) -> Option<CookieUpdate> {
        let mut state = self.state.lock().await;
        // The store's writes are boxed where they are awaited: inlined,
        // their Redis futures made the layer's future (allocated and moved
        // on every request, reads included) several KiB larger.
        if let Some((id, user)) = state.delete.take() {
            Box::pin(self.store.delete(&id.storage_key(), user.as_deref())).await;
        }
        match state.phase {
            Phase::Untouched => None,
            Phase::Destroyed => state.cookie_id.is_some().then_some(CookieUpdate::Remove),
            Phase::Loaded => self.write(&mut state).await,
        }
    }

    async fn write(&self, state: &mut State) -> Option<CookieUpdate> {
        let Some(id) = state.id.clone() else {
            // A new session is stored only once it holds something.
            if !state.changes.entries.values().any(Option::is_some) && state.changes.user.is_none()
            {
                return None;
            }
            let id = SessionId::generate();
            Box::pin(
                self.store
                    .save(&id.storage_key(), Some(now_ms()), &state.changes, None),
            )
            .await;
            return Some(CookieUpdate::Set(id));
        };
        if state.cycle {
            let mut merged = state.record.clone();
            state.changes.apply_to(&mut merged);
            let new_id = SessionId::generate();
            return match Box::pin(self.store.cycle(
                &id.storage_key(),
                &new_id.storage_key(),
                &merged,
                &state.changes,
            ))
            .await
            {
                Saved::Written => Some(CookieUpdate::Set(new_id)),
                // Destroyed or revoked meanwhile: stays ended.
                Saved::Gone => Some(CookieUpdate::Remove),
            };
        }
        if state.changes.is_empty() {
            return None;
        }
        let previous_user = state.record.user.clone();
        match Box::pin(self.store.save(
            &id.storage_key(),
            None,
            &state.changes,
            previous_user.as_deref(),
        ))
        .await
        {
            Saved::Written => None,
            // Destroyed or cycled by a concurrent request: not resurrected.
            Saved::Gone => Some(CookieUpdate::Remove),
        }
    }

    /// Whether the handler loaded the session (so a persistent cookie's
    /// `Max-Age` can be renewed).
    pub(crate) async fn live_id(&self) -> Option<SessionId> {
        let state = self.state.lock().await;
        (state.phase == Phase::Loaded)
            .then(|| state.id.clone())
            .flatten()
    }
}

fn serde_error(key: &str, source: serde_json::Error) -> SessionError {
    SessionError::Serde {
        key: key.to_owned(),
        source,
    }
}
