//! Unsafe methods (RFC 9111 §4.4): forwarded, and on success their target
//! (and a same-origin `Location` / `Content-Location`) is invalidated.
//! With `store_post`, a `POST` answer that names its own URL in
//! `Content-Location` and has explicit freshness is then stored for `GET`s.

use std::sync::Arc;
use std::time::SystemTime;

use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, header};
use tower_service::Service;

use super::cache_status::CacheStatus;
use super::miss::Fill;
use super::{Answer, Ctx, Keyed, OriginBody, head_only, passthrough, request, storing};
use crate::freshness;
use crate::key;
use crate::layer::Config;
use crate::store::Tier;

/// An unsafe method: forwarded, and on success its target (and same-origin
/// `Location` / `Content-Location`) is invalidated.
pub(super) async fn invalidating<S, ReqBody, ResBody>(
    config: &Arc<Config>,
    mut inner: S,
    request: Request<ReqBody>,
) -> Answer<ResBody, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: OriginBody,
{
    let post = (config.store_post && request.method() == Method::POST)
        .then(|| as_get(config, &request))
        .flatten();
    let (parts, ()) = head_only(&request);
    // Behind a trusted proxy the entries of this URL are keyed by the host
    // the proxy reports; the request's own host is invalidated as well, as
    // over-invalidating only costs a miss.
    let mut heads = vec![parts];
    if let Ok(Some((_, view))) = request::forwarded_origin(config, &request)
        && let Some(host) = &view.host
    {
        heads.push(key::with_host(&heads[0], host));
    }
    let request_time = SystemTime::now();
    let response = inner.call(request).await?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        let urls = invalidated(config, &heads, response.headers());
        config.store.invalidate(&urls).await;
    }
    match post {
        Some(keyed) if names_itself(config, &keyed, response.headers()) => {
            let ctx = Ctx {
                config: Arc::clone(config),
                keyed,
            };
            let status = CacheStatus::forward("method", Tier::Redis);
            Ok(storing::store_if_allowed(
                &ctx,
                response,
                request_time,
                status,
                Fill::none(),
            ))
        }
        _ => Ok(passthrough(config, response)),
    }
}

/// A `POST` seen as the `GET` of its URL whose answer it may become: its
/// key, with the head a `GET` would have had (no body fields).
fn as_get<B>(config: &Config, request: &Request<B>) -> Option<Keyed> {
    let mut keyed = Keyed::of_target(config, request)?;
    keyed.parts.method = Method::GET;
    for name in [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONTENT_TYPE,
    ] {
        keyed.parts.headers.remove(name);
    }
    Some(keyed)
}

/// Whether a `POST` answer is its URL's representation (RFC 9110 §9.3.3):
/// a `Content-Location` naming the request's own URL, and explicit
/// freshness. The other storage rules are checked as for a `GET`.
fn names_itself(config: &Config, keyed: &Keyed, response: &HeaderMap) -> bool {
    let route = |path: &str| config.route_for(path);
    response
        .get(header::CONTENT_LOCATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| key::same_origin_url(&keyed.parts, value, &config.allowed_hosts, route))
        .is_some_and(|url| url == keyed.url)
        && freshness::has_explicit_freshness(response, &config.rules)
}

/// The URL hashes a successful unsafe request invalidates, sorted and
/// deduplicated: its target under each of its `heads`, and the response's
/// same-origin `Location` and `Content-Location`.
fn invalidated(config: &Config, heads: &[Parts], response: &HeaderMap) -> Vec<String> {
    let mut urls = Vec::new();
    for parts in heads {
        let route = config.route_for(parts.uri.path());
        for url in key::invalidated_urls(parts, &config.allowed_hosts, route) {
            urls.push(key::hash_url(&url));
        }
        for field in [header::LOCATION, header::CONTENT_LOCATION] {
            if let Some(value) = response.get(field).and_then(|v| v.to_str().ok())
                && let Some(url) =
                    key::same_origin_url(parts, value, &config.allowed_hosts, |path| {
                        config.route_for(path)
                    })
            {
                urls.push(key::hash_url(&url));
            }
        }
    }
    urls.sort_unstable();
    urls.dedup();
    urls
}
