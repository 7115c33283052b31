//! Tombstone compaction: deletions older than REPLISYNC_TOMBSTONE_TTL are removed, and a pull
//! whose cookie is older than a removed deletion gets the whole space instead of a delta.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::TryStreamExt;
use replisync::gc::{self, GcSettings};
use replisync::protocol::SpaceId;
use replisync::store::unix_now;
use serde_json::{Value, json};

use crate::harness::{Backend, PullView, TestServer, push_body, wait_until};

const TTL: Duration = Duration::from_secs(30 * 86_400);
/// Clients are kept here (for a century): these tests are about deletions only.
const SETTINGS: GcSettings = GcSettings {
    client_ttl: Duration::from_secs(36_500 * 86_400),
    tombstone_ttl: TTL,
    interval: None,
    pause_factor: 0,
};

fn set(key: &str, value: i64) -> Value {
    json!({"key": key, "value": value})
}

fn del(key: &str) -> Value {
    json!({"key": key})
}

/// Collects as if `days` had passed.
async fn collect_after(server: &TestServer, days: i64) -> u64 {
    let now = unix_now() + days * 86_400;
    let collected = gc::collect(&*server.store, &server.metrics, now, &SETTINGS).await;
    collected.unwrap().expect("not locked").tombstones
}

async fn count_tombstones(server: &TestServer) -> i64 {
    let sql = "SELECT count(*) FROM replisync_entries WHERE deleted";
    server.db.scalar(sql).await.unwrap()
}

async fn a_pull_across_a_compacted_deletion_gets_the_whole_space(backend: Backend) {
    let server = TestServer::start(backend).await;
    let first = [("c", 1, "set", set("a", 1)), ("c", 2, "set", set("b", 2))];
    server.push_ok("s", &push_body("g", &first)).await; // version 1
    let pulled = server.pull_ok("s", "g", Value::Null).await;
    let mut old = PullView::from_response(&pulled);
    assert_eq!(old.cookie, 1);
    server
        .push_ok("s", &push_body("g", &[("c", 3, "delete", del("a"))]))
        .await; // version 2
    server
        .push_ok("s", &push_body("g", &[("c", 4, "set", set("c", 3))]))
        .await; // version 3
    assert_eq!(collect_after(&server, 29).await, 0, "younger than the TTL");
    assert_eq!(count_tombstones(&server).await, 1);

    assert_eq!(collect_after(&server, 31).await, 1);
    assert_eq!(count_tombstones(&server).await, 0);

    // Cookie 1 is older than the removed deletion (version 2): the whole space, from scratch.
    let (status, reset) = server.pull("s", "g", json!(1)).await;
    assert_eq!(status, 200, "{reset}");
    assert_eq!(reset["patch"][0], json!({"op": "clear"}));
    assert_eq!(reset["cookie"], json!(3));
    assert_eq!(reset["lastMutationIDChanges"], json!({"c": 4}));
    old.apply(&reset);
    assert_eq!(old.entries, server.state("s", "fresh").await.entries);
    assert!(!old.entries.contains_key("a"));
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("replisync_pull_resets_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("replisync_gc_tombstones_removed_total 1"));

    // Cookie 2 saw the deletion: an ordinary delta.
    let delta = server.pull_ok("s", "g", json!(2)).await;
    assert_eq!(
        delta["patch"],
        json!([{"op": "put", "key": "c", "value": 3}])
    );

    // A streamed read from the old cookie (a large delta's path) resets in its own snapshot.
    let space = SpaceId::parse("s").unwrap();
    let snapshot = server
        .store
        .streamed_pull(&space, "g", Some(1))
        .await
        .unwrap();
    assert!(snapshot.reset);
    assert_eq!(snapshot.changed_clients, vec![("c".to_owned(), 4)]);
    let entries: Vec<_> = snapshot.entries.try_collect().await.unwrap();
    assert_eq!(entries.len(), 2, "every live entry: {entries:?}");
    assert!(entries.iter().all(|e| e.value.is_some()));
    let snapshot = server
        .store
        .streamed_pull(&space, "g", Some(2))
        .await
        .unwrap();
    assert!(!snapshot.reset);
}

const WRITERS: usize = 4;
const ROUNDS: u64 = 25;

/// Compaction runs over and over (as if a year had passed, so every deletion is old) while
/// clients set and delete keys and pull now and then: every client's view, built only from
/// the pulls it got (deltas and resets), equals the space. Each writer waits, after its first
/// deletion, until compaction has removed a tombstone: so it provably ran mid-sync.
async fn compacting_while_clients_sync_keeps_every_view_right(backend: Backend) {
    let server = Arc::new(TestServer::start(backend).await);
    let done = Arc::new(AtomicBool::new(false));
    let removed = Arc::new(AtomicU64::new(0));
    let collector = {
        let (server, done, removed) = (server.clone(), done.clone(), removed.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let pass = collect_after(&server, 365).await;
                removed.fetch_add(pass, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (server, removed) = (server.clone(), removed.clone());
        writers.push(tokio::spawn(async move {
            let (group, client) = (format!("group-{w}"), format!("client-{w}"));
            let mut view = PullView::default();
            for id in 1..=ROUNDS {
                let key = format!("k-{w}-{}", (id - 1) / 2);
                let mutation = if id % 2 == 1 {
                    set(&key, id as i64)
                } else {
                    del(&key)
                };
                let name = if id % 2 == 1 { "set" } else { "delete" };
                let body = push_body(&group, &[(client.as_str(), id, name, mutation)]);
                assert_eq!(server.push("s", &body).await, (200, json!({})));
                if id == 2 {
                    let compacted = || removed.load(Ordering::Relaxed);
                    wait_until("a compaction mid-sync", compacted, |n| *n > 0).await;
                }
                if id % 4 != 1 {
                    // Pulls lag behind pushes, so deletions after a cookie get compacted.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let cookie = if id == 1 {
                    Value::Null
                } else {
                    json!(view.cookie)
                };
                let (status, pulled) = server.pull("s", &group, cookie).await;
                assert_eq!(status, 200, "{pulled}");
                view.apply(&pulled);
            }
            view
        }));
    }
    let mut views = Vec::new();
    for writer in writers {
        views.push(writer.await.expect("writer finished"));
    }
    done.store(true, Ordering::Relaxed);
    collector.await.unwrap();
    collect_after(&server, 365).await;
    assert_eq!(count_tombstones(&server).await, 0);
    let truth = server.state("s", "check").await;
    for (w, mut view) in views.into_iter().enumerate() {
        let pulled = server
            .pull_ok("s", &format!("group-{w}"), json!(view.cookie))
            .await;
        view.apply(&pulled);
        assert_eq!(view.entries, truth.entries, "writer {w}'s view");
        assert_eq!(view.lmid(&format!("client-{w}")), ROUNDS);
    }
}

crate::on_both_stores!(
    a_pull_across_a_compacted_deletion_gets_the_whole_space,
    compacting_while_clients_sync_keeps_every_view_right,
);
