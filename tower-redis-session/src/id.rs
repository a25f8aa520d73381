//! Session ids: 256 random bits from the OS, URL-safe in the cookie, and
//! never stored as such — Redis sees only their SHA-256.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use rand::TryRng;
use sha2::{Digest, Sha256};

/// Random bytes per id (256 bits; OWASP asks for at least 64 bits of entropy).
const ID_BYTES: usize = 32;
/// Length of an id in the cookie (base64url without padding).
const ID_LEN: usize = 43;
/// Length of a signature in the cookie.
const SIG_LEN: usize = 43;

/// A session id. Its `Debug` output is redacted: ids are credentials.
///
/// Held inline (its 43 base64url characters), as is its
/// [`StorageKey`]: reading a session allocates neither.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SessionId([u8; ID_LEN]);

/// What Redis and the local store know a session by: the SHA-256 of its
/// id, base64url without padding (43 characters), held inline. Reads as a
/// `&str`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct StorageKey([u8; ID_LEN]);

impl std::ops::Deref for StorageKey {
    type Target = str;

    fn deref(&self) -> &str {
        ascii(&self.0)
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// 32 bytes as base64url without padding.
fn encode_32(bytes: &[u8]) -> [u8; ID_LEN] {
    let mut out = [0u8; ID_LEN];
    // 32 bytes are always 43 characters: the slice fits.
    let _ = URL_SAFE_NO_PAD.encode_slice(bytes, &mut out);
    out
}

/// The text of base64url characters (ASCII: never fails).
fn ascii(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

impl SessionId {
    /// A fresh id from the operating system's CSPRNG.
    pub(crate) fn generate() -> Self {
        let mut bytes = [0u8; ID_BYTES];
        if rand::rngs::SysRng.try_fill_bytes(&mut bytes).is_err() {
            // The OS generator failed (practically never): the thread-local
            // CSPRNG, itself seeded from the OS, still gives 256 secure bits.
            rand::fill(&mut bytes);
        }
        Self(encode_32(&bytes))
    }

    /// The id's value as sent in the cookie.
    pub(crate) fn as_str(&self) -> &str {
        ascii(&self.0)
    }

    /// What Redis and the local store know the session by: SHA-256 of the id.
    pub(crate) fn storage_key(&self) -> StorageKey {
        StorageKey(encode_32(&Sha256::digest(self.0)))
    }

    /// Accepts only strings shaped like ids we issue.
    fn parse(value: &str) -> Option<Self> {
        let bytes: [u8; ID_LEN] = value.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            .then_some(Self(bytes))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionId(***)")
    }
}

/// Turns ids into cookie values and back, signing them when a key is set.
#[derive(Clone)]
pub(crate) struct CookieCodec {
    key: Option<Vec<u8>>,
}

impl fmt::Debug for CookieCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CookieCodec")
            .field("signed", &self.key.is_some())
            .finish()
    }
}

impl CookieCodec {
    pub(crate) fn new(key: Option<Vec<u8>>) -> Self {
        Self { key }
    }

    pub(crate) fn encode(&self, id: &SessionId) -> String {
        match &self.key {
            None => id.as_str().to_owned(),
            Some(key) => format!(
                "{}.{}",
                id.as_str(),
                URL_SAFE_NO_PAD.encode(sign(key, id.as_str()))
            ),
        }
    }

    /// The id in a cookie value, or `None` for anything malformed, oversized
    /// or tampered with (the caller then starts a fresh session).
    pub(crate) fn decode(&self, value: &str) -> Option<SessionId> {
        match &self.key {
            None => SessionId::parse(value),
            Some(key) => {
                if value.len() != ID_LEN + 1 + SIG_LEN {
                    return None;
                }
                let (id, signature) = value.split_once('.')?;
                let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
                let mut mac = mac(key);
                mac.update(id.as_bytes());
                // Constant-time comparison.
                mac.verify_slice(&signature).ok()?;
                SessionId::parse(id)
            }
        }
    }
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    match <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        Ok(mac) => mac,
        // HMAC takes keys of any length.
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    }
}

fn sign(key: &[u8], id: &str) -> Vec<u8> {
    let mut mac = mac(key);
    mac.update(id.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_256_bit_url_safe_and_distinct() {
        let a = SessionId::generate();
        let b = SessionId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), ID_LEN);
        assert!(SessionId::parse(a.as_str()).is_some());
    }

    #[test]
    fn storage_key_is_not_the_id() {
        let id = SessionId::generate();
        assert_ne!(&*id.storage_key(), id.as_str());
        assert_eq!(id.storage_key(), id.storage_key());
        assert!(!format!("{id:?}").contains(id.as_str()));
    }

    #[test]
    fn malformed_values_are_no_session() {
        let codec = CookieCodec::new(None);
        assert!(codec.decode("").is_none());
        assert!(codec.decode("short").is_none());
        assert!(codec.decode(&"a".repeat(5000)).is_none());
        assert!(codec.decode(&format!("{}!", "a".repeat(42))).is_none());
    }

    #[test]
    fn signed_values_round_trip_and_tampering_is_rejected() {
        let codec = CookieCodec::new(Some(b"0123456789abcdef0123456789abcdef".to_vec()));
        let id = SessionId::generate();
        let value = codec.encode(&id);
        assert_eq!(codec.decode(&value), Some(id));

        let mut tampered = value.clone().into_bytes();
        tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
        assert!(
            codec
                .decode(&String::from_utf8(tampered).unwrap())
                .is_none()
        );
        // An unsigned id is not accepted where signatures are required.
        assert!(codec.decode(id.as_str()).is_none());
        // Nor a signature made with another key.
        let other = CookieCodec::new(Some(b"another key, also long enough!!!".to_vec()));
        assert!(codec.decode(&other.encode(&id)).is_none());
    }
}
