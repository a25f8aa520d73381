//! What a request may ask of the cache: whether it can be answered from
//! (and fill) an entry at all, which of its cache directives count, and
//! whether its own answer could ever be stored.

use http::request::Parts;
use http::{HeaderMap, HeaderName, Method, Request, Version, header};
use http_body::Body;
use tower_redis_core::forwarding::{
    ForwardingHeader, RequestView, X_FORWARDED_HOST, X_FORWARDED_PORT, X_FORWARDED_PROTO,
};

use crate::directives::{self, RequestDirectives};
use crate::layer::Config;

/// Whether the cache obeys the `Cache-Control` (and `Pragma: no-cache`) of
/// requests, set with
/// [`CacheLayerBuilder::request_cache_control`](crate::CacheLayerBuilder::request_cache_control).
///
/// Request directives are advisory for a cache (RFC 9111 §5.2.1). Obeyed,
/// they let any client make the cache go to the origin (`no-cache`,
/// `max-age=0`, `min-fresh`) or keep an answer out of it (`no-store`):
/// revalidations are coalesced like misses, so concurrent ones cost one
/// origin request, but a client that repeats them still sends one origin
/// request per revalidation. A cache in front of untrusted clients (a CDN
/// edge, the caching proxy example) ignores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RequestCacheControl {
    /// RFC 9111 as written: `no-cache`, `no-store`, `max-age`, `max-stale`,
    /// `min-fresh` and `only-if-cached` are obeyed (the default).
    #[default]
    Honor,
    /// Requests' `Cache-Control` and `Pragma` are ignored: every request is
    /// answered as if it had none.
    Ignore,
}

/// The conditional request fields a client's answer can depend on
/// (`If-Range` is handled with the range: `range.rs`).
const CONDITIONALS: [HeaderName; 4] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
];

/// Removes the client's conditionals (`If-None-Match`, `If-Modified-Since`,
/// `If-Match`, `If-Unmodified-Since`) from a request the cache sends on
/// its own behalf; the client's are answered from the result. Whether
/// there were any.
pub(crate) fn remove_conditionals(headers: &mut HeaderMap) -> bool {
    let mut removed = false;
    for name in &CONDITIONALS {
        removed |= headers.remove(name).is_some();
    }
    removed
}

/// Whether a request carries any of the conditionals
/// [`remove_conditionals`] removes.
pub(crate) fn carries_conditionals(headers: &HeaderMap) -> bool {
    CONDITIONALS.iter().any(|name| headers.contains_key(name))
}

/// The request directives the cache acts on.
pub(crate) fn directives(headers: &HeaderMap, policy: RequestCacheControl) -> RequestDirectives {
    match policy {
        RequestCacheControl::Honor => directives::request(headers),
        RequestCacheControl::Ignore => RequestDirectives::default(),
    }
}

/// Whether a request carries a body. A GET or HEAD with one (a "fat GET")
/// is keyed without it, so it is neither answered from the cache nor
/// stored: an origin that reads the body would otherwise have one client's
/// body decide everyone's answer.
///
/// HTTP/1 says so in its header: `Transfer-Encoding`, or a `Content-Length`
/// that is not 0 (an unreadable one counts as a body). HTTP/2 and HTTP/3
/// frame bodies without either, so there only a body known to be empty
/// (ended with the headers, or of exact length 0) counts as none.
pub(crate) fn carries_body<B: Body>(request: &Request<B>) -> bool {
    let headers = request.headers();
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    let declared = headers.get_all(header::CONTENT_LENGTH).iter().any(|value| {
        value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_none_or(|length| length > 0)
    });
    let body = request.body();
    let hint = body.size_hint();
    if declared || hint.lower() > 0 {
        return true;
    }
    matches!(request.version(), Version::HTTP_2 | Version::HTTP_3)
        && !body.is_end_stream()
        && hint.upper() != Some(0)
}

/// Whether the request itself keeps its answer out of the cache, whatever
/// the origin says: it is not a GET, it says `no-store`, or it carries a
/// header that can change the answer without being part of the key. Such a
/// request never leads a coalesced fill (the others would wait for an entry
/// that cannot come) and its refusal says nothing about the URL.
///
/// Conditionals (`If-None-Match` …) are not among these: a request that
/// leads a fill does not send them to the origin, which answers it in full,
/// and they are answered from that answer (`miss.rs`).
pub(crate) fn refuses_storage(
    config: &Config,
    request: &Parts,
    directives: &RequestDirectives,
) -> bool {
    request.method != Method::GET || directives.no_store || carries_unkeyed_header(config, request)
}

/// Whether the request may lead a coalesced fill or revalidation, which
/// the others then wait for: not when its own answer cannot be stored
/// ([`refuses_storage`]), nor with `Authorization` (RFC 9111 §3.5 stores
/// such an answer only when the origin marks it `public`, `s-maxage` or
/// `must-revalidate`, so on most URLs the others would wait for nothing).
/// It still follows a flight another request leads.
pub(crate) fn may_lead(config: &Config, request: &Parts, directives: &RequestDirectives) -> bool {
    !refuses_storage(config, request, directives)
        && !request.headers.contains_key(header::AUTHORIZATION)
}

/// Whether the request carries a header that can change the origin's answer
/// without being part of the key: its response must not be stored. The
/// forwarding headers a trusted proxy wrote (marked by [`ViaTrustedProxy`])
/// are part of the key instead.
pub(crate) fn carries_unkeyed_header(config: &Config, request: &Parts) -> bool {
    let keyed: &[HeaderName] = match request.extensions.get::<ViaTrustedProxy>() {
        Some(ViaTrustedProxy(ForwardingHeader::Forwarded)) => &[header::FORWARDED],
        Some(_) => &[X_FORWARDED_HOST, X_FORWARDED_PROTO, X_FORWARDED_PORT],
        None => &[],
    };
    let unkeyed = &config.unkeyed_headers;
    // `X_Forwarded_Host` is `X-Forwarded-Host` to origins that read fields
    // through CGI-style names (PHP's `$_SERVER`): such a spelling of any
    // listed field, keyed ones included (which spelling wins there is the
    // origin's guess), counts as the field.
    if spells_otherwise(&request.headers, |name| {
        unkeyed.iter().chain(keyed).any(|field| field == name)
    }) {
        return true;
    }
    // The cheaper way round. A request usually carries fewer field names
    // than the list holds: each is compared with the list (no hashing).
    // Otherwise each name of the list is looked up in the request's map.
    if request.headers.keys_len() <= unkeyed.len() {
        request
            .headers
            .keys()
            .any(|h| unkeyed.contains(h) && !keyed.contains(h))
    } else {
        unkeyed
            .iter()
            .any(|h| !keyed.contains(h) && request.headers.contains_key(h))
    }
}

/// Whether the request carries a field whose name, with `_` for `-`
/// (`x_tenant` for `x-tenant`), is one the answer `depends_on` (given in
/// lower case): origins that read fields through CGI-style names (PHP's
/// `$_SERVER['HTTP_X_TENANT']`) take it for that field. A request without
/// a `_` in its field names costs one scan of them.
pub(crate) fn spells_otherwise(headers: &HeaderMap, depends_on: impl Fn(&str) -> bool) -> bool {
    headers.keys().any(|field| {
        let field = field.as_str();
        field.contains('_') && depends_on(&field.replace('_', "-"))
    })
}

/// Marks a request's head as received from a trusted proxy that writes this
/// header family.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ViaTrustedProxy(pub(crate) ForwardingHeader);

/// What the trusted-proxy view adds to a request's key: the host to key by
/// (`None`: the request's own) and the scheme and port, as extra key
/// parts. `Err(())` when a trusted proxy sent a value that cannot be read,
/// so the request's origin is unknown and it must bypass the cache.
pub(crate) fn forwarded_origin(
    config: &Config,
    request: &Request<impl Sized>,
) -> Result<Option<(ForwardingHeader, RequestView)>, ()> {
    if config.forwarding.is_empty() {
        return Ok(None);
    }
    let view = config.forwarding.view(request);
    if view.malformed {
        return Err(());
    }
    Ok(view
        .via_trusted_proxy
        .then(|| (config.forwarding.header(), view)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{Empty, Full};

    fn get<B>(body: B, version: Version, headers: &[(&str, &str)]) -> Request<B> {
        let mut builder = Request::get("/").version(version);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(body).unwrap()
    }

    #[test]
    fn bodies_are_seen_in_headers_hints_and_http2_streams() {
        let h1 = Version::HTTP_11;
        let h2 = Version::HTTP_2;
        let none = Empty::<Bytes>::new;
        assert!(!carries_body(&get(none(), h1, &[])));
        assert!(!carries_body(&get(none(), h1, &[("content-length", "0")])));
        assert!(!carries_body(&get(none(), h2, &[])));
        assert!(carries_body(&get(none(), h1, &[("content-length", "3")])));
        assert!(carries_body(&get(none(), h1, &[("content-length", "x")])));
        assert!(carries_body(&get(
            none(),
            h1,
            &[("transfer-encoding", "chunked")]
        )));
        assert!(carries_body(&get(Full::new(Bytes::from("x")), h1, &[])));
        // An HTTP/2 stream that did not end with its headers.
        let open = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<http_body::Frame<Bytes>, std::convert::Infallible>,
        >());
        assert!(carries_body(&get(open, h2, &[])));
    }

    /// Whichever way round the fields are compared (the request's with the
    /// list, or the list's looked up in the request), the answer is the
    /// one every name of the list looked up gives: for requests with fewer
    /// and with more field names than the list, a trusted proxy's keyed
    /// fields, and a layer with a list of its own.
    #[test]
    fn an_unkeyed_header_is_found_whichever_way_round() {
        let looked_up = |config: &Config, parts: &Parts| {
            let keyed: &[HeaderName] = match parts.extensions.get::<ViaTrustedProxy>() {
                Some(ViaTrustedProxy(ForwardingHeader::Forwarded)) => &[header::FORWARDED],
                Some(_) => &[X_FORWARDED_HOST, X_FORWARDED_PROTO, X_FORWARDED_PORT],
                None => &[],
            };
            config
                .unkeyed_headers
                .iter()
                .any(|h| !keyed.contains(h) && parts.headers.contains_key(h))
        };
        let config = |names: Option<&[&str]>| {
            let mut builder =
                crate::CacheLayer::builder(tower_redis_core::RedisManager::disabled());
            if let Some(names) = names {
                builder = builder.unkeyed_headers(names.iter().copied());
            }
            std::sync::Arc::clone(&builder.build().expect("a valid layer").config)
        };
        let many: Vec<(String, &str)> = (0..40).map(|i| (format!("x-field-{i}"), "v")).collect();
        let parts = |extra: &[(&str, &str)], many_fields: bool, proxy: Option<ForwardingHeader>| {
            let mut fields: Vec<(&str, &str)> = vec![("cookie", "a"), ("accept", "*/*")];
            if many_fields {
                fields.extend(many.iter().map(|(n, v)| (n.as_str(), *v)));
            }
            fields.extend_from_slice(extra);
            let mut request = get((), Version::HTTP_11, &fields);
            if let Some(proxy) = proxy {
                request.extensions_mut().insert(ViaTrustedProxy(proxy));
            }
            request.into_parts().0
        };
        let x = Some(ForwardingHeader::XForwardedFor);
        let f = Some(ForwardingHeader::Forwarded);
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<ForwardingHeader>, bool);
        let cases: [Case<'_>; 8] = [
            (&[], None, false),
            (&[("x-forwarded-host", "h")], None, true),
            (&[("x-forwarded-host", "h")], x, false),
            (&[("x-forwarded-prefix", "/p")], x, true),
            (&[("forwarded", "host=h")], f, false),
            (&[("forwarded", "host=h")], x, true),
            (&[("x-forwarded-host", "h")], f, true),
            (&[("x-tenant", "t")], None, false),
        ];
        let default = config(None);
        let own = config(Some(&["x-tenant"]));
        // A list of its own longer than most requests' fields, and one of
        // exactly as many names as the requests without the many fields
        // carry (the boundary between the two ways round).
        let long_names: Vec<String> = (0..20).map(|i| format!("x-unkeyed-{i}")).collect();
        let mut long: Vec<&str> = long_names.iter().map(String::as_str).collect();
        long.push("x-tenant");
        let long = config(Some(&long));
        let exact = config(Some(&["x-tenant", "x-forwarded-host", "cookie"]));
        for many_fields in [false, true] {
            for (extra, proxy, expected) in cases {
                let parts = parts(extra, many_fields, proxy);
                assert_eq!(
                    carries_unkeyed_header(&default, &parts),
                    expected,
                    "{extra:?} {proxy:?}"
                );
                assert_eq!(
                    carries_unkeyed_header(&default, &parts),
                    looked_up(&default, &parts)
                );
                for config in [&own, &long, &exact] {
                    assert_eq!(
                        carries_unkeyed_header(config, &parts),
                        looked_up(config, &parts)
                    );
                }
            }
            let tenant = parts(&[("x-tenant", "t")], many_fields, None);
            assert!(carries_unkeyed_header(&own, &tenant));
            assert!(carries_unkeyed_header(&long, &tenant));
            assert!(carries_unkeyed_header(&exact, &tenant));
            let plain = parts(&[], many_fields, None);
            assert!(!carries_unkeyed_header(&long, &plain));
            // `cookie` is on the exact list, and every request carries it.
            assert!(carries_unkeyed_header(&exact, &plain));
        }
    }
}
