//! The pub/sub side: writers announce updated URLs on one channel; every
//! instance listens, to wake requests waiting for a fill and to drop near
//! cache copies. A lost connection is reconnected with a backoff; while it
//! is down (or Redis is unavailable) the near cache is not used, and it is
//! emptied on every (re)connection because messages may have been missed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tower_redis_core::RedisManager;

use crate::store::MemoryStore;

pub(crate) struct Bus {
    manager: RedisManager,
    channel: String,
    near: Option<Arc<MemoryStore>>,
    started: AtomicBool,
    connected: AtomicBool,
    /// Bumped by every message and every (re)connection: a near-cache copy
    /// read before a bump may be outdated and is not kept.
    epoch: AtomicU64,
    /// Woken by every update message.
    updated: Notify,
}

impl Bus {
    pub(crate) fn new(manager: RedisManager, near: Option<Arc<MemoryStore>>) -> Self {
        let channel = manager.keys().key(&["cache-events"]);
        Self {
            manager,
            channel,
            near,
            started: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            updated: Notify::new(),
        }
    }

    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// Starts the listener once, from inside a Tokio runtime.
    pub(crate) fn ensure_started(self: &Arc<Self>) {
        if self.started.load(Ordering::Acquire) || self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(listen(Arc::downgrade(self)));
            }
            Err(_) => self.started.store(false, Ordering::Release),
        }
    }

    /// Whether a near-cache copy can be trusted now.
    pub(crate) fn near_usable(&self) -> bool {
        self.connected.load(Ordering::Acquire) && self.manager.is_available()
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Resolves at the next update message.
    pub(crate) fn updated(&self) -> tokio::sync::futures::Notified<'_> {
        self.updated.notified()
    }

    /// The message announcing that a URL's entries changed.
    pub(crate) fn updated_message(url_hash: &str) -> String {
        format!("u {url_hash}")
    }

    /// The message announcing that every entry is gone.
    pub(crate) const ALL_MESSAGE: &'static str = "a";

    fn on_message(&self, payload: &[u8]) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        match payload {
            [b'u', b' ', url_hash @ ..] => {
                if let (Some(near), Ok(url_hash)) = (&self.near, std::str::from_utf8(url_hash)) {
                    near.remove(url_hash);
                }
            }
            _ => {
                if let Some(near) = &self.near {
                    near.clear();
                }
            }
        }
        self.updated.notify_waiters();
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Some(near) = &self.near {
            near.clear();
        }
    }
}

async fn listen(events: Weak<Bus>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let (manager, channel) = match events.upgrade() {
            Some(events) => (events.manager.clone(), events.channel.clone()),
            None => return,
        };
        let subscribed = async {
            let mut pubsub = manager.pubsub().await.ok()?;
            pubsub.subscribe(&channel).await.ok()?;
            Some(pubsub)
        }
        .await;
        drop(manager);
        if let Some(mut pubsub) = subscribed {
            backoff = Duration::from_millis(50);
            match events.upgrade() {
                Some(events) => events.set_connected(true),
                None => return,
            }
            tracing::debug!(target: "tower_redis_cache", %channel, "listening for cache events");
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                match events.upgrade() {
                    Some(events) => events.on_message(message.get_payload_bytes()),
                    None => return,
                }
            }
            match events.upgrade() {
                Some(events) => events.set_connected(false),
                None => return,
            }
            tracing::debug!(target: "tower_redis_cache", "cache events connection lost; reconnecting");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
