//! Hits, misses and degraded answers are counted with `metrics`.

#![allow(clippy::unwrap_used)] // The shared helpers unwrap: a failed setup step fails the test loudly.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Empty, Full};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower_redis_cache::CacheLayer;
use tower_redis_core::RedisManager;
use tower_redis_core::testing::TestRedis;

mod support;

/// Every answer is counted under its result, whether it was stored, and
/// whether Redis was unavailable (`degraded`): three answers while Redis
/// is up, then two after it is killed (answered from the in-process store),
/// and a private page's answers (once, then twice).
#[tokio::test(flavor = "current_thread")]
async fn results_are_counted_with_their_degraded_flag() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let redis = TestRedis::start().await;
    let manager =
        RedisManager::connect(redis.config().failure_threshold(1).build().expect("valid"))
            .await
            .expect("starts");
    let layer = CacheLayer::builder(manager).build().expect("layer");
    let service = tower::Layer::layer(
        &layer,
        tower::service_fn(|request: Request<Empty<Bytes>>| async move {
            let mut response = Response::new(Full::new(Bytes::from_static(b"hello")));
            // `/private` is never stored.
            let directives = if request.uri().path() == "/private" {
                "private"
            } else {
                "max-age=60"
            };
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, directives.parse().expect("value"));
            Ok::<_, Infallible>(response)
        }),
    );
    let get = |path: &str| {
        Request::get(path)
            .header(header::HOST, "a.example")
            .body(Empty::new())
            .expect("request")
    };
    let mut statuses = Vec::new();
    let mut ask = async |path: &str| {
        let response = service
            .clone()
            .oneshot(get(path))
            .await
            .expect("infallible");
        statuses.push(
            response.headers()["cache-status"]
                .to_str()
                .expect("text")
                .to_owned(),
        );
        response.into_body().collect().await.expect("body");
        layer.flush().await;
    };
    for _ in 0..3 {
        ask("/x").await;
    }
    ask("/private").await;
    redis.kill().await;
    for _ in 0..2 {
        ask("/x").await;
        ask("/private").await;
    }

    // (result, stored, degraded) → count.
    let mut counts: HashMap<(String, String, String), u64> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() != "tower_redis_cache_requests_total" {
            continue;
        }
        let DebugValue::Counter(n) = value else {
            continue;
        };
        let label = |name: &str| {
            key.key()
                .labels()
                .find(|l| l.key() == name)
                .map(|l| l.value().to_owned())
                .unwrap_or_else(|| panic!("no {name} label on {key:?}"))
        };
        *counts
            .entry((label("result"), label("stored"), label("degraded")))
            .or_default() += n;
    }
    let count = |result: &str, stored: &str, degraded: &str| {
        counts
            .get(&(result.to_owned(), stored.to_owned(), degraded.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    let context = format!("{counts:?} from {statuses:?}");
    assert_eq!(count("uri-miss", "true", "false"), 1, "{context}");
    assert_eq!(count("hit", "false", "false"), 2, "{context}");
    // Redis is gone: the in-process store starts empty, then answers.
    assert_eq!(count("uri-miss", "true", "true"), 1, "{context}");
    assert_eq!(count("hit", "false", "true"), 1, "{context}");
    // A private answer is a miss that is not stored, with Redis or without.
    assert_eq!(count("uri-miss", "false", "false"), 1, "{context}");
    assert_eq!(count("uri-miss", "false", "true"), 2, "{context}");
    assert_eq!(counts.values().sum::<u64>(), 8, "{context}");
}

/// Lookups that arrive while another is in flight are sent together:
/// twenty requests for twenty stored pages, started at once, are one
/// `HMGET` alone and one pipeline of the other nineteen (timed once, as
/// `PIPELINE`). Each request is served its own page, and Redis still runs
/// one `HMGET` per lookup.
#[tokio::test(flavor = "current_thread")]
async fn lookups_arriving_together_are_one_pipeline_and_each_is_served_its_own_page() {
    let timed = lookups_at_once(&[0], 1).await;
    assert_eq!(
        (timed.get("HMGET"), timed.get("PIPELINE")),
        (Some(&1), Some(&1)),
        "the first lookup alone, the others in one pipeline: {timed:?}"
    );
}

/// A URL whose entry is large (above 8 KiB) is looked up alone: twenty
/// requests for twenty stored 16 KiB pages, started at once, are twenty
/// `HMGET`s timed each on its own and no pipeline, whether the instance
/// learnt the size when it stored the page or when it looked it up.
#[tokio::test(flavor = "current_thread")]
async fn lookups_of_large_entries_are_not_gathered() {
    for instances in [1, 2] {
        let timed = lookups_at_once(&[16 * 1024], instances).await;
        assert_eq!(
            (timed.get("HMGET"), timed.get("PIPELINE").unwrap_or(&0)),
            (Some(&20), &0),
            "{instances} instance(s): every lookup alone: {timed:?}"
        );
    }
    // The second instance first saw the pages small; they grew since, and
    // one lookup of each found them large.
    let timed = lookups_at_once(&[0, 16 * 1024], 2).await;
    assert_eq!(
        (timed.get("HMGET"), timed.get("PIPELINE").unwrap_or(&0)),
        (Some(&20), &0),
        "pages that grew: every lookup alone: {timed:?}"
    );
}

/// Asks `service` for `path`: the answer's `Cache-Status` and body.
async fn ask<S, B>(service: S, path: String) -> (String, Bytes)
where
    S: tower::Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let request = Request::get(path)
        .header(header::HOST, "a.example")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = service.oneshot(request).await.expect("infallible");
    let status = response.headers()["cache-status"]
        .to_str()
        .expect("text")
        .to_owned();
    let body = response.into_body().collect().await.expect("body");
    (status, body.to_bytes())
}

/// The page at `path`: `page <path>`, padded with dots to `size` bytes.
fn page(path: &str, size: usize) -> Bytes {
    let mut page = format!("page {path}").into_bytes();
    page.resize(size.max(page.len()), b'.');
    Bytes::from(page)
}

/// Twenty pages of (at least) `sizes[0]` bytes are stored through one
/// instance; the last of `instances` (the same one, or a second whose
/// first lookups of them ran the lookup script) looks each up once. For
/// each further size, the pages are purged, stored again at that size
/// through the first instance, and looked up again by the last, twenty at
/// once. Then the last instance looks them up twenty at once: checks that
/// each is served its own page in one `HMGET`, and returns how many times
/// each operation was timed during those lookups.
async fn lookups_at_once(sizes: &[usize], instances: usize) -> HashMap<String, usize> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let redis = TestRedis::start().await;
    let size = Arc::new(AtomicUsize::new(sizes[0]));
    let mut services = Vec::new();
    for _ in 0..instances {
        let size = Arc::clone(&size);
        let manager = RedisManager::connect(redis.config().build().expect("valid"))
            .await
            .expect("starts");
        let layer = CacheLayer::builder(manager).build().expect("layer");
        let service = tower::Layer::layer(
            &layer,
            tower::service_fn(move |request: Request<Empty<Bytes>>| {
                let size = size.load(Ordering::Relaxed);
                async move {
                    let mut response = Response::new(Full::new(page(request.uri().path(), size)));
                    response
                        .headers_mut()
                        .insert(header::CACHE_CONTROL, "max-age=60".parse().expect("value"));
                    Ok::<_, Infallible>(response)
                }
            }),
        );
        services.push((layer, service));
    }
    let paths: Vec<String> = (0..20).map(|i| format!("/page/{i}")).collect();
    // Stored through the first instance, then looked up once each by the
    // one measured.
    for (layer, service) in &services {
        for path in &paths {
            ask(service.clone(), path.clone()).await;
        }
        layer.flush().await;
    }
    let (_, service) = services.last().expect("an instance");
    for &grown in &sizes[1..] {
        size.store(grown, Ordering::Relaxed);
        let (layer, first) = &services[0];
        layer.handle().purge_all().await;
        for path in &paths {
            ask(first.clone(), path.clone()).await;
        }
        layer.flush().await;
        futures_util::future::join_all(paths.iter().map(|path| ask(service.clone(), path.clone())))
            .await;
    }
    let size = *sizes.last().expect("a size");
    // A snapshot takes the histograms' samples: the next one holds the
    // lookups' alone.
    let _ = snapshotter.snapshot();

    let (answers, commands) = redis
        .commands_during(futures_util::future::join_all(
            paths.iter().map(|path| ask(service.clone(), path.clone())),
        ))
        .await;
    for (path, (status, body)) in paths.iter().zip(answers) {
        assert!(status.contains("hit"), "{path}: {status}");
        assert_eq!(body, page(path, size), "{path}");
    }
    assert_eq!(commands, vec!["hmget"; 20], "one HMGET per lookup");
    support::operations(snapshotter.snapshot())
}
