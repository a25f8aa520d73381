//! [`SessionLayer`] and its builder.

use std::sync::Arc;

use tower_layer::Layer;
use tower_redis_core::RedisManager;

use crate::config::{CookieConfig, Expiry};
use crate::id::CookieCodec;
use crate::service::SessionService;
use crate::store::SessionStore;

/// Signing keys shorter than this are refused.
const MIN_SIGNING_KEY: usize = 32;

/// A problem with the session configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The cookie settings cannot work.
    #[error("session cookie: {0}")]
    Cookie(String),
    /// The signing key is too short to be secret.
    #[error("the session signing key has {0} bytes; use at least 32 random bytes")]
    WeakSigningKey(usize),
    /// The timeouts contradict each other.
    #[error("session expiry: {0}")]
    Expiry(String),
}

/// Adds a lazily loaded [`Session`](crate::Session) to every request.
#[derive(Clone, Debug)]
pub struct SessionLayer {
    pub(crate) shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: SessionStore,
    pub(crate) cookie: CookieConfig,
    pub(crate) cookie_name: String,
    pub(crate) codec: CookieCodec,
    pub(crate) expiry: Expiry,
}

impl SessionLayer {
    /// Starts a builder on the shared connection manager.
    pub fn builder(manager: RedisManager) -> SessionLayerBuilder {
        SessionLayerBuilder {
            manager,
            cookie: CookieConfig::default(),
            expiry: Expiry::default(),
            signing_key: None,
            local_capacity: 10_000,
        }
    }

    /// The store, for store-level operations such as
    /// [`revoke_user`](SessionStore::revoke_user).
    pub fn store(&self) -> &SessionStore {
        &self.shared.store
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService::new(inner, Arc::clone(&self.shared))
    }
}

/// Configures a [`SessionLayer`].
#[derive(Debug)]
pub struct SessionLayerBuilder {
    manager: RedisManager,
    cookie: CookieConfig,
    expiry: Expiry,
    signing_key: Option<Vec<u8>>,
    local_capacity: u64,
}

impl SessionLayerBuilder {
    /// The cookie's attributes (defaults: `__Host-session`, `Secure`,
    /// `HttpOnly`, `SameSite=Lax`, `Path=/`).
    pub fn cookie(mut self, cookie: CookieConfig) -> Self {
        self.cookie = cookie;
        self
    }

    /// Idle and absolute timeouts, and whether the cookie persists
    /// (defaults: 30 min idle, 12 h absolute, browser-session cookie).
    pub fn expiry(mut self, expiry: Expiry) -> Self {
        self.expiry = expiry;
        self
    }

    /// Signs the cookie with HMAC-SHA256 under this key (at least 32 bytes,
    /// random, secret, the same on every instance). Cookies without a valid
    /// signature are treated as absent.
    pub fn signing_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.signing_key = Some(key.into());
        self
    }

    /// Drops `Secure` (and so the `__Host-` prefix) so the cookie works over
    /// plain http on localhost. Never use it in production.
    pub fn insecure_http_for_local_development(mut self) -> Self {
        self.cookie.secure = false;
        self
    }

    /// How many sessions this instance keeps copies of, to serve them while
    /// Redis is unavailable (default 10 000).
    pub fn local_capacity(mut self, sessions: u64) -> Self {
        self.local_capacity = sessions;
        self
    }

    /// Checks everything and builds the layer.
    pub fn build(self) -> Result<SessionLayer, ConfigError> {
        self.cookie.validate().map_err(ConfigError::Cookie)?;
        if let Some(key) = &self.signing_key
            && key.len() < MIN_SIGNING_KEY
        {
            return Err(ConfigError::WeakSigningKey(key.len()));
        }
        if self.expiry.idle.is_zero() || self.expiry.absolute.is_zero() {
            return Err(ConfigError::Expiry(
                "idle and absolute timeouts must be positive".to_owned(),
            ));
        }
        let year = std::time::Duration::from_secs(366 * 24 * 3600);
        if self.expiry.absolute > year {
            return Err(ConfigError::Expiry(format!(
                "the absolute timeout ({:?}) is longer than a year; sessions that long are credentials that never expire",
                self.expiry.absolute
            )));
        }
        if self.expiry.idle > self.expiry.absolute {
            return Err(ConfigError::Expiry(format!(
                "the idle timeout ({:?}) is longer than the absolute one ({:?})",
                self.expiry.idle, self.expiry.absolute
            )));
        }
        let store = SessionStore::new(self.manager, self.expiry, self.local_capacity);
        Ok(SessionLayer {
            shared: Arc::new(Shared {
                store,
                cookie_name: self.cookie.wire_name(),
                cookie: self.cookie,
                codec: CookieCodec::new(self.signing_key),
                expiry: self.expiry,
            }),
        })
    }
}
