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

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;
use tower_redis_core::sync::{Finishing, lock};

use super::{Check, Limiter, Query, Verdict};

/// Decisions gathered for the next call to Redis.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// The followers of the batch being formed, if one is.
    forming: Option<Vec<Waiting>>,
}

#[derive(Debug)]
struct Waiting {
    checks: Vec<Check>,
    cost: u32,
    reply: oneshot::Sender<Verdict>,
}

/// The most followers one batch takes; more requests decide alone.
const MAX_BATCH: usize = 255;

/// What a request does with the batch being formed.
enum Role {
    Lead,
    Follow(oneshot::Receiver<Verdict>),
    /// The forming batch is full.
    Alone,
}

impl Limiter {
    /// Decides one request in the batch being formed, or leads a new one.
    pub(super) async fn decide_in_batch(self: &Arc<Self>, checks: &[Check], cost: u32) -> Verdict {
        match self.join(checks, cost) {
            Role::Lead => {}
            Role::Alone => return self.decide_alone(checks, cost).await,
            Role::Follow(receiver) => {
                return match receiver.await {
                    Ok(verdict) => verdict,
                    // The leader went away before answering (its request
                    // was cancelled): decide alone.
                    Err(_) => self.decide_alone(checks, cost).await,
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
        let followers = leader.close();
        if followers.is_empty() {
            return self.decide_alone(checks, cost).await;
        }
        // The call owns what it decides, and answers the followers itself,
        // so that it goes on without the leader: deciding them again would
        // count them twice (the script may have run for them already) and,
        // while Redis hangs, make them wait a second command timeout.
        let limiter = Arc::clone(self);
        let own = checks.to_vec();
        Finishing::new(async move {
            let mut requests: Vec<Query<'_>> = Vec::with_capacity(1 + followers.len());
            requests.push((own.as_slice(), cost));
            requests.extend(followers.iter().map(|w| (w.checks.as_slice(), w.cost)));
            let verdicts = limiter.decide_batch(&requests).await;
            drop(requests);
            let mut verdicts = verdicts.into_iter();
            let mine = verdicts.next();
            for (waiting, verdict) in followers.into_iter().zip(verdicts) {
                // A follower that went away (its request was dropped) is fine.
                let _ = waiting.reply.send(verdict);
            }
            mine
        })
        .await
        .unwrap_or_else(|| Verdict::fail_open(checks))
    }

    /// Joins the batch being formed, or starts one.
    fn join(&self, checks: &[Check], cost: u32) -> Role {
        let mut batch = lock(&self.batch);
        match &mut batch.forming {
            Some(followers) if followers.len() < MAX_BATCH => {
                let (reply, receiver) = oneshot::channel();
                followers.push(Waiting {
                    checks: checks.to_vec(),
                    cost,
                    reply,
                });
                Role::Follow(receiver)
            }
            Some(_) => Role::Alone,
            None => {
                batch.forming = Some(Vec::new());
                Role::Lead
            }
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
    fn close(&mut self) -> Vec<Waiting> {
        self.closed = true;
        lock(&self.limiter.batch).forming.take().unwrap_or_default()
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let followers = self.close();
        if followers.is_empty() {
            return;
        }
        let limiter = Arc::clone(self.limiter);
        let run = async move {
            let requests: Vec<Query<'_>> = followers
                .iter()
                .map(|w| (w.checks.as_slice(), w.cost))
                .collect();
            let verdicts = limiter.decide_batch(&requests).await;
            for (waiting, verdict) in followers.into_iter().zip(verdicts) {
                let _ = waiting.reply.send(verdict);
            }
        };
        // Without a runtime the followers' channels close and each of them
        // decides alone.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(run);
        }
    }
}
