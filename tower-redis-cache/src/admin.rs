//! An axum `Router` for the [`CacheHandle`] operations, behind an
//! authorisation check the app supplies (feature `axum`).
//!
//! | method and path | does |
//! |---|---|
//! | `POST /purge/tag/{tag}` | [`CacheHandle::purge_tag`] |
//! | `POST /soft-purge/tag/{tag}` | [`CacheHandle::soft_purge_tag`] |
//! | `POST /purge/url?url=…` | [`CacheHandle::purge_url`] |
//! | `POST /soft-purge/url?url=…` | [`CacheHandle::soft_purge_url`] |
//! | `POST /purge/prefix?prefix=…` | [`CacheHandle::purge_prefix`] |
//! | `POST /purge/all` | [`CacheHandle::purge_all`] |
//! | `GET /entry?url=…` | [`CacheHandle::entry`] |
//! | `GET /stats` | [`CacheHandle::stats`] |
//! | `POST /warm` (JSON array of URLs) | [`CacheHandle::warm`], when built with [`CacheAdmin::warm_through`] |
//!
//! Answers are JSON; a refused check is `401`, a bad URL or prefix `400`
//! with the reason, an unknown entry `404`. A path or method the router
//! does not have is a `404` or `405` problem whose detail lists the routes
//! above (after the same check: it says nothing to a refused caller).
//!
//! The check is the app's: compare secrets in constant time, never with
//! `==` (which stops at the first differing byte, so response times reveal
//! how much of a guess is right). Here both sides are hashed with SHA-256
//! and every byte of the digests is compared; the `subtle` crate's
//! `ConstantTimeEq` on the digests does the same.
//!
//! ```no_run
//! use axum::Router;
//! use sha2::{Digest, Sha256};
//! use tower_redis_cache::admin::CacheAdmin;
//!
//! # fn demo(cache: tower_redis_cache::CacheLayer, app: Router, token: &str) -> Router {
//! let expected = Sha256::digest(format!("Bearer {token}"));
//! let admin = CacheAdmin::new(cache.handle(), move |headers: &axum::http::HeaderMap| {
//!     headers.get("authorization").is_some_and(|value| {
//!         let given = Sha256::digest(value.as_bytes());
//!         // No early exit: the time taken says nothing about the token.
//!         given.iter().zip(expected.iter()).fold(0, |diff, (a, b)| diff | (a ^ b)) == 0
//!     })
//! })
//! .warm_through(app.clone())
//! .into_router();
//! app.nest("/admin/cache", admin)
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::Empty;
use serde::Deserialize;
use serde_json::json;
use tower_redis_core::http::Problem;
use tower_service::Service;

use crate::handle::{CacheHandle, InvalidUrl, Purged, Warmed};

type Authorize = Arc<dyn Fn(&HeaderMap) -> bool + Send + Sync>;
type Warmer =
    Arc<dyn Fn(Vec<String>) -> Pin<Box<dyn Future<Output = Vec<Warmed>> + Send>> + Send + Sync>;

/// Builds the admin [`Router`].
#[derive(Clone)]
pub struct CacheAdmin {
    handle: CacheHandle,
    authorize: Authorize,
    warmer: Option<Warmer>,
}

impl std::fmt::Debug for CacheAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheAdmin")
            .field("warm", &self.warmer.is_some())
            .finish_non_exhaustive()
    }
}

impl CacheAdmin {
    /// The operations of `handle`, each allowed only when `authorize`
    /// returns true for the request's headers.
    pub fn new<F>(handle: CacheHandle, authorize: F) -> Self
    where
        F: Fn(&HeaderMap) -> bool + Send + Sync + 'static,
    {
        Self {
            handle,
            authorize: Arc::new(authorize),
            warmer: None,
        }
    }

    /// Enables `POST /warm`, sending the requests through `service` (the
    /// app with the cache layer in it, e.g. its `Router`).
    pub fn warm_through<S>(mut self, service: S) -> Self
    where
        S: Service<Request<Empty<Bytes>>, Response = Response> + Clone + Send + Sync + 'static,
        S::Error: std::fmt::Display + Send,
        S::Future: Send,
    {
        let handle = self.handle.clone();
        self.warmer = Some(Arc::new(move |urls| {
            let handle = handle.clone();
            let service = service.clone();
            Box::pin(async move { handle.warm(service, urls).await })
        }));
        self
    }

    /// The router; nest it where the app wants it
    /// (`app.nest("/admin/cache", router)`). Nest it rather than merge it:
    /// its fallback answers the paths under it that it does not have (a
    /// `404` naming its routes, after the check), and merged into an app it
    /// would answer the app's unknown paths too (axum refuses to merge it
    /// into an app with a fallback of its own).
    pub fn into_router(self) -> Router {
        Router::new()
            .route("/purge/tag/{tag}", post(purge_tag))
            .route("/soft-purge/tag/{tag}", post(soft_purge_tag))
            .route("/purge/url", post(purge_url))
            .route("/soft-purge/url", post(soft_purge_url))
            .route("/purge/prefix", post(purge_prefix))
            .route("/purge/all", post(purge_all))
            .route("/entry", get(entry))
            .route("/stats", get(stats))
            .route("/warm", post(warm))
            .method_not_allowed_fallback(wrong_method)
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                authorised,
            ))
            .fallback(unknown)
            .with_state(self)
    }

    /// The answer to a request the check refuses.
    fn refusal(&self, headers: &HeaderMap) -> Option<Response> {
        (!(self.authorize)(headers)).then(|| {
            problem(
                StatusCode::UNAUTHORIZED,
                "not authorised for the cache admin operations",
            )
        })
    }
}

/// Every route answers only requests the check accepts.
async fn authorised(
    State(admin): State<CacheAdmin>,
    request: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    match admin.refusal(request.headers()) {
        Some(refused) => refused,
        None => next.run(request).await,
    }
}

/// The routes, for the answer to a request that matches none of them.
const ROUTES: &str = "POST /purge/tag/{tag}, POST /soft-purge/tag/{tag}, POST /purge/url?url=…, \
     POST /soft-purge/url?url=…, POST /purge/prefix?prefix=…, POST /purge/all, GET /entry?url=…, \
     GET /stats, POST /warm (relative to where the router is nested)";

/// A path the router does not have: checked like the routes, then a `404`
/// that names them.
async fn unknown(State(admin): State<CacheAdmin>, headers: HeaderMap) -> Response {
    if let Some(refused) = admin.refusal(&headers) {
        return refused;
    }
    problem(
        StatusCode::NOT_FOUND,
        &format!("no such cache admin operation; the operations are: {ROUTES}"),
    )
}

/// A route asked with another method (after the check, as every route).
async fn wrong_method() -> Response {
    problem(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("this operation takes another method; the operations are: {ROUTES}"),
    )
}

#[derive(Deserialize)]
struct UrlQuery {
    url: String,
}

#[derive(Deserialize)]
struct PrefixQuery {
    prefix: String,
}

fn problem(status: StatusCode, detail: &str) -> Response {
    Problem::new(status)
        .detail(detail.to_owned())
        .into_response()
        .map(axum::body::Body::from)
}

fn purged(result: Result<Purged, InvalidUrl>) -> Response {
    match result {
        Ok(purged) => {
            Json(json!({ "urls": purged.urls, "deferred": purged.deferred })).into_response()
        }
        Err(invalid) => problem(StatusCode::BAD_REQUEST, &invalid.to_string()),
    }
}

async fn purge_tag(State(admin): State<CacheAdmin>, Path(tag): Path<String>) -> Response {
    purged(Ok(admin.handle.purge_tag(&tag).await))
}

async fn soft_purge_tag(State(admin): State<CacheAdmin>, Path(tag): Path<String>) -> Response {
    purged(Ok(admin.handle.soft_purge_tag(&tag).await))
}

async fn purge_url(State(admin): State<CacheAdmin>, Query(query): Query<UrlQuery>) -> Response {
    purged(admin.handle.purge_url(&query.url).await)
}

async fn soft_purge_url(
    State(admin): State<CacheAdmin>,
    Query(query): Query<UrlQuery>,
) -> Response {
    purged(admin.handle.soft_purge_url(&query.url).await)
}

async fn purge_prefix(
    State(admin): State<CacheAdmin>,
    Query(query): Query<PrefixQuery>,
) -> Response {
    purged(admin.handle.purge_prefix(&query.prefix).await)
}

async fn purge_all(State(admin): State<CacheAdmin>) -> Response {
    purged(Ok(admin.handle.purge_all().await))
}

async fn entry(State(admin): State<CacheAdmin>, Query(query): Query<UrlQuery>) -> Response {
    match admin.handle.entry(&query.url).await {
        Ok(Some(info)) => {
            let stored: Vec<(String, String)> = info
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            Json(json!({
                "status": info.status,
                "headers": stored,
                "tags": info.tags,
                "age_seconds": info.age.as_secs(),
                "ttl_seconds": info.ttl,
                "body_bytes": info.body_bytes,
                "source": info.source,
            }))
            .into_response()
        }
        Ok(None) => problem(StatusCode::NOT_FOUND, "no entry for this URL"),
        Err(invalid) => problem(StatusCode::BAD_REQUEST, &invalid.to_string()),
    }
}

async fn stats(State(admin): State<CacheAdmin>) -> Response {
    let stats = admin.handle.stats().await;
    Json(json!({
        "hits": stats.hits,
        "stale_hits": stats.stale_hits,
        "coalesced": stats.coalesced,
        "misses": stats.misses,
        "stores": stats.stores,
        "hit_ratio": stats.hit_ratio,
        "entries": stats.entries,
        "bytes": stats.bytes,
        "in_process": stats.in_process,
    }))
    .into_response()
}

async fn warm(State(admin): State<CacheAdmin>, body: Body) -> Response {
    let Some(warmer) = admin.warmer.clone() else {
        return problem(
            StatusCode::NOT_FOUND,
            "warming is not enabled: build the admin router with `warm_through(app)`",
        );
    };
    let bytes = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return problem(StatusCode::PAYLOAD_TOO_LARGE, "the URL list is over 1 MiB");
        }
    };
    let Ok(urls) = serde_json::from_slice::<Vec<String>>(&bytes) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "send a JSON array of absolute URLs, e.g. [\"https://shop.example/\"]",
        );
    };
    let report: Vec<_> = warmer(urls)
        .await
        .into_iter()
        .map(|w| {
            json!({
                "url": w.url,
                "status": w.status,
                "cache_status": w.cache_status,
                "error": w.error,
            })
        })
        .collect();
    Json(report).into_response()
}
