//! The Docker backend: a `redis:7.2` container through testcontainers, on a
//! fixed host port so that a restart keeps its address.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use testcontainers_modules::redis::Redis;
use testcontainers_modules::testcontainers::core::IntoContainerPort;
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt};

use super::TestRedisError;
use super::process::free_port;

const IMAGE_TAG: &str = "7.2";
const READY_DEADLINE: Duration = Duration::from_secs(30);

pub(crate) struct DockerRedis {
    container: ContainerAsync<Redis>,
    port: u16,
    running: AtomicBool,
}

impl DockerRedis {
    pub(crate) async fn start(args: &[String]) -> Result<Self, TestRedisError> {
        let port = free_port(false)?;
        let mut cmd = vec![
            "redis-server".to_owned(),
            "--save".to_owned(),
            String::new(),
        ];
        cmd.extend(["--appendonly".to_owned(), "no".to_owned()]);
        // The container reaches the server from the bridge network, not from
        // loopback: without a password, protected mode would refuse every
        // client. The official image's entrypoint adds this; pass it here so
        // that any image with a `redis-server` works.
        cmd.extend(["--protected-mode".to_owned(), "no".to_owned()]);
        cmd.extend(args.iter().cloned());
        let container = Redis::default()
            .with_tag(IMAGE_TAG)
            .with_mapped_port(port, 6379.tcp())
            .with_cmd(cmd)
            .start()
            .await
            .map_err(docker_error)?;
        let redis = Self {
            container,
            port,
            running: AtomicBool::new(true),
        };
        redis.wait_ready().await?;
        Ok(redis)
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    pub(crate) async fn kill(&self) -> Result<(), TestRedisError> {
        self.container
            .stop_with_timeout(Some(0))
            .await
            .map_err(docker_error)?;
        self.running.store(false, Ordering::Release);
        Ok(())
    }

    pub(crate) async fn stop(&self) -> Result<(), TestRedisError> {
        self.container
            .stop_with_timeout(Some(10))
            .await
            .map_err(docker_error)?;
        self.running.store(false, Ordering::Release);
        Ok(())
    }

    pub(crate) async fn pause(&self) -> Result<(), TestRedisError> {
        self.container.pause().await.map_err(docker_error)
    }

    pub(crate) async fn resume(&self) -> Result<(), TestRedisError> {
        self.container.unpause().await.map_err(docker_error)
    }

    pub(crate) async fn restart(&self) -> Result<(), TestRedisError> {
        if self.is_running() {
            self.kill().await?;
        }
        self.container.start().await.map_err(docker_error)?;
        self.running.store(true, Ordering::Release);
        self.wait_ready().await
    }

    async fn wait_ready(&self) -> Result<(), TestRedisError> {
        let client = redis::Client::open(self.url())?;
        let deadline = tokio::time::Instant::now() + READY_DEADLINE;
        loop {
            let ping = async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<()>(&mut conn).await
            };
            if matches!(
                tokio::time::timeout(Duration::from_millis(500), ping).await,
                Ok(Ok(()))
            ) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(TestRedisError::NotReady { port: self.port });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn docker_error(
    error: testcontainers_modules::testcontainers::TestcontainersError,
) -> TestRedisError {
    TestRedisError::Docker(error.to_string())
}
