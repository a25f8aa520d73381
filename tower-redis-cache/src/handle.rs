//! [`CacheHandle`]: purge, warm, inspect and count, from anywhere in the app.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Uri, header};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use tower_service::Service;

use crate::key;
use crate::layer::Config;
pub use crate::store::Purged;
use crate::store::{Target, Tier};
use tower_redis_core::clock;

/// The admin side of a [`CacheLayer`](crate::CacheLayer), from
/// [`CacheLayer::handle`](crate::CacheLayer::handle): purges (by tag, URL,
/// path prefix, everything; hard or soft), warming, entry inspection and
/// statistics. Cheap to clone.
///
/// Purges reach Redis, this instance's in-process stores and (through
/// pub/sub) every instance's near cache. While Redis is unavailable a purge
/// runs on the in-process store, is replayed on Redis when it is back, and
/// says so with [`Purged::deferred`].
///
/// ```no_run
/// # async fn demo(cache: tower_redis_cache::CacheLayer) -> Result<(), tower_redis_cache::InvalidUrl> {
/// let handle = cache.handle();
/// handle.purge_tag("product:42").await;          // every URL tagged product:42
/// handle.soft_purge_tag("catalogue").await;      // stale, served while refreshed
/// handle.purge_url("/products/42").await?;       // on every host
/// handle.purge_prefix("/products/").await?;
/// let stats = handle.stats().await;
/// println!("hit ratio {:.2}, {} entries", stats.hit_ratio, stats.entries);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CacheHandle {
    config: Arc<Config>,
}

impl std::fmt::Debug for CacheHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheHandle").finish_non_exhaustive()
    }
}

/// A URL or path the handle cannot use, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{url:?}: {problem}")]
pub struct InvalidUrl {
    /// What was given.
    pub url: String,
    /// What is wrong with it, and what to give instead.
    pub problem: &'static str,
}

/// One entry, as [`CacheHandle::entry`] finds it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EntryInfo {
    /// The stored status.
    pub status: u16,
    /// The stored header fields (without tag headers).
    pub headers: HeaderMap,
    /// The entry's tags.
    pub tags: Vec<String>,
    /// Its age (RFC 9111 §4.2.3).
    pub age: Duration,
    /// Freshness left, in seconds; negative when stale.
    pub ttl: i64,
    /// The body's size.
    pub body_bytes: usize,
    /// `"redis"`, `"near"` or `"in-process"` (Redis unavailable).
    pub source: &'static str,
}

/// A snapshot of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// Requests this instance answered from a fresh entry.
    pub hits: u64,
    /// Requests this instance answered stale (stale-while-revalidate,
    /// stale-if-error).
    pub stale_hits: u64,
    /// Requests this instance answered with an entry another request had
    /// just fetched (coalescing).
    pub coalesced: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Entries this instance stored.
    pub stores: u64,
    /// `(hits + stale_hits + coalesced) / (those + misses)`; 0 before any request.
    pub hit_ratio: f64,
    /// Live URLs in Redis (each with one or more variants), or in the
    /// in-process store while Redis is unavailable.
    pub entries: u64,
    /// Their approximate size in bytes (Redis: `MEMORY USAGE` of a sample
    /// of up to 64 URLs, times `entries`).
    pub bytes: u64,
    /// Whether `entries` and `bytes` describe the in-process store.
    pub in_process: bool,
}

/// How warming one URL went.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Warmed {
    /// The URL requested.
    pub url: String,
    /// The response status, when there was a response.
    pub status: Option<u16>,
    /// This cache's `Cache-Status` for it (`fwd=uri-miss; stored` when it
    /// was fetched and stored, `hit` when it already was).
    pub cache_status: Option<String>,
    /// What went wrong, if the request could not be made.
    pub error: Option<String>,
}

impl CacheHandle {
    pub(crate) fn new(config: Arc<Config>) -> Self {
        Self { config }
    }

    /// A typed cache-aside cache on this layer's store (see
    /// [`crate::data`]): same Redis keys, tags, near cache and in-process
    /// fallback, so [`purge_tag`](Self::purge_tag) removes data values and
    /// pages together. Values are limited to the layer's `max_body_bytes`;
    /// a caller waits for another's fill up to the layer's coalescing wait
    /// (5 s without coalescing). Obtain it once and clone it: clones share
    /// their in-process coalescing.
    pub fn data(&self) -> crate::data::DataCache {
        crate::data::DataCache::on_store(
            Arc::clone(&self.config.store),
            self.config.max_body_bytes,
            self.config.coalesce.unwrap_or(Duration::from_secs(5)),
            crate::data::Json,
        )
    }

    /// Removes every URL tagged `tag` (response `Surrogate-Key` / `Cache-Tag`
    /// headers, [`Route::tag`](crate::Route::tag), [`Route::tags_fn`](crate::Route::tags_fn)).
    pub async fn purge_tag(&self, tag: &str) -> Purged {
        self.config
            .store
            .purge(&Target::Tag(tag.to_owned()), None)
            .await
    }

    /// Marks every URL tagged `tag` stale: entries that may be served
    /// stale-while-revalidate keep being served while one request refreshes
    /// each; the others are revalidated on their next request.
    pub async fn soft_purge_tag(&self, tag: &str) -> Purged {
        self.config
            .store
            .purge(&Target::Tag(tag.to_owned()), Some(clock::now_ms()))
            .await
    }

    /// Removes one URL: an absolute URL (`https://shop.example/products/1`)
    /// on its host, or a path with an optional query (`/products/1?page=2`)
    /// on every host. The query is normalised as the URL's route does for
    /// its keys (sorted, ignored parameters removed).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .route(Route::new("*").default_ttl(Duration::from_secs(60)))
    ///     .build()?;
    /// let handle = cache.handle();
    /// let app = Router::new().route("/products/{id}", get(|| async { "a product" })).layer(cache);
    ///
    /// send(&app, req("http://shop.example/products/1?page=2")).await;
    /// // A path purges that URL on every host; an absolute URL on its host only.
    /// handle.purge_url("/products/1?page=2").await?;
    /// assert!(status(&send(&app, req("http://shop.example/products/1?page=2")).await).contains("miss"));
    /// assert!(handle.purge_url("not a url").await.is_err());
    /// # Ok(()) }
    /// ```
    pub async fn purge_url(&self, url: &str) -> Result<Purged, InvalidUrl> {
        let target = self.target_of(url)?;
        Ok(self.config.store.purge(&target, None).await)
    }

    /// Marks one URL stale (see [`soft_purge_tag`](Self::soft_purge_tag)).
    pub async fn soft_purge_url(&self, url: &str) -> Result<Purged, InvalidUrl> {
        let target = self.target_of(url)?;
        Ok(self
            .config
            .store
            .purge(&target, Some(clock::now_ms()))
            .await)
    }

    /// Removes every URL whose path starts with `prefix` (`/products/`), on
    /// every host. Costs O(URLs under the prefix's directory).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .route(Route::new("*").default_ttl(Duration::from_secs(60)))
    ///     .build()?;
    /// let handle = cache.handle();
    /// let app = Router::new()
    ///     .route("/products/{id}", get(|| async { "a product" }))
    ///     .route("/about", get(|| async { "about" }))
    ///     .layer(cache);
    ///
    /// send(&app, req("http://shop.example/products/1")).await;
    /// send(&app, req("http://shop.example/about")).await;
    /// handle.purge_prefix("/products/").await?;
    /// assert!(status(&send(&app, req("http://shop.example/products/1")).await).contains("miss"));
    /// assert!(status(&send(&app, req("http://shop.example/about")).await).starts_with("tower-redis; hit"));
    /// # Ok(()) }
    /// ```
    pub async fn purge_prefix(&self, prefix: &str) -> Result<Purged, InvalidUrl> {
        if !prefix.starts_with('/') {
            return Err(InvalidUrl {
                url: prefix.to_owned(),
                problem: "a prefix is a path starting with `/`, such as `/products/`",
            });
        }
        Ok(self
            .config
            .store
            .purge(&Target::Prefix(prefix.to_owned()), None)
            .await)
    }

    /// Removes every entry of this cache (its key prefix), everywhere.
    pub async fn purge_all(&self) -> Purged {
        self.config.store.purge(&Target::All, None).await
    }

    /// The entry stored for an absolute URL, as a request without
    /// `Vary`-relevant headers would select it.
    pub async fn entry(&self, url: &str) -> Result<Option<EntryInfo>, InvalidUrl> {
        let Target::Url(key_url) = self.target_of(url)? else {
            return Err(InvalidUrl {
                url: url.to_owned(),
                problem: "give an absolute URL (`https://host/path`): entries are per host",
            });
        };
        let Some((entry, tier)) = self.config.store.inspect(&key::hash_url(&key_url)).await else {
            return Ok(None);
        };
        let now = clock::now_ms();
        let mut headers = entry.headers.clone();
        let tags = headers
            .remove("tower-redis-tags")
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .split(' ')
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(EntryInfo {
            status: entry.status.as_u16(),
            headers,
            tags,
            age: Duration::from_secs(entry.age(now)),
            ttl: entry.ttl(now),
            body_bytes: entry.body.len(),
            source: match tier {
                Tier::Redis => "redis",
                Tier::Near => "near",
                Tier::Degraded => "in-process",
            },
        }))
    }

    /// Counters of this instance and the size of the cache.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use axum::{Router, body::Body, routing::get};
    /// # use bytes::Bytes;
    /// # use http::{Request, Response};
    /// # use tower_redis_cache::{CacheLayer, RedisManager, Route};
    /// # async fn send(app: &Router, request: Request<Body>) -> Response<Bytes> {
    /// #     use http_body_util::BodyExt;
    /// #     use tower::ServiceExt;
    /// #     let (parts, body) = app.clone().oneshot(request).await.unwrap().into_parts();
    /// #     Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    /// # }
    /// # fn req(uri: &str) -> Request<Body> {
    /// #     Request::get(uri).body(Body::empty()).unwrap()
    /// # }
    /// # fn status(response: &Response<Bytes>) -> &str {
    /// #     response.headers().get("cache-status").map_or("", |v| v.to_str().unwrap())
    /// # }
    /// # fn ttl(response: &Response<Bytes>) -> i64 {
    /// #     let status = status(response);
    /// #     let ttl = status.split("; ").find_map(|p| p.strip_prefix("ttl=")).expect(status);
    /// #     ttl.parse().unwrap()
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = CacheLayer::builder(RedisManager::disabled())
    ///     .route(Route::new("*").default_ttl(Duration::from_secs(60)))
    ///     .build()?;
    /// let handle = cache.handle();
    /// let app = Router::new().route("/", get(|| async { "home" })).layer(cache);
    ///
    /// send(&app, req("http://shop.example/")).await; // miss
    /// send(&app, req("http://shop.example/")).await; // hit
    /// let stats = handle.stats().await;
    /// assert_eq!((stats.hits, stats.misses), (1, 1));
    /// assert_eq!(stats.hit_ratio, 0.5);
    /// # Ok(()) }
    /// ```
    pub async fn stats(&self) -> Stats {
        let counters = &self.config.store.counters;
        let hits = counters.hits.load(Ordering::Relaxed);
        let stale_hits = counters.stale_hits.load(Ordering::Relaxed);
        let coalesced = counters.coalesced.load(Ordering::Relaxed);
        let misses = counters.misses.load(Ordering::Relaxed);
        let served = hits + stale_hits + coalesced;
        let (entries, bytes, in_process) = self.config.store.size().await;
        Stats {
            hits,
            stale_hits,
            coalesced,
            misses,
            stores: counters.stores.load(Ordering::Relaxed),
            hit_ratio: if served + misses == 0 {
                0.0
            } else {
                served as f64 / (served + misses) as f64
            },
            entries,
            bytes,
            in_process,
        }
    }

    /// Fills the cache by sending `GET` requests for absolute `urls`
    /// through `service` — the app *with* this cache layer in it, e.g. the
    /// axum `Router` — one at a time, and waits until their entries are
    /// stored. URLs already cached are hits and cost nothing. Requests pass
    /// through every layer of `service` (rate limits included).
    pub async fn warm<S, RB, I, U>(&self, mut service: S, urls: I) -> Vec<Warmed>
    where
        S: Service<Request<Empty<Bytes>>, Response = Response<RB>>,
        S::Error: std::fmt::Display,
        RB: Body,
        I: IntoIterator<Item = U>,
        U: AsRef<str>,
    {
        let mut report = Vec::new();
        for url in urls {
            let url = url.as_ref().to_owned();
            let request = url
                .parse::<Uri>()
                .ok()
                .filter(|uri| uri.authority().is_some())
                .and_then(|uri| {
                    let host = uri.authority()?.as_str().to_owned();
                    Request::get(uri)
                        .header(header::HOST, host)
                        .body(Empty::new())
                        .ok()
                });
            let Some(request) = request else {
                report.push(Warmed {
                    url,
                    status: None,
                    cache_status: None,
                    error: Some("not an absolute URL (`https://host/path`)".to_owned()),
                });
                continue;
            };
            let outcome = match std::future::poll_fn(|cx| service.poll_ready(cx)).await {
                Ok(()) => service.call(request).await,
                Err(error) => Err(error),
            };
            report.push(match outcome {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let cache_status = response
                        .headers()
                        .get_all(&crate::service::CACHE_STATUS)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .find(|v| v.starts_with("tower-redis"))
                        .map(str::to_owned);
                    // Read to its end: a body dropped early is a client
                    // that left, and nothing would be stored.
                    let _ = response.into_body().collect().await;
                    Warmed {
                        url,
                        status: Some(status),
                        cache_status,
                        error: None,
                    }
                }
                Err(error) => Warmed {
                    url,
                    status: None,
                    cache_status: None,
                    error: Some(error.to_string()),
                },
            });
        }
        self.config.store.flushed().await;
        report
    }

    fn target_of(&self, url: &str) -> Result<Target, InvalidUrl> {
        let invalid = |problem| InvalidUrl {
            url: url.to_owned(),
            problem,
        };
        let uri: Uri = url
            .parse()
            .map_err(|_| invalid("not a URL; give `https://host/path?query` or `/path?query`"))?;
        let parts = Request::get(uri.clone())
            .body(())
            .map_err(|_| invalid("not a usable request target"))?
            .into_parts()
            .0;
        let route = self.config.route_for(uri.path());
        if uri.authority().is_some() {
            let key_url = key::url_of(&parts, &self.config.allowed_hosts, route)
                .ok_or_else(|| invalid("its host is not one this cache stores"))?;
            return Ok(Target::Url(key_url));
        }
        if !url.starts_with('/') {
            return Err(invalid(
                "give an absolute URL (`https://host/path`) or a path starting with `/`",
            ));
        }
        // Normalised as keys are: the purge and the index agree.
        let path = key::path_target(&parts, route).ok_or_else(|| invalid("not a usable path"))?;
        Ok(Target::Path(path))
    }
}
