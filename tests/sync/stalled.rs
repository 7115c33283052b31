//! Clients that stop reading cannot starve the server: first pulls in flight are capped below
//! the pool's size, and a stalled streamed pull is cut off, releasing its snapshot.

use std::time::Duration;

use replisync::pull::{PullLimits, StreamLimits};
use replisync::startup::App;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Backend, TestServer, inc, push_body};

/// Opens a connection, asks for a first pull of `space`, reads the first bytes of the answer,
/// and then never reads again.
async fn stalled_first_pull(server: &TestServer, space: &str) -> TcpStream {
    stalled_pull(server, space, Value::Null).await
}

/// Opens a connection, asks for a pull of `space` from `cookie`, reads the first bytes of the
/// answer, and then never reads again.
async fn stalled_pull(server: &TestServer, space: &str, cookie: Value) -> TcpStream {
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut socket = TcpStream::connect(&address).await.unwrap();
    let body = json!({"pullVersion": 1, "clientGroupID": format!("g-{}", rand_suffix()),
                      "cookie": cookie})
    .to_string();
    let request = format!(
        "POST /spaces/{space}/pull HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut first = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(10), socket.read_exact(&mut first)).await;
    socket
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Pushes a 1 MB value at `k{id}` of `space` for each id (client "w", mutation `id`).
async fn push_megabytes(server: &TestServer, space: &str, ids: std::ops::RangeInclusive<u64>) {
    let megabyte = "x".repeat(1024 * 1024);
    for id in ids {
        let set = json!({"key": format!("k{id}"), "value": megabyte});
        let body = push_body("writer", &[("w", id, "set", set)]);
        assert_eq!(server.push(space, &body).await.0, 200);
    }
}

/// Streamed pulls cut off so far, once there are `expected` (or after 10 s).
async fn streams_cut_off(server: &TestServer, expected: u64) -> u64 {
    for _ in 0..100 {
        if server.metrics.pull_streams_cut.get() >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.metrics.pull_streams_cut.get()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn stalled_readers_cannot_starve_pushes_pulls_or_health(backend: Backend) {
    let options = App::builder().pulls(PullLimits {
        max_first_pulls: 4,
        max_shared_delta_bytes: 4 * 1024 * 1024,
        queue_wait: Duration::from_secs(1),
        stream: StreamLimits {
            stall: Duration::from_secs(1),
            deadline: Duration::from_secs(60),
        },
    });
    let server = TestServer::start_with(backend, options).await;
    // 24 MB: far more than the socket buffers between a stalled reader and the server.
    push_megabytes(&server, "big", 1..=24).await;
    // More stalled readers than the pool has connections (16 for Postgres, 8 for SQLite).
    let mut stalled = Vec::new();
    for _ in 0..20 {
        stalled.push(stalled_first_pull(&server, "big").await);
    }
    // Pushes and health checks still find a connection, at once.
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_secs(4))
        .build()
        .unwrap();
    let push = push_body("other", &[("o", 1, "increment", inc("n", 1))]);
    let pushed = quick
        .post(server.url("/spaces/small/push"))
        .body(push.to_string())
        .send()
        .await
        .expect("a push answers while readers stall");
    assert_eq!(pushed.status(), 200);
    let health = quick.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "the health check found no connection");
    // The stalled streams are cut off and their snapshots released: a normal first pull of the
    // big space then completes.
    let cut = streams_cut_off(&server, 4).await;
    assert!(cut >= 4, "{cut} stalled pulls were cut off");
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metric(&metrics, "replisync_pull_streams_cut_total ") >= 4,
        "/metrics counts them"
    );
    drop(stalled);
    let (status, body) = server.pull("big", "reader", Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(body["patch"].as_array().map(Vec::len), Some(25)); // clear and 24 keys
}

/// Finding 3: readers that stop reading an incremental pull of a large delta used to get the whole
/// delta built in memory, once per cookie (16 stalled pulls of a 40 MB delta held 1.2 GB). Now a
/// delta over REPLISYNC_MAX_SHARED_DELTA_BYTES is streamed like a first pull: each stalled reader
/// holds a few chunks and a streamed-pull permit, those permits are capped, and a stalled one is
/// cut off.
async fn stalled_readers_of_a_large_delta_hold_only_capped_streams(backend: Backend) {
    let options = App::builder().pulls(PullLimits {
        max_first_pulls: 2,
        max_shared_delta_bytes: 64 * 1024,
        queue_wait: Duration::from_millis(500),
        stream: StreamLimits {
            stall: Duration::from_secs(3),
            deadline: Duration::from_secs(60),
        },
    });
    let server = TestServer::start_with(backend, options).await;
    let first = push_body("writer", &[("w", 1, "increment", inc("n", 1))]);
    assert_eq!(server.push("big", &first).await.0, 200);
    let cookie = json!(1);
    // A 12 MB delta after cookie 1: more than the socket buffers of a stalled reader hold.
    push_megabytes(&server, "big", 2..=13).await;
    let stalled = vec![
        stalled_pull(&server, "big", cookie.clone()).await,
        stalled_pull(&server, "big", cookie.clone()).await,
    ];
    // Both streamed-pull permits are held by the stalled readers: a third pull of the delta
    // waits its turn, then is told to come back, instead of building another copy.
    let (status, answer) = server.pull("big", "third", cookie.clone()).await;
    assert_eq!(
        status,
        503,
        "the third pull was answered: {:.200}",
        answer.to_string()
    );
    assert_eq!(answer["error"], "Overloaded");
    assert_eq!(server.metrics.pull_deltas_streamed.get(), 3);
    // The stalled readers are cut off, and the delta is then answered whole.
    let cut = streams_cut_off(&server, 2).await;
    assert_eq!(cut, 2, "the stalled delta pulls were not cut off");
    drop(stalled);
    let (status, delta) = server.pull("big", "reader", cookie).await;
    assert_eq!(status, 200);
    assert_eq!(delta["patch"].as_array().map(Vec::len), Some(12));
}

crate::on_both_stores!(
    stalled_readers_cannot_starve_pushes_pulls_or_health,
    stalled_readers_of_a_large_delta_hold_only_capped_streams,
);
