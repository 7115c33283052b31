//! Commit batching: pushes to different spaces that are ready at the same time share one commit,
//! and each still gets the answer, version and exactly-once effect it would get alone.
//!
//! A batch is formed on purpose by holding the commit ahead of it: on Postgres, a row lock the
//! test takes on one space holds that space's commit in flight; on SQLite, a `gate` mutator holds
//! the writer's open transaction. A real trigger stands for a value the database refuses.

use std::sync::Arc;
use std::time::Duration;

use replisync::metrics::Metrics;
use replisync::mutators::Mutators;
use replisync::startup::{App, serve};
use replisync::store::pg_session::SessionLimits;
use replisync::store::{BatchLimits, Store};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use crate::group_commit::{Gate, groups_of, send};
use crate::harness::{Backend, StoreOptions, TestServer, inc, push_body, wait_until};

/// Batches that wait for the commit ahead of them however slow the machine (the age limit never
/// sends them first).
fn patient_batches() -> StoreOptions {
    StoreOptions {
        batch: BatchLimits {
            max_pushes: 64,
            max_age: Duration::from_secs(60),
        },
        ..StoreOptions::default()
    }
}

/// A server with patient batches, the built-in mutators and two gates: `gate` (holds SQLite's
/// open transaction) and `pass` (lets pushes on together).
async fn gated_server(backend: Backend) -> (Arc<TestServer>, Gate, Gate) {
    let (gate, pass) = (Gate::default(), Gate::default());
    let mutators = Mutators::builtin()
        .register("gate", gate.clone())
        .register("pass", pass.clone());
    let app = App::builder().mutators(mutators).push(groups_of(64));
    let server = Arc::new(TestServer::start_on(backend, patient_batches(), app).await);
    (server, gate, pass)
}

/// Commit batches so far: (batches, groups they carried).
async fn batch_counts(server: &TestServer) -> (u64, u64) {
    let counts = server.store.commit_batches();
    (counts.batches, counts.batched_groups)
}

/// Makes the database refuse any entry whose key is `poison`, with a real trigger.
async fn refuse_poison(server: &TestServer, backend: Backend) {
    let sql = match backend {
        Backend::Postgres => {
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'the value of poison is refused'; END $$;
             CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON replisync_entries
             FOR EACH ROW WHEN (NEW.key = 'poison') EXECUTE FUNCTION refuse_poison();"
        }
        Backend::Sqlite => {
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON replisync_entries
             WHEN NEW.key = 'poison'
             BEGIN SELECT RAISE(ABORT, 'the value of poison is refused'); END;"
        }
    };
    server.db.execute(sql).await;
}

/// One push of one mutation by `group`'s client `client`.
pub(crate) fn one(group: &str, client: &str, id: u64, name: &str, args: Value) -> Value {
    push_body(group, &[(client, id, name, args)])
}

async fn one_failing_push_in_a_batch_fails_alone(backend: Backend) {
    let (server, gate, pass) = gated_server(backend).await;
    refuse_poison(&server, backend).await;
    // A client group of the space `held`: using it in another space is refused 403.
    server
        .push_ok(
            "held",
            &one("g-held", "c-held", 1, "increment", inc("n", 1)),
        )
        .await;
    let (batches_before, _) = batch_counts(&server).await;

    let held = hold_a_commit(&server, backend, &gate).await;
    let refused = send(
        &server,
        "d",
        one("g-d", "c-d", 1, "set", json!({"key": "poison", "value": 1})),
    );
    // SQLite refuses it inside the open transaction, before that commits: the others go on.
    let refused = match backend {
        Backend::Sqlite => Err(refused_now(refused).await),
        Backend::Postgres => Ok(refused),
    };
    // a and b pass a second gate together, so that both are in the batch on either store.
    let gated = |group: &str, client: &str, name: &str, args: Value| {
        push_body(
            group,
            &[(client, 1, "pass", json!({})), (client, 2, name, args)],
        )
    };
    let pushes = [
        ("a", gated("g-a", "c-a", "increment", inc("n", 1))),
        ("b", gated("g-b", "c-b", "noSuchMutator", json!({}))),
        ("c", one("g-held", "c-held", 2, "increment", inc("n", 1))),
    ]
    .map(|(space, body)| send(&server, space, body));
    // Written and waiting: a and b in SQLite's open transaction (d failed in it); a, b and d in
    // the Postgres batch behind the held commit.
    let writers = if backend == Backend::Sqlite { 2 } else { 3 };
    pass_together_then_commit(&server, &pass, held, writers).await;

    let [a, b, c] = pushes;
    assert_eq!(a.await.unwrap(), (200, json!({})), "a clean push commits");
    assert_eq!(
        b.await.unwrap(),
        (200, json!({})),
        "a failed mutation counts as processed"
    );
    let (status, body) = c.await.unwrap();
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("Forbidden")),
        "{body}"
    );
    let (status, body) = match refused {
        Ok(batched) => batched.await.unwrap(),
        Err(answered) => answered,
    };
    assert_eq!(
        (status, &body["error"]),
        (500, &json!("Internal")),
        "{body}"
    );
    let (batches, _) = batch_counts(&server).await;
    assert!(batches > batches_before, "the pushes never shared a commit");

    // Each as if alone: a moved its space once, b recorded its client and wrote nothing, c and
    // d left no trace.
    let a = server.state("a", "g-a").await;
    assert_eq!(
        (a.cookie, a.lmid("c-a"), &a.entries["n"]),
        (1, 2, &json!(1))
    );
    let b = server.state("b", "g-b").await;
    assert_eq!((b.cookie, b.lmid("c-b")), (1, 2));
    assert!(b.entries.is_empty(), "{:?}", b.entries);
    let held_state = server.state("held", "g-held").await;
    assert_eq!(
        held_state.lmid("c-held"),
        1,
        "the 403 push moved its client"
    );
    let d = server.state("d", "g-d").await;
    assert_eq!(
        (d.cookie, d.last_mutation_ids.len()),
        (0, 0),
        "the refused push wrote"
    );
    // The space that refused is not stuck: a push without the refused value commits.
    server
        .push_ok("d", &one("g-d", "c-d", 1, "increment", inc("n", 1)))
        .await;
}

/// Two pushes in one batch claim the same new client id for two client groups (of two spaces): one
/// gets it, the other is refused 403 as if it had come second alone, and nothing is overwritten.
async fn a_client_id_claimed_twice_in_one_batch_goes_to_one_group(backend: Backend) {
    let (server, gate, pass) = gated_server(backend).await;
    server
        .push_ok(
            "held",
            &one("g-held", "c-held", 1, "increment", inc("n", 1)),
        )
        .await;
    let held = hold_a_commit(&server, backend, &gate).await;
    let claim = |group: &str| {
        push_body(
            group,
            &[
                ("shared", 1, "pass", json!({})),
                ("shared", 2, "increment", inc("n", 1)),
            ],
        )
    };
    let pushes = [("x", "g-x"), ("y", "g-y")].map(|(space, group)| {
        let push = send(&server, space, claim(group));
        (space, group, push)
    });
    // Postgres: both wait in the batch behind the held commit. SQLite: both write in the open
    // transaction; the second finds the id taken there, and runs again.
    let writers = if backend == Backend::Sqlite { 1 } else { 2 };
    pass_together_then_commit(&server, &pass, held, writers).await;
    let mut answers = Vec::new();
    for (space, group, push) in pushes {
        answers.push((space, group, push.await.unwrap()));
    }
    answers.sort_by_key(|(_, _, (status, _))| *status);
    let [(won, winner, (200, _)), (lost, loser, (403, refusal))] = &answers[..] else {
        panic!("one claim wins and one is refused: {answers:?}");
    };
    assert_eq!(refusal["error"], "Forbidden", "{refusal}");
    let view = server.state(won, winner).await;
    assert_eq!((view.lmid("shared"), &view.entries["n"]), (2, &json!(1)));
    let view = server.state(lost, loser).await;
    assert_eq!(
        (view.cookie, view.last_mutation_ids.len()),
        (0, 0),
        "{lost}"
    );
}

/// Lets the two pushes waiting at `pass` go on together, waits until `writers` groups wait for
/// one commit, then releases the commit held ahead of them.
async fn pass_together_then_commit(server: &TestServer, pass: &Gate, held: Held, writers: u64) {
    pass.entered(2).await;
    pass.open.add_permits(2);
    wait_until(
        "the pushes to wait for one commit",
        || server.store.commit_batches().waiting,
        |waiting| *waiting >= writers,
    )
    .await;
    held.release().await;
}

async fn refused_now(push: tokio::task::JoinHandle<(u16, Value)>) -> (u16, Value) {
    tokio::time::timeout(Duration::from_secs(20), push)
        .await
        .expect("the refused push is answered while the transaction is held")
        .unwrap()
}

/// A commit in flight that the test holds, and releases.
enum Held {
    /// Postgres: the test's transaction locks the row of space `held`; a push to it waits.
    RowLock(
        sqlx::Transaction<'static, sqlx::Postgres>,
        tokio::task::JoinHandle<(u16, Value)>,
    ),
    /// SQLite: a gate mutator holds the writer's open transaction.
    Gate(Gate, tokio::task::JoinHandle<(u16, Value)>),
}

async fn hold_a_commit(server: &Arc<TestServer>, backend: Backend, gate: &Gate) -> Held {
    match backend {
        Backend::Postgres => {
            let conn = Box::leak(Box::new(server.db.pg().await));
            let mut tx = conn.begin().await.unwrap();
            sqlx::query("SELECT 1 FROM replisync_spaces WHERE id = 'held' FOR UPDATE")
                .execute(&mut *tx)
                .await
                .unwrap();
            let push = one("g-hold", "c-hold", 1, "increment", inc("n", 1));
            let pushed = send(server, "held", push);
            wait_for_lock_waiter(server).await;
            Held::RowLock(tx, pushed)
        }
        Backend::Sqlite => {
            let held = gate.hold(server, "held").await;
            Held::Gate(gate.clone(), held)
        }
    }
}

/// Waits until a session of the server under test waits for a lock: the held space's commit is
/// in flight.
pub(crate) async fn wait_for_lock_waiter(server: &TestServer) {
    let sql = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE NOT l.granted AND a.application_name = current_schema()";
    for _ in 0..10_000 {
        if server.db.scalar(sql).await.unwrap_or(0) > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("the held space's commit never waited for the test's lock");
}

impl Held {
    async fn release(self) {
        let pushed = match self {
            Held::RowLock(tx, pushed) => {
                tx.commit().await.unwrap();
                pushed
            }
            Held::Gate(gate, pushed) => {
                gate.open.add_permits(1);
                pushed
            }
        };
        assert_eq!(pushed.await.unwrap(), (200, json!({})), "the held push");
    }
}

const SPACES: u64 = 100;
/// Each client visits this many spaces in turn, one client group in each.
const VISITED: u64 = 3;

/// The space of client `c`'s push `p`: clients overlap, and together cover every space.
fn space_of(c: u64, p: u64) -> String {
    format!("s{}", (c * VISITED + p % VISITED) % SPACES)
}

async fn sixty_four_clients_over_a_hundred_spaces_land_exact_totals(backend: Backend) {
    const CLIENTS: u64 = 64;
    const PUSHES: u64 = 4 * VISITED;
    let app = App::builder().push(groups_of(64));
    let server = Arc::new(TestServer::start_on(backend, StoreOptions::default(), app).await);
    let writers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let server = server.clone();
            tokio::spawn(async move {
                for p in 0..PUSHES {
                    let space = space_of(c, p);
                    let (group, client) = (format!("g{c}-{space}"), format!("c{c}-{space}"));
                    let id = p / VISITED + 1;
                    let body = one(&group, &client, id, "increment", inc("n", 1));
                    let answer = server.push(&space, &body).await;
                    assert_eq!(answer, (200, json!({})), "{client} push {p}");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    // Per space: its total and one version per push; per client group, its client's last
    // mutation id and nobody else's.
    let mut pushes_to: std::collections::BTreeMap<String, u64> = Default::default();
    for c in 0..CLIENTS {
        for p in 0..PUSHES {
            *pushes_to.entry(space_of(c, p)).or_default() += 1;
        }
    }
    assert_eq!(
        pushes_to.len() as u64,
        SPACES,
        "the load covers every space"
    );
    for (space, total) in &pushes_to {
        let reader = server.state(space, "reader").await;
        assert_eq!(reader.entries["n"], json!(total), "{space}");
        assert_eq!(reader.cookie, *total, "{space}: one version per push");
    }
    for c in 0..CLIENTS {
        for p in 0..VISITED {
            let space = space_of(c, p);
            let view = server.state(&space, &format!("g{c}-{space}")).await;
            let client = format!("c{c}-{space}");
            assert_eq!(view.lmid(&client), PUSHES / VISITED, "{space} {client}");
            assert_eq!(
                view.last_mutation_ids.len(),
                1,
                "{space}: only the group's own client"
            );
        }
    }
    let (batches, groups) = batch_counts(&server).await;
    assert!(
        batches > 0 && groups >= 2 * batches,
        "no commit carried several spaces: {batches} batches, {groups} groups"
    );
    // Postgres: read batching; SQLite: the reads of the pushes waiting for the writer's connection.
    let counts = server.store.commit_batches();
    assert!(
        counts.read_batches > 0 && counts.batched_reads >= 2 * counts.read_batches,
        "no statement carried several pushes' reads: {counts:?}"
    );
}

/// A second replisync on the test's database, as behind a load balancer.
pub(crate) struct SecondInstance {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) metrics: Arc<Metrics>,
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl SecondInstance {
    pub(crate) async fn beside(first: &TestServer, options: &StoreOptions) -> SecondInstance {
        let app = App::builder().build(first.db.open_store_with(options).await);
        let (store, metrics) = (app.store().clone(), app.metrics().clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let served = tokio::spawn(serve(listener, app, stop.clone().cancelled_owned()));
        SecondInstance {
            store,
            metrics,
            base,
            http: reqwest::Client::new(),
            stop,
            served,
        }
    }

    pub(crate) async fn push(&self, space: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/spaces/{space}/push", self.base))
            .json(body)
            .send()
            .await
            .expect("the second instance answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn stop(self) {
        self.stop.cancel();
        self.served.await.unwrap().unwrap();
    }
}

/// Two instances push to the same ten spaces at once, each batching its commits: every push is
/// answered 200 and lands exactly once. A deadlock would not be broken for 60 s (the sessions'
/// `deadlock_timeout`) and would fail the pushes caught in it at the 5 s lock timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_batch_the_same_spaces_without_deadlock_or_lost_pushes() {
    const CLIENTS_EACH: u64 = 24;
    const PUSHES: u64 = 12;
    const SPACES: u64 = 10;
    let options = StoreOptions {
        pg_limits: SessionLimits {
            lock_timeout: Duration::from_secs(5),
            ..SessionLimits::default()
        },
        pg_options: |options| options.options([("deadlock_timeout", "60s")]),
        ..StoreOptions::default()
    };
    let first = Arc::new(
        TestServer::start_on(Backend::Postgres, options_like(&options), App::builder()).await,
    );
    let second = Arc::new(SecondInstance::beside(&first, &options).await);
    let writers: Vec<_> = (0..2 * CLIENTS_EACH)
        .map(|c| {
            let (first, second) = (first.clone(), second.clone());
            tokio::spawn(async move {
                for p in 0..PUSHES {
                    // Each client spreads its pushes over every space, one client group in each.
                    let space = format!("s{}", (c + p) % SPACES);
                    let (group, client) = (format!("g{c}-{space}"), format!("c{c}-{space}"));
                    let id = p / SPACES + 1;
                    let body = one(&group, &client, id, "increment", inc("n", 1));
                    let answer = if c % 2 == 0 {
                        first.push(&space, &body).await
                    } else {
                        second.push(&space, &body).await
                    };
                    assert_eq!(answer, (200, json!({})), "{client} push {p}");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    for s in 0..SPACES {
        let space = format!("s{s}");
        let pushed = (0..2 * CLIENTS_EACH)
            .flat_map(|c| (0..PUSHES).map(move |p| (c + p) % SPACES))
            .filter(|visited| *visited == s)
            .count();
        let reader = first.state(&space, "reader").await;
        assert_eq!(reader.entries["n"], json!(pushed), "{space}");
        assert_eq!(
            reader.cookie, pushed as u64,
            "{space}: one version per push"
        );
    }
    for (instance, store) in [("first", &first.store), ("second", &second.store)] {
        let batches = store.commit_batches().batches;
        assert!(batches > 0, "the {instance} instance never batched");
    }
    let conflicts = first.metrics.push_conflicts.get() + second.metrics.push_conflicts.get();
    assert!(conflicts > 0, "the instances never met on a space");
    Arc::into_inner(second)
        .expect("the writers are done")
        .stop()
        .await;
}

/// The same options again (they hold a closure, so they are not `Clone`).
pub(crate) fn options_like(options: &StoreOptions) -> StoreOptions {
    StoreOptions {
        pg_limits: options.pg_limits,
        pg_options: options.pg_options,
        batch: options.batch,
        known_state_bytes: options.known_state_bytes,
        wrap_store: None,
    }
}

/// SQLite: a push whose client leaves while it waits to open the writer's transaction (here the
/// gate holds the writer, and one push per transaction makes every push open one of its own, as
/// garbage collection's hold on the writer does) hands the opening on: the next push is applied.
/// Before, every later push waited for ever.
#[tokio::test]
async fn a_push_whose_client_leaves_while_it_waits_for_the_writer_holds_up_no_other() {
    let gate = Gate::default();
    let app = App::builder().mutators(Mutators::builtin().register("gate", gate.clone()));
    let alone = StoreOptions {
        batch: BatchLimits {
            max_pushes: 1,
            max_age: Duration::from_secs(60),
        },
        ..StoreOptions::default()
    };
    let server = Arc::new(TestServer::start_on(Backend::Sqlite, alone, app).await);
    let held = gate.hold(&server, "held").await;
    let bytes_in_flight = || server.metrics.push_bytes_in_flight.get();
    let held_bytes = bytes_in_flight();
    let leaving = {
        let server = server.clone();
        let body = one("g-left", "c-left", 1, "increment", inc("n", 1));
        tokio::spawn(async move { server.push("left", &body).await })
    };
    wait_until("the leaving push to be read", bytes_in_flight, |b| {
        *b > held_bytes
    })
    .await;
    // Time to reach the writer's wait (microseconds): a push still short of it would not
    // exercise the hand-on, but neither could it fail the test.
    tokio::time::sleep(Duration::from_millis(200)).await;
    leaving.abort();
    wait_until(
        "the server to drop the push whose client left",
        bytes_in_flight,
        |b| *b == held_bytes,
    )
    .await;
    gate.open.add_permits(1);
    assert_eq!(held.await.unwrap(), (200, json!({})), "the held push");
    let next = one("g-next", "c-next", 1, "increment", inc("n", 1));
    let answered = tokio::time::timeout(Duration::from_secs(20), server.push("next", &next)).await;
    assert_eq!(
        answered.expect("the next push is answered, not held up by the one that left"),
        (200, json!({}))
    );
    let left = server.state("left", "reader").await;
    assert_eq!(left.cookie, 0, "the push whose client left wrote nothing");
}

crate::on_both_stores!(
    one_failing_push_in_a_batch_fails_alone,
    a_client_id_claimed_twice_in_one_batch_goes_to_one_group,
    sixty_four_clients_over_a_hundred_spaces_land_exact_totals,
);
