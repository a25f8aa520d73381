//! A caching reverse proxy: puts the tower-redis cache (and, if asked, the
//! rate limiter) in front of any HTTP origin, whatever it is written in.
//!
//! ```text
//! cargo run --example caching_proxy -- --upstream http://127.0.0.1:8080 --listen 127.0.0.1:3001
//! cargo run --example caching_proxy -- --upstream http://127.0.0.1:8080 --rate-limit 100/min
//! ```
//!
//! Then talk to `http://127.0.0.1:3001` instead of the origin. Responses the
//! origin marks cacheable (`Cache-Control: public, max-age=…`, `s-maxage`,
//! `Expires`) are stored in Redis under RFC 9111 shared-cache rules and
//! answered from there, with `Cache-Status` and `Age`; a successful POST,
//! PUT, PATCH or DELETE invalidates its URL. Clients' own cache directives
//! (`Cache-Control: no-cache`, `Pragma: no-cache`, `max-age=0`, `no-store`)
//! are ignored, as a CDN edge does: the clients are not trusted to decide
//! when the upstream is asked again.
//!
//! As a proxy it:
//!
//! - forwards every method (CONNECT excepted: this is not a forward proxy),
//!   path and query to the upstream, and streams request and response
//!   bodies through (a response the cache stores, up to 1 MiB, is read
//!   from the upstream at its own pace, so a slow client never holds the
//!   entry back);
//! - removes hop-by-hop fields in both directions: `Connection` and every
//!   field it names, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`,
//!   `Transfer-Encoding`, `Upgrade` (so no WebSocket upgrades);
//! - sends `Host: <upstream authority>` upstream, with the client's `Host`
//!   in `X-Forwarded-Host`, plus `X-Forwarded-For` and `-Proto` (it writes
//!   only this family, never `Forwarded`: an app behind it that uses
//!   tower-redis trusts it with `TRUSTED_PROXIES=<proxy address>`, and
//!   keeps caching). It is meant to be the edge: the `Forwarded`,
//!   `X-Forwarded-*` and `X-Real-IP` fields a client sends are dropped before the cache
//!   sees the request, so nobody can forge them (or keep responses out of
//!   the cache with them);
//! - adds `Via` to requests and responses;
//! - answers range requests (`Range: bytes=…`, RFC 9110 §14) itself: by
//!   default the upstream is asked for the whole response, which is stored
//!   when it may be, and the range is cut from it (`206`, or `416` when it
//!   does not overlap; several ranges get the whole `200`). With
//!   `--forward-ranges` the range of a miss goes upstream as the client
//!   sent it, and a `206` is stored as a partial entry: later ranges inside
//!   it are hits, ranges reaching past it are completed with a range
//!   request for the missing bytes (RFC 9111 §3.3, §3.4);
//! - does not forward interim (1xx) responses: hyper's HTTP/1 client reads
//!   an upstream's `100`, `102` or `103` and drops it (its fields too), and
//!   hyper's server has no way to send one ahead of the final response
//!   (only the `100 Continue` it writes by itself when a request with
//!   `Expect: 100-continue` has its body read). The final response is
//!   forwarded and cached as usual, without any interim field (test
//!   `interim_tests::an_upstream_interim_response_is_dropped_and_the_final_one_forwarded`);
//! - answers `502 Bad Gateway` when the upstream cannot be reached and
//!   `504 Gateway Timeout` when it accepts but does not answer within
//!   `--timeout`, each with a one-line text body; but when the cache holds
//!   a stale copy, within `--stale-if-error` seconds past its freshness,
//!   that copy is served instead (RFC 5861; `Cache-Status` says
//!   `fwd=stale` and `stale-if-error`). The same happens when the upstream
//!   itself answers 500, 502, 503 or 504.
//!
//! Options: `--upstream URL` (required, `http://` only), `--listen ADDR`
//! (default `127.0.0.1:3001`; port 0 picks a free one, named in the log line
//! `listening on http://…`), `--rate-limit N/PERIOD` (per client IP, e.g.
//! `100/min`, `10/s`, `500/1h`, `20/30s`), `--timeout SECONDS` (default
//! 10), `--stale-if-error SECONDS` (default 300; 0 turns it off, except for
//! responses that carry `stale-if-error` themselves; never for responses
//! with `s-maxage`, `must-revalidate`, `proxy-revalidate` or `no-cache`),
//! `--heuristic` (heuristic freshness, RFC 9111 §4.2.2: a response with
//! `Last-Modified` and no explicit freshness is fresh for 10% of its age)
//! with `--heuristic-cap SECONDS` (default 86400), `--store-set-cookie`
//! (store cacheable responses that carry `Set-Cookie`, keeping the field,
//! or dropping it alone when the response says `private="Set-Cookie"` or
//! `no-cache="Set-Cookie"`; off by default, because an origin that sends a
//! session cookie on a `public` page would hand it to everyone), `--store-post`
//! (store a `POST` answer whose `Content-Location` is its own URL and whose
//! freshness is explicit, for later `GET`s; RFC 9110 §9.3.3),
//! `--forward-ranges` (see above: for large files read by ranges).
//! Environment:
//! `REDIS_URL` (default `redis://127.0.0.1:6379`; `memory` for in-process
//! stores only), `RUST_LOG` (default `info`). Without a reachable Redis it
//! starts anyway on the in-process fallbacks.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::uri::{Authority, Scheme};
use axum::http::{Method, StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_redis_cache::{CacheLayer, RequestCacheControl, Route};
use tower_redis_ratelimit::{Policy, RateLimitLayer};

mod support;

const USAGE: &str = "\
usage: caching_proxy --upstream http://HOST[:PORT] [--listen ADDR] [--rate-limit N/PERIOD]
                     [--timeout SECONDS] [--stale-if-error SECONDS]
                     [--heuristic [--heuristic-cap SECONDS]] [--store-set-cookie]
                     [--store-post] [--forward-ranges]

  --upstream URL        the origin to forward to (http:// only)
  --listen ADDR         where to listen (default 127.0.0.1:3001; port 0 picks a free one)
  --rate-limit N/PERIOD limit each client IP, e.g. 100/min, 10/s, 500/1h, 20/30s (default: no limit)
  --timeout SECONDS     how long to wait for the upstream's answer (default 10)
  --stale-if-error SECONDS
                        serve a cached copy this long past its freshness when the upstream
                        fails (default 300; 0: only when the response says stale-if-error)
  --heuristic           cache responses with Last-Modified but no explicit freshness for 10% of
                        their age (RFC 9111 §4.2.2; default off)
  --heuristic-cap SECONDS
                        the longest heuristic freshness (default 86400)
  --store-set-cookie    store cacheable responses that carry Set-Cookie (default off)
  --store-post          store POST answers whose Content-Location is their own URL and whose
                        freshness is explicit, for later GETs (default off)
  --forward-ranges      send a range miss upstream with its Range and store partial (206)
                        answers, completed by range requests later (default off: the whole
                        response is fetched and the range cut from it)

environment: REDIS_URL (default redis://127.0.0.1:6379; `memory` for in-process stores only), RUST_LOG";

/// The name this proxy gives itself in `Via`.
const VIA_NAME: &str = "tower-redis-proxy";

#[derive(Debug, Clone, PartialEq)]
struct Args {
    upstream: Upstream,
    listen: SocketAddr,
    rate_limit: Option<(u32, Duration)>,
    timeout: Duration,
    stale_if_error: Duration,
    /// Heuristic freshness and its cap; `None`: off.
    heuristic: Option<Duration>,
    store_set_cookie: bool,
    store_post: bool,
    forward_ranges: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Upstream {
    scheme: Scheme,
    authority: Authority,
    /// A path prefix from the upstream URL, without its trailing `/`.
    base_path: String,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

#[derive(Clone)]
struct Proxy {
    client: Client<HttpConnector, Body>,
    upstream: Upstream,
    timeout: Duration,
}

#[tokio::main]
async fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            eprintln!("{USAGE}");
            return;
        }
        Err(problem) => {
            eprintln!("caching_proxy: {problem}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(error) = run(args).await {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    support::init_tracing();
    let redis = support::redis_from_env().await?;

    // The upstream's own Cache-Control decides what is stored.
    let mut route = Route::new("*");
    if !args.stale_if_error.is_zero() {
        route = route.stale_if_error(args.stale_if_error);
    }
    let mut cache = CacheLayer::builder(redis.clone())
        .default_route(route)
        // Any client could otherwise make the upstream answer again.
        .request_cache_control(RequestCacheControl::Ignore)
        .store_set_cookie(args.store_set_cookie)
        .store_post(args.store_post)
        .forward_ranges(args.forward_ranges);
    if let Some(cap) = args.heuristic {
        cache = cache.heuristic_freshness(true).heuristic_freshness_cap(cap);
    }
    let cache = cache.build()?;

    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.set_nodelay(true);
    let proxy = Proxy {
        client: Client::builder(TokioExecutor::new()).build(connector),
        upstream: args.upstream.clone(),
        timeout: args.timeout,
    };

    let mut app = Router::new()
        .fallback(forward)
        .with_state(proxy)
        .layer(cache.clone())
        // Outside the cache: the cache must not see forgeable forwarding fields.
        .layer(axum::middleware::map_request(drop_client_forwarding));
    if let Some((quota, period)) = args.rate_limit {
        app = app.layer(
            RateLimitLayer::builder(redis)
                .policy(Policy::gcra("per-ip", quota, period))
                .build()?,
        );
    }

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {} ({e}); pick another --listen",
                args.listen
            )
        })?;
    tracing::info!(
        "listening on http://{}, forwarding to {}",
        listener.local_addr()?,
        args.upstream
    );
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(support::shutdown_signal())
    .await?;
    cache.flush().await;
    tracing::info!("stopped");
    Ok(())
}

/// Parses the command line; `Ok(None)` asks for the usage text.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
    let mut upstream = None;
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 3001));
    let mut rate_limit = None;
    let mut timeout = Duration::from_secs(10);
    let mut stale_if_error = Duration::from_secs(300);
    let mut heuristic = false;
    let mut heuristic_cap = None;
    let mut store_set_cookie = false;
    let mut store_post = false;
    let mut forward_ranges = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        // Both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--upstream" => upstream = Some(parse_upstream(&value()?)?),
            "--listen" => {
                let text = value()?;
                listen = text.parse().map_err(|_| {
                    format!("--listen {text:?} is not an address like 127.0.0.1:3001")
                })?;
            }
            "--rate-limit" => rate_limit = Some(parse_rate(&value()?)?),
            "--timeout" => {
                let text = value()?;
                timeout = text
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0 && *s <= 3600.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| {
                        format!("--timeout {text:?} is not a number of seconds (0 < s ≤ 3600)")
                    })?;
            }
            "--stale-if-error" => {
                let text = value()?;
                stale_if_error = text
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s <= 86_400)
                    .map(Duration::from_secs)
                    .ok_or_else(|| {
                        format!("--stale-if-error {text:?} is not a number of seconds (0 to 86400)")
                    })?;
            }
            "--heuristic" if inline.is_none() => heuristic = true,
            "--heuristic-cap" => {
                let text = value()?;
                heuristic_cap = Some(
                    text.parse::<u64>()
                        .ok()
                        .filter(|s| (1..=31_536_000).contains(s))
                        .map(Duration::from_secs)
                        .ok_or_else(|| {
                            format!(
                                "--heuristic-cap {text:?} is not a number of seconds (1 to 31536000)"
                            )
                        })?,
                );
            }
            "--store-set-cookie" if inline.is_none() => store_set_cookie = true,
            "--store-post" if inline.is_none() => store_post = true,
            "--forward-ranges" if inline.is_none() => forward_ranges = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let upstream = upstream.ok_or("--upstream is required")?;
    if heuristic_cap.is_some() && !heuristic {
        return Err("--heuristic-cap needs --heuristic".to_owned());
    }
    Ok(Some(Args {
        upstream,
        listen,
        rate_limit,
        timeout,
        stale_if_error,
        heuristic: heuristic.then(|| heuristic_cap.unwrap_or(Duration::from_secs(86_400))),
        store_set_cookie,
        store_post,
        forward_ranges,
    }))
}

fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let uri: Uri = text
        .parse()
        .map_err(|_| format!("--upstream {text:?} is not a URL like http://127.0.0.1:8080"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "--upstream {text:?}: https upstreams are not supported by this example; use http://"
            ));
        }
        _ => return Err(format!("--upstream {text:?} must start with http://")),
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("--upstream {text:?} names no host"))?;
    if uri.query().is_some() {
        return Err(format!("--upstream {text:?}: leave the query out"));
    }
    Ok(Upstream {
        scheme: Scheme::HTTP,
        authority,
        base_path: uri.path().trim_end_matches('/').to_owned(),
    })
}

/// `N/PERIOD`: `100/min`, `10/s`, `500/1h`, `20/30s`, `5/2m`.
fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let bad = || format!("--rate-limit {text:?} is not N/PERIOD, e.g. 100/min, 10/s, 20/30s");
    let (quota, period) = text.split_once('/').ok_or_else(bad)?;
    let quota: u32 = quota
        .trim()
        .parse()
        .ok()
        .filter(|q| *q > 0)
        .ok_or_else(bad)?;
    let period = period.trim();
    let digits = period.len()
        - period
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .len();
    let (count, unit) = period.split_at(digits);
    let count: u64 = if count.is_empty() {
        1
    } else {
        count.parse().ok().filter(|c| *c > 0).ok_or_else(bad)?
    };
    let unit_seconds = match unit {
        "s" | "sec" | "second" => 1,
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 3600,
        "d" | "day" => 86_400,
        _ => return Err(bad()),
    };
    Ok((
        quota,
        Duration::from_secs(count.saturating_mul(unit_seconds)),
    ))
}

/// Hop-by-hop fields (RFC 9110 §7.6.1) besides `Proxy-*`, plus
/// `Keep-Alive`, which HTTP/1.0 peers still send.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes `Connection`, every field it names, `Proxy-*` (`Proxy-Authorization`,
/// `Proxy-Authenticate`, `Proxy-Connection`, …) and the other hop-by-hop fields.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut doomed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    doomed.extend(
        headers
            .keys()
            .filter(|name| name.as_str().starts_with("proxy-"))
            .cloned(),
    );
    doomed.extend(HOP_BY_HOP.map(HeaderName::from_static));
    for name in doomed {
        headers.remove(name);
    }
}

/// Forwarding fields a client could forge: every one the cache knows
/// (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`). This proxy writes its own.
const CLIENT_FORWARDING: &[&str] = tower_redis_core::forwarding::FORWARDING_HEADERS;

async fn drop_client_forwarding(mut request: Request) -> Request {
    for name in CLIENT_FORWARDING {
        request.headers_mut().remove(*name);
    }
    request
}

/// Appends `<version> tower-redis-proxy` to `Via`.
fn add_via(headers: &mut HeaderMap, version: Version) {
    let protocol = match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    };
    let ours = format!("{protocol} {VIA_NAME}");
    let value = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, {ours}"),
        _ => ours,
    };
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(header::VIA, value);
    }
}

/// The handler behind the cache: every request the cache does not answer.
async fn forward(
    State(proxy): State<Proxy>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    if request.method() == Method::CONNECT {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported: this is a reverse proxy\n",
        )
            .into_response();
    }
    let (mut parts, body) = request.into_parts();
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let uri = Uri::builder()
        .scheme(proxy.upstream.scheme.clone())
        .authority(proxy.upstream.authority.clone())
        .path_and_query(format!("{}{path_and_query}", proxy.upstream.base_path))
        .build();
    let Ok(uri) = uri else {
        return (StatusCode::BAD_REQUEST, "unusable request target\n").into_response();
    };

    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    let upstream_host = HeaderValue::from_str(proxy.upstream.authority.as_str());
    if let Ok(host) = upstream_host {
        headers.insert(header::HOST, host);
    }
    // One family only (`X-Forwarded-*`), so that an app trusting this proxy
    // with `ForwardingHeader::XForwardedFor` reads everything it says.
    let client_ip = client.ip();
    if let Some(host) = original_host {
        headers.insert("x-forwarded-host", host);
    }
    for (name, value) in [
        ("x-forwarded-for", client_ip.to_string()),
        ("x-forwarded-proto", "http".to_owned()),
    ] {
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(name, value);
        }
    }
    add_via(headers, parts.version);
    parts.uri = uri;
    // The client speaks HTTP/1.1 to the upstream whatever the client spoke.
    parts.version = Version::HTTP_11;
    let upstream_request = axum::http::Request::from_parts(parts, body);

    match tokio::time::timeout(proxy.timeout, proxy.client.request(upstream_request)).await {
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            add_via(&mut parts.headers, parts.version);
            // An intermediary answers in its own HTTP version, not the
            // upstream's (RFC 9110 §2.5): an HTTP/1.0 upstream's answer
            // would otherwise reach an HTTP/1.1 client as HTTP/1.0.
            parts.version = Version::HTTP_11;
            Response::from_parts(parts, Body::new(body))
        }
        Ok(Err(error)) => {
            let cause = root_cause(&error);
            tracing::warn!(upstream = %proxy.upstream, %cause, "upstream request failed");
            let what = if error.is_connect() {
                "cannot connect to"
            } else {
                "lost the connection to"
            };
            gateway_error(
                StatusCode::BAD_GATEWAY,
                format!("502 Bad Gateway: {what} the upstream ({cause})\n"),
            )
        }
        Err(_) => {
            tracing::warn!(upstream = %proxy.upstream, timeout = ?proxy.timeout, "upstream did not answer in time");
            gateway_error(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "504 Gateway Timeout: the upstream did not answer within {:?}\n",
                    proxy.timeout
                ),
            )
        }
    }
}

fn gateway_error(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        body,
    )
        .into_response()
}

/// The innermost error's text ("Connection refused (os error 111)").
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Option<Args>, String> {
        parse_args(list.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn parses_the_documented_command_lines() {
        let parsed = args(&[
            "--upstream",
            "http://127.0.0.1:8080",
            "--listen",
            "127.0.0.1:3001",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(parsed.upstream.to_string(), "http://127.0.0.1:8080");
        assert_eq!(parsed.listen, "127.0.0.1:3001".parse().unwrap());
        assert_eq!(parsed.rate_limit, None);
        assert_eq!(parsed.stale_if_error, Duration::from_secs(300));
        assert_eq!(parsed.heuristic, None);
        assert!(!parsed.store_set_cookie);
        assert!(!parsed.store_post);
        assert!(!parsed.forward_ranges);
        let parsed = args(&[
            "--upstream=http://origin/base/",
            "--rate-limit=20/30s",
            "--timeout",
            "2.5",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(parsed.upstream.base_path, "/base");
        assert_eq!(parsed.rate_limit, Some((20, Duration::from_secs(30))));
        assert_eq!(parsed.timeout, Duration::from_millis(2500));
        assert_eq!(args(&["--help"]), Ok(None));
        let parsed = args(&[
            "--upstream",
            "http://origin",
            "--heuristic",
            "--store-set-cookie",
            "--store-post",
            "--forward-ranges",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(parsed.heuristic, Some(Duration::from_secs(86_400)));
        assert!(parsed.store_set_cookie);
        assert!(parsed.store_post);
        assert!(parsed.forward_ranges);
        let parsed = args(&[
            "--upstream",
            "http://origin",
            "--heuristic",
            "--heuristic-cap=600",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(parsed.heuristic, Some(Duration::from_secs(600)));
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        for bad in [
            &[][..],
            &["--upstream"],
            &["--upstream", "ftp://x"],
            &["--upstream", "https://x"],
            &["--upstream", "http://x", "--rate-limit", "0/s"],
            &["--upstream", "http://x", "--rate-limit", "10/fortnight"],
            &["--upstream", "http://x", "--timeout", "-1"],
            &["--upstream", "http://x", "--stale-if-error", "soon"],
            &["--upstream", "http://x", "--listen", "nowhere"],
            &["--upstream", "http://x", "--bogus"],
            &["--upstream", "http://x", "--heuristic-cap", "600"],
            &[
                "--upstream",
                "http://x",
                "--heuristic",
                "--heuristic-cap",
                "0",
            ],
            &["--upstream", "http://x", "--heuristic=yes"],
            &["--upstream", "http://x", "--store-set-cookie=1"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100/min"), Ok((100, Duration::from_secs(60))));
        assert_eq!(parse_rate("10/s"), Ok((10, Duration::from_secs(1))));
        assert_eq!(parse_rate("500/1h"), Ok((500, Duration::from_secs(3600))));
        assert_eq!(parse_rate("5/2m"), Ok((5, Duration::from_secs(120))));
    }

    #[test]
    fn strips_connection_and_the_fields_it_names() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("close, X-Secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic eDp5"),
        );
        headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn via_appends() {
        let mut headers = HeaderMap::new();
        add_via(&mut headers, Version::HTTP_11);
        add_via(&mut headers, Version::HTTP_10);
        assert_eq!(
            headers[header::VIA],
            "1.1 tower-redis-proxy, 1.0 tower-redis-proxy"
        );
    }
}

/// What happens to interim (1xx) responses, end to end through the
/// proxy's upstream client: hyper's HTTP/1 client reads a `103 Early
/// Hints` and drops it, so `forward` (and the cache in front of it) sees
/// only the final response, with none of the interim fields.
#[cfg(test)]
mod interim_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const WITHIN: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn an_upstream_interim_response_is_dropped_and_the_final_one_forwarded() {
        let response = through_the_proxy(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
              HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 5\r\n\r\nfinal",
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get(header::LINK).is_none());
        assert_eq!(
            response.headers().get(header::CACHE_CONTROL).unwrap(),
            "max-age=60"
        );
        let body = tokio::time::timeout(WITHIN, axum::body::to_bytes(response.into_body(), 1024))
            .await
            .expect("no body within 10 s")
            .unwrap();
        assert_eq!(&body[..], b"final");
    }

    /// An HTTP/1.0 upstream's answer goes to the client in the proxy's
    /// own version, HTTP/1.1; `Via` records what the upstream spoke.
    #[tokio::test]
    async fn an_http_1_0_upstream_is_answered_in_http_1_1() {
        let response = through_the_proxy(
            b"HTTP/1.0 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 5\r\n\r\nfinal",
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), Version::HTTP_11);
        assert_eq!(response.headers()[header::VIA], "1.0 tower-redis-proxy");
    }

    /// `GET /page` forwarded to an upstream that answers `answer` on its
    /// first connection.
    async fn through_the_proxy(answer: &'static [u8]) -> Response {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = listener.local_addr().unwrap();
        let upstream = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut chunk = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the request head ended early");
                head.extend_from_slice(&chunk[..n]);
            }
            socket.write_all(answer).await.unwrap();
            // Held open until the client has read the answer.
            let _ = socket.read(&mut chunk).await;
        });
        let proxy = Proxy {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            upstream: parse_upstream(&format!("http://{upstream_addr}")).unwrap(),
            timeout: WITHIN,
        };
        let request = Request::builder()
            .uri("/page")
            .header(header::HOST, "shop.example")
            .body(Body::empty())
            .unwrap();
        let client = SocketAddr::from(([127, 0, 0, 1], 40_000));
        let response =
            tokio::time::timeout(WITHIN, forward(State(proxy), ConnectInfo(client), request))
                .await
                .expect("no answer within 10 s");
        // The upstream task ends when the client's connection closes.
        drop(upstream);
        response
    }
}
