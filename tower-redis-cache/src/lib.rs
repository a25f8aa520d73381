//! An RFC 9111 shared HTTP cache as a tower `Layer`, stored in Redis through
//! [`tower_redis_core::RedisManager`], and kept alive in process while Redis
//! is down.
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, body::Body, routing::get};
//! use http::{Request, header};
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//! use tower_redis_cache::{CacheLayer, RedisManager, Route};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In an app: RedisManager::connect(RedisConfig::from_env()?).await?
//! // Here, no Redis: the cache runs on its in-process store.
//! let redis = RedisManager::disabled();
//! let cache = CacheLayer::builder(redis)
//!     .route(Route::new("/products/*").default_ttl(Duration::from_secs(60)))
//!     .route(Route::new("/account/*").bypass())
//!     .build()?;
//! let app = Router::new()
//!     .route("/products/{id}", get(|| async { "a product" }))
//!     .layer(cache.clone());
//!
//! let get_product = || Request::get("http://shop.example/products/1").body(Body::empty());
//! // First call: a miss, answered by the app and stored.
//! let first = app.clone().oneshot(get_product()?).await?;
//! let status = first.headers()[header::HeaderName::from_static("cache-status")].to_str()?;
//! assert!(status.starts_with("tower-redis; fwd=uri-miss; stored"), "{status}");
//! first.into_body().collect().await?;
//! cache.flush().await; // the entry is written once the body has been read
//!
//! // Second call: served from the cache, with its `Age`.
//! let second = app.oneshot(get_product()?).await?;
//! let status = second.headers()["cache-status"].to_str()?;
//! assert!(status.starts_with("tower-redis; hit; ttl="), "{status}");
//! assert!(second.headers().contains_key(header::AGE));
//! assert_eq!(second.into_body().collect().await?.to_bytes(), "a product");
//! # Ok(()) }
//! ```
//!
//! (Without Redis every `Cache-Status` also says `detail=redis-unavailable`.)
//!
//! # What it does
//!
//! - **Shared-cache rules of RFC 9111 by default**: only GET is stored (HEAD
//!   is answered from it); `no-store` and `private` are never stored;
//!   `no-cache` is stored and revalidated on every use; `s-maxage` over
//!   `max-age` over `Expires`; requests with `Authorization` are stored only
//!   with `public`, `s-maxage` or `must-revalidate`; `Set-Cookie` responses
//!   are not stored unless allowed; `Vary` selects among several variants of
//!   a URL, and `Vary: *` is never stored; `Age` is on every response served
//!   from the cache; request `no-cache`, `max-age`, `max-stale`, `min-fresh`
//!   and `only-if-cached` are honoured, or all ignored with
//!   [`RequestCacheControl::Ignore`] for clients you do not trust;
//!   heuristic freshness only when enabled. `CDN-Cache-Control` and a configurable targeted field
//!   (RFC 9213) take precedence over `Cache-Control` when they are valid
//!   Structured Field dictionaries. The corners are listed, each with its
//!   test, under [Conformance](#conformance).
//! - **Conditional requests**: `If-None-Match` / `If-Modified-Since` get a
//!   304 from the cache; stale entries are revalidated with their
//!   validators, and a 304 from the origin (or a 206 of the same
//!   representation) refreshes the stored headers.
//! - **Byte ranges**: one range of a stored `200` is answered `206` (or
//!   `416`) from the cache; with [`CacheLayerBuilder::forward_ranges`] a
//!   range miss is forwarded and a `206` stored as a partial entry, served
//!   to the ranges inside it and completed with range requests for the
//!   missing bytes (RFC 9111 §3.3, §3.4).
//! - **No poisoning through unkeyed headers**: the key's host comes from the
//!   request's authority (optionally checked against an allow list), never
//!   from `X-Forwarded-Host`; and a response to a request that carries such
//!   a header ([`DEFAULT_UNKEYED_HEADERS`]) is not stored. A request whose
//!   target authority (absolute form, HTTP/2 `:authority`) and `Host`
//!   disagree, or with several `Host` fields, is neither answered from the
//!   cache nor stored; nor is a GET or HEAD with a body (`Content-Length`
//!   other than 0, `Transfer-Encoding`, or an HTTP/2 stream that did not
//!   end with its headers), whose key could not include its body.
//! - **Invalidation**: a successful POST, PUT, PATCH or DELETE invalidates
//!   its URL and same-origin `Location` / `Content-Location`.
//! - **Bodies** of responses that may be stored are read from the origin at
//!   its pace, whatever the client's, and streamed to the client as they
//!   come: the entry is stored as soon as the origin has sent it, so a slow
//!   reader never holds back the requests coalesced on it nor
//!   [`CacheLayer::flush`]. Past `max_body_bytes` nothing is stored and the
//!   rest streams with ordinary backpressure; if the client goes away before
//!   the origin has sent the whole body, the origin body is dropped and
//!   nothing is stored.
//! - **`Cache-Status`** (RFC 9211) on every response it handles:
//!   `tower-redis; hit; ttl=42`, `tower-redis; fwd=uri-miss; stored`,
//!   `tower-redis; fwd=stale; fwd-status=304; stored`, plus
//!   `detail=redis-unavailable` while Redis is down. The header goes out
//!   before the body, so `stored` says the response was admitted for
//!   storing: its entry is written once the origin has sent the whole
//!   body, and is not when the body turns out longer than
//!   `max_body_bytes` (no `Content-Length` said so), the client leaves
//!   first, a purge made after the request began is newer, or the write
//!   fails.
//! - **Request coalescing** (on by default): concurrent misses for one URL
//!   make one origin call — the first request in a process leads and the
//!   others follow it; across instances the leaders race for a short fill
//!   lock in Redis and the losers wait for the winner's entry (woken by
//!   pub/sub, polling as a fallback) up to [`CacheLayerBuilder::coalesce`]'s
//!   wait, then go to the origin rather than hang. A holder that dies frees
//!   the lock when it expires ([`CacheLayerBuilder::lock_ttl`]). Followers
//!   answer `hit; detail=coalesced`. Revalidations are coalesced the same
//!   way: concurrent requests for a stale entry, or with `no-cache`, make
//!   one conditional origin request; when it fails, the followers that may
//!   serve `stale-if-error` do so without asking the origin again. A URL
//!   whose fill answered something the cache may not store (`private`,
//!   `no-store`, too large) is not coalesced for the next 10 s in that
//!   process: its misses go to the origin at once instead of queueing for
//!   an entry that never comes. A request whose own headers keep its answer
//!   out of the cache (an unkeyed header, `no-store`, `Authorization`)
//!   never causes that, and never leads a coalesced fill.
//! - **Stale serving** (RFC 5861): `stale-while-revalidate` serves a stale
//!   entry at once (`hit; fwd=stale; detail=stale-while-revalidate`) while
//!   exactly one background request — per instance and across instances —
//!   refreshes it; `stale-if-error` serves it when the origin errors,
//!   answers 500/502/503/504 or exceeds [`CacheLayerBuilder::origin_timeout`]
//!   (`detail=stale-if-error; fwd-status=503`). From the response's
//!   `Cache-Control`, else [`Route::stale_while_revalidate`] /
//!   [`Route::stale_if_error`]; never with `must-revalidate`,
//!   `proxy-revalidate` or `no-cache`; the route's windows never with
//!   `s-maxage`, which implies `proxy-revalidate` (RFC 9111 §5.2.2.10).
//! - **Tags and purges**: tags from `Surrogate-Key` / `Cache-Tag` response
//!   headers (removed before the client sees them), [`Route::tag`] and
//!   [`Route::tags_fn`]; [`CacheHandle`] purges by tag, URL, path prefix or
//!   everything, hard or soft (soft: marked stale, so stale-while-revalidate
//!   keeps serving while one request refreshes; the mark and the entries'
//!   response times both come from Redis' clock, so instances whose clocks
//!   disagree agree on what it made stale), warms URLs through the
//!   app, looks entries up and reports statistics; [`admin::CacheAdmin`]
//!   (feature `axum`) puts the same behind an authorisation check.
//!   Once a purge (by URL, path, tag or prefix, hard or soft) or an
//!   invalidation by an unsafe request has returned, the instance that
//!   made it does not answer the removed version again: a fill or
//!   revalidation that asked the origin before does not store after it,
//!   with the URL's fill lock or without (coalescing off, a follower that
//!   gave up waiting, a forwarded range). A removal leaves a tombstone,
//!   stamped with Redis' clock, for twelve fill lock lifetimes, at least
//!   2 s ([`CacheLayerBuilder::lock_ttl`]; 60 s by default), where the URL
//!   had anything stored, and a purge of one URL even where it had
//!   nothing; a fill sends how
//!   long ago it asked (a duration: instances' clocks need not agree), and
//!   its entry is dropped when a tombstone or soft-purge mark is newer
//!   than its question, less a second's margin for the write's way to
//!   Redis. Later requests do not follow that fill in process, and near
//!   copies its own lookups refilled meanwhile are dropped. The price: a
//!   fill without the lock that asks the origin less than a second after a
//!   purge of its URL is not stored either (the next request fills), nor
//!   is a fill without its lock (lost or never taken) that asked longer
//!   ago than a tombstone lives (a purge early in its question may have
//!   left a tombstone that is gone by then). A value stored with a
//!   shorter TTL keeps a tombstone's life. A purge by tag or of everything
//!   also leaves a mark in the index it reads (the tag's, or the root's,
//!   which names every URL), for a tombstone's life: a fill of a URL the
//!   index did not name yet (nothing stored: the first fill, or one after
//!   expiry) that asked before the mark finds it when it records its URL
//!   there. A fill holding its lock is judged by when Redis granted the
//!   lock, to the microsecond (a tie counts against the fill); one without
//!   it by its age, with the second's margin (so one that asks less than a
//!   second after the purge is not stored either).
//!   On one server (standalone, Sentinel) the record comes first in the
//!   fill's write and leaves the URL the tombstone the purge would have
//!   left, so the fill's answer is never stored. On a Redis Cluster the
//!   index may be on another node: the answer is stored, then the URL
//!   (every variant) deleted again one round trip later, and a request
//!   that waited for that fill (or polled meanwhile) may be answered it;
//!   there the lock's time and
//!   the mark's come from two nodes' clocks, compared as they are (a
//!   locked fill whose lock was granted within their skew before the purge
//!   may store). Not covered: a fill whose write takes more
//!   than that second to reach Redis; a prefix or path purge of a URL with
//!   nothing stored (a directory's index names more than the purge
//!   selects, so it leaves no mark), and a soft purge of one URL with
//!   nothing stored; a fill that still holds a lock it
//!   took longer ago than a tombstone lives (its origin outlived the lock,
//!   and nobody took it over) of a URL with nothing stored, against a tag
//!   purge; on a Cluster, a fill without its lock whose entry is written
//!   after a tag purge's deletes but whose index record ran before the
//!   purge's mark; while instances of an earlier version still write (their
//!   index records drop the marks); an invalidation of a URL with nothing stored (a client's unsafe
//!   request writes nothing to Redis then); a tag or prefix purge made
//!   during an outage, which is replayed without tombstones; the answer to
//!   a `POST` stored for `GET`s (`store_post`), which is newer than its own
//!   invalidation and is stored whatever came meanwhile; and lookups from
//!   replicas (`read_from_replicas`, which may lag). Each can store or show
//!   the old answer once, until its TTL or the next purge. The data cache's `remove` and purges hold the same
//!   way against its fills (from when the factory began), with the value's
//!   fill lock or without it (a caller that gave up waiting for another's).
//! - **Near cache** (opt-in, [`CacheLayerBuilder::near_cache`]): hot entries
//!   answered from process memory with no round trip (`detail=near`), kept
//!   exact by **Redis client tracking**: near-tier lookups are read on the
//!   manager's tracking connection, and Redis itself tells the instance
//!   when an entry it holds changes, is purged, expires or is deleted by any
//!   instance (no longer by the writers' own announcements, which went out
//!   in the write's pipeline and could be missed). Once another instance's
//!   change is acknowledged, a near copy is served only until this
//!   instance's tracking connection has read Redis' invalidation (sent
//!   before that acknowledgement); [`RedisManager::tracking`]'s `sync`
//!   waits for it. Not used while tracking or Redis is down; emptied when
//!   the tracking connection is lost or replaced, the breaker opens, the
//!   Sentinels switch the primary, or on `FLUSHALL`; each copy lives at
//!   most its TTL and the tier is bounded by bytes (beside it, each reading
//!   thread holds its own copies of the last 8 small URLs it read, served
//!   only while the tier has not changed since they were found current).
//!   A URL whose answers are not storable (a private page), once a lookup
//!   on the tracking connection found it absent from Redis (its second
//!   lookup: the first runs the script), is marked known absent: its
//!   lookups cost no round trip (`fwd=uri-miss; detail=near`) until any
//!   instance writes it (with coalescing on, its own fill lock too, which
//!   it takes again every 10 s), the near tier is emptied, or the near
//!   tier's TTL has passed; the marks are kept with the URLs' `Vary` hints.
//!   On a Redis Cluster, where tracking is off, it falls back to the
//!   pub/sub announcements (not used while that subscription is down,
//!   emptied when it reconnects), and marks nothing absent.
//!
//! # Features
//!
//! - `metrics`: counts requests by result with the `metrics` facade
//!   (`tower_redis_cache_requests_total{result, stored, degraded}`), plus
//!   the connection manager's breaker and fallback metrics.
//! - `axum`: [`admin::CacheAdmin`], an axum `Router` for purges, entry
//!   lookup, stats and warming behind an authorisation check.
//!
//! Everything a layer needs is re-exported here ([`RedisManager`],
//! [`RedisConfig`], [`Error`], [`Forwarding`]), so that this crate is the
//! only dependency to add.
//!
//! # Redis
//!
//! One round trip per lookup (none from the near cache), `Vary` resolution
//! included: a URL's variants live in one Redis hash. An instance that knows the URL's `Vary` names
//! reads the variant with one `HMGET`; on first sight a script picks the
//! variant from digests of the request's header values (and when the
//! `Vary` changed since, after the `HMGET`: two round trips, once). A URL
//! whose answer was not storable (a private page) is remembered as absent,
//! and read with one `HMGET` as well (none with the near cache, above). No cookie or credential is sent to Redis as such. Entries use a compact versioned binary format; a value that does
//! not decode is a miss and is deleted. While Redis is unavailable, a
//! bounded in-process store (moka, by bytes) keeps caching; when Redis is
//! back those entries are dropped and invalidations and purges made
//! meanwhile are replayed.
//!
//! | operation | round trips |
//! |---|---|
//! | hit | 1 `HMGET` (0 from the near cache, kept exact by Redis client tracking) |
//! | miss of a page never stored (private) | 1 `HMGET` (0 with the near cache, in steady state) |
//! | miss, coalescing off | 1 lookup + 1 write batch (entry, indexes, announcement) |
//! | miss, coalescing on | 1 lookup + 1 lock script + 1 write batch (lock released in it) |
//! | purge by tag / prefix | 1 index read + 1 batch per 500 URLs (+ 1 `ZREM` per page) |
//!
//! Tags and path prefixes are **indexes**: one sorted set per tag
//! (`ct:<tag>`) and per directory level of the path (`cx:/`, `cx:/products/`
//! … up to [`CacheLayerBuilder::prefix_index_depth`]), members the URLs,
//! scored by when their entry expires; every write prunes expired members,
//! so an index holds about as many members as there are live entries under
//! it and a purge costs O(entries under the tag or prefix). Every command
//! names a single key, so this works the same on Redis Cluster (where a
//! write batch is sent as concurrent commands to the slots' nodes instead
//! of one pipeline, and the announcements only once every write is
//! acknowledged: one more round trip of time, so that a subscriber never
//! hears of an update before it can read it). A URL that is re-stored
//! without a tag it had stays in that tag's index until its entry expires:
//! a purge of the old tag then removes it too (over-purging is a miss,
//! never a stale hit).
//!
//! # Conformance
//!
//! What the cache does of RFC 9111 (HTTP caching), RFC 9110 (semantics),
//! RFC 9213 (targeted fields) and RFC 5861 (stale serving), its default,
//! and the test (in `tests/`) that fails when it stops doing it. Not done:
//! serving a variant whose `Content-Language` satisfies a different
//! `Accept-Language` (it would need every variant read on a lookup: more
//! than one round trip); several ranges in one request (`bytes=0-1,5-6`:
//! the whole `200`); completing a partial entry for a request without
//! `Range` (it is forwarded whole and its answer replaces the partial
//! entry: a cache that asked the origin for the missing bytes on such a
//! request would have nothing correct to answer with when the origin's
//! part cannot be combined, short of a second request), or one without a
//! strong validator (forwarded); combining more than one
//! span per entry (a range apart from the stored span is forwarded and its
//! answer replaces it).
//!
//! | RFC section | behaviour | default | test |
//! |---|---|---|---|
//! | 9111 §3 | only `GET` is stored; a final status with explicit freshness, or heuristically cacheable with a route `default_ttl` | on | `cache::route_rules_bypass_and_default_ttl` |
//! | 9111 §3, §5.2.2.5, §5.2.2.7 | `no-store` and `private` responses are not stored | on | `cache::private_and_no_store_responses_are_never_stored` |
//! | 9111 §3 | `Set-Cookie` responses stored, the field kept | off ([`CacheLayerBuilder::store_set_cookie`]) | `cache::store_set_cookie_stores_answers_that_set_a_cookie` |
//! | 9111 §5.2.2.7, §5.2.2.4 | `private="Set-Cookie"` / `no-cache="Set-Cookie"`: stored without that field alone | with `store_set_cookie` | `conformance::store_set_cookie_keeps_the_field_unless_a_qualifier_names_it` |
//! | 9111 §3.5 | with `Authorization`: stored only with `public`, `s-maxage` or `must-revalidate` | on | unit `freshness::authorization_rule_of_section_3_5` |
//! | 9111 §4.1 | `Vary` selects a variant; `Vary: *` never stored | on | `cache::vary_keeps_one_variant_per_value` |
//! | 9111 §4.1 | selecting values compared without whitespace, lines combined, `Accept-Encoding` as a set of codings, `Accept-Language` as case-insensitive tags by weight | on | `conformance::vary_compares_normalised_selecting_values` |
//! | 9111 §4.2.1 | `s-maxage` over `max-age` over `Expires − Date` | on | unit `freshness::expires_and_date_and_invalid_expires` |
//! | 9111 §4.2.2 | heuristic freshness: 10% of the time since `Last-Modified`, capped | off ([`CacheLayerBuilder::heuristic_freshness`], cap a day) | `conformance::heuristic_freshness_is_opt_in_and_capped`, `cache::heuristic_freshness_makes_a_last_modified_answer_fresh` |
//! | 9111 §4.2.3, §5.1 | `Age` on every answer from the cache, counting the origin's `Age` and delays | on | `cache::a_fresh_response_is_served_from_redis_with_age_and_cache_status` |
//! | 9111 §5.1 | an `Age` whose first member is not a delta-seconds makes the response stale | on | `conformance::invalid_age_makes_the_response_stale` |
//! | 9111 §5.3, 9110 §5.6.7 | `Expires` (and every date) read in IMF, RFC 850 or asctime format, any case; an invalid one means already expired | on | `conformance::expires_is_read_leniently_and_invalid_means_expired` |
//! | 9111 §4.3.1–§4.3.4 | stale entries revalidated with their validators; a 304 updates the stored fields | on | `cache::a_stale_entry_is_revalidated_and_a_304_refreshes_its_headers` |
//! | 9111 §4.3.2, 9110 §13.1.2 | `If-None-Match` answered 304 from a fresh entry | on | `cache::if_none_match_is_answered_with_304_from_the_cache` |
//! | 9111 §4.3.2, 9110 §13.1.3 | `If-Modified-Since` against `Last-Modified`, else the entry's `Date` | on | `conformance::if_modified_since_is_evaluated_against_date_without_last_modified` |
//! | 9111 §4.4 | a successful unsafe request invalidates its URL, `Location` and `Content-Location` | on | `cache::a_successful_post_invalidates_the_url` |
//! | 9110 §9.3.3, 9111 §4.4 | a `200`/`203` `POST` answer whose `Content-Location` is its own URL, with explicit freshness, no `Set-Cookie` and no `Vary` on a body field, stored for later `GET`s | off ([`CacheLayerBuilder::store_post`]) | `conformance::post_answers_naming_their_own_url_are_stored_for_gets`, `forwarding::a_post_answer_behind_a_trusted_proxy_is_stored_under_the_reported_host` |
//! | 9111 §5.2.1 | request `no-cache`, `max-age`, `max-stale`, `min-fresh`, `only-if-cached` | honoured ([`RequestCacheControl`]) | `cache::request_directives_are_honoured`, `attacks::request_cache_directives_can_be_ignored` |
//! | 9111 §5.2.2.3 | `must-understand`: stored when the status is understood, whatever `no-store` says; not stored otherwise | on | `conformance::must_understand_stores_no_store_responses_with_an_understood_status` |
//! | 9111 §5.2.2.4 | `no-cache` responses stored (with a validator) and revalidated on every use | on | `conformance::no_cache_responses_are_stored_and_revalidated_on_every_use` |
//! | 9111 §5.2.2.10, §4.2.4 | `s-maxage` implies `proxy-revalidate`: no route stale window and no `max-stale` serves it stale | on | `conformance::s_maxage_forbids_serving_stale_through_route_windows` |
//! | 9213 §2.1 | `CDN-Cache-Control` (and [`CacheLayerBuilder::targeted_field`]) over `Cache-Control` | on | `cache::a_targeted_field_overrides_cache_control` |
//! | 9213 §2.1 | a targeted field that is not a valid Structured Field dictionary, or has a known directive of the wrong type, is ignored entirely | on | `conformance::cdn_cache_control_that_is_not_a_valid_dictionary_is_ignored` |
//! | 5861 §3 | `stale-while-revalidate`: served stale while one request refreshes | on | `features::stale_while_revalidate_serves_stale_at_once_and_refreshes_once` |
//! | 5861 §4 | `stale-if-error`: served stale when the origin fails or times out | on | `features::stale_if_error_serves_the_stale_entry_when_the_origin_answers_503` |
//! | 9211 | `Cache-Status` on every answer the cache handles | on | `cache::a_fresh_response_is_served_from_redis_with_age_and_cache_status` |
//! | 9110 §14.1.2, §14.4; 9111 §3.4 | one byte range (`a-b`, `a-`, `-n`) of a complete `200` answered `206` with `Content-Range`, from the stored body on a hit, cut from the whole response (asked of the origin without `Range`, and stored) on a miss; `Accept-Ranges: bytes` on answers from the cache | on | `conformance::byte_ranges_are_served_from_a_stored_complete_response`, `conformance::a_range_on_a_miss_still_stores_the_whole_streamed_response` |
//! | 9110 §14.1.1, §15.5.17 | a range that does not overlap the representation: `416` with `Content-Range: bytes */<length>` | on | `conformance::unsatisfiable_ranges_are_answered_416_with_the_length` |
//! | 9110 §14.2 | several ranges, another unit or an invalid `Range`: the whole `200`; `HEAD` ignores `Range` | on | `conformance::several_or_invalid_ranges_are_answered_with_the_whole_response` |
//! | 9110 §13.1.5 | `If-Range`: the range only on a strong `ETag` match or the exact, strong `Last-Modified`; else the whole `200` | on | `conformance::if_range_serves_the_range_only_on_a_strong_match` |
//! | 9111 §3.4 | a range hit is one round trip (the whole entry is read: the body is not laid out for partial reads) | on | `conformance::a_range_hit_is_one_round_trip` |
//! | 9111 §3.3 | a range miss forwarded with its `Range`; a `206` with one `Content-Range: bytes a-b/N` and a strong `ETag` or none stored as a partial entry; ranges inside its span served from it (`206`, one round trip: the entry holds only the span), past the end `416`; a request without `Range` never served from it (`Cache-Status: fwd=partial`) | off ([`CacheLayerBuilder::forward_ranges`]) | `conformance::partial_responses_are_stored_and_serve_the_ranges_inside_them` |
//! | 9111 §3.4 | a range reaching past a partial entry completed with a range request for the missing bytes, `If-Range` the stored strong `ETag`; combined and stored with the new fields, a complete `200` once it covers `0..N` | on, once a partial entry exists | `conformance::a_partial_response_is_completed_with_a_range_request_for_the_missing_bytes` |
//! | 9111 §3.4, 9110 §8.8.2.2 | without an `ETag`, a `Last-Modified` at least 60 s before the entry's `Date` is its strong validator: sent in `If-Range`, and parts combined only under the same date and the same `Content-Type` and `Content-Encoding` (two versions of a file can share a date); a weak one is never completed | on, once a partial entry exists | `conformance::a_partial_response_without_etag_is_completed_under_a_strong_last_modified` |
//! | 9111 §3.4 | ranges from different validators never combined: another `206` replaces the partial entry and is passed on as it is, a `200` is stored whole | on | `conformance::ranges_with_different_validators_are_never_combined` |
//! | 9111 §3.4, §4.3.4 | a `206` of a stored complete response (same strong `ETag` and length) updates its fields but `Content-Range`, `Content-Length` and a `multipart/byteranges` `Content-Type`, and keeps the others | on | `conformance::a_stored_response_takes_the_fields_of_a_206_of_the_same_representation` |
//! | 9111 §3.3, §4 | a forwarded range neither leads nor follows a whole-response flight; a partial entry never replaces a fresh complete one; partial entries kept in process while Redis is down; one variant among a URL's (`Vary`), tagged and purged like any entry, stored only within `max_body_bytes` | on | `conformance::a_forwarded_range_never_joins_a_whole_response_flight`, `conformance::partial_entries_are_kept_in_process_while_redis_is_down`, `conformance::partial_entries_follow_vary_tags_purges_and_the_size_limit` |
//! | 9110 §15.2; 9111 §3 | interim (1xx) responses passed on, never stored, none of their fields in a stored final response (the proxy example cannot forward them: see its docs) | on | `conformance::interim_responses_are_passed_on_and_never_stored` |
//!
//! # Cache-aside: the data cache
//!
//! The layer caches whole responses. [`data::DataCache`] caches the data
//! behind them — a database row, a computed aggregate, a remote API call —
//! as typed values (`T: Serialize + DeserializeOwned`, serde_json by
//! default, any [`data::Codec`]), with `get_or_insert_with(key, &options,
//! factory)`, `get`, `insert` and `remove`. It is built on the same store:
//! a value is an entry under a key URL of its own (`//<data>/.data/<key>`,
//! under the manager's key prefix), so it has the same round trips (a hit
//! is one `HGET`, none from the near tier), the same fill locks
//! (concurrent misses on every instance make one factory call), the same
//! in-process fallback while Redis is down, and the same tag indexes: one
//! [`CacheHandle::purge_tag`] removes the pages *and* the values of a tag,
//! on every instance, near tiers included. On top of the store it adds
//! what a function call needs and an HTTP response does not: fail-safe
//! (serve the expired value when the factory fails or times out), soft
//! and hard factory timeouts with background completion, and eager
//! refresh.
//!
//! | | HTTP cache ([`CacheLayer`]) | data cache ([`data::DataCache`]) |
//! |---|---|---|
//! | caches | whole responses, by URL and `Vary` | typed values, by a key you choose |
//! | freshness | the origin's `Cache-Control` (RFC 9111), route defaults | [`data::DataOptions::ttl`] |
//! | when the source fails | `stale-if-error` | fail-safe window, soft/hard timeouts |
//! | refresh | `stale-while-revalidate`, revalidation with validators | eager refresh at a fraction of the TTL |
//! | tags, purges, coalescing, near tier, outage fallback | shared | shared |
//!
//! Use the layer when a whole response can be reused as is (public pages,
//! API answers that are the same for everyone who may see them). Use the
//! data cache when the response cannot be (it is personalised, or
//! assembled from several sources) but the data behind it can, or for
//! work outside HTTP handlers. Both together: tag the page and the value
//! with the same tag, and one purge after a write drops both. The demo
//! server (`examples/server.rs`) does exactly that: its product pages are
//! cached by the layer, the product read behind them by
//! `get_or_insert_with` under `product:<id>`, both tagged `product-<id>`,
//! so a page purged on its own is rebuilt without the database read and a
//! `PUT`'s one `purge_tag` drops both.
//!
//! What each costs (the `cache` and `data` suites of `benches/`): a page
//! hit is one Redis round trip and no origin call; a data hit is one
//! `HGET` plus decoding the value (the `data` suite compares it with a
//! bare redis-rs `GET` + serde decode), none from the near tier; a data
//! miss adds the fill lock and the entry's metadata to the factory.
//! Reads that arrive while another is in flight share a round trip (data
//! hits' `HGET`s, and page lookups' `HMGET`s once this instance knows the
//! URL's `Vary`): they are sent together, one command each in one
//! pipeline, and a read alone is sent as it comes
//! ([`tower_redis_core::sync::Gather`]). The operation histogram then
//! times the pipeline once, as `PIPELINE`, and only the read that sent it
//! has the `redis` span. A read whose request is cancelled after its
//! pipeline was sent does not take the others' answers with it: the
//! pipeline's call goes on. On a Redis Cluster, and while Redis is
//! unavailable, every read goes alone. So does the lookup of a URL whose
//! entry this instance has seen larger than 8 KiB (stored it so, or read
//! one of its variants so: the mark covers every variant of the URL, and
//! only storing a smaller entry clears it), and the read of a data value
//! last seen larger than 8 KiB. The first read of a large entry is
//! gathered as any other. Large replies read faster each on its own than
//! waiting in one pipeline's buffer (the `cache` suite's 64 KiB and 1 MiB
//! rows).
//!
//! **During a rolling upgrade.** So that a data hit is one `HGET`, a soft
//! purge writes its mark into each data value it reaches, and a hit reads
//! only the value. Values stored by instances that predate this lack a flag
//! that newer values carry in their envelope, and are still read with the
//! URL's own soft-purge mark.
//! The other way round is not covered: a soft purge run by an older
//! instance marks only the URL, so the newer instances serve the values
//! they stored as fresh until their TTL ends or they are written again.
//! Hard purges, `remove` and writes are not affected. Finish the rollout
//! before soft-purging data values, or hard-purge while it runs.
//!
//! ```
//! # #![recursion_limit = "256"]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tower_redis_cache::CacheLayer;
//! use tower_redis_cache::data::DataOptions;
//! use tower_redis_core::RedisManager;
//!
//! // `disabled()`: no Redis, the in-process store only (development, tests).
//! let cache = CacheLayer::builder(RedisManager::disabled()).build()?;
//! let data = cache.handle().data();
//! let options = DataOptions::new(Duration::from_secs(60))
//!     .tag("product-42")
//!     .fail_safe(Duration::from_secs(3600));
//! let name: String = data
//!     .get_or_insert_with("product:42:name", &options, || async {
//!         Ok::<_, std::io::Error>("desk lamp".to_owned()) // the database read
//!     })
//!     .await?;
//! assert_eq!(name, "desk lamp");
//! assert_eq!(data.get::<String>("product:42:name").await?.as_deref(), Some("desk lamp"));
//! // After a write: one purge drops the value and every page tagged so.
//! cache.handle().purge_tag("product-42").await;
//! assert_eq!(data.get::<String>("product:42:name").await?, None);
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod admin;
mod body;
mod bus;
pub mod data;
mod directives;
mod entry;
mod freshness;
mod handle;
mod key;
mod layer;
#[cfg(test)]
mod proptests;
mod route;
mod service;
mod store;

pub use body::CacheBody;
pub use data::{DataCache, DataOptions};
pub use handle::{CacheHandle, EntryInfo, InvalidUrl, Purged, Stats, Warmed};
pub use layer::{CacheLayer, CacheLayerBuilder, ConfigError, DEFAULT_UNKEYED_HEADERS};
pub use route::Route;
pub use service::RequestCacheControl;
pub use service::{Cache, ResponseFuture};
pub use tower_redis_core::forwarding::{Forwarding, ForwardingHeader};

// One dependency line is enough: what building this layer needs from
// `tower-redis-core`, under the same names.
/// The whole core crate, for what the names above do not cover (its
/// `testing` harness, `degrade`, `keys`, `redis`).
pub use tower_redis_core;
/// The connection manager's invalid-configuration error
/// ([`tower_redis_core::ConfigError`]), returned by [`RedisConfig::from_env`]
/// and [`RedisConfigBuilder::build`].
pub use tower_redis_core::ConfigError as RedisConfigError;
pub use tower_redis_core::{
    BreakerState, Error, Health, RedisConfig, RedisConfigBuilder, RedisManager,
};

/// The crate README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
