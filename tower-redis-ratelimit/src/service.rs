//! [`RateLimit`]: the service that decides before calling the inner one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::request::Parts;
use http::{HeaderValue, Request, Response, header};
use smallvec::SmallVec;
use tower_redis_core::http::is_grpc;
use tower_redis_core::record;
use tower_redis_core::record::{InnerStarted, LayerClock};
use tower_service::Service;

use crate::body::ResponseBody;
use crate::headers::{self, Fields};
use crate::key::{CounterKeys, MissingKey};
use crate::layer::Config;
use crate::limiter::DecisionSource;
use crate::limiter::{Check, PolicyState, Verdict};
use crate::policy::{Policy, PolicyOutcome};
use crate::response::{self, Denied};

/// The policies applicable to a request.
type Policies<'c> = SmallVec<[&'c Policy; crate::limiter::INLINE_POLICIES]>;
/// Their checks.
type Checks = SmallVec<[Check; crate::limiter::INLINE_POLICIES]>;

/// The rate-limited service produced by [`RateLimitLayer`](crate::RateLimitLayer).
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> std::fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit").finish_non_exhaustive()
    }
}

impl<S> RateLimit<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }
}

impl<S: Clone> RateLimit<S> {
    /// The service `poll_ready` readied, a clone (not ready) left in its
    /// place.
    fn take_readied(&mut self) -> S {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RateLimit`].
    ///
    /// A request allowed at once (every policy leased and its units here)
    /// is the wrapped service's call itself, with nothing allocated for it;
    /// one denied at once (its key known blocked) is its answer; a request
    /// that waits on Redis is a boxed future of the decision, then the
    /// call. It is `Send` when the wrapped service's future is, and
    /// `Unpin` when that future is.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        state: State<F, B, E>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F, B, E> {
        /// Allowed at once: the inner call, then the decision's fields.
        Passed {
            #[pin]
            called: F,
            then: Option<(Fields, LayerClock, InnerStarted)>,
        },
        /// Answered at once, here.
        Answered { response: Option<Response<Bytes>> },
        /// The decision awaited, then the inner call.
        Awaited { future: tower_redis_core::ResponseFuture<Response<ResponseBody<B>>, E> },
    }
}

impl<F, B, E> std::future::Future for ResponseFuture<F, B, E>
where
    F: std::future::Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Passed { called, then } => {
                let answer = std::task::ready!(called.poll(cx));
                let (fields, clock, started) = then
                    .take()
                    .expect("ResponseFuture polled after it completed");
                clock.inner_ended(started);
                let mut response = answer?;
                // Appended, not replaced: stacked rate-limit layers each
                // add their members to the same list fields.
                fields.append_to(response.headers_mut());
                // The clock stops (is dropped) here, after the fields.
                drop(clock);
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            StateProj::Answered { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after it completed")
                .map(ResponseBody::full))),
            StateProj::Awaited { future } => std::pin::Pin::new(future).poll(cx),
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The latency this layer adds (metrics only); recorded when dropped.
        let clock = LayerClock::start("ratelimit");
        let (parts, body) = request.into_parts();
        // One span per decision; `conclude` records its outcome.
        let span = tracing::debug_span!(
            target: "tower_redis_ratelimit",
            "ratelimit",
            method = %parts.method,
            path = parts.uri.path(),
            verdict = tracing::field::Empty,
            policy = tracing::field::Empty,
            source = tracing::field::Empty,
        );
        if self.config.decides_at_once {
            let decided = {
                let _entered = (!span.is_disabled()).then(|| span.enter());
                decide_now(&self.config, &parts)
            };
            if let Some(outcome) = decided {
                // Decided with nothing to wait for: allowed, the readied
                // service is called here, in place (no clone, no box).
                if matches!(outcome, Outcome::Respond(_)) {
                    // Denied: the readied service is not called but let
                    // go, so that what its `poll_ready` reserved (a
                    // `Buffer`'s slot, a `ConcurrencyLimit`'s permit) is
                    // released, as when a denial comes from Redis.
                    drop(self.take_readied());
                }
                return respond(outcome, parts, body, &mut self.inner, clock);
            }
        }
        let inner = self.take_readied();
        let future = tower_redis_core::ResponseFuture::new(answer(
            Arc::clone(&self.config),
            inner,
            parts,
            body,
            (clock, span),
        ));
        ResponseFuture {
            state: State::Awaited { future },
        }
    }
}

/// The service a rate limit wraps, as the response futures need it.
trait Inner<ReqBody, ResBody>:
    Service<Request<ReqBody>, Response = Response<ResBody>, Future: Send> + Send + 'static
{
}

impl<T, ReqBody, ResBody> Inner<ReqBody, ResBody> for T where
    T: Service<Request<ReqBody>, Response = Response<ResBody>, Future: Send> + Send + 'static
{
}

/// Decides, then calls `inner` or answers early.
fn answer<S, ReqBody, ResBody>(
    config: Arc<Config>,
    inner: S,
    parts: Parts,
    body: ReqBody,
    (clock, span): (LayerClock, tracing::Span),
) -> impl Future<Output = Result<Response<ResponseBody<ResBody>>, S::Error>> + Send + 'static
where
    S: Inner<ReqBody, ResBody>,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    // A chain of combinators, not one `async` block: the block kept the
    // request's parts (and the span) beside the decision's future and
    // the inner service's, so that the box made for every request was
    // larger than the allocator's per-thread cache takes. Here the
    // decision's state and the inner call's take turns in one place.
    let decided = tower_redis_core::in_span(span, async move {
        let outcome = decide(&config, &parts).await;
        (outcome, parts)
    });
    decided.then(move |(outcome, parts)| {
        let mut inner = inner;
        // Dropped here, called or not: a denial lets go of the readied
        // service (and of what its `poll_ready` reserved).
        respond(outcome, parts, body, &mut inner, clock)
    })
}

/// Calls `inner` (readied) with the request, adding the decision's fields
/// to its answer, or answers in its place. The same future whether the
/// decision was made at once or awaited.
fn respond<S, ReqBody, ResBody>(
    outcome: Outcome,
    parts: Parts,
    body: ReqBody,
    inner: &mut S,
    clock: LayerClock,
) -> ResponseFuture<S::Future, ResBody, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    let state = match outcome {
        Outcome::Pass(fields) => {
            // Timed from before the call: what the inner service does in
            // `call` (routing, an answer it has at once) is its own time.
            let started = clock.inner_started();
            State::Passed {
                called: inner.call(Request::from_parts(parts, body)),
                then: Some((fields, clock, started)),
            }
        }
        // The clock stops (is dropped) at the end of this arm.
        Outcome::Respond(response) => State::Answered {
            response: Some(response),
        },
    };
    ResponseFuture { state }
}

enum Outcome {
    /// Call the inner service, adding these fields to its response.
    Pass(Fields),
    /// Answer with this response instead.
    Respond(Response<Bytes>),
}

/// Parse, decide, and either answer early or let the request through.
async fn decide(config: &Config, parts: &Parts) -> Outcome {
    if is_allow_listed(config, parts) {
        return Outcome::Pass(Fields::default());
    }
    let (policies, checks) = match applicable_checks(config, parts).await {
        Ok(found) => found,
        Err(policy) => return missing_key(parts, &policy),
    };
    let cost = config.cost.as_ref().map_or(1, |cost| cost(parts));
    if checks.is_empty() || cost == 0 {
        return Outcome::Pass(Fields::default());
    }
    let verdict = config.limiter.decide(&checks, cost).await;
    conclude(config, parts, &policies, &verdict)
}

/// [`decide`] when nothing needs to be waited for (see
/// [`Config::decides_at_once`]): every policy spends from its lease, or a
/// key is known blocked. `None` when a lease must be taken from Redis
/// first; the request then takes [`decide`], which reads its keys again
/// (the layer's own reads, no function of the application's).
fn decide_now(config: &Config, parts: &Parts) -> Option<Outcome> {
    if is_allow_listed(config, parts) {
        return Some(Outcome::Pass(Fields::default()));
    }
    let mut policies = Policies::new();
    let mut checks = Checks::new();
    for (policy, counter_keys) in applicable(config, parts) {
        let value = policy.key.extract_built_in(parts, &config.client_ip)?;
        if let Err(policy) = add_check(
            config,
            (policy, counter_keys),
            value.as_deref(),
            (&mut policies, &mut checks),
        ) {
            return Some(missing_key(parts, &policy));
        }
    }
    if checks.is_empty() {
        return Some(Outcome::Pass(Fields::default()));
    }
    // Every request costs 1: the layer has no cost function.
    let verdict = config.limiter.decide_now(&checks, 1)?;
    Some(conclude(config, parts, &policies, &verdict))
}

/// The answer to a request without the key of a policy that rejects such
/// requests (`on_missing_key`).
fn missing_key(parts: &Parts, policy: &str) -> Outcome {
    Outcome::Respond(if is_grpc(&parts.headers) {
        response::grpc_status(
            response::GRPC_INVALID_ARGUMENT,
            &format!("missing the key of rate-limit policy {policy}"),
        )
    } else {
        response::missing_key(policy)
    })
}

/// Records a verdict and turns it into the request's outcome: its fields
/// when allowed (or in shadow mode), else the denial.
fn conclude(config: &Config, parts: &Parts, policies: &[&Policy], verdict: &Verdict) -> Outcome {
    record(verdict, config.shadow);
    record_policies(policies, verdict, config.shadow);
    if config.shadow {
        if !verdict.allowed {
            tracing::info!(
                target: "tower_redis_ratelimit",
                path = parts.uri.path(),
                source = verdict.source.as_str(),
                "shadow mode: this request would have been rate limited"
            );
        }
        return Outcome::Pass(Fields::default());
    }
    let decided: SmallVec<[(&Policy, Option<PolicyState>); crate::limiter::INLINE_POLICIES]> =
        policies
            .iter()
            .copied()
            .zip(verdict.states.iter().copied())
            .collect();
    let fields = headers::fields(&decided, verdict.source, config.legacy_headers);
    if verdict.allowed {
        return Outcome::Pass(fields);
    }
    Outcome::Respond(denied_response(config, parts, &decided, verdict, fields))
}

fn is_allow_listed(config: &Config, parts: &Parts) -> bool {
    if config.allow_if.iter().any(|allow| allow(parts)) {
        return true;
    }
    !config.allow_nets.is_empty()
        && config
            .client_ip
            .client_addr_of_parts(parts)
            .is_some_and(|ip| config.allow_nets.iter().any(|net| net.contains(&ip)))
}

/// The policies that apply to the request and their counters. `Err` names a
/// policy whose key is missing when the layer is set to reject such requests.
async fn applicable_checks<'c>(
    config: &'c Config,
    parts: &Parts,
) -> Result<(Policies<'c>, Checks), String> {
    let mut policies = Policies::new();
    let mut checks = Checks::new();
    for (policy, counter_keys) in applicable(config, parts) {
        let value = policy.key.extract(parts, &config.client_ip).await;
        add_check(
            config,
            (policy, counter_keys),
            value.as_deref(),
            (&mut policies, &mut checks),
        )?;
    }
    Ok((policies, checks))
}

/// The policies that apply to the request, with their counter keys.
fn applicable<'c>(
    config: &'c Config,
    parts: &Parts,
) -> impl Iterator<Item = (&'c Policy, &'c CounterKeys)> {
    let path = parts.uri.path();
    let method = &parts.method;
    config
        .policies
        .iter()
        .zip(&config.counter_keys)
        .filter(move |(p, _)| p.applies_to(method, path))
}

/// Adds an applicable policy and its check, for the key `value` it found
/// in the request; a missing key is skipped, shared or rejected (`Err`,
/// with the policy's name) as the layer says.
fn add_check<'c>(
    config: &Config,
    (policy, counter_keys): (&'c Policy, &CounterKeys),
    value: Option<&str>,
    (policies, checks): (&mut Policies<'c>, &mut Checks),
) -> Result<(), String> {
    if value.is_none() && policy.key.is_client_ip() {
        warn_no_peer_address(config, policy);
    }
    let key = match (value, config.missing_key) {
        (Some(value), _) => counter_keys.key(Some(value)),
        (None, MissingKey::Skip) => return Ok(()),
        (None, MissingKey::SharedBucket) => counter_keys.key(None),
        (None, MissingKey::Reject) => return Err(policy.name().to_owned()),
    };
    policies.push(policy);
    checks.push(Check {
        key,
        algorithm: policy.algorithm(),
        lease: policy.lease,
    });
    Ok(())
}

/// Says once per layer that a per-IP policy met a request without a peer
/// address: the app is most likely served without connect info, and the
/// policy is not doing what its author thinks.
fn warn_no_peer_address(config: &Config, policy: &Policy) {
    if config.warned_no_peer_address.load(Ordering::Relaxed)
        || config.warned_no_peer_address.swap(true, Ordering::Relaxed)
    {
        return;
    }
    let outcome = match config.missing_key {
        MissingKey::Skip => {
            "the policy is skipped for such requests, so they are not limited by it"
        }
        MissingKey::SharedBucket => "such requests all share one bucket of the policy",
        MissingKey::Reject => "such requests are rejected with 400",
    };
    tracing::warn!(
        target: "tower_redis_ratelimit",
        policy = policy.name(),
        "rate-limit policy \"{}\" is keyed by client IP, but a request has no peer address: {outcome} \
         (on_missing_key). Serve an axum app with \
         `app.into_make_service_with_connect_info::<SocketAddr>()` instead of \
         `into_make_service()`; with plain hyper, tower or tonic, insert the connection's \
         remote `SocketAddr` into each request's extensions before this layer. \
         This warning is logged once per layer.",
        policy.name()
    );
}

fn denied_response(
    config: &Config,
    parts: &Parts,
    decided: &[(&Policy, Option<PolicyState>)],
    verdict: &Verdict,
    fields: Fields,
) -> Response<Bytes> {
    let mut denying: Vec<String> = decided
        .iter()
        .filter(|(_, s)| s.is_some_and(|s| s.retry_after.is_some()))
        .map(|(p, _)| p.name().to_owned())
        .collect();
    if denying.is_empty() {
        // Fail-closed knows no per-policy state: every policy denied.
        denying = decided.iter().map(|(p, _)| p.name().to_owned()).collect();
    }
    // All policies must allow, so the request fits once the slowest does.
    let retry_after = verdict
        .states
        .iter()
        .filter_map(|s| s.and_then(|s| s.retry_after))
        .max()
        .unwrap_or(Duration::from_secs(1));
    let denied = Denied {
        policies: denying,
        retry_after,
        source: verdict.source,
    };
    let mut response = if is_grpc(&parts.headers) {
        response::grpc_status(
            response::GRPC_RESOURCE_EXHAUSTED,
            &format!(
                "rate limit exceeded ({}); retry in {} s",
                denied.policies.join(", "),
                headers::ceil_secs(retry_after).max(1)
            ),
        )
    } else {
        match &config.on_denied {
            Some(respond) => respond(&denied),
            None => response::too_many_requests(&denied),
        }
    };
    let headers = response.headers_mut();
    fields.insert_missing(headers);
    if !headers.contains_key(header::RETRY_AFTER) {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(headers::ceil_secs(retry_after).max(1)),
        );
    }
    response
}

/// Counts each policy's part in the decision
/// (`tower_redis_ratelimit_policy_decisions_total{policy,outcome}`: allowed,
/// denied by this policy, or unknown when the decision was made without the
/// counters) and records the verdict on the decision's span: `verdict`
/// (allowed, denied, or shadow_denied), `policy` (the first that denied, or
/// with the least remaining when allowed) and `source`.
fn record_policies(policies: &[&Policy], verdict: &Verdict, shadow: bool) {
    let states = || {
        policies
            .iter()
            .zip(verdict.states.iter())
            .filter_map(|(policy, state)| state.map(|state| (policy.name(), state)))
    };
    for (index, policy) in policies.iter().enumerate() {
        policy.count(match verdict.states.get(index).copied().flatten() {
            Some(state) if state.retry_after.is_some() => PolicyOutcome::Denied,
            Some(_) => PolicyOutcome::Allowed,
            None => PolicyOutcome::Unknown,
        });
    }
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    let (outcome, deciding) = match (verdict.allowed, shadow) {
        (true, _) => ("allowed", states().min_by_key(|(_, state)| state.remaining)),
        (false, denied_for) => (
            if denied_for {
                "shadow_denied"
            } else {
                "denied"
            },
            states().find(|(_, state)| state.retry_after.is_some()),
        ),
    };
    span.record("verdict", outcome);
    span.record("source", verdict.source.as_str());
    if let Some((name, _)) = deciding {
        span.record("policy", name);
    }
}

/// Counts the decision (`tower_redis_ratelimit_decisions_total`) and
/// traces one made without Redis.
fn record(verdict: &Verdict, shadow: bool) {
    // One fixed-key counter per label set: counting allocates nothing.
    macro_rules! by_source {
        ($outcome:literal) => {
            by_source!($outcome: 0, 1, 2, 3, 4, 5)
        };
        ($outcome:literal: $($source:literal),*) => {
            [$([
                record::Counter::new("tower_redis_ratelimit_decisions_total", &[("outcome", $outcome), ("source", DecisionSource::ALL[$source].as_str()), ("shadow", "false")]),
                record::Counter::new("tower_redis_ratelimit_decisions_total", &[("outcome", $outcome), ("source", DecisionSource::ALL[$source].as_str()), ("shadow", "true")]),
            ]),*]
        };
    }
    // Indexed by outcome, `source as usize` and shadow.
    static DECISIONS: [[[record::Counter; 2]; DecisionSource::ALL.len()]; 2] =
        [by_source!("allowed"), by_source!("denied")];
    match DECISIONS[usize::from(!verdict.allowed)].get(verdict.source as usize) {
        Some(by_shadow) => by_shadow[usize::from(shadow)].increment(1),
        // A source missing from `DecisionSource::ALL`: counted all the same.
        None => record::counter(
            "tower_redis_ratelimit_decisions_total",
            &[
                (
                    "outcome",
                    if verdict.allowed { "allowed" } else { "denied" },
                ),
                ("source", verdict.source.as_str()),
                ("shadow", if shadow { "true" } else { "false" }),
            ],
            1,
        ),
    }
    if verdict.source.is_degraded() {
        tracing::trace!(target: "tower_redis_ratelimit", source = verdict.source.as_str(), "decided without Redis");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Policy, RateLimitLayer};
    use tower_redis_core::RedisManager;

    /// A request is decided when the service is called only where that
    /// runs no function of the application's a second time (for the few
    /// requests that must take a lease first): every policy leases and is
    /// keyed by the layer itself, with no `allow_if` and no cost function.
    #[test]
    fn only_leased_built_in_keys_are_decided_at_once() {
        let leased = || {
            Policy::gcra("global", 10, Duration::from_secs(1))
                .key(crate::Key::global())
                .lease(5)
        };
        let at_once = |builder: crate::RateLimitLayerBuilder| {
            builder.build().expect("a layer").config.decides_at_once
        };
        let builder = || RateLimitLayer::builder(RedisManager::disabled());
        assert!(at_once(builder().policy(leased())));
        assert!(at_once(builder().policy(leased()).policy(
            Policy::gcra("per-ip", 10, Duration::from_secs(1)).lease(5)
        )));
        assert!(at_once(
            builder().policy(
                Policy::gcra("per-key", 10, Duration::from_secs(1))
                    .key(crate::Key::header("x-api-key"))
                    .lease(5)
            )
        ));
        // A policy without a lease waits for Redis anyway.
        assert!(!at_once(builder().policy(leased()).policy(Policy::gcra(
            "per-ip",
            10,
            Duration::from_secs(1)
        ))));
        // Functions of the application's.
        assert!(!at_once(
            builder().policy(
                Policy::gcra("per-user", 10, Duration::from_secs(1))
                    .key(crate::Key::from_fn(|_| Some("u".to_owned())))
                    .lease(5)
            )
        ));
        assert!(!at_once(builder().policy(leased()).allow_if(|_| false)));
        assert!(!at_once(builder().policy(leased()).cost(|_| 1)));
    }

    /// The future boxed for every request fits the allocator's per-thread
    /// cache (glibc's tcache takes blocks of up to 1,032 bytes; a larger one
    /// comes from the shared arena, under its lock). As one `async` block
    /// it was 1,448 bytes in a release build, the request's parts held
    /// beside the decision and the inner call. The size is this build's
    /// layout (a test build's, larger than a release build's), around an
    /// axum router as the inner service.
    #[test]
    fn the_boxed_request_fits_the_allocators_thread_cache() {
        let layer = RateLimitLayer::builder(RedisManager::disabled())
            .policy(Policy::gcra("per-ip", 10, Duration::from_secs(1)))
            .build()
            .expect("a layer");
        let inner = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let request = Request::new(axum::body::Body::empty());
        let (parts, body) = request.into_parts();
        let answered = answer(
            Arc::clone(&layer.config),
            inner,
            parts,
            body,
            (
                tower_redis_core::record::LayerClock::start("ratelimit"),
                tracing::Span::none(),
            ),
        );
        let size = std::mem::size_of_val(&answered);
        assert!(size <= 1032, "the boxed request is {size} bytes");
    }

    /// The response future holds the wrapped service's call inline (a
    /// request decided at once), and an app boxes it (axum does, for every
    /// request through a layer): it fits the same cache.
    #[test]
    fn the_response_future_fits_the_allocators_thread_cache() {
        type AroundRouter = ResponseFuture<
            axum::routing::future::RouteFuture<std::convert::Infallible>,
            axum::body::Body,
            std::convert::Infallible,
        >;
        let size = std::mem::size_of::<AroundRouter>();
        assert!(size <= 1032, "the response future is {size} bytes");
    }
}
