//! Property tests for the session cookie decoder: arbitrary cookie values
//! never panic and never decode to anything but an id of the issued shape;
//! issued values round-trip; any change to a signed value is rejected; and
//! whatever bytes other cookies hold, on the same `Cookie` line or on
//! others, the session cookie beside them is found.
//!
//! `PROPTEST_CASES` sets the number of cases per property (proptest reads
//! it itself; default 256);
//! run longer with e.g.
//! `PROPTEST_CASES=100000 cargo test -p tower-redis-session --lib proptests`.

use http::{HeaderMap, HeaderValue, header};
use proptest::prelude::*;

use crate::id::{CookieCodec, SessionId};
use crate::service::find_session_cookie;

/// The default session cookie name.
const NAME: &str = "__Host-session";

/// The length of an issued id (256 bits in unpadded base64url).
const ID_LEN: usize = 43;

fn codecs(key: Vec<u8>) -> [CookieCodec; 2] {
    [CookieCodec::new(None), CookieCodec::new(Some(key))]
}

fn signing_key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 32..80)
}

/// Text shaped like cookie values: base64url characters, the separator,
/// and some of everything else.
fn cookie_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_.-]{0,100}",
        "[A-Za-z0-9_-]{43}\\.[A-Za-z0-9_=+/-]{40,46}",
        "[A-Za-z0-9_-]{43}",
        any::<String>(),
        "\\PC{0,200}",
    ]
}

/// Bytes a browser may send in the other cookies of a `Cookie` line: any
/// byte a header value can hold (visible ASCII, space, tab and every byte
/// over 0x7f, which is not text to `HeaderValue::to_str`), biased towards
/// the cookie syntax's separators.
fn cookie_line_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        3 => prop::sample::select(b";=\" \t,_-.aZ09".to_vec()),
        // Control bytes, which a header value cannot hold, become text.
        3 => any::<u8>().prop_map(|b| match b {
            b'\t' | 0x20..=0x7e | 0x80..=0xff => b,
            0x7f => b'~',
            _ => b + 0x20,
        }),
        2 => 0x80u8..=0xff,
    ];
    prop::collection::vec(byte, 0..200)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn cookie_headers(lines: &[Vec<u8>]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in lines {
        let value = HeaderValue::from_bytes(line).expect("only header value bytes");
        headers.append(header::COOKIE, value);
    }
    headers
}

fn is_issued_shape(id: &SessionId) -> bool {
    id.as_str().len() == ID_LEN
        && id
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

proptest! {
    #[test]
    fn decoding_arbitrary_values_never_panics_and_yields_only_issued_shapes(
        value in cookie_text(),
        key in signing_key(),
    ) {
        for codec in codecs(key) {
            if let Some(id) = codec.decode(&value) {
                prop_assert!(is_issued_shape(&id));
            }
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        key in signing_key(),
    ) {
        let value = String::from_utf8_lossy(&bytes);
        for codec in codecs(key) {
            let _ = codec.decode(&value);
        }
    }

    #[test]
    fn issued_values_round_trip(key in signing_key()) {
        for codec in codecs(key) {
            let id = SessionId::generate();
            prop_assert_eq!(codec.decode(&codec.encode(&id)), Some(id));
        }
    }

    #[test]
    fn every_change_to_a_signed_value_is_rejected(
        key in signing_key(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        replacement in "[A-Za-z0-9_.-]",
    ) {
        let codec = CookieCodec::new(Some(key));
        let id = SessionId::generate();
        let value = codec.encode(&id);

        // A single bit flipped anywhere.
        let mut flipped = value.clone().into_bytes();
        let i = at.index(flipped.len());
        flipped[i] ^= 1 << bit;
        let flipped = String::from_utf8_lossy(&flipped).into_owned();
        prop_assert!(flipped == value || codec.decode(&flipped).is_none(), "{flipped}");

        // A character replaced by another cookie-safe one.
        let mut replaced: Vec<char> = value.chars().collect();
        replaced[i] = replacement.chars().next().expect("one char");
        let replaced: String = replaced.into_iter().collect();
        prop_assert!(replaced == value || codec.decode(&replaced).is_none(), "{replaced}");

        // Truncated or extended.
        prop_assert!(codec.decode(&value[..i]).is_none());
        let extended = format!("{value}{replacement}");
        prop_assert!(codec.decode(&extended).is_none());
    }

    #[test]
    fn bytes_in_other_cookies_never_hide_the_session_cookie(
        before in cookie_line_bytes(),
        after in cookie_line_bytes(),
        key in signing_key(),
        signed in any::<bool>(),
        separator in prop::sample::select(vec![";", "; ", " ;  ", ";\t"]),
        decoy in any::<bool>(),
        own_line in any::<bool>(),
    ) {
        // Only the cookie we put there may carry the session's name.
        prop_assume!(!contains(&before, NAME.as_bytes()) && !contains(&after, NAME.as_bytes()));
        let codec = CookieCodec::new(signed.then_some(key));
        let id = SessionId::generate();
        let session = format!("{NAME}={}", codec.encode(&id)).into_bytes();
        let mut junk = before;
        if decoy {
            // A malformed cookie of the same name first: skipped, not fatal.
            junk.extend_from_slice(format!("{separator}{NAME}=").as_bytes());
            junk.extend_from_slice(&after);
        }
        let lines = if own_line {
            vec![junk, session, after]
        } else {
            // One line, as browsers send it: other cookies on both sides.
            let mut line = junk;
            line.extend_from_slice(separator.as_bytes());
            line.extend_from_slice(&session);
            line.extend_from_slice(separator.as_bytes());
            line.extend_from_slice(&after);
            vec![line]
        };
        let headers = cookie_headers(&lines);
        prop_assert_eq!(find_session_cookie(&headers, NAME, &codec), Some(id));
    }

    #[test]
    fn arbitrary_cookie_lines_never_panic_and_yield_only_issued_shapes(
        lines in prop::collection::vec(cookie_line_bytes(), 0..4),
        key in signing_key(),
    ) {
        let headers = cookie_headers(&lines);
        for codec in codecs(key) {
            if let Some(id) = find_session_cookie(&headers, NAME, &codec) {
                prop_assert!(is_issued_shape(&id));
                prop_assert!(lines.iter().any(|line| contains(line, NAME.as_bytes())));
            }
        }
    }

    #[test]
    fn a_signature_from_another_key_is_rejected(a in signing_key(), b in signing_key()) {
        prop_assume!(a != b);
        let id = SessionId::generate();
        let forged = CookieCodec::new(Some(b)).encode(&id);
        prop_assert!(CookieCodec::new(Some(a)).decode(&forged).is_none());
    }
}
