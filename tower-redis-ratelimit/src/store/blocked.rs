//! Keys Redis has denied, remembered until they would be allowed again, so
//! an abusive client costs Redis nothing while it stays blocked.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Check, DecisionSource, PolicyState, Verdict};

/// Past this many entries, expired ones are swept before inserting.
const SWEEP_ABOVE: usize = 100_000;

#[derive(Debug, Default)]
pub(crate) struct BlockedKeys {
    entries: Mutex<HashMap<String, Blocked>>,
}

#[derive(Debug, Clone, Copy)]
struct Blocked {
    until: Instant,
    /// When the policy's quota is fully available again.
    reset_at: Instant,
    /// The cost that was denied; a cheaper request may fit sooner, so only
    /// requests costing at least this much are answered from here.
    cost: u32,
}

impl BlockedKeys {
    /// A denial without Redis when one of the request's keys is blocked.
    pub(crate) fn verdict(&self, checks: &[Check], cost: u32) -> Option<Verdict> {
        let now = Instant::now();
        let entries = self.lock();
        if entries.is_empty() {
            return None;
        }
        let mut states = vec![None; checks.len()];
        let mut blocked = false;
        for (check, state) in checks.iter().zip(&mut states) {
            if let Some(entry) = entries.get(&check.key)
                && entry.until > now
                && cost >= entry.cost
            {
                *state = Some(PolicyState {
                    remaining: 0,
                    reset: entry.reset_at.saturating_duration_since(now),
                    retry_after: Some(entry.until - now),
                });
                blocked = true;
            }
        }
        blocked.then_some(Verdict {
            allowed: false,
            states,
            source: DecisionSource::BlockedCache,
        })
    }

    /// Remembers the keys whose policies denied a request.
    pub(crate) fn remember(&self, checks: &[Check], cost: u32, states: &[Option<PolicyState>]) {
        let now = Instant::now();
        let mut entries = self.lock();
        if entries.len() > SWEEP_ABOVE {
            entries.retain(|_, e| e.until > now);
        }
        for (check, state) in checks.iter().zip(states) {
            if let Some(state) = state
                && let Some(retry_after) = state.retry_after
                && retry_after > Duration::ZERO
            {
                entries.insert(
                    check.key.clone(),
                    Blocked {
                        until: now + retry_after,
                        reset_at: now + state.reset,
                        cost,
                    },
                );
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Blocked>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
