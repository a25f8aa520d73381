//! The manager against a secured Redis: an ACL user with a password (the
//! default user disabled), and TLS with a certificate from a private CA
//! generated here (feature `tls`). Passwords never show up in `Debug`,
//! `Display`, errors or anything logged through `tracing` (or `log`).
//!
//! Every test logs into one capture buffer (the subscriber is global to
//! this test binary) and checks that no password of any test is in it.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tower_redis_core::redis;
use tower_redis_core::testing::TestRedis;
use tower_redis_core::{BreakerState, Error, RedisConfig, RedisManager, RedisUrl, Source};

/// Every password any test uses: none may appear in the captured logs.
const APP_PASSWORD: &str = "pw-app-7d1e9c";
const WRONG_PASSWORD: &str = "pw-wrong-41b8aa";
const TLS_PASSWORD: &str = "pw-tls-c0ffee";
const ALL_PASSWORDS: [&str; 3] = [APP_PASSWORD, WRONG_PASSWORD, TLS_PASSWORD];

/// What the global `tracing` subscriber of this binary wrote.
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUFFER.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buffer);
        // TRACE, and `log` records too (redis-rs, bb8): everything any layer says.
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&writer)))
            .try_init();
        buffer
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&captured().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

fn assert_no_password(what: &str, text: &str) {
    for password in ALL_PASSWORDS {
        assert!(!text.contains(password), "{what} shows a password:\n{text}");
    }
}

/// A server with an `app` user (all keys and commands) and the default
/// user switched off, so only `app` can do anything.
async fn acl_redis() -> TestRedis {
    let redis = TestRedis::start().await;
    redis
        .add_user("app", APP_PASSWORD)
        .await
        .expect("ACL SETUSER app");
    redis
        .set_user_enabled("default", false)
        .await
        .expect("ACL SETUSER default off");
    redis
}

fn acl_url(redis: &TestRedis, password: &str) -> String {
    redis.url_as("app", password)
}

async fn set_get(manager: &RedisManager, value: &str) -> (Option<String>, Source) {
    let key = manager.keys().key(&["secured"]);
    let value = value.to_owned();
    let served = manager
        .failover(
            |mut conn| async move {
                redis::pipe()
                    .cmd("SET")
                    .arg(&key)
                    .arg(&value)
                    .ignore()
                    .cmd("GET")
                    .arg(&key)
                    .query_async::<(Option<String>,)>(&mut conn)
                    .await
                    .map(|(v,)| v)
            },
            |_| async { None },
        )
        .await;
    (served.value, served.source)
}

#[tokio::test]
async fn an_acl_user_with_a_password_works_end_to_end() {
    captured();
    let redis = acl_redis().await;
    // The default user is off: a client without credentials cannot work.
    let mut anonymous = redis.connection().await.expect("connects");
    let refused = redis::cmd("PING")
        .query_async::<String>(&mut anonymous)
        .await;
    assert!(refused.is_err(), "the default user is disabled");

    let config = RedisConfig::builder()
        .url(acl_url(&redis, APP_PASSWORD))
        .require_redis(true)
        .build()
        .expect("valid config");
    let manager = RedisManager::connect(config).await.expect("authenticates");
    assert_eq!(manager.health().state, BreakerState::Closed);
    assert_eq!(
        set_get(&manager, "hello").await,
        (Some("hello".to_owned()), Source::Redis)
    );
    assert_no_password("manager Debug", &format!("{manager:?}"));
    assert_no_password("logs", &log_text());
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_error_that_never_shows_the_password() {
    captured();
    let redis = acl_redis().await;
    let url = acl_url(&redis, WRONG_PASSWORD);

    let required = RedisConfig::builder()
        .url(url.clone())
        .require_redis(true)
        .build()
        .expect("valid config");
    let error = RedisManager::connect(required)
        .await
        .expect_err("a wrong password cannot start a required Redis");
    assert!(matches!(error, Error::Required { .. }), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("WRONGPASS") || text.to_lowercase().contains("auth"),
        "the error says the credentials are wrong: {text}"
    );
    assert_no_password("error Display", &text);
    assert_no_password("error Debug", &format!("{error:?}"));

    // Without `require_redis` the app starts on its fallbacks and says why.
    let config = RedisConfig::builder()
        .url(url)
        .command_timeout(Duration::from_millis(200))
        .build()
        .expect("valid config");
    assert_no_password("config Debug", &format!("{config:?}"));
    let manager = RedisManager::connect(config).await.expect("starts anyway");
    let health = manager.health();
    assert_eq!(health.state, BreakerState::Open);
    assert_no_password("health Debug", &format!("{health:?}"));
    let (value, source) = set_get(&manager, "x").await;
    assert_eq!(value, None);
    assert!(matches!(source, Source::Fallback(_)), "{source:?}");
    assert_no_password("logs", &log_text());
}

#[tokio::test]
async fn passwords_stay_out_of_debug_display_and_errors_of_every_config_shape() {
    captured();
    let url = format!("redis://app:{APP_PASSWORD}@cache.internal:6379/2");
    let builder = RedisConfig::builder().url(url.clone());
    assert_no_password("builder Debug", &format!("{builder:?}"));
    let config = builder.build().expect("valid");
    assert_no_password("config Debug", &format!("{config:?}"));
    if let tower_redis_core::Topology::Standalone(url) = config.topology() {
        assert_no_password("url Display", &url.to_string());
        assert!(url.to_string().contains("***"), "{url}");
    }

    // Invalid URLs: the error names the problem, not the password.
    for bad in [
        format!("redis://app:{APP_PASSWORD}@cache internal:6379"),
        format!("http://app:{APP_PASSWORD}@cache.internal"),
        format!("redis://app:{APP_PASSWORD}@cache.internal/notanumber"),
    ] {
        let builder = RedisConfig::builder().url(bad);
        assert_no_password("builder Debug", &format!("{builder:?}"));
        let error = builder.build().expect_err("invalid");
        assert_no_password("config error", &error.to_string());
        assert_no_password("config error Debug", &format!("{error:?}"));
    }
    let cluster = RedisConfig::builder().cluster_nodes([
        format!("redis://app:{APP_PASSWORD}@10.0.0.1:7000"),
        format!("redis://app:{APP_PASSWORD}@10.0.0.2:7000/3"),
    ]);
    assert_no_password("cluster builder Debug", &format!("{cluster:?}"));
    let error = cluster.build().expect_err("cluster has only db 0");
    assert_no_password("cluster error", &error.to_string());

    // Every other form redis-rs takes a password in.
    for form in every_url_form(APP_PASSWORD) {
        let builder = RedisConfig::builder().url(form.clone());
        assert_no_password("builder Debug", &format!("{builder:?}"));
        let config = builder
            .build()
            .unwrap_or_else(|e| panic!("{form} is a valid form: {e}"));
        assert_no_password("config Debug", &format!("{config:?}"));
        let tower_redis_core::Topology::Standalone(url) = config.topology() else {
            panic!("standalone expected")
        };
        let shown = url.to_string();
        assert_no_password("url Display", &shown);
        assert_no_password("url Debug", &format!("{url:?}"));
        assert!(shown.contains("***"), "the redaction is visible: {shown}");
        // Nothing listens there (port 1, a missing socket): the manager
        // starts on its fallbacks and says why, without the password.
        let nowhere = form
            .replace("cache.internal:6379", "127.0.0.1:1")
            .replace("cache.internal:6380", "127.0.0.1:1")
            .replace("cache.internal", "127.0.0.1:1")
            .replace("/run/", "/nonexistent/");
        let config = RedisConfig::builder()
            .url(nowhere)
            .connect_timeout(Duration::from_millis(100))
            .build()
            .expect("still valid");
        let manager = RedisManager::connect(config).await.expect("starts open");
        assert_no_password("manager Debug", &format!("{manager:?}"));
        assert_no_password("health", &format!("{:?}", manager.health()));
    }
    // A cluster seed list of every TCP form (a cluster has database 0 only).
    let nodes = every_url_form(APP_PASSWORD).into_iter().filter(|node| {
        RedisUrl::parse("node", node).is_ok_and(|url| !url.is_unix() && url.db() == 0)
    });
    let cluster = RedisConfig::builder().cluster_nodes(nodes);
    assert_no_password("cluster builder Debug", &format!("{cluster:?}"));
    let config = cluster.build().expect("valid cluster");
    assert_no_password("cluster config Debug", &format!("{config:?}"));

    for (index, bad) in every_invalid_url_form(APP_PASSWORD).into_iter().enumerate() {
        let builder = RedisConfig::builder().url(bad.clone());
        assert_no_password("builder Debug", &format!("{builder:?}"));
        // The panic message names the form by its place, not its text.
        let Err(error) = builder.build() else {
            panic!("invalid form #{index} is accepted")
        };
        assert_no_password("config error", &error.to_string());
        assert_no_password("config error Debug", &format!("{error:?}"));
        let cluster = RedisConfig::builder().cluster_nodes([bad]);
        assert_no_password("cluster builder Debug", &format!("{cluster:?}"));
        let error = cluster.build().expect_err("invalid node");
        assert_no_password("cluster error", &error.to_string());
    }
    assert_no_password("logs", &log_text());
}

/// Every URL form redis-rs reads a password from (`redis-1.x/src/connection.rs`,
/// `url_to_tcp_connection_info` / `url_to_unix_connection_info`): the
/// userinfo of `redis`, `rediss`, `valkey`, `valkeys`, and the `pass` query
/// parameter of `redis+unix`, `valkey+unix` and `unix`.
fn every_url_form(password: &str) -> Vec<String> {
    let encoded = format!("{password}%26%3F%3D%20%2B");
    let mut forms = vec![
        format!("redis://app:{password}@cache.internal:6379/2"),
        format!("redis://:{password}@cache.internal:6379"),
        format!("redis://app:{password}@cache.internal/?protocol=resp3"),
        format!("valkey://app:{password}@cache.internal:6379/1"),
        format!("valkey://:{password}@cache.internal"),
        format!("redis+unix:///run/redis.sock?pass={password}&user=app&db=2"),
        format!("redis+unix:///run/redis.sock?db=1&pass={password}"),
        format!("redis+unix:///run/redis.sock?user=app&pass={encoded}&protocol=resp3"),
        format!("unix:///run/redis.sock?pass={password}"),
        format!("unix:///run/redis.sock?user=app&pass={password}&db=3"),
        format!("valkey+unix:///run/valkey.sock?pass={password}"),
        format!("redis+unix:///run/redis.sock?pa%73s={password}"),
    ];
    if cfg!(feature = "tls") {
        forms.extend([
            format!("rediss://app:{password}@cache.internal:6380"),
            format!("rediss://:{password}@cache.internal:6380/4"),
            format!("rediss://app:{password}@cache.internal:6380/#insecure"),
            format!("valkeys://app:{password}@cache.internal:6380"),
        ]);
    }
    forms
}

/// Forms that are wrong, each in a different place: the errors must not
/// repeat the password either.
fn every_invalid_url_form(password: &str) -> Vec<String> {
    vec![
        format!("redis://app:{password}@cache internal:6379"),
        format!("http://app:{password}@cache.internal"),
        format!("redis://app:{password}@cache.internal/notanumber"),
        format!("redis://:{password}@cache.internal/?protocol=9"),
        format!("redis://:{password}@[::1"),
        format!("redis+unix:///run/redis.sock?pass={password}&db=notanumber"),
        format!("redis+unix:///run/redis.sock?pass={password}&protocol=9"),
        format!("unix:///run/redis.sock?db=x&pass={password}"),
        format!("unix://[bad/run/redis.sock?pass={password}"),
        format!("unix://host:99999/sock?pass={password}@x"),
        format!("redis+unix:///run/redis.sock?pass={password}@x&db=-"),
        format!("redis://cache.internal?pass={password}"),
        format!("valkey+unix://[/?pass={password}&user=app"),
    ]
}

/// A real server on a Unix socket with a password: the `pass` form works,
/// and a wrong one is refused without being shown.
#[tokio::test]
async fn a_unix_socket_url_with_a_password_works_and_never_shows_it() {
    captured();
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("redis.sock");
    let redis = TestRedis::builder()
        .backend(tower_redis_core::testing::Backend::Binary)
        .arg("--unixsocket")
        .arg(socket.display().to_string())
        .arg("--unixsocketperm")
        .arg("700")
        .start()
        .await
        .expect("server starts");
    // Set after start: the harness waits for a PING without a password.
    let mut conn = redis.connection().await.expect("connection");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(APP_PASSWORD)
        .query_async::<()>(&mut conn)
        .await
        .expect("CONFIG SET requirepass");
    let url = format!("redis+unix://{}?pass={APP_PASSWORD}&db=3", socket.display());
    let config = RedisConfig::builder()
        .url(url)
        .require_redis(true)
        .build()
        .expect("valid config");
    assert_no_password("config Debug", &format!("{config:?}"));
    let manager = RedisManager::connect(config).await.expect("authenticates");
    assert_eq!(
        set_get(&manager, "over a socket").await,
        (Some("over a socket".to_owned()), Source::Redis)
    );
    assert_no_password("manager Debug", &format!("{manager:?}"));

    let url = format!("unix://{}?pass={WRONG_PASSWORD}", socket.display());
    let config = RedisConfig::builder()
        .url(url)
        .require_redis(true)
        .build()
        .expect("valid config");
    let error = RedisManager::connect(config)
        .await
        .expect_err("wrong password");
    assert_no_password("error", &error.to_string());
    assert_no_password("error Debug", &format!("{error:?}"));
    assert_no_password("logs", &log_text());
    drop(redis);
}

#[tokio::test]
async fn an_outage_and_recovery_log_nothing_secret() {
    captured();
    let redis = acl_redis().await;
    let config = RedisConfig::builder()
        .url(acl_url(&redis, APP_PASSWORD))
        .failure_threshold(1)
        .probe_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .expect("valid config");
    let manager = RedisManager::connect(config).await.expect("starts");
    assert_eq!(set_get(&manager, "a").await.1, Source::Redis);
    // Kill it: failures, a breaker transition, probes that fail to connect
    // and then (the restarted server has no `app` user) fail to authenticate.
    redis.kill().await;
    let mut state = manager.subscribe();
    tokio::time::timeout(Duration::from_secs(15), async {
        while manager.health().state == BreakerState::Closed {
            set_get(&manager, "b").await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the breaker never opened after the kill: {:?}",
            manager.health()
        )
    });
    redis.restart().await;
    // The probes now reach the server and are refused: no `app` user.
    let refused = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let health = manager.health();
            let error = health.last_error.clone().unwrap_or_default();
            if error.contains("WRONGPASS") || error.to_lowercase().contains("auth") {
                return health;
            }
            if state.changed().await.is_err() {
                return health;
            }
        }
    })
    .await
    .expect("a probe is refused for its credentials");
    assert_ne!(refused.state, BreakerState::Closed, "{refused:?}");
    assert_no_password("health", &format!("{refused:?}"));
    let logs = log_text();
    assert!(
        logs.contains("tower_redis"),
        "the capture works: it holds the manager's events"
    );
    assert_no_password("logs", &logs);
}

#[cfg(feature = "tls")]
mod tls {
    use super::*;
    use tower_redis_core::testing::TlsFiles;

    /// A CA, and a certificate it issued for 127.0.0.1 and localhost.
    struct Pki {
        ca_pem: String,
        files: TlsFiles,
        _dir: tempfile::TempDir,
    }

    fn pki() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tower-redis test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let server_key = KeyPair::generate().expect("server key");
        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "tower-redis test server");
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("server certificate");

        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write PEM");
            path
        };
        let files = TlsFiles {
            cert: write("server.crt", &server_cert.pem()),
            key: write("server.key", &server_key.serialize_pem()),
            ca: write("ca.crt", &ca_cert.pem()),
        };
        Pki {
            ca_pem: ca_cert.pem(),
            files,
            _dir: dir,
        }
    }

    #[tokio::test]
    async fn rediss_with_a_private_ca_and_a_password_works_end_to_end() {
        captured();
        let pki = pki();
        let redis = TestRedis::builder()
            .tls(&pki.files)
            .arg("--requirepass")
            .arg(TLS_PASSWORD)
            .start()
            .await
            .expect("TLS server starts");
        assert!(redis.url().starts_with("rediss://"), "{}", redis.url());
        let url = format!("rediss://:{TLS_PASSWORD}@127.0.0.1:{}", redis.port());
        let config = RedisConfig::builder()
            .url(url)
            .tls_root_certificates(pki.ca_pem.clone())
            .connect_timeout(Duration::from_secs(2))
            .require_redis(true)
            .build()
            .expect("valid config");
        assert_no_password("config Debug", &format!("{config:?}"));
        assert!(
            !format!("{config:?}").contains("BEGIN CERTIFICATE"),
            "Debug shows the roots' size, not the PEM"
        );
        let manager = RedisManager::connect(config)
            .await
            .expect("TLS handshake and AUTH succeed");
        assert_eq!(
            set_get(&manager, "over tls").await,
            (Some("over tls".to_owned()), Source::Redis)
        );
        assert_no_password("logs", &log_text());
    }

    /// The subscribe connection (the cache's near tier listens on it) must
    /// trust the same private CA as the pool, or it never connects.
    #[tokio::test]
    async fn subscribe_over_rediss_with_a_private_ca_receives_what_is_published() {
        use futures_util::StreamExt;
        captured();
        let pki = pki();
        let redis = TestRedis::builder()
            .tls(&pki.files)
            .arg("--requirepass")
            .arg(TLS_PASSWORD)
            .start()
            .await
            .expect("TLS server starts");
        let url = format!("rediss://:{TLS_PASSWORD}@127.0.0.1:{}", redis.port());
        let config = RedisConfig::builder()
            .url(url)
            .tls_root_certificates(pki.ca_pem.clone())
            .connect_timeout(Duration::from_secs(2))
            .require_redis(true)
            .build()
            .expect("valid config");
        let manager = RedisManager::connect(config).await.expect("pool connects");
        let deadline = Duration::from_secs(5);
        let mut pubsub = tokio::time::timeout(deadline, manager.pubsub())
            .await
            .expect("pubsub() answers within the deadline")
            .expect("the subscribe connection trusts the private CA");
        let channel = "tower-redis-test:tls-events";
        tokio::time::timeout(deadline, pubsub.subscribe(channel))
            .await
            .expect("SUBSCRIBE answers within the deadline")
            .expect("SUBSCRIBE over TLS");
        let receivers: i64 = manager
            .query(redis::cmd("PUBLISH").arg(channel).arg("purged /products"))
            .await
            .expect("PUBLISH over the pool");
        assert_eq!(receivers, 1, "the TLS subscriber is registered");
        let message = tokio::time::timeout(deadline, pubsub.on_message().next())
            .await
            .expect("the message arrives within the deadline")
            .expect("the subscription is open");
        assert_eq!(message.get_channel_name(), channel);
        assert_eq!(
            message.get_payload::<String>().expect("text payload"),
            "purged /products"
        );
        assert_no_password("logs", &log_text());
    }

    /// `#insecure` turns certificate checks off: the manager says so once,
    /// at connect, with what to do instead, however often it probes after.
    #[tokio::test]
    async fn rediss_insecure_logs_a_warning_once_at_connect() {
        captured();
        // Port 9 (discard): nothing listens, so the manager keeps probing.
        let url = format!("rediss://:{TLS_PASSWORD}@127.0.0.1:9/#insecure");
        let config = RedisConfig::builder()
            .url(url)
            .connect_timeout(Duration::from_millis(100))
            .probe_backoff(Duration::from_millis(5), Duration::from_millis(10))
            .build()
            .expect("valid config");
        let manager = RedisManager::connect(config).await.expect("starts open");
        let mut state = manager.subscribe();
        // Let it probe a few times (each probe is a new connection attempt).
        for _ in 0..6 {
            tokio::time::timeout(Duration::from_secs(5), state.changed())
                .await
                .expect("the probe runs within the deadline")
                .expect("the manager is alive");
        }
        let logs = log_text();
        let warnings: Vec<&str> = logs
            .lines()
            .filter(|line| line.contains("WARN") && line.contains("127.0.0.1:9/#insecure"))
            .filter(|line| line.contains("certificate"))
            .collect();
        assert_eq!(warnings.len(), 1, "one warning per manager:\n{logs}");
        let warning = warnings[0];
        assert!(warning.contains("tls_root_certificates"), "{warning}");
        assert_no_password("logs", &logs);
        drop(manager);
    }

    #[tokio::test]
    async fn a_server_certificate_from_an_unknown_ca_is_refused_not_a_panic() {
        captured();
        let pki = pki();
        let redis = TestRedis::builder()
            .tls(&pki.files)
            .start()
            .await
            .expect("TLS server starts");
        // The built-in (webpki) roots do not know the test CA.
        let config = RedisConfig::builder()
            .url(redis.url())
            .require_redis(true)
            .build()
            .expect("valid config");
        let error = RedisManager::connect(config)
            .await
            .expect_err("unknown issuer");
        assert!(
            error.to_string().to_lowercase().contains("certificate"),
            "the error says it is the certificate: {error}"
        );
        // Another CA's certificate is no better.
        let other = self::pki();
        let config = RedisConfig::builder()
            .url(redis.url())
            .tls_root_certificates(other.ca_pem)
            .build()
            .expect("valid config");
        let manager = RedisManager::connect(config).await.expect("starts open");
        assert_eq!(manager.health().state, BreakerState::Open);
        assert!(matches!(
            set_get(&manager, "x").await.1,
            Source::Fallback(_)
        ));
    }

    #[tokio::test]
    async fn bad_root_certificates_are_configuration_errors() {
        let error = RedisConfig::builder()
            .url("rediss://127.0.0.1:6380")
            .tls_root_certificates("not a certificate")
            .build()
            .expect_err("no PEM");
        assert_eq!(error.field, "tls_root_certificates");
        let error = RedisConfig::builder()
            .url("rediss://127.0.0.1:6380")
            .tls_root_certificates(
                "-----BEGIN CERTIFICATE-----\nbm90IGRlcg==\n-----END CERTIFICATE-----\n",
            )
            .build()
            .expect_err("not DER inside");
        assert_eq!(error.field, "tls_root_certificates");
        let error = RedisConfig::builder()
            .url("redis://127.0.0.1:6379")
            .tls_root_certificates(pki().ca_pem)
            .build()
            .expect_err("roots without TLS");
        assert!(error.to_string().contains("rediss://"), "{error}");
    }
}
