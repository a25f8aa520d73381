//! Dedicated publish/subscribe connections, for layers that tell each other
//! about changes (cache invalidations, fills).

use redis::aio::PubSub;

use crate::backend::standalone_client;
use crate::config::{RedisConfig, Topology};
use crate::{Error, RedisManager};

/// The client of the subscribe connection: the server, or the first
/// cluster seed, with the same TLS roots as the pool's connections (a
/// private CA set with `tls_root_certificates` applies here too).
pub(crate) fn client_for(config: &RedisConfig) -> Option<redis::Client> {
    let url = match config.topology() {
        Topology::Standalone(url) => url,
        Topology::Cluster(nodes) => nodes.first()?,
        // The primary moves: `pubsub` asks the Sentinels at each connect.
        Topology::Sentinel(_) => return None,
    };
    match standalone_client(config, url) {
        Ok(client) => Some(client),
        Err(error) => {
            // The pool was built from the same URL and roots, so this does
            // not happen; if it did, pub/sub users see `BreakerOpen`.
            tracing::warn!(target: "tower_redis", redis = %url, %error, "cannot build the publish/subscribe client");
            None
        }
    }
}

impl RedisManager {
    /// Opens a dedicated connection for `SUBSCRIBE` (a subscribed connection
    /// cannot run other commands, so it is never taken from the pool).
    ///
    /// On a cluster it connects to the first seed node: a plain `PUBLISH`
    /// sent to any node reaches subscribers on every node. The connection is
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
        let Some(client) = self.pubsub_client() else {
            return Err(Error::BreakerOpen);
        };
        let connect = client.get_async_pubsub();
        match tokio::time::timeout(self.connect_timeout(), connect).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(error)) => Err(Error::Connect(error)),
            Err(_) => Err(Error::Timeout(self.connect_timeout())),
        }
    }
}
