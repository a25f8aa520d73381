//! Dedicated publish/subscribe connections, for layers that tell each other
//! about changes (cache invalidations, fills, ended sessions).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::PubSub;

use crate::backend::standalone_client;
use crate::config::{RedisConfig, Topology};
use crate::{Error, RedisManager};

/// The clients of the subscribe connection: the server, or every cluster
/// seed (tried in turn), with the same TLS roots as the pool's connections
/// (a private CA set with `tls_root_certificates` applies here too).
pub(crate) fn clients_for(config: &RedisConfig) -> PubSubClients {
    let urls = match config.topology() {
        Topology::Standalone(url) => std::slice::from_ref(url),
        Topology::Cluster(nodes) => nodes.as_slice(),
        // The primary moves: `pubsub` asks the Sentinels at each connect.
        Topology::Sentinel(_) => &[],
    };
    let clients = urls
        .iter()
        .filter_map(|url| match standalone_client(config, url) {
            Ok(client) => Some(client),
            Err(error) => {
                // The pool was built from the same URL and roots, so this
                // does not happen; if it did, that node is not subscribed on.
                tracing::warn!(target: "tower_redis", redis = %url, %error, "cannot build the publish/subscribe client");
                None
            }
        })
        .collect();
    PubSubClients {
        clients,
        next: AtomicUsize::new(0),
    }
}

/// Where [`RedisManager::pubsub`] connects: the server, or one of the
/// cluster seeds, the next one after a failed connect.
#[derive(Debug, Default)]
pub(crate) struct PubSubClients {
    clients: Vec<redis::Client>,
    next: AtomicUsize,
}

impl PubSubClients {
    /// The client the next subscription connects with.
    pub(crate) fn current(&self) -> Option<&redis::Client> {
        let len = self.clients.len();
        (len > 0).then(|| &self.clients[self.next.load(Ordering::Acquire) % len])
    }

    /// The connect with `client` failed: the next subscription tries the
    /// next seed (unless another caller moved on already).
    fn failed(&self, client: &redis::Client) {
        let len = self.clients.len();
        let at = self.next.load(Ordering::Acquire);
        if len > 1 && std::ptr::eq(&self.clients[at % len], client) {
            let _ =
                self.next
                    .compare_exchange(at, (at + 1) % len, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

impl RedisManager {
    /// Opens a dedicated connection for `SUBSCRIBE` (a subscribed connection
    /// cannot run other commands, so it is never taken from the pool).
    ///
    /// On a cluster it connects to a seed node: a plain `PUBLISH` sent to
    /// any node reaches subscribers on every node. A failed connect moves
    /// to the next seed, so a dead first seed does not keep the layers
    /// from hearing each other. The connection is
    /// not watched by the breaker; a caller that loses it should reconnect
    /// with a backoff and assume it missed messages meanwhile.
    ///
    /// With Sentinel it connects to the primary the Sentinels name now
    /// (checked with `ROLE`); after a failover the Sentinels close the
    /// demoted primary's client connections, so a caller that reconnects
    /// follows the primary.
    ///
    /// Fails with [`Error::BreakerOpen`] on a disabled manager, and with the
    /// connection error (within the connect timeout) when Redis is down.
    pub async fn pubsub(&self) -> Result<PubSub, Error> {
        if let Some(discovery) = self.inner.backend.sentinel() {
            let connect = async { discovery.master_client().await?.get_async_pubsub().await };
            return match tokio::time::timeout(self.connect_timeout(), connect).await {
                Ok(Ok(pubsub)) => Ok(pubsub),
                Ok(Err(error)) => Err(Error::Connect(error)),
                Err(_) => Err(Error::Timeout(self.connect_timeout())),
            };
        }
        let clients = self.pubsub_clients();
        let Some(client) = clients.current() else {
            return Err(Error::BreakerOpen);
        };
        let connect = client.get_async_pubsub();
        let connected = match tokio::time::timeout(self.connect_timeout(), connect).await {
            Ok(Ok(pubsub)) => return Ok(pubsub),
            Ok(Err(error)) => Err(Error::Connect(error)),
            Err(_) => Err(Error::Timeout(self.connect_timeout())),
        };
        clients.failed(client);
        connected
    }
}

/// A listener of one channel, kept subscribed by [`listen`].
pub trait Subscriber: Send + Sync + 'static {
    /// The manager whose server the channel is on.
    fn manager(&self) -> &RedisManager;
    /// The channel.
    fn channel(&self) -> &str;
    /// A message published on the channel.
    fn on_message(&self, payload: &[u8]);
    /// Subscribed (`true`), or the subscription was lost (`false`). Messages
    /// published while not subscribed are never delivered: a subscriber
    /// that keeps state the messages correct should treat what it kept
    /// before a (re)subscription as possibly outdated.
    fn on_connected(&self, connected: bool);
}

/// Starts [`listen`] for one subscriber once, from inside a Tokio runtime
/// (a layer may be built outside one: its first request starts it).
#[derive(Debug, Default)]
pub struct ListenOnce(AtomicBool);

impl ListenOnce {
    /// Not started yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns [`listen`] for `subscriber` on the current runtime, unless
    /// this already did; outside a runtime, nothing (the next call tries).
    pub fn start<S: Subscriber>(&self, subscriber: &Arc<S>) {
        if self.0.load(Ordering::Acquire) || self.0.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(listen(Arc::downgrade(subscriber)));
            }
            Err(_) => self.0.store(false, Ordering::Release),
        }
    }
}

/// How long a subscription may stay quiet before it is checked: the
/// subscriber still wanted, and the connection answering a `PING`.
const QUIET: Duration = Duration::from_secs(5);

/// Keeps `subscriber` subscribed to its channel
/// ([`RedisManager::pubsub`]), reconnecting with a backoff from 50 ms to
/// 2 s, until the subscriber is dropped. A subscription quiet for 5 s is
/// checked: it ends once the subscriber is gone, and is reconnected when
/// the connection does not answer a `PING` within the command timeout (a
/// half-open TCP connection would otherwise hold it forever, deaf).
/// Spawn it once per subscriber.
///
/// Between connections it holds neither the subscriber nor its manager,
/// so dropping them frees the manager's connections.
pub async fn listen<S: Subscriber>(subscriber: Weak<S>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let (manager, channel) = match subscriber.upgrade() {
            Some(listener) => (listener.manager().clone(), listener.channel().to_owned()),
            None => return,
        };
        let ping_timeout = manager.command_timeout();
        let subscribed = async {
            let mut pubsub = manager.pubsub().await.ok()?;
            pubsub.subscribe(&channel).await.ok()?;
            Some(pubsub)
        }
        .await;
        drop(manager);
        if let Some(pubsub) = subscribed {
            backoff = Duration::from_millis(50);
            match subscriber.upgrade() {
                Some(listener) => listener.on_connected(true),
                None => return,
            }
            tracing::debug!(target: "tower_redis", %channel, "subscribed");
            let (mut sink, mut messages) = pubsub.split();
            loop {
                match tokio::time::timeout(QUIET, messages.next()).await {
                    Ok(Some(message)) => match subscriber.upgrade() {
                        Some(listener) => listener.on_message(message.get_payload_bytes()),
                        None => return,
                    },
                    Ok(None) => break,
                    Err(_) => {
                        if subscriber.strong_count() == 0 {
                            return;
                        }
                        let ping = sink.ping::<redis::Value>();
                        if !matches!(tokio::time::timeout(ping_timeout, ping).await, Ok(Ok(_))) {
                            break;
                        }
                    }
                }
            }
            match subscriber.upgrade() {
                Some(listener) => listener.on_connected(false),
                None => return,
            }
            tracing::debug!(target: "tower_redis", %channel, "subscription lost; reconnecting");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
