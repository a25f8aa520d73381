//! The shared counters: one script call (`decide.lua`) decides a batch of
//! requests, and its reply is parsed into verdicts.

use std::sync::LazyLock;
use std::time::Duration;

use tower_redis_core::degrade::{NoChange, Replay, ReplayError};
use tower_redis_core::redis::{self, Script};
use tower_redis_core::{Error, RedisConnection, RedisManager};

use super::{DecisionSource, DecisionStore, PolicyState, Query, Verdict};
use crate::algorithm::Algorithm;

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
/// decimal strings (see `decide.lua` for the layout). Two allocations
/// whatever the batch: the counts that precede what they count are
/// written once known.
fn encode_batch<'q>(requests: &[Query<'q>]) -> (Vec<&'q str>, Vec<u8>) {
    let checks: usize = requests.iter().map(|(checks, _)| checks.len()).sum();
    let mut keys: Vec<&'q str> = Vec::with_capacity(checks);
    // At most: a policy per check, the group count, and per request a
    // group head (count, cost, n) and its indexes.
    let mut numbers = Vec::with_capacity(8 * (3 * checks + 1 + 3 * requests.len() + checks));
    let push = |numbers: &mut Vec<u8>, value: f64| numbers.extend_from_slice(&value.to_le_bytes());
    let patch = |numbers: &mut Vec<u8>, at: usize, value: f64| {
        numbers[at..at + 8].copy_from_slice(&value.to_le_bytes());
    };
    // Counts and indexes are small integers: exact as `f64`.
    #[allow(clippy::cast_precision_loss)]
    let exact = |n: usize| n as f64;
    // Each distinct counter, in order of first use, with its policy.
    for (checks, _) in requests {
        for check in *checks {
            if !keys.contains(&check.key.as_str()) {
                keys.push(&check.key);
                let (kind, a, b) = check.algorithm.script_args();
                for value in [f64::from(kind), a, b] {
                    push(&mut numbers, value);
                }
            }
        }
    }
    // Consecutive requests with the same cost and counters go as one group.
    let groups_at = numbers.len();
    push(&mut numbers, 0.0);
    let mut groups = 0;
    let mut count_at = 0;
    let mut count = 0;
    let mut previous: Option<&Query<'q>> = None;
    for request in requests {
        let (checks, cost) = request;
        let same = previous.is_some_and(|(before, before_cost)| {
            before_cost == cost
                && before.len() == checks.len()
                && before
                    .iter()
                    .zip(checks.iter())
                    .all(|(b, c)| b.key == c.key)
        });
        if same {
            count += 1;
            continue;
        }
        if groups > 0 {
            patch(&mut numbers, count_at, exact(count));
        }
        groups += 1;
        count = 1;
        count_at = numbers.len();
        push(&mut numbers, 0.0);
        push(&mut numbers, f64::from(*cost));
        push(&mut numbers, exact(checks.len()));
        for check in *checks {
            let index = keys.iter().position(|k| *k == check.key).unwrap_or(0);
            push(&mut numbers, exact(index + 1));
        }
        previous = Some(request);
    }
    if groups > 0 {
        patch(&mut numbers, count_at, exact(count));
    }
    patch(&mut numbers, groups_at, exact(groups));
    (keys, numbers)
}

/// The script's reply: little-endian doubles, all integers (see
/// `decide.lua`), per request allowed, then per check remaining, reset and
/// retry (µs). Read in place: no number is parsed from text.
fn parse_reply(reply: &[u8], requests: &[Query<'_>]) -> redis::RedisResult<Vec<Verdict>> {
    let expected: usize = requests
        .iter()
        .map(|(checks, _)| 8 * (1 + 3 * checks.len()))
        .sum();
    if reply.len() != expected {
        return Err(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "rate-limit script answered with the wrong number of bytes",
            format!("expected {expected}, got {}", reply.len()),
        )));
    }
    let mut numbers = reply.chunks_exact(8).map(|bytes| {
        let mut double = [0; 8];
        double.copy_from_slice(bytes);
        whole(f64::from_le_bytes(double))
    });
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
            key: "k".to_owned(),
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
            key: "a".to_owned(),
            algorithm: Algorithm::FixedWindow {
                limit: 7,
                window: Duration::from_secs(1),
            },
            lease: None,
        };
        let other = Check {
            key: "b".to_owned(),
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
