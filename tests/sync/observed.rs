//! What `/metrics` observes of real pushes and pulls: each push timed under its outcome, each
//! pull under its kind, group waits and commits, failed mutations by kind and reason, and the
//! poke's delay to an open SSE stream.

use std::time::Duration;

use futures::StreamExt;
use replisync::startup::App;
use serde_json::{Value, json};

use crate::harness::{Backend, TestServer, inc, push_body, sse_every};

/// The value of the series written exactly `series` (name and labels) in `text`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

async fn metrics_text(server: &TestServer) -> String {
    server.get("/metrics").await.text().await.unwrap()
}

async fn pushes_pulls_failures_and_pokes_are_timed_and_counted(backend: Backend) {
    let options = App::builder().sse(sse_every(Duration::from_secs(15)));
    let server = TestServer::start_with(backend, options).await;
    let stream = server.get("/spaces/s/poke").await;
    assert_eq!(stream.status(), 200);
    let mut events = stream.bytes_stream(); // open, so that pokes reach it
    let connected = events.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&connected).contains("connected"));

    let push = push_body(
        "g",
        &[
            ("c", 1, "increment", inc("n", 1)),
            ("c", 2, "increment", json!({"key": "n", "delta": "one"})),
            ("c", 3, "nope", json!({})),
        ],
    );
    server.push_ok("s", &push).await; // committed
    server.push_ok("s", &push).await; // a resend: unchanged, poked again
    let stranger = push_body("g2", &[("c2", 5, "increment", inc("n", 1))]);
    let (status, _) = server.push("s", &stranger).await; // ClientStateNotFound: refused
    assert_eq!(
        status, 200,
        "ClientStateNotFound is a 200 with an error body"
    );
    server.pull_ok("s", "g", Value::Null).await; // streamed
    server.pull_ok("s", "g", json!(1)).await; // shared
    // Both pokes were handed to the stream before their pushes were answered.

    let text = metrics_text(&server).await;
    for (series, expected) in [
        (
            "replisync_push_duration_seconds_count{outcome=\"committed\"}",
            1.0,
        ),
        (
            "replisync_push_duration_seconds_count{outcome=\"unchanged\"}",
            1.0,
        ),
        (
            "replisync_push_duration_seconds_count{outcome=\"refused\"}",
            1.0,
        ),
        (
            "replisync_push_duration_seconds_count{outcome=\"failed\"}",
            0.0,
        ),
        ("replisync_push_mutations_count", 3.0),
        ("replisync_push_mutations_sum", 7.0),
        ("replisync_push_group_wait_seconds_count", 3.0),
        ("replisync_push_group_pushes_count", 3.0),
        ("replisync_push_commit_duration_seconds_count", 1.0),
        (
            "replisync_pull_duration_seconds_count{kind=\"streamed\"}",
            1.0,
        ),
        (
            "replisync_pull_duration_seconds_count{kind=\"shared\"}",
            1.0,
        ),
        ("replisync_pull_duration_seconds_count{kind=\"reset\"}", 0.0),
        (
            "replisync_mutations_failed_total{kind=\"builtin\",reason=\"invalid_args\"}",
            1.0,
        ),
        (
            "replisync_mutations_failed_total{kind=\"unknown\",reason=\"no_mutator\"}",
            1.0,
        ),
        ("replisync_poke_delay_seconds_count{service=\"sse\"}", 2.0),
    ] {
        assert_eq!(value(&text, series), expected, "{series}:\n{text}");
    }
    // Durations are in seconds: a push on this machine takes well under one.
    let committed = value(
        &text,
        "replisync_push_duration_seconds_sum{outcome=\"committed\"}",
    );
    assert!(committed > 0.0 && committed < 1.0, "{committed}");
    let all = value(
        &text,
        "replisync_push_duration_seconds_bucket{le=\"+Inf\",outcome=\"committed\"}",
    );
    assert_eq!(all, 1.0);
}

/// The database pools as `/metrics` shows them: open connections by state, and the maximum.
async fn the_pools_show_their_connections(backend: Backend) {
    let server = TestServer::start(backend).await;
    server
        .push_ok("s", &push_body("g", &[("c", 1, "increment", inc("n", 1))]))
        .await;
    let text = metrics_text(&server).await;
    // On Postgres, an unlocked push's statements run on the connections the batchers keep.
    let pools: &[&str] = match backend {
        Backend::Postgres => &["postgres", "batching"],
        Backend::Sqlite => &["writer"],
    };
    let mut used = 0.0;
    for pool in pools {
        let idle = value(
            &text,
            &format!("replisync_db_pool_connections{{pool=\"{pool}\",state=\"idle\"}}"),
        );
        let in_use = value(
            &text,
            &format!("replisync_db_pool_connections{{pool=\"{pool}\",state=\"in_use\"}}"),
        );
        let max = value(
            &text,
            &format!("replisync_db_pool_max_connections{{pool=\"{pool}\"}}"),
        );
        assert!(idle + in_use <= max && max >= 1.0, "{pool}: {text}");
        used += idle + in_use;
    }
    assert!(used >= 1.0, "the push used a connection:\n{text}");
}

crate::on_both_stores!(
    pushes_pulls_failures_and_pokes_are_timed_and_counted,
    the_pools_show_their_connections,
);
