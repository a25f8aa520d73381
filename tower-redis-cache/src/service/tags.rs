//! An entry's tags, for purges by tag: read from the response's tag
//! headers and the route, kept with the entry in an internal header
//! ([`STORED_TAGS`], never served). Pure: no store, no clock.

use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::route::Route;

/// The internal header that keeps an entry's tags with it (never served).
pub(crate) static STORED_TAGS: HeaderName = HeaderName::from_static("tower-redis-tags");

/// Where a response's tags come from besides its route.
pub(crate) struct TagHeaders<'a> {
    pub(crate) names: &'a [HeaderName],
    /// Remove them from the response.
    pub(crate) strip: bool,
}

/// Tags of a response: its tag headers (removed when so configured), the
/// route's static tags and the route's tag function; sorted, deduplicated,
/// without empty or over-long (> 1024 bytes) tags.
pub(crate) fn take_tags(
    from: &TagHeaders<'_>,
    route: &Route,
    request: &Parts,
    response: &mut http::response::Parts,
) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    for name in from.names {
        for value in response.headers.get_all(name) {
            let text = String::from_utf8_lossy(value.as_bytes());
            tags.extend(
                text.split(|c: char| c == ',' || c.is_ascii_whitespace())
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned),
            );
        }
        if from.strip {
            response.headers.remove(name);
        }
    }
    tags.extend(route.tags.iter().cloned());
    if let Some(tags_fn) = &route.tags_fn {
        tags.extend(tags_fn(request, response));
    }
    tags.retain(|t| !t.is_empty() && t.len() <= 1024);
    tags.sort_unstable();
    tags.dedup();
    tags
}

/// The tags kept with an entry.
pub(crate) fn stored_tags(headers: &HeaderMap) -> Vec<String> {
    headers
        .get(&STORED_TAGS)
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(' ')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Keeps `tags` with an entry (none: no header).
pub(crate) fn set_stored_tags(headers: &mut HeaderMap, tags: &[String]) {
    headers.remove(&STORED_TAGS);
    if tags.is_empty() {
        return;
    }
    if let Ok(value) = HeaderValue::from_str(&tags.join(" ")) {
        headers.insert(STORED_TAGS.clone(), value);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn heads(tag_header: &str) -> (Parts, http::response::Parts) {
        let request = http::Request::get("/p/1").body(()).unwrap().into_parts().0;
        let response = http::Response::builder()
            .header("surrogate-key", tag_header)
            .header("content-type", "text/plain")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        (request, response)
    }

    #[test]
    fn tags_come_from_headers_and_route_sorted_deduplicated_and_bounded() {
        let names = [HeaderName::from_static("surrogate-key")];
        let long = "x".repeat(1025);
        let (request, mut response) = heads(&format!("b, a  b,{long}"));
        let route = Route::new("/p/*").tag("route").tag("a");
        let from = TagHeaders {
            names: &names,
            strip: false,
        };
        let tags = take_tags(&from, &route, &request, &mut response);
        assert_eq!(tags, ["a", "b", "route"]);
        assert!(response.headers.contains_key("surrogate-key"));
    }

    #[test]
    fn tag_headers_are_stripped_when_configured() {
        let names = [HeaderName::from_static("surrogate-key")];
        let (request, mut response) = heads("a");
        let from = TagHeaders {
            names: &names,
            strip: true,
        };
        let tags = take_tags(&from, &Route::new("/*"), &request, &mut response);
        assert_eq!(tags, ["a"]);
        assert!(!response.headers.contains_key("surrogate-key"));
        assert!(response.headers.contains_key("content-type"));
    }

    #[test]
    fn stored_tags_round_trip_through_the_internal_header() {
        let mut headers = HeaderMap::new();
        let tags = vec!["a".to_owned(), "b".to_owned()];
        set_stored_tags(&mut headers, &tags);
        assert_eq!(stored_tags(&headers), tags);
        set_stored_tags(&mut headers, &[]);
        assert!(!headers.contains_key(&STORED_TAGS));
        assert!(stored_tags(&headers).is_empty());
    }
}
