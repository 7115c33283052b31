//! Garbage collection of idle client groups: a collected client starts over and loses nothing
//! of the space; activity is recorded coarsely; collecting while clients sync changes no answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use replisync::gc::{self, GcSettings};
use replisync::protocol::SpaceId;
use replisync::store::{
    ACTIVITY_GRANULARITY_SECS, ClientRecord, ClientWrite, Collected, PushChanges, StoreError,
    unix_now,
};
use serde_json::{Value, json};

use crate::harness::{Backend, PullView, TestServer, inc, push_body, wait_until};

const TTL: Duration = Duration::from_secs(30 * 86_400);
const SETTINGS: GcSettings = GcSettings {
    client_ttl: TTL,
    tombstone_ttl: TTL,
    interval: None,
    pause_factor: 0,
};

/// Sets a client group's last activity, as if it had last synced `ago_secs` ago.
async fn set_last_active(server: &TestServer, group: &str, ago_secs: i64) {
    let at = unix_now() - ago_secs;
    server
        .db
        .execute(&format!(
            "UPDATE replisync_client_groups SET last_active = {at} WHERE id = '{group}'"
        ))
        .await;
}

async fn last_active(server: &TestServer, group: &str) -> Option<i64> {
    server
        .db
        .scalar(&format!(
            "SELECT last_active FROM replisync_client_groups WHERE id = '{group}'"
        ))
        .await
}

async fn count(server: &TestServer, table: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table}");
    server.db.scalar(&sql).await.unwrap()
}

async fn collect_now(server: &TestServer) -> Option<Collected> {
    gc::collect(&*server.store, &server.metrics, unix_now(), &SETTINGS)
        .await
        .unwrap()
}

async fn a_collected_client_starts_over_and_loses_nothing_of_the_space(backend: Backend) {
    let server = TestServer::start(backend).await;
    let gone = push_body(
        "gone",
        &[
            ("c", 1, "increment", inc("n", 1)),
            ("c", 2, "increment", inc("n", 1)),
        ],
    );
    assert_eq!(server.push("s", &gone).await, (200, json!({})));
    let stays = push_body("stays", &[("d", 1, "increment", inc("m", 5))]);
    assert_eq!(server.push("s", &stays).await, (200, json!({})));
    let first = server.pull_ok("s", "gone", Value::Null).await;
    let mut gone_view = PullView::from_response(&first);
    assert_eq!(gone_view.lmid("c"), 2);

    set_last_active(&server, "gone", TTL.as_secs() as i64 + 60).await;
    let collected = collect_now(&server).await;
    assert_eq!(
        collected,
        Some(Collected {
            client_groups: 1,
            clients: 1,
            ..Collected::default()
        })
    );
    assert_eq!(last_active(&server, "gone").await, None);
    assert!(last_active(&server, "stays").await.is_some());
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("replisync_gc_client_groups_removed_total 1"));
    assert!(metrics.contains("replisync_gc_clients_removed_total 1"));
    assert!(!metrics.contains("replisync_gc_last_run_timestamp_seconds 0\n"));

    // Its next push: the server has lost its state, so the client starts over; nothing applies.
    let before = server.db.fingerprint().await;
    let next = push_body("gone", &[("c", 3, "increment", inc("n", 100))]);
    assert_eq!(
        server.push("s", &next).await,
        (200, json!({"error": "ClientStateNotFound"}))
    );
    assert_eq!(server.db.fingerprint().await, before);
    // A new client of that group (a new tab, from mutation 1) is told the same.
    let new_tab = push_body("gone", &[("new-tab", 1, "increment", inc("n", 100))]);
    assert_eq!(
        server.push("s", &new_tab).await,
        (200, json!({"error": "ClientStateNotFound"}))
    );
    assert_eq!(server.db.fingerprint().await, before);

    // Its next pull, from its cookie or from scratch, tells it the same: start over.
    let csnf = (200, json!({"error": "ClientStateNotFound"}));
    assert_eq!(
        server.pull("s", "gone", json!(gone_view.cookie)).await,
        csnf
    );
    assert_eq!(server.pull("s", "gone", Value::Null).await, csnf);

    // Replicache then forks a new group from the old one's data and cookie: its pull from that
    // cookie is a delta, and nothing of the space is lost.
    let later = push_body("stays", &[("d", 2, "delete", json!({"key": "m"}))]);
    assert_eq!(server.push("s", &later).await, (200, json!({})));
    let (status, delta) = server.pull("s", "forked", json!(gone_view.cookie)).await;
    assert_eq!(status, 200, "{delta}");
    gone_view.apply(&delta);
    assert_eq!(gone_view.entries["n"], json!(2));
    assert!(!gone_view.entries.contains_key("m"), "{delta}");

    // A client that starts from scratch sees the whole space and pushes from mutation 1.
    let fresh = server.state("s", "fresh").await;
    assert_eq!(fresh.entries, gone_view.entries);
    let first_push = push_body("fresh", &[("c2", 1, "increment", inc("n", 1))]);
    assert_eq!(server.push("s", &first_push).await, (200, json!({})));
    assert_eq!(server.state("s", "fresh").await.entries["n"], json!(3));
    // The group that stayed active was not touched.
    assert_eq!(server.state("s", "stays").await.lmid("d"), 2);

    // A removed group is remembered for one more TTL, then forgotten: its id is then unknown,
    // so its pull is answered like a forked group's and its push (ids past 1) starts it over.
    let forgotten = gc::collect(
        &*server.store,
        &server.metrics,
        unix_now() + TTL.as_secs() as i64 + 60,
        &SETTINGS,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(forgotten.forgotten_groups, 1, "{forgotten:?}");
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("replisync_gc_client_groups_forgotten_total 1\n"));
    let remembered: Option<i64> = server
        .db
        .scalar("SELECT collected_at FROM replisync_collected_client_groups WHERE id = 'gone'")
        .await;
    assert_eq!(remembered, None);
    let (status, _) = server.pull("s", "gone", json!(gone_view.cookie)).await;
    assert_eq!(status, 200);
    let next = push_body("gone", &[("c", 3, "increment", inc("n", 100))]);
    assert_eq!(server.push("s", &next).await, csnf);
}

/// The clock is injected: a group is kept up to the TTL and collected past it.
async fn only_groups_idle_past_the_ttl_are_collected(backend: Backend) {
    let server = TestServer::start(backend).await;
    let body = push_body("g", &[("c", 1, "increment", inc("n", 1))]);
    server.push_ok("s", &body).await;
    let ttl = TTL.as_secs() as i64;
    let store = &*server.store;
    let kept = gc::collect(store, &server.metrics, unix_now() + ttl - 60, &SETTINGS).await;
    assert_eq!(kept.unwrap(), Some(Collected::default()));
    assert_eq!(count(&server, "replisync_clients").await, 1);
    let gone = gc::collect(store, &server.metrics, unix_now() + ttl + 60, &SETTINGS).await;
    assert_eq!(gone.unwrap().map(|c| c.client_groups), Some(1));
    assert_eq!(count(&server, "replisync_client_groups").await, 0);
    assert_eq!(count(&server, "replisync_clients").await, 0);
    assert_eq!(
        server.state("s", "other").await.entries["n"],
        json!(1),
        "entries are never collected with clients"
    );
}

/// Pulls write a group's last activity only when it is older than the granularity; pushes too.
async fn activity_is_written_at_most_once_per_granularity(backend: Backend) {
    let server = TestServer::start(backend).await;
    let body = push_body("g", &[("c", 1, "increment", inc("n", 1))]);
    server.push_ok("s", &body).await;
    let created = last_active(&server, "g").await.unwrap();
    assert!(
        (created - unix_now()).abs() < 60,
        "a new group is active now"
    );

    // Stale: the next pull records it (SQLite, once the writer is free).
    let stale = ACTIVITY_GRANULARITY_SECS + 60;
    set_last_active(&server, "g", stale).await;
    assert_eq!(server.pull("s", "g", json!(1)).await.0, 200);
    wait_for_recorded(&server, "g").await;

    // Within the granularity: neither pulls nor pushes write it.
    let fresh = ACTIVITY_GRANULARITY_SECS - 600;
    set_last_active(&server, "g", fresh).await;
    let stored = last_active(&server, "g").await;
    for cookie in [json!(1), json!(0), json!(1)] {
        assert_eq!(server.pull("s", "g", cookie).await.0, 200);
    }
    let again = push_body("g", &[("c", 2, "increment", inc("n", 1))]);
    assert_eq!(server.push("s", &again).await, (200, json!({})));
    // SQLite records a pull's activity in a task of its own, after the pull: a pull of another,
    // stale group is recorded by a later task on the same single writer, so once it is, a
    // write of g's would have landed too.
    let other = push_body("h", &[("ch", 1, "increment", inc("n", 1))]);
    assert_eq!(server.push("s", &other).await, (200, json!({})));
    set_last_active(&server, "h", stale).await;
    assert_eq!(server.pull("s", "h", json!(1)).await.0, 200);
    wait_for_recorded(&server, "h").await;
    assert_eq!(last_active(&server, "g").await, stored, "no write");

    // A push of a stale group records it at once, in its commit.
    set_last_active(&server, "g", stale).await;
    let third = push_body("g", &[("c", 3, "increment", inc("n", 1))]);
    assert_eq!(server.push("s", &third).await, (200, json!({})));
    assert!(last_active(&server, "g").await.unwrap() > unix_now() - 60);
}

/// Waits (20 s at most) until `group`'s last activity is recorded as now.
async fn wait_for_recorded(server: &TestServer, group: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while last_active(server, group).await.unwrap() <= unix_now() - 60 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a pull of the stale group {group} never recorded its activity"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const WRITERS: usize = 6;
const PUSHES_PER_WRITER: u64 = 20;
const IDLE_GROUPS: i64 = 2500;

/// Inserts `IDLE_GROUPS` groups of one client each, idle for a year.
async fn insert_idle_groups(server: &TestServer) {
    let old = unix_now() - 365 * 86_400;
    server
        .db
        .execute(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {IDLE_GROUPS})
             INSERT INTO replisync_client_groups (id, space_id, user_id, last_active)
             SELECT 'idle-' || i, 's', 'anonymous', {old} FROM n;
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {IDLE_GROUPS})
             INSERT INTO replisync_clients (id, client_group_id, last_mutation_id, last_modified_version)
             SELECT 'idle-client-' || i, 'idle-' || i, 3, 0 FROM n;"
        ))
        .await;
}

/// Collection runs over and over (removing thousands of idle groups in batches) while active
/// clients push and pull: every push succeeds, every pull is consistent, nothing is lost. Each
/// writer waits, after its first sync, until collection has removed groups: so it provably ran
/// while every writer was in the middle of its work.
async fn collecting_while_clients_sync_changes_no_answer(backend: Backend) {
    let server = Arc::new(TestServer::start(backend).await);
    insert_idle_groups(&server).await;
    let done = Arc::new(AtomicBool::new(false));
    let removed = Arc::new(AtomicU64::new(0));
    let collector = {
        let (server, done, removed) = (server.clone(), done.clone(), removed.clone());
        tokio::spawn(async move {
            let mut passes = 0;
            while !done.load(Ordering::Relaxed) || passes == 0 {
                if let Some(collected) = collect_now(&server).await {
                    removed.fetch_add(collected.client_groups, Ordering::Relaxed);
                }
                passes += 1;
                tokio::task::yield_now().await;
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (server, removed) = (server.clone(), removed.clone());
        writers.push(tokio::spawn(async move {
            let (group, client) = (format!("group-{w}"), format!("client-{w}"));
            let mut view = PullView::default();
            for id in 1..=PUSHES_PER_WRITER {
                let body = push_body(&group, &[(client.as_str(), id, "increment", inc("n", 1))]);
                assert_eq!(server.push("s", &body).await, (200, json!({})));
                let cookie = if id == 1 {
                    Value::Null
                } else {
                    json!(view.cookie)
                };
                let (status, pulled) = server.pull("s", &group, cookie).await;
                assert_eq!(status, 200, "{pulled}");
                view.apply(&pulled);
                assert!(view.lmid(&client) >= id, "own mutation {id} pulled");
                if id == 1 {
                    let collected = || removed.load(Ordering::Relaxed);
                    wait_until("a collection mid-sync", collected, |n| *n > 0).await;
                }
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer finished");
    }
    done.store(true, Ordering::Relaxed);
    collector.await.unwrap();
    let removed = removed.load(Ordering::Relaxed);
    assert_eq!(removed, IDLE_GROUPS as u64, "every idle group, once");
    let total = WRITERS as u64 * PUSHES_PER_WRITER;
    assert_eq!(server.state("s", "check").await.entries["n"], json!(total));
    for w in 0..WRITERS {
        let view = server.state("s", &format!("group-{w}")).await;
        assert_eq!(view.lmid(&format!("client-{w}")), PUSHES_PER_WRITER);
    }
    assert_eq!(
        count(&server, "replisync_client_groups").await,
        WRITERS as i64
    );
    assert_eq!(count(&server, "replisync_clients").await, WRITERS as i64);
}

crate::on_both_stores!(
    a_collected_client_starts_over_and_loses_nothing_of_the_space,
    only_groups_idle_past_the_ttl_are_collected,
    activity_is_written_at_most_once_per_granularity,
    collecting_while_clients_sync_changes_no_answer,
);

/// With several instances on one Postgres, one collects at a time: a pass finds the lock taken
/// and does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_collects_on_one_instance_at_a_time() {
    let server = TestServer::start(Backend::Postgres).await;
    server
        .push_ok("s", &push_body("g", &[("c", 1, "increment", inc("n", 1))]))
        .await;
    set_last_active(&server, "g", TTL.as_secs() as i64 + 60).await;
    let mut other_instance = server.db.pg().await;
    let key = replisync::store::postgres::GC_LOCK_KEY;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext(current_schema()))")
            .bind(key)
            .fetch_one(&mut other_instance)
            .await
            .unwrap();
    assert!(locked);
    assert_eq!(collect_now(&server).await, None);
    assert_eq!(count(&server, "replisync_client_groups").await, 1);
    drop(other_instance);
    // The other instance's session ended: its lock went with it.
    let mut collected = None;
    for _ in 0..50 {
        collected = collect_now(&server).await;
        if collected.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(collected.map(|c| c.client_groups), Some(1));
}

/// A push that read its client group before a collection deleted it does not commit (it would
/// leave clients without their group): it is retried, and the retry finds the client gone.
/// Postgres only: SQLite collects on the writer a push holds, so the two never overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_push_whose_group_is_collected_before_its_commit_does_not_commit() {
    let server = TestServer::start(Backend::Postgres).await;
    server
        .push_ok("s", &push_body("g", &[("c", 1, "increment", inc("n", 1))]))
        .await;
    set_last_active(&server, "g", TTL.as_secs() as i64 + 60).await;
    let space = SpaceId::parse("s").unwrap();
    let mut tx = server.store.begin_locked_push(&space).await.unwrap();
    let state = tx
        .client_state(&["g".to_owned()], &["c".to_owned()], &[])
        .await
        .unwrap();
    assert_eq!(state.groups.len(), 1);
    // Collection does not wait for the push: it holds the space's lock, not the group's row.
    assert_eq!(collect_now(&server).await.map(|c| c.client_groups), Some(1));
    let changes = PushChanges {
        version: state.space_version + 1,
        read_version: state.space_version,
        active_at: unix_now(),
        new_client_groups: vec![],
        active_client_groups: vec!["g".into()],
        clients: vec![ClientWrite {
            client: ClientRecord {
                id: "c".into(),
                client_group_id: "g".into(),
                last_mutation_id: 2,
            },
            version: state.space_version + 1,
        }],
        entries: vec![],
    };
    let committed = tx.commit(changes).await;
    assert!(
        matches!(committed, Err(StoreError::Conflict(_))),
        "{committed:?}"
    );
    assert_eq!(
        count(&server, "replisync_clients").await,
        0,
        "no orphan client"
    );
    let next = push_body("g", &[("c", 2, "increment", inc("n", 1))]);
    assert_eq!(
        server.push("s", &next).await,
        (200, json!({"error": "ClientStateNotFound"}))
    );
}
