//! SIGTERM on the real binary: the drain, the shutdown deadline, and what shutdown finishes
//! before the process exits.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Server, SseReader, post, start_with};
use crate::pusher_double::{Published, SlowPusher};

/// A reader that stops reading a large first pull holds a database snapshot; shutdown must
/// still end at its deadline (the process exits, saying it cut work short), not wait forever.
#[tokio::test]
async fn shutdown_ends_at_its_deadline_even_with_a_stalled_reader() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_with(dir.path(), &[("REPLISYNC_SHUTDOWN_TIMEOUT_SECS", "1")]);
    // 16 MB of data: far more than the socket buffers between a stalled reader and replisync.
    let megabyte = "x".repeat(1024 * 1024);
    for id in 1..=16u64 {
        let push = json!({"pushVersion": 1, "clientGroupID": "g", "mutations": [
            {"id": id, "name": "set", "clientID": "c", "timestamp": 1.0,
             "args": {"key": format!("k{id}"), "value": megabyte}}]});
        assert_eq!(
            post(&server.base, "/spaces/big/push", push).await,
            json!({})
        );
    }
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut stalled = std::net::TcpStream::connect(&address).unwrap();
    let pull = r#"{"pullVersion":1,"clientGroupID":"g2","cookie":null}"#;
    write!(
        stalled,
        "POST /spaces/big/pull HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{pull}",
        pull.len()
    )
    .unwrap();
    let mut first_bytes = [0u8; 64];
    stalled.read_exact(&mut first_bytes).unwrap(); // the answer has begun; now stop reading
    // No wait before SIGTERM: a 16 MB answer nobody reads cannot finish, however soon it comes.
    let stopped_at = Instant::now();
    server.sigterm();
    let status = server.exit_within(Duration::from_secs(10)).await;
    let status =
        status.expect("replisync still runs 10 s after SIGTERM with a 1 s shutdown timeout");
    assert_eq!(
        status.code(),
        Some(1),
        "cutting a response short must show in the exit status (1, not a crash)"
    );
    assert!(
        stopped_at.elapsed() >= Duration::from_secs(1),
        "exited before its 1 s deadline, so it did not wait for the response: {:?}",
        stopped_at.elapsed()
    );
    let cut_off = server.wait_for_log("were cut off", Duration::ZERO).await;
    assert!(
        cut_off.is_some(),
        "the cut-off response is logged: {:?}",
        server.log_lines()
    );
    drop(stalled);
}

/// After SIGTERM the server drains: `/readyz` turns 503 at once (so a load balancer takes it
/// out) while `/healthz`, pushes and pulls are still served for REPLISYNC_DRAIN_DELAY_SECS;
/// then it stops cleanly.
#[tokio::test]
async fn readyz_turns_503_while_draining_and_requests_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), &[("REPLISYNC_DRAIN_DELAY_SECS", "3")]);
    let client = reqwest::Client::new();
    let status = |path: &'static str| {
        let (client, url) = (client.clone(), format!("{}{path}", server.base));
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/readyz").await, 200);
    assert_eq!(status("/healthz").await, 200);

    // The drain delay is the behaviour under test: requests are served for its length after
    // SIGTERM, and the process does not exit before it ends.
    let stopped_at = Instant::now();
    server.sigterm();
    let mut ready = 200;
    for _ in 0..40 {
        ready = status("/readyz").await;
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(ready, 503, "/readyz while draining");
    assert_eq!(status("/healthz").await, 200, "alive while draining");
    let push = json!({"pushVersion": 1, "clientGroupID": "g", "mutations": [
        {"id": 1, "name": "set", "clientID": "c", "timestamp": 1.0,
         "args": {"key": "k", "value": "drained"}}]});
    assert_eq!(post(&server.base, "/spaces/s/push", push).await, json!({}));
    let pull = post(
        &server.base,
        "/spaces/s/pull",
        json!({"pullVersion": 1, "clientGroupID": "g2", "cookie": null}),
    )
    .await;
    assert_eq!(pull["patch"][1]["value"], "drained", "{pull}");
    let drain_logged = server.wait_for_log("draining", Duration::ZERO).await;
    assert!(drain_logged.is_some(), "the drain is logged");
    let mut server = server;
    let status = server.exit_within(Duration::from_secs(15)).await;
    let status = status.expect("replisync stops within 15 s of SIGTERM with a 3 s drain delay");
    assert!(status.success(), "replisync exited with {status}");
    assert!(
        stopped_at.elapsed() >= Duration::from_secs(3),
        "exited {:?} after SIGTERM, before the 3 s drain delay ended",
        stopped_at.elapsed()
    );
}

/// Starts replisync poking through `pusher` with the SSE stream on too, and a shutdown timeout
/// of `shutdown_timeout_secs`.
fn start_poking(dir: &std::path::Path, pusher: &SlowPusher, shutdown_timeout_secs: &str) -> Server {
    let mut env = pusher.env();
    env.push(("REPLISYNC_SSE", "true"));
    env.push(("REPLISYNC_SHUTDOWN_TIMEOUT_SECS", shutdown_timeout_secs));
    start_with(dir, &env)
}

/// Sets key `k` in `space`, one mutation by a client group of that space's own.
async fn push_to(server: &Server, space: &str) {
    let push = json!({"pushVersion": 1, "clientGroupID": format!("{space}-group"), "mutations": [
        {"id": 1, "name": "set", "clientID": format!("{space}-client"), "timestamp": 1.0,
         "args": {"key": "k", "value": space}}]});
    let path = format!("/spaces/{space}/push");
    assert_eq!(post(&server.base, &path, push).await, json!({}));
}

/// Makes the poker busy and leaves a poke waiting behind it: a push to `in-flight`, whose
/// Pusher call the double holds, then a push to `queued`, whose poke waits for that call. (The
/// poker gives a call 5 s: the tests release it, or reach their deadline, well before that, so
/// no retry adds a call.)
async fn hold_one_poke_and_queue_another(server: &Server, pusher: &SlowPusher) {
    push_to(server, "in-flight").await;
    let received = pusher.wait_for_received(1, PATIENCE).await;
    assert_eq!(received, [Published::new("poke", &["space-in-flight"])]);
    push_to(server, "queued").await;
}

const PATIENCE: Duration = Duration::from_secs(10);

/// SIGTERM while an SSE stream is open and a poke waits in the Pusher queue behind a call
/// Pusher is slow to answer: the stream ends cleanly, the waiting poke is delivered (its
/// channel, the configured event) before the process exits 0, within the shutdown timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_sse_streams_and_delivers_the_pokes_pending_for_pusher() {
    let pusher = SlowPusher::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_poking(dir.path(), &pusher, "10");
    let sse = SseReader::open(&format!("{}/spaces/in-flight/poke", server.base)).await;
    assert!(
        sse.wait_for(": connected", PATIENCE).await,
        "{}",
        sse.text()
    );
    hold_one_poke_and_queue_another(&server, &pusher).await;
    assert!(
        sse.wait_for("event: poke", PATIENCE).await,
        "{}",
        sse.text()
    );

    let stopped_at = Instant::now();
    server.sigterm();
    let shutting_down = server.wait_for_log("shutting down", PATIENCE).await;
    assert!(shutting_down.is_some(), "{:?}", server.log_lines());
    // The stream ends while Pusher still holds the first call: it does not wait for pokes.
    let stream = sse.end(PATIENCE).await;
    let stream = stream.expect("the SSE stream ends cleanly, not with a transport error");
    assert_eq!(stream.matches("event: poke").count(), 1, "{stream}");
    assert_eq!(
        pusher.received().len(),
        1,
        "the queued poke went before Pusher answered"
    );
    pusher.release();

    let status = server.exit_within(Duration::from_secs(15)).await;
    let status = status.expect("replisync still runs 15 s after SIGTERM");
    assert_eq!(status.code(), Some(0), "{:?}", server.log_lines());
    assert!(
        stopped_at.elapsed() < Duration::from_secs(10),
        "stopped {:?} after SIGTERM, past its 10 s shutdown timeout",
        stopped_at.elapsed()
    );
    assert_eq!(
        pusher.received(),
        [
            Published::new("poke", &["space-in-flight"]),
            Published::new("poke", &["space-queued"]),
        ]
    );
    assert_eq!(
        pusher.answered(),
        2,
        "both calls were answered before the exit"
    );
    let undelivered = server.wait_for_log("undelivered", Duration::ZERO).await;
    assert_eq!(undelivered, None, "every poke was delivered");
}

/// SIGTERM while Pusher holds a call past the shutdown deadline: replisync gives up the held
/// poke and the one queued behind it at the deadline and says so, then exits. Its status is 0:
/// the code tells an undrained poke queue only by that warning (a poke is a hint; clients
/// still pull), unlike a response cut off, which exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gives_up_pokes_pusher_cannot_take_by_the_shutdown_deadline() {
    let pusher = SlowPusher::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_poking(dir.path(), &pusher, "1");
    hold_one_poke_and_queue_another(&server, &pusher).await;

    server.sigterm();
    // Waiting the calls out would take over 20 s: 4 attempts, each cut by a 5 s timeout.
    let status = server.exit_within(Duration::from_secs(10)).await;
    let status =
        status.expect("replisync still runs 10 s after SIGTERM with a 1 s shutdown timeout");
    assert_eq!(status.code(), Some(0), "{:?}", server.log_lines());
    let given_up = server.wait_for_log("undelivered=2", Duration::ZERO).await;
    assert!(
        given_up.is_some(),
        "both pokes counted undelivered: {:?}",
        server.log_lines()
    );
    let at_deadline = server
        .wait_for_log(
            "shutdown deadline reached before every poke was delivered",
            Duration::ZERO,
        )
        .await;
    assert!(at_deadline.is_some_and(|line| line.contains("spaces=2")));
    assert_eq!(
        pusher.received(),
        [Published::new("poke", &["space-in-flight"])]
    );
    assert_eq!(pusher.answered(), 0);
}

/// An orchestrator may stop an instance the moment it says it listens: the signal handlers are
/// in place before that line, so the SIGTERM starts a clean shutdown (exit 0) instead of killing
/// the process. Repeated, since without the handlers the signal and the first poll race.
#[test]
fn a_sigterm_right_after_the_listening_line_shuts_down_cleanly() {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        start_with(dir.path(), &[]).stop();
    }
}
