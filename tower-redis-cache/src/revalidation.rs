//! Revalidations coalesced the way misses are: a stale entry (or a fresh
//! one that a request's `no-cache` or `max-age` refuses) is revalidated by
//! one request per instance (an in-process flight) and across instances
//! (the URL's Redis lock); the others wait for its result, up to the
//! coalescing wait. Without this, every request for a stale entry, and
//! every `no-cache` request any client sends, is an origin request.
//!
//! A follower is answered with the entry its leader stored, or with an
//! entry stored since its own lookup (a newer response than the one it
//! found: it was fetched from the origin after this request arrived, which
//! is what `no-cache` asks for). When the origin fails while the leader
//! revalidates, followers whose own request allows `stale-if-error` serve
//! their stale entry instead of asking the failing origin again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;

use crate::body::CacheBody;
use crate::coalesce::{self, Joined, Outcome};
use crate::entry::Entry;
use crate::key;
use crate::layer::Config;
use crate::request;
use crate::service::{CacheStatus, Fill, Keyed, revalidate, serve_coalesced, serve_stale_if_error};
use crate::store::{LockAttempt, LockPurpose, Lookup, Tier};

/// A revalidation to make, or to wait for.
pub(crate) struct Revalidation {
    /// The entry found, which the origin is asked to validate.
    pub(crate) entry: Entry,
    pub(crate) status: CacheStatus,
    /// The request allows serving the entry if the origin fails.
    pub(crate) stale_if_error: bool,
    pub(crate) max_wait: Duration,
}

pub(crate) async fn coalesced<S, ReqBody, ResBody>(
    config: &Arc<Config>,
    inner: S,
    request: Request<ReqBody>,
    keyed: &Keyed,
    revalidation: Revalidation,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let Revalidation {
        entry,
        status,
        stale_if_error,
        max_wait,
    } = revalidation;
    let store = &config.store;
    let deadline = Instant::now() + max_wait;
    let found_at = entry.response_time_ms;
    let flight_key = format!("v:{}", keyed.flight_key());
    let joined = if !request::may_lead(config, &keyed.parts, &keyed.directives) {
        config.flights.follow(&flight_key).map(Joined::Follower)
    } else {
        Some(config.flights.join(&flight_key))
    };
    let guard = match joined {
        None => {
            let fill = Fill::none();
            return revalidate(
                config,
                inner,
                request,
                entry,
                keyed,
                status,
                stale_if_error,
                fill,
            )
            .await;
        }
        Some(Joined::Follower(flight)) => {
            match tokio::time::timeout_at(deadline, coalesce::wait(flight)).await {
                Ok(Outcome::Done(Some(shared))) => {
                    return Ok(serve_coalesced(config, &shared, keyed, Tier::Redis));
                }
                Ok(Outcome::OriginFailed(fwd_status)) if stale_if_error => {
                    return Ok(serve_stale_if_error(
                        config,
                        &entry,
                        &keyed.parts,
                        status.tier,
                        fwd_status,
                    ));
                }
                _ => {}
            }
            // Nothing shared (a `Vary`, a refusal, a timeout): an entry
            // stored since this request's lookup will do, else revalidate.
            if let Some((newer, tier)) = newer_entry(config, keyed, found_at).await {
                return Ok(serve_coalesced(config, &newer, keyed, tier));
            }
            let fill = Fill::none();
            return revalidate(
                config,
                inner,
                request,
                entry,
                keyed,
                status,
                stale_if_error,
                fill,
            )
            .await;
        }
        Some(Joined::Leader(guard)) => guard,
    };
    let mut poll = Duration::from_millis(10);
    let mut seen_filled = false;
    let lock = loop {
        let variant = store.known_variant(&keyed.url_hash, &keyed.parts.headers, &keyed.extra);
        let updated = store.bus.updated();
        match store
            .try_lock(
                &keyed.url_hash,
                variant.as_deref(),
                LockPurpose::Refresh(found_at),
            )
            .await
        {
            LockAttempt::Acquired(lock) => break Some(lock),
            LockAttempt::Unavailable => break None,
            attempt @ (LockAttempt::Held | LockAttempt::Filled) => {
                // Another instance revalidates (or just did): wait for its
                // announcement (or poll, in case it is lost), look again.
                let now = Instant::now();
                if now >= deadline {
                    tracing::debug!(target: "tower_redis_cache", "coalescing wait exceeded; revalidating");
                    break None;
                }
                // An entry just stored is looked up at once, the first time.
                if matches!(attempt, LockAttempt::Held) || seen_filled {
                    let _ = tokio::time::timeout_at(deadline.min(now + poll), updated).await;
                    poll = (poll * 2).min(Duration::from_millis(250));
                }
                seen_filled |= matches!(attempt, LockAttempt::Filled);
                if let Some((newer, tier)) = newer_entry(config, keyed, found_at).await {
                    let shared = key::vary_names(&newer.headers)
                        .unwrap_or_default()
                        .is_empty()
                        .then(|| Arc::new(newer.clone()));
                    guard.complete(shared);
                    return Ok(serve_coalesced(config, &newer, keyed, tier));
                }
            }
        }
    };
    let fill = Fill {
        guard: Some(guard),
        lock,
    };
    revalidate(
        config,
        inner,
        request,
        entry,
        keyed,
        status,
        stale_if_error,
        fill,
    )
    .await
}

/// The entry the request selects, when it was stored after the one the
/// request found (stored at `found_at`): a response the origin gave after
/// this request's lookup.
async fn newer_entry(config: &Config, keyed: &Keyed, found_at: u64) -> Option<(Entry, Tier)> {
    match config
        .store
        .lookup(&keyed.url_hash, &keyed.parts.headers, &keyed.extra)
        .await
    {
        (Lookup::Hit(entry), tier) if entry.response_time_ms > found_at => Some((entry, tier)),
        _ => None,
    }
}
