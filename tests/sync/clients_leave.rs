//! Pushes whose clients leave at any point: many clients over many spaces give up on their pushes
//! after a fraction of a millisecond to a few milliseconds, wherever the server then is (reading
//! the body, waiting for a group, a batch or the writer, in a statement, committing), and send
//! them again, as Replicache does. Nothing is lost, nothing applied twice, nothing held up.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Backend, TestServer, inc, push_body};

const CLIENTS: u64 = 48;
const PUSHES: u64 = 16;
const SPACES: u64 = 12;

/// How long client `c` waits for its push `id` before it leaves: 0 to 4 ms, spread over the
/// clients and pushes so that they leave at every stage of a push.
fn patience(c: u64, id: u64) -> Duration {
    Duration::from_micros((c * 7919 + id * 104_729) % 4_000)
}

/// Sends `body` and gives up after `patience`: whether it was answered 200 in time.
async fn push_impatiently(
    server: &TestServer,
    space: &str,
    body: &Value,
    patience: Duration,
) -> bool {
    let sent = server
        .http
        .post(server.url(&format!("/spaces/{space}/push")))
        .header("content-type", "application/json")
        .body(body.to_string())
        .timeout(patience)
        .send()
        .await;
    matches!(sent, Ok(response) if response.status() == 200)
}

/// Each client pushes its mutations one at a time, leaving early, then sends each push it left
/// again until it is answered; returns how many it left.
async fn client(server: Arc<TestServer>, c: u64) -> u64 {
    let space = format!("s{}", c % SPACES);
    let (group, client) = (format!("g{c}"), format!("c{c}"));
    let mut left = 0;
    for id in 1..=PUSHES {
        let body = push_body(&group, &[(&client, id, "increment", inc("n", 1))]);
        if push_impatiently(&server, &space, &body, patience(c, id)).await {
            continue;
        }
        left += 1;
        let again = tokio::time::timeout(Duration::from_secs(30), server.push(&space, &body)).await;
        assert_eq!(
            again.expect("a push sent again is answered: no push that left holds it up"),
            (200, json!({})),
            "{client} push {id} sent again"
        );
    }
    left
}

async fn pushes_whose_clients_leave_at_any_point_land_exactly_once(backend: Backend) {
    let server = Arc::new(TestServer::start(backend).await);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(server.clone(), c)))
        .collect();
    let mut left = 0;
    for client in clients {
        left += client.await.unwrap();
    }
    assert!(
        left > 0,
        "no client left a push early: the test tested nothing"
    );
    for s in 0..SPACES {
        let space = format!("s{s}");
        let pushed = (0..CLIENTS).filter(|c| c % SPACES == s).count() as u64 * PUSHES;
        let view = server.state(&space, "reader").await;
        assert_eq!(
            view.entries["n"],
            json!(pushed),
            "{space}: each mutation once"
        );
        assert_eq!(view.cookie, pushed, "{space}: one version per applied push");
    }
    for c in 0..CLIENTS {
        let space = format!("s{}", c % SPACES);
        let view = server.state(&space, &format!("g{c}")).await;
        assert_eq!(
            view.lmid(&format!("c{c}")),
            PUSHES,
            "c{c}'s last mutation id"
        );
    }
}

crate::on_both_stores!(pushes_whose_clients_leave_at_any_point_land_exactly_once);
