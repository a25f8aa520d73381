//! The Redis side: a hash per URL (`vary` plus one field per variant),
//! read with one `HMGET` (or, the first time, one script) and written with
//! one script.

use std::sync::LazyLock;

use http::HeaderMap;
use tower_redis_core::RedisConnection;
use tower_redis_core::redis::{self, RedisResult, Script};

use super::Put;
use crate::entry::Entry;
use crate::key;

static LOOKUP: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lookup.lua")));
static PUT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("put.lua")));

/// Variants kept per URL before the URL's entries start over.
const MAX_VARIANTS: u32 = 32;

/// What Redis holds for a request.
pub(crate) enum Found {
    Entry(Entry),
    NoUrl,
    NoVariant,
    /// A value that does not decode: its field, for deletion.
    Corrupt(String),
}

/// Finds the variant a request selects, in one round trip.
///
/// With `vary_hint` (the URL's `Vary` names as last seen by this instance)
/// it is a plain `HMGET key vary <variant>`; only when there is no hint, or
/// the URL's `Vary` changed since, does the lookup script resolve the
/// variant inside Redis. Returns what was found and the `Vary` names seen.
pub(crate) async fn lookup(
    mut conn: RedisConnection,
    key: &str,
    request: &HeaderMap,
    extra: &str,
    vary_hint: Option<String>,
) -> RedisResult<(Found, Option<String>)> {
    if let Some(hint) = vary_hint {
        let field = key::variant(&hint, request, extra);
        let (vary, entry): (Option<String>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(key)
            .arg("vary")
            .arg(&field)
            .query_async(&mut conn)
            .await?;
        match vary {
            None => return Ok((Found::NoUrl, None)),
            Some(vary) if vary == hint => {
                return Ok((found(Some(vary.clone()), entry, field), Some(vary)));
            }
            // The URL's Vary changed since this instance saw it.
            Some(_) => {}
        }
    }
    let mut invocation = LOOKUP.key(key);
    invocation.arg(key::value_digest(extra));
    // Digests of the values, not the values: no cookie or credential is
    // sent to Redis.
    for name in request.keys() {
        if let Some(value) = key::joined(request, name.as_str()) {
            invocation.arg(name.as_str()).arg(key::value_digest(&value));
        }
    }
    let (vary, entry, field): (Option<String>, Option<Vec<u8>>, Option<String>) =
        invocation.invoke_async(&mut conn).await?;
    Ok((found(vary.clone(), entry, field.unwrap_or_default()), vary))
}

fn found(vary: Option<String>, entry: Option<Vec<u8>>, field: String) -> Found {
    match (vary, entry) {
        (None, _) => Found::NoUrl,
        (Some(_), None) => Found::NoVariant,
        (Some(_), Some(bytes)) => match Entry::decode(&bytes) {
            Ok(entry) => Found::Entry(entry),
            Err(_) => Found::Corrupt(field),
        },
    }
}

pub(crate) async fn put(mut conn: RedisConnection, key: &str, put: &Put) -> RedisResult<()> {
    let ttl = u64::try_from(put.keep_for.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    PUT.key(key)
        .arg(&put.vary)
        .arg(&put.variant)
        .arg(put.entry.encode())
        .arg(ttl)
        .arg(MAX_VARIANTS)
        .invoke_async(&mut conn)
        .await
}
