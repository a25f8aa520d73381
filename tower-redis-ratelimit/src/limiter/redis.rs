//! The shared counters: one script call (`decide.lua`) decides a batch of
//! requests, and its reply is parsed into verdicts.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use tower_redis_core::degrade::{NoChange, Replay, ReplayError};
use tower_redis_core::redis::{self, Script};
use tower_redis_core::{Error, RedisConnection, RedisManager};

use super::{Check, DecisionSource, DecisionStore, PolicyState, Query, Verdict};
use crate::algorithm::{Algorithm, CounterState, micros};

static DECIDE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("decide.lua")));
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lease.lua")));

/// What `lease.lua` answered to a take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseReply {
    /// Units taken for this instance (0: denied).
    pub(crate) granted: u64,
    /// How the policy stands on Redis after the lease.
    pub(crate) state: PolicyState,
    /// The window index the units belong to (0 for GCRA).
    pub(crate) window: i64,
}

/// The counters in Redis, reached through the manager (breaker, timeout).
#[derive(Debug, Clone)]
pub(crate) struct RedisStore {
    manager: RedisManager,
}

impl RedisStore {
    pub(crate) fn new(manager: RedisManager) -> Self {
        Self { manager }
    }

    /// The manager's command timeout.
    pub(crate) fn command_timeout(&self) -> std::time::Duration {
        self.manager.command_timeout()
    }

    /// Redis is believed reachable (the breaker is not open).
    pub(crate) fn is_available(&self) -> bool {
        self.manager.is_available()
    }
}

impl DecisionStore for RedisStore {
    /// Why Redis did not decide (the breaker is open, a timeout, an error).
    type Error = Error;

    /// One script call through [`RedisManager::run`], which accounts the
    /// outcome to the breaker; the failover chooses what to do on an error.
    async fn decide(&self, batch: &[Query<'_>]) -> Result<Vec<Verdict>, Error> {
        self.manager
            .run(|conn| async move { decide_on_redis(conn, batch).await })
            .await
    }
}

impl RedisStore {
    /// Takes up to `want` units (at least `min`, else none) of one counter
    /// for this instance: one script call.
    pub(crate) async fn lease(
        &self,
        key: &str,
        algorithm: Algorithm,
        want: u64,
        min: u32,
    ) -> Result<LeaseReply, Error> {
        self.manager
            .run(|mut conn| async move {
                let reply = lease_call(&mut conn, key, algorithm, 1, want, i64::from(min)).await?;
                parse_lease(&reply)
            })
            .await
    }

    /// Gives `unused` units taken in `window` back to one counter.
    pub(crate) async fn give_back(
        &self,
        key: &str,
        algorithm: Algorithm,
        unused: u64,
        window: i64,
    ) -> Result<(), Error> {
        self.manager
            .run(|mut conn| async move {
                lease_call(&mut conn, key, algorithm, 2, unused, window).await?;
                Ok(())
            })
            .await
    }
}

/// One `lease.lua` call on `key`: mode 1 takes `count` units (at least
/// `extra`), mode 2 gives `count` units of window `extra` back.
async fn lease_call(
    conn: &mut RedisConnection,
    key: &str,
    algorithm: Algorithm,
    mode: u8,
    count: u64,
    extra: i64,
) -> redis::RedisResult<Vec<i64>> {
    let (kind, a, b) = algorithm.script_args();
    let mut cmd = tower_redis_core::script_cmd(&LEASE, &[key], 6, 64);
    cmd.arg(mode)
        .arg(kind)
        .arg(a.to_string())
        .arg(b.to_string())
        .arg(count)
        .arg(extra);
    tower_redis_core::query_script(conn, &LEASE, &cmd).await
}

fn parse_lease(reply: &[i64]) -> redis::RedisResult<LeaseReply> {
    let &[granted, remaining, reset, retry, window] = reply else {
        return Err(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "lease script answered with the wrong number of values",
            format!("expected 5, got {}", reply.len()),
        )));
    };
    let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
    Ok(LeaseReply {
        granted: u64::try_from(granted).unwrap_or(0),
        state: PolicyState {
            remaining: u64::try_from(remaining).unwrap_or(0),
            reset: us(reset),
            retry_after: (retry > 0).then(|| us(retry)),
        },
        window,
    })
}

/// Counters are not replayed: what the local limiter counted during an
/// outage is dropped, and Redis's counters apply again.
impl Replay for RedisStore {
    type Change = NoChange;

    async fn replay(&self, _: &RedisManager, _: &[NoChange]) -> Result<(), ReplayError> {
        Ok(())
    }
}

/// One EVALSHA for a batch of requests and all their checks: the whole
/// decision of each in one round trip.
async fn decide_on_redis(
    mut conn: RedisConnection,
    requests: &[Query<'_>],
) -> redis::RedisResult<Vec<Verdict>> {
    let (keys, numbers) = encode_batch(requests);
    let mut cmd = tower_redis_core::script_cmd(&DECIDE, &keys, 1, numbers.len());
    cmd.arg(numbers);
    let reply: Vec<u8> = tower_redis_core::query_script(&mut conn, &DECIDE, &cmd).await?;
    parse_reply(&reply, requests)
}

/// The script's `KEYS` (the distinct counters of the batch) and its one
/// argument: every number it needs, packed as little-endian `f64`s, which
/// Lua reads with `struct.unpack` at a fraction of the cost of parsing
/// decimal strings (see `decide.lua` for the layout). The group count,
/// which precedes the groups, is written once known.
fn encode_batch<'q>(requests: &[Query<'q>]) -> (Vec<&'q str>, Vec<u8>) {
    let counters = Counters::of(requests);
    let checks: usize = requests.iter().map(|(checks, _)| checks.len()).sum();
    // At most: a policy per counter, the group count, and per request a
    // group head (count, cost, n) and its indexes.
    let mut numbers =
        Vec::with_capacity(8 * (3 * counters.list.len() + 1 + 3 * requests.len() + checks));
    let push = |numbers: &mut Vec<u8>, value: f64| numbers.extend_from_slice(&value.to_le_bytes());
    // Each distinct counter, in order of first use, with its policy.
    for check in &counters.list {
        let (kind, a, b) = check.algorithm.script_args();
        for value in [f64::from(kind), a, b] {
            push(&mut numbers, value);
        }
    }
    // Consecutive requests with the same cost and counters go as one group.
    let groups_at = numbers.len();
    push(&mut numbers, 0.0);
    let mut groups = 0;
    for ((checks, cost), count) in groups_of(requests) {
        groups += 1;
        push(&mut numbers, exact(count));
        push(&mut numbers, f64::from(*cost));
        push(&mut numbers, exact(checks.len()));
        for check in *checks {
            push(&mut numbers, exact(counters.index_of(check) + 1));
        }
    }
    numbers[groups_at..groups_at + 8].copy_from_slice(&exact(groups).to_le_bytes());
    let keys = counters.list.iter().map(|check| &*check.key).collect();
    (keys, numbers)
}

/// Counts and indexes are small integers: exact as `f64`.
#[allow(clippy::cast_precision_loss)]
fn exact(n: usize) -> f64 {
    n as f64
}

/// The distinct counters of a batch, in order of first use (the script's
/// `KEYS`), each with the check that first named it (its policy).
struct Counters<'q> {
    list: Vec<&'q Check>,
    /// Each counter's index in `list`, past a few counters (a batch of
    /// many clients has as many): a lone request's few are compared one by
    /// one.
    index: Option<HashMap<&'q str, usize>>,
}

impl<'q> Counters<'q> {
    fn of(requests: &[Query<'q>]) -> Self {
        let checks: usize = requests.iter().map(|(checks, _)| checks.len()).sum();
        let mut counters = Self {
            list: Vec::with_capacity(checks),
            index: (checks > 8).then(|| HashMap::with_capacity(checks)),
        };
        for (checks, _) in requests {
            for check in *checks {
                let new = match &mut counters.index {
                    Some(index) => {
                        let next = counters.list.len();
                        *index.entry(&*check.key).or_insert(next) == next
                    }
                    None => !counters.list.iter().any(|known| known.key == check.key),
                };
                if new {
                    counters.list.push(check);
                }
            }
        }
        counters
    }

    /// Where `check`'s counter is (0-based).
    fn index_of(&self, check: &Check) -> usize {
        match &self.index {
            Some(index) => index.get(&*check.key).copied(),
            None => self.list.iter().position(|known| known.key == check.key),
        }
        .unwrap_or(0)
    }
}

/// The groups of a batch: runs of consecutive requests with the same cost
/// and counters, each as its first request and its length.
fn groups_of<'a, 'q>(requests: &'a [Query<'q>]) -> impl Iterator<Item = (&'a Query<'q>, usize)> {
    let mut rest = requests;
    std::iter::from_fn(move || {
        let (first, others) = rest.split_first()?;
        let (checks, cost) = first;
        let count = 1 + others
            .iter()
            .take_while(|(other, other_cost)| {
                other_cost == cost
                    && other.len() == checks.len()
                    && other.iter().zip(checks.iter()).all(|(o, c)| o.key == c.key)
            })
            .count();
        rest = &rest[count..];
        Some((first, count))
    })
}

/// What a batch's reply starts with (a lone request's starts with 0 or 1).
const BATCH_REPLY: [u8; 8] = (-1.0f64).to_le_bytes();

/// The largest number the script answers (its `BIG`): remaining counts and
/// durations (µs) are capped here.
const BIG: u64 = 99_999_999_999_999;

/// The script's reply: little-endian doubles (see `decide.lua`). A lone
/// request's: all integers, allowed, then per check remaining, reset and
/// retry (µs); read in place, no number is parsed from text. A batch's: see
/// [`parse_batch_reply`].
fn parse_reply(reply: &[u8], requests: &[Query<'_>]) -> redis::RedisResult<Vec<Verdict>> {
    if reply.get(..8) == Some(&BATCH_REPLY[..]) {
        return parse_batch_reply(reply, requests);
    }
    let expected: usize = requests
        .iter()
        .map(|(checks, _)| 8 * (1 + 3 * checks.len()))
        .sum();
    if reply.len() != expected {
        return Err(wrong_reply(format!(
            "expected {expected} bytes, got {}",
            reply.len()
        )));
    }
    let mut numbers = reply.chunks_exact(8).map(|bytes| whole(double(bytes)));
    let mut next = || numbers.next().unwrap_or(0);
    let us = Duration::from_micros;
    let mut verdicts = Vec::with_capacity(requests.len());
    for (checks, _) in requests {
        let allowed = next() == 1;
        let states = checks
            .iter()
            .map(|_| {
                let (remaining, reset, retry) = (next(), next(), next());
                Some(PolicyState {
                    remaining,
                    reset: us(reset),
                    retry_after: (retry > 0).then(|| us(retry)),
                })
            })
            .collect();
        verdicts.push(Verdict {
            allowed,
            states,
            source: DecisionSource::Redis,
        });
    }
    Ok(verdicts)
}

/// A batch's reply: the marker, the server's time (µs), per counter its
/// state before the batch (a GCRA time and 0, or a window's current and
/// previous counts, already in the window the time falls in), then per
/// group how many of its requests Redis allowed (the first ones). Each
/// request's numbers are worked out here, request after request as the
/// script went, with its arithmetic ([`Algorithm::decide`], and
/// [`Algorithm::decide_gcra_in_batch`] for a GCRA counter); the script
/// only decides and writes, which under load was a fraction of its time.
fn parse_batch_reply(reply: &[u8], requests: &[Query<'_>]) -> redis::RedisResult<Vec<Verdict>> {
    let counters = Counters::of(requests);
    let expected = 8 * (2 + 2 * counters.list.len() + groups_of(requests).count());
    if reply.len() != expected {
        return Err(wrong_reply(format!(
            "expected {expected} bytes for a batch, got {}",
            reply.len()
        )));
    }
    let number = |i: usize| double(&reply[8 * i..8 * i + 8]);
    let now = number(1);
    let mut states: Vec<Option<CounterState>> = counters
        .list
        .iter()
        .enumerate()
        .map(|(i, check)| {
            let (first, second) = (number(2 + 2 * i), number(3 + 2 * i));
            Some(match check.algorithm {
                Algorithm::Gcra { .. } => CounterState::Tat(first),
                Algorithm::SlidingWindow { window, .. } | Algorithm::FixedWindow { window, .. } => {
                    CounterState::Window {
                        index: (now / micros(window)).floor(),
                        current: first,
                        previous: second,
                    }
                }
            })
        })
        .collect();
    // The units the batch allowed on each GCRA counter so far (the
    // script's s2 for such a counter).
    let mut units = vec![0.0; counters.list.len()];
    let mut verdicts = Vec::with_capacity(requests.len());
    for (at, ((checks, cost), count)) in (2 + 2 * counters.list.len()..).zip(groups_of(requests)) {
        let allowed = number(at);
        if !(allowed >= 0.0 && allowed <= exact(count) && allowed.fract() == 0.0) {
            return Err(wrong_reply(format!(
                "{allowed} of a group of {count} allowed"
            )));
        }
        let cost = f64::from(*cost);
        for j in 0..count {
            let allowed = exact(j) < allowed;
            // Each counter's policy as the script had it: the one of the
            // check that first named it. An allowed request counts on each
            // (the script's commit); a request's counters are distinct (its
            // policies' names are), so each sees the state before it.
            let mut denied_here = false;
            let decided: super::States = checks
                .iter()
                .map(|check| {
                    let k = counters.index_of(check);
                    let algorithm = counters.list[k].algorithm;
                    if let Some((state, fits)) =
                        algorithm.decide_gcra_in_batch(states[k], units[k], now, cost)
                    {
                        if !fits {
                            denied_here = true;
                        } else if allowed {
                            units[k] += cost;
                        }
                        return Some(capped(state));
                    }
                    let (state, counter) = algorithm.decide(states[k], now, cost);
                    match counter {
                        Some(counter) if allowed => states[k] = Some(counter.state),
                        Some(_) => {}
                        None => denied_here = true,
                    }
                    Some(capped(state))
                })
                .collect();
            // The script and this arithmetic must agree on every request;
            // they cannot differ but through a corrupt reply, which is an
            // error (Redis has counted the batch by then: the fallback that
            // answers instead counts it once more, in process).
            if allowed == denied_here {
                return Err(wrong_reply(format!(
                    "Redis {} a request its policies {}",
                    if allowed { "allowed" } else { "denied" },
                    if allowed { "deny" } else { "allow" },
                )));
            }
            verdicts.push(Verdict {
                allowed,
                states: decided,
                source: DecisionSource::Redis,
            });
        }
    }
    Ok(verdicts)
}

/// A state as the script would answer it: numbers capped at [`BIG`].
fn capped(state: PolicyState) -> PolicyState {
    let big = Duration::from_micros(BIG);
    PolicyState {
        remaining: state.remaining.min(BIG),
        reset: state.reset.min(big),
        retry_after: state.retry_after.map(|retry| retry.min(big)),
    }
}

fn double(bytes: &[u8]) -> f64 {
    let mut double = [0; 8];
    double.copy_from_slice(bytes);
    f64::from_le_bytes(double)
}

fn wrong_reply(detail: String) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "rate-limit script answered what this version does not read",
        detail,
    ))
}

/// A number of the reply as an unsigned integer: a negative one (or one
/// that is not a number) is 0, a fraction is dropped, and one beyond
/// `u64` is its maximum.
fn whole(number: f64) -> u64 {
    if number.is_nan() || number <= 0.0 {
        return 0;
    }
    // Saturating, by the definition of `as` from a float.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let whole = number as u64;
    whole
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Check;

    #[test]
    fn malformed_script_reply_is_an_error_not_a_panic() {
        let check = Check {
            key: std::sync::Arc::from("k"),
            algorithm: Algorithm::FixedWindow {
                limit: 1,
                window: Duration::from_secs(1),
            },
            lease: None,
        };
        let one: &[Check] = std::slice::from_ref(&check);
        assert!(parse_reply(&packed(&[1.0, 2.0]), &[(one, 1)]).is_err());
        assert!(parse_reply(&packed(&[1.0]), &[]).is_err());
        // Not whole doubles.
        assert!(parse_reply(&[0; 31], &[(one, 1)]).is_err());
        assert!(parse_reply(b"1,0,1000000,500000", &[(one, 1)]).is_err());
        let denied = packed(&[0.0, 0.0, 1e6, 5e5]);
        assert!(parse_reply(&denied, &[(one, 1), (one, 1)]).is_err());
        let ok = parse_reply(&denied, &[(one, 1)]).expect("well formed");
        assert!(!ok[0].allowed);
        assert_eq!(
            ok[0].states[0].and_then(|s| s.retry_after),
            Some(Duration::from_millis(500))
        );
        let two = parse_reply(
            &packed(&[1.0, 3.0, 10.0, 0.0, 0.0, 0.0, 20.0, 7.0]),
            &[(one, 1), (one, 1)],
        )
        .expect("two requests");
        assert!(two[0].allowed && !two[1].allowed);
        assert_eq!(
            two[1].states[0].map(|s| s.reset),
            Some(Duration::from_micros(20))
        );
        // Out of range: a negative number or NaN is 0, a huge one saturates.
        let odd =
            parse_reply(&packed(&[1.0, -4.0, f64::NAN, 1e300]), &[(one, 1)]).expect("well formed");
        let state = odd[0].states[0].expect("a state");
        assert_eq!(
            (state.remaining, state.reset, state.retry_after),
            (0, Duration::ZERO, Some(Duration::from_micros(u64::MAX)))
        );
        // A batch's reply: the marker, the server's time, the counter's
        // state, how many of the group (two requests) were allowed.
        let batch = [(one, 1), (one, 1)];
        let reply = |allowed: f64| packed(&[-1.0, 1.7e15, 0.0, 0.0, allowed]);
        assert!(parse_reply(&packed(&[-1.0, 1.7e15]), &batch).is_err());
        for wrong in [3.0, -1.0, 0.5, f64::NAN] {
            assert!(parse_reply(&reply(wrong), &batch).is_err(), "{wrong}");
        }
        // The limit is 1: Redis cannot have allowed both, nor denied the
        // first.
        assert!(parse_reply(&reply(2.0), &batch).is_err());
        assert!(parse_reply(&reply(0.0), &batch).is_err());
        let verdicts = parse_reply(&reply(1.0), &batch).expect("well formed");
        assert!(verdicts[0].allowed && !verdicts[1].allowed);
        let (first, second) = (
            verdicts[0].states[0].expect("a state"),
            verdicts[1].states[0].expect("a state"),
        );
        assert_eq!((first.remaining, first.retry_after), (0, None));
        assert_eq!(second.remaining, 0);
        assert!(second.retry_after.is_some());
    }

    /// A reply as `decide.lua` packs it.
    fn packed(numbers: &[f64]) -> Vec<u8> {
        numbers.iter().flat_map(|n| n.to_le_bytes()).collect()
    }

    #[test]
    fn a_malformed_lease_reply_is_an_error_not_a_panic() {
        assert!(parse_lease(&[]).is_err());
        assert!(parse_lease(&[1, 2, 3, 4]).is_err());
        let denied = parse_lease(&[0, 0, 10, 500, 7]).expect("well formed");
        assert_eq!(denied.granted, 0);
        assert_eq!(denied.state.retry_after, Some(Duration::from_micros(500)));
        assert_eq!(denied.window, 7);
        assert_eq!(
            parse_lease(&[-3, -1, -1, 0, 0]).expect("clamped").granted,
            0
        );
    }

    #[test]
    fn the_batch_is_packed_as_little_endian_doubles() {
        let first = Check {
            key: std::sync::Arc::from("a"),
            algorithm: Algorithm::FixedWindow {
                limit: 7,
                window: Duration::from_secs(1),
            },
            lease: None,
        };
        let other = Check {
            key: std::sync::Arc::from("b"),
            algorithm: Algorithm::FixedWindow {
                limit: 9,
                window: Duration::from_secs(2),
            },
            lease: None,
        };
        let both = [first.clone(), other];
        let one: &[Check] = std::slice::from_ref(&first);
        let decode = |numbers: &[u8]| -> Vec<f64> {
            numbers
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()
        };
        // No request: no counter and no group.
        let (keys, numbers) = encode_batch(&[]);
        assert!(keys.is_empty());
        assert_eq!(decode(&numbers), [0.0]);
        // The same counters at another cost, or in another order: a group
        // of their own.
        let reversed = [both[1].clone(), both[0].clone()];
        let (keys, numbers) = encode_batch(&[(&both, 1), (&both, 2), (&reversed, 2)]);
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(
            decode(&numbers),
            [
                3.0, 7.0, 1e6, 3.0, 9.0, 2e6, // the two counters' policies
                3.0, // groups
                1.0, 1.0, 2.0, 1.0, 2.0, // cost 1
                1.0, 2.0, 2.0, 1.0, 2.0, // cost 2
                1.0, 2.0, 2.0, 2.0, 1.0, // cost 2, counters reversed
            ]
        );
        // Two identical requests form one group; the third (other cost) its own.
        let (keys, numbers) = encode_batch(&[(&both, 1), (&both, 1), (one, 2)]);
        assert_eq!(keys, ["a", "b"]);
        let decoded: Vec<f64> = numbers
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        assert_eq!(
            decoded,
            [
                3.0, 7.0, 1e6, 3.0, 9.0, 2e6, // the two counters' policies
                2.0, // groups
                2.0, 1.0, 2.0, 1.0, 2.0, // two requests, cost 1, counters 1 and 2
                1.0, 2.0, 1.0, 1.0, // one request, cost 2, counter 1
            ]
        );
    }
}
