//! Postgres sessions under hostile conditions: a space's lock held by a session that never lets
//! go, a pull recording activity on the row a push checks, a database whose default isolation
//! is REPEATABLE READ, and push lookups planned while the tables were small.

use std::time::{Duration, Instant};

use futures::future::join_all;
use replisync::startup::App;
use replisync::store::pg_session::SessionLimits;
use serde_json::Value;
use sqlx::PgConnection;

use crate::harness::{Backend, StoreOptions, TestServer, inc, push_body};

/// A push of `increment n by 1`, mutation `id` of client `client` in group `group`.
fn one_increment(group: &str, client: &str, id: u64) -> Value {
    push_body(group, &[(client, id, "increment", inc("n", 1))])
}

/// Opens a transaction on `conn` and runs `sql` in it, leaving it open.
async fn hold(conn: &mut PgConnection, sql: &str) {
    let sql = sqlx::AssertSqlSafe(format!("BEGIN; {sql}"));
    sqlx::raw_sql(sql).execute(&mut *conn).await.unwrap();
}

async fn commit(conn: &mut PgConnection) {
    sqlx::raw_sql("COMMIT").execute(&mut *conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_behind_a_space_lock_that_is_never_released_gets_503_in_bounded_time() {
    let lock_timeout = Duration::from_millis(300);
    let store = StoreOptions {
        pg_limits: SessionLimits {
            lock_timeout,
            ..SessionLimits::default()
        },
        ..StoreOptions::default()
    };
    let server = TestServer::start_on(Backend::Postgres, store, App::builder()).await;
    let (status, _) = server
        .push("held", &one_increment("g-held", "c-held", 1))
        .await;
    assert_eq!(status, 200);

    // A session that took the space's lock and went silent (a frozen instance).
    let mut holder = server.db.pg().await;
    hold(
        &mut holder,
        "SELECT 1 FROM replisync_spaces WHERE id = 'held' FOR UPDATE",
    )
    .await;
    let (status, _) = server
        .push("free", &one_increment("g-free", "c-free", 1))
        .await;
    assert_eq!(status, 200, "another space is not held up");
    let before = server.db.fingerprint().await;
    for (group, client, id) in [("g-held", "c-held", 2), ("g-new", "c-new", 1)] {
        let started = Instant::now();
        let (status, body) = server.push("held", &one_increment(group, client, id)).await;
        let waited = started.elapsed();
        assert_eq!(status, 503, "a push behind the lock is retryable: {body}");
        assert_eq!(body["error"], "Unavailable");
        assert!(
            waited < lock_timeout * 10,
            "answered after the lock timeout, not the request's: {waited:?}"
        );
    }
    assert_eq!(server.db.fingerprint().await, before, "nothing was written");
    let (status, _) = server
        .push("free", &one_increment("g-free", "c-free", 2))
        .await;
    assert_eq!(status, 200, "pushes to other spaces keep working");

    commit(&mut holder).await;
    let (status, _) = server
        .push("held", &one_increment("g-held", "c-held", 2))
        .await;
    assert_eq!(
        status, 200,
        "the push sent again lands once the lock is free"
    );
    let view = server.state("held", "g-held").await;
    assert_eq!(view.entries["n"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pull_recording_activity_does_not_make_a_push_wait_or_run_again() {
    let server = TestServer::start(Backend::Postgres).await;
    let (status, _) = server
        .push("act", &one_increment("g-act", "c-act", 1))
        .await;
    assert_eq!(status, 200);
    // Activity recorded long ago: the next push and pull both want to record it again.
    server
        .db
        .execute("UPDATE replisync_client_groups SET last_active = 0 WHERE id = 'g-act'")
        .await;

    // A pull's activity write, caught in the middle of its statement (its row lock held).
    let mut pull = server.db.pg().await;
    let now = replisync::store::unix_now();
    hold(
        &mut pull,
        &format!("UPDATE replisync_client_groups SET last_active = {now} WHERE id = 'g-act'"),
    )
    .await;
    let conflicts = server.metrics.push_conflicts.get();
    let second = one_increment("g-act", "c-act", 2);
    let push = server.push("act", &second);
    let answered = tokio::time::timeout(Duration::from_secs(3), push).await;
    commit(&mut pull).await;

    let (status, body) = answered.expect("the push does not wait for the pull's row lock");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        server.metrics.push_conflicts.get(),
        conflicts,
        "the push ran once"
    );
    let view = server.state("act", "g-act").await;
    assert_eq!(view.entries["n"], 2);
}

/// The database's (here the session's) default isolation is REPEATABLE READ.
fn repeatable_read() -> StoreOptions {
    StoreOptions {
        pg_options: |options| {
            options.options([("default_transaction_isolation", "repeatable read")])
        },
        ..StoreOptions::default()
    }
}

/// Starts `sql` on a connection of its own in an open transaction; the task ends (handing the
/// connection back, transaction open) once the statement got its locks.
fn hold_when_granted(
    conn: PgConnection,
    sql: &'static str,
) -> tokio::task::JoinHandle<PgConnection> {
    tokio::spawn(async move {
        let mut conn = conn;
        hold(&mut conn, sql).await;
        conn
    })
}

/// Moves the space's version as another instance's push would, holding its lock.
const OTHER_WRITER: &str = "UPDATE replisync_spaces SET version = version + 1 WHERE id = 'rr'";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_push_that_waited_lands_when_the_database_defaults_to_repeatable_read() {
    let server = TestServer::start_on(Backend::Postgres, repeatable_read(), App::builder()).await;
    let (status, _) = server.push("rr", &one_increment("g-rr", "c-rr", 1)).await;
    assert_eq!(status, 200);

    // Writer A holds the space: the push's optimistic commit waits for it, and writer B queues
    // behind the push.
    let mut writer_a = server.db.pg().await;
    let mut monitor = server.db.pg().await;
    let a = backend_pid(&mut writer_a).await;
    hold(&mut writer_a, OTHER_WRITER).await;
    let conflicts = server.metrics.push_conflicts.get();
    let body = one_increment("g-rr", "c-rr", 2);
    let push = {
        let (http, url) = (server.http.clone(), server.url("/spaces/rr/push"));
        tokio::spawn(async move {
            let sent = http.post(url).header("content-type", "application/json");
            sent.body(body.to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    wait_for_blocked_by(&mut monitor, a, 1).await; // the push
    let mut writer_b = server.db.pg().await;
    let b = backend_pid(&mut writer_b).await;
    let writer_b = hold_when_granted(writer_b, OTHER_WRITER);
    wait_for_blocked_by(&mut monitor, a, 2).await; // the push and B

    // A commits: the optimistic attempt fails (the space moved), B takes the lock, and the
    // push runs again under the lock, waiting for B.
    commit(&mut writer_a).await;
    let mut writer_b = writer_b.await.unwrap();
    wait_for_blocked_by(&mut monitor, b, 1).await;
    commit(&mut writer_b).await;

    assert_eq!(push.await.unwrap(), 200);
    assert_eq!(
        server.metrics.push_conflicts.get() - conflicts,
        1,
        "only the optimistic attempt conflicted; the locked one, which waited, landed"
    );
    let view = server.state("rr", "reader").await;
    assert_eq!(view.entries["n"], 2);
    assert_eq!(view.cookie, 4, "two pushes and the two other writers");
}

/// The backend process id of `conn`'s session.
async fn backend_pid(conn: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Waits (at most 20 s) until exactly `sessions` sessions wait for a lock `blocker` holds.
async fn wait_for_blocked_by(monitor: &mut PgConnection, blocker: i32, sessions: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let blocked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        )
        .bind(blocker)
        .fetch_one(&mut *monitor)
        .await
        .unwrap();
        if blocked == sessions {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{blocked} sessions wait for session {blocker}, not {sessions}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sequential scans of the client group and client tables so far, as the statistics
/// collector has them (every session's counts, once reported).
async fn lookup_scans(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(seq_scan), 0)::bigint FROM pg_stat_user_tables
         WHERE schemaname = current_schema()
           AND relname IN ('replisync_client_groups', 'replisync_clients')",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

/// Waits (at most 15 s) until the statistics count `rows` inserted clients, then a little
/// more: every session that pushed has reported its counts by then.
async fn wait_for_statistics(conn: &mut PgConnection, rows: i64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let inserted: i64 = sqlx::query_scalar(
            "SELECT n_tup_ins FROM pg_stat_user_tables
             WHERE schemaname = current_schema() AND relname = 'replisync_clients'",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        if inserted >= rows || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

/// Client groups and clients (one each) inserted straight into the tables, `from` to `to`.
async fn seed_groups(server: &TestServer, from: u32, to: u32) {
    server
        .db
        .execute(&format!(
            "INSERT INTO replisync_client_groups (id, space_id, user_id, last_active)
             SELECT 'seed-g' || i, 'seed-space', 'seed', 0 FROM generate_series({from}, {to}) i;
             INSERT INTO replisync_clients (id, client_group_id, last_mutation_id, last_modified_version)
             SELECT 'seed-c' || i, 'seed-g' || i, 1, 1 FROM generate_series({from}, {to}) i"
        ))
        .await;
}

/// First pushes of `rounds` new groups to new spaces, each sent 16 times at once, then a
/// second push of each.
async fn duplicated_first_pushes(server: &TestServer, tag: &str, rounds: u32) {
    for round in 0..rounds {
        let (space, group, client) = (
            format!("dup-{tag}-{round}"),
            format!("g-dup-{tag}-{round}"),
            format!("c-dup-{tag}-{round}"),
        );
        let body = one_increment(&group, &client, 1);
        let copies = (0..16).map(|_| server.push(&space, &body));
        assert!(join_all(copies).await.iter().all(|(s, _)| *s == 200));
        let (status, _) = server
            .push(&space, &one_increment(&group, &client, 2))
            .await;
        assert_eq!(status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_lookups_use_indexes_whenever_their_plans_were_made() {
    let server = TestServer::start(Backend::Postgres).await;
    // A thousand groups: the size at which a plan made once per session picked sequential
    // scans, and kept them as the tables grew.
    seed_groups(&server, 1, 1000).await;
    let mut stats = server.db.pg().await;
    let scans_before = lookup_scans(&mut stats).await;
    duplicated_first_pushes(&server, "small", 12).await;
    seed_groups(&server, 1001, 20_000).await;
    duplicated_first_pushes(&server, "large", 12).await;
    wait_for_statistics(&mut stats, 20_000 + 24).await;
    let scans = lookup_scans(&mut stats).await - scans_before;
    assert_eq!(
        scans, 0,
        "pushes scanned replisync_client_groups or replisync_clients instead of using their indexes"
    );
}
