//! Keys: whom a policy counts.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::HeaderName;
use http::request::Parts;

use crate::client_ip::ClientIp;

/// A boxed future returned by a custom key extractor.
pub type KeyFuture = Pin<Box<dyn Future<Output = Option<String>> + Send + 'static>>;

type SyncExtractor = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;
type AsyncExtractor = Arc<dyn Fn(&Parts) -> KeyFuture + Send + Sync>;

/// Whom a policy counts.
#[derive(Clone)]
pub struct Key {
    pub(crate) kind: KeyKind,
}

#[derive(Clone)]
pub(crate) enum KeyKind {
    /// The client address, found the way the layer's [`ClientIp`] says.
    ClientIp,
    /// The value of a header (or gRPC metadata entry).
    Header(HeaderName),
    /// A value computed from the request, synchronously.
    Sync(SyncExtractor),
    /// A value computed from the request, asynchronously.
    Async(AsyncExtractor),
    /// One bucket shared by every request.
    Global,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            KeyKind::ClientIp => f.write_str("Key::client_ip()"),
            KeyKind::Header(name) => write!(f, "Key::header({name:?})"),
            KeyKind::Sync(_) => f.write_str("Key::from_fn(..)"),
            KeyKind::Async(_) => f.write_str("Key::from_async_fn(..)"),
            KeyKind::Global => f.write_str("Key::global()"),
        }
    }
}

impl Key {
    /// The client IP: the socket peer, or, behind trusted proxies, the
    /// rightmost forwarded address that is not a proxy. IPv6 clients are
    /// grouped by prefix (/64 by default). See
    /// [`RateLimitLayerBuilder::client_ip`](crate::RateLimitLayerBuilder::client_ip).
    pub fn client_ip() -> Self {
        Self {
            kind: KeyKind::ClientIp,
        }
    }

    /// The value of a request header, e.g. an API key. Works for gRPC
    /// metadata too (`x-api-key` metadata is an `x-api-key` header).
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header name.
    pub fn header(name: &str) -> Self {
        match HeaderName::try_from(name) {
            Ok(name) => Self {
                kind: KeyKind::Header(name),
            },
            Err(_) => panic!("Key::header: {name:?} is not a valid header name"),
        }
    }

    /// An authenticated user (or anything else) that earlier middleware put
    /// into the request extensions.
    ///
    /// ```
    /// #[derive(Clone)]
    /// struct UserId(u64);
    /// let key = tower_redis_ratelimit::Key::extension(|user: &UserId| user.0.to_string());
    /// # let _ = key;
    /// ```
    pub fn extension<T, F>(to_key: F) -> Self
    where
        T: Send + Sync + 'static,
        F: Fn(&T) -> String + Send + Sync + 'static,
    {
        Self::from_fn(move |parts| parts.extensions.get::<T>().map(&to_key))
    }

    /// A key computed from the request head; `None` means "no key".
    pub fn from_fn<F>(extract: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self {
            kind: KeyKind::Sync(Arc::new(extract)),
        }
    }

    /// A key computed asynchronously (e.g. by looking a token up). The
    /// function gets the request head and returns a `'static` future, so it
    /// clones what it needs.
    pub fn from_async_fn<F, Fut>(extract: F) -> Self
    where
        F: Fn(&Parts) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<String>> + Send + 'static,
    {
        Self {
            kind: KeyKind::Async(Arc::new(move |parts| Box::pin(extract(parts)))),
        }
    }

    /// One bucket for all requests (a global limit).
    pub fn global() -> Self {
        Self {
            kind: KeyKind::Global,
        }
    }

    /// Extracts this key from a request head. Empty values count as missing.
    pub(crate) async fn extract(&self, parts: &Parts, client_ip: &ClientIp) -> Option<String> {
        let value = match &self.kind {
            KeyKind::ClientIp => client_ip.key_of_parts(parts),
            KeyKind::Header(name) => parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_owned()),
            KeyKind::Sync(extract) => extract(parts),
            KeyKind::Async(extract) => extract(parts).await,
            KeyKind::Global => Some(String::new()),
        };
        match (&self.kind, value) {
            (KeyKind::Global, value) => value,
            (_, Some(value)) if !value.is_empty() => Some(value),
            _ => None,
        }
    }
}

/// What to do with a request when a policy's key cannot be extracted (no
/// header, no user, no peer address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingKey {
    /// Answer 400 with a problem+json body saying what is missing.
    Reject,
    /// Do not apply that policy to the request (the default).
    #[default]
    Skip,
    /// Count every such request in one shared bucket of that policy.
    SharedBucket,
}
