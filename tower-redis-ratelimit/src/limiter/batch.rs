//! Concurrent decisions gathered into one call to Redis.
//!
//! Only when another decision is already waiting for Redis (a request
//! alone takes the direct path in [`Limiter::decide`]). A request that
//! finds no batch forming starts one, lets the requests that are ready to
//! run at the same moment join it (one yield to the scheduler), and then
//! sends them all in one script call: the script decides them one after
//! another, exactly as separate calls would. Under load one `EVALSHA`
//! answers many requests, and a hot key is read and written once per call
//! instead of once per request. Batches do not wait for each other:
//! several can be in flight at once. A batch whose leader's request is
//! cancelled still answers its followers: its call goes on without it.
//!
//! A follower allocates nothing to join: its checks are held inline (the
//! usual one or two policies), its place in the batch is its index, and
//! the batch answers all of its followers through one shared [`Replies`].
//! The list of followers is kept from one batch to the next. Memory a
//! request allocated and another thread freed made glibc's allocator take
//! its arena lock about once a request at c=64 (`futex` calls, measured
//! with `perf`); this keeps the batch's memory with the batch.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use smallvec::SmallVec;
use tower_redis_core::sync::{Answering, Finishing, Replies, lock};

use super::{Check, INLINE_POLICIES, Limiter, Query, Verdict};

/// Decisions gathered for the next call to Redis.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// The batch being formed, if one is.
    forming: Option<Forming>,
    /// An empty list of followers, with the capacity a batch before gave
    /// it, for the next batch.
    spare: Vec<Waiting>,
}

/// A batch being formed: its followers, and what answers them (made with
/// the first follower; dropped unanswered, it tells them to decide alone:
/// see [`Answering`]).
#[derive(Debug)]
struct Forming {
    followers: Vec<Waiting>,
    answering: Option<Answering<Verdict>>,
}

#[derive(Debug)]
struct Waiting {
    checks: SmallVec<[Check; INLINE_POLICIES]>,
    cost: u32,
}

/// The most followers one batch takes; more requests decide alone.
const MAX_BATCH: usize = 255;

/// The most followers' room a list kept for the next batch may hold.
const MAX_SPARE: usize = 64;

/// What a request does with the batch being formed.
enum Role {
    Lead,
    /// Its verdict is the batch's at this index.
    Follow(Arc<Replies<Verdict>>, usize),
    /// The forming batch is full.
    Alone,
}

impl Limiter {
    /// Decides one request in the batch being formed, or leads a new one.
    pub(super) async fn decide_in_batch(self: &Arc<Self>, checks: &[Check], cost: u32) -> Verdict {
        match self.join(checks, cost) {
            Role::Lead => {}
            Role::Alone => return self.decide_alone(checks, cost).await,
            Role::Follow(replies, index) => {
                return match replies.take(index).await {
                    Some(verdict) => verdict,
                    // The batch's call went away before answering: decide
                    // alone.
                    None => self.decide_alone(checks, cost).await,
                };
            }
        }
        // This request leads the batch.
        let mut leader = Leader {
            limiter: self,
            closed: false,
        };
        self.batches_led.fetch_add(1, Ordering::Relaxed);
        tokio::task::yield_now().await;
        let Some(Forming {
            followers,
            answering,
        }) = leader.close()
        else {
            return self.decide_alone(checks, cost).await;
        };
        let Some(answering) = answering.filter(|_| !followers.is_empty()) else {
            self.keep_spare(followers);
            return self.decide_alone(checks, cost).await;
        };
        // The call owns what it decides, and answers the followers itself,
        // so that it goes on without the leader: deciding them again would
        // count them twice (the script may have run for them already) and,
        // while Redis hangs, make them wait a second command timeout.
        let limiter = Arc::clone(self);
        let own: SmallVec<[Check; INLINE_POLICIES]> = checks.iter().cloned().collect();
        Finishing::new(async move {
            let mut requests: Vec<Query<'_>> = Vec::with_capacity(1 + followers.len());
            requests.push((own.as_slice(), cost));
            requests.extend(followers.iter().map(|w| (w.checks.as_slice(), w.cost)));
            let mut verdicts = limiter.decide_batch(&requests).await.into_iter();
            drop(requests);
            let mine = verdicts.next();
            answering.answer(verdicts);
            limiter.keep_spare(followers);
            mine
        })
        .await
        .unwrap_or_else(|| Verdict::fail_open(checks))
    }

    /// Joins the batch being formed, or starts one.
    fn join(&self, checks: &[Check], cost: u32) -> Role {
        let mut batch = lock(&self.batch);
        let batch = &mut *batch;
        match &mut batch.forming {
            Some(forming) if forming.followers.len() < MAX_BATCH => {
                forming.followers.push(Waiting {
                    checks: checks.iter().cloned().collect(),
                    cost,
                });
                let answering = forming.answering.get_or_insert_with(Answering::new);
                Role::Follow(answering.replies(), forming.followers.len() - 1)
            }
            Some(_) => Role::Alone,
            None => {
                batch.forming = Some(Forming {
                    followers: std::mem::take(&mut batch.spare),
                    answering: None,
                });
                Role::Lead
            }
        }
    }

    /// Keeps a batch's list of followers, emptied, for the next batch (one
    /// list, of bounded room).
    fn keep_spare(&self, mut followers: Vec<Waiting>) {
        if followers.capacity() > MAX_SPARE {
            return;
        }
        followers.clear();
        let mut batch = lock(&self.batch);
        if batch.spare.capacity() < followers.capacity() {
            batch.spare = followers;
        }
    }
}

/// The leader of a forming batch. Closing it takes the followers; a leader
/// dropped before closing (its request was cancelled during the yield)
/// hands them to a task of their own, so nobody waits forever.
struct Leader<'a> {
    limiter: &'a Arc<Limiter>,
    closed: bool,
}

impl Leader<'_> {
    fn close(&mut self) -> Option<Forming> {
        self.closed = true;
        lock(&self.limiter.batch).forming.take()
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let Some(Forming {
            followers,
            answering: Some(answering),
        }) = self.close()
        else {
            // Nobody joined.
            return;
        };
        let limiter = Arc::clone(self.limiter);
        // Dropped unanswered (no runtime to run it on, or a shutdown), its
        // `answering` tells the followers to decide alone.
        let run = async move {
            let requests: Vec<Query<'_>> = followers
                .iter()
                .map(|w| (w.checks.as_slice(), w.cost))
                .collect();
            let verdicts = limiter.decide_batch(&requests).await;
            drop(requests);
            answering.answer(verdicts);
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(run);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::DecisionSource;
    use super::super::tests::{check, on_redis};
    use super::*;
    use crate::algorithm::Algorithm;

    fn window(key: &str) -> [Check; 1] {
        [check(
            key,
            Algorithm::FixedWindow {
                limit: 1000,
                window: Duration::from_secs(3600),
            },
        )]
    }

    /// Three followers joined a batch whose leader is then dropped before
    /// closing it (its request cancelled during the yield).
    fn followers_of_a_dropped_leader(
        limiter: &Arc<Limiter>,
        checks: &[Check],
    ) -> Vec<(Arc<Replies<Verdict>>, usize)> {
        assert!(matches!(limiter.join(checks, 1), Role::Lead));
        let followers = (0..3)
            .map(|_| match limiter.join(checks, 1) {
                Role::Follow(reply, index) => (reply, index),
                _ => panic!("a batch is forming: the others follow it"),
            })
            .collect();
        drop(Leader {
            limiter,
            closed: false,
        });
        followers
    }

    /// A leader dropped before closing its batch hands the followers to a
    /// task of their own: each is answered by Redis, once.
    #[tokio::test]
    async fn the_followers_of_a_leader_cancelled_in_its_yield_are_answered() {
        let (_redis, limiter) = on_redis().await;
        let checks = window("dropped-leader");
        for (reply, index) in followers_of_a_dropped_leader(&limiter, &checks) {
            let verdict = tokio::time::timeout(Duration::from_secs(10), reply.take(index))
                .await
                .expect("answered")
                .expect("with a verdict");
            assert!(verdict.allowed);
            assert_eq!(verdict.source, DecisionSource::Redis);
        }
        // Counted once each: the three, and this one.
        let verdict = limiter.decide(&checks, 1).await;
        assert_eq!(verdict.states[0].map(|s| s.remaining), Some(1000 - 4));
        assert!(
            lock(&limiter.batch).forming.is_none(),
            "the batch was closed"
        );
    }

    /// With no runtime to run the followers' call on, they are told so at
    /// once (no verdict: each decides alone) instead of waiting forever.
    #[test]
    fn without_a_runtime_the_followers_of_a_dropped_leader_decide_alone() {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let (redis, limiter) = runtime.block_on(on_redis());
        let checks = window("no-runtime");
        // Outside the runtime: the leader's drop cannot spawn the call.
        let followers = followers_of_a_dropped_leader(&limiter, &checks);
        runtime.block_on(async {
            for (reply, index) in followers {
                let verdict = tokio::time::timeout(Duration::from_secs(10), reply.take(index))
                    .await
                    .expect("told at once");
                assert!(verdict.is_none(), "no call made for them");
            }
        });
        drop(limiter);
        drop(redis);
    }

    /// Requests on counters of their own, arriving together behind another
    /// decision: they share one call, and each is told its own counter's
    /// state (a follower answered its neighbour's verdict would be told
    /// another limit's units). The batch's list of followers is then kept
    /// for the next batch.
    #[tokio::test]
    async fn each_request_of_a_batch_is_told_its_own_verdict() {
        const REQUESTS: u32 = 8;
        let (_redis, limiter) = on_redis().await;
        fn limit(n: u32) -> u32 {
            100 + 10 * n
        }
        fn own(n: u32) -> [Check; 1] {
            [check(
                &format!("own-{n}"),
                Algorithm::FixedWindow {
                    limit: limit(n),
                    window: Duration::from_secs(3600),
                },
            )]
        }
        let mut decisions = tokio::task::JoinSet::new();
        // In flight first: the others find a decision waiting, and batch.
        let first = Arc::clone(&limiter);
        decisions.spawn(async move { (0, first.decide(&own(0), 1).await) });
        for n in 1..=REQUESTS {
            let limiter = Arc::clone(&limiter);
            decisions.spawn(async move { (n, limiter.decide(&own(n), 1).await) });
        }
        let deadline = Duration::from_secs(10);
        while let Some(decided) = tokio::time::timeout(deadline, decisions.join_next())
            .await
            .expect("every request decided within 10 s")
        {
            let (n, verdict) = decided.expect("task");
            assert_eq!(verdict.source, DecisionSource::Redis);
            assert_eq!(
                verdict.states[0].map(|s| s.remaining),
                Some(u64::from(limit(n) - 1)),
                "request {n} was told another counter's state"
            );
        }
        assert_eq!(limiter.batches_led(), 1, "the eight made one batch");
        assert!(
            lock(&limiter.batch).spare.capacity() >= REQUESTS as usize - 1,
            "the batch's list was kept for the next"
        );
    }

    /// A batch's list of followers is kept for the next batch, emptied, and
    /// only one of bounded room.
    #[tokio::test]
    async fn a_batchs_list_of_followers_is_kept_for_the_next() {
        let (_redis, limiter) = on_redis().await;
        let mut list = Vec::with_capacity(8);
        list.push(Waiting {
            checks: window("kept").into_iter().collect(),
            cost: 1,
        });
        limiter.keep_spare(list);
        {
            let batch = lock(&limiter.batch);
            assert!(batch.spare.is_empty() && batch.spare.capacity() >= 8);
        }
        limiter.keep_spare(Vec::with_capacity(MAX_SPARE + 1));
        assert!(lock(&limiter.batch).spare.capacity() <= MAX_SPARE);
        limiter.keep_spare(Vec::with_capacity(MAX_SPARE));
        assert_eq!(
            lock(&limiter.batch).spare.capacity(),
            MAX_SPARE,
            "at the bound: kept"
        );
        // The next batch starts with it.
        assert!(matches!(limiter.join(&window("kept"), 1), Role::Lead));
        let forming = lock(&limiter.batch);
        let forming = forming.forming.as_ref().expect("forming");
        assert!(forming.followers.capacity() >= 8);
    }
}
