//! SIGTERM on the real binary: the drain, the shutdown deadline, and what shutdown finishes
//! before the process exits.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::harness::{post, start_with};

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
    std::thread::sleep(Duration::from_millis(500));

    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut exited = None;
    for _ in 0..100 {
        if let Some(status) = server.child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status =
        exited.expect("replisync still runs 10 s after SIGTERM with a 1 s shutdown timeout");
    assert_eq!(
        status.code(),
        Some(1),
        "cutting a response short must show in the exit status (1, not a crash)"
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

    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
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
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("draining")),
        "the drain is logged"
    );
    let mut server = server;
    let mut exited = None;
    for _ in 0..150 {
        if let Some(status) = server.child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = exited.expect("replisync stops within 15 s of SIGTERM with a 3 s drain delay");
    assert!(status.success(), "replisync exited with {status}");
}
