//! Read batching (Postgres): the reads of pushes to different spaces that wait while one of their
//! kind is in flight share the next statement, and each push still sees exactly its own data.
//!
//! A batch is formed on purpose: the test locks the table a lane reads, so that the lane's lone
//! read waits for the lock, and the pushes behind it wait in the lane
//! (`replisync_read_batch_waiting`) until the lock goes.

use std::sync::Arc;

use serde_json::{Value, json};
use sqlx::Connection;

use crate::commit_batches::wait_for_lock_waiter;
use crate::group_commit::send;
use crate::harness::{Backend, TestServer, inc, push_body, wait_until};

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

/// Client state read for four spaces in one statement: a known client's next mutation, a new
/// client group, a replayed mutation, and another space's client group (refused) are each
/// answered as if alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_states_read_together_answer_each_push_as_alone() {
    let server = Arc::new(TestServer::start(Backend::Postgres).await);
    for space in ["a", "c", "x"] {
        let body = one(
            &format!("g-{space}"),
            &format!("c-{space}"),
            1,
            "increment",
            inc("n", 10),
        );
        server.push_ok(space, &body).await;
    }
    let answers = push_behind_a_locked_table(
        &server,
        "replisync_clients",
        vec![
            ("lead", one("g-lead", "c-lead", 1, "increment", inc("n", 1))),
            ("a", one("g-a", "c-a", 2, "increment", inc("n", 1))),
            ("b", one("g-b", "c-b", 1, "increment", inc("n", 5))),
            ("c", one("g-c", "c-c", 1, "increment", inc("n", 1))),
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
    let server = Arc::new(TestServer::start(Backend::Postgres).await);
    for (space, start) in [("a", 100), ("b", 200), ("c", 300)] {
        let body = one(
            &format!("g-{space}"),
            &format!("c-{space}"),
            1,
            "increment",
            inc("n", start),
        );
        server.push_ok(space, &body).await;
    }
    let answers = push_behind_a_locked_table(
        &server,
        "replisync_entries",
        vec![
            ("lead", one("g-lead", "c-lead", 1, "increment", inc("n", 1))),
            ("a", one("g-a", "c-a", 2, "increment", inc("n", 1))),
            ("b", one("g-b", "c-b", 2, "increment", inc("n", 2))),
            ("c", one("g-c", "c-c", 2, "increment", inc("n", 3))),
            ("d", one("g-d", "c-d", 1, "increment", inc("n", 4))),
        ],
    )
    .await;
    assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");
    for (space, n) in [("lead", 1), ("a", 101), ("b", 202), ("c", 303), ("d", 4)] {
        let state = server.state(space, "reader").await;
        assert_eq!(state.entries["n"], json!(n), "{space}");
    }
}
