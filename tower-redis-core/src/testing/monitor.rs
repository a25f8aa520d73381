//! Counting round trips with `MONITOR`: every command clients send to a
//! server, whatever its name, without the commands Lua runs inside a script.
//!
//! `INFO commandstats` also counts what scripts run (an `EVALSHA` that runs
//! `HGET` counts one `hget`), so a count built on it can only skip commands
//! by name, and a new per-request `PEXPIRE`, `GET`, `HSET` or `HGET` sent by
//! the client itself hides among the skipped names. `MONITOR` marks the
//! commands a script runs `[<db> lua]`, so only those are left out here.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::{TestRedis, TestRedisError};

/// How long the server may take to answer `MONITOR`, and to show the end
/// marker once it is sent.
const DEADLINE: Duration = Duration::from_secs(10);

/// A dedicated connection running `MONITOR` on a server, recording every
/// command other clients send until [`commands`](Self::commands) or
/// [`stop`](Self::stop) ends it. On a server used by nothing but the client
/// under test, that is every round trip the client made.
///
/// ```no_run
/// # use tower_redis_core::testing::TestRedis;
/// # async fn demo(redis: TestRedis) {
/// let monitor = redis.monitor().await;
/// // ... requests through the layer under test ...
/// assert_eq!(monitor.commands().await, ["evalsha"]);
/// # }
/// ```
pub struct Monitor {
    /// Sends the end marker; connected before `MONITOR` starts, so its own
    /// connection setup is not seen.
    marker_conn: redis::aio::MultiplexedConnection,
    marker: String,
    lines: JoinHandle<Vec<String>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("marker", &self.marker)
            .finish_non_exhaustive()
    }
}

impl Monitor {
    /// Starts watching the server `client` points at (plain TCP; `AUTH` is
    /// sent first when the URL carries credentials). Returns once the server
    /// has acknowledged `MONITOR`, so every command sent after this returns
    /// is seen.
    pub async fn start(client: &redis::Client) -> Result<Self, TestRedisError> {
        let info = client.get_connection_info();
        let address = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
            other => {
                return Err(TestRedisError::Monitor(format!(
                    "MONITOR needs a plain TCP server, not {other:?}"
                )));
            }
        };
        let settings = info.redis_settings();
        let mut marker_conn = client.get_multiplexed_async_connection().await?;
        let marker = unique_marker(&mut marker_conn).await?;
        let mut stream = TcpStream::connect(&address).await?;
        if let Some(password) = settings.password() {
            let username = settings.username().unwrap_or("default");
            stream
                .write_all(&resp_command(&["AUTH", username, password]))
                .await?;
        }
        stream.write_all(&resp_command(&["MONITOR"])).await?;
        let mut reader = BufReader::new(stream);
        let mut reply = String::new();
        if settings.password().is_some() {
            expect_ok(&mut reader, &mut reply, "AUTH").await?;
        }
        expect_ok(&mut reader, &mut reply, "MONITOR").await?;
        let end = marker.clone();
        let lines = tokio::spawn(async move {
            let mut lines = Vec::new();
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line).await {
                    Ok(0) | Err(_) => return lines,
                    Ok(_) if line.contains(&end) => return lines,
                    Ok(_) => lines.push(line.trim_end().to_owned()),
                }
            }
        });
        Ok(Self {
            marker_conn,
            marker,
            lines,
        })
    }

    /// Ends watching and returns the lower-case names of the commands clients
    /// sent since [`start`](Self::start), in the order the server ran them,
    /// without the commands Lua ran inside scripts.
    pub async fn stop(self) -> Result<Vec<String>, TestRedisError> {
        Ok(self
            .stop_lines()
            .await?
            .iter()
            .filter_map(|line| client_command(line))
            .collect())
    }

    /// Ends watching and returns `MONITOR`'s own lines since
    /// [`start`](Self::start) (the commands with their arguments, those Lua
    /// ran inside scripts included), for a test that needs a key a client
    /// named.
    pub async fn stop_lines(mut self) -> Result<Vec<String>, TestRedisError> {
        redis::cmd("ECHO")
            .arg(&self.marker)
            .query_async::<String>(&mut self.marker_conn)
            .await?;
        let lines = match tokio::time::timeout(DEADLINE, &mut self.lines).await {
            Ok(Ok(lines)) => lines,
            Ok(Err(error)) => {
                return Err(TestRedisError::Monitor(format!(
                    "MONITOR reader failed: {error}"
                )));
            }
            Err(_) => {
                self.lines.abort();
                return Err(TestRedisError::Monitor(format!(
                    "MONITOR did not show the end marker within {DEADLINE:?}"
                )));
            }
        };
        Ok(lines)
    }

    /// [`stop`](Self::stop), panicking with the reason if watching failed.
    pub async fn commands(self) -> Vec<String> {
        match self.stop().await {
            Ok(commands) => commands,
            Err(error) => panic!("MONITOR: {error}"),
        }
    }
}

impl TestRedis {
    /// A [`Monitor`] on this server, panicking with the reason if it cannot
    /// start.
    pub async fn monitor(&self) -> Monitor {
        match Monitor::start(&self.client()).await {
            Ok(monitor) => monitor,
            Err(error) => panic!("MONITOR on {}: {error}", self.url),
        }
    }

    /// Runs `work` under a [`Monitor`] and returns its output with the
    /// commands clients sent meanwhile.
    pub async fn commands_during<F: Future>(&self, work: F) -> (F::Output, Vec<String>) {
        let monitor = self.monitor().await;
        let output = work.await;
        (output, monitor.commands().await)
    }
}

/// A marker no client command carries: `ECHO`ed at the end, so the reader
/// knows every command sent before it has been seen.
async fn unique_marker(
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<String, TestRedisError> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(format!(
        "end-of-monitor-{}-{secs}{micros:06}-{}",
        std::process::id(),
        rand::random::<u64>()
    ))
}

async fn expect_ok(
    reader: &mut BufReader<TcpStream>,
    reply: &mut String,
    what: &str,
) -> Result<(), TestRedisError> {
    reply.clear();
    match tokio::time::timeout(DEADLINE, reader.read_line(reply)).await {
        Ok(Ok(_)) if reply.trim_end() == "+OK" => Ok(()),
        Ok(Ok(_)) => Err(TestRedisError::Monitor(format!(
            "{what} refused: {}",
            reply.trim_end()
        ))),
        Ok(Err(error)) => Err(error.into()),
        Err(_) => Err(TestRedisError::Monitor(format!(
            "{what} not answered within {DEADLINE:?}"
        ))),
    }
}

/// A command as a RESP array of bulk strings.
fn resp_command(parts: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for part in parts {
        out.extend_from_slice(format!("${}\r\n{part}\r\n", part.len()).as_bytes());
    }
    out
}

/// The lower-case command name of one `MONITOR` line sent by a client,
/// `None` for a command Lua ran inside a script (or a line that is not a
/// command). Lines look like
/// `+1700000000.123456 [0 127.0.0.1:50000] "evalsha" "<sha>" "1" ...`,
/// with `[0 lua]` for script-inner commands.
fn client_command(line: &str) -> Option<String> {
    let (client, command) = line.split_once("] ")?;
    if client.ends_with(" lua") {
        return None;
    }
    let name = command.strip_prefix('"')?.split('"').next()?;
    if is_tracking_housekeeping(command) {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// The tracking connection's own setup and heartbeat (`HELLO 3`,
/// `CLIENT TRACKING`, `PING tower-redis-tracking`): background work once
/// per connection or per second, not round trips of a request. The reads
/// it carries, and [`Tracking::sync`](crate::Tracking::sync)'s plain
/// `PING`, are counted.
fn is_tracking_housekeeping(command: &str) -> bool {
    let lower = command.to_ascii_lowercase();
    lower.starts_with("\"hello\"")
        || lower.starts_with("\"client\" \"tracking\"")
        || lower == format!("\"ping\" \"{}\"", crate::tracking::HEARTBEAT_MESSAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_commands_are_kept_and_script_inner_ones_dropped() {
        let from_client = r#"+1700000000.123456 [0 127.0.0.1:50000] "EVALSHA" "abc" "1" "k""#;
        let from_lua = r#"+1700000000.123460 [0 lua] "hget" "k" "f""#;
        let unix_socket = r#"+1700000000.123470 [3 unix:/tmp/r.sock] "pexpire" "k" "10""#;
        assert_eq!(client_command(from_client).as_deref(), Some("evalsha"));
        assert_eq!(client_command(from_lua), None);
        assert_eq!(client_command(unix_socket).as_deref(), Some("pexpire"));
        assert_eq!(client_command("+OK"), None);
        let heartbeat = r#"+1700000000.123480 [0 127.0.0.1:50001] "PING" "tower-redis-tracking""#;
        let tracking = r#"+1700000000.123490 [0 127.0.0.1:50001] "CLIENT" "TRACKING" "ON""#;
        let sync = r#"+1700000000.123500 [0 127.0.0.1:50001] "PING""#;
        assert_eq!(client_command(heartbeat), None);
        assert_eq!(client_command(tracking), None);
        assert_eq!(client_command(sync).as_deref(), Some("ping"));
    }

    #[test]
    fn commands_are_framed_as_resp_arrays() {
        assert_eq!(
            resp_command(&["AUTH", "default", "pw"]),
            b"*3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n$2\r\npw\r\n"
        );
    }
}
