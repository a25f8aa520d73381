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
use super::{Answer, Ctx, Keyed, OriginBody, head_only, passthrough, range, request, storing};
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
        Some(post) if names_itself(config, &post, status, response.headers()) => {
            let ctx = Ctx {
                config: Arc::clone(config),
                keyed: post.keyed,
            };
            let status = CacheStatus::forward("method", Tier::Redis);
            Ok(storing::store_if_allowed(
                &ctx,
                response,
                request_time,
                status,
                Fill::own_write(),
            ))
        }
        _ => Ok(passthrough(config, response)),
    }
}

/// A `POST` seen as the `GET` of its URL whose answer it may become.
struct PostAsGet {
    /// Its key, with the head a `GET` would have had (no `Range`).
    keyed: Keyed,
    /// The head its `Content-Location` is resolved against: with the host
    /// a trusted proxy reported, as its key was built.
    base: Parts,
}

fn as_get<B>(config: &Config, request: &Request<B>) -> Option<PostAsGet> {
    let mut keyed = Keyed::of_target(config, request)?;
    keyed.parts.method = Method::GET;
    range::strip(&mut keyed.parts.headers);
    let base = match request::forwarded_origin(config, request) {
        Ok(Some((_, view))) => match &view.host {
            Some(host) => key::with_host(&keyed.parts, host),
            None => keyed.parts.clone(),
        },
        _ => keyed.parts.clone(),
    };
    Some(PostAsGet { keyed, base })
}

/// Request fields that describe a `POST`'s body: a `GET` has none, so an
/// answer chosen by them (`Vary`) is no `GET`'s answer.
const BODY_FIELDS: [header::HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::TRANSFER_ENCODING,
];

/// Whether a `POST` answer is its URL's representation (RFC 9110 §9.3.3,
/// §8.7): a `200` or `203` whose `Content-Location` names the request's own
/// URL, with explicit freshness. Never one that sets a cookie (a `POST`
/// answer is far more often one client's than a `GET`'s), nor one whose
/// `Vary` names a field of the request body. The other storage rules are
/// checked as for a `GET`.
fn names_itself(
    config: &Config,
    post: &PostAsGet,
    status: http::StatusCode,
    headers: &HeaderMap,
) -> bool {
    let route = |path: &str| config.route_for(path);
    let varies_on_body = key::vary_names(headers).is_none_or(|names| {
        names
            .split(',')
            .any(|name| BODY_FIELDS.iter().any(|field| field.as_str() == name))
    });
    matches!(status.as_u16(), 200 | 203)
        && !headers.contains_key(header::SET_COOKIE)
        && !varies_on_body
        && headers
            .get(header::CONTENT_LOCATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| key::same_origin_url(&post.base, value, &config.allowed_hosts, route))
            .is_some_and(|url| *url == *post.keyed.key.url)
        && freshness::has_explicit_freshness(headers, &config.rules)
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
