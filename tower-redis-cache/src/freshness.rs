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
    /// Heuristic freshness (RFC 9111 §4.2.2): `None` off, else its cap.
    pub(crate) heuristic: Option<Duration>,
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

/// The directives this cache obeys: the first valid targeted field present
/// (RFC 9213: a Structured Field dictionary; one that does not parse is
/// ignored entirely), else `Cache-Control`.
///
/// With [`Rules::store_set_cookie`], a `private` or `no-cache` qualified
/// with `Set-Cookie` alone (RFC 9111 §5.2.2.4, §5.2.2.7) means: store the
/// response without its `Set-Cookie`, and use it like any other.
///
/// The usual response (one `Cache-Control` field, no targeted field) is
/// answered from the thread's memo of the field values it parsed last:
/// each hit read from Redis decodes its stored fields again, and parsing
/// them was about a twentieth of such a hit's work.
pub(crate) fn directives_of(headers: &HeaderMap, rules: &Rules) -> ResponseDirectives {
    // Every rule, named: a rule added to `Rules` must be weighed here (does
    // it change what a remembered value means?) before this compiles.
    let Rules {
        targeted_fields,
        heuristic: _,
        store_set_cookie,
    } = rules;
    if targeted_fields.is_empty() && !headers.contains_key(&CDN_CACHE_CONTROL) {
        let mut lines = headers.get_all(header::CACHE_CONTROL).iter();
        if let (Some(line), None) = (lines.next(), lines.next()) {
            return remembered_directives(line.as_bytes(), *store_set_cookie, || {
                parse_directives(headers, rules)
            });
        }
    }
    parse_directives(headers, rules)
}

/// Cache-Control values each thread remembers with their directives.
const DIRECTIVE_SLOTS: usize = 8;
/// The longest Cache-Control value a thread remembers.
const DIRECTIVE_MAX_BYTES: usize = 256;

/// One remembered `Cache-Control` value (with the rule that changes what
/// it means) and its directives.
type DirectiveSlot = (Box<[u8]>, bool, ResponseDirectives);

thread_local! {
    static DIRECTIVES: std::cell::RefCell<crate::key::Ring<DirectiveSlot, DIRECTIVE_SLOTS>> =
        const { std::cell::RefCell::new(crate::key::Ring::new()) };
}

/// The directives `parse` gives for the single `Cache-Control` value
/// `line` under `store_set_cookie`: remembered when this thread parsed the
/// same bytes under the same rule, else parsed (and remembered when the
/// value is short). Parsing is a pure function of those two inputs when no
/// targeted field applies, which the caller checks.
fn remembered_directives(
    line: &[u8],
    store_set_cookie: bool,
    parse: impl FnOnce() -> ResponseDirectives,
) -> ResponseDirectives {
    let found = DIRECTIVES
        .try_with(|ring| {
            ring.borrow()
                .find(|(bytes, rule, _)| **bytes == *line && *rule == store_set_cookie)
                .map(|(_, _, directives)| directives.clone())
        })
        .ok()
        .flatten();
    if let Some(directives) = found {
        #[cfg(test)]
        DIRECTIVE_MEMO_HITS.with(|hits| hits.set(hits.get() + 1));
        return directives;
    }
    let directives = parse();
    if line.len() <= DIRECTIVE_MAX_BYTES {
        let _ = DIRECTIVES.try_with(|ring| {
            ring.borrow_mut()
                .keep((line.into(), store_set_cookie, directives.clone()));
        });
    }
    directives
}

#[cfg(test)]
thread_local! {
    /// Directives this thread took from its memo.
    static DIRECTIVE_MEMO_HITS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// [`directives_of`], parsed.
fn parse_directives(headers: &HeaderMap, rules: &Rules) -> ResponseDirectives {
    let mut d = std::iter::once(&CDN_CACHE_CONTROL)
        .chain(rules.targeted_fields.iter())
        .find_map(|field| directives::targeted(headers, field))
        .or_else(|| directives::response(headers, &header::CACHE_CONTROL))
        .unwrap_or_default();
    if rules.store_set_cookie {
        let only_set_cookie =
            |fields: &[String]| !fields.is_empty() && fields.iter().all(|f| f == "set-cookie");
        // Every `private` was qualified with Set-Cookie alone.
        if d.private && only_set_cookie(&d.private_fields) {
            d.private = false;
            d.drop_set_cookie = true;
        }
        if d.no_cache && only_set_cookie(&d.no_cache_fields) {
            d.no_cache = false;
            d.drop_set_cookie = true;
        }
    }
    d
}

/// Status codes cacheable without explicit freshness (RFC 9110 §15.1).
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Status codes whose semantics this cache implements, for
/// `must-understand` (RFC 9111 §5.2.2.3): the final statuses it stores and
/// serves as they are. 304 is never an entry; 206 is a partial one.
fn understood(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 302 | 307 | 308 | 404 | 405 | 410 | 414 | 501
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
    // Final statuses we understand; a 304 is not an entry, and a 206 only
    // when it can be a partial one (§3.3: one span of a known length, a
    // strong validator or none).
    if status.is_informational()
        || status == StatusCode::NOT_MODIFIED
        || (status == StatusCode::PARTIAL_CONTENT
            && !crate::service::storable_partial(&response.headers))
    {
        return Err(NotStored::Status);
    }
    let mut d = directives_of(&response.headers, rules);
    // §5.2.2.3: with must-understand, the status code decides, and a cache
    // that understands it ignores no-store.
    if d.must_understand {
        if !understood(status) {
            return Err(NotStored::Status);
        }
        d.no_store = false;
    } else if d.no_store {
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
    let set_cookie = response.headers.contains_key(header::SET_COOKIE);
    if set_cookie && !rules.store_set_cookie {
        return Err(NotStored::SetCookie);
    }
    if crate::key::vary_names(&response.headers).is_none() {
        return Err(NotStored::VaryStar);
    }
    let explicit = explicit_lifetime(&response.headers, &d);
    // A cookie is kept in the stored copy only when the origin said, with an
    // explicit lifetime and no revalidation, that the response is for
    // everyone: not on a heuristic or a route's default lifetime, nor on a
    // `no-cache` response, whose 304s (which carry no cookie) would hand
    // the stored client's cookie to the next one.
    if set_cookie
        && !d.drop_set_cookie
        && (explicit.is_none() || d.no_cache || route.override_origin)
    {
        return Err(NotStored::SetCookie);
    }
    let lifetime = lifetime(&response.headers, status, &d, explicit, rules, route, now)?;
    // §5.1: an Age that is not a delta-seconds makes the response stale.
    let lifetime = if age_value(&response.headers).is_err() {
        0
    } else {
        route.clamp(lifetime).min(directives::MAX_DELTA)
    };
    Ok(Storable {
        directives: d,
        lifetime,
    })
}

/// The lifetime a storable response gets: the route's override, the
/// response's explicit one, the route's default, a heuristic one, or 0 for a
/// `no-cache` response with a validator (validated on every use).
fn lifetime(
    headers: &HeaderMap,
    status: StatusCode,
    d: &ResponseDirectives,
    explicit: Option<u64>,
    rules: &Rules,
    route: &Route,
    now: SystemTime,
) -> Result<u64, NotStored> {
    let heuristic_ok = heuristically_cacheable(status) || d.public;
    Ok(match (route.override_origin, route.default_ttl, explicit) {
        (true, Some(ttl), _) => ttl.as_secs(),
        (_, _, Some(lifetime)) => lifetime,
        (_, Some(ttl), None) if heuristic_ok => ttl.as_secs(),
        (_, None, None) if heuristic_ok && rules.heuristic.is_some() => {
            let cap = rules.heuristic.map_or(0, |cap| cap.as_secs());
            match heuristic_lifetime(headers, now, cap) {
                Some(lifetime) => lifetime,
                None if d.no_cache && has_validator(headers) => 0,
                None => return Err(NotStored::NoFreshness),
            }
        }
        // §5.2.2.4: a no-cache response is stored and validated on every
        // use; worth it only with a validator to send.
        (_, None, None) if heuristic_ok && d.no_cache && has_validator(headers) => 0,
        _ => return Err(NotStored::NoFreshness),
    })
}

/// Whether a response can be validated (`ETag` or `Last-Modified`).
fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

/// Whether a response carries explicit freshness (`s-maxage`, `max-age` or
/// `Expires`, the targeted fields included), not only a heuristic one.
pub(crate) fn has_explicit_freshness(headers: &HeaderMap, rules: &Rules) -> bool {
    explicit_lifetime(headers, &directives_of(headers, rules)).is_some()
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

/// 10% of the time since `Last-Modified`, at most `cap` seconds (RFC 9111
/// §4.2.2).
fn heuristic_lifetime(headers: &HeaderMap, now: SystemTime, cap: u64) -> Option<u64> {
    let last_modified = http_date(headers.get(header::LAST_MODIFIED)?.as_bytes())?;
    let date = headers
        .get(header::DATE)
        .and_then(|d| http_date(d.as_bytes()))
        .unwrap_or(now);
    let age = date.duration_since(last_modified).ok()?;
    Some((age.as_secs() / 10).min(cap))
}

/// An HTTP date, read the way RFC 9110 §5.6.7 asks of recipients: the
/// IMF-fixdate, RFC 850 and asctime formats, with any case of weekday,
/// month and `GMT`.
pub(crate) fn http_date(bytes: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    // Dates are short; anything long is not one (and is not copied).
    if text.len() > 64 {
        return None;
    }
    if let Ok(date) = httpdate::parse_http_date(text) {
        return Some(date);
    }
    // Title-case every word ("mon" → "Mon", "NOV" → "Nov"), "GMT" upper.
    let mut canonical = String::with_capacity(text.len());
    let mut word_start = true;
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            canonical.push(if word_start {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            });
            word_start = false;
        } else {
            canonical.push(c);
            word_start = true;
        }
    }
    let canonical = canonical.replace("Gmt", "GMT");
    httpdate::parse_http_date(&canonical).ok()
}

/// RFC 9111 §5.1: the first member of `Age`, `Ok(None)` without one, and
/// `Err(())` when that member is not a delta-seconds (`Age: old, 0`,
/// `-5`, `1.5`).
pub(crate) fn age_value(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    let Some(line) = headers.get(header::AGE) else {
        return Ok(None);
    };
    let bytes = line.as_bytes();
    let first = bytes.split(|b| *b == b',').next().unwrap_or_default();
    let first = first.trim_ascii();
    if first.is_empty() || !first.iter().all(u8::is_ascii_digit) {
        return Err(());
    }
    // Past u64 is past MAX_DELTA too.
    let value = std::str::from_utf8(first)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(directives::MAX_DELTA);
    Ok(Some(value.min(directives::MAX_DELTA)))
}

/// RFC 9111 §4.2.3 `corrected_initial_age` of a response received at
/// `response_time` for a request sent at `request_time`.
pub(crate) fn initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> u64 {
    // An invalid Age counts as 0 here; `storable` makes such a response stale.
    let age_value = age_value(headers).ok().flatten().unwrap_or(0);
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
/// (`must-revalidate`, `proxy-revalidate`, `no-cache`). `s-maxage` implies
/// `proxy-revalidate` for a shared cache (RFC 9111 §5.2.2.10): the route's
/// defaults never apply to it, only the windows the response itself
/// states beside it (`s-maxage=1, stale-while-revalidate=59`: the origin
/// asked for both).
pub(crate) fn stale_windows(stored: &ResponseDirectives, route: &Route) -> StaleWindows {
    if stored.must_revalidate || stored.proxy_revalidate || stored.no_cache {
        return StaleWindows::default();
    }
    let defaults = stored.s_maxage.is_none();
    StaleWindows {
        while_revalidate: stored
            .stale_while_revalidate
            .or(route
                .stale_while_revalidate
                .filter(|_| defaults)
                .map(|d| d.as_secs()))
            .unwrap_or(0),
        if_error: stored
            .stale_if_error
            .or(route
                .stale_if_error
                .filter(|_| defaults)
                .map(|d| d.as_secs()))
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
            heuristic: None,
            store_set_cookie: false,
        }
    }

    /// Whatever the fields and the rules, the directives a thread
    /// remembers are those a parse gives; only a single `Cache-Control`
    /// field without a targeted field is remembered.
    #[test]
    fn remembered_directives_are_the_directives_parsed_anew() {
        let long = format!("max-age=60, {}", "x".repeat(DIRECTIVE_MAX_BYTES));
        let mut cases: Vec<Vec<(&str, String)>> = [
            "max-age=60",
            "max-age=61",
            "max-age=60 ",
            "MAX-AGE=60",
            "public, max-age=60",
            "private",
            "private=\"set-cookie\", max-age=60",
            "no-cache=\"set-cookie\", s-maxage=5",
            "no-store",
            "must-understand, no-store",
            "stale-while-revalidate=30, max-age=1",
            long.as_str(),
        ]
        .iter()
        .map(|value| vec![("cache-control", (*value).to_owned())])
        .collect();
        // Beside a field the memo never takes: several lines, a targeted
        // field (which wins), or no field.
        cases.push(vec![
            ("cache-control", "max-age=60".to_owned()),
            ("cache-control", "private".to_owned()),
        ]);
        cases.push(vec![
            ("cache-control", "max-age=60".to_owned()),
            ("cdn-cache-control", "no-store".to_owned()),
        ]);
        cases.push(vec![("expires", "0".to_owned())]);
        let targeted = Rules {
            targeted_fields: vec![HeaderName::from_static("edge-cache-control")],
            ..rules()
        };
        let set_cookie = Rules {
            store_set_cookie: true,
            ..rules()
        };
        let mut edge = HeaderMap::new();
        edge.insert("cache-control", "max-age=60".parse().unwrap());
        edge.insert("edge-cache-control", "max-age=5".parse().unwrap());
        for round in 0..3 {
            let hits = DIRECTIVE_MEMO_HITS.with(std::cell::Cell::get);
            for rules in [&rules(), &set_cookie, &targeted] {
                for fields in &cases {
                    let mut headers = HeaderMap::new();
                    for (name, value) in fields {
                        headers.append(*name, value.parse().unwrap());
                    }
                    assert_eq!(
                        directives_of(&headers, rules),
                        parse_directives(&headers, rules),
                        "{fields:?}, store_set_cookie {}, round {round}",
                        rules.store_set_cookie
                    );
                }
                assert_eq!(directives_of(&edge, rules), parse_directives(&edge, rules));
            }
            // More values than a thread remembers: each was parsed anew.
            // A few read again and again: from the memo, under either rule,
            // beside values one byte or one case apart.
            let hot = [
                "max-age=60",
                "max-age=61",
                "MAX-AGE=60",
                "private=\"set-cookie\", max-age=60",
            ];
            for _ in 0..3 {
                for rules in [&rules(), &set_cookie] {
                    for value in hot {
                        let mut headers = HeaderMap::new();
                        headers.insert("cache-control", value.parse().unwrap());
                        assert_eq!(
                            directives_of(&headers, rules),
                            parse_directives(&headers, rules),
                            "{value}, store_set_cookie {}, round {round}",
                            rules.store_set_cookie
                        );
                    }
                }
            }
            let used = DIRECTIVE_MEMO_HITS.with(std::cell::Cell::get) - hits;
            assert!(used >= 16, "the memo is used: {used}");
        }
        assert_eq!(
            directives_of(&edge, &targeted).max_age,
            Some(5),
            "a targeted field wins over a remembered Cache-Control"
        );
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
            check(
                &[],
                206,
                &[
                    ("cache-control", "max-age=60"),
                    ("content-range", "bytes 0-4/10")
                ],
                &r,
                &any
            ),
            Ok(60),
            "a partial response with one span is stored (RFC 9111 §3.3)"
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
        r.heuristic = Some(Duration::from_secs(86_400));
        assert_eq!(check(&[], 200, &res, &r, &any), Ok(86_400));
        r.heuristic = Some(Duration::from_secs(600));
        assert_eq!(
            check(&[], 200, &res, &r, &any),
            Ok(600),
            "the cap is configurable"
        );
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

    #[test]
    fn age_takes_the_first_member_and_rejects_the_rest() {
        let age = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AGE, v.parse().unwrap());
            age_value(&headers)
        };
        assert_eq!(age("30"), Ok(Some(30)));
        assert_eq!(age(" 7200 , 0"), Ok(Some(7200)));
        assert_eq!(
            age("99999999999999999999999"),
            Ok(Some(directives::MAX_DELTA))
        );
        for invalid in ["old, 0", "-5", "1.5", "", "30s", "0x10"] {
            assert_eq!(age(invalid), Err(()), "{invalid:?}");
        }
        assert_eq!(age_value(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn dates_are_read_leniently() {
        let exact = http_date(b"Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        for lenient in [
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "sun, 06 nov 1994 08:49:37 gmt",
            "SUN, 06 NOV 1994 08:49:37 GMT",
            "sun nov  6 08:49:37 1994",
        ] {
            assert_eq!(http_date(lenient.as_bytes()), Some(exact), "{lenient:?}");
        }
        for invalid in ["0", "-1", "tomorrow", "Sun, 06 Nov 1994 08:49:37 XYZ"] {
            assert_eq!(http_date(invalid.as_bytes()), None, "{invalid:?}");
        }
    }

    #[test]
    fn must_understand_and_no_cache_and_set_cookie_qualifiers() {
        let any = Route::new("*");
        let r = rules();
        let mu = [("cache-control", "no-store, must-understand, max-age=60")];
        assert_eq!(check(&[], 200, &mu, &r, &any), Ok(60));
        assert_eq!(check(&[], 299, &mu, &r, &any), Err(NotStored::Status));
        let no_cache = [("cache-control", "no-cache"), ("etag", "\"1\"")];
        assert_eq!(check(&[], 200, &no_cache, &r, &any), Ok(0));
        assert_eq!(
            check(&[], 200, &[("cache-control", "no-cache")], &r, &any),
            Err(NotStored::NoFreshness),
            "nothing to validate with"
        );
        let qualified = [
            ("cache-control", "max-age=60, private=\"set-cookie\""),
            ("set-cookie", "a=b"),
        ];
        assert_eq!(
            check(&[], 200, &qualified, &r, &any),
            Err(NotStored::Private)
        );
        let mut cookies = rules();
        cookies.store_set_cookie = true;
        assert_eq!(check(&[], 200, &qualified, &cookies, &any), Ok(60));
        let other = [("cache-control", "max-age=60, private=\"set-cookie, x\"")];
        assert_eq!(
            check(&[], 200, &other, &cookies, &any),
            Err(NotStored::Private)
        );
    }

    #[test]
    fn s_maxage_keeps_route_stale_windows_away() {
        let route = Route::new("*")
            .stale_while_revalidate(Duration::from_secs(30))
            .stale_if_error(Duration::from_secs(60));
        let plain = ResponseDirectives::default();
        assert_eq!(stale_windows(&plain, &route).while_revalidate, 30);
        let shared = ResponseDirectives {
            s_maxage: Some(5),
            ..Default::default()
        };
        assert_eq!(stale_windows(&shared, &route), StaleWindows::default());
        let own = ResponseDirectives {
            s_maxage: Some(5),
            stale_while_revalidate: Some(9),
            ..Default::default()
        };
        assert_eq!(stale_windows(&own, &route).while_revalidate, 9);
    }
}
