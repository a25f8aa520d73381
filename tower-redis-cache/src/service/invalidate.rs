//! Unsafe methods (RFC 9111 §4.4): forwarded, and on success their target
//! (and a same-origin `Location` / `Content-Location`) is invalidated.

use http::request::Parts;
use http::{HeaderMap, Request, Response, header};
use http_body::Body;
use tower_service::Service;

use super::{Answer, head_only, passthrough, request};
use crate::key;
use crate::layer::Config;

/// An unsafe method: forwarded, and on success its target (and same-origin
/// `Location` / `Content-Location`) is invalidated.
pub(super) async fn invalidating<S, ReqBody, ResBody>(
    config: &Config,
    mut inner: S,
    request: Request<ReqBody>,
) -> Answer<ResBody, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
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
    let response = inner.call(request).await?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        let urls = invalidated(config, &heads, response.headers());
        config.store.invalidate(&urls).await;
    }
    Ok(passthrough(config, response))
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
