//! A slow network for tracking connections: an instance that hears of
//! Redis' invalidations late, for tests of what it serves meanwhile.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::TestRedis;

impl TestRedis {
    /// A configuration ([`config`](Self::config)) whose connections go
    /// through a TCP proxy that holds what the server sends on tracking
    /// connections (those that open with `HELLO`) for `delay` before
    /// passing it on, in order; other connections pass straight through.
    /// A manager built on it hears of invalidations `delay` late, as
    /// across a slow network, and its tracked reads answer `delay` late.
    pub async fn slow_tracking_config(&self, delay: Duration) -> crate::RedisConfigBuilder {
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(listener) => listener,
            Err(error) => panic!("binding the slow tracking proxy: {error}"),
        };
        let port = match listener.local_addr() {
            Ok(address) => address.port(),
            Err(error) => panic!("the slow tracking proxy's address: {error}"),
        };
        let upstream = self.port();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, delay));
            }
        });
        self.config().url(format!("redis://127.0.0.1:{port}"))
    }
}

async fn relay(client: tokio::net::TcpStream, upstream: u16, delay: Duration) {
    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut first = vec![0u8; 4096];
    let Ok(n) = client_read.read(&mut first).await else {
        return;
    };
    let tracking = first[..n]
        .windows(5)
        .any(|w| w.eq_ignore_ascii_case(b"HELLO"));
    if server_write.write_all(&first[..n]).await.is_err() {
        return;
    }
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    let (chunks, mut queued) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            if client_write.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match server_read.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let due = tokio::time::Instant::now() + if tracking { delay } else { Duration::ZERO };
        if chunks.send((due, buffer[..n].to_vec())).is_err() {
            return;
        }
    }
}
