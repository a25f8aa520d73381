//! Cookie, expiry and durability settings.

use std::time::Duration;

use cookie::SameSite;

/// How long sessions live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// Idle timeout: a session unused this long ends (rolling). Each
    /// instance renews it in Redis at most once per 1/100 of its length
    /// (capped at one minute), so a session can end up to that much
    /// earlier than a full idle timeout after its last use.
    pub idle: Duration,
    /// Absolute timeout: a session ends this long after it began, however
    /// active it is.
    pub absolute: Duration,
    /// Whether the cookie outlives the browser session (`Max-Age` = idle
    /// timeout, refreshed when the session is used) or not (no `Max-Age`).
    pub persistent: bool,
}

impl Expiry {
    /// How often an instance renews a session's idle timeout in Redis, on
    /// a read or a change: 1/100 of the idle timeout, at most a minute.
    pub(crate) fn renew_every_ms(&self) -> u64 {
        (tower_redis_core::clock::duration_ms(self.idle) / 100).min(60_000)
    }
}

impl Default for Expiry {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(30 * 60),
            absolute: Duration::from_secs(12 * 3600),
            persistent: false,
        }
    }
}

/// The session cookie's attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieConfig {
    /// The base name; `__Host-` is prepended when the cookie is `Secure`,
    /// has no `Domain` and the path is `/`.
    pub name: String,
    /// `Secure` (default true). Only turn it off with
    /// [`SessionLayerBuilder::insecure_http_for_local_development`](crate::SessionLayerBuilder::insecure_http_for_local_development).
    pub secure: bool,
    /// `HttpOnly` (default true).
    pub http_only: bool,
    /// `SameSite` (default `Lax`).
    pub same_site: SameSite,
    /// `Path` (default `/`).
    pub path: String,
    /// `Domain` (default none, which keeps the cookie on this host).
    pub domain: Option<String>,
}

impl Default for CookieConfig {
    fn default() -> Self {
        Self {
            name: "session".to_owned(),
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
            path: "/".to_owned(),
            domain: None,
        }
    }
}

impl CookieConfig {
    /// The name on the wire: `__Host-session` for the secure defaults.
    pub fn wire_name(&self) -> String {
        if self.secure && self.domain.is_none() && self.path == "/" {
            format!("__Host-{}", self.name)
        } else {
            self.name.clone()
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!(
                "cookie name {:?} must be non-empty letters, digits, `-`, `_` or `.`",
                self.name
            ));
        }
        if !self.path.starts_with('/')
            || self.path.bytes().any(|b| b == b';' || b.is_ascii_control())
        {
            return Err(format!(
                "cookie path {:?} must start with `/` and contain no `;`",
                self.path
            ));
        }
        if self.same_site == SameSite::None && !self.secure {
            return Err("SameSite=None requires Secure; browsers reject it otherwise".to_owned());
        }
        Ok(())
    }
}

/// How sure a login or a logout must be to survive a failover before the
/// response goes out (see
/// [`SessionLayerBuilder::durability`](crate::SessionLayerBuilder::durability)).
///
/// Redis replicates asynchronously: a write the primary acknowledged can be
/// lost when a replica replaces it a moment later. For most session writes
/// that costs little (a cart entry), but a lost login logs the user out and
/// a lost logout logs them back in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Acknowledged by the primary (the default): no extra round trip.
    #[default]
    Primary,
    /// After the writes of a login (an id cycle, or a save that sets the
    /// user), of a logout (`destroy`) and of a "log out everywhere"
    /// ([`SessionStore::revoke_user`](crate::SessionStore::revoke_user): its
    /// recorded time, and each pass's deletes), the layer sends
    /// `WAIT <replicas> <timeout>` on the same connection: the response
    /// waits until `replicas` replicas have the write, or `timeout` has
    /// passed. A timeout does not fail the request (the write is on the
    /// primary); it is logged at warn level with the number of replicas
    /// that did confirm. `WAIT` lowers the chance of a loss, it does not
    /// make Redis strongly consistent (a replica that confirmed can still
    /// lose the race to become primary).
    Replicated {
        /// Replicas that must confirm (1 for a primary with one replica).
        replicas: u32,
        /// The longest to wait; it counts within the manager's command
        /// timeout, so it must be shorter.
        timeout: Duration,
    },
}
