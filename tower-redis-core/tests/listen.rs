//! `listen`: the subscription loop the layers share (cache announcements,
//! ended sessions), against real Redis.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_redis_core::testing::TestRedis;
use tower_redis_core::{RedisManager, Subscriber, listen, redis};

struct Recorder {
    manager: RedisManager,
    channel: String,
    subscribed: AtomicUsize,
    messages: Mutex<Vec<Vec<u8>>>,
}

impl Subscriber for Recorder {
    fn manager(&self) -> &RedisManager {
        &self.manager
    }

    fn channel(&self) -> &str {
        &self.channel
    }

    fn on_message(&self, payload: &[u8]) {
        self.messages
            .lock()
            .expect("not poisoned")
            .push(payload.to_vec());
    }

    fn on_connected(&self, connected: bool) {
        if connected {
            self.subscribed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A recorder of `listen-test` on `manager`, listening from now on; and
/// its channel.
fn listening(manager: RedisManager) -> (Arc<Recorder>, String) {
    let recorder = Arc::new(Recorder {
        channel: manager.keys().key(&["listen-test"]),
        manager,
        subscribed: AtomicUsize::new(0),
        messages: Mutex::default(),
    });
    let channel = recorder.channel.clone();
    tokio::spawn(listen(Arc::downgrade(&recorder)));
    (recorder, channel)
}

async fn subscribers(redis: &TestRedis, channel: &str) -> u64 {
    redis.subscribers(channel).await.expect("PUBSUB NUMSUB")
}

/// Waits (at most `secs`) until `done`, or fails naming `what`.
async fn until(what: &str, secs: u64, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A subscription whose server stops answering without closing the
/// connection (a hung Redis, a half-open TCP connection) is found deaf by
/// its `PING` after a quiet period and made again, so the subscriber hears
/// that it may have missed messages; and a subscriber that is dropped lets
/// its connection go within a quiet period, with no message to notice it.
#[tokio::test]
async fn a_deaf_subscription_is_made_again_and_a_dropped_subscriber_lets_it_go() {
    let redis = TestRedis::start().await;
    let manager = RedisManager::connect(redis.config().build().expect("config"))
        .await
        .expect("manager");
    let (recorder, channel) = listening(manager);
    until("subscribed", 10, async || {
        subscribers(&redis, &channel).await == 1
    })
    .await;
    assert_eq!(recorder.subscribed.load(Ordering::SeqCst), 1);

    // Longer than a quiet period plus the PING's timeout.
    redis.pause().await;
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    redis.resume().await;
    until("subscribed again", 15, async || {
        recorder.subscribed.load(Ordering::SeqCst) >= 2
    })
    .await;
    let mut conn = redis.connection().await.expect("connection");
    until("a message heard", 10, async || {
        let _: u64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg("hello")
            .query_async(&mut conn)
            .await
            .expect("PUBLISH");
        let heard = recorder.messages.lock().expect("not poisoned").clone();
        heard.iter().any(|m| m == b"hello")
    })
    .await;

    drop(recorder);
    until("the connection let go", 15, async || {
        subscribers(&redis, &channel).await == 0
    })
    .await;
}

/// On a cluster the subscription is made on a seed node. With the first
/// seed dead, it is made on the next one (a plain `PUBLISH` reaches every
/// node), rather than tried on the dead seed for ever: the layers keep
/// hearing each other's announcements.
#[tokio::test]
async fn a_cluster_subscription_moves_to_the_next_seed_when_the_first_is_dead() {
    use tower_redis_core::testing::TestCluster;
    let cluster = TestCluster::start().await;
    let manager = RedisManager::connect(cluster.config().build().expect("config"))
        .await
        .expect("manager");
    cluster.kill_node(0).await;
    let (recorder, channel) = listening(manager);
    let client = redis::Client::open(cluster.urls()[1].as_str()).expect("a client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("a connection to a live node");
    until("a message published on a live node heard", 20, async || {
        let _: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg("hello")
            .query_async(&mut conn)
            .await;
        !recorder.messages.lock().expect("not poisoned").is_empty()
    })
    .await;
    assert!(recorder.subscribed.load(Ordering::SeqCst) >= 1);
}
