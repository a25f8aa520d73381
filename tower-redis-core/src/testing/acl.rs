//! ACL users on a test server: for tests that cut the app off Redis while
//! Redis itself stays up for the test's own reads and writes.

use super::{TestRedis, TestRedisError};
use crate::redis;

impl TestRedis {
    /// The server's TCP port.
    pub fn port(&self) -> u16 {
        match self
            .url
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
        {
            Some(port) => port,
            None => panic!("test Redis URL {} does not end in a port", self.url),
        }
    }

    /// Adds (or resets) the ACL user `name`, allowed every key, channel and
    /// command, and returns a URL that logs in as it.
    pub async fn add_user(&self, name: &str, password: &str) -> Result<String, TestRedisError> {
        let mut conn = self.connection().await?;
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(name)
            .arg("reset")
            .arg("on")
            .arg(format!(">{password}"))
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query_async::<()>(&mut conn)
            .await?;
        Ok(self.url_as(name, password))
    }

    /// This server's URL, logging in as `name` with `password` (right or
    /// wrong).
    pub fn url_as(&self, name: &str, password: &str) -> String {
        let (scheme, address) = self.url.split_once("://").unwrap_or(("redis", &self.url));
        format!("{scheme}://{name}:{password}@{address}")
    }

    /// Turns the user on, or off and closes its connections: with the app's
    /// user off its requests fail and every probe is refused at
    /// authentication, while other users still reach the server.
    pub async fn set_user_enabled(&self, name: &str, enabled: bool) -> Result<(), TestRedisError> {
        let mut conn = self.connection().await?;
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(name)
            .arg(if enabled { "on" } else { "off" })
            .query_async::<()>(&mut conn)
            .await?;
        if !enabled {
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("USER")
                .arg(name)
                .query_async::<()>(&mut conn)
                .await?;
        }
        Ok(())
    }
}
