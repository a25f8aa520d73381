//! The URLs this thread keyed last, and their keys.
//!
//! A URL key is a pure function of the layer's rules (its allowed hosts and
//! routes), the request's target (authority, path, query) and its `Host`:
//! the URL is normalised (lower-case host, the route's query rules) and
//! hashed (SHA-256). A hot URL is keyed again and again with the same
//! inputs, so each thread keeps its last [`SLOTS`] inputs with what they
//! gave and compares instead of computing. Exact: a slot is used only when
//! every input is equal, byte for byte, for the same layer.
//!
//! Bounded: [`SLOTS`] slots per thread, of inputs of at most
//! [`MAX_INPUT_BYTES`] (longer URLs are keyed every time), each with its URL
//! and hash: under 20 KiB a thread.

use std::cell::RefCell;

use super::{Head, hash_url, url_of};
use crate::layer::Config;

/// Slots per thread.
const SLOTS: usize = 8;
/// The longest inputs (authority, `Host`, path and query together) a slot
/// keeps.
const MAX_INPUT_BYTES: usize = 1024;

/// What a URL key is made from, as the request carries it.
struct Inputs<'a> {
    layer: u64,
    authority: Option<&'a str>,
    host: Option<&'a [u8]>,
    path: &'a str,
    query: Option<&'a str>,
}

/// One keyed URL: its inputs, and the URL and hash they gave.
struct Slot {
    layer: u64,
    authority: Option<Box<str>>,
    host: Option<Box<[u8]>>,
    path: Box<str>,
    query: Option<Box<str>>,
    url: std::sync::Arc<str>,
    url_hash: std::sync::Arc<str>,
}

impl Slot {
    fn holds(&self, inputs: &Inputs<'_>) -> bool {
        self.layer == inputs.layer
            && *self.path == *inputs.path
            && self.query.as_deref() == inputs.query
            && self.host.as_deref() == inputs.host
            && self.authority.as_deref() == inputs.authority
    }
}

/// A thread's last `N` remembered values, the oldest replaced first: the
/// memos of pure functions on every hit (this module's URL keys, the data
/// cache's key hashes, the directives of `Cache-Control` values).
pub(crate) struct Ring<T, const N: usize> {
    slots: [Option<T>; N],
    /// The slot the next value takes.
    next: usize,
}

impl<T, const N: usize> Ring<T, N> {
    pub(crate) const fn new() -> Self {
        Self {
            slots: [const { None }; N],
            next: 0,
        }
    }

    /// The first remembered value `holds` accepts.
    pub(crate) fn find(&self, holds: impl Fn(&T) -> bool) -> Option<&T> {
        self.slots.iter().flatten().find(|value| holds(value))
    }

    /// Remembers `value` in place of the oldest.
    pub(crate) fn keep(&mut self, value: T) {
        self.slots[self.next] = Some(value);
        self.next = (self.next + 1) % N;
    }
}

thread_local! {
    static MEMO: RefCell<Ring<Slot, SLOTS>> = const { RefCell::new(Ring::new()) };
}

/// The URL (`//host/path?query`) and its hash of a request keyed in place
/// by the layer of `config`, under its allowed hosts and the route of the
/// request's path (see [`url_of`] and [`hash_url`]); `None` when it has no
/// URL the layer keys.
pub(crate) fn url_and_hash(
    config: &Config,
    head: &impl Head,
) -> Option<(std::sync::Arc<str>, std::sync::Arc<str>)> {
    let layer = config.id;
    let uri = head.uri();
    let mut hosts = head.headers().get_all(http::header::HOST).iter();
    let host = hosts.next();
    let inputs = Inputs {
        layer,
        authority: uri.authority().map(http::uri::Authority::as_str),
        host: host.map(http::HeaderValue::as_bytes),
        path: uri.path(),
        query: uri.query(),
    };
    let size = inputs.authority.map_or(0, str::len)
        + inputs.host.map_or(0, <[u8]>::len)
        + inputs.path.len()
        + inputs.query.map_or(0, str::len);
    // Several `Host` fields: no URL (see `authority`), nothing to keep.
    let memoised = hosts.next().is_none() && size <= MAX_INPUT_BYTES;
    if memoised
        && let Ok(Some(found)) = MEMO.try_with(|memo| {
            let memo = memo.borrow();
            let slot = memo.find(|slot| slot.holds(&inputs))?;
            Some((slot.url.clone(), slot.url_hash.clone()))
        })
    {
        return Some(found);
    }
    let url = url_of(head, &config.allowed_hosts, config.route_for(uri.path()))?;
    let url_hash: std::sync::Arc<str> = hash_url(&url).into();
    let url: std::sync::Arc<str> = url.into();
    if memoised {
        let slot = Slot {
            layer,
            authority: inputs.authority.map(Box::from),
            host: inputs.host.map(Box::from),
            path: inputs.path.into(),
            query: inputs.query.map(Box::from),
            url: url.clone(),
            url_hash: url_hash.clone(),
        };
        let _ = MEMO.try_with(|memo| memo.borrow_mut().keep(slot));
    }
    Some((url, url_hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Route;

    fn request(uri: &str, hosts: &[&str]) -> http::Request<()> {
        let mut builder = http::Request::get(uri);
        for host in hosts {
            builder = builder.header(http::header::HOST, *host);
        }
        builder.body(()).expect("a valid request")
    }

    /// A URL found in the memo is the URL keyed anew, for requests that
    /// differ in one input each, read more times over than the memo holds;
    /// and one layer's key is never taken for another's, whose rules differ.
    #[test]
    fn a_remembered_key_is_the_key_made_anew() {
        let layer = |hosts: &[&str]| {
            let layer = crate::CacheLayer::builder(tower_redis_core::RedisManager::disabled())
                .allowed_hosts(hosts.iter().copied())
                .route(Route::new("/*").ignore_query_params(["utm_*"]))
                .build()
                .expect("a valid layer");
            std::sync::Arc::clone(&layer.config)
        };
        let config = layer(&["shop.example", "other.example"]);
        let requests = [
            request("/p?a=1", &["shop.example"]),
            request("/p?a=2", &["shop.example"]),
            request("/p", &["shop.example"]),
            request("/q?a=1", &["shop.example"]),
            request("/p?a=1&utm_x=1", &["shop.example"]),
            request("/p?a=1", &["Shop.Example"]),
            request("/p?a=1", &["other.example"]),
            request("/p?a=1", &["shop.example:8080"]),
            request("http://shop.example/p?a=1", &["shop.example"]),
            request("http://other.example/p?a=1", &["shop.example"]),
            request("/p?a=1", &[]),
            request("/p?a=1", &["shop.example", "shop.example"]),
        ];
        for round in 0..3 {
            for (i, request) in requests.iter().enumerate() {
                let route = config.route_for(request.uri().path());
                let made = url_of(request, &config.allowed_hosts, route).map(|url| {
                    let hash = hash_url(&url);
                    (url.into(), hash.into())
                });
                assert_eq!(
                    url_and_hash(&config, request),
                    made,
                    "round {round}, request {i}: {:?} {:?}",
                    request.uri(),
                    request.headers()
                );
            }
        }
        // The same request under a layer that allows other hosts only.
        let shop = &requests[0];
        assert!(url_and_hash(&config, shop).is_some());
        assert_eq!(url_and_hash(&layer(&["other.example"]), shop), None);
    }
}
