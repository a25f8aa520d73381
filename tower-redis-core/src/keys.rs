//! Key names: the app's prefix, cluster hash tags, and escaping of
//! user-controlled parts.
//!
//! Every key is `prefix:part:part…`. A part is escaped so that no input can
//! forge another key's shape: `%`, `:`, `{`, `}`, glob characters, spaces
//! and control characters are percent-encoded, which keeps the mapping from
//! parts to keys one-to-one. A hash-tagged key is `prefix:{tag}:part…`; Redis
//! Cluster hashes only `tag`, so all keys with the same tag live in one slot
//! and a multi-key script on them is legal.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;

/// Builds the keys of one app.
///
/// ```
/// use tower_redis_core::Keyspace;
///
/// let keys = Keyspace::new("shop");
/// assert_eq!(keys.key(&["cache", "/products/1"]), "shop:cache:/products/1");
/// // Separators and braces in user input cannot change the key's structure.
/// assert_eq!(keys.key(&["rl", "a:b{c}"]), "shop:rl:a%3Ab%7Bc%7D");
/// // Keys that share a tag share a cluster slot.
/// assert_eq!(keys.tagged("user:42", &["sess"]), "shop:{user%3A42}:sess");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    prefix: Arc<str>,
}

impl Keyspace {
    /// A keyspace under `prefix` (validated by [`RedisConfig`](crate::RedisConfig)).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix, without a trailing separator.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `prefix:part:part…`, each part escaped.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut key = String::with_capacity(
            self.prefix.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>(),
        );
        key.push_str(&self.prefix);
        for part in parts {
            key.push(':');
            key.push_str(&escape_key_part(part));
        }
        key
    }

    /// `prefix:{tag}:part…`: every key with the same tag is in one cluster slot.
    pub fn tagged(&self, tag: &str, parts: &[&str]) -> String {
        let mut key = String::with_capacity(
            self.prefix.len() + tag.len() + 4 + parts.iter().map(|p| p.len() + 1).sum::<usize>(),
        );
        self.tagged_into(&mut key, tag, parts);
        key
    }

    /// [`tagged`](Self::tagged), appended to `key`: a lookup that only
    /// needs the key for a moment writes it into a buffer it reuses.
    ///
    /// ```
    /// use tower_redis_core::Keyspace;
    ///
    /// let mut key = String::new();
    /// Keyspace::new("shop").tagged_into(&mut key, "user:42", &["sess"]);
    /// assert_eq!(key, "shop:{user%3A42}:sess");
    /// ```
    pub fn tagged_into(&self, key: &mut String, tag: &str, parts: &[&str]) {
        key.push_str(&self.prefix);
        key.push_str(":{");
        key.push_str(&escape_key_part(tag));
        key.push('}');
        for part in parts {
            key.push(':');
            key.push_str(&escape_key_part(part));
        }
    }

    /// A `SCAN MATCH` pattern for every key under `prefix:part:part…:`.
    pub fn pattern(&self, parts: &[&str]) -> String {
        let mut pattern = self.key(parts);
        pattern.push_str(":*");
        pattern
    }
}

/// Percent-encodes the characters that would let a key part change a key's
/// structure (separators, hash-tag braces, glob characters, whitespace,
/// control characters and `%` itself). Everything else is kept as is.
pub fn escape_key_part(part: &str) -> Cow<'_, str> {
    // The usual part (an id, a hash, a path) is ASCII that needs nothing:
    // one table lookup per byte, without decoding characters.
    if part.bytes().all(|b| KEPT_AS_IS[usize::from(b)]) {
        return Cow::Borrowed(part);
    }
    if !part.chars().any(needs_escape) {
        return Cow::Borrowed(part);
    }
    let mut escaped = String::with_capacity(part.len() + 8);
    for c in part.chars() {
        if needs_escape(c) {
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                // Writing to a String cannot fail.
                let _ = write!(escaped, "%{byte:02X}");
            }
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

/// The bytes [`needs_escape`] keeps as they are, among ASCII: printable,
/// not a space and not one of the structural characters. Every byte of a
/// multi-byte character is absent (those are decided by character).
static KEPT_AS_IS: [bool; 256] = {
    let mut kept = [false; 256];
    let mut b = 0x21;
    while b < 0x7F {
        kept[b] = !matches!(
            b as u8,
            b'%' | b':' | b'{' | b'}' | b'*' | b'?' | b'[' | b']' | b'\\'
        );
        b += 1;
    }
    kept
};

fn needs_escape(c: char) -> bool {
    matches!(c, '%' | ':' | '{' | '}' | '*' | '?' | '[' | ']' | '\\')
        || c.is_whitespace()
        || c.is_control()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte table agrees with the character rule on every ASCII
    /// character (and leaves every other byte to it).
    #[test]
    fn the_ascii_table_is_the_character_rule() {
        for b in 0u8..=255 {
            let by_table = KEPT_AS_IS[usize::from(b)];
            if b.is_ascii() {
                assert_eq!(by_table, !needs_escape(char::from(b)), "byte {b:#04x}");
            } else {
                assert!(!by_table, "byte {b:#04x}");
            }
        }
    }

    #[test]
    fn plain_parts_are_kept() {
        assert_eq!(escape_key_part("user-42.session_x"), "user-42.session_x");
        assert!(matches!(escape_key_part("abc"), Cow::Borrowed(_)));
    }

    #[test]
    fn structural_characters_are_escaped_injectively() {
        assert_eq!(escape_key_part("a:b"), "a%3Ab");
        assert_eq!(escape_key_part("%3A"), "%253A");
        assert_eq!(escape_key_part("x\r\ny"), "x%0D%0Ay");
        assert_eq!(escape_key_part("*"), "%2A");
        assert_ne!(escape_key_part("a:b"), escape_key_part("a%3Ab"));
    }

    #[test]
    fn tag_with_closing_brace_cannot_end_the_tag_early() {
        let keys = Keyspace::new("app");
        let key = keys.tagged("evil}x", &["k"]);
        let open = key.find('{').unwrap();
        let close = key[open..].find('}').unwrap() + open;
        assert_eq!(&key[open + 1..close], "evil%7Dx");
    }

    #[test]
    fn pattern_matches_children_only() {
        assert_eq!(Keyspace::new("p").pattern(&["cache"]), "p:cache:*");
    }
}
