//! The built-in SSE poke stream: a poke after a push to the watched space, nothing for others;
//! one user's share of the stream caps; a stream ends when its token expires.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use replisync::poke::sse::StreamLimits;
use replisync::poke::sse::settings::SseSettings;
use replisync::startup::App;
use serde_json::{Value, json};

use crate::auth::{claims, hmac_options, now, token};
use crate::harness::{Backend, TestServer, inc, push_body};

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

    /// Whether no poke came before the stream's next keep-alive comment, waited for up to
    /// `wait`. The stream sends what is queued before it goes idle and a keep-alive comes only
    /// when it is idle, so a poke queued before this call would come first: this proves
    /// "nothing was sent" without a window that a late poke could slip past.
    async fn no_poke_before_next_keep_alive(&mut self, wait: Duration) -> bool {
        let from = self.seen.len();
        let deadline = tokio::time::Instant::now() + wait;
        while !self.seen[from..].contains(": keep-alive") {
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                _ => panic!("no keep-alive within {wait:?}: {:?}", self.seen),
            }
        }
        !self.seen.contains("event: poke")
    }

    fn take(&mut self) -> String {
        std::mem::take(&mut self.seen)
    }

    /// Whether the server ended the stream within `wait` (what came before is kept in `seen`).
    async fn ends_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(None | Some(Err(_))) => return true,
                Err(_) => return false,
            }
        }
    }

    /// The stream of `response`, once its `connected` comment came.
    async fn connected(response: reqwest::Response) -> EventReader {
        assert_eq!(response.status(), 200);
        let mut events = EventReader {
            body: response.bytes_stream().boxed(),
            seen: String::new(),
        };
        assert!(events.wait_for(": connected", Duration::from_secs(5)).await);
        events.take();
        events
    }
}

async fn a_watcher_is_poked_for_its_space_only(backend: Backend) {
    // Frequent keep-alives: each one proves the stream had nothing queued before it.
    let options = App::builder().sse(crate::harness::sse_every(Duration::from_millis(100)));
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
        events
            .no_poke_before_next_keep_alive(Duration::from_secs(5))
            .await,
        "poked for a push to another space: {:?}",
        events.seen
    );
    push("watched", 1).await;
    assert!(
        events.wait_for("event: poke", Duration::from_secs(5)).await,
        "no poke after a push"
    );
    assert_eq!(events.take().matches("event: poke").count(), 1);
    // A push blocked by a mutation id gap changes nothing, so it pokes nobody.
    push("watched", 5).await;
    assert!(
        events
            .no_poke_before_next_keep_alive(Duration::from_secs(5))
            .await,
        "poked for a push that changed nothing: {:?}",
        events.seen
    );
    events.take();
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
    let options = App::builder() // The server notices a closed stream when it next writes: a keep-alive every second.
        .sse(crate::harness::sse_every(Duration::from_secs(1)));
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

/// Opens the stream of `space` with `?auth=` (as a browser's EventSource does).
async fn watch_as(server: &TestServer, space: &str, bearer: &str) -> reqwest::Response {
    let raw = bearer.trim_start_matches("Bearer ");
    server
        .get(&format!("/spaces/{space}/poke?auth={raw}"))
        .await
}

/// A reader with read access cannot take the space's (or the server's) streams: at
/// REPLISYNC_SSE_MAX_STREAMS_PER_USER its next stream is refused 503, counted in `/metrics`,
/// while the space's owner still opens hers and is poked.
async fn one_user_at_its_stream_cap_leaves_room_for_others(backend: Backend) {
    let options = hmac_options().sse(SseSettings {
        keep_alive: Duration::from_secs(15),
        limits: StreamLimits {
            total: 8,
            per_space: 6,
            per_user: 3,
        },
    });
    let server = TestServer::start_with(backend, options).await;
    let mut reader_claims = claims("mallory", &["mallory-*"]);
    reader_claims["spaces_read"] = json!(["doc"]);
    let mallory = token(&reader_claims);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(EventReader::connected(watch_as(&server, "doc", &mallory).await).await);
    }
    for space in ["doc", "mallory-1"] {
        let refused = watch_as(&server, space, &mallory).await;
        assert_eq!(refused.status(), 503, "mallory's 4th stream, on {space}");
        assert!(refused.headers().contains_key("retry-after"));
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"], "Overloaded", "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("REPLISYNC_SSE_MAX_STREAMS_PER_USER"),
            "{message}"
        );
    }
    let alice = token(&claims("alice", &["doc"]));
    let mut owner = EventReader::connected(watch_as(&server, "doc", &alice).await).await;
    let body = push_body("g-alice", &[("c-alice", 1, "increment", inc("n", 1))]);
    assert_eq!(server.push_as("doc", &body, &alice).await.0, 200);
    assert!(
        owner.wait_for("event: poke", Duration::from_secs(5)).await,
        "the owner's stream is not poked"
    );
    let text = server.get("/metrics").await.text().await.unwrap();
    for (name, value) in [
        ("replisync_sse_streams_refused_per_user_total ", "2"),
        ("replisync_sse_streams_refused_total ", "2"),
        ("replisync_sse_open_streams ", "4"),
    ] {
        assert!(
            text.contains(&format!("{name}{value}")),
            "{name}{value} in {text}"
        );
    }
    drop(held);
}

/// A stream opened with a token that expires soon ends at the expiry (the browser's
/// EventSource then reconnects), sends no poke after it, and the stale token gets 401.
async fn a_stream_ends_when_its_token_expires(backend: Backend) {
    let options = hmac_options().sse(crate::harness::sse_every(Duration::from_secs(15)));
    let server = TestServer::start_with(backend, options).await;
    let exp = now() + 2;
    let mut short_claims = claims("alice", &["doc"]);
    short_claims["exp"] = json!(exp);
    let short = token(&short_claims);
    let expires_at = UNIX_EPOCH + Duration::from_secs(exp as u64);
    let writer = token(&claims("writer", &["doc"]));
    let push = |id: u64| {
        let (server, writer) = (&server, &writer);
        async move {
            let body = push_body("g-w", &[("c-w", id, "increment", inc("n", 1))]);
            assert_eq!(server.push_as("doc", &body, writer).await.0, 200);
        }
    };
    let mut events = EventReader::connected(watch_as(&server, "doc", &short).await).await;
    push(1).await;
    assert!(
        events.wait_for("event: poke", Duration::from_secs(1)).await,
        "no poke before the expiry"
    );
    events.take();
    assert!(
        events.ends_within(Duration::from_secs(5)).await,
        "the stream is still open 3 s and more after its token expired"
    );
    let ended_late = SystemTime::now()
        .duration_since(expires_at)
        .unwrap_or_default();
    assert!(
        ended_late < Duration::from_secs(2),
        "ended {ended_late:?} after the expiry"
    );
    assert!(
        !events.seen.contains("event: poke"),
        "poked after the expiry: {:?}",
        events.seen
    );
    push(2).await;
    let again = watch_as(&server, "doc", &short).await;
    assert_eq!(again.status(), 401, "a stale token reopens the stream");
    let body: Value = again.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    assert_eq!(
        watched_spaces_once_settled(&server, 0).await,
        0,
        "the stream is still counted"
    );
}

crate::on_both_stores!(
    a_watcher_is_poked_for_its_space_only,
    a_space_is_forgotten_when_its_last_watcher_leaves,
    one_user_at_its_stream_cap_leaves_room_for_others,
    a_stream_ends_when_its_token_expires,
);
