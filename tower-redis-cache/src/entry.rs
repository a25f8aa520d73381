//! A stored response and its compact, versioned binary form.
//!
//! Layout (all integers big-endian): magic `TRC`, version (`1` for a
//! complete response, `2` for a partial one: a `206` whose body is the
//! span its stored `Content-Range` names, which a reader that does not
//! know partial entries must not serve as a whole), status (u16),
//! response time (u64 ms since the epoch), corrected initial age (u64 s),
//! freshness lifetime (u64 s), header count (u16) then per header name length (u16), name, value length
//! (u32), value; body length (u32), body. Anything that does not parse —
//! another version, a foreign value, a truncated one — is a decode error,
//! which the store turns into a miss and a delete.
//!
//! An entry read from Redis is decoded in place (`Entry::decode_shared`):
//! its body and header values are `Bytes` slices of the one buffer the
//! reply arrived in, so a hit copies no body byte between Redis and the
//! response.

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

const MAGIC: &[u8; 3] = b"TRC";
const VERSION: u8 = 1;
/// The version of a partial entry (status 206).
const VERSION_PARTIAL: u8 = 2;

/// The fields a response made from an entry adds to the entry's (`Age`,
/// `Accept-Ranges`, `Cache-Status`): a map an entry is served from is made
/// with room for them (a clone is sized to its fields, and would grow).
pub(crate) const ADDED_FIELDS: usize = 3;

/// A stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// When the response was received (wall clock, ms since the epoch).
    pub(crate) response_time_ms: u64,
    /// RFC 9111 §4.2.3 `corrected_initial_age`, in seconds.
    pub(crate) initial_age: u64,
    /// Freshness lifetime, in seconds, as decided when stored.
    pub(crate) lifetime: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("stored cache entry is corrupt or foreign: {0}")]
pub(crate) struct DecodeError(&'static str);

impl Entry {
    /// RFC 9111 §4.2.3 `current_age` at `now_ms`, in seconds.
    /// Seconds of freshness left at `now_ms` (negative when stale).
    pub(crate) fn ttl(&self, now_ms: u64) -> i64 {
        i64::try_from(self.lifetime).unwrap_or(i64::MAX)
            - i64::try_from(self.age(now_ms)).unwrap_or(i64::MAX)
    }

    /// A soft purge at `at_ms`: the entry's freshness ends then, if it had
    /// not already. Entries stored after the purge are untouched.
    pub(crate) fn mark_stale_at(&mut self, at_ms: u64) {
        if at_ms >= self.response_time_ms {
            self.lifetime = self.lifetime.min(self.age(at_ms));
        }
    }

    pub(crate) fn age(&self, now_ms: u64) -> u64 {
        self.initial_age
            .saturating_add(now_ms.saturating_sub(self.response_time_ms) / 1000)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let headers_len: usize = self
            .headers
            .iter()
            .map(|(n, v)| 6 + n.as_str().len() + v.len())
            .sum();
        let mut out = Vec::with_capacity(24 + headers_len + self.body.len());
        out.extend_from_slice(MAGIC);
        out.push(if self.is_partial() {
            VERSION_PARTIAL
        } else {
            VERSION
        });
        out.extend_from_slice(&self.status.as_u16().to_be_bytes());
        out.extend_from_slice(&self.response_time_ms.to_be_bytes());
        let max = crate::directives::MAX_DELTA;
        out.extend_from_slice(&self.initial_age.min(max).to_be_bytes());
        out.extend_from_slice(&self.lifetime.min(max).to_be_bytes());
        let count = u16::try_from(self.headers.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for (name, value) in self.headers.iter().take(usize::from(count)) {
            let name = name.as_str().as_bytes();
            // Header names are short; values are capped at 4 GiB by the format.
            out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
            out.extend_from_slice(name);
            out.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        out.extend_from_slice(
            &u32::try_from(self.body.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes a copy of `bytes` (see [`Entry::decode_shared`]).
    #[cfg(test)]
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_shared(Bytes::copy_from_slice(bytes))
    }

    /// Decodes an entry without copying it: the body and every header
    /// value are slices of `bytes` (the one buffer a Redis reply arrived
    /// in), so a hit moves no body byte in this process.
    pub(crate) fn decode_shared(bytes: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader {
            bytes: &bytes,
            pos: 0,
        };
        if r.take(3)? != MAGIC {
            return Err(DecodeError("bad magic"));
        }
        let version = r.u8()?;
        if version != VERSION && version != VERSION_PARTIAL {
            return Err(DecodeError("unknown version"));
        }
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError("bad status"))?;
        if (version == VERSION_PARTIAL) != (status == StatusCode::PARTIAL_CONTENT) {
            return Err(DecodeError("version and status disagree"));
        }
        let response_time_ms = r.u64()?;
        let initial_age = r.u64()?;
        let lifetime = r.u64()?;
        // Ages and lifetimes are delta-seconds (RFC 9111 §1.2.2): anything
        // larger was not written by this cache.
        if initial_age > crate::directives::MAX_DELTA || lifetime > crate::directives::MAX_DELTA {
            return Err(DecodeError("age or lifetime out of range"));
        }
        let count = r.u16()?;
        // Capacity from untrusted input: capped, since HeaderMap panics on
        // huge ones; plus room for the fields a hit adds
        // ([`ADDED_FIELDS`]), so that serving it does not grow the map.
        // An entry without fields (a data value) allocates no map (a hit
        // on an HTTP entry whose fields were all left out grows it then).
        let mut headers = if count == 0 {
            HeaderMap::new()
        } else {
            HeaderMap::try_with_capacity(usize::from(count).min(64) + ADDED_FIELDS)
                .map_err(|_| DecodeError("header capacity"))?
        };
        for _ in 0..count {
            let name_len = usize::from(r.u16()?);
            let name = HeaderName::from_bytes(r.take(name_len)?)
                .map_err(|_| DecodeError("bad header name"))?;
            let value_len = r.u32()? as usize;
            let start = r.pos;
            r.take(value_len)?;
            // Checked like `from_bytes`, but shares the buffer.
            let value = HeaderValue::from_maybe_shared(bytes.slice(start..r.pos))
                .map_err(|_| DecodeError("bad header value"))?;
            headers
                .try_append(name, value)
                .map_err(|_| DecodeError("too many headers"))?;
        }
        let body_len = r.u32()? as usize;
        let start = r.pos;
        r.take(body_len)?;
        let end = r.pos;
        if end != bytes.len() {
            return Err(DecodeError("trailing bytes"));
        }
        // The body is the buffer itself, moved past the fields: a slice
        // would be a second handle on it, and the first one made of a
        // reply's buffer allocates (an entry without fields, a data value,
        // then allocates nothing).
        let mut body = bytes;
        body.advance(start);
        Ok(Entry {
            status,
            headers,
            body,
            response_time_ms,
            initial_age,
            lifetime,
        })
    }

    /// A partial entry: a `206` holding the span of the representation its
    /// `Content-Range` names (RFC 9111 §3.3), served only to range
    /// requests inside that span.
    pub(crate) fn is_partial(&self) -> bool {
        self.status == StatusCode::PARTIAL_CONTENT
    }

    /// The stored size, for byte-bounded stores.
    pub(crate) fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        u32::try_from(64 + headers + self.body.len()).unwrap_or(u32::MAX)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError("length overflow"))?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(DecodeError("truncated"))?;
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(b);
        Ok(u64::from_be_bytes(array))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Entry {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"hello"),
            response_time_ms: 1_700_000_000_000,
            initial_age: 3,
            lifetime: 60,
        }
    }

    #[test]
    fn round_trip_keeps_everything() {
        let e = entry();
        assert_eq!(Entry::decode(&e.encode()), Ok(e));
    }

    #[test]
    fn a_shared_decode_borrows_the_body_and_header_values() {
        let e = entry();
        let bytes = Bytes::from(e.encode());
        let range = bytes.as_ptr_range();
        let decoded = Entry::decode_shared(bytes.clone()).unwrap();
        assert_eq!(decoded, e);
        let inside = |p: *const u8| range.contains(&p);
        assert!(
            inside(decoded.body.as_ptr()),
            "the body is a slice of the reply"
        );
        for value in decoded.headers.values() {
            assert!(inside(value.as_bytes().as_ptr()), "{value:?} was copied");
        }
    }

    #[test]
    fn every_truncation_and_foreign_value_is_an_error() {
        let bytes = entry().encode();
        for len in 0..bytes.len() {
            assert!(
                Entry::decode(&bytes[..len]).is_err(),
                "prefix of {len} bytes"
            );
        }
        assert!(Entry::decode(b"{\"json\": true}").is_err());
        let mut other_version = bytes.clone();
        other_version[3] = 9;
        assert!(Entry::decode(&other_version).is_err());
        let mut trailing = bytes;
        trailing.push(0);
        assert!(Entry::decode(&trailing).is_err());
    }

    #[test]
    fn a_partial_entry_has_a_version_of_its_own() {
        let mut partial = entry();
        partial.status = StatusCode::PARTIAL_CONTENT;
        let bytes = partial.encode();
        assert_eq!(bytes[3], VERSION_PARTIAL);
        assert_eq!(Entry::decode(&bytes), Ok(partial));
        let mut claims_complete = bytes;
        claims_complete[3] = VERSION;
        assert!(Entry::decode(&claims_complete).is_err());
        let mut whole = entry().encode();
        whole[3] = VERSION_PARTIAL;
        assert!(Entry::decode(&whole).is_err());
    }

    #[test]
    fn a_huge_header_count_is_an_error_not_a_panic() {
        let mut bytes = b"TRC\x01".to_vec();
        bytes.extend_from_slice(&200u16.to_be_bytes());
        bytes.extend_from_slice(&[0u8; 24]);
        bytes.extend_from_slice(&u16::MAX.to_be_bytes());
        assert!(Entry::decode(&bytes).is_err());
    }

    #[test]
    fn age_grows_with_resident_time() {
        let e = entry();
        assert_eq!(e.age(e.response_time_ms), 3);
        assert_eq!(e.age(e.response_time_ms + 10_500), 13);
        assert_eq!(
            e.age(e.response_time_ms - 1_000),
            3,
            "a clock behind never makes it younger"
        );
    }
}
