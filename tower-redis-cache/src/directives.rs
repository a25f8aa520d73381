//! `Cache-Control` (and RFC 9213 targeted fields) parsing, lenient the way
//! RFC 9111 asks: unknown directives are ignored, an invalid or conflicting
//! freshness value makes the response stale, nothing panics.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName};

/// `delta-seconds` beyond this are treated as this (RFC 9111 §1.2.2).
pub(crate) const MAX_DELTA: u64 = 2_147_483_648;

/// The directives of a response that a shared cache acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ResponseDirectives {
    pub(crate) no_store: bool,
    /// Qualified or not: a shared cache treats `no-cache="Set-Cookie"` like
    /// `no-cache`, except where the layer stores `Set-Cookie` (see
    /// `freshness::directives_of`).
    pub(crate) no_cache: bool,
    /// The field names of a qualified `no-cache="…"` (lower-case), and
    /// [`UNQUALIFIED`] for each occurrence without names.
    pub(crate) no_cache_fields: Vec<String>,
    pub(crate) private: bool,
    /// The field names of a qualified `private="…"` (lower-case), and
    /// [`UNQUALIFIED`] for each occurrence without names.
    pub(crate) private_fields: Vec<String>,
    /// RFC 9111 §5.2.2.3: store only when the status code is understood;
    /// then `no-store` does not apply.
    pub(crate) must_understand: bool,
    /// Set by `freshness::directives_of` when a `private` or `no-cache`
    /// qualified with `Set-Cookie` alone means "store, without that field".
    pub(crate) drop_set_cookie: bool,
    pub(crate) public: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) proxy_revalidate: bool,
    pub(crate) max_age: Option<u64>,
    pub(crate) s_maxage: Option<u64>,
    pub(crate) stale_while_revalidate: Option<u64>,
    pub(crate) stale_if_error: Option<u64>,
}

/// The directives of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RequestDirectives {
    pub(crate) no_cache: bool,
    pub(crate) no_store: bool,
    pub(crate) max_age: Option<u64>,
    /// `Some(None)`: any staleness is acceptable.
    pub(crate) max_stale: Option<Option<u64>>,
    pub(crate) min_fresh: Option<u64>,
    pub(crate) only_if_cached: bool,
}

/// Calls `f` with each `name[=value]` item of `field`'s lines, in order:
/// the name in lower case, the value unquoted. Nothing is allocated for
/// the usual field (`max-age=600`, names already in lower case, values
/// without escapes): a stored `Cache-Control` is parsed whenever a thread
/// has not parsed the same value lately (`freshness::directives_of`).
fn each_item(headers: &HeaderMap, field: &HeaderName, mut f: impl FnMut(&str, Option<&str>)) {
    for value in headers.get_all(field) {
        // Invalid UTF-8: the bytes that are not ASCII cannot be directives we know.
        let text = String::from_utf8_lossy(value.as_bytes());
        each_list_item(&text, |item| {
            let item = item.trim();
            if item.is_empty() {
                return;
            }
            let (name, value) = match item.split_once('=') {
                Some((name, value)) => (name.trim(), Some(unquote(value.trim()))),
                None => (item, None),
            };
            let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(name.to_ascii_lowercase())
            } else {
                Cow::Borrowed(name)
            };
            f(&name, value.as_deref());
        });
    }
}

/// Calls `f` with each part of `text` between commas outside quoted strings.
fn each_list_item<'a>(text: &'a str, mut f: impl FnMut(&'a str)) {
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                f(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    f(&text[start..]);
}

/// A value without its quotes and escapes; borrowed when it has no escape.
fn unquote(value: &str) -> Cow<'_, str> {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) if inner.contains('\\') => {
            Cow::Owned(inner.replace("\\\"", "\"").replace("\\\\", "\\"))
        }
        Some(inner) => Cow::Borrowed(inner),
        None => Cow::Borrowed(value),
    }
}

/// A `delta-seconds` value: `None` when invalid (which makes it "stale",
/// i.e. 0, for freshness directives).
fn delta_seconds(value: Option<&str>) -> Option<u64> {
    let value = value?;
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(value.parse::<u64>().unwrap_or(MAX_DELTA).min(MAX_DELTA))
}

/// Records a freshness value; an invalid or conflicting one means "stale".
fn freshness(slot: &mut Option<u64>, seen: &mut bool, value: Option<&str>) {
    let parsed = delta_seconds(value).unwrap_or(0);
    *slot = match (*seen, *slot) {
        (false, _) => Some(parsed),
        (true, Some(previous)) if previous == parsed => Some(previous),
        (true, _) => Some(0),
    };
    *seen = true;
}

/// The response directives from `field`, or `None` when the field is absent.
pub(crate) fn response(headers: &HeaderMap, field: &HeaderName) -> Option<ResponseDirectives> {
    if !headers.contains_key(field) {
        return None;
    }
    let mut d = ResponseDirectives::default();
    let (mut seen_max_age, mut seen_s_maxage) = (false, false);
    each_item(headers, field, |name, value| match name {
        "no-store" => d.no_store = true,
        "no-cache" => {
            d.no_cache = true;
            qualify(&mut d.no_cache_fields, value);
        }
        "private" => {
            d.private = true;
            qualify(&mut d.private_fields, value);
        }
        "must-understand" => d.must_understand = true,
        "public" => d.public = true,
        "must-revalidate" => d.must_revalidate = true,
        "proxy-revalidate" => d.proxy_revalidate = true,
        "max-age" => freshness(&mut d.max_age, &mut seen_max_age, value),
        "s-maxage" => freshness(&mut d.s_maxage, &mut seen_s_maxage, value),
        "stale-while-revalidate" => d.stale_while_revalidate = delta_seconds(value),
        "stale-if-error" => d.stale_if_error = delta_seconds(value),
        _ => {}
    });
    Some(d)
}

/// Adds the field names of a `no-cache` / `private` to `fields`, or
/// [`UNQUALIFIED`] when it names none: the directive then covers the whole
/// response, whatever a qualified occurrence beside it says.
fn qualify(fields: &mut Vec<String>, value: Option<&str>) {
    let before = fields.len();
    fields.extend(field_names(value));
    if fields.len() == before {
        fields.push(UNQUALIFIED.to_owned());
    }
}

/// The field name that stands for an unqualified `no-cache` / `private`.
pub(crate) const UNQUALIFIED: &str = "*";

/// The field names of a qualified `no-cache` / `private`, lower-case.
fn field_names(value: Option<&str>) -> impl Iterator<Item = String> + '_ {
    value
        .unwrap_or("")
        .split(',')
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
}

/// The directives a targeted field's value is checked for.
const KNOWN: [&str; 11] = [
    "no-store",
    "no-cache",
    "private",
    "must-understand",
    "public",
    "must-revalidate",
    "proxy-revalidate",
    "max-age",
    "s-maxage",
    "stale-while-revalidate",
    "stale-if-error",
];

/// The directives of an RFC 9213 targeted field (`CDN-Cache-Control` and
/// the like), or `None` when the field is absent, empty, or not a valid
/// Structured Field dictionary (RFC 9651) whose known directives have the
/// types RFC 9213 §2.1 infers: then the whole field is ignored, and the
/// next field (in the end `Cache-Control`) applies.
pub(crate) fn targeted(headers: &HeaderMap, field: &HeaderName) -> Option<ResponseDirectives> {
    let mut lines = headers.get_all(field).iter();
    let first = lines.next()?;
    // Several lines are one dictionary, joined with commas (RFC 9651 §4.2).
    let mut text = first.as_bytes().to_vec();
    for line in lines {
        text.extend_from_slice(b", ");
        text.extend_from_slice(line.as_bytes());
    }
    if text.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let dictionary: sfv::Dictionary = sfv::Parser::new(&text).parse().ok()?;
    let mut d = ResponseDirectives::default();
    for (key, member) in &dictionary {
        if !KNOWN.contains(&key.as_str()) {
            continue;
        }
        // Parameters are ignored; an inner list is never a directive value.
        let sfv::ListEntry::Item(item) = member else {
            return None;
        };
        let value = &item.bare_item;
        let flag = || value.as_boolean();
        let seconds = || {
            value
                .as_integer()
                .map(i64::from)
                .and_then(|n| u64::try_from(n).ok())
                .map(|n| n.min(MAX_DELTA))
        };
        // A boolean, or a string listing field names (qualified form).
        let listed = |set: &mut bool, fields: &mut Vec<String>| -> Option<()> {
            match (value.as_boolean(), value.as_string()) {
                (Some(b), _) => {
                    *set |= b;
                    if b {
                        fields.push(UNQUALIFIED.to_owned());
                    }
                }
                (None, Some(names)) => {
                    *set = true;
                    qualify(fields, Some(names.as_str()));
                }
                (None, None) => return None,
            }
            Some(())
        };
        match key.as_str() {
            "no-store" => d.no_store = flag()?,
            "no-cache" => listed(&mut d.no_cache, &mut d.no_cache_fields)?,
            "private" => listed(&mut d.private, &mut d.private_fields)?,
            "must-understand" => d.must_understand = flag()?,
            "public" => d.public = flag()?,
            "must-revalidate" => d.must_revalidate = flag()?,
            "proxy-revalidate" => d.proxy_revalidate = flag()?,
            "max-age" => d.max_age = Some(seconds()?),
            "s-maxage" => d.s_maxage = Some(seconds()?),
            "stale-while-revalidate" => d.stale_while_revalidate = Some(seconds()?),
            "stale-if-error" => d.stale_if_error = Some(seconds()?),
            _ => {}
        }
    }
    Some(d)
}

/// The request's `Cache-Control` (and `Pragma: no-cache` when it has none).
pub(crate) fn request(headers: &HeaderMap) -> RequestDirectives {
    let mut d = RequestDirectives::default();
    let field = http::header::CACHE_CONTROL;
    if !headers.contains_key(&field) {
        d.no_cache = headers
            .get_all(http::header::PRAGMA)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"));
        return d;
    }
    each_item(headers, &field, |name, value| match name {
        "no-cache" => d.no_cache = true,
        "no-store" => d.no_store = true,
        // An invalid request max-age is ignored rather than forcing a miss.
        "max-age" => d.max_age = delta_seconds(value).or(d.max_age),
        "max-stale" => {
            d.max_stale = Some(value.map(|v| delta_seconds(Some(v)).unwrap_or(0)));
        }
        "min-fresh" => d.min_fresh = delta_seconds(value).or(d.min_fresh),
        "only-if-cached" => d.only_if_cached = true,
        _ => {}
    });
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header::CACHE_CONTROL;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn parse(values: &[&str]) -> ResponseDirectives {
        response(&headers(values), &CACHE_CONTROL).unwrap()
    }

    #[test]
    fn response_directive_table() {
        let cases: &[(&[&str], ResponseDirectives)] = &[
            (
                &["max-age=60"],
                ResponseDirectives {
                    max_age: Some(60),
                    ..Default::default()
                },
            ),
            (
                &["public, s-maxage=10, max-age=5"],
                ResponseDirectives {
                    public: true,
                    s_maxage: Some(10),
                    max_age: Some(5),
                    ..Default::default()
                },
            ),
            (
                &["No-Store"],
                ResponseDirectives {
                    no_store: true,
                    ..Default::default()
                },
            ),
            (
                &["no-cache=\"Set-Cookie, X-Foo\", max-age=3"],
                ResponseDirectives {
                    no_cache: true,
                    no_cache_fields: vec!["set-cookie".into(), "x-foo".into()],
                    max_age: Some(3),
                    ..Default::default()
                },
            ),
            (
                &["private=\"x\""],
                ResponseDirectives {
                    private: true,
                    private_fields: vec!["x".into()],
                    ..Default::default()
                },
            ),
            // Escapes in a quoted value are undone before its names are read.
            (
                &["private=\"a\\\\b, x\\\"y\""],
                ResponseDirectives {
                    private: true,
                    private_fields: vec!["a\\b".into(), "x\"y".into()],
                    ..Default::default()
                },
            ),
            (
                &["max-age=\"30\""],
                ResponseDirectives {
                    max_age: Some(30),
                    ..Default::default()
                },
            ),
            (
                &["max-age=abc"],
                ResponseDirectives {
                    max_age: Some(0),
                    ..Default::default()
                },
            ),
            (
                &["max-age=-1"],
                ResponseDirectives {
                    max_age: Some(0),
                    ..Default::default()
                },
            ),
            (
                &["max-age=10", "max-age=20"],
                ResponseDirectives {
                    max_age: Some(0),
                    ..Default::default()
                },
            ),
            (
                &["max-age=10, max-age=10"],
                ResponseDirectives {
                    max_age: Some(10),
                    ..Default::default()
                },
            ),
            (
                &["max-age=99999999999999999999"],
                ResponseDirectives {
                    max_age: Some(MAX_DELTA),
                    ..Default::default()
                },
            ),
            (
                &["foo, bar=\"a,b\", max-age=7"],
                ResponseDirectives {
                    max_age: Some(7),
                    ..Default::default()
                },
            ),
            (
                &[",,, ,must-revalidate,"],
                ResponseDirectives {
                    must_revalidate: true,
                    ..Default::default()
                },
            ),
            (
                &["stale-while-revalidate=30, stale-if-error=60"],
                ResponseDirectives {
                    stale_while_revalidate: Some(30),
                    stale_if_error: Some(60),
                    ..Default::default()
                },
            ),
        ];
        for (values, expected) in cases {
            assert_eq!(&parse(values), expected, "{values:?}");
        }
    }

    fn targeted_of(values: &[&str]) -> Option<ResponseDirectives> {
        let mut map = HeaderMap::new();
        for v in values {
            map.append("cdn-cache-control", HeaderValue::from_str(v).unwrap());
        }
        targeted(&map, &HeaderName::from_static("cdn-cache-control"))
    }

    #[test]
    fn targeted_fields_are_structured_dictionaries() {
        let d = targeted_of(&["max-age=60, public", "no-cache=\"Set-Cookie\""]).unwrap();
        assert_eq!(d.max_age, Some(60));
        assert!(d.public && d.no_cache);
        assert_eq!(d.no_cache_fields, ["set-cookie"]);
        assert_eq!(
            targeted_of(&["max-age=60;x=1, foo=(a b)"]).unwrap().max_age,
            Some(60),
            "parameters and unknown members are ignored"
        );
        assert!(
            targeted_of(&["none"]).is_some(),
            "no known directive: still valid"
        );
        for invalid in [
            "max-age=\"60\"",
            "max-age=60.0",
            "max-age=-1",
            "max-age=(1 2)",
            "no-store=1",
            "private=?1, max-age=x y",
            "MAX-AGE=60",
            "max-age=60,",
            "max-age=60 public",
            "",
            "  ",
        ] {
            assert_eq!(targeted_of(&[invalid]), None, "{invalid:?}");
        }
        assert_eq!(targeted_of(&[]), None);
    }

    #[test]
    fn absent_field_is_none() {
        assert_eq!(response(&HeaderMap::new(), &CACHE_CONTROL), None);
    }

    #[test]
    fn request_directive_table() {
        let d = request(&headers(&["max-stale"]));
        assert_eq!(d.max_stale, Some(None));
        let d = request(&headers(&["max-stale=5, min-fresh=3, max-age=0"]));
        assert_eq!(
            (d.max_stale, d.min_fresh, d.max_age),
            (Some(Some(5)), Some(3), Some(0))
        );
        let d = request(&headers(&["no-cache, only-if-cached, no-store"]));
        assert!(d.no_cache && d.only_if_cached && d.no_store);
        let d = request(&headers(&["max-age=zzz"]));
        assert_eq!(d.max_age, None);
        let mut pragma = HeaderMap::new();
        pragma.insert(http::header::PRAGMA, HeaderValue::from_static("no-cache"));
        assert!(request(&pragma).no_cache);
    }

    #[test]
    fn invalid_utf8_never_panics() {
        let mut map = HeaderMap::new();
        map.insert(
            CACHE_CONTROL,
            HeaderValue::from_bytes(b"max-age=5, \xff\xfe").unwrap(),
        );
        assert_eq!(response(&map, &CACHE_CONTROL).unwrap().max_age, Some(5));
    }
}
