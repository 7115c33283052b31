//! Known states (Postgres): a push to a space this instance read or committed lately is applied
//! on what it knew, with no read; another writer's commit, or garbage collection in another
//! process, makes the push run again from a fresh read, and no answer or total differs.

use std::time::Duration;

use replisync::gc::{self, GcSettings};
use replisync::startup::App;
use replisync::store::unix_now;
use serde_json::{Value, json};

use crate::commit_batches::{SecondInstance, one};
use crate::harness::{Backend, StoreOptions, TestServer, inc, push_body};

fn increment(group: &str, client: &str, id: u64, delta: i64) -> Value {
    one(group, client, id, "increment", inc("n", delta))
}

/// A client group's pushes after its first are applied on what the instance knew (counted),
/// and land exactly: totals, last mutation id and one version per push.
#[tokio::test]
async fn a_push_to_a_space_the_instance_wrote_lately_reads_nothing_and_lands_exactly() {
    let server = TestServer::start(Backend::Postgres).await;
    for id in 1..=5 {
        server.push_ok("s", &increment("g", "c", id, 1)).await;
    }
    let known = server.store.commit_batches().known;
    assert_eq!(known.served, 4, "{known:?}");
    assert_eq!(known.stale, 0);
    assert!(known.bytes > 0);
    let state = server.state("s", "g").await;
    assert_eq!(
        (state.entries["n"].clone(), state.lmid("c"), state.cookie),
        (json!(5), 5, 5)
    );
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("replisync_push_reads_known_total 4\n"),
        "{metrics}"
    );
    assert!(metrics.contains("replisync_push_reads_known_stale_total 0\n"));
}

/// Another instance's commit to the space makes what the first knew stale: its next push is
/// refused at commit, runs again from a fresh read (counted), and nothing is lost; the space is
/// then read before each push for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_space_another_instance_moved_is_read_again_and_nothing_is_lost() {
    let first = TestServer::start(Backend::Postgres).await;
    let second = SecondInstance::beside(&first, &StoreOptions::default()).await;
    first.push_ok("s", &increment("a", "ca", 1, 1)).await;
    first.push_ok("s", &increment("a", "ca", 2, 1)).await;
    assert_eq!(
        second.push("s", &increment("b", "cb", 1, 10)).await,
        (200, json!({}))
    );
    first.push_ok("s", &increment("a", "ca", 3, 1)).await;
    let known = first.store.commit_batches().known;
    assert_eq!((known.served, known.stale), (2, 1), "{known:?}");
    assert!(first.metrics.push_conflicts.get() >= 1);
    first.push_ok("s", &increment("a", "ca", 4, 1)).await;
    let known = first.store.commit_batches().known;
    assert_eq!(
        known.served, 2,
        "the space is read while another writer is about: {known:?}"
    );
    let state = first.state("s", "a").await;
    assert_eq!(state.entries["n"], json!(14));
    assert_eq!((state.lmid("ca"), state.cookie), (4, 5));
    second.stop().await;
}

/// Garbage collection in another process removes a client group the instance knows: the
/// group's next push is refused at commit, and run again it is told to start over, as when the
/// group was read; nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_client_group_collected_elsewhere_is_told_to_start_over() {
    const TTL: Duration = Duration::from_secs(30 * 86_400);
    let server = TestServer::start(Backend::Postgres).await;
    server.push_ok("s", &increment("gone", "c", 1, 1)).await;
    server.push_ok("s", &increment("gone", "c", 2, 1)).await;
    let ago = unix_now() - TTL.as_secs() as i64 - 60;
    let idle = format!("UPDATE replisync_client_groups SET last_active = {ago} WHERE id = 'gone'");
    server.db.execute(&idle).await;
    let elsewhere = SecondInstance::beside(&server, &StoreOptions::default()).await;
    let settings = GcSettings {
        client_ttl: TTL,
        tombstone_ttl: TTL,
        interval: None,
        pause_factor: 0,
    };
    let collected = gc::collect(&*elsewhere.store, &elsewhere.metrics, unix_now(), &settings)
        .await
        .unwrap()
        .expect("the collection ran");
    assert_eq!(collected.client_groups, 1);
    let before = server.db.fingerprint().await;
    let next = increment("gone", "c", 3, 100);
    assert_eq!(
        server.push("s", &next).await,
        (200, json!({"error": "ClientStateNotFound"}))
    );
    assert_eq!(server.db.fingerprint().await, before);
    let known = server.store.commit_batches().known;
    assert_eq!((known.served, known.stale), (2, 1), "{known:?}");
    elsewhere.stop().await;
}

/// The same odd pushes to a server that keeps known states and to one that reads before every
/// push get the same answers and leave the same rows: replays, a mutation from the future, a
/// client of another group, a group of another space, a bad argument, a delete then an
/// increment of the deleted key, a group that looks new (its client starts at mutation 1) but
/// is another space's, or whose client is another group's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_pushes_are_answered_as_when_every_push_reads() {
    let reads = StoreOptions {
        known_state_bytes: 0,
        ..StoreOptions::default()
    };
    let knowing = TestServer::start(Backend::Postgres).await;
    let reading = TestServer::start_on(Backend::Postgres, reads, App::builder()).await;
    let pushes: Vec<(&str, Value)> = vec![
        ("s", increment("g1", "c1", 1, 1)),
        ("s", increment("g1", "c1", 2, 1)),
        ("s", increment("g1", "c1", 2, 1)), // a replay
        ("s", increment("g1", "c1", 5, 1)), // from the future
        ("s", increment("g2", "c2", 1, 7)),
        ("s", increment("g2", "c1", 3, 1)), // c1 belongs to g1
        ("t", increment("g3", "c3", 1, 1)),
        ("s", increment("g3", "c3", 2, 1)), // g3 is t's
        ("t", increment("g6", "c6", 1, 1)),
        ("s", increment("g6", "c6b", 1, 1)), // g6 is t's, though it looks new
        ("s", increment("g4", "c1", 1, 1)),  // a new group, but c1 is g1's
        ("s", increment("g5", "c5", 1, 2)),  // a new group
        ("s", increment("g5", "c5", 2, 2)),
        (
            "s",
            one(
                "g1",
                "c1",
                3,
                "increment",
                json!({"key": "n", "delta": "x"}),
            ),
        ),
        ("s", one("g1", "c1", 4, "delete", json!({"key": "n"}))),
        ("s", increment("g1", "c1", 5, 3)),
        ("s", increment("g2", "c2", 2, 1)),
        (
            "s",
            push_body(
                "g1",
                &[
                    ("c1", 6, "increment", inc("n", 1)),
                    ("c1-new", 1, "increment", inc("m", 1)),
                    ("c1", 7, "increment", inc("m", 1)),
                ],
            ),
        ),
    ];
    for (space, body) in &pushes {
        let knowing_answer = knowing.push(space, body).await;
        let reading_answer = reading.push(space, body).await;
        assert_eq!(knowing_answer, reading_answer, "{space} {body}");
    }
    assert_eq!(
        knowing.db.fingerprint().await,
        reading.db.fingerprint().await
    );
    let known = knowing.store.commit_batches().known;
    assert!(known.served >= 6, "{known:?}");
    // g6's push to s was taken for a new group's and refused at its commit: run again, read.
    assert_eq!(known.stale, 1, "{known:?}");
    assert_eq!(reading.store.commit_batches().known.served, 0);
    let state = knowing.state("s", "g1").await;
    assert_eq!(
        (state.entries["n"].clone(), state.entries["m"].clone()),
        (json!(5), json!(2))
    );
}
