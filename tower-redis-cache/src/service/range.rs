//! Range requests (RFC 9110 §14), answered by the cache from a complete
//! `200` response or from a stored partial one.
//!
//! By default a `GET` the cache handles is forwarded without its `Range`
//! and `If-Range`: on a miss the origin sends the whole response, which is
//! stored as usual, and the range is cut from it on its way to the client.
//! With [`forward_ranges`](crate::CacheLayerBuilder::forward_ranges) the
//! range of a miss is forwarded as the client sent it instead. Hits are cut
//! from the stored body. Only the final answer is ranged:
//! - one `bytes` range (`a-b`, `a-`, `-n`) of a `200` whose length is
//!   known: `206` with `Content-Range`, or `416` with
//!   `Content-Range: bytes */len` when it does not overlap the
//!   representation (§14.1.1, §15.5.17);
//! - several ranges, another unit or a field that does not parse: the
//!   whole `200`, which §14.2 allows;
//! - `If-Range` (§13.1.5) that does not hold (a weak or different entity
//!   tag, a date that is not the exact, strong `Last-Modified`): the whole
//!   `200`;
//! - anything but a `200` (a `206` the origin sent, a `304` to a
//!   conditional request, an error, a body of unknown length): as it is.
//!
//! Partial responses (RFC 9111 §3.3, §3.4; `partial.rs`): a `206` with one
//! `Content-Range: bytes a-b/N` (a known length, not `multipart/byteranges`)
//! and a strong `ETag` or none is stored as a partial entry ([`Span`]):
//! its body is the bytes `a..=b`. A range inside the span is served from
//! it; one that reaches past it is completed with a range request for the
//! missing bytes, combined only under the same strong `ETag`; a request
//! without a range is never served from it.
//!
//! Costs: a range hit is the same single `HMGET` as a whole hit, and reads
//! the whole entry from Redis (the range is a zero-copy slice of it; a
//! partial entry holds only its span). A range request on a miss makes the
//! origin send its whole response (unless ranges are forwarded); when that
//! response is not stored (too large, `no-store`, ...) the cache stops
//! reading it once the range is sent, so the origin sends at most the
//! range's end plus what was in flight.

use std::pin::Pin;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;

use super::OriginBody;
use crate::body::CacheBody;
use crate::freshness;

/// One byte range, as the client wrote it (RFC 9110 §14.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ByteRange {
    /// `first-last`, both included.
    FromTo(u64, u64),
    /// `first-`: to the end.
    From(u64),
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

/// What a request asks of the answer's bytes: the one range it can be
/// served, and its `If-Range`.
#[derive(Debug)]
pub(crate) struct RangeRequest {
    pub(crate) range: ByteRange,
    pub(crate) if_range: Option<HeaderValue>,
    /// The `Range` field as the client sent it, to forward it.
    field: HeaderValue,
}

impl RangeRequest {
    /// Puts the client's `Range` and `If-Range` back on a request the
    /// cache forwards with its range.
    pub(crate) fn restore<B>(&self, request: &mut Request<B>) {
        let headers = request.headers_mut();
        headers.insert(header::RANGE, self.field.clone());
        if let Some(if_range) = &self.if_range {
            headers.insert(header::IF_RANGE, if_range.clone());
        }
    }

    /// Whether the client's `If-Range` (if any) lets the range be served
    /// from a response with these headers.
    pub(crate) fn if_range_allows(&self, headers: &HeaderMap) -> bool {
        self.if_range
            .as_ref()
            .is_none_or(|if_range| if_range_holds(if_range, headers))
    }
}

/// The bytes a `206` carries (RFC 9110 §14.4): `first..=last` of a
/// representation of `complete` bytes, `first <= last < complete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) first: u64,
    pub(crate) last: u64,
    pub(crate) complete: u64,
}

impl Span {
    pub(crate) fn len(self) -> u64 {
        self.last - self.first + 1
    }

    /// Whether `start..=end` lies inside the span.
    pub(crate) fn covers(self, start: u64, end: u64) -> bool {
        self.first <= start && end <= self.last
    }

    /// Whether the two spans overlap or touch, so that together they are
    /// one span.
    pub(crate) fn joins(self, other: Span) -> bool {
        other.first <= self.last.saturating_add(1) && self.first <= other.last.saturating_add(1)
    }

    /// Whether the span is the whole representation.
    pub(crate) fn is_whole(self) -> bool {
        self.first == 0 && self.last + 1 == self.complete
    }

    /// `bytes first-last/complete`.
    pub(crate) fn content_range(self) -> HeaderValue {
        header_value(&format!(
            "bytes {}-{}/{}",
            self.first, self.last, self.complete
        ))
    }
}

/// The one span a response's `Content-Range` names (`bytes a-b/N`, the
/// unit case-insensitively), or `None`: no field, several, an unknown
/// length (`/*`), an unsatisfied-range form (`*/N`), a last byte before the
/// first or past the end.
pub(crate) fn content_range(headers: &HeaderMap) -> Option<Span> {
    let value = only(headers, header::CONTENT_RANGE)?;
    let value = std::str::from_utf8(value.as_bytes()).ok()?.trim();
    let (unit, rest) = value.split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (range, complete) = rest.trim().split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let span = Span {
        first: number(first)?,
        last: number(last)?,
        complete: number(complete)?,
    };
    (span.first <= span.last && span.last < span.complete).then_some(span)
}

/// The response's one strong entity tag, if it has one (RFC 9110 §8.8.3).
pub(crate) fn strong_etag(headers: &HeaderMap) -> Option<&HeaderValue> {
    let etag = only(headers, header::ETAG)?;
    let tag = etag.as_bytes().trim_ascii();
    (tag.len() >= 2 && tag.first() == Some(&b'"') && tag.last() == Some(&b'"')).then_some(etag)
}

/// The value of `name` when the headers have exactly one line of it.
fn only(headers: &HeaderMap, name: HeaderName) -> Option<&HeaderValue> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => Some(value),
        _ => None,
    }
}

/// The strong validator of a stored response that a completion sends in
/// `If-Range` and combines parts under (RFC 9111 §3.4): its strong `ETag`;
/// else, when it has no `ETag` at all, its `Last-Modified` if that is
/// strong for a cache: at least 60 seconds before the entry's `Date`
/// (RFC 9110 §8.8.2.2). `None`: the entry is never completed.
pub(crate) fn strong_validator(headers: &HeaderMap) -> Option<HeaderValue> {
    if let Some(etag) = strong_etag(headers) {
        return Some(etag.clone());
    }
    if headers.contains_key(header::ETAG) {
        return None;
    }
    strong_last_modified(headers).cloned()
}

/// Whether a response carries the same strong validator as `validator`
/// (from [`strong_validator`], strong for the stored entry): the same
/// strong `ETag`; or, for a date, no `ETag` and one `Last-Modified` of the
/// same date.
pub(crate) fn has_validator(headers: &HeaderMap, validator: &HeaderValue) -> bool {
    let wanted = validator.as_bytes().trim_ascii();
    if wanted.first() == Some(&b'"') {
        return strong_etag(headers).is_some_and(|tag| tag.as_bytes().trim_ascii() == wanted);
    }
    if headers.contains_key(header::ETAG) {
        return false;
    }
    let modified = only(headers, header::LAST_MODIFIED);
    match (modified, freshness::http_date(wanted)) {
        (Some(modified), Some(stored)) => freshness::http_date(modified.as_bytes()) == Some(stored),
        _ => false,
    }
}

/// Whether a date validator is the one `validator` is (a date, not an
/// entity tag).
pub(crate) fn is_date(validator: &HeaderValue) -> bool {
    validator.as_bytes().trim_ascii().first() != Some(&b'"')
}

/// A `Last-Modified` that a cache may treat as strong (RFC 9110 §8.8.2.2):
/// one valid date, at least 60 seconds before the response's `Date`.
fn strong_last_modified(headers: &HeaderMap) -> Option<&HeaderValue> {
    let modified = only(headers, header::LAST_MODIFIED)?;
    let at = freshness::http_date(modified.as_bytes())?;
    let sent = freshness::http_date(only(headers, header::DATE)?.as_bytes())?;
    sent.duration_since(at)
        .is_ok_and(|d| d.as_secs() >= 60)
        .then_some(modified)
}

/// Whether a `206` may be stored as a partial entry (RFC 9111 §3.3): one
/// span of a known length, a single part (not `multipart/byteranges`), and
/// a strong `ETag` or no `ETag` at all (a weak one could never be combined
/// nor tell two representations apart).
pub(crate) fn storable_partial(headers: &HeaderMap) -> bool {
    let multipart = headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .any(is_multipart);
    let etag_ok = !headers.contains_key(header::ETAG) || strong_etag(headers).is_some();
    !multipart && etag_ok && content_range(headers).is_some()
}

/// Whether a `Content-Type` line says `multipart/byteranges`.
pub(crate) fn is_multipart(value: &HeaderValue) -> bool {
    value
        .as_bytes()
        .trim_ascii_start()
        .to_ascii_lowercase()
        .starts_with(b"multipart/byteranges")
}

/// Removes `Range` and `If-Range` from a request the cache handles (the
/// origin is asked for the whole response) and returns what they asked,
/// when it is one byte range of a `GET`. A `HEAD`'s range is ignored
/// (§14.2: range handling is defined for `GET` only), as is a field that
/// is not a single byte range.
pub(crate) fn take<B>(request: &mut Request<B>) -> Option<RangeRequest> {
    let is_get = request.method() == Method::GET;
    let headers = request.headers_mut();
    let if_range = headers.remove(header::IF_RANGE);
    let mut values = match headers.entry(header::RANGE) {
        header::Entry::Occupied(entry) => entry.remove_entry_mult().1,
        header::Entry::Vacant(_) => return None,
    };
    let value = values.next()?;
    if values.next().is_some() || !is_get {
        return None;
    }
    Some(RangeRequest {
        range: parse(value.as_bytes())?,
        if_range,
        field: value,
    })
}

/// Whether a request's head holds what [`take`] takes.
pub(crate) fn asked(headers: &HeaderMap) -> bool {
    headers.contains_key(header::RANGE) || headers.contains_key(header::IF_RANGE)
}

/// Drops `Range` and `If-Range` from a copy of the request's head.
pub(crate) fn strip(headers: &mut HeaderMap) {
    headers.remove(header::RANGE);
    headers.remove(header::IF_RANGE);
}

/// Parses `bytes=<one range>` (the unit case-insensitively); `None` for
/// anything else, several ranges included. A number too large for a u64 is
/// read as `u64::MAX`: past any end, which is what it means.
pub(crate) fn parse(value: &[u8]) -> Option<ByteRange> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (unit, set) = value.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (first, last) = set.trim().split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(s.parse::<u64>().unwrap_or(u64::MAX))
    };
    match (first.is_empty(), last.is_empty()) {
        (true, true) => None,
        (true, false) => number(last).map(ByteRange::Suffix),
        (false, true) => number(first).map(ByteRange::From),
        (false, false) => {
            let (first, last) = (number(first)?, number(last)?);
            // §14.1.1: a last-pos below the first-pos makes the field invalid.
            (last >= first).then_some(ByteRange::FromTo(first, last))
        }
    }
}

/// The bytes `start..=end` of a representation of `len` bytes, or `None`
/// when the range does not overlap it (§14.1.1: a first-pos at or past the
/// end, a suffix of 0, any range of an empty representation).
pub(crate) fn resolve(range: ByteRange, len: u64) -> Option<(u64, u64)> {
    if len == 0 {
        return None;
    }
    match range {
        ByteRange::FromTo(first, last) if first < len => Some((first, last.min(len - 1))),
        ByteRange::From(first) if first < len => Some((first, len - 1)),
        ByteRange::Suffix(n) if n > 0 => Some((len - n.min(len), len - 1)),
        _ => None,
    }
}

/// RFC 9110 §13.1.5: whether `If-Range` lets the range be served from a
/// response with these headers. An entity tag must match the response's
/// strong `ETag` exactly (weak tags never do); a date must equal its
/// `Last-Modified`, which must be strong: at least a second before its
/// `Date` (§8.8.2.2). Anything else sends the whole response.
pub(crate) fn if_range_holds(if_range: &HeaderValue, response: &HeaderMap) -> bool {
    let value = if_range.as_bytes().trim_ascii();
    if value.first() == Some(&b'"') || value.starts_with(b"W/") {
        let etag = response
            .get(header::ETAG)
            .map(|e| e.as_bytes().trim_ascii());
        return value.first() == Some(&b'"')
            && value.len() >= 2
            && value.last() == Some(&b'"')
            && etag == Some(value);
    }
    let date = |name| {
        response
            .get(name)
            .and_then(|v| freshness::http_date(v.as_bytes()))
    };
    match (
        freshness::http_date(value),
        date(header::LAST_MODIFIED),
        date(header::DATE),
    ) {
        (Some(since), Some(modified), Some(sent)) => {
            since == modified
                && sent
                    .duration_since(modified)
                    .is_ok_and(|d| d.as_secs() >= 1)
        }
        _ => false,
    }
}

/// The answer's length, when it is known: its `Content-Length`, else the
/// body's exact size.
fn length<B: Body>(headers: &HeaderMap, body: &B) -> Option<u64> {
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    match (lengths.next(), lengths.next()) {
        (Some(value), None) => value.to_str().ok()?.trim().parse().ok(),
        (None, _) => body.size_hint().exact(),
        (Some(_), Some(_)) => None,
    }
}

/// The answer to a range request: `206` or `416` cut from a whole `200`,
/// or the answer as it is (see the module docs).
pub(crate) fn answer<B: OriginBody>(
    wanted: &RangeRequest,
    response: Response<CacheBody<B>>,
) -> Response<CacheBody<B>> {
    if response.status() != StatusCode::OK {
        return response;
    }
    if let Some(if_range) = &wanted.if_range
        && !if_range_holds(if_range, response.headers())
    {
        return response;
    }
    let Some(len) = length(response.headers(), response.body()) else {
        return response;
    };
    let (mut parts, body) = response.into_parts();
    parts
        .headers
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let Some((start, end)) = resolve(wanted.range, len) else {
        finish(Box::pin(body));
        parts.status = StatusCode::RANGE_NOT_SATISFIABLE;
        for name in [header::CONTENT_TYPE, header::CONTENT_ENCODING] {
            parts.headers.remove(name);
        }
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
        parts.headers.insert(
            header::CONTENT_RANGE,
            header_value(&format!("bytes */{len}")),
        );
        return Response::from_parts(parts, CacheBody::empty());
    };
    let count = end - start + 1;
    parts.status = StatusCode::PARTIAL_CONTENT;
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    parts.headers.insert(
        header::CONTENT_RANGE,
        header_value(&format!("bytes {start}-{end}/{len}")),
    );
    Response::from_parts(parts, CacheBody::ranged(body, start, count, finish::<B>))
}

pub(crate) fn header_value(text: &str) -> HeaderValue {
    // Digits, spaces, `bytes`, `-`, `/` and `*` only.
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("bytes */0"))
}

/// Reads the rest of a body the cache is storing to its end on a task of
/// its own (the client has what it asked for); any other body is dropped.
/// A body that is stored has a known length within the entry bound, and
/// what is read is not kept here (the body's tee takes it).
fn finish<B: OriginBody>(body: Pin<Box<CacheBody<B>>>) {
    if !body.is_teed() || body.is_end_stream() {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(super::storing::read_to_the_entry(body, usize::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn one_byte_range_parses_and_anything_else_does_not() {
        assert_eq!(parse(b"bytes=0-99"), Some(ByteRange::FromTo(0, 99)));
        assert_eq!(parse(b"Bytes = 5-"), Some(ByteRange::From(5)));
        assert_eq!(parse(b"bytes=-20"), Some(ByteRange::Suffix(20)));
        assert_eq!(
            parse(b"bytes=0-99999999999999999999999"),
            Some(ByteRange::FromTo(0, u64::MAX))
        );
        for bad in [
            &b"bytes=0-1,5-6"[..],
            b"bytes=5-4",
            b"bytes=-",
            b"bytes=a-b",
            b"bytes=+1-2",
            b"items=0-1",
            b"bytes 0-1",
            b"",
            b"\xff",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn content_range_names_one_span_of_a_known_length() {
        let span = |v: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_RANGE, HeaderValue::from_static(v));
            content_range(&headers)
        };
        let whole = Span {
            first: 0,
            last: 9,
            complete: 10,
        };
        assert_eq!(span("bytes 0-9/10"), Some(whole));
        assert!(whole.is_whole());
        assert_eq!(
            span("Bytes 4-9/10"),
            Some(Span {
                first: 4,
                last: 9,
                complete: 10
            })
        );
        for bad in [
            "bytes 0-9/*",
            "bytes */10",
            "bytes 5-4/10",
            "bytes 0-10/10",
            "items 0-1/10",
            "bytes 0-1",
            "bytes -1-2/10",
            "bytes 0-99999999999999999999/10",
        ] {
            assert_eq!(span(bad), None, "{bad}");
        }
        let a = Span {
            first: 0,
            last: 4,
            complete: 10,
        };
        let touching = Span {
            first: 5,
            last: 9,
            complete: 10,
        };
        let apart = Span {
            first: 6,
            last: 9,
            complete: 10,
        };
        assert!(a.joins(touching) && touching.joins(a));
        assert!(!a.joins(apart) && !apart.joins(a));
        assert!(a.covers(1, 4) && !a.covers(3, 5));
    }

    #[test]
    fn only_single_spans_with_a_strong_tag_or_none_are_stored() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.append(*name, HeaderValue::from_static(value));
            }
            headers
        };
        let range = ("content-range", "bytes 0-4/10");
        assert!(storable_partial(&headers(&[range])));
        assert!(storable_partial(&headers(&[range, ("etag", "\"v1\"")])));
        assert!(!storable_partial(&headers(&[range, ("etag", "W/\"v1\"")])));
        assert!(!storable_partial(&headers(&[
            range,
            ("content-type", "multipart/byteranges; boundary=x")
        ])));
        assert!(!storable_partial(&headers(&[])));
    }

    #[test]
    fn ranges_are_resolved_against_the_length() {
        assert_eq!(resolve(ByteRange::FromTo(0, 9), 100), Some((0, 9)));
        assert_eq!(resolve(ByteRange::FromTo(90, 200), 100), Some((90, 99)));
        assert_eq!(resolve(ByteRange::From(99), 100), Some((99, 99)));
        assert_eq!(resolve(ByteRange::Suffix(10), 100), Some((90, 99)));
        assert_eq!(resolve(ByteRange::Suffix(500), 100), Some((0, 99)));
        assert_eq!(resolve(ByteRange::From(100), 100), None);
        assert_eq!(resolve(ByteRange::FromTo(100, 101), 100), None);
        assert_eq!(resolve(ByteRange::Suffix(0), 100), None);
        assert_eq!(resolve(ByteRange::FromTo(0, 0), 0), None);
    }

    #[test]
    fn if_range_needs_a_strong_match() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        headers.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_static("Tue, 01 Dec 2026 10:00:00 GMT"),
        );
        headers.insert(
            header::DATE,
            HeaderValue::from_static("Tue, 01 Dec 2026 10:00:05 GMT"),
        );
        let holds = |v: &'static str| if_range_holds(&HeaderValue::from_static(v), &headers);
        assert!(holds("\"v1\""));
        assert!(!holds("W/\"v1\""));
        assert!(!holds("\"v2\""));
        assert!(holds("Tue, 01 Dec 2026 10:00:00 GMT"));
        assert!(!holds("Tue, 01 Dec 2026 10:00:01 GMT"));
        assert!(!holds("yesterday"));
        // A Last-Modified as late as the Date is weak.
        headers.insert(
            header::DATE,
            HeaderValue::from_static("Tue, 01 Dec 2026 10:00:00 GMT"),
        );
        assert!(!if_range_holds(
            &HeaderValue::from_static("Tue, 01 Dec 2026 10:00:00 GMT"),
            &headers
        ));
        // A weak ETag never matches.
        headers.insert(header::ETAG, HeaderValue::from_static("W/\"v1\""));
        assert!(!if_range_holds(
            &HeaderValue::from_static("\"v1\""),
            &headers
        ));
    }

    /// A range of a body sent in several frames: frames before it are
    /// skipped, the first and last cut, and the stream ends with the range.
    #[tokio::test]
    async fn a_range_is_cut_across_frames() {
        use bytes::Bytes;
        use http_body::Frame;
        use std::convert::Infallible;
        let cut = |skip, len| {
            let frames = ["0123", "4567", "89ab", "cdef"]
                .map(|f| Ok::<_, Infallible>(Frame::data(Bytes::from_static(f.as_bytes()))));
            let origin = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            CacheBody::ranged(CacheBody::passthrough(origin), skip, len, |_| {})
        };
        for (skip, len, expected) in [
            (5, 6, "56789a"),
            (0, 16, "0123456789abcdef"),
            (4, 4, "4567"),
            (15, 1, "f"),
            (14, 5, "ef"),
        ] {
            let body = cut(skip, len).collect().await.unwrap().to_bytes();
            assert_eq!(body, expected.as_bytes(), "skip {skip}, len {len}");
        }
    }
}
