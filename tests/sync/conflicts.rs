//! A push that loses a race: each conflict check of Postgres's commit function raised by a real
//! concurrent change, and each retry branch of the push path (conflicts, dead connections, errors).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use replisync::gc::{self, GcSettings};
use replisync::mutators::{MutationError, Mutator, Mutators, ScanRange, WriteTx};
use replisync::push::settings::PushLimits;
use replisync::startup::App;
use replisync::store::{RECONNECT_ATTEMPTS, Store, StoreError, unix_now};
use serde_json::{Value, json};

use crate::faults::{CommitHooks, FailTimes, Fault, Faulty, Op};
use crate::group_commit::{Gate, options_with, wait_for_none_waiting};
use crate::harness::{Backend, StoreOptions, TestServer, inc, push_body};

/// The answer of a push that applied everything.
fn applied() -> (u16, Value) {
    (200, json!({}))
}

fn increment(group: &str, client: &str, id: u64) -> Value {
    push_body(group, &[(client, id, "increment", inc("n", 1))])
}

/// A Postgres server whose commits run the hook a test sets on the hooks returned with it.
async fn server_with_commit_hooks() -> (TestServer, CommitHooks) {
    let hooks = CommitHooks::default();
    let faults = hooks.clone();
    let store = StoreOptions::wrapped(|store| Faulty::wrap(store, faults));
    let server = TestServer::start_on(Backend::Postgres, store, App::builder()).await;
    (server, hooks)
}

/// Pushes `body` to `space` while `sql` runs on a connection of its own between the push's read
/// and its commit (a concurrent writer: another instance, or garbage collection); asserts that
/// the database refused that commit for `cause` (the check of the commit function that fired).
async fn push_racing(
    (server, hooks): (&TestServer, &CommitHooks),
    space: &str,
    sql: String,
    body: &Value,
    cause: &str,
) -> (u16, Value) {
    let mut conn = server.db.pg().await;
    hooks.before_next_commit(async move {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .expect("the concurrent change is made");
    });
    let answer = server.push(space, body).await;
    assert_refused_for(hooks, cause);
    answer
}

/// Asserts that the commit the hook ran before met a conflict for `cause`.
fn assert_refused_for(hooks: &CommitHooks, cause: &str) {
    let committed = hooks.hooked_commit();
    assert!(
        matches!(&committed, Err(StoreError::Conflict(message)) if message.contains(cause)),
        "expected a conflict for {cause:?}: {committed:?}"
    );
}

/// The rows of `sql` (one text column), on the test's Postgres schema.
async fn text_rows(server: &TestServer, sql: &str) -> Vec<String> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_all(&mut server.db.pg().await)
        .await
        .unwrap()
}

/// The database's replisync tables as `TestDb::fingerprint` writes them: spaces, client groups,
/// clients, entries (each a list of rows).
fn rows(spaces: &[&str], groups: &[&str], clients: &[&str], entries: &[&str]) -> String {
    [spaces, groups, clients, entries]
        .map(|table| table.join("\n"))
        .join("\n--\n")
}

/// "The space changed after the push read it": the push runs again under the space's lock, on
/// the version the other writer left, and applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_push_whose_space_moved_after_its_read_applies_under_the_lock() {
    let (server, hooks) = server_with_commit_hooks().await;
    let space = "moved".to_owned();
    assert_eq!(
        server.push(&space, &increment("g", "c", 1)).await,
        applied()
    );
    let bump = format!("UPDATE replisync_spaces SET version = version + 1 WHERE id = '{space}'");
    let answer = push_racing(
        (&server, &hooks),
        &space,
        bump,
        &increment("g", "c", 2),
        "the space changed after the push read it",
    )
    .await;
    assert_eq!(answer, applied());
    assert_eq!(server.metrics.push_conflicts.get(), 1);
    let group = format!("g@{space}/anonymous");
    let expected = rows(
        &[&format!("{space}=3/0")],
        &[&group],
        &["c@g:2/3"],
        &[&format!("{space}/n=2/3")],
    );
    assert_eq!(
        server.db.fingerprint().await,
        expected,
        "read 1, moved to 2, wrote 3"
    );
    wait_for_none_waiting(&server).await;
}

/// A key read ahead with the push's first read (its mutator read the key its arguments name
/// before) that another writer changes before the commit: the commit finds the space moved, and
/// the push runs again under the lock on the value the other writer left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_value_read_ahead_that_changes_before_the_commit_is_read_again() {
    let (server, hooks) = server_with_commit_hooks().await;
    let space = "ahead".to_owned();
    assert_eq!(
        server.push(&space, &increment("g", "c", 1)).await,
        applied()
    );
    let read_ahead = keys_read_ahead(&server).await;
    let change = format!(
        "UPDATE replisync_entries SET value = '10', version = 2 WHERE space_id = '{space}' AND key = 'n';
         UPDATE replisync_spaces SET version = 2 WHERE id = '{space}'"
    );
    let answer = push_racing(
        (&server, &hooks),
        &space,
        change,
        &increment("g", "c", 2),
        "the space changed after the push read it",
    )
    .await;
    assert_eq!(answer, applied());
    assert_eq!(
        keys_read_ahead(&server).await,
        read_ahead + 1,
        "the optimistic run read n ahead (the locked run reads it itself)"
    );
    let state = server.state(&space, "g").await;
    assert_eq!((state.cookie, state.lmid("c")), (3, 2));
    assert_eq!(
        state.entries["n"],
        json!(11),
        "10 left by the other writer, plus 1"
    );
    wait_for_none_waiting(&server).await;
}

/// Keys push groups' first reads fetched ahead, as `/metrics` shows them.
async fn keys_read_ahead(server: &TestServer) -> u64 {
    crate::js_mutators::metric(server, "replisync_mutation_keys_read_ahead_total").await
}

/// Fails every entry read once `on` is set: what a mutation reads then must come another way.
struct EntryReadsFail {
    on: Arc<std::sync::atomic::AtomicBool>,
}

impl Fault for EntryReadsFail {
    fn fail(&self, op: Op) -> Option<StoreError> {
        let on = self.on.load(std::sync::atomic::Ordering::SeqCst);
        (on && op == Op::Entry).then(|| StoreError::Corrupt("an entry read was made".into()))
    }
}

/// Once `increment` read the key its `key` argument names, a push's first read fetches the
/// keys its increments name, present or not, and its mutations make no read of their own: with
/// every entry read failing, increments still apply, on the right values.
async fn keys_learned_from_earlier_mutations_are_read_with_the_first_read(backend: Backend) {
    let on = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fault = EntryReadsFail { on: on.clone() };
    let store = StoreOptions::wrapped(move |store| Faulty::wrap(store, fault));
    let server = TestServer::start_on(backend, store, App::builder()).await;
    assert_eq!(server.push("s", &increment("g", "c", 1)).await, applied());
    on.store(true, std::sync::atomic::Ordering::SeqCst);
    let two_keys = push_body(
        "g",
        &[
            ("c", 2, "increment", inc("n", 1)),
            ("c", 3, "increment", inc("m", 5)),
        ],
    );
    assert_eq!(server.push("s", &two_keys).await, applied());
    assert_eq!(server.push("t", &increment("h", "d", 1)).await, applied());
    let (s, t) = (server.state("s", "g").await, server.state("t", "h").await);
    assert_eq!(
        (s.entries["n"].clone(), s.entries["m"].clone()),
        (json!(2), json!(5))
    );
    assert_eq!(t.entries["n"], json!(1));
    assert_eq!(keys_read_ahead(&server).await, 3);
    wait_for_none_waiting(&server).await;
}

/// "A client group was created concurrently" (the same group's resend, on another instance):
/// the retry finds the group and applies the push to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_push_whose_new_group_was_created_concurrently_applies_to_it() {
    let (server, hooks) = server_with_commit_hooks().await;
    let space = "created".to_owned();
    let create = format!(
        "INSERT INTO replisync_client_groups (id, space_id, user_id, last_active)
         VALUES ('g', '{space}', 'anonymous', {})",
        unix_now()
    );
    let answer = push_racing(
        (&server, &hooks),
        &space,
        create,
        &increment("g", "c", 1),
        "a client group was created concurrently",
    )
    .await;
    assert_eq!(answer, applied());
    assert_eq!(server.metrics.push_conflicts.get(), 1);
    let group = format!("g@{space}/anonymous");
    let expected = rows(
        &[&format!("{space}=1/0")],
        &[&group],
        &["c@g:1/1"],
        &[&format!("{space}/n=1/1")],
    );
    assert_eq!(server.db.fingerprint().await, expected);
    wait_for_none_waiting(&server).await;
}

/// "A client group was created concurrently" by another user: the retry finds the group is not
/// the pusher's and refuses the push 403, writing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_push_whose_new_group_another_user_created_concurrently_is_forbidden() {
    let (server, hooks) = server_with_commit_hooks().await;
    let space = "taken".to_owned();
    let create = format!(
        "INSERT INTO replisync_client_groups (id, space_id, user_id, last_active)
         VALUES ('g', '{space}', 'someone-else', {})",
        unix_now()
    );
    let (status, body) = push_racing(
        (&server, &hooks),
        &space,
        create,
        &increment("g", "c", 1),
        "a client group was created concurrently",
    )
    .await;
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("Forbidden")),
        "{body}"
    );
    assert_eq!(server.metrics.push_conflicts.get(), 1);
    let group = format!("g@{space}/someone-else");
    assert_eq!(
        server.db.fingerprint().await,
        rows(&[], &[&group], &[], &[])
    );
    wait_for_none_waiting(&server).await;
}

/// "A new client group is one garbage collection removed": the retry reads it as collected and
/// answers ClientStateNotFound, writing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_new_group_collected_before_its_commit_is_client_state_not_found() {
    let (server, hooks) = server_with_commit_hooks().await;
    let space = "collected-new".to_owned();
    let forget = format!(
        "INSERT INTO replisync_collected_client_groups (id, collected_at) VALUES ('g', {})",
        unix_now()
    );
    let answer = push_racing(
        (&server, &hooks),
        &space,
        forget,
        &increment("g", "c", 1),
        "a new client group is one garbage collection removed",
    )
    .await;
    assert_eq!(answer, (200, json!({"error": "ClientStateNotFound"})));
    assert_eq!(server.metrics.push_conflicts.get(), 1);
    assert_eq!(server.db.fingerprint().await, rows(&[], &[], &[], &[]));
    wait_for_none_waiting(&server).await;
}

/// "A client id was claimed by another client group": the retry finds the client in the other
/// group and refuses the push 403, writing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_client_claimed_by_another_group_before_the_commit_is_forbidden() {
    let (server, hooks) = server_with_commit_hooks().await;
    let space = "claimed".to_owned();
    let claim = format!(
        "INSERT INTO replisync_client_groups (id, space_id, user_id, last_active)
         VALUES ('other', '{space}', 'anonymous', {});
         INSERT INTO replisync_clients (id, client_group_id, last_mutation_id, last_modified_version)
         VALUES ('c', 'other', 1, 0)",
        unix_now()
    );
    let (status, body) = push_racing(
        (&server, &hooks),
        &space,
        claim,
        &increment("g", "c", 1),
        "a client id was claimed by another client group",
    )
    .await;
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("Forbidden")),
        "{body}"
    );
    assert_eq!(server.metrics.push_conflicts.get(), 1);
    let other = format!("other@{space}/anonymous");
    let expected = rows(&[], &[&other], &["c@other:1/0"], &[]);
    assert_eq!(server.db.fingerprint().await, expected);
    wait_for_none_waiting(&server).await;
}

const GC_SETTINGS: GcSettings = GcSettings {
    client_ttl: Duration::from_secs(86_400),
    tombstone_ttl: Duration::from_secs(86_400),
    interval: None,
    pause_factor: 0,
};

/// "A client group was collected concurrently": a stale group (last active before the
/// granularity) that garbage collection removes between the push's read and its commit. The
/// commit writes nothing (no client without its group); the retry answers ClientStateNotFound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_stale_group_collected_before_the_commit_is_client_state_not_found() {
    let (server, hooks) = server_with_commit_hooks().await;
    let space = "collected-stale".to_owned();
    assert_eq!(
        server.push(&space, &increment("g", "c", 1)).await,
        applied()
    );
    let two_days_ago = unix_now() - 2 * 86_400;
    server
        .db
        .execute(&format!(
            "UPDATE replisync_client_groups SET last_active = {two_days_ago}"
        ))
        .await;
    let (store, metrics) = (server.store.clone(), server.metrics.clone());
    hooks.before_next_commit(async move {
        // The real collector, on its own connection.
        let collected = gc::collect(&*store, &metrics, unix_now(), &GC_SETTINGS).await;
        let groups = collected.map(|c| c.map(|c| c.client_groups));
        assert!(matches!(groups, Ok(Some(1))), "{groups:?}");
    });
    let answer = server.push(&space, &increment("g", "c", 2)).await;
    assert_refused_for(&hooks, "a client group was collected concurrently");
    assert_eq!(answer, (200, json!({"error": "ClientStateNotFound"})));
    assert_eq!(server.metrics.push_conflicts.get(), 1);
    let expected = rows(
        &[&format!("{space}=1/0")],
        &[],
        &[],
        &[&format!("{space}/n=1/1")],
    );
    assert_eq!(
        server.db.fingerprint().await,
        expected,
        "no client without its group"
    );
    let collected = text_rows(&server, "SELECT id FROM replisync_collected_client_groups").await;
    assert_eq!(collected, ["g"]);
    wait_for_none_waiting(&server).await;
}

/// How a test wraps its store in a fault.
type Wrap = fn(Arc<dyn Store>) -> Arc<dyn Store>;

/// A server whose store `wrap` gives a fault (a double: see `FailTimes`), with a `count`
/// mutator that scans.
async fn server_with(backend: Backend, wrap: Wrap) -> TestServer {
    let store = StoreOptions::wrapped(wrap);
    let mutators = Mutators::builtin().register("count", CountKeys);
    TestServer::start_on(backend, store, App::builder().mutators(mutators)).await
}

fn conflict() -> StoreError {
    StoreError::Conflict("a concurrent writer, as a test asked".into())
}

fn dead() -> StoreError {
    StoreError::Disconnected("a dead pooled connection, as a test asked".into())
}

/// Puts under `count` how many keys a scan of the space finds.
struct CountKeys;

#[async_trait]
impl Mutator for CountKeys {
    async fn apply(&self, tx: &mut WriteTx<'_>, _args: &Value) -> Result<(), MutationError> {
        let range = ScanRange {
            prefix: String::new(),
            start: String::new(),
            exclusive: false,
        };
        let found = tx.scan(&range, 100).await?.len();
        tx.put("count", json!(found))
    }
}

/// The answer of a push the store failed with `Unavailable` or `Disconnected`.
fn unavailable() -> (u16, Value) {
    let message = "the database is unavailable; retry later";
    (503, json!({"error": "Unavailable", "message": message}))
}

/// One conflict: the push runs again (counted once) and applies.
async fn one_conflict_is_run_again_and_applied(backend: Backend) {
    let server = server_with(backend, |store| {
        Faulty::wrap(store, FailTimes::new(Op::Commit, 1, conflict()))
    })
    .await;
    assert_eq!(server.push("s", &increment("g", "c", 1)).await, applied());
    assert_eq!(server.metrics.push_conflicts.get(), 1);
    let state = server.state("s", "g").await;
    assert_eq!((state.cookie, state.lmid("c")), (1, 1));
    assert_eq!(state.entries["n"], json!(1));
    wait_for_none_waiting(&server).await;
}

/// The run after a conflict takes the space's lock (begin_locked_push): failing that one
/// operation fails the push.
async fn the_run_after_a_conflict_takes_the_spaces_lock(backend: Backend) {
    let server = server_with(backend, |store| {
        let conflicts = FailTimes::new(Op::Commit, 1, conflict());
        let no_lock = FailTimes::new(Op::BeginLockedPush, 1, StoreError::Unavailable("x".into()));
        Faulty::wrap(store, (conflicts, no_lock))
    })
    .await;
    assert_eq!(
        server.push("s", &increment("g", "c", 1)).await,
        unavailable()
    );
    assert_eq!(server.metrics.push_conflicts.get(), 1);
    assert_eq!(server.state("s", "g").await.lmid("c"), 0);
    wait_for_none_waiting(&server).await;
}

/// Conflicts every time: the push gives up after 8 attempts (7 conflicts counted, each later
/// attempt after a backoff), answers 503 with `Retry-After` (Replicache pushes again) and
/// writes nothing.
async fn a_push_that_always_conflicts_gives_up_after_eight_attempts(backend: Backend) {
    let server = server_with(backend, |store| {
        Faulty::wrap(store, FailTimes::always(Op::Commit, conflict()))
    })
    .await;
    let before = server.db.fingerprint().await;
    let started = Instant::now();
    let answer = server
        .http
        .post(server.url("/spaces/s/push"))
        .header("content-type", "application/json")
        .body(increment("g", "c", 1).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 503);
    assert_eq!(answer.headers()["retry-after"], "1");
    let message = "the database is too busy with concurrent writers: every attempt lost; the request changed nothing, retry later";
    assert_eq!(
        answer.json::<Value>().await.unwrap(),
        json!({"error": "Busy", "message": message})
    );
    assert_eq!(server.metrics.push_conflicts.get(), 7);
    // Attempts 3 to 8 each wait at least 2 << min(attempt - 1, 6) ms first.
    let least_backoff: u64 = (2..8).map(|attempt: u32| 2u64 << attempt.min(6)).sum();
    assert!(
        started.elapsed() >= Duration::from_millis(least_backoff),
        "{:?} < {least_backoff} ms of backoff",
        started.elapsed()
    );
    assert_eq!(server.db.fingerprint().await, before);
    wait_for_none_waiting(&server).await;
}

/// A dead connection at each step of a push (begin, read, entry, scan, commit), twice each:
/// the push runs again at once each time and applies, with no conflict counted.
async fn dead_connections_at_every_step_are_run_again(backend: Backend) {
    let server = server_with(backend, |store| {
        let begin = FailTimes::new(Op::BeginPush, 2, dead());
        let read = FailTimes::new(Op::ClientState, 2, dead());
        let entry = FailTimes::new(Op::Entry, 2, dead());
        let scan = FailTimes::new(Op::ScanEntries, 2, dead());
        let commit = FailTimes::new(Op::Commit, 2, dead());
        Faulty::wrap(store, ((begin, read), (entry, (scan, commit))))
    })
    .await;
    let body = push_body(
        "g",
        &[
            ("c", 1, "increment", inc("n", 1)),
            ("c", 2, "count", json!({})),
        ],
    );
    assert_eq!(server.push("s", &body).await, applied());
    assert_eq!(server.metrics.push_conflicts.get(), 0);
    let state = server.state("s", "g").await;
    assert_eq!((state.cookie, state.lmid("c")), (1, 2));
    assert_eq!(state.entries["n"], json!(1));
    assert_eq!(state.entries["count"], json!(1), "the scan saw n");
    wait_for_none_waiting(&server).await;
}

/// As many dead connections as the retries cover: the push still applies.
async fn as_many_dead_connections_as_retries_still_apply(backend: Backend) {
    let server = server_with(backend, |store| {
        Faulty::wrap(
            store,
            FailTimes::new(Op::BeginPush, RECONNECT_ATTEMPTS, dead()),
        )
    })
    .await;
    assert_eq!(server.push("s", &increment("g", "c", 1)).await, applied());
    assert_eq!(server.state("s", "g").await.lmid("c"), 1);
    wait_for_none_waiting(&server).await;
}

/// One dead connection more than the retries cover: 503, nothing written; the next push applies.
async fn more_dead_connections_than_retries_answer_503(backend: Backend) {
    let server = server_with(backend, |store| {
        Faulty::wrap(
            store,
            FailTimes::new(Op::BeginPush, RECONNECT_ATTEMPTS + 1, dead()),
        )
    })
    .await;
    assert_eq!(
        server.push("s", &increment("g", "c", 1)).await,
        unavailable()
    );
    assert_eq!(server.state("s", "g").await.lmid("c"), 0);
    assert_eq!(server.push("s", &increment("g", "c", 1)).await, applied());
    assert_eq!(server.state("s", "g").await.lmid("c"), 1);
    wait_for_none_waiting(&server).await;
}

/// A group of three behind a gate; the store fails the group's commit (the second commit, after
/// the gate's own) once with `error`. Answers each push's answer.
async fn group_of_three_failing_once(
    backend: Backend,
    wrap: Wrap,
) -> (Arc<TestServer>, Vec<(u16, Value)>) {
    let gate = Gate::default();
    let store = StoreOptions::wrapped(wrap);
    let app = options_with(&gate, PushLimits::default());
    let server = Arc::new(TestServer::start_on(backend, store, app).await);
    let held = gate.hold(&server, "s").await;
    let bodies = (1..=3)
        .map(|n| increment(&format!("g{n}"), &format!("c{n}"), 1))
        .collect();
    let sent = gate.queue(&server, "s", bodies).await;
    gate.open_when_waiting(&server, 3).await;
    assert_eq!(held.await.unwrap(), applied());
    let mut answers = Vec::new();
    for push in sent {
        answers.push(push.await.unwrap());
    }
    wait_for_none_waiting(&server).await;
    (server, answers)
}

/// A group failed by an error that is not one push's (the database unavailable) answers every
/// push with it at once: none is run again alone.
async fn a_group_failed_by_the_database_being_unavailable_fails_every_push(backend: Backend) {
    let (server, answers) = group_of_three_failing_once(backend, |store| {
        let down = StoreError::Unavailable("the database is down, as a test asked".into());
        Faulty::wrap(store, FailTimes::new(Op::Commit, 1, down).after(1))
    })
    .await;
    assert_eq!(answers, vec![unavailable(); 3]);
    for n in 1..=3 {
        let state = server.state("s", &format!("g{n}")).await;
        assert_eq!(
            (state.cookie, state.lmid(&format!("c{n}"))),
            (1, 0),
            "only the gate's push"
        );
    }
}

/// A group failed by corrupt data (an error one push may cause) is run again one push at a
/// time: each push commits alone.
async fn a_group_failed_by_corrupt_data_runs_again_one_push_at_a_time(backend: Backend) {
    let (server, answers) = group_of_three_failing_once(backend, |store| {
        let corrupt = StoreError::Corrupt("a row does not decode, as a test asked".into());
        Faulty::wrap(store, FailTimes::new(Op::Commit, 1, corrupt).after(1))
    })
    .await;
    assert_eq!(answers, vec![applied(); 3]);
    let state = server.state("s", "g1").await;
    assert_eq!(state.cookie, 4, "the gate's push, then each push alone");
    assert_eq!(state.entries["n"], json!(3));
    assert_eq!(server.metrics.push_commits.get(), 4);
}

crate::on_both_stores!(
    one_conflict_is_run_again_and_applied,
    the_run_after_a_conflict_takes_the_spaces_lock,
    a_push_that_always_conflicts_gives_up_after_eight_attempts,
    dead_connections_at_every_step_are_run_again,
    as_many_dead_connections_as_retries_still_apply,
    more_dead_connections_than_retries_answer_503,
    a_group_failed_by_the_database_being_unavailable_fails_every_push,
    a_group_failed_by_corrupt_data_runs_again_one_push_at_a_time,
    keys_learned_from_earlier_mutations_are_read_with_the_first_read,
);
