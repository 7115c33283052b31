//! Limits of the HTTP edge, over real sockets: the header read timeout, the idle keep-alive
//! timeout, the cap on open connections and the caps on SSE poke streams.

use std::time::Duration;

use replisync::http::settings::HttpSettings;
use replisync::poke::sse::StreamLimits;
use replisync::poke::sse::settings::SseSettings;
use replisync::startup::App;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Backend, TestServer};

/// Longest any test waits for the server to close a connection.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

async fn server_with(http: HttpSettings, sse: Option<SseSettings>) -> TestServer {
    let mut app = App::builder().http(http);
    if let Some(sse) = sse {
        app = app.sse(sse);
    }
    TestServer::start_with(Backend::Sqlite, app).await
}

async fn connect(server: &TestServer) -> TcpStream {
    TcpStream::connect(server.base.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Reads until the server closes the connection; answers what was read, or `None` if the
/// connection is still open after `wait`.
pub(crate) async fn read_until_closed(tcp: &mut TcpStream, wait: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(String::from_utf8_lossy(&seen).into_owned()),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `GET /healthz` on a keep-alive connection and reads the whole answer.
async fn health_check(tcp: &mut TcpStream) {
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
    loop {
        let text = String::from_utf8_lossy(&seen);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            assert!(head.starts_with("HTTP/1.1 200"), "health check: {head}");
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse().ok())
                .expect("a content-length");
            if body.len() >= length {
                return;
            }
        }
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .expect("health check answered in time")
            .unwrap();
        assert!(n > 0, "closed before the health check was answered");
        seen.extend_from_slice(&buf[..n]);
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_that_does_not_finish_its_headers_is_closed_after_the_header_timeout() {
    let http = HttpSettings {
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(60),
        ..HttpSettings::default()
    };
    let server = server_with(http, None).await;
    let mut half = connect(&server).await;
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: te")
        .await
        .unwrap();
    let mut silent = connect(&server).await;
    let started = tokio::time::Instant::now();
    assert!(
        read_until_closed(&mut half, CLOSE_WAIT).await.is_some(),
        "half a request head still open after {CLOSE_WAIT:?}"
    );
    assert!(
        read_until_closed(&mut silent, CLOSE_WAIT).await.is_some(),
        "a silent connection still open after {CLOSE_WAIT:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert_eq!(server.metrics.header_read_timeouts.get(), 2);
    let text = server.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&text, "replisync_header_read_timeouts_total"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let http = HttpSettings {
        header_read_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(1),
        ..HttpSettings::default()
    };
    let server = server_with(http, None).await;
    let mut tcp = connect(&server).await;
    health_check(&mut tcp).await;
    // Still usable for a second request after idling for part of the idle timeout (the idle
    // time is the behaviour under test, so this waits on purpose).
    tokio::time::sleep(Duration::from_millis(300)).await;
    health_check(&mut tcp).await;
    let idle_from = tokio::time::Instant::now();
    assert!(
        read_until_closed(&mut tcp, CLOSE_WAIT).await.is_some(),
        "an idle keep-alive connection still open after {CLOSE_WAIT:?}"
    );
    assert!(idle_from.elapsed() >= Duration::from_millis(800));
    assert_eq!(server.metrics.idle_closes.get(), 1);
    assert_eq!(server.metrics.header_read_timeouts.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_over_the_cap_are_answered_503_while_open_ones_still_work() {
    let http = HttpSettings {
        max_connections: 2,
        ..HttpSettings::default()
    };
    let server = server_with(http, None).await;
    // Two raw sockets, each a keep-alive connection that has served a request. (Not reqwest's
    // pool: a pool that opens a connection of its own instead would meet the cap.)
    let mut first = connect(&server).await;
    health_check(&mut first).await;
    let mut second = connect(&server).await;
    health_check(&mut second).await;

    let mut third = connect(&server).await;
    let answer = read_until_closed(&mut third, CLOSE_WAIT)
        .await
        .expect("the connection over the cap is closed");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: "),
        "{head}"
    );
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"], "Overloaded");
    assert!(body["message"].is_string());

    // The open connections still work.
    health_check(&mut first).await;
    health_check(&mut second).await;
    assert_eq!(server.metrics.connections_refused.get(), 1);
    assert_eq!(server.metrics.open_connections.get(), 2);

    // Room again once one closes.
    drop(second);
    let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
    while server.metrics.open_connections.get() > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed connection is still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut fourth = connect(&server).await;
    health_check(&mut fourth).await;
}

/// Opens the poke stream of `space`; answers the response (whose body is the stream).
async fn watch(server: &TestServer, space: &str) -> reqwest::Response {
    server.get(&format!("/spaces/{space}/poke")).await
}

async fn assert_refused(server: &TestServer, space: &str, cap: &str) {
    let response = watch(server, space).await;
    assert_eq!(response.status(), 503, "stream of {space} over {cap}");
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "Overloaded");
    assert!(body["message"].as_str().unwrap().contains(cap), "{body}");
}

/// Opens a stream of `space` once the server has noticed a closed one (at its next keep-alive).
async fn watch_once_room(server: &TestServer, space: &str) -> reqwest::Response {
    let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
    loop {
        let response = watch(server, space).await;
        if response.status() == 200 {
            return response;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused after a stream closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_streams_over_the_caps_are_refused_503_until_one_closes() {
    let defaults = SseSettings::default();
    let sse = SseSettings {
        // The server notices a closed stream when it next writes: a keep-alive every second.
        keep_alive: Duration::from_secs(1),
        limits: StreamLimits {
            total: 3,
            per_space: 2,
            ..defaults.limits
        },
    };
    let server = server_with(HttpSettings::default(), Some(sse)).await;
    let a1 = watch(&server, "a").await;
    let a2 = watch(&server, "a").await;
    assert_eq!((a1.status().as_u16(), a2.status().as_u16()), (200, 200));
    assert_refused(&server, "a", "REPLISYNC_SSE_MAX_STREAMS_PER_SPACE").await;
    let b = watch(&server, "b").await;
    assert_eq!(b.status(), 200);
    assert_refused(&server, "c", "REPLISYNC_SSE_MAX_STREAMS").await;
    let text = server.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&text, "replisync_sse_open_streams"), 3);
    assert_eq!(metric(&text, "replisync_sse_streams_refused_total"), 2);

    drop(b);
    let c = watch_once_room(&server, "c").await;
    drop(a1);
    let a3 = watch_once_room(&server, "a").await;
    let text = server.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&text, "replisync_sse_open_streams"), 3);
    drop((a2, a3, c));
}
