//! Nothing usable was found: forward the request and store the answer.
//! With coalescing, one request per instance leads (the others follow it
//! in process) and, among the instances' leaders, the one that takes the
//! Redis fill lock goes to the origin while the others wait for its entry.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use tokio::time::Instant;

use super::cache_status::CacheStatus;
use super::coalesce::{self, FlightGuard, Joined, Outcome};
use super::hit::{gateway_timeout, serve_coalesced, usable_by_follower};
use super::range::RangeRequest;
use super::request;
use super::storing;
use super::{Answer, Ctx, Exchange, Origin, OriginBody};
use crate::key;
use crate::layer::Config;
use crate::store::{LockAttempt, LockPurpose, LockToken, Lookup, Tier};

/// What a request that fills an entry holds: its in-process flight (the
/// followers waiting for it) and the Redis fill lock, both released once
/// the entry is stored or given up.
pub(crate) struct Fill {
    pub(crate) guard: Option<FlightGuard>,
    pub(crate) lock: Option<LockToken>,
    /// The answer to this instance's own unsafe request (a `POST` stored
    /// for `GET`s): it states the URL after its own invalidation, which it
    /// therefore does not give way to, as a fill gives way to a purge made
    /// after it asked the origin (`put.lua`).
    pub(crate) own_write: bool,
    /// Redis failed this request (its lookup, or a look while it waited
    /// for another's fill, fell back while Redis hangs: `waited_in_vain`):
    /// it has waited for Redis as long as a request may, and its entry is
    /// stored without asking Redis again ([`CacheStore::put_caught_up`]).
    ///
    /// [`CacheStore::put_caught_up`]: crate::store::CacheStore::put_caught_up
    pub(crate) waited: bool,
}

impl Fill {
    pub(crate) fn none() -> Self {
        Self {
            guard: None,
            lock: None,
            own_write: false,
            waited: false,
        }
    }

    /// The fill of a request that leads this instance's flight (`guard`),
    /// or none, without the Redis lock; `waited`: see [`Fill::waited`].
    pub(crate) fn unlocked(guard: Option<FlightGuard>, waited: bool) -> Self {
        Self {
            guard,
            waited,
            ..Self::none()
        }
    }

    /// For the answer to an unsafe request of this instance's.
    pub(crate) fn own_write() -> Self {
        Self {
            own_write: true,
            ..Self::none()
        }
    }

    /// Whether this request leads a fill others wait for: in this process
    /// (a flight) or across instances (the Redis lock).
    pub(crate) fn leads(&self) -> bool {
        self.guard.is_some() || self.lock.is_some()
    }

    /// Gives up because the origin failed (an error, or `status`): the
    /// in-process followers hear so at once, then the lock is released.
    pub(crate) fn fail(mut self, ctx: &Ctx, status: Option<StatusCode>) {
        if let Some(guard) = self.guard.take() {
            guard.fail(status);
        }
        self.release(ctx);
    }

    /// Gives up without an entry: releases the lock (waking the other
    /// instances' waiters) and ends the flight.
    pub(crate) fn release(self, ctx: &Ctx) {
        self.release_for(&ctx.config, &ctx.keyed.key.url_hash);
    }

    /// [`release`](Self::release), for a fill of `url_hash`.
    pub(crate) fn release_for(self, config: &Config, url_hash: &str) {
        if let Some(lock) = self.lock {
            let store = Arc::clone(&config.store);
            let url_hash = url_hash.to_owned();
            let guard = self.guard;
            let in_flight = config.store.start_store();
            tokio::spawn(async move {
                store.unlock(lock, &url_hash).await;
                drop(guard);
                drop(in_flight);
            });
        }
    }
}

impl Ctx {
    /// How long requests may wait for a fill or a revalidation another
    /// request makes for them, when they may be coalesced at all: GET only,
    /// and not on a URL whose last coalesced answer was not storable.
    pub(crate) fn coalescing(&self) -> Option<Duration> {
        self.config
            .coalesce
            .filter(|_| self.keyed.parts.method == Method::GET)
            .filter(|_| {
                !self
                    .config
                    .uncacheable
                    .contains_key(&*self.keyed.flight_key())
            })
    }

    /// Joins the flight on `flight_key`: as its leader or a follower, or,
    /// for a request that may not lead and finds no flight, not at all.
    pub(crate) fn join_flight(&self, flight_key: &str) -> Option<Joined> {
        let Ctx { config, keyed } = self;
        if request::may_lead(config, &keyed.parts, &keyed.key.directives) {
            Some(config.store.flights.join(flight_key, &keyed.key.url_hash))
        } else {
            config
                .store
                .flights
                .follow(flight_key, &keyed.key.url_hash)
                .map(Joined::Follower)
        }
    }
}

impl<S, ReqBody, ResBody> Exchange<S, ReqBody, ResBody>
where
    S: Origin<ReqBody, ResBody>,
    ReqBody: Send + 'static,
    ResBody: OriginBody,
{
    /// Counts a miss; an `only-if-cached` request gets its `504` here
    /// (RFC 9111 §5.2.1.7).
    pub(super) fn count_miss(
        &self,
        tier: Tier,
    ) -> Option<http::Response<crate::body::CacheBody<ResBody>>> {
        self.ctx
            .config
            .store
            .counters
            .misses
            .fetch_add(1, Ordering::Relaxed);
        self.ctx
            .keyed
            .key
            .directives
            .only_if_cached
            .then(|| gateway_timeout(tier))
    }

    /// Nothing usable was found (`reason`: `uri-miss` or `vary-miss`).
    ///
    /// A plain function: what to do is decided here, and the future it
    /// returns is the chosen path's own, boxed on its own. As an `async fn`
    /// it held the exchange beside the boxed path it awaited, in a box of
    /// its own (about 1.3 KB around an axum app), and the path's box
    /// (another 1.3 KB) held it again: two blocks per miss larger than the
    /// allocator's per-thread cache takes (1,032 bytes).
    pub(super) fn on_miss(
        mut self,
        reason: &'static str,
        tier: Tier,
        wanted: Option<&RangeRequest>,
    ) -> impl Future<Output = Answer<ResBody, S::Error>> + use<S, ReqBody, ResBody> {
        use futures_util::future::{Either, ready};
        if let Some(answer) = self.count_miss(tier) {
            return Either::Left(ready(Ok(answer)));
        }
        let status = CacheStatus::forward(reason, tier);
        let coalescing = match wanted.filter(|_| self.ctx.config.forward_ranges) {
            // The range goes to the origin as the client sent it. Its answer
            // may be a `206` that no other request could use: it neither
            // leads a flight nor follows one.
            Some(wanted) => {
                wanted.restore(self.request_mut());
                None
            }
            None => self.ctx.coalescing(),
        };
        Either::Right(match coalescing {
            None => Either::Left(Box::pin(self.forward_and_store(status, Fill::none()))),
            Some(max_wait) => Either::Right(self.coalesced_miss(status, max_wait, tier)),
        })
    }

    /// A miss with coalescing. A request whose own answer could not be
    /// stored (or, with `Authorization`, seldom can) never leads: it
    /// follows a flight under way, or goes to the origin on its own.
    ///
    /// Each path is boxed on its own: together, the leader's loop made one
    /// future of about 4 KB that every coalesced miss allocated.
    ///
    /// `tier` is where the lookup read: after a lookup that fell back
    /// (`Degraded`) while Redis hangs (`waited_in_vain`), Redis has
    /// just failed this request (a timeout, as a rule), which has waited
    /// for it as long as a request may. Neither the fill lock nor a second
    /// lookup asks Redis again then: the leader fills for this instance
    /// alone, and a follower whose leader's entry is not one it can use
    /// looks in process only, then goes to the origin.
    fn coalesced_miss(
        self,
        status: CacheStatus,
        max_wait: Duration,
        tier: Tier,
    ) -> std::pin::Pin<Box<dyn Future<Output = Answer<ResBody, S::Error>> + Send>> {
        let deadline = Instant::now() + max_wait;
        let waited = self.ctx.config.store.waited_in_vain(tier);
        match self.ctx.join_flight(&self.ctx.keyed.flight_key()) {
            None => Box::pin(self.forward_and_store(status, Fill::none())),
            Some(Joined::Follower(flight)) => {
                Box::pin(self.follow_fill(flight, status, deadline, waited))
            }
            Some(Joined::Leader(guard)) if waited => {
                Box::pin(self.forward_and_store(status, Fill::unlocked(Some(guard), true)))
            }
            Some(Joined::Leader(guard)) => Box::pin(self.lead_fill(guard, status, deadline)),
        }
    }

    /// Waits for the in-process leader's entry; without one this request
    /// can use, looks again (in process only, unless Redis answered since,
    /// when its lookup already `waited` for Redis in vain), then goes to
    /// the origin.
    async fn follow_fill(
        self,
        flight: tokio::sync::watch::Receiver<Outcome>,
        status: CacheStatus,
        deadline: Instant,
        waited: bool,
    ) -> Answer<ResBody, S::Error> {
        let Ctx { config, keyed } = &self.ctx;
        let shared = tokio::time::timeout_at(deadline, coalesce::wait(flight)).await;
        if let Ok(Outcome::Done(Some(entry))) = &shared
            && usable_by_follower(config, entry, keyed)
        {
            return Ok(serve_coalesced(config, entry, keyed, Tier::Redis));
        }
        // The leader stored nothing this request can use (or took too
        // long): look again (in process, after a lookup that `waited` for
        // Redis in vain), then go to the origin.
        // Its leader's wait may have been in vain too.
        let waited = waited || config.store.hangs();
        let (found, tier) = config
            .store
            .look_again(
                &keyed.key.url_hash,
                &keyed.parts.headers,
                &keyed.key.extra,
                waited,
            )
            .await;
        if let Lookup::Hit(entry) = found
            && usable_by_follower(config, &entry, keyed)
        {
            return Ok(serve_coalesced(config, &entry, keyed, tier));
        }
        let fill = Fill::unlocked(None, waited || config.store.waited_in_vain(tier));
        self.forward_and_store(status, fill).await
    }

    /// Leads the in-process flight: takes the Redis fill lock and goes to
    /// the origin, or, while another instance holds it, waits for its
    /// announcement (or polls, in case the message is lost) and looks again.
    async fn lead_fill(
        self,
        guard: FlightGuard,
        status: CacheStatus,
        deadline: Instant,
    ) -> Answer<ResBody, S::Error> {
        let Ctx { config, keyed } = &self.ctx;
        let store = &config.store;
        let mut poll = Duration::from_millis(10);
        let mut waited = false;
        let lock = loop {
            let variant =
                store.known_variant(&keyed.key.url_hash, &keyed.parts.headers, &keyed.key.extra);
            match store
                .try_lock(&keyed.key.url_hash, variant.as_deref(), LockPurpose::Fill)
                .await
            {
                LockAttempt::Acquired(lock) => break Some(lock),
                attempt @ LockAttempt::Unavailable => {
                    waited = store.lock_waited_in_vain(&attempt);
                    break None;
                }
                LockAttempt::Held | LockAttempt::Filled => {}
            }
            let updated = store.bus.updated();
            let now = Instant::now();
            if now >= deadline {
                tracing::debug!(target: "tower_redis_cache", "coalescing wait exceeded; going to the origin");
                break None;
            }
            let _ = tokio::time::timeout_at(deadline.min(now + poll), updated).await;
            poll = (poll * 2).min(Duration::from_millis(250));
            let (found, tier) = store
                .lookup(&keyed.key.url_hash, &keyed.parts.headers, &keyed.key.extra)
                .await;
            if let Lookup::Hit(entry) = found {
                if !usable_by_follower(config, &entry, keyed) {
                    // Filled, but not for this request: ask the origin.
                    break None;
                }
                let shared = key::vary_names(&entry.headers)
                    .unwrap_or_default()
                    .is_empty()
                    .then(|| Arc::new(entry.clone()));
                guard.complete(shared);
                return Ok(serve_coalesced(config, &entry, keyed, tier));
            }
            if tier == Tier::Degraded {
                // Redis failed this request (or the breaker opened): it
                // has waited for Redis as long as it may, and asks it for
                // the lock no more.
                waited = store.waited_in_vain(tier);
                break None;
            }
        };
        let fill = Fill {
            guard: Some(guard),
            lock,
            own_write: false,
            waited,
        };
        self.forward_and_store(status, fill).await
    }

    /// Forwards the request and passes the answer on, storing a copy when
    /// allowed.
    ///
    /// A request that leads a fill asks the origin for the whole response,
    /// which is what the requests waiting for it need: its client's
    /// conditionals (`If-None-Match`, `If-Modified-Since`, `If-Match`,
    /// `If-Unmodified-Since`) are not sent, as a revalidation does not send
    /// them either. With them the origin would answer `304` or `412`, which
    /// nothing can be stored from: the followers would go to the origin one
    /// by one, and the URL would be marked uncacheable, switching coalescing
    /// off for everyone. They are answered from the response instead, as a
    /// hit answers them ([`storing::store`]).
    ///
    /// A plain function: the origin is called here, and the future holds
    /// only its call and what storing needs. As an `async fn` it held the
    /// whole exchange (its argument) beside the parts taken from it, and
    /// the inner service until the answer came.
    pub(crate) fn forward_and_store(
        self,
        status: CacheStatus,
        fill: Fill,
    ) -> impl Future<Output = Answer<ResBody, S::Error>> + use<S, ReqBody, ResBody> {
        use futures_util::FutureExt as _;
        let (ctx, mut inner, mut request) = self.into_parts();
        let answers_conditionals =
            fill.leads() && request::remove_conditionals(request.headers_mut());
        let request_time = SystemTime::now();
        let called = inner.call(request);
        // The call's future owns what it needs; the service is not kept.
        drop(inner);
        called.map(move |answer| match answer {
            Ok(response) => Ok(storing::store(
                &ctx,
                response,
                request_time,
                status,
                fill,
                answers_conditionals,
            )),
            Err(error) => {
                fill.release(&ctx);
                Err(error)
            }
        })
    }
}
