//! RFC 9111 as a shared cache applies it: may this response be stored
//! (§3, §3.5), and for how long is it fresh (§4.2)?

use std::time::{Duration, SystemTime};

use http::request::Parts;
use http::response;
use http::{HeaderMap, HeaderName, Method, StatusCode, header};

use crate::directives::{self, RequestDirectives, ResponseDirectives};
use crate::route::Route;

/// The first fields a shared cache reads its directives from (RFC 9213);
/// `Cache-Control` applies only when none of them is present.
pub(crate) static CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// What the layer needs to decide storability, from its configuration.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub(crate) targeted_fields: Vec<HeaderName>,
    pub(crate) heuristic: bool,
    pub(crate) store_set_cookie: bool,
}

/// Why a response is not stored (for logs and `Cache-Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotStored {
    Method,
    Status,
    NoStore,
    Private,
    Authorization,
    SetCookie,
    VaryStar,
    NoFreshness,
}

/// A storable response: its directives and freshness lifetime (seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Storable {
    pub(crate) directives: ResponseDirectives,
    pub(crate) lifetime: u64,
}

/// The directives this cache obeys: the first targeted field present, else
/// `Cache-Control`.
pub(crate) fn directives_of(headers: &HeaderMap, rules: &Rules) -> ResponseDirectives {
    std::iter::once(&CDN_CACHE_CONTROL)
        .chain(rules.targeted_fields.iter())
        .find_map(|field| directives::response(headers, field))
        .or_else(|| directives::response(headers, &header::CACHE_CONTROL))
        .unwrap_or_default()
}

/// Status codes cacheable without explicit freshness (RFC 9110 §15.1).
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// May a shared cache store this response to this request?
pub(crate) fn storable(
    request: &Parts,
    request_directives: &RequestDirectives,
    response: &response::Parts,
    rules: &Rules,
    route: &Route,
    now: SystemTime,
) -> Result<Storable, NotStored> {
    if request.method != Method::GET || request_directives.no_store {
        return Err(NotStored::Method);
    }
    let status = response.status;
    // Final statuses we understand; partial content and 304 are not entries.
    if status.is_informational() || matches!(status.as_u16(), 206 | 304) {
        return Err(NotStored::Status);
    }
    let d = directives_of(&response.headers, rules);
    if d.no_store {
        return Err(NotStored::NoStore);
    }
    if d.private {
        return Err(NotStored::Private);
    }
    if request.headers.contains_key(header::AUTHORIZATION)
        && !(d.must_revalidate || d.public || d.s_maxage.is_some())
    {
        return Err(NotStored::Authorization);
    }
    if response.headers.contains_key(header::SET_COOKIE) && !rules.store_set_cookie {
        return Err(NotStored::SetCookie);
    }
    if crate::key::vary_names(&response.headers).is_none() {
        return Err(NotStored::VaryStar);
    }
    let explicit = explicit_lifetime(&response.headers, &d);
    let lifetime = match (route.override_origin, route.default_ttl, explicit) {
        (true, Some(ttl), _) => ttl.as_secs(),
        (_, _, Some(lifetime)) => lifetime,
        (_, Some(ttl), None) if heuristically_cacheable(status) || d.public => ttl.as_secs(),
        (_, None, None) if rules.heuristic && (heuristically_cacheable(status) || d.public) => {
            heuristic_lifetime(&response.headers, now).ok_or(NotStored::NoFreshness)?
        }
        _ => return Err(NotStored::NoFreshness),
    };
    Ok(Storable {
        directives: d,
        lifetime: route.clamp(lifetime).min(directives::MAX_DELTA),
    })
}

/// `s-maxage`, else `max-age`, else `Expires - Date` (RFC 9111 §4.2.1).
fn explicit_lifetime(headers: &HeaderMap, d: &ResponseDirectives) -> Option<u64> {
    if let Some(s_maxage) = d.s_maxage {
        return Some(s_maxage);
    }
    if let Some(max_age) = d.max_age {
        return Some(max_age);
    }
    let expires = headers.get(header::EXPIRES)?;
    // An invalid Expires (e.g. "0") means already expired.
    let Some(expires) = http_date(expires.as_bytes()) else {
        return Some(0);
    };
    let date = headers
        .get(header::DATE)
        .and_then(|d| http_date(d.as_bytes()))
        .unwrap_or_else(SystemTime::now);
    Some(expires.duration_since(date).map_or(0, |d| d.as_secs()))
}

/// 10% of the time since `Last-Modified`, at most a day (RFC 9111 §4.2.2).
fn heuristic_lifetime(headers: &HeaderMap, now: SystemTime) -> Option<u64> {
    let last_modified = http_date(headers.get(header::LAST_MODIFIED)?.as_bytes())?;
    let date = headers
        .get(header::DATE)
        .and_then(|d| http_date(d.as_bytes()))
        .unwrap_or(now);
    let age = date.duration_since(last_modified).ok()?;
    Some((age.as_secs() / 10).min(86_400))
}

pub(crate) fn http_date(bytes: &[u8]) -> Option<SystemTime> {
    httpdate::parse_http_date(std::str::from_utf8(bytes).ok()?.trim()).ok()
}

/// RFC 9111 §4.2.3 `corrected_initial_age` of a response received at
/// `response_time` for a request sent at `request_time`.
pub(crate) fn initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> u64 {
    let age_value = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(directives::MAX_DELTA);
    let apparent_age = headers
        .get(header::DATE)
        .and_then(|d| http_date(d.as_bytes()))
        .and_then(|date| response_time.duration_since(date).ok())
        .map_or(0, |d| d.as_secs());
    let response_delay = response_time
        .duration_since(request_time)
        .map_or(0, |d| d.as_secs());
    apparent_age.max(age_value + response_delay)
}

/// How a stored response may be used for a request (RFC 9111 §4.2, §5.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Usability {
    /// Fresh enough for the request: serve it.
    Fresh,
    /// Stale, but the request accepts this much staleness: serve it.
    StaleAccepted,
    /// Must be revalidated with the origin first.
    Revalidate,
}

pub(crate) fn usability(
    age: u64,
    lifetime: u64,
    stored: &ResponseDirectives,
    request: &RequestDirectives,
) -> Usability {
    if stored.no_cache || request.no_cache {
        return Usability::Revalidate;
    }
    if let Some(max_age) = request.max_age
        && age > max_age
    {
        return Usability::Revalidate;
    }
    // §5.2.1.3: fresh for at least `min-fresh` more seconds.
    let remaining = lifetime.saturating_sub(age);
    if age < lifetime && remaining >= request.min_fresh.unwrap_or(0) {
        return Usability::Fresh;
    }
    // must-revalidate / proxy-revalidate / s-maxage forbid serving stale (§5.2.2).
    let strict = stored.must_revalidate || stored.proxy_revalidate || stored.s_maxage.is_some();
    match request.max_stale {
        Some(limit) if !strict && limit.is_none_or(|max| age.saturating_sub(lifetime) <= max) => {
            Usability::StaleAccepted
        }
        _ => Usability::Revalidate,
    }
}

/// How long past its freshness an entry may be served stale (seconds):
/// while revalidating in the background, and when the origin fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StaleWindows {
    pub(crate) while_revalidate: u64,
    pub(crate) if_error: u64,
}

/// RFC 5861 windows: the response's own directives, else the route's
/// defaults; none when the response forbids serving stale
/// (`must-revalidate`, `proxy-revalidate`, `no-cache`).
pub(crate) fn stale_windows(stored: &ResponseDirectives, route: &Route) -> StaleWindows {
    if stored.must_revalidate || stored.proxy_revalidate || stored.no_cache {
        return StaleWindows::default();
    }
    StaleWindows {
        while_revalidate: stored
            .stale_while_revalidate
            .or(route.stale_while_revalidate.map(|d| d.as_secs()))
            .unwrap_or(0),
        if_error: stored
            .stale_if_error
            .or(route.stale_if_error.map(|d| d.as_secs()))
            .unwrap_or(0),
    }
}

/// Seconds a stale entry is kept for revalidation past its freshness.
pub(crate) fn retention(lifetime: u64, stale_keep: Duration) -> Duration {
    Duration::from_secs(lifetime.min(directives::MAX_DELTA)).saturating_add(stale_keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            targeted_fields: vec![],
            heuristic: false,
            store_set_cookie: false,
        }
    }

    fn request(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::get("/x");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> response::Parts {
        let mut b = http::Response::builder().status(status);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn check(
        req: &[(&str, &str)],
        status: u16,
        res: &[(&str, &str)],
        rules: &Rules,
        route: &Route,
    ) -> Result<u64, NotStored> {
        let req = request(req);
        let rd = directives::request(&req.headers);
        storable(
            &req,
            &rd,
            &response(status, res),
            rules,
            route,
            SystemTime::now(),
        )
        .map(|s| s.lifetime)
    }

    #[test]
    fn storability_rules() {
        let r = rules();
        let any = Route::new("*");
        assert_eq!(
            check(&[], 200, &[("cache-control", "max-age=60")], &r, &any),
            Ok(60)
        );
        assert_eq!(
            check(
                &[],
                200,
                &[("cache-control", "max-age=60, s-maxage=5")],
                &r,
                &any
            ),
            Ok(5)
        );
        assert_eq!(
            check(
                &[],
                200,
                &[("cache-control", "no-store, max-age=60")],
                &r,
                &any
            ),
            Err(NotStored::NoStore)
        );
        assert_eq!(
            check(
                &[],
                200,
                &[("cache-control", "private, max-age=60")],
                &r,
                &any
            ),
            Err(NotStored::Private)
        );
        assert_eq!(check(&[], 200, &[], &r, &any), Err(NotStored::NoFreshness));
        assert_eq!(
            check(
                &[],
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
                &r,
                &any
            ),
            Err(NotStored::SetCookie)
        );
        assert_eq!(
            check(
                &[],
                200,
                &[("cache-control", "max-age=60"), ("vary", "*")],
                &r,
                &any
            ),
            Err(NotStored::VaryStar)
        );
        assert_eq!(
            check(&[], 206, &[("cache-control", "max-age=60")], &r, &any),
            Err(NotStored::Status)
        );
        assert_eq!(
            check(&[], 500, &[("cache-control", "max-age=60")], &r, &any),
            Ok(60),
            "explicit freshness makes any understood status storable"
        );
        assert_eq!(
            check(
                &[],
                500,
                &[],
                &r,
                &Route::new("*").default_ttl(Duration::from_secs(9))
            ),
            Err(NotStored::NoFreshness),
            "500 is not heuristically cacheable"
        );
        assert_eq!(
            check(
                &[("cache-control", "no-store")],
                200,
                &[("cache-control", "max-age=60")],
                &r,
                &any
            ),
            Err(NotStored::Method)
        );
        // no-cache responses are stored (and revalidated on use).
        assert_eq!(
            check(
                &[],
                200,
                &[("cache-control", "no-cache, max-age=60")],
                &r,
                &any
            ),
            Ok(60)
        );
    }

    #[test]
    fn authorization_rule_of_section_3_5() {
        let r = rules();
        let any = Route::new("*");
        let auth = [("authorization", "Bearer x")];
        assert_eq!(
            check(&auth, 200, &[("cache-control", "max-age=60")], &r, &any),
            Err(NotStored::Authorization)
        );
        assert_eq!(
            check(
                &auth,
                200,
                &[("cache-control", "public, max-age=60")],
                &r,
                &any
            ),
            Ok(60)
        );
        assert_eq!(
            check(&auth, 200, &[("cache-control", "s-maxage=60")], &r, &any),
            Ok(60)
        );
        assert_eq!(
            check(
                &auth,
                200,
                &[("cache-control", "must-revalidate, max-age=60")],
                &r,
                &any
            ),
            Ok(60)
        );
    }

    #[test]
    fn expires_and_date_and_invalid_expires() {
        let r = rules();
        let any = Route::new("*");
        let res = [
            ("date", "Mon, 23 Nov 2026 10:00:00 GMT"),
            ("expires", "Mon, 23 Nov 2026 10:02:00 GMT"),
        ];
        assert_eq!(check(&[], 200, &res, &r, &any), Ok(120));
        assert_eq!(check(&[], 200, &[("expires", "0")], &r, &any), Ok(0));
        let both = [
            ("cache-control", "max-age=5"),
            ("expires", "Mon, 23 Nov 2099 10:02:00 GMT"),
        ];
        assert_eq!(
            check(&[], 200, &both, &r, &any),
            Ok(5),
            "max-age wins over Expires"
        );
    }

    #[test]
    fn targeted_fields_take_precedence() {
        let mut r = rules();
        r.targeted_fields
            .push(HeaderName::from_static("acme-cache-control"));
        let any = Route::new("*");
        let res = [
            ("cache-control", "private"),
            ("cdn-cache-control", "max-age=30"),
        ];
        assert_eq!(check(&[], 200, &res, &r, &any), Ok(30));
        let res = [
            ("cache-control", "max-age=600"),
            ("acme-cache-control", "no-store"),
        ];
        assert_eq!(check(&[], 200, &res, &r, &any), Err(NotStored::NoStore));
    }

    #[test]
    fn heuristic_only_when_configured() {
        let any = Route::new("*");
        let res = [
            ("date", "Mon, 23 Nov 2026 10:00:00 GMT"),
            ("last-modified", "Fri, 13 Nov 2026 10:00:00 GMT"),
        ];
        assert_eq!(
            check(&[], 200, &res, &rules(), &any),
            Err(NotStored::NoFreshness)
        );
        let mut r = rules();
        r.heuristic = true;
        assert_eq!(check(&[], 200, &res, &r, &any), Ok(86_400));
    }

    #[test]
    fn route_default_and_override_and_clamp() {
        let r = rules();
        let route = Route::new("*")
            .default_ttl(Duration::from_secs(30))
            .max_ttl(Duration::from_secs(100));
        assert_eq!(check(&[], 200, &[], &r, &route), Ok(30));
        assert_eq!(
            check(&[], 200, &[("cache-control", "max-age=600")], &r, &route),
            Ok(100)
        );
        let forced = Route::new("*")
            .default_ttl(Duration::from_secs(30))
            .override_origin();
        assert_eq!(
            check(&[], 200, &[("cache-control", "max-age=600")], &r, &forced),
            Ok(30)
        );
        assert_eq!(
            check(&[], 200, &[("cache-control", "no-store")], &r, &forced),
            Err(NotStored::NoStore)
        );
    }

    #[test]
    fn usability_follows_request_directives() {
        let stored = ResponseDirectives::default();
        let plain = RequestDirectives::default();
        assert_eq!(usability(10, 60, &stored, &plain), Usability::Fresh);
        assert_eq!(usability(60, 60, &stored, &plain), Usability::Revalidate);
        let max_age = RequestDirectives {
            max_age: Some(5),
            ..Default::default()
        };
        assert_eq!(usability(10, 60, &stored, &max_age), Usability::Revalidate);
        let exactly = RequestDirectives {
            min_fresh: Some(50),
            ..Default::default()
        };
        assert_eq!(usability(10, 60, &stored, &exactly), Usability::Fresh);
        let min_fresh = RequestDirectives {
            min_fresh: Some(55),
            ..Default::default()
        };
        assert_eq!(
            usability(10, 60, &stored, &min_fresh),
            Usability::Revalidate
        );
        let max_stale = RequestDirectives {
            max_stale: Some(Some(20)),
            ..Default::default()
        };
        assert_eq!(
            usability(70, 60, &stored, &max_stale),
            Usability::StaleAccepted
        );
        assert_eq!(
            usability(90, 60, &stored, &max_stale),
            Usability::Revalidate
        );
        let strict = ResponseDirectives {
            must_revalidate: true,
            ..Default::default()
        };
        assert_eq!(
            usability(70, 60, &strict, &max_stale),
            Usability::Revalidate
        );
        let no_cache = ResponseDirectives {
            no_cache: true,
            ..Default::default()
        };
        assert_eq!(usability(0, 60, &no_cache, &plain), Usability::Revalidate);
        let req_no_cache = RequestDirectives {
            no_cache: true,
            ..Default::default()
        };
        assert_eq!(
            usability(0, 60, &stored, &req_no_cache),
            Usability::Revalidate
        );
    }

    #[test]
    fn initial_age_uses_age_header_and_delay() {
        let now = SystemTime::now();
        let mut headers = HeaderMap::new();
        headers.insert(header::AGE, "30".parse().unwrap());
        assert_eq!(initial_age(&headers, now - Duration::from_secs(2), now), 32);
        headers.insert(header::AGE, "junk".parse().unwrap());
        assert_eq!(initial_age(&headers, now, now), 0);
    }
}
