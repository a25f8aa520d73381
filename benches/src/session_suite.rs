//! Suite `session`: what reading and changing a session costs an HTTP request.
//!
//! Every subject serves `GET /read` (the handler reads one session value,
//! `k`) and `POST /write` (it reads `k` and inserts a new value), over the
//! shared in-process HTTP setup ([`crate::http_load`]). Before measuring,
//! each cell creates one session per task (a `POST /write` without a
//! cookie) and keeps its `Set-Cookie`; task `i` then sends `Cookie:` of
//! session `i` on every request. `no session` serves the same route with
//! no session layer, and the raw Redis cell makes what our read makes (one
//! round trip of 2 pipelined commands) without HTTP: the baselines of the
//! ratio columns.
//!
//! Then degraded mode ([`crate::degraded`]) and Redis memory per session
//! ([`crate::keys`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use bytes::Bytes;
use http::{Request, StatusCode, header};
use tower_redis_core::{RedisConfig, RedisManager};
use tower_redis_session::{Session, SessionLayer};

use crate::Options;
use crate::cells::{Cell, NOT_BUILT, TRIP_SOURCE, check_round_trips, run_interleaved};
use crate::degraded::{self, Outage};
use crate::error::BenchError;
use crate::grid::{Grid, Section, timing};
use crate::http_load::{
    Expect, HttpError, HttpRequest, clear_keys, connect, create_sessions, manager_for, managers,
    send, serve,
};
use crate::keys;
use crate::raw::{RawClient, RawPlan, RawShape, RawValue, RedisBenchmark};
use crate::report::Target;
use crate::server::{BenchRedis, requests_sent};
use tower_redis_core::testing::Monitor;

/// Prefix of every key tower-redis-session writes; cleared before and after.
const KEY_PREFIX: &str = "tower-redis-bench:session";
/// The session entry the handlers read and write.
const ENTRY: &str = "k";
/// What `no session` answers.
const PLAIN: &str = "v";
/// The target: our session read / tower-sessions' read.
const TARGET_RATIO: f64 = 1.2;
/// The targets for a read with tracking: / tower-sessions' read,
/// and / the no-session route.
const TRACKED_RATIO: f64 = 2.0;
const TRACKED_PLAIN_RATIO: f64 = 0.8;
/// Commands the session scripts (`save.lua`, `take.lua`) and the read run
/// inside their EVALSHA; left out of the top-level count.
const SCRIPT_INNER: &[&str] = &[
    "hget", "hgetall", "hset", "hdel", "hlen", "del", "exists", "pexpire", "pttl", "time",
];
/// The raw baselines' value: about a small session's size.
const RAW_KEY: &str = "tower-redis-bench:session:raw";
const RAW_LEN: usize = 64;

/// Values written by `POST /write`, so that every write changes the entry.
static NEXT_VALUE: AtomicU64 = AtomicU64::new(0);

fn next_value() -> String {
    format!("value-{}", NEXT_VALUE.fetch_add(1, Ordering::Relaxed))
}

/// The cells of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    NoSession,
    Raw,
    RedisBenchmark,
    OursRead,
    /// The read with client tracking: an unchanged session costs no round trip.
    OursReadTracked,
    OursWrite,
    TowerSessionsRead,
    TowerSessionsWrite,
}

impl Subject {
    const ALL: [Subject; 8] = [
        Subject::NoSession,
        Subject::Raw,
        Subject::RedisBenchmark,
        Subject::OursRead,
        Subject::OursReadTracked,
        Subject::OursWrite,
        Subject::TowerSessionsRead,
        Subject::TowerSessionsWrite,
    ];

    fn label(self) -> &'static str {
        match self {
            Subject::NoSession => "no session (GET /read, no layer)",
            Subject::Raw => {
                "raw Redis: 1 round trip of 2 pipelined GETs on a bare redis-rs connection (no HTTP)"
            }
            Subject::RedisBenchmark => "raw Redis: redis-benchmark, 1 GET per request (no HTTP)",
            Subject::OursRead => "tower-redis-session, read without tracking (GET /read)",
            Subject::OursReadTracked => {
                "tower-redis-session, read with tracking (GET /read, unchanged session: 0 round trips)"
            }
            Subject::OursWrite => "tower-redis-session, modify (POST /write)",
            Subject::TowerSessionsRead => {
                "tower-sessions 0.14 + tower-sessions-redis-store 0.16, read (GET /read)"
            }
            Subject::TowerSessionsWrite => {
                "tower-sessions 0.14 + tower-sessions-redis-store 0.16, modify (POST /write)"
            }
        }
    }

    fn short(self) -> &'static str {
        match self {
            Subject::NoSession => "no session",
            Subject::Raw => "raw redis-rs",
            Subject::RedisBenchmark => "redis-benchmark",
            Subject::OursRead => "ours read",
            Subject::OursReadTracked => "ours read tracked",
            Subject::OursWrite => "ours write",
            Subject::TowerSessionsRead => "t-s read",
            Subject::TowerSessionsWrite => "t-s write",
        }
    }

    fn request(self) -> HttpRequest {
        match self {
            Subject::OursWrite | Subject::TowerSessionsWrite => HttpRequest::post("/write"),
            _ => HttpRequest::get("/read"),
        }
    }
}

/// The session layer a subject's app is built with.
enum Layer {
    None,
    /// With or without client tracking (`tracked_capacity_bytes(0)`).
    Ours {
        tracked: bool,
    },
    TowerSessions,
}

impl Subject {
    fn index(self) -> usize {
        Subject::ALL
            .iter()
            .position(|s| *s == self)
            .unwrap_or_default()
    }

    fn layer(self) -> Layer {
        match self {
            Subject::NoSession | Subject::Raw | Subject::RedisBenchmark => Layer::None,
            Subject::OursRead => Layer::Ours { tracked: false },
            Subject::OursReadTracked | Subject::OursWrite => Layer::Ours { tracked: true },
            Subject::TowerSessionsRead | Subject::TowerSessionsWrite => Layer::TowerSessions,
        }
    }
}

/// Reads `k`: 200 and its value, 404 without one.
async fn read_ours(session: Session) -> (StatusCode, String) {
    match session.get::<String>(ENTRY).await {
        Ok(Some(value)) => (StatusCode::OK, value),
        Ok(None) => (StatusCode::NOT_FOUND, String::new()),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Reads `k` and inserts a new value.
async fn write_ours(session: Session) -> (StatusCode, String) {
    let before = match session.get::<String>(ENTRY).await {
        Ok(before) => before.unwrap_or_default(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    match session.insert(ENTRY, next_value()).await {
        Ok(()) => (StatusCode::OK, before),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `/read` and `/write` behind tower-redis-session on `manager`, with or
/// without client tracking.
fn ours(manager: &RedisManager, tracked: bool) -> Result<Router, BenchError> {
    let mut builder = SessionLayer::builder(manager.clone()).insecure_http_for_local_development();
    if !tracked {
        builder = builder.tracked_capacity_bytes(0);
    }
    let layer = builder
        .build()
        .map_err(|e| BenchError::Check(format!("session: {e}")))?;
    Ok(Router::new()
        .route("/read", get(read_ours))
        .route("/write", post(write_ours))
        .layer(layer))
}

/// The app of one subject; `None` for a peer that is not compiled in.
async fn app(
    subject: Subject,
    redis: &BenchRedis,
    manager: &RedisManager,
    pool_size: u32,
) -> Result<Option<Router>, BenchError> {
    let app = match subject.layer() {
        Layer::None => Router::new().route("/read", get(|| async { PLAIN })),
        Layer::Ours { tracked } => ours(manager, tracked)?,
        Layer::TowerSessions => return tower_sessions_app(redis, pool_size).await,
    };
    Ok(Some(app))
}

/// tower-sessions 0.14 with tower-sessions-redis-store 0.16 (a fred pool of
/// `pool_size` connections) on the same Redis; the cookie is not `Secure`,
/// as ours.
#[cfg(feature = "peers")]
async fn tower_sessions_app(
    redis: &BenchRedis,
    pool_size: u32,
) -> Result<Option<Router>, BenchError> {
    use tower_sessions::{Session, SessionManagerLayer};
    use tower_sessions_redis_store::RedisStore;
    use tower_sessions_redis_store::fred::prelude::{ClientLike as _, Config, Pool};

    let fred = |e: tower_sessions_redis_store::fred::error::Error| {
        BenchError::Check(format!("tower-sessions' fred pool: {e}"))
    };
    let config = Config::from_url(redis.url()).map_err(fred)?;
    let pool = Pool::new(config, None, None, None, pool_size as usize).map_err(fred)?;
    let _connections = pool.init().await.map_err(fred)?;
    let layer = SessionManagerLayer::new(RedisStore::new(pool)).with_secure(false);

    async fn read(session: Session) -> (StatusCode, String) {
        match session.get::<String>(ENTRY).await {
            Ok(Some(value)) => (StatusCode::OK, value),
            Ok(None) => (StatusCode::NOT_FOUND, String::new()),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
    async fn write(session: Session) -> (StatusCode, String) {
        let before = match session.get::<String>(ENTRY).await {
            Ok(before) => before.unwrap_or_default(),
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        match session.insert(ENTRY, next_value()).await {
            Ok(()) => (StatusCode::OK, before),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
    Ok(Some(
        Router::new()
            .route("/read", get(read))
            .route("/write", post(write))
            .layer(layer),
    ))
}

#[cfg(not(feature = "peers"))]
async fn tower_sessions_app(
    _redis: &BenchRedis,
    _pool_size: u32,
) -> Result<Option<Router>, BenchError> {
    Ok(None)
}

fn check(subject: Subject, what: &str, holds: bool) -> Result<(), BenchError> {
    if holds {
        Ok(())
    } else {
        Err(BenchError::Check(format!(
            "session, {}: {what}",
            subject.label()
        )))
    }
}

/// The sessions a cell's tasks use: `count` cookies (`name=value`), each
/// of a session created by a `POST /write` without a cookie, then checked
/// with the subject's own request (and its top-level Redis commands counted).
async fn sessions(
    redis: &BenchRedis,
    subject: Subject,
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<Arc<HttpRequest>>, BenchError> {
    let failed = |e: HttpError| BenchError::Check(format!("session, {}: {e}", subject.label()));
    let mut sender = connect(addr).await.map_err(failed)?;
    if matches!(subject.layer(), Layer::None) {
        let (status, _, body) = send(&mut sender, &subject.request())
            .await
            .map_err(failed)?;
        check(
            subject,
            "expected 200",
            status == StatusCode::OK && body == PLAIN.as_bytes(),
        )?;
        return Ok(vec![Arc::new(subject.request())]);
    }
    let requests = create_sessions(
        addr,
        &format!("session, {}", subject.label()),
        subject.request(),
        count,
    )
    .await?;
    // The subject's request with the first session: 200 and the value.
    let Some(first) = requests.first() else {
        return Err(BenchError::Check("session: no task".to_owned()));
    };
    let monitor = Monitor::start(redis.client()).await?;
    let (status, fields, body) = send(&mut sender, first).await.map_err(failed)?;
    let sent = requests_sent(monitor).await?;
    check(
        subject,
        &format!("expected 200 with the stored value, got {status}, {body:?}"),
        status == StatusCode::OK && body.starts_with(b"value-"),
    )?;
    eprintln!(
        "session: {}: one request sent {} Redis commands ({sent:?}); Set-Cookie in the answer: {}",
        subject.short(),
        sent.len(),
        fields.contains_key(header::SET_COOKIE),
    );
    Ok(requests)
}

/// Commands not to count as sent by the client. Our read is PEXPIRE +
/// HGETALL pipelined (no script): everything counts. Our write is that read
/// plus one EVALSHA, whose inner commands share names with the read's, so
/// only the EVALSHA is counted there (the read's pipeline is one more round
/// trip, 2 commands).
fn inner(subject: Subject) -> &'static [&'static str] {
    match subject {
        Subject::OursWrite => SCRIPT_INNER,
        _ => &[],
    }
}

/// Runs the suite and returns its markdown section.
pub(crate) async fn run(redis: &BenchRedis, options: &Options) -> Result<String, BenchError> {
    clear_keys(redis, KEY_PREFIX).await?;
    let pool_size = options.pool_size.unwrap_or(RedisConfig::DEFAULT_POOL_SIZE);
    let (manager, _down, _dead) = managers(redis, pool_size, KEY_PREFIX).await?;
    let tasks = options.concurrency.iter().copied().max().unwrap_or(1);
    let value = RawValue::put(redis, RAW_KEY, RAW_LEN).await?;

    let mut cells = Vec::with_capacity(Subject::ALL.len());
    let mut peer_cookies = Vec::new();
    for subject in Subject::ALL {
        let cell = match subject {
            Subject::Raw => Cell::redis(
                subject.label(),
                subject.short(),
                RawClient::Bare(redis.client().get_multiplexed_async_connection().await?),
                RawPlan::new(&RawShape::trips(&[2]), &value),
            ),
            Subject::RedisBenchmark => Cell::benchmark(
                subject.label(),
                subject.short(),
                RedisBenchmark::find(redis, &value),
            ),
            _ => match app(subject, redis, &manager, pool_size).await? {
                Some(app) => {
                    let server = serve(app).await?;
                    let requests = sessions(redis, subject, server.addr, tasks).await?;
                    if matches!(subject.layer(), Layer::TowerSessions) {
                        peer_cookies.extend(requests.iter().filter_map(|r| {
                            let cookie = r.fields.get(header::COOKIE)?.to_str().ok()?;
                            Some(cookie.split_once('=')?.1.to_owned())
                        }));
                    }
                    Cell::http(
                        subject.label(),
                        subject.short(),
                        server,
                        requests,
                        Expect::ok(
                            matches!(subject.layer(), Layer::None)
                                .then(|| Bytes::from_static(PLAIN.as_bytes())),
                        ),
                        inner(subject),
                    )
                }
                None => Cell::missing(subject.label(), subject.short(), NOT_BUILT),
            },
        };
        cells.push(cell);
    }

    let rows = run_interleaved(redis, "session", &cells, options).await?;
    let mut read_trip = Target::new(format!(
        "a session read is 1 round trip: its 2 pipelined commands, PEXPIRE + HGETALL ({TRIP_SOURCE})"
    ));
    check_round_trips(
        &mut read_trip,
        redis,
        &cells,
        Subject::OursRead.index(),
        "untimed",
        2.0,
    )
    .await?;
    let grid = Grid::new("concurrency", &cells, rows);
    drop(cells);
    clear_keys(redis, KEY_PREFIX).await?;
    // tower-sessions' keys are its bare session ids.
    if !peer_cookies.is_empty() {
        let mut conn = redis.admin();
        tower_redis_core::redis::cmd("DEL")
            .arg(&peer_cookies)
            .query_async::<()>(&mut conn)
            .await?;
    }

    let mut section = Section::new(
        "session: GET /read and POST /write on an in-process axum server over TCP, one session per task",
        &format!(
            "{}. hyper HTTP/1.1 client, one keep-alive connection per task, each task sending the cookie of its \
             own session (created before measuring). `/read` reads `k`; `/write` reads `k` and inserts a new \
             value. tower-redis-session: RedisConfig defaults with pool_size {pool_size}, \
             `insecure_http_for_local_development()`; tower-sessions: fred pool of {pool_size} connections, \
             `with_secure(false)`, same Redis. Raw Redis rows: {RAW_LEN}-byte GETs, no HTTP.",
            timing(options, true)
        ),
    );
    section.table(&grid.table(&[
        (Subject::NoSession.index(), "no session"),
        (Subject::Raw.index(), "raw redis-rs"),
    ]));
    let mut target = Target::new(format!(
        "tower-redis-session read ≥ {TARGET_RATIO:.2}× tower-sessions' read"
    ));
    grid.check_ratio(
        &mut target,
        Subject::OursRead.index(),
        Subject::TowerSessionsRead.index(),
        TARGET_RATIO,
        |_| true,
    );
    section.target(&target);
    let mut tracked_target = Target::new(format!(
        "tower-redis-session read with tracking ≥ {TRACKED_RATIO:.2}× tower-sessions' read"
    ));
    grid.check_ratio(
        &mut tracked_target,
        Subject::OursReadTracked.index(),
        Subject::TowerSessionsRead.index(),
        TRACKED_RATIO,
        |_| true,
    );
    section.target(&tracked_target);
    let mut plain_target = Target::new(format!(
        "tower-redis-session read with tracking ≥ {TRACKED_PLAIN_RATIO:.2}× the no-session route"
    ));
    grid.check_ratio(
        &mut plain_target,
        Subject::OursReadTracked.index(),
        Subject::NoSession.index(),
        TRACKED_PLAIN_RATIO,
        |_| true,
    );
    section.target(&plain_target);
    section.target(&read_trip);
    for (ours, theirs) in [
        (Subject::OursRead, Subject::TowerSessionsRead),
        (Subject::OursReadTracked, Subject::TowerSessionsRead),
        (Subject::OursReadTracked, Subject::OursRead),
        (Subject::OursWrite, Subject::TowerSessionsWrite),
        (Subject::OursRead, Subject::Raw),
    ] {
        section.note(format!(
            "{} / {}, median (per repeat): {}",
            ours.short(),
            theirs.short(),
            grid.spread(ours.index(), theirs.index())
        ));
    }
    for note in grid.notes() {
        section.note(note);
    }
    section.gap();

    section.append(&degraded::run(&SessionOutage, options).await?);
    section.append(&key_memory(redis, pool_size, options).await?);
    Ok(section.finish())
}

/// Session reads, for the degraded-mode section.
struct SessionOutage;

impl Outage for SessionOutage {
    fn suite(&self) -> &'static str {
        "session"
    }

    fn describe(&self) -> String {
        "`GET /read` of tower-redis-session, one session per task, created (and read once by the `Redis up` \
         cells) before the kill: read from Redis while it is up, from the layer's in-process copies while it is \
         down. New sessions are created after every restart (Redis comes back empty)."
            .to_owned()
    }

    fn app(&self, manager: &RedisManager) -> Result<Router, BenchError> {
        ours(manager, true)
    }

    async fn prepare(
        &self,
        addr: SocketAddr,
        tasks: usize,
    ) -> Result<Vec<Arc<HttpRequest>>, BenchError> {
        create_sessions(
            addr,
            "session, degraded mode",
            HttpRequest::get("/read"),
            tasks,
        )
        .await
    }

    fn expect(&self) -> Expect {
        Expect::ok(None)
    }

    fn inner(&self) -> &'static [&'static str] {
        &[]
    }
}

/// Redis memory per session: sessions created in process, one entry each.
async fn key_memory(
    redis: &BenchRedis,
    pool_size: u32,
    options: &Options,
) -> Result<String, BenchError> {
    let prefix = "tower-redis-bench:session-keys";
    let manager = manager_for(redis.url(), pool_size, prefix).await?;
    let checkpoints = keys::grow(
        redis,
        "session",
        ours(&manager, true)?,
        prefix,
        &options.keys,
        |_| {
            Request::post("/write")
                .body(Body::empty())
                .unwrap_or_default()
        },
        StatusCode::OK,
    )
    .await?;
    let mut section = Section::default();
    section.subsection(
        "session: Redis memory by number of sessions",
        &format!(
            "Each session is made by a `POST /write` without a cookie to tower-redis-session (in process, no \
             HTTP): one entry, `k` = `\"value-<n>\"`. Key names carry the bench prefix `{prefix}` ({} bytes; \
             the default `tower-redis` is 11). Memory from `INFO memory` used_memory and `DBSIZE` before the \
             first session and at each checkpoint; `MEMORY USAGE <key> SAMPLES 0` of a few keys.",
            prefix.len()
        ),
    );
    section.table(&keys::table(&checkpoints, "sessions"));
    section.gap();
    Ok(section.finish())
}
