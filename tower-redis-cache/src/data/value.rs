//! A data value as a cache entry: its key URL and its envelope.
//!
//! A value is stored as an entry without `Vary` under the URL
//! `//<data>/.data/<key>` (`<` cannot occur in a request's host, so no
//! HTTP entry shares it). The entry's body is the envelope: magic `TRD`,
//! version `1`, the TTL in milliseconds (u64, big-endian), a flags byte
//! (bit 0: the value may not live in the near tier; bit 1: soft purges
//! are written into the entry), then the codec's bytes. The entry's
//! response time is stamped by Redis when it is stored (the clock soft
//! purges use too), and its lifetime is the TTL in whole seconds, rounded
//! up, so that the HTTP cache's admin surface (stats, soft purges) reads
//! it as it reads a page. A soft purge shortens that lifetime to the
//! value's age at the purge (`soft_purge.lua`), which is how a reader of
//! the entry alone sees it.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::error::InvalidKey;
use crate::entry::Entry;
use crate::key::Ring;

/// The longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

const MAGIC: &[u8; 3] = b"TRD";
const VERSION: u8 = 1;
const HEADER: usize = 13;
/// Flag: the value may not be copied into the near tier.
const FAR_ONLY: u8 = 1;
/// Flag: a soft purge writes its mark into this entry (`soft_purge.lua`),
/// so that one `HGET` of the entry is the whole read. Every value stored
/// by this version has it; a value stored by an earlier version has not,
/// and its reader also reads the hash's mark (`sp`): a soft purge made
/// before the upgrade may not be written into it.
const CARRIES_MARKS: u8 = 2;

/// What every data key URL starts with.
const URL_PREFIX: &str = "//<data>/.data/";

/// Checks a data key.
fn check(key: &str) -> Result<(), InvalidKey> {
    if key.is_empty() {
        return Err(InvalidKey::Empty);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(InvalidKey::TooLong(key.len()));
    }
    Ok(())
}

/// Whether `url` is a data value's URL ([`url`]).
pub(crate) fn is_data_url(url: &str) -> bool {
    url.starts_with(URL_PREFIX)
}

/// The key URL of a data key.
pub(crate) fn url(key: &str) -> Result<String, InvalidKey> {
    check(key)?;
    Ok(format!("{URL_PREFIX}{key}"))
}

/// The URL hash of a data key (`key::hash_url` of its URL), without
/// building the URL: a hit needs only the hash.
///
/// The hash is a pure function of the key, and a hot key is hashed on
/// every read, so each thread keeps the last [`MEMO_SLOTS`] keys it hashed
/// (of at most [`MEMO_MAX_KEY_BYTES`]) with their hashes, and compares
/// instead of hashing: under 3 KiB a thread.
pub(crate) fn url_hash(key: &str) -> Result<String, InvalidKey> {
    check(key)?;
    if key.len() > MEMO_MAX_KEY_BYTES {
        return Ok(hash_of(key));
    }
    // `try_with`: during the thread's teardown, the hash is made anew.
    let remembered = HASHES
        .try_with(|memo| {
            let mut memo = memo.borrow_mut();
            if let Some((_, hash)) = memo.find(|(k, _)| **k == *key) {
                #[cfg(test)]
                MEMO_HITS.set(MEMO_HITS.get() + 1);
                return hash.clone();
            }
            let hash = hash_of(key);
            memo.keep((key.into(), hash.clone()));
            hash
        })
        .ok();
    Ok(remembered.unwrap_or_else(|| hash_of(key)))
}

/// Keys (with their hashes) each thread remembers.
const MEMO_SLOTS: usize = 8;
/// The longest key a thread remembers.
const MEMO_MAX_KEY_BYTES: usize = 256;

thread_local! {
    /// A thread's last hashed keys, with their hashes.
    static HASHES: std::cell::RefCell<Ring<(Box<str>, String), MEMO_SLOTS>> =
        const { std::cell::RefCell::new(Ring::new()) };
}

#[cfg(test)]
thread_local! {
    /// Hashes this thread took from its memo.
    static MEMO_HITS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// SHA-256 of the key's URL, in unpadded URL-safe base64.
fn hash_of(key: &str) -> String {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(URL_PREFIX.as_bytes())
        .chain_update(key.as_bytes())
        .finalize();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
}

/// A stored value, read back.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    /// The whole entry, as found (for re-storing it as fail-safe).
    pub(crate) entry: Entry,
    /// When it was stored (ms since the epoch, Redis' clock).
    pub(crate) stored_at: u64,
    pub(crate) ttl_ms: u64,
    /// A soft purge made it stale.
    soft_purged: bool,
}

impl Stored {
    /// The envelope of an entry, or `None` when the entry is not a data
    /// value of this version.
    pub(crate) fn of(entry: Entry) -> Option<Self> {
        let body = &entry.body;
        if body.len() < HEADER || &body[..3] != MAGIC || body[3] != VERSION {
            return None;
        }
        let ttl_ms = u64::from_be_bytes(body[4..12].try_into().ok()?);
        let soft_purged = entry.lifetime < lifetime_of(ttl_ms);
        Some(Self {
            stored_at: entry.response_time_ms,
            ttl_ms,
            soft_purged,
            entry,
        })
    }

    /// The codec's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.entry.body[HEADER..]
    }

    /// Whether the value may be copied into the near tier.
    pub(crate) fn near(&self) -> bool {
        may_live_near(&self.entry)
    }

    pub(crate) fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at)
    }

    pub(crate) fn is_fresh(&self, now_ms: u64) -> bool {
        !self.soft_purged && self.age_ms(now_ms) < self.ttl_ms
    }
}

/// Whether `entry` is a data value stored by an earlier version, whose
/// soft purges may be in the hash's mark alone (see [`CARRIES_MARKS`]).
pub(crate) fn lacks_its_marks(entry: &Entry) -> bool {
    let body = &entry.body;
    body.len() >= HEADER && &body[..3] == MAGIC && body[12] & CARRIES_MARKS == 0
}

/// Whether a stored entry may be copied into the near tier: not when
/// its value was stored with `near(false)`.
pub(crate) fn may_live_near(entry: &Entry) -> bool {
    entry.body.get(12).is_none_or(|flags| flags & FAR_ONLY == 0)
}

/// The whole seconds of a TTL in milliseconds, rounded up, at most what
/// an entry stores (`directives::MAX_DELTA`, about 68 years): a longer TTL
/// was stored as that, and is no soft purge.
fn lifetime_of(ttl_ms: u64) -> u64 {
    ttl_ms.div_ceil(1000).min(crate::directives::MAX_DELTA)
}

/// The entry storing a value's encoded bytes for `ttl_ms`, stamped `now_ms`
/// (Redis restamps it with its own clock).
pub(crate) fn entry(bytes: &[u8], ttl_ms: u64, near: bool, now_ms: u64) -> Entry {
    let mut body = Vec::with_capacity(HEADER + bytes.len());
    body.extend_from_slice(MAGIC);
    body.push(VERSION);
    body.extend_from_slice(&ttl_ms.to_be_bytes());
    body.push(CARRIES_MARKS | if near { 0 } else { FAR_ONLY });
    body.extend_from_slice(bytes);
    Entry {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        body: Bytes::from(body),
        response_time_ms: now_ms,
        initial_age: 0,
        lifetime: lifetime_of(ttl_ms),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_round_trips_and_foreign_bodies_are_not_values() {
        let stored = Stored::of(entry(b"{\"a\":1}", 1_500, true, 10_000)).unwrap();
        assert!(stored.near());
        assert!(!Stored::of(entry(b"1", 1_500, false, 0)).unwrap().near());
        assert_eq!(stored.bytes(), b"{\"a\":1}");
        assert_eq!(stored.ttl_ms, 1_500);
        assert!(stored.is_fresh(11_499));
        assert!(!stored.is_fresh(11_500));
        let mut foreign = entry(b"x", 1_000, true, 0);
        foreign.body = Bytes::from_static(b"TRC1 not a value");
        assert!(Stored::of(foreign).is_none());
        let mut short = entry(b"", 1_000, true, 0);
        short.body = Bytes::from_static(b"TRD1");
        assert!(Stored::of(short).is_none());
    }

    /// A value stored now says that soft purges are written into it; one
    /// stored by an earlier version (the flag clear) does not; anything
    /// that is not a value is no question of marks.
    #[test]
    fn a_value_stored_now_carries_its_marks() {
        let mut stored = entry(b"{}", 1_000, false, 0);
        assert!(!lacks_its_marks(&stored));
        assert!(!may_live_near(&stored), "the near flag is kept");
        let mut earlier = stored.body.to_vec();
        earlier[12] &= !CARRIES_MARKS;
        stored.body = Bytes::from(earlier);
        assert!(lacks_its_marks(&stored));
        assert!(!may_live_near(&stored));
        stored.body = Bytes::from_static(b"TRC1 not a value");
        assert!(!lacks_its_marks(&stored));
    }

    /// A TTL longer than an entry can store (about 68 years) is stored as
    /// the longest one, and read back as no soft purge: the value is fresh.
    #[test]
    fn a_value_with_the_longest_ttl_is_fresh() {
        let stored = entry(b"1", u64::MAX, true, 10_000);
        let read = Entry::decode(&stored.encode()).unwrap();
        let value = Stored::of(read).unwrap();
        assert!(value.is_fresh(10_000 + 86_400_000));
    }

    #[test]
    fn a_soft_purge_makes_a_value_stale() {
        let mut e = entry(b"1", 60_000, true, 10_000);
        e.mark_stale_at(12_000);
        assert!(!Stored::of(e).unwrap().is_fresh(12_500));
    }

    /// A remembered hash is the hash of its own key: keys that differ in
    /// one byte, more keys than a thread remembers, a key too long to be
    /// remembered, read again in several rounds.
    #[test]
    fn a_remembered_hash_is_the_hash_made_anew() {
        let long = "k".repeat(MEMO_MAX_KEY_BYTES + 1);
        let mut keys: Vec<String> = (0..MEMO_SLOTS + 3)
            .map(|n| format!("product:{n}"))
            .collect();
        keys.extend([
            "product:1 ".to_owned(),
            "Product:1".to_owned(),
            long.clone(),
        ]);
        keys.push(format!("{long}x"));
        let made_anew = |key: &str| crate::key::hash_url(&url(key).unwrap());
        for round in 0..3 {
            // More keys than a thread remembers: each is hashed anew.
            for key in &keys {
                assert_eq!(
                    url_hash(key).unwrap(),
                    made_anew(key),
                    "{key} (round {round})"
                );
            }
            // A few keys read again and again: from the memo, beside keys
            // that differ from them in one byte or in case.
            let hits = MEMO_HITS.get();
            for _ in 0..3 {
                for key in ["product:1", "product:1 ", "Product:1", "product:10"] {
                    assert_eq!(
                        url_hash(key).unwrap(),
                        made_anew(key),
                        "{key} (round {round})"
                    );
                }
            }
            assert!(MEMO_HITS.get() - hits >= 8, "the memo is used");
        }
    }

    #[test]
    fn keys_are_bounded() {
        assert_eq!(url(""), Err(InvalidKey::Empty));
        assert!(matches!(
            url(&"k".repeat(2000)),
            Err(InvalidKey::TooLong(2000))
        ));
        assert_eq!(url("p:1").unwrap(), "//<data>/.data/p:1");
        assert_eq!(
            url_hash("p:1").unwrap(),
            crate::key::hash_url("//<data>/.data/p:1")
        );
        assert_eq!(url_hash(""), Err(InvalidKey::Empty));
    }
}
