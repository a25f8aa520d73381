//! Property tests for the parsers that read untrusted bytes: request and
//! response `Cache-Control` (and targeted fields), `Vary`, `Age` / `Date`,
//! and the stored-entry decoder (whose input comes from Redis); and for the
//! agreement of a URL's purge indexes with the purge of that URL.
//!
//! Properties: nothing panics on arbitrary bytes; what has an encoder
//! round-trips; outputs stay within their documented bounds.
//!
//! `PROPTEST_CASES` sets the number of cases per property (proptest reads
//! it itself; default 256, which
//! keeps CI short); run longer with e.g.
//! `PROPTEST_CASES=100000 cargo test -p tower-redis-cache --lib proptests`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{AGE, CACHE_CONTROL, DATE, EXPIRES, VARY};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;

use crate::directives::{self, MAX_DELTA, ResponseDirectives};
use crate::entry::Entry;
use crate::freshness::{self, Rules};
use crate::key;
use crate::route::Route;

/// Bytes a header value may hold (`HeaderValue::from_bytes` accepts them):
/// visible ASCII, space, tab and obs-text, with a bias towards the
/// characters the parsers split on.
fn value_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => prop::sample::select(b",=\"\\ ;*-0123456789".to_vec()),
        4 => 0x20u8..0x7f,
        1 => Just(b'\t'),
        1 => 0x80u8..=0xff,
    ];
    prop::collection::vec(byte, 0..120)
}

/// Directive-shaped text: known names with odd values, mixed with junk.
fn directive_text() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec![
        "max-age",
        "s-maxage",
        "no-store",
        "no-cache",
        "private",
        "public",
        "must-revalidate",
        "proxy-revalidate",
        "stale-while-revalidate",
        "stale-if-error",
        "max-stale",
        "min-fresh",
        "only-if-cached",
        "MAX-AGE",
        "x-unknown",
    ]);
    let value = prop_oneof![
        Just(String::new()),
        any::<u64>().prop_map(|n| format!("={n}")),
        "[0-9]{1,30}".prop_map(|n| format!("={n}")),
        "-?[0-9a-z\"\\\\,]{0,12}".prop_map(|v| format!("={v}")),
        "[0-9]{1,12}".prop_map(|n| format!("=\"{n}\"")),
    ];
    prop::collection::vec((name, value), 0..8).prop_map(|items| {
        items
            .into_iter()
            .map(|(n, v)| format!("{n}{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

fn header_map(name: &HeaderName, lines: &[Vec<u8>]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in lines {
        if let Ok(value) = HeaderValue::from_bytes(line) {
            map.append(name.clone(), value);
        }
    }
    map
}

fn bounded(d: &ResponseDirectives) -> bool {
    [
        d.max_age,
        d.s_maxage,
        d.stale_while_revalidate,
        d.stale_if_error,
    ]
    .iter()
    .all(|v| v.is_none_or(|v| v <= MAX_DELTA))
}

/// Renders directives the way an origin would send them.
fn render(d: &ResponseDirectives) -> String {
    let mut parts = Vec::new();
    let flags = [
        (d.no_store, "no-store"),
        (d.no_cache, "no-cache"),
        (d.private, "private"),
        (d.public, "public"),
        (d.must_revalidate, "must-revalidate"),
        (d.proxy_revalidate, "proxy-revalidate"),
    ];
    for (set, name) in flags {
        if set {
            parts.push(name.to_owned());
        }
    }
    let values = [
        (d.max_age, "max-age"),
        (d.s_maxage, "s-maxage"),
        (d.stale_while_revalidate, "stale-while-revalidate"),
        (d.stale_if_error, "stale-if-error"),
    ];
    for (value, name) in values {
        if let Some(value) = value {
            parts.push(format!("{name}={value}"));
        }
    }
    parts.join(", ")
}

fn response_directives() -> impl Strategy<Value = ResponseDirectives> {
    let delta = prop::option::of(0..=MAX_DELTA);
    (
        any::<[bool; 6]>(),
        delta.clone(),
        delta.clone(),
        delta.clone(),
        delta,
    )
        .prop_map(|(flags, max_age, s_maxage, swr, sie)| ResponseDirectives {
            no_store: flags[0],
            no_cache: flags[1],
            private: flags[2],
            public: flags[3],
            must_revalidate: flags[4],
            proxy_revalidate: flags[5],
            max_age,
            s_maxage,
            stale_while_revalidate: swr,
            stale_if_error: sie,
            // An unqualified directive is recorded as covering everything.
            no_cache_fields: unqualified(flags[1]),
            private_fields: unqualified(flags[2]),
            ..Default::default()
        })
}

fn unqualified(set: bool) -> Vec<String> {
    if set {
        vec![directives::UNQUALIFIED.to_owned()]
    } else {
        Vec::new()
    }
}

fn header_name() -> impl Strategy<Value = HeaderName> {
    prop_oneof![
        prop::sample::select(vec![
            "content-type",
            "etag",
            "cache-control",
            "vary",
            "x-multi",
            "set-cookie",
        ])
        .prop_map(HeaderName::from_static),
        "[a-z][a-z0-9-]{0,20}".prop_map(|n| HeaderName::try_from(n).expect("token")),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    let header = (
        header_name(),
        value_bytes().prop_filter_map("valid value", |v| HeaderValue::from_bytes(&v).ok()),
    );
    (
        100u16..1000,
        prop::collection::vec(header, 0..8),
        prop::collection::vec(any::<u8>(), 0..256),
        any::<u64>(),
        0..=MAX_DELTA,
        0..=MAX_DELTA,
    )
        .prop_map(|(status, headers, body, response_time_ms, age, lifetime)| {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.append(name, value);
            }
            Entry {
                status: StatusCode::from_u16(status).expect("100..1000"),
                headers: map,
                body: Bytes::from(body),
                response_time_ms,
                initial_age: age,
                lifetime,
            }
        })
}

/// A request target as clients write them: path segments (percent-escapes,
/// dots, empty segments) and a query that may hold `/`, `?`, `=`, `&`, `;`.
fn request_target() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        4 => "[a-z0-9._~-]{1,6}",
        1 => Just(String::new()),
        1 => Just("%2F".to_owned()),
        1 => Just("..".to_owned()),
    ];
    let query = "([a-z0-9/?:@._~!$'()*+,;=&-]|%2F|%3F|%26){0,24}";
    (
        prop::collection::vec(segment, 0..7),
        prop::option::of(query),
    )
        .prop_map(|(segments, query)| {
            let mut target = format!("/{}", segments.join("/"));
            if let Some(query) = query {
                target.push('?');
                target.push_str(&query);
            }
            target
        })
}

fn rules(heuristic: bool) -> Rules {
    Rules {
        targeted_fields: vec![HeaderName::from_static("acme-cache-control")],
        heuristic: heuristic.then_some(std::time::Duration::from_secs(86_400)),
        store_set_cookie: false,
    }
}

proptest! {
    #[test]
    fn cache_control_parsers_never_panic_and_stay_bounded(
        lines in prop::collection::vec(value_bytes(), 0..4),
    ) {
        let map = header_map(&CACHE_CONTROL, &lines);
        if let Some(d) = directives::response(&map, &CACHE_CONTROL) {
            prop_assert!(bounded(&d), "{d:?}");
        }
        let r = directives::request(&map);
        prop_assert!(r.max_age.is_none_or(|v| v <= MAX_DELTA));
        prop_assert!(r.min_fresh.is_none_or(|v| v <= MAX_DELTA));
        prop_assert!(r.max_stale.flatten().is_none_or(|v| v <= MAX_DELTA));
    }

    #[test]
    fn directive_shaped_input_never_panics_and_stays_bounded(
        lines in prop::collection::vec(directive_text(), 1..4),
    ) {
        let lines: Vec<Vec<u8>> = lines.into_iter().map(String::into_bytes).collect();
        let map = header_map(&CACHE_CONTROL, &lines);
        let d = directives::response(&map, &CACHE_CONTROL).expect("field present");
        prop_assert!(bounded(&d), "{d:?}");
        let _ = directives::request(&map);
    }

    #[test]
    fn response_directives_round_trip(d in response_directives()) {
        let text = render(&d);
        let mut map = HeaderMap::new();
        map.insert(CACHE_CONTROL, HeaderValue::from_str(&text).expect("ascii"));
        prop_assert_eq!(directives::response(&map, &CACHE_CONTROL), Some(d));
    }

    #[test]
    fn conflicting_freshness_is_stale(a in 0..=MAX_DELTA, b in 0..=MAX_DELTA) {
        prop_assume!(a != b);
        let mut map = HeaderMap::new();
        map.append(CACHE_CONTROL, HeaderValue::from_str(&format!("max-age={a}")).expect("ascii"));
        map.append(CACHE_CONTROL, HeaderValue::from_str(&format!("max-age={b}")).expect("ascii"));
        let d = directives::response(&map, &CACHE_CONTROL).expect("present");
        prop_assert_eq!(d.max_age, Some(0));
    }

    #[test]
    fn vary_names_are_normalised_and_idempotent(
        lines in prop::collection::vec(value_bytes(), 0..4),
    ) {
        let map = header_map(&VARY, &lines);
        if let Some(names) = key::vary_names(&map) {
            let list: Vec<&str> = names.split(',').filter(|n| !n.is_empty()).collect();
            let mut sorted = list.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(&list, &sorted, "sorted and without duplicates");
            prop_assert!(names.chars().all(|c| !c.is_ascii_uppercase()));
            prop_assert!(!list.contains(&"*"));
            // Normalising twice changes nothing, so a stored `Vary` and the
            // one a later lookup recomputes always agree.
            if let Ok(value) = HeaderValue::from_str(&names) {
                let mut again = HeaderMap::new();
                again.insert(VARY, value);
                prop_assert_eq!(key::vary_names(&again), Some(names.clone()));
            }
            // A variant is a fixed-size digest, whatever the input.
            let v = key::variant(&names, &map, "");
            prop_assert_eq!(v.len(), 2 + 40);
        }
    }

    #[test]
    fn age_and_date_never_panic_and_stay_bounded(
        age in value_bytes(),
        date in value_bytes(),
        delay_ms in 0u64..10_000_000,
    ) {
        let mut map = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&age) {
            map.insert(AGE, v);
        }
        if let Ok(v) = HeaderValue::from_bytes(&date) {
            map.insert(DATE, v);
        }
        let response_time = SystemTime::now();
        let request_time = response_time - Duration::from_millis(delay_ms);
        let initial = freshness::initial_age(&map, request_time, response_time);
        let since_epoch = response_time.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
        prop_assert!(initial <= MAX_DELTA.max(since_epoch) + delay_ms / 1000 + 1, "{initial}");
    }

    #[test]
    fn numeric_age_header_is_read_and_capped(age in any::<u64>()) {
        let mut map = HeaderMap::new();
        map.insert(AGE, HeaderValue::from(age));
        let now = SystemTime::now();
        prop_assert_eq!(freshness::initial_age(&map, now, now), age.min(MAX_DELTA));
    }

    #[test]
    fn storability_never_panics_and_lifetime_is_bounded(
        cache_control in value_bytes(),
        targeted in value_bytes(),
        expires in value_bytes(),
        vary in value_bytes(),
        request_cc in value_bytes(),
        status in 100u16..1000,
        heuristic in any::<bool>(),
        ttl in prop::option::of(0u64..10_000_000_000),
    ) {
        let mut request = http::Request::get("/x").body(()).expect("request").into_parts().0;
        if let Ok(v) = HeaderValue::from_bytes(&request_cc) {
            request.headers.insert(CACHE_CONTROL, v);
        }
        let mut response = http::Response::new(()).into_parts().0;
        response.status = StatusCode::from_u16(status).expect("100..1000");
        for (name, bytes) in [
            (CACHE_CONTROL, &cache_control),
            (HeaderName::from_static("acme-cache-control"), &targeted),
            (EXPIRES, &expires),
            (VARY, &vary),
        ] {
            if let Ok(v) = HeaderValue::from_bytes(bytes) {
                response.headers.insert(name, v);
            }
        }
        let mut route = Route::new("*");
        if let Some(ttl) = ttl {
            route = route.default_ttl(Duration::from_secs(ttl));
        }
        let request_directives = directives::request(&request.headers);
        let result = freshness::storable(
            &request,
            &request_directives,
            &response,
            &rules(heuristic),
            &route,
            SystemTime::now(),
        );
        if let Ok(storable) = result {
            prop_assert!(storable.lifetime <= MAX_DELTA);
            prop_assert!(!storable.directives.no_store && !storable.directives.private);
            let _ = freshness::retention(storable.lifetime, Duration::from_secs(60));
        }
    }

    #[test]
    fn entry_round_trips(e in entry()) {
        let bytes = e.encode();
        prop_assert_eq!(Entry::decode(&bytes), Ok(e));
    }

    #[test]
    fn entry_decoder_never_panics_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        // Mostly garbage is rejected at the magic; make half of the cases
        // start like a real entry so that the deeper fields are exercised.
        let _ = Entry::decode(&bytes);
        let mut framed = b"TRC\x01".to_vec();
        framed.extend_from_slice(&bytes);
        if let Ok(decoded) = Entry::decode(&framed) {
            // What decodes re-encodes to something that decodes the same.
            prop_assert_eq!(Entry::decode(&decoded.encode()), Ok(decoded));
        }
    }

    #[test]
    fn corrupted_entries_are_errors_or_entries_never_panics(
        e in entry(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = e.encode();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let _ = Entry::decode(&bytes);
        let _ = Entry::decode(&bytes[..cut.index(bytes.len() + 1)]);
    }

    #[test]
    fn usability_never_panics(
        age in any::<u64>(),
        lifetime in any::<u64>(),
        max_age in prop::option::of(any::<u64>()),
        min_fresh in prop::option::of(any::<u64>()),
        max_stale in prop::option::of(prop::option::of(any::<u64>())),
        stored in response_directives(),
    ) {
        let request = directives::RequestDirectives {
            max_age,
            min_fresh,
            max_stale,
            ..Default::default()
        };
        let _ = freshness::usability(age, lifetime, &stored, &request);
    }

    /// Issue 15, item 5: a purge of a URL's path (and query) reads an index
    /// its entry was recorded in, and selects it there.
    #[test]
    fn a_path_purge_reads_an_index_the_url_is_recorded_in(
        target in request_target(),
        depth in 0usize..6,
        keep_order in any::<bool>(),
    ) {
        let mut route = Route::new("*").ignore_query_params(["utm_*"]);
        if keep_order {
            route = route.keep_query_order();
        }
        let Ok(uri) = target.parse::<http::Uri>() else {
            return Ok(());
        };
        let stored = http::Request::get(uri.clone())
            .header(http::header::HOST, "shop.example")
            .body(())
            .map(|r| r.into_parts().0);
        let purge = http::Request::get(uri).body(()).map(|r| r.into_parts().0);
        let (Ok(stored), Ok(purge)) = (stored, purge) else {
            return Ok(());
        };
        let Some(url) = key::url_of(&stored, &[], &route) else {
            return Ok(());
        };
        let path = key::path_target(&purge, &route);
        prop_assert_eq!(Some(key::path_of(&url)), path.as_deref(), "{}", target);
        let path = path.unwrap_or_default();
        let index = key::directory_for_prefix(&path, depth);
        prop_assert!(
            key::directories(&url, depth).contains(&index),
            "{} is recorded under {:?}, its purge reads {:?}",
            url,
            key::directories(&url, depth),
            index
        );
    }
}
