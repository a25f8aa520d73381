//! Suite `session`: what reading and changing a session costs an HTTP request.
//!
//! Every subject serves `GET /read` (the handler reads one session value,
//! `k`) and `POST /write` (it reads `k` and inserts a new value), over the
//! shared in-process HTTP setup ([`crate::http_load`]). Before measuring,
//! each cell creates one session per task (a `POST /write` without a
//! cookie) and keeps its `Set-Cookie`; task `i` then sends `Cookie:` of
//! session `i` on every request. `no session` serves the same route with
//! no session layer: the baseline of the ratio column.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::routing::{get, post};
use bytes::Bytes;
use http::{StatusCode, header};
use tower_redis_core::{RedisConfig, RedisManager};
use tower_redis_session::{Session, SessionLayer};

use crate::Options;
use crate::cpu::{self, CpuUse};
use crate::error::BenchError;
use crate::http_load::{
    Cell, Expect, HttpError, HttpRequest, Sample, breakdown, clear_keys, columns, connect, headers,
    managers, ratio, ratios, run_interleaved, send, serve, top_level,
};
use crate::report::Table;
use crate::server::BenchRedis;

/// Prefix of every key tower-redis-session writes; cleared before and after.
const KEY_PREFIX: &str = "tower-redis-bench:session";
/// The session entry the handlers read and write.
const ENTRY: &str = "k";
/// What `no session` answers.
const PLAIN: &str = "v";
/// The target: our session read / tower-sessions' read.
const TARGET_RATIO: f64 = 1.2;
/// Commands the session scripts (`save.lua`, `take.lua`) and the read run
/// inside their EVALSHA; left out of the top-level count.
const SCRIPT_INNER: &[&str] = &[
    "hget", "hgetall", "hset", "hdel", "hlen", "del", "exists", "pexpire", "pttl", "time",
];
/// What a peer row says when the `peers` feature is off.
const NOT_BUILT: &str = "not built (enable --features peers)";

/// Values written by `POST /write`, so that every write changes the entry.
static NEXT_VALUE: AtomicU64 = AtomicU64::new(0);

fn next_value() -> String {
    format!("value-{}", NEXT_VALUE.fetch_add(1, Ordering::Relaxed))
}

/// The cells of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    NoSession,
    OursRead,
    OursWrite,
    TowerSessionsRead,
    TowerSessionsWrite,
}

impl Subject {
    const ALL: [Subject; 5] = [
        Subject::NoSession,
        Subject::OursRead,
        Subject::OursWrite,
        Subject::TowerSessionsRead,
        Subject::TowerSessionsWrite,
    ];

    fn label(self) -> &'static str {
        match self {
            Subject::NoSession => "no session (GET /read, no layer)",
            Subject::OursRead => "tower-redis-session, read (GET /read)",
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
            Subject::OursRead => "ours read",
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
    Ours,
    TowerSessions,
}

impl Subject {
    fn layer(self) -> Layer {
        match self {
            Subject::NoSession => Layer::None,
            Subject::OursRead | Subject::OursWrite => Layer::Ours,
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

/// The app of one subject; `None` for a peer that is not compiled in.
async fn app(
    subject: Subject,
    redis: &BenchRedis,
    manager: &RedisManager,
    pool_size: u32,
) -> Result<Option<Router>, BenchError> {
    let app = match subject.layer() {
        Layer::None => Router::new().route("/read", get(|| async { PLAIN })),
        Layer::Ours => {
            let layer = SessionLayer::builder(manager.clone())
                .insecure_http_for_local_development()
                .build()
                .map_err(|e| BenchError::Check(format!("session: {e}")))?;
            Router::new()
                .route("/read", get(read_ours))
                .route("/write", post(write_ours))
                .layer(layer)
        }
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
    let mut requests = Vec::with_capacity(count);
    for _ in 0..count {
        let (status, fields, _) = send(&mut sender, &HttpRequest::post("/write"))
            .await
            .map_err(failed)?;
        let cookie = fields
            .get(header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .unwrap_or("")
            .to_owned();
        check(
            subject,
            &format!("expected 200 and a Set-Cookie from POST /write, got {status} and {cookie:?}"),
            status == StatusCode::OK && cookie.contains('='),
        )?;
        requests.push(Arc::new(subject.request().with_cookie(&cookie)?));
    }
    // The subject's request with the first session: 200 and the value.
    let Some(first) = requests.first() else {
        return Err(BenchError::Check("session: no task".to_owned()));
    };
    let before = redis.command_calls().await?;
    let (status, fields, body) = send(&mut sender, first).await.map_err(failed)?;
    let deltas = redis.command_calls().await?.deltas(&before);
    check(
        subject,
        &format!("expected 200 with the stored value, got {status}, {body:?}"),
        status == StatusCode::OK && body.starts_with(b"value-"),
    )?;
    let inner = inner(subject);
    eprintln!(
        "session: {}: one request ran {} top-level Redis commands ({deltas:?}); Set-Cookie in the answer: {}",
        subject.short(),
        top_level(&deltas, inner).calls,
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

    let mut cells = Vec::with_capacity(Subject::ALL.len());
    let mut peer_cookies = Vec::new();
    for subject in Subject::ALL {
        let app = app(subject, redis, &manager, pool_size).await?;
        let (server, requests) = match app {
            Some(app) => {
                let server = serve(app).await?;
                let requests = sessions(redis, subject, server.addr, tasks).await?;
                (Some(server), requests)
            }
            None => (None, Vec::new()),
        };
        if matches!(subject.layer(), Layer::TowerSessions) {
            peer_cookies.extend(requests.iter().filter_map(|r| {
                let cookie = r.fields.get(header::COOKIE)?.to_str().ok()?;
                Some(cookie.split_once('=')?.1.to_owned())
            }));
        }
        cells.push(Cell {
            short: subject.short(),
            server,
            requests,
            expect: Arc::new(Expect {
                status: StatusCode::OK,
                body: matches!(subject.layer(), Layer::None)
                    .then(|| Bytes::from_static(PLAIN.as_bytes())),
            }),
            inner: inner(subject),
        });
    }

    let rows = run_interleaved(redis, "session", &cells, options).await?;
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
    Ok(render(options, pool_size, &rows))
}

fn index(subject: Subject) -> usize {
    Subject::ALL
        .iter()
        .position(|s| *s == subject)
        .unwrap_or_default()
}

fn render(options: &Options, pool_size: u32, rows: &[(usize, Vec<Vec<Sample>>)]) -> String {
    let mut table = Table::new(headers("no session")).left_aligned(2);
    let mut verdicts = Vec::new();
    let mut spreads = Vec::new();
    for (concurrency, row) in rows {
        let baseline = &row[index(Subject::NoSession)];
        for (subject, samples) in Subject::ALL.iter().zip(row) {
            let mut cells = vec![concurrency.to_string(), subject.label().to_owned()];
            if samples.is_empty() {
                cells.push(NOT_BUILT.to_owned());
            } else {
                cells.extend(columns(samples, ratio(baseline, samples)));
            }
            table.row(cells);
        }
        for (ours, theirs, what) in [
            (Subject::OursRead, Subject::TowerSessionsRead, "read"),
            (Subject::OursWrite, Subject::TowerSessionsWrite, "modify"),
        ] {
            let (ours, theirs) = (&row[index(ours)], &row[index(theirs)]);
            if theirs.is_empty() {
                continue;
            }
            let each: Vec<String> = ratios(theirs, ours)
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect();
            let r = ratio(theirs, ours);
            spreads.push(format!(
                "c={concurrency} {what}: {r:.2} ({})",
                each.join("/")
            ));
            if what == "read" {
                let met = if r >= TARGET_RATIO { "met" } else { "NOT met" };
                verdicts.push(format!("c={concurrency}: {met} ({r:.2})"));
            }
        }
    }
    if verdicts.is_empty() {
        verdicts.push(format!("not measured: {NOT_BUILT}"));
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "## session: GET /read and POST /write on an in-process axum server over TCP, one session per task\n"
    );
    let _ = writeln!(
        out,
        "{:.1} s measured after {:.1} s warm-up per cell; hyper HTTP/1.1 client, one keep-alive connection per task, \
         each task sending the cookie of its own session (created before measuring); cells interleaved \
         (order alternating between repeats), each run {} times; medians shown, ratio = median of the per-repeat \
         ratios to the `no session` cell of the same repeat. `/read` reads `k`; `/write` reads `k` and inserts a \
         new value. tower-redis-session: RedisConfig defaults with pool_size {pool_size}, \
         `insecure_http_for_local_development()`; tower-sessions: fred pool of {pool_size} connections, \
         `with_secure(false)`, same Redis.\n",
        options.duration.as_secs_f64(),
        options.warmup.as_secs_f64(),
        options.repeats,
    );
    out.push_str(&table.render());
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "- target tower-redis-session read / tower-sessions read ≥ {TARGET_RATIO:.2}: {}",
        verdicts.join("; ")
    );
    if !spreads.is_empty() {
        let _ = writeln!(
            out,
            "- tower-redis-session / tower-sessions, median (per repeat): {}",
            spreads.join(" | ")
        );
    }
    let mut per_subject = Vec::new();
    for (i, subject) in Subject::ALL.iter().enumerate() {
        let samples: Vec<&Sample> = rows.iter().flat_map(|(_, row)| &row[i]).collect();
        if !samples.is_empty() {
            per_subject.push(format!("{}: {}", subject.short(), breakdown(&samples)));
        }
    }
    let all: Vec<CpuUse> = rows
        .iter()
        .flat_map(|(_, row)| row.iter().flatten())
        .map(|s| s.cpu)
        .collect();
    let _ = writeln!(out, "- {}", cpu::disturbance(&all));
    let _ = writeln!(
        out,
        "- Redis commands per request by name, all cells (with the server time of each top-level command, `INFO commandstats` usec / calls): {}",
        per_subject.join("; ")
    );
    out
}
