//! A `redis-server` child process that tests can kill, pause and restart.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::TestRedisError;

/// How long a fresh server may take to answer PING.
const READY_DEADLINE: Duration = Duration::from_secs(15);

pub(crate) struct ServerProcess {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    args: Vec<String>,
    /// Listens with TLS only (`--port 0 --tls-port <port>`); the TLS files
    /// are among `args`.
    tls: bool,
    child: Mutex<Option<Child>>,
    paused: AtomicBool,
}

impl ServerProcess {
    /// Spawns the server and waits until it answers PING.
    pub(crate) async fn spawn(
        binary: PathBuf,
        dir: PathBuf,
        port: u16,
        args: Vec<String>,
        tls: bool,
    ) -> Result<Self, TestRedisError> {
        let process = Self {
            binary,
            dir,
            port,
            args,
            tls,
            child: Mutex::new(None),
            paused: AtomicBool::new(false),
        };
        process.start().await?;
        Ok(process)
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn is_running(&self) -> bool {
        self.child().is_some()
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts the server if it is not running, and waits until it answers.
    pub(crate) async fn start(&self) -> Result<(), TestRedisError> {
        if self.is_running() {
            return Ok(());
        }
        let log = self.dir.join(format!("redis-{}.log", self.port));
        let (plain_port, tls_port) = if self.tls {
            ("0".to_owned(), Some(self.port.to_string()))
        } else {
            (self.port.to_string(), None)
        };
        let child = Command::new(&self.binary)
            .arg("--port")
            .arg(plain_port)
            .args(
                tls_port
                    .iter()
                    .flat_map(|port| ["--tls-port", port.as_str()]),
            )
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| TestRedisError::Spawn(format!("{}: {e}", self.binary.display())))?;
        *self.child() = Some(child);
        self.paused.store(false, Ordering::Release);
        self.wait_ready(&log).await
    }

    async fn wait_ready(&self, log: &Path) -> Result<(), TestRedisError> {
        let url = format!("redis://127.0.0.1:{}/", self.port);
        let client =
            redis::Client::open(url.as_str()).map_err(|e| TestRedisError::Spawn(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + READY_DEADLINE;
        loop {
            let exited = self
                .child()
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                *self.child() = None;
                let log = std::fs::read_to_string(log).unwrap_or_default();
                return Err(TestRedisError::Exited {
                    port: self.port,
                    status: status.to_string(),
                    log: last_lines(&log, 8),
                });
            }
            let ready = if self.tls {
                // The harness has no certificate to check the server's, so
                // it waits for the server to say it is ready, and to listen.
                std::fs::read_to_string(log)
                    .is_ok_and(|text| text.contains("Ready to accept connections"))
                    && tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
                        .await
                        .is_ok()
            } else {
                ping(&client).await
            };
            if ready {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                self.kill();
                return Err(TestRedisError::NotReady { port: self.port });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: the server vanishes without closing anything cleanly.
    pub(crate) fn kill(&self) {
        let taken = self.child().take();
        if let Some(mut child) = taken {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused.store(false, Ordering::Release);
    }

    /// SIGTERM, then wait for the process to exit.
    pub(crate) fn stop(&self) {
        let taken = self.child().take();
        if let Some(mut child) = taken {
            if self.paused.load(Ordering::Acquire) {
                signal(&child, Signal::SIGCONT);
            }
            signal(&child, Signal::SIGTERM);
            let _ = child.wait();
        }
        self.paused.store(false, Ordering::Release);
    }

    /// SIGSTOP: the server keeps its sockets open but answers nothing.
    pub(crate) fn pause(&self) {
        if let Some(child) = self.child().as_ref() {
            signal(child, Signal::SIGSTOP);
            self.paused.store(true, Ordering::Release);
        }
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub(crate) fn resume(&self) {
        if let Some(child) = self.child().as_ref() {
            signal(child, Signal::SIGCONT);
            self.paused.store(false, Ordering::Release);
        }
    }
}

fn signal(child: &Child, signal: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn ping(client: &redis::Client) -> bool {
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Ok(()))
    )
}

/// A port that is free now, and whose cluster-bus twin (port + 10000) is too
/// when `with_bus` is set.
pub(crate) fn free_port(with_bus: bool) -> Result<u16, TestRedisError> {
    for _ in 0..200 {
        let port = if with_bus {
            rand::random_range(20_000..=45_000)
        } else {
            match TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                .and_then(|l| l.local_addr())
            {
                Ok(addr) => addr.port(),
                Err(_) => continue,
            }
        };
        if port_is_free(port) && (!with_bus || port_is_free(port + 10_000)) {
            return Ok(port);
        }
    }
    Err(TestRedisError::Spawn("no free local port found".to_owned()))
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_ok()
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Finds an executable by name on `PATH`.
pub(crate) fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
