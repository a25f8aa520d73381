//! Leased quotas ([`Policy::lease`](crate::Policy::lease)): an instance
//! takes up to `n` units of a hot counter from Redis in one call
//! (`lease.lua`) and spends them in process, with no Redis call per
//! request, until they run out.
//!
//! - **Taking.** A request whose leased policy finds no unit left here
//!   refills: one script call takes `max(n, cost)` units, or as many as the
//!   policy allows now (at least the request's cost, else none: the request
//!   is denied by Redis). Requests that find a refill under way wait for it
//!   (one refill per counter at a time), then spend from it.
//! - **Taking ahead.** A request that leaves a lease at a quarter of `n` or
//!   less starts a refill in a task of its own, while Redis is available:
//!   one script call takes what brings the units held back to `n` (so an
//!   instance never holds more than `n`), kept apart as the next lot, with
//!   its own window and end, and spent once the lease's own units are
//!   gone (what is left of those, fewer than a request's cost, goes back).
//!   A hot key's requests then do not wait for a refill. One refill ahead
//!   per lot: one that Redis denies is not asked again until a request
//!   finds the lease empty and refills as above.
//! - **Spending.** Under one mutex, O(1): the request's cost comes off the
//!   local units. Several policies are still all or nothing: units taken for
//!   a request that another policy then denies are put back here.
//! - **Ending.** Units of a window lease are void when their window ends
//!   (on this instance's clock, measured from *before* the call was sent, so
//!   never after the window really ends); a GCRA lease ends one period after
//!   it was taken. Unused units go back to Redis (`lease.lua` give-back)
//!   when a lease has not been spent from for [`LEASE_IDLE`], when it ends
//!   (GCRA, sliding window), when it is evicted at the memory bound, when
//!   the layer is dropped, and on [`RateLimitLayer::return_leases`](crate::RateLimitLayer::return_leases).
//!   A give-back that fails is not retried: the units stay counted, so the
//!   limit never loosens (fewer admissions, never more).
//! - **Denials.** A leased policy that Redis denies is remembered in the
//!   blocked-key cache for at most [`LEASE_RECHECK`], not until its
//!   `Retry-After`: another instance may give units back meanwhile.
//! - **Redis down.** Units already leased are spent (Redis counted them);
//!   once they are gone, the request goes to the configured fallback exactly
//!   as a request of a policy without a lease does.
//! - **Memory.** One entry per leased counter, in a map bounded by bytes
//!   (an eighth of the layer's memory capacity); the least recently used
//!   lease is evicted and its units given back.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tower_redis_core::sync::lock;

use super::lru::Lru;
use super::redis::{LeaseReply, RedisStore};
use super::{Check, DecisionSource, Limiter, PolicyState, States, Verdict};
use crate::algorithm::Algorithm;

/// A lease nobody has spent from for this long gives its units back.
pub(crate) const LEASE_IDLE: Duration = Duration::from_secs(1);

/// How long a denial of a leased policy is answered without Redis: other
/// instances may give units back, so the denial is asked again this often.
pub(crate) const LEASE_RECHECK: Duration = Duration::from_millis(100);

/// The most give-backs waiting for the next sweep; beyond, the oldest are
/// dropped (their units stay counted: fewer admissions, never more).
const MAX_PENDING: usize = 4096;

/// One counter's lease on this instance.
#[derive(Debug, Clone)]
struct Slot {
    /// The units being spent.
    lot: Lot,
    /// Units taken ahead, spent once `lot` cannot pay a request (boxed:
    /// only a hot key's lease has them, and every entry counts against the
    /// map's byte bound).
    next: Option<Box<Lot>>,
    /// A refill ahead was started for `lot` (one per lot).
    ahead: bool,
    /// The last time a request spent from (or refilled) this lease.
    last_used: Instant,
    algorithm: Algorithm,
    /// One refill of this lease at a time (ahead or not).
    gate: Arc<Gate>,
}

/// Units taken in one script call.
#[derive(Debug, Clone)]
struct Lot {
    /// Units left to spend here.
    tokens: u64,
    /// From this moment the units are void.
    expires: Instant,
    /// The window the units belong to (0 for GCRA).
    window: i64,
    /// What Redis said was left after the lease (for the `RateLimit` field).
    shared_remaining: u64,
    /// When Redis said the policy is full again.
    reset_at: Instant,
}

impl Lot {
    /// What Redis granted to a call sent at `sent`.
    fn taken(algorithm: Algorithm, reply: &LeaseReply, sent: Instant) -> Self {
        let expires = match algorithm {
            Algorithm::Gcra { period, .. } => sent + period,
            Algorithm::SlidingWindow { .. } | Algorithm::FixedWindow { .. } => {
                sent + reply.state.reset
            }
        };
        Self {
            tokens: reply.granted,
            expires,
            window: reply.window,
            shared_remaining: reply.state.remaining,
            reset_at: sent + reply.state.reset,
        }
    }

    /// The units to give back to Redis, if giving them back changes
    /// anything there.
    fn give_back(&self, key: Arc<str>, algorithm: Algorithm, now: Instant) -> Option<GiveBack> {
        let worth_it = self.tokens > 0
            && (self.expires > now || !matches!(algorithm, Algorithm::FixedWindow { .. }));
        worth_it.then_some(GiveBack {
            key,
            algorithm,
            unused: self.tokens,
            window: self.window,
        })
    }
}

/// One refill of a lease at a time: a request that finds no unit and no
/// refill under way refills; the others wait for that refill, and are all
/// woken together when it ends (each then spends from it, takes its
/// denial, or refills in turn). Waiters that went through a mutex one at a
/// time took a scheduler hand-off each after every refill, while both
/// cores idled. The turn to refill is not first come, first served: a
/// woken waiter can lose it to a request that arrived later, and waits for
/// that refill too (a refill brings a lease's worth of units, so this is
/// rare unless more requests wait than a lease holds).
///
/// A refill that fails (Redis timed out or errored) says so to those it
/// woke: they take the fallback at once rather than refill in turn, so that
/// no request waits for Redis longer than one command timeout.
#[derive(Debug, Default)]
struct Gate {
    refilling: AtomicBool,
    /// The last refill that ended failed.
    failed: AtomicBool,
    ended: tokio::sync::Notify,
}

impl Gate {
    /// `Some` when this request refills; `None` once the refill under way
    /// has ended.
    async fn enter(self: &Arc<Self>) -> Option<Refilling> {
        let ended = std::pin::pin!(self.ended.notified());
        let mut ended = ended;
        // Registered before the check: a refill that ends in between
        // still wakes this request.
        ended.as_mut().enable();
        if !self.refilling.swap(true, Ordering::AcqRel) {
            return Some(Refilling::of(self));
        }
        ended.await;
        None
    }
}

impl Gate {
    /// `Some` when no refill is under way: the caller refills.
    fn try_enter(self: &Arc<Self>) -> Option<Refilling> {
        (!self.refilling.swap(true, Ordering::AcqRel)).then(|| Refilling::of(self))
    }

    /// Whether the last refill that ended failed (read by a request its
    /// end woke).
    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

/// Held by the request refilling a lease; when it ends (or the request is
/// dropped), the waiters are woken, and told whether it failed.
struct Refilling {
    gate: Arc<Gate>,
    failed: bool,
}

impl Refilling {
    fn of(gate: &Arc<Gate>) -> Self {
        Self {
            gate: Arc::clone(gate),
            failed: false,
        }
    }

    /// Ends the refill as failed: Redis did not answer it.
    fn fail(mut self) {
        self.failed = true;
    }
}

impl Drop for Refilling {
    fn drop(&mut self) {
        self.gate.failed.store(self.failed, Ordering::Release);
        self.gate.refilling.store(false, Ordering::Release);
        self.gate.ended.notify_waiters();
    }
}

impl Slot {
    fn empty(algorithm: Algorithm, now: Instant) -> Self {
        Self {
            lot: Lot {
                tokens: 0,
                expires: now,
                window: 0,
                shared_remaining: 0,
                reset_at: now,
            },
            next: None,
            ahead: false,
            last_used: now,
            algorithm,
            gate: Arc::new(Gate::default()),
        }
    }

    /// Takes `cost` units if they are here and valid.
    fn spend(&mut self, cost: u32, now: Instant) -> Option<(PolicyState, i64)> {
        let lot = &mut self.lot;
        if lot.expires <= now || lot.tokens < u64::from(cost) {
            return None;
        }
        lot.tokens -= u64::from(cost);
        self.last_used = now;
        let state = PolicyState {
            remaining: lot.tokens.saturating_add(lot.shared_remaining),
            reset: lot.reset_at.saturating_duration_since(now),
            retry_after: None,
        };
        Some((state, lot.window))
    }

    /// The units taken ahead become the ones spent; what is left of the
    /// others is returned, to go back to Redis. `None` when nothing was
    /// taken ahead.
    fn promote(&mut self, key: &Arc<str>, now: Instant) -> Option<Option<GiveBack>> {
        let next = self.next.take()?;
        let left = std::mem::replace(&mut self.lot, *next);
        self.ahead = false;
        Some(left.give_back(Arc::clone(key), self.algorithm, now))
    }

    /// A request that just spent should start a refill ahead: the lease is
    /// down to a quarter of its size (`lease`) or less, and nothing was
    /// taken or asked ahead for it.
    fn wants_ahead(&self, lease: u32) -> bool {
        !self.ahead && self.next.is_none() && self.lot.tokens <= u64::from(lease) / 4
    }

    /// What a refill ahead takes: what brings the units held back to
    /// `lease` (none once they are there).
    fn ahead_want(&self, lease: u32) -> u64 {
        let next = self.next.as_ref().map_or(0, |lot| lot.tokens);
        u64::from(lease).saturating_sub(self.lot.tokens.saturating_add(next))
    }

    /// The units to give back to Redis (both lots), where giving them back
    /// changes anything there.
    fn give_backs(&self, key: &Arc<str>, now: Instant) -> impl Iterator<Item = GiveBack> {
        let next = self.next.as_ref();
        self.lot
            .give_back(Arc::clone(key), self.algorithm, now)
            .into_iter()
            .chain(next.and_then(|lot| lot.give_back(Arc::clone(key), self.algorithm, now)))
    }

    /// No unit here can be spent any more (both lots ended).
    fn over(&self, now: Instant) -> bool {
        self.lot.expires <= now && self.next.as_ref().is_none_or(|lot| lot.expires <= now)
    }
}

/// Unused units on their way back to Redis.
#[derive(Debug, Clone)]
pub(crate) struct GiveBack {
    key: Arc<str>,
    algorithm: Algorithm,
    unused: u64,
    window: i64,
}

/// This instance's leases.
#[derive(Debug)]
pub(crate) struct Leases {
    slots: Mutex<Lru<Slot>>,
    /// Give-backs for the next sweep (evicted and voided leases).
    pending: Mutex<VecDeque<GiveBack>>,
    redis: RedisStore,
    /// The sweeper task was started.
    sweeping: AtomicBool,
    /// Refills under way (ahead or not), and their ends (for `return_all`).
    in_flight: AtomicUsize,
    in_flight_ended: tokio::sync::Notify,
}

/// One refill under way; when it ends, `return_all` may go on.
struct InFlight(Arc<Leases>);

impl InFlight {
    fn enter(leases: &Arc<Leases>) -> Self {
        leases.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(leases))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.in_flight_ended.notify_waiters();
        }
    }
}

/// What a leased policy answers for one request.
pub(crate) enum LeaseOutcome {
    /// Units were spent here: how the policy stands, and the window they
    /// came from (to put them back if another policy denies).
    Granted(PolicyState, i64),
    /// Redis has fewer units left than the request costs.
    Denied(PolicyState),
    /// Redis is unavailable and the lease is spent: the fallback's verdict
    /// for the whole request.
    Fallback(Verdict),
}

impl Leases {
    /// Leases holding at most `max_bytes` of entries.
    pub(crate) fn new(redis: RedisStore, max_bytes: u64) -> Self {
        Self {
            slots: Mutex::new(Lru::new(max_bytes)),
            pending: Mutex::new(VecDeque::new()),
            redis,
            sweeping: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            in_flight_ended: tokio::sync::Notify::new(),
        }
    }

    /// Spends `cost` units of `check`'s lease, or hands out the gate to
    /// hold while refilling it. A spend that leaves the lease low starts a
    /// refill ahead.
    fn try_spend(
        self: &Arc<Self>,
        check: &Check,
        cost: u32,
    ) -> Result<(PolicyState, i64), Arc<Gate>> {
        let now = Instant::now();
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get_mut(&check.key) {
            let mut left = None;
            let mut spent = slot.spend(cost, now);
            if spent.is_none()
                && let Some(back) = slot.promote(&check.key, now)
            {
                left = back;
                spent = slot.spend(cost, now);
            }
            let Some(spent) = spent else {
                let gate = Arc::clone(&slot.gate);
                drop(slots);
                self.push_pending(left.into_iter().collect());
                return Err(gate);
            };
            let ahead = match check.lease {
                Some(lease) if slot.wants_ahead(lease) && self.redis.is_available() => {
                    // Asked for once per lot, and only by the one request
                    // that takes the gate (no refill under way).
                    slot.gate.try_enter().map(|refilling| {
                        slot.ahead = true;
                        (lease, refilling)
                    })
                }
                _ => None,
            };
            drop(slots);
            self.push_pending(left.into_iter().collect());
            if let Some((lease, refilling)) = ahead {
                self.refill_ahead(check, lease, refilling);
            }
            return Ok(spent);
        }
        let slot = Slot::empty(check.algorithm, now);
        let gate = Arc::clone(&slot.gate);
        let evicted = slots.insert_evicting(Arc::clone(&check.key), slot);
        drop(slots);
        self.queue(evicted, now);
        Err(gate)
    }

    /// Takes units ahead for `check`'s lease (of `lease` units), in a task
    /// of its own holding the lease's gate (`refilling`): requests that
    /// find the lease empty meanwhile wait for it, as for any refill. Units
    /// granted become the lease's next lot; a denial or an error leaves the
    /// lease as it is (its units are spent, then a request refills and is
    /// told).
    fn refill_ahead(self: &Arc<Self>, check: &Check, lease: u32, refilling: Refilling) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        start_sweeper(self);
        let leases = Arc::clone(self);
        let (key, algorithm) = (Arc::clone(&check.key), check.algorithm);
        let in_flight = InFlight::enter(self);
        runtime.spawn(async move {
            let _in_flight = in_flight;
            // Worked out now, under the lock: units put back since the
            // request (another policy denied it) count as held.
            let Some(want) = leases.ahead_want(&key, &refilling.gate, lease) else {
                return;
            };
            let sent = Instant::now();
            match leases.redis.lease(&key, algorithm, want, 1).await {
                Ok(reply) if reply.granted > 0 => {
                    leases.add_ahead(&key, &refilling.gate, algorithm, &reply, sent);
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(
                        target: "tower_redis_ratelimit",
                        %error,
                        "could not take leased units ahead; a request will refill when they run out"
                    );
                    // Those waiting for it take the fallback.
                    refilling.fail();
                    return;
                }
            }
            // The gate opens after the units are in place.
            drop(refilling);
        });
    }

    /// The units a refill ahead of the lease whose gate is `gate` takes;
    /// `None` when there are none to take or the lease is gone.
    fn ahead_want(&self, key: &str, gate: &Arc<Gate>, lease: u32) -> Option<u64> {
        let mut slots = lock(&self.slots);
        let slot = slots
            .get_mut(key)
            .filter(|slot| Arc::ptr_eq(&slot.gate, gate))?;
        Some(slot.ahead_want(lease)).filter(|want| *want > 0)
    }

    /// Keeps units taken ahead (at `sent`) as the next lot of the lease of
    /// `key` whose gate is `gate` (the one they were taken for); back to
    /// Redis if that lease is gone meanwhile (swept, evicted, returned),
    /// even if a new lease of the same key has begun since.
    fn add_ahead(
        &self,
        key: &Arc<str>,
        gate: &Arc<Gate>,
        algorithm: Algorithm,
        reply: &LeaseReply,
        sent: Instant,
    ) {
        let now = Instant::now();
        let lot = Lot::taken(algorithm, reply, sent);
        let mut slots = lock(&self.slots);
        let back = match slots
            .get_mut(key)
            .filter(|slot| Arc::ptr_eq(&slot.gate, gate))
        {
            Some(slot) => slot
                .next
                .replace(Box::new(lot))
                .and_then(|old| old.give_back(Arc::clone(key), algorithm, now)),
            None => lot.give_back(Arc::clone(key), algorithm, now),
        };
        drop(slots);
        self.push_pending(back.into_iter().collect());
    }

    /// The verdict of a request whose policies all lease and all have
    /// the units here; `None` (and nothing spent) otherwise.
    pub(crate) fn spend_all(self: &Arc<Self>, checks: &[Check], cost: u32) -> Option<Verdict> {
        if !checks.iter().all(|check| check.lease.is_some()) {
            return None;
        }
        let mut states = States::with_capacity(checks.len());
        let mut windows = Vec::new();
        for (i, check) in checks.iter().enumerate() {
            let Ok((state, window)) = self.try_spend(check, cost) else {
                for (check, window) in checks[..i].iter().zip(windows) {
                    self.put_back(&check.key, cost, window);
                }
                return None;
            };
            states.push(Some(state));
            if checks.len() > 1 {
                windows.push(window);
            }
        }
        Some(Verdict {
            allowed: true,
            states,
            source: DecisionSource::Lease,
        })
    }

    /// Adds what Redis granted (taken at `sent`) to `check`'s lease and
    /// spends `cost` of it.
    fn add(
        &self,
        check: &Check,
        reply: &LeaseReply,
        sent: Instant,
        cost: u32,
    ) -> Option<(PolicyState, i64)> {
        let now = Instant::now();
        let taken = Lot::taken(check.algorithm, reply, sent);
        let mut slots = lock(&self.slots);
        let mut evicted = Vec::new();
        if slots.get_mut(&check.key).is_none() {
            evicted =
                slots.insert_evicting(Arc::clone(&check.key), Slot::empty(check.algorithm, now));
        }
        let mut void = None;
        let spent = slots.get_mut(&check.key).and_then(|slot| {
            let lot = &mut slot.lot;
            if lot.window != reply.window || lot.expires <= now {
                // What is left of an earlier window goes back; a unit of
                // one window is never spent in another.
                void = lot.give_back(Arc::clone(&check.key), slot.algorithm, now);
                lot.tokens = 0;
            }
            let tokens = lot.tokens + taken.tokens;
            slot.lot = Lot { tokens, ..taken };
            slot.ahead = false;
            slot.spend(cost, now)
        });
        drop(slots);
        self.queue(evicted, now);
        self.push_pending(void.into_iter().collect());
        spent
    }

    /// Puts back units a request took but did not use (another policy
    /// denied it), if their lease is still the same.
    fn put_back(&self, key: &str, cost: u32, window: i64) {
        let now = Instant::now();
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get_mut(key)
            && slot.lot.window == window
            && slot.lot.expires > now
        {
            slot.lot.tokens += u64::from(cost);
        }
    }

    /// Remembers the unused units of leases that left the map.
    fn queue(&self, left: Vec<(Arc<str>, Slot)>, now: Instant) {
        let backs = left
            .into_iter()
            .flat_map(|(key, slot)| slot.give_backs(&key, now).collect::<Vec<_>>())
            .collect();
        self.push_pending(backs);
    }

    fn push_pending(&self, backs: Vec<GiveBack>) {
        if backs.is_empty() {
            return;
        }
        let mut pending = lock(&self.pending);
        for back in backs {
            if pending.len() >= MAX_PENDING {
                pending.pop_front();
            }
            pending.push_back(back);
        }
    }

    /// Takes the leases that are idle or over, and the queued give-backs.
    fn sweep(&self, now: Instant) -> Vec<GiveBack> {
        let mut backs: Vec<GiveBack> = std::mem::take(&mut *lock(&self.pending)).into();
        let mut slots = lock(&self.slots);
        // The least recently used come first: stop at the first one in use.
        while let Some((key, slot)) =
            slots.pop_oldest_if(|slot| slot.last_used + LEASE_IDLE <= now || slot.over(now))
        {
            // A lease being refilled is in use (`last_used` was just set).
            backs.extend(slot.give_backs(&key, now));
        }
        backs
    }

    /// Every lease, ended now.
    fn drain(&self, now: Instant) -> Vec<GiveBack> {
        let mut backs: Vec<GiveBack> = std::mem::take(&mut *lock(&self.pending)).into();
        let all = lock(&self.slots).drain();
        for (key, slot) in all {
            backs.extend(slot.give_backs(&key, now));
        }
        backs
    }

    /// Gives every lease's unused units back to Redis now, those of
    /// refills under way included: they are waited for, at most one command
    /// timeout (while requests go on, new ones can keep starting; units
    /// that arrive later go back with the next sweep).
    pub(crate) async fn return_all(&self) {
        let refills_end = async {
            loop {
                let ended = self.in_flight_ended.notified();
                let mut ended = std::pin::pin!(ended);
                // Registered before the count is read: a refill that ends
                // in between still wakes this call.
                ended.as_mut().enable();
                if self.in_flight.load(Ordering::Acquire) == 0 {
                    break;
                }
                ended.await;
            }
        };
        let _ = tokio::time::timeout(self.redis.command_timeout(), refills_end).await;
        let backs = self.drain(Instant::now());
        give_back_all(&self.redis, backs).await;
    }

    /// Entries held, the bytes they are counted for, and the bytes allocated.
    #[cfg(test)]
    fn footprint(&self) -> (u64, u64, u64) {
        let slots = lock(&self.slots);
        (slots.len() as u64, slots.bytes(), slots.allocated_bytes())
    }
}

async fn give_back_all(redis: &RedisStore, backs: Vec<GiveBack>) {
    for back in backs {
        if let Err(error) = redis
            .give_back(&back.key, back.algorithm, back.unused, back.window)
            .await
        {
            tracing::debug!(
                target: "tower_redis_ratelimit",
                %error,
                unused = back.unused,
                "could not give leased units back; they stay counted until their window or period ends"
            );
        }
    }
}

/// The layer went away: its leases go back, from a task of their own.
impl Drop for Leases {
    fn drop(&mut self) {
        let backs = self.drain(Instant::now());
        if backs.is_empty() {
            return;
        }
        let redis = self.redis.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { give_back_all(&redis, backs).await });
        }
    }
}

/// Sweeps idle and ended leases back to Redis while the leases live.
fn start_sweeper(leases: &Arc<Leases>) {
    if leases.sweeping.load(Ordering::Relaxed) || leases.sweeping.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        leases.sweeping.store(false, Ordering::Release);
        return;
    };
    let weak: Weak<Leases> = Arc::downgrade(leases);
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(LEASE_IDLE / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(leases) = weak.upgrade() else { break };
            let backs = leases.sweep(Instant::now());
            let redis = leases.redis.clone();
            // Not held across the give-backs: dropping the layer ends them.
            drop(leases);
            give_back_all(&redis, backs).await;
        }
    });
}

impl Limiter {
    /// Decides a request with at least one leased policy: each leased
    /// policy from its lease (refilled when spent), then the others as any
    /// request, all or nothing.
    pub(super) async fn decide_leased(
        self: &Arc<Self>,
        leases: &Arc<Leases>,
        checks: &[Check],
        cost: u32,
    ) -> Verdict {
        let mut states: States = States::from_elem(None, checks.len());
        let mut taken: Vec<(usize, i64)> = Vec::new();
        let put_back = |taken: &[(usize, i64)]| {
            for &(i, window) in taken {
                leases.put_back(&checks[i].key, cost, window);
            }
        };
        for (i, check) in checks.iter().enumerate() {
            let Some(lease) = check.lease else { continue };
            match self.spend_leased(leases, check, lease, checks, cost).await {
                LeaseOutcome::Granted(state, window) => {
                    states[i] = Some(state);
                    taken.push((i, window));
                }
                LeaseOutcome::Denied(state) => {
                    put_back(&taken);
                    states[i] = Some(state);
                    return Verdict {
                        allowed: false,
                        states,
                        source: DecisionSource::Redis,
                    };
                }
                LeaseOutcome::Fallback(verdict) => {
                    put_back(&taken);
                    return verdict;
                }
            }
        }
        if taken.len() == checks.len() {
            return Verdict {
                allowed: true,
                states,
                source: DecisionSource::Lease,
            };
        }
        let plain: Vec<Check> = checks
            .iter()
            .filter(|c| c.lease.is_none())
            .cloned()
            .collect();
        let verdict = self.decide_shared(&plain, cost).await;
        if !verdict.allowed {
            put_back(&taken);
        }
        let mut plain_states = verdict.states.into_iter();
        for (check, state) in checks.iter().zip(&mut states) {
            if check.lease.is_none() {
                *state = plain_states.next().flatten();
            }
        }
        Verdict {
            allowed: verdict.allowed,
            states,
            source: verdict.source,
        }
    }

    /// One leased policy of a request: spend here, or refill (one refill
    /// per counter at a time), or the fallback while Redis is unavailable.
    async fn spend_leased(
        self: &Arc<Self>,
        leases: &Arc<Leases>,
        check: &Check,
        lease: u32,
        checks: &[Check],
        cost: u32,
    ) -> LeaseOutcome {
        let gate = match leases.try_spend(check, cost) {
            Ok((state, window)) => return LeaseOutcome::Granted(state, window),
            Err(gate) => gate,
        };
        if !self.manager.is_available() {
            // Nothing to refill from: the fallback at once, as without a
            // lease (no queue behind the gate).
            return LeaseOutcome::Fallback(self.failover.without_redis(checks, cost).await);
        }
        let mut gate = gate;
        let refilling = loop {
            // This request's turn to refill, or the end of the refill it
            // waited for.
            let refilling = gate.enter().await;
            // That refill failed: this request has waited for Redis as
            // long as it may (one command timeout), so it does not refill
            // in turn.
            let failed = refilling.is_none() && gate.failed();
            // A refill (the one waited for, or one that ended since this
            // request looked) may have brought enough, or been denied (then
            // remembered for a moment: no call per waiter).
            match leases.try_spend(check, cost) {
                Ok((state, window)) => return LeaseOutcome::Granted(state, window),
                Err(next) => gate = next,
            }
            if let Some(denied) = self.blocked.verdict(std::slice::from_ref(check), cost)
                && let Some(Some(state)) = denied.states.first()
            {
                return LeaseOutcome::Denied(*state);
            }
            if let Some(refilling) = refilling {
                break refilling;
            }
            if failed || !self.manager.is_available() {
                // The refill waited for failed, or found Redis gone: the
                // fallback at once, as above (no queue behind the gate).
                return LeaseOutcome::Fallback(self.failover.without_redis(checks, cost).await);
            }
        };
        start_sweeper(leases);
        let _in_flight = InFlight::enter(leases);
        let want = u64::from(lease.max(cost));
        let sent = Instant::now();
        match self.failover.lease(check, want, checks, cost).await {
            Ok(reply) if reply.granted >= u64::from(cost) => {
                match leases.add(check, &reply, sent, cost) {
                    Some((state, window)) => LeaseOutcome::Granted(state, window),
                    // Evicted at once (a map too small for one entry): the
                    // units stay counted; the request is denied.
                    None => LeaseOutcome::Denied(PolicyState {
                        retry_after: Some(Duration::from_secs(1)),
                        ..reply.state
                    }),
                }
            }
            Ok(reply) => {
                let state = PolicyState {
                    retry_after: Some(reply.state.retry_after.unwrap_or(Duration::from_secs(1))),
                    ..reply.state
                };
                // Remembered before the gate opens for the next waiter.
                self.blocked.remember_for(
                    std::slice::from_ref(check),
                    cost,
                    &[Some(state)],
                    Some(LEASE_RECHECK),
                );
                LeaseOutcome::Denied(state)
            }
            Err(verdict) => {
                // Those waiting for it take the fallback too.
                refilling.fail();
                LeaseOutcome::Fallback(verdict)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_redis_core::RedisManager;

    const HOUR: Duration = Duration::from_secs(3600);

    fn leased(key: &str) -> Check {
        Check {
            key: std::sync::Arc::from(key),
            algorithm: Algorithm::FixedWindow {
                limit: 1000,
                window: HOUR,
            },
            lease: Some(100),
        }
    }

    fn reply(granted: u64, window: i64) -> LeaseReply {
        LeaseReply {
            granted,
            state: PolicyState {
                remaining: 900,
                reset: HOUR / 2,
                retry_after: None,
            },
            window,
        }
    }

    fn leases(max_bytes: u64) -> Arc<Leases> {
        Arc::new(Leases::new(
            RedisStore::new(RedisManager::disabled()),
            max_bytes,
        ))
    }

    /// One refill at a time: of the requests that find a lease empty, one
    /// refills and the others wait, all woken together when its refill
    /// ends (here it is dropped, as a cancelled request's would be); then
    /// another may refill.
    #[tokio::test]
    async fn a_refill_is_one_at_a_time_and_its_end_wakes_every_waiter() {
        use std::sync::atomic::AtomicUsize;
        let gate = Arc::new(Gate::default());
        let refilling = gate.enter().await.expect("the first request refills");
        let woken = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::new();
        for _ in 0..8 {
            let (gate, woken) = (Arc::clone(&gate), Arc::clone(&woken));
            waiters.push(tokio::spawn(async move {
                let second = gate.enter().await;
                assert!(second.is_none(), "a second refill while one is under way");
                woken.fetch_add(1, Ordering::SeqCst);
            }));
        }
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            woken.load(Ordering::SeqCst),
            0,
            "woken before the refill ended"
        );
        drop(refilling);
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .expect("a waiter was not woken")
                .expect("waiter");
        }
        assert_eq!(woken.load(Ordering::SeqCst), 8);
        assert!(gate.enter().await.is_some(), "the gate stayed shut");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_spent_locally_and_ends_with_its_window() {
        let leases = leases(1 << 20);
        let check = leased("k");
        assert!(leases.try_spend(&check, 1).is_err(), "nothing leased yet");
        let sent = Instant::now();
        let (state, window) = leases.add(&check, &reply(100, 7), sent, 1).expect("spent");
        assert_eq!((state.remaining, window), (99 + 900, 7));
        for _ in 0..99 {
            assert!(leases.try_spend(&check, 1).is_ok());
        }
        assert!(leases.try_spend(&check, 1).is_err(), "the lease is spent");

        // A new lease; its window ends half an hour after it was sent.
        leases
            .add(&check, &reply(100, 7), Instant::now(), 1)
            .expect("spent");
        tokio::time::advance(HOUR / 2 - Duration::from_millis(1)).await;
        assert!(leases.try_spend(&check, 1).is_ok());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            leases.try_spend(&check, 1).is_err(),
            "a unit of an ended window is never spent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_leases_are_swept_back_and_busy_ones_are_kept() {
        let leases = leases(1 << 20);
        let (idle, busy) = (leased("idle"), leased("busy"));
        leases
            .add(&idle, &reply(100, 1), Instant::now(), 1)
            .expect("spent");
        leases
            .add(&busy, &reply(100, 1), Instant::now(), 1)
            .expect("spent");
        tokio::time::advance(LEASE_IDLE / 2).await;
        leases.try_spend(&busy, 1).expect("busy spends");
        assert!(leases.sweep(Instant::now()).is_empty(), "nothing idle yet");
        tokio::time::advance(LEASE_IDLE / 2).await;
        let backs = leases.sweep(Instant::now());
        assert_eq!(backs.len(), 1, "{backs:?}");
        assert_eq!((&*backs[0].key, backs[0].unused), ("idle", 99));
        tokio::time::advance(LEASE_IDLE / 2).await;
        let backs = leases.sweep(Instant::now());
        assert_eq!((backs.len(), backs[0].unused), (1, 98));
        assert_eq!(leases.footprint().0, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn units_put_back_after_another_policy_denied_are_spent_again() {
        let leases = leases(1 << 20);
        let check = leased("k");
        leases
            .add(&check, &reply(2, 3), Instant::now(), 1)
            .expect("spent");
        let (_, window) = leases.try_spend(&check, 1).expect("the second unit");
        leases.put_back(&check.key, 1, window);
        assert!(leases.try_spend(&check, 1).is_ok());
        assert!(leases.try_spend(&check, 1).is_err());
        // A unit of another window is not put back.
        leases.put_back(&check.key, 1, window + 1);
        assert!(leases.try_spend(&check, 1).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn two_leased_policies_are_spent_all_or_nothing() {
        let leases = leases(1 << 20);
        let (first, second) = (leased("first"), leased("second"));
        leases
            .add(&first, &reply(3, 1), Instant::now(), 1)
            .expect("spent");
        let both = [first.clone(), second.clone()];
        assert!(leases.spend_all(&both, 1).is_none(), "second has no units");
        leases
            .add(&second, &reply(2, 1), Instant::now(), 1)
            .expect("spent");
        // first still has its 2 units: nothing was taken by the failed try.
        let verdict = leases.spend_all(&both, 1).expect("both spend");
        assert!(verdict.allowed && verdict.source == DecisionSource::Lease);
        assert!(leases.try_spend(&first, 1).is_ok());
        assert!(leases.try_spend(&first, 1).is_err());
    }

    /// Units taken ahead wait until the lease's own cannot pay a request,
    /// then are spent within their own window and end; what was left of
    /// the others (fewer than the request's cost) goes back to Redis. Both
    /// lots go back when the lease leaves, and a lease whose own units
    /// ended but whose next lot holds is not swept.
    #[tokio::test(start_paused = true)]
    async fn units_taken_ahead_are_spent_after_the_leases_own_within_their_own_window() {
        let leases = leases(1 << 20);
        let check = leased("k");
        leases
            .add(&check, &reply(3, 7), Instant::now(), 1)
            .expect("spent");
        leases.add_ahead(
            &check.key,
            &gate_of(&leases, &check),
            check.algorithm,
            &reply(50, 8),
            Instant::now(),
        );
        // 2 units of window 7 left; a request of cost 2 takes them.
        assert_eq!(leases.try_spend(&check, 2).expect("spent").1, 7);
        assert_eq!(leases.try_spend(&check, 1).expect("spent").1, 8);
        assert!(lock(&leases.pending).is_empty(), "nothing was left");

        // Again, with a unit left that cannot pay a request of cost 2.
        leases.add_ahead(
            &check.key,
            &gate_of(&leases, &check),
            check.algorithm,
            &reply(10, 9),
            Instant::now(),
        );
        for _ in 0..48 {
            assert_eq!(leases.try_spend(&check, 1).expect("spent").1, 8);
        }
        assert_eq!(leases.try_spend(&check, 2).expect("spent").1, 9);
        let backs: Vec<GiveBack> = lock(&leases.pending).drain(..).collect();
        assert_eq!(backs.len(), 1, "{backs:?}");
        assert_eq!((backs[0].unused, backs[0].window), (1, 8));

        // The lease's own units end (half an hour: the reply's reset); the
        // next lot, taken later, still holds.
        tokio::time::advance(HOUR / 4).await;
        leases.add_ahead(
            &check.key,
            &gate_of(&leases, &check),
            check.algorithm,
            &reply(5, 10),
            Instant::now(),
        );
        tokio::time::advance(HOUR / 4).await;
        let now = Instant::now();
        {
            let mut slots = lock(&leases.slots);
            let slot = slots.get_mut(&check.key).expect("kept");
            assert!(slot.lot.expires <= now && !slot.over(now));
        }
        assert_eq!(leases.try_spend(&check, 1).expect("spent").1, 10);
        // Both lots go back when the lease leaves.
        leases.add_ahead(
            &check.key,
            &gate_of(&leases, &check),
            check.algorithm,
            &reply(6, 10),
            Instant::now(),
        );
        let backs = leases.drain(Instant::now());
        let unused: Vec<(u64, i64)> = backs.iter().map(|b| (b.unused, b.window)).collect();
        assert_eq!(unused, [(4, 10), (6, 10)]);
    }

    /// A refill ahead is asked for once a lease is down to a quarter of
    /// its size, once per lot, for what brings the units held back to the
    /// lease's size.
    #[test]
    fn a_refill_ahead_is_asked_for_at_a_quarter_once_per_lot() {
        let now = Instant::now();
        let mut slot = Slot::empty(leased("k").algorithm, now);
        slot.lot.tokens = 26;
        assert!(!slot.wants_ahead(100));
        slot.lot.tokens = 25;
        assert!(slot.wants_ahead(100));
        assert_eq!(slot.ahead_want(100), 75);
        slot.ahead = true;
        slot.lot.tokens = 3;
        assert!(!slot.wants_ahead(100), "once per lot");
        slot.ahead = false;
        slot.next = Some(Box::new(slot.lot.clone()));
        assert!(!slot.wants_ahead(100), "units are already ahead");
        assert_eq!(slot.ahead_want(100), 94, "both lots count as held");
        slot.next = None;
        slot.lot.tokens = 0;
        assert!(slot.wants_ahead(1));
        assert_eq!(slot.ahead_want(1), 1);
        slot.lot.tokens = 101;
        assert_eq!(slot.ahead_want(100), 0, "never more than the lease's size");
    }

    /// Units taken ahead for a lease that has gone since (swept, evicted,
    /// returned) go back to Redis, even when a new lease of the same key
    /// has begun: they are not added to it.
    #[tokio::test(start_paused = true)]
    async fn units_taken_ahead_for_a_lease_gone_since_go_back() {
        let leases = leases(1 << 20);
        let check = leased("k");
        leases
            .add(&check, &reply(10, 7), Instant::now(), 1)
            .expect("spent");
        let asked_for = gate_of(&leases, &check);
        drop(leases.drain(Instant::now()));
        leases
            .add(&check, &reply(10, 7), Instant::now(), 1)
            .expect("spent");
        leases.add_ahead(
            &check.key,
            &asked_for,
            check.algorithm,
            &reply(5, 7),
            Instant::now(),
        );
        let backs: Vec<GiveBack> = lock(&leases.pending).drain(..).collect();
        assert_eq!(backs.len(), 1, "{backs:?}");
        assert_eq!((backs[0].unused, backs[0].window), (5, 7));
        assert!(
            lock(&leases.slots)
                .get_mut(&check.key)
                .expect("the new lease")
                .next
                .is_none()
        );
        assert_eq!(leases.ahead_want(&check.key, &asked_for, 100), None);
    }

    /// Returning the leases waits for a refill under way: its units,
    /// arriving meanwhile, go back with the rest instead of staying here.
    #[tokio::test(start_paused = true)]
    async fn returning_the_leases_waits_for_a_refill_under_way() {
        use std::future::Future as _;
        use std::task::Poll;
        let leases = leases(1 << 20);
        let check = leased("k");
        leases
            .add(&check, &reply(10, 7), Instant::now(), 1)
            .expect("spent");
        let gate = gate_of(&leases, &check);
        let in_flight = InFlight::enter(&leases);
        let mut returned = std::pin::pin!(leases.return_all());
        assert!(
            std::future::poll_fn(|cx| Poll::Ready(returned.as_mut().poll(cx)))
                .await
                .is_pending(),
            "returned with a refill under way"
        );
        leases.add_ahead(
            &check.key,
            &gate,
            check.algorithm,
            &reply(5, 7),
            Instant::now(),
        );
        drop(in_flight);
        tokio::time::timeout(Duration::from_secs(10), returned)
            .await
            .expect("returned once the refill ended");
        assert_eq!(leases.footprint().0, 0, "a lease is left");
        assert!(lock(&leases.pending).is_empty(), "units wait for a sweep");
    }

    /// The gate of `check`'s lease.
    fn gate_of(leases: &Leases, check: &Check) -> Arc<Gate> {
        let mut slots = lock(&leases.slots);
        Arc::clone(&slots.get_mut(&check.key).expect("a lease").gate)
    }

    /// A leased per-client policy: one lease per client, so an attacker
    /// rotating keys could grow the map. It stays within its byte bound;
    /// evicted leases' units are queued to go back (bounded too); a client
    /// that keeps spending keeps its lease.
    #[tokio::test(start_paused = true)]
    async fn leases_of_rotating_keys_stay_within_their_byte_bound() {
        const BOUND: u64 = 1 << 20;
        let leases = leases(BOUND);
        let regular = leased("p:{rl}:rl:tenant:fw2:k:regular");
        leases
            .add(&regular, &reply(1000, 1), Instant::now(), 1)
            .expect("spent");
        for n in 0..200_000u32 {
            let check = leased(&format!("p:{{rl}}:rl:tenant:fw2:k:client-{n}"));
            assert!(leases.try_spend(&check, 1).is_err());
            leases
                .add(&check, &reply(100, 1), Instant::now(), 1)
                .expect("spent");
            if n % 1000 == 0 {
                let spent = leases.try_spend(&regular, 1);
                assert!(
                    spent.is_ok(),
                    "{n}: the regular keeps its lease ({:?})",
                    leases.footprint()
                );
                let (_, bytes, allocated) = leases.footprint();
                assert!(
                    bytes <= BOUND && allocated <= BOUND,
                    "{n}: {bytes} / {allocated}"
                );
            }
        }
        let (entries, bytes, allocated) = leases.footprint();
        assert!(entries > 1000, "{entries}");
        assert!(
            bytes <= BOUND && allocated <= BOUND,
            "{bytes} / {allocated}"
        );
        assert_eq!(lock(&leases.pending).len(), MAX_PENDING);
    }
}
