//! The built-in SSE poke stream: a poke after a push to the watched space, nothing for others.

use std::time::Duration;

use futures::StreamExt;

use crate::harness::{Backend, Options, TestServer, inc, push_body};

/// Reads an SSE response, collecting text until `wanted` appears or `wait` passes.
struct EventReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    seen: String,
}

impl EventReader {
    async fn wait_for(&mut self, wanted: &str, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while !self.seen.contains(wanted) {
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return false,
            }
        }
        true
    }

    fn take(&mut self) -> String {
        std::mem::take(&mut self.seen)
    }
}

async fn a_watcher_is_poked_for_its_space_only(backend: Backend) {
    let options = Options {
        sse_keep_alive: Some(Duration::from_secs(15)),
        ..Options::default()
    };
    let server = TestServer::start_with(backend, options).await;
    let response = server.get("/spaces/watched/poke").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut events = EventReader {
        body: response.bytes_stream().boxed(),
        seen: String::new(),
    };
    assert!(events.wait_for(": connected", Duration::from_secs(5)).await);
    events.take();

    let push = |space: &'static str, id: u64| {
        let server = &server;
        async move {
            let client = format!("c-{space}");
            let body = push_body(
                &format!("g-{space}"),
                &[(&client, id, "increment", inc("n", 1))],
            );
            assert_eq!(server.push(space, &body).await.0, 200);
        }
    };
    push("other", 1).await;
    assert!(
        !events
            .wait_for("event: poke", Duration::from_millis(500))
            .await,
        "poked for a push to another space: {:?}",
        events.seen
    );
    push("watched", 1).await;
    assert!(
        events.wait_for("event: poke", Duration::from_secs(5)).await,
        "no poke after a push"
    );
    // A push blocked by a mutation id gap changes nothing, so it pokes nobody.
    events.take();
    push("watched", 5).await;
    assert!(
        !events
            .wait_for("event: poke", Duration::from_millis(500))
            .await,
        "poked for a push that changed nothing: {:?}",
        events.seen
    );
    // A resend of applied mutations changes nothing either, but pokes again: it follows a lost
    // answer, and the commit's own poke may have been lost with it (a process that stopped).
    push("watched", 1).await;
    assert!(
        events.wait_for("event: poke", Duration::from_secs(5)).await,
        "no poke after a resend"
    );
}

/// The `replisync_sse_watched_spaces` gauge of `/metrics`.
async fn watched_spaces(server: &TestServer) -> u64 {
    let metrics = server.get("/metrics").await.text().await.unwrap();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("replisync_sse_watched_spaces "))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no watched-spaces gauge in {metrics}"))
}

async fn a_space_is_forgotten_when_its_last_watcher_leaves(backend: Backend) {
    let options = Options {
        // The server notices a closed stream when it next writes: a keep-alive every second.
        sse_keep_alive: Some(Duration::from_secs(1)),
        ..Options::default()
    };
    let server = TestServer::start_with(backend, options).await;
    let mut streams = Vec::new();
    for space in ["a", "a", "b"] {
        let response = server.get(&format!("/spaces/{space}/poke")).await;
        let mut events = EventReader {
            body: response.bytes_stream().boxed(),
            seen: String::new(),
        };
        assert!(events.wait_for(": connected", Duration::from_secs(5)).await);
        streams.push(events);
    }
    assert_eq!(watched_spaces(&server).await, 2);
    streams.truncate(1); // b's watcher and one of a's leave
    assert_eq!(
        watched_spaces_once_settled(&server, 1).await,
        1,
        "b is still in the map after its watcher left"
    );
    streams.clear();
    assert_eq!(
        watched_spaces_once_settled(&server, 0).await,
        0,
        "a space nobody watches is still in the map"
    );
}

/// The gauge once it reads `expected`, or after 10 s.
async fn watched_spaces_once_settled(server: &TestServer, expected: u64) -> u64 {
    let mut watched = watched_spaces(server).await;
    for _ in 0..200 {
        if watched == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        watched = watched_spaces(server).await;
    }
    watched
}

crate::on_both_stores!(
    a_watcher_is_poked_for_its_space_only,
    a_space_is_forgotten_when_its_last_watcher_leaves
);
