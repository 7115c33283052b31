//! Read batching (Postgres): the reads of pushes to different spaces that wait while one of their
//! kind is in flight share the next statement, and each push still sees exactly its own data.
//!
//! A batch is formed on purpose: the test locks the table a lane reads, so that the lane's lone
//! read waits for the lock, and the pushes behind it wait in the lane
//! (`replisync_read_batch_waiting`) until the lock goes.

use std::sync::Arc;

use replisync::startup::App;
use replisync::store::BatchLimits;
use serde_json::{Value, json};
use sqlx::Connection;

use crate::commit_batches::wait_for_lock_waiter;
use crate::group_commit::send;
use crate::harness::{Backend, StoreOptions, TestServer, inc, push_body, wait_until};

/// A server whose pushes all read (none is answered from what the store knew of its space), so
/// that their reads meet in the lane.
async fn every_push_reads() -> Arc<TestServer> {
    let options = StoreOptions {
        known_state_bytes: 0,
        ..StoreOptions::default()
    };
    Arc::new(TestServer::start_on(Backend::Postgres, options, App::builder()).await)
}

/// Runs `pushes` (space, body) while `table` is locked: the first push's read of it waits for the
/// lock, the others wait for that read in the lane; then the lock goes. Answers in order.
async fn push_behind_a_locked_table(
    server: &Arc<TestServer>,
    table: &str,
    pushes: Vec<(&str, Value)>,
) -> Vec<(u16, Value)> {
    let mut conn = server.db.pg().await;
    let mut tx = conn.begin().await.unwrap();
    let lock = format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE");
    sqlx::raw_sql(sqlx::AssertSqlSafe(lock))
        .execute(&mut *tx)
        .await
        .unwrap();
    let mut pushes = pushes.into_iter();
    let (space, body) = pushes.next().expect("a first push");
    let first = send(server, space, body);
    wait_for_lock_waiter(server).await;
    let behind: Vec<_> = pushes.map(|(s, body)| send(server, s, body)).collect();
    let waiting = behind.len() as u64;
    wait_until(
        "the pushes behind the locked read to wait in its lane",
        || server.store.commit_batches().reads_waiting,
        |now| *now == waiting,
    )
    .await;
    let before = server.store.commit_batches();
    tx.commit().await.unwrap();
    let mut answers = vec![first.await.unwrap()];
    for push in behind {
        answers.push(push.await.unwrap());
    }
    let after = server.store.commit_batches();
    assert_eq!(
        after.read_batches - before.read_batches,
        1,
        "the reads that waited shared one statement"
    );
    assert_eq!(after.batched_reads - before.batched_reads, waiting);
    answers
}

/// One push of one mutation.
fn one(group: &str, client: &str, id: u64, name: &str, args: Value) -> Value {
    push_body(group, &[(client, id, name, args)])
}

/// Mutation `id` of the client `c-{space}` of `space`'s own group `g-{space}`: `n` += `delta`.
fn increment(space: &str, id: u64, delta: i64) -> Value {
    let (group, client) = (format!("g-{space}"), format!("c-{space}"));
    one(&group, &client, id, "increment", inc("n", delta))
}

/// Each space's first push, `n` = its value.
async fn seed(server: &TestServer, spaces: &[(&str, i64)]) {
    for (space, value) in spaces {
        server.push_ok(space, &increment(space, 1, *value)).await;
    }
}

/// Client state read for four spaces in one statement: a known client's next mutation, a new
/// client group, a replayed mutation, and another space's client group (refused) are each
/// answered as if alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_states_read_together_answer_each_push_as_alone() {
    let server = every_push_reads().await;
    seed(&server, &[("a", 10), ("c", 10), ("x", 10)]).await;
    let answers = push_behind_a_locked_table(
        &server,
        "replisync_clients",
        vec![
            ("lead", increment("lead", 1, 1)),
            ("a", increment("a", 2, 1)),
            ("b", increment("b", 1, 5)),
            ("c", increment("c", 1, 1)),
            ("d", one("g-x", "c-x", 2, "increment", inc("n", 1))),
        ],
    )
    .await;
    let statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 403], "{answers:?}");
    assert_eq!(answers[4].1["error"], json!("Forbidden"));

    let expected = [
        ("a", "g-a", "c-a", 11, 2, 2),
        ("b", "g-b", "c-b", 5, 1, 1),
        ("c", "g-c", "c-c", 10, 1, 1), // a replay: nothing changed
        ("x", "g-x", "c-x", 10, 1, 1), // the refused push wrote nothing
    ];
    for (space, group, client, n, lmid, cookie) in expected {
        let state = server.state(space, group).await;
        assert_eq!(state.entries["n"], json!(n), "{space}");
        assert_eq!(state.lmid(client), lmid, "{space}");
        assert_eq!(state.cookie, cookie, "{space}");
    }
    assert!(server.state("d", "g-d").await.entries.is_empty());
}

/// Mutations' gets for four spaces in one statement: each increment reads its own space's value
/// (one of them missing), and the totals are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gets_read_together_see_each_space_own_value() {
    let server = every_push_reads().await;
    seed(&server, &[("a", 100), ("b", 200), ("c", 300)]).await;
    let answers = push_behind_a_locked_table(
        &server,
        "replisync_entries",
        vec![
            ("lead", increment("lead", 1, 1)),
            ("a", increment("a", 2, 1)),
            ("b", increment("b", 2, 2)),
            ("c", increment("c", 2, 3)),
            ("d", increment("d", 1, 4)),
        ],
    )
    .await;
    assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");
    for (space, n) in [("lead", 1), ("a", 101), ("b", 202), ("c", 303), ("d", 4)] {
        let state = server.state(space, "reader").await;
        assert_eq!(state.entries["n"], json!(n), "{space}");
    }
}

/// The server's database sessions now, by backend pid.
async fn server_sessions(server: &TestServer) -> Vec<i32> {
    sessions_seen_from(&mut server.db.pg().await).await
}

/// The server's database sessions, as `conn` (a session of the test's) sees them now.
async fn sessions_seen_from(conn: &mut sqlx::PgConnection) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE application_name = current_schema() AND pid <> pg_backend_pid() ORDER BY pid",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

/// The connections the batchers keep now.
fn kept_connections(server: &TestServer) -> usize {
    let pools = server.store.pools();
    let batching = pools.iter().find(|p| p.name == "batching");
    batching.expect("the batching pool").idle
}

/// A push whose caller hangs up while its read waits leaves that read's connection drained and
/// kept: afterwards the server talks to the database over the very same sessions, none closed
/// and none opened (a client that aborts requests cannot make the server open connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_cut_short_mid_read_leaves_its_connection_kept() {
    let server = every_push_reads().await;
    server
        .push_ok("a", &one("g-a", "c-a", 1, "increment", inc("n", 1)))
        .await;
    let (sessions, kept) = (server_sessions(&server).await, kept_connections(&server));
    assert!(kept >= 1, "the push's statements left a connection kept");

    let mut conn = server.db.pg().await;
    let mut tx = conn.begin().await.unwrap();
    sqlx::raw_sql("LOCK TABLE replisync_clients IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let open = server.metrics.open_connections.get();
    let left = send(&server, "b", one("g-b", "c-b", 1, "increment", inc("n", 1)));
    wait_for_lock_waiter(&server).await;
    left.abort(); // the caller hangs up while its read waits for the lock
    let _ = left.await;
    let metrics = server.metrics.clone();
    let connections = || metrics.open_connections.get();
    wait_until("the server to see the hang-up", connections, |n| *n < open).await;
    tx.commit().await.unwrap();

    wait_until(
        "the cut-short read's connection to be kept again",
        || kept_connections(&server),
        |now| *now == kept,
    )
    .await;
    assert_eq!(server_sessions(&server).await, sessions);
    let next = one("g-b", "c-b", 1, "increment", inc("n", 5));
    assert_eq!(server.push("b", &next).await, (200, json!({})));
    assert_eq!(server.state("b", "g-b").await.entries["n"], json!(5));
}

/// A shared read that fails for one push's data (here a space whose stored version is corrupt)
/// is read again one by one: only that push fails, the others are answered as if alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_at_fault_fails_alone() {
    let server = every_push_reads().await;
    seed(&server, &[("a", 1), ("bad", 1), ("c", 1)]).await;
    server
        .db
        .execute("UPDATE replisync_spaces SET version = -5 WHERE id = 'bad'")
        .await;
    let answers = push_behind_a_locked_table(
        &server,
        "replisync_clients",
        vec![
            ("lead", increment("lead", 1, 1)),
            ("a", increment("a", 2, 1)),
            ("bad", increment("bad", 2, 1)),
            ("c", increment("c", 2, 1)),
        ],
    )
    .await;
    let statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    assert_eq!(statuses, [200, 200, 500, 200], "{answers:?}");
    for space in ["a", "c"] {
        let state = server.state(space, "reader").await;
        assert_eq!(state.entries["n"], json!(2), "{space}");
    }
}

/// Rounds of `clients` pushes at once, each to a space of its own (`round` is the mutation id).
async fn pushes_at_once(server: &Arc<TestServer>, clients: usize, round: u64) {
    let pushes: Vec<_> = (0..clients)
        .map(|c| {
            let space = format!("s{c}");
            send(server, &space, increment(&space, round, 1))
        })
        .collect();
    for push in pushes {
        assert_eq!(push.await.unwrap(), (200, json!({})));
    }
}

/// With batching off, more statements run at once than the batchers keep connections for: the
/// rest use pooled connections as before, so the server goes on talking over the same sessions
/// (none closed and opened again per statement).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_batching_off_statements_beyond_the_kept_connections_reuse_the_pool() {
    let options = StoreOptions {
        batch: BatchLimits {
            max_pushes: 1,
            ..BatchLimits::default()
        },
        known_state_bytes: 0,
        ..StoreOptions::default()
    };
    let server = Arc::new(TestServer::start_on(Backend::Postgres, options, App::builder()).await);
    const CLIENTS: usize = 24; // more than the pool's 16 connections and the 4 kept
    for round in 1..=2 {
        pushes_at_once(&server, CLIENTS, round).await;
    }
    let sessions = server_sessions(&server).await;
    for round in 3..=4 {
        pushes_at_once(&server, CLIENTS, round).await;
    }
    let now = server_sessions(&server).await;
    let opened: Vec<_> = now.iter().filter(|pid| !sessions.contains(pid)).collect();
    assert!(
        opened.is_empty(),
        "sessions opened again: {opened:?} (before {sessions:?})"
    );
    assert_eq!(server.store.commit_batches().batches, 0, "batching was off");
    for c in 0..CLIENTS {
        let state = server.state(&format!("s{c}"), "reader").await;
        assert_eq!(state.entries["n"], json!(4));
    }
}

/// Closing the store (at shutdown) ends every database session it opened, the kept connections
/// too, each with the protocol's goodbye.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closing_the_store_ends_the_kept_connections_too() {
    let server = every_push_reads().await;
    pushes_at_once(&server, 8, 1).await;
    assert!(
        kept_connections(&server) >= 1,
        "pushes left connections kept"
    );
    let mut watcher = server.db.pg().await;
    server.store.close().await;
    for _ in 0..2_500 {
        if sessions_seen_from(&mut watcher).await.is_empty() {
            assert_eq!(kept_connections(&server), 0);
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    panic!(
        "sessions still open: {:?}",
        sessions_seen_from(&mut watcher).await
    );
}
