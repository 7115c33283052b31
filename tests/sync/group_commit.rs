//! Group commit: pushes to one space that arrive while its transaction is busy are applied
//! together, in arrival order, and each keeps its own answer. A `gate` mutator holds a space's
//! transaction open until the test has queued the pushes it wants in one group.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use replisync::mutators::{MutationError, Mutator, Mutators, WriteTx};
use replisync::push::settings::{GroupLimits, PushLimits};
use replisync::startup::{App, AppBuilder};
use replisync::store::{PushChanges, StoreError};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::faults::{FailTimes, Fault, Faulty, Op, Signal};
use crate::harness::{Backend, PokeRecorder, StoreOptions, TestServer, inc, push_body, wait_until};

/// Holds its push's group open: signals `entered`, then waits for `open`.
#[derive(Clone)]
pub(crate) struct Gate {
    entered: Arc<Semaphore>,
    pub(crate) open: Arc<Semaphore>,
    /// Panics once opened (a mutator bug), instead of returning.
    panics: bool,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            entered: Arc::new(Semaphore::new(0)),
            open: Arc::new(Semaphore::new(0)),
            panics: false,
        }
    }
}

#[async_trait]
impl Mutator for Gate {
    async fn apply(&self, _tx: &mut WriteTx<'_>, _args: &Value) -> Result<(), MutationError> {
        self.entered.add_permits(1);
        self.open.acquire().await.expect("the gate opens").forget();
        assert!(
            !self.panics,
            "the gate's mutator fails hard, as a test asked"
        );
        Ok(())
    }
}

impl Gate {
    /// Starts a push to `space` that holds the space's transaction, and returns once it does.
    pub(crate) async fn hold(
        &self,
        server: &Arc<TestServer>,
        space: &str,
    ) -> tokio::task::JoinHandle<(u16, Value)> {
        let (server, space) = (server.clone(), space.to_owned());
        let held = tokio::spawn(async move {
            let body = push_body("gate", &[("gate", 1, "gate", json!({}))]);
            server.push(&space, &body).await
        });
        self.entered.acquire().await.unwrap().forget();
        held
    }

    /// Waits until `count` more pushes have entered the gate.
    pub(crate) async fn entered(&self, count: u32) {
        self.entered.acquire_many(count).await.unwrap().forget();
    }

    /// Sends `bodies` to `space` one after another, each once the one before waits behind the
    /// gate: they queue in this order.
    pub(crate) async fn queue(
        &self,
        server: &Arc<TestServer>,
        space: &str,
        bodies: Vec<Value>,
    ) -> Vec<tokio::task::JoinHandle<(u16, Value)>> {
        let mut sent = Vec::new();
        for body in bodies {
            sent.push(send(server, space, body));
            wait_for_waiting(server, sent.len() as u64).await;
        }
        sent
    }

    /// Opens the gate once `count` pushes wait behind it: they make the next group.
    pub(crate) async fn open_when_waiting(&self, server: &TestServer, count: u64) {
        wait_for_waiting(server, count).await;
        self.open.add_permits(1);
    }
}

/// Waits until `count` pushes wait for their space's transaction.
async fn wait_for_waiting(server: &TestServer, count: u64) {
    let waiting = || server.metrics.pushes_waiting.get();
    wait_until("pushes to wait for their space", waiting, |n| *n >= count).await;
}

/// Waits until no push waits for its space's transaction: every group took its pushes.
pub(crate) async fn wait_for_none_waiting(server: &TestServer) {
    let waiting = || server.metrics.pushes_waiting.get();
    wait_until("no push to wait", waiting, |n| *n == 0).await;
}

pub(crate) fn options_with(gate: &Gate, push: PushLimits) -> AppBuilder {
    App::builder().mutators(gated(gate)).push(push)
}

/// The built-in mutators and `gate`, which holds a space's transaction while the test says.
fn gated(gate: &Gate) -> Mutators {
    Mutators::builtin().register("gate", gate.clone())
}

/// Groups of at most `max_pushes`: only the size limit splits groups, however slow the machine.
pub(crate) fn groups_of(max_pushes: usize) -> PushLimits {
    PushLimits {
        group: GroupLimits {
            max_pushes,
            max_age: Duration::from_secs(20),
        },
        ..PushLimits::default()
    }
}

/// Sends `body` to `space` in a task of its own.
pub(crate) fn send(
    server: &Arc<TestServer>,
    space: &str,
    body: Value,
) -> tokio::task::JoinHandle<(u16, Value)> {
    let (server, space) = (server.clone(), space.to_owned());
    tokio::spawn(async move { server.push(&space, &body).await })
}

async fn pushes_with_every_kind_of_outcome_in_one_group_each_get_their_own(backend: Backend) {
    let gate = Gate::default();
    let limits = PushLimits {
        max_body_bytes: 4096,
        max_mutations: 3,
        ..PushLimits::default()
    };
    let server = Arc::new(TestServer::start_with(backend, options_with(&gate, limits)).await);
    // A client group of another space: using it here is refused 403.
    let other = push_body("elsewhere", &[("e", 1, "increment", inc("n", 1))]);
    assert_eq!(server.push("other-space", &other).await, (200, json!({})));

    let held = gate.hold(&server, "s").await;
    let groups_before = server.metrics.push_groups.get();
    let pushes = vec![
        // Applied.
        push_body("ga", &[("a", 1, "increment", inc("n", 1))]),
        // An unknown client past its first mutation: ClientStateNotFound.
        push_body("gb", &[("b", 5, "increment", inc("n", 100))]),
        // Client `a` belongs to `ga`, created by the first push of this very group: 403.
        push_body("gc", &[("a", 2, "increment", inc("n", 100))]),
        // A failing mutation counts as processed; the next one of the push applies.
        push_body(
            "gd",
            &[
                ("d", 1, "nope", json!({})),
                ("d", 2, "increment", inc("n", 1)),
            ],
        ),
        // The same group as the first, next mutation: applied after it, in order.
        push_body("ga", &[("a", 2, "increment", inc("n", 1))]),
        // A gap: mutation 1 applies, 3 waits for 2.
        push_body(
            "gf",
            &[
                ("f", 1, "increment", inc("n", 1)),
                ("f", 3, "increment", inc("n", 100)),
            ],
        ),
        // Over the mutation cap: a prefix of 3 applies, 503 PartiallyApplied.
        push_body(
            "gi",
            &(1..=4)
                .map(|id| ("i", id, "increment", inc("n", 1)))
                .collect::<Vec<_>>(),
        ),
        // A client group of another space: 403.
        push_body("elsewhere", &[("e", 2, "increment", inc("n", 100))]),
    ];
    let sent = gate.queue(&server, "s", pushes).await;
    // Too large: refused before it could join the group, and changes nothing.
    let huge = push_body(
        "gh",
        &[(
            "h",
            1,
            "set",
            json!({"key": "h", "value": "x".repeat(8192)}),
        )],
    );
    let (status, body) = server.push("s", &huge).await;
    assert_eq!(
        (status, &body["error"]),
        (413, &json!("PayloadTooLarge")),
        "{body}"
    );
    gate.open_when_waiting(&server, sent.len() as u64).await;
    assert_eq!(held.await.unwrap(), (200, json!({})));

    let mut answers = Vec::new();
    for push in sent {
        answers.push(push.await.unwrap());
    }
    let errors: Vec<(u16, Value)> = answers
        .iter()
        .map(|(status, body)| (*status, body["error"].clone()))
        .collect();
    assert_eq!(
        errors,
        vec![
            (200, Value::Null),
            (200, json!("ClientStateNotFound")),
            (403, json!("Forbidden")),
            (200, Value::Null),
            (200, Value::Null),
            (200, Value::Null),
            (503, json!("PartiallyApplied")),
            (403, json!("Forbidden")),
        ],
        "{answers:?}"
    );
    assert_eq!(
        server.metrics.push_groups.get() - groups_before,
        2,
        "the gate's group, then one for all eight"
    );

    // Applied: a#1, d#2, a#2, f#1 and i#1..3. Each push that changed something moved the space
    // one version on: the gate's, ga twice, gd, gf, gi.
    let stored = ["elsewhere", "ga", "gate", "gd", "gf", "gi"]; // "elsewhere": another space
    assert_eq!(
        server.db.client_group_ids().await,
        stored,
        "refused pushes made no group"
    );
    let a = server.state("s", "ga").await;
    assert_eq!(a.entries["n"], json!(7));
    assert_eq!(a.lmid("a"), 2);
    assert_eq!(a.cookie, 6);
    assert_eq!(server.state("s", "gd").await.lmid("d"), 2);
    assert_eq!(server.state("s", "gf").await.lmid("f"), 1);
    assert_eq!(server.state("s", "gi").await.lmid("i"), 3);
    for (group, client) in [("gb", "b"), ("gc", "a"), ("gh", "h")] {
        let refused = server.state("s", group).await;
        assert!(
            refused.last_mutation_ids.is_empty(),
            "{group} wrote nothing: {:?}",
            refused.last_mutation_ids
        );
        assert!(!refused.last_mutation_ids.contains_key(client));
    }
    assert!(!a.entries.contains_key("h"));
    wait_for_none_waiting(&server).await;
}

async fn the_same_push_many_times_in_one_group_applies_once(backend: Backend) {
    const COPIES: u64 = 16;
    let gate = Gate::default();
    let server =
        Arc::new(TestServer::start_with(backend, options_with(&gate, PushLimits::default())).await);
    let body = push_body(
        "g",
        &[
            ("c", 1, "increment", inc("n", 1)),
            ("c", 2, "increment", inc("n", 1)),
        ],
    );
    let held = gate.hold(&server, "s").await;
    let sent: Vec<_> = (0..COPIES)
        .map(|_| send(&server, "s", body.clone()))
        .collect();
    gate.open_when_waiting(&server, COPIES).await;
    assert_eq!(held.await.unwrap(), (200, json!({})));
    for push in sent {
        assert_eq!(push.await.unwrap(), (200, json!({})));
    }
    assert_eq!(
        server.metrics.pushes_grouped.get(),
        COPIES,
        "{} conflicts",
        server.metrics.push_conflicts.get()
    );
    let state = server.state("s", "g").await;
    assert_eq!(state.lmid("c"), 2);
    assert_eq!(state.entries["n"], json!(2), "each mutation once");
    assert_eq!(state.cookie, 2, "the gate's push and the first copy");
    wait_for_none_waiting(&server).await;
}

async fn sixty_four_clients_on_one_space_land_exact_totals(backend: Backend) {
    const CLIENTS: u64 = 64;
    const PUSHES: u64 = 10;
    const MUTATIONS: u64 = 3;
    // At the default age limit (50 ms), a loaded machine cuts pushes short (503 PartiallyApplied).
    let options = App::builder().push(groups_of(GroupLimits::default().max_pushes));
    let server = Arc::new(TestServer::start_with(backend, options).await);
    let writers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let server = server.clone();
            tokio::spawn(async move {
                let (group, client) = (format!("g{c}"), format!("c{c}"));
                for p in 0..PUSHES {
                    let mutations: Vec<_> = (1..=MUTATIONS)
                        .map(|m| {
                            (
                                client.as_str(),
                                p * MUTATIONS + m,
                                "increment",
                                inc("total", 1),
                            )
                        })
                        .collect();
                    let answer = server.push("hot", &push_body(&group, &mutations)).await;
                    assert_eq!(answer, (200, json!({})), "{client} push {p}");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    for c in 0..CLIENTS {
        let state = server.state("hot", &format!("g{c}")).await;
        assert_eq!(state.lmid(&format!("c{c}")), PUSHES * MUTATIONS);
        assert_eq!(state.entries["total"], json!(CLIENTS * PUSHES * MUTATIONS));
        assert_eq!(state.cookie, CLIENTS * PUSHES, "one version per push");
    }
    assert!(
        server.metrics.pushes_grouped.get() > 0,
        "64 concurrent clients never shared a transaction"
    );
    assert!(server.metrics.push_groups.get() < CLIENTS * PUSHES);
    wait_for_none_waiting(&server).await;
}

/// Fails the commit of any push group that writes the key `poison`: a database error that one
/// push's data causes (a real database refuses no value a push can write, so a double stands in).
struct PoisonedCommits;

impl Fault for PoisonedCommits {
    fn refuse_commit(&self, changes: &PushChanges) -> Option<StoreError> {
        let poisoned = changes.entries.iter().any(|entry| entry.key == "poison");
        poisoned.then(|| StoreError::Database("value refused".into()))
    }
}

async fn a_database_error_fails_only_the_push_that_caused_it(backend: Backend) {
    let gate = Gate::default();
    let store = StoreOptions::wrapped(|store| Faulty::wrap(store, PoisonedCommits));
    let app = options_with(&gate, PushLimits::default());
    let server = Arc::new(TestServer::start_on(backend, store, app).await);
    let held = gate.hold(&server, "s").await;
    let put = |group: &str, client: &str, key: &str| {
        push_body(
            group,
            &[(client, 1, "set", json!({"key": key, "value": 1}))],
        )
    };
    let bodies = vec![
        put("g1", "c1", "first"),
        put("g2", "c2", "poison"),
        put("g3", "c3", "third"),
    ];
    let sent = gate.queue(&server, "s", bodies).await;
    gate.open_when_waiting(&server, 3).await;
    assert_eq!(held.await.unwrap(), (200, json!({})));
    let mut answers = Vec::new();
    for push in sent {
        answers.push(push.await.unwrap());
    }
    let refused = json!({"error": "Internal",
                         "message": "internal error; the request changed nothing, retry later"});
    assert_eq!(
        answers,
        [(200, json!({})), (500, refused), (200, json!({}))]
    );
    let state = server.state("s", "g1").await;
    assert_eq!(state.lmid("c1"), 1);
    assert_eq!(state.entries.get("first"), Some(&json!(1)));
    assert_eq!(state.entries.get("third"), Some(&json!(1)));
    assert!(!state.entries.contains_key("poison"));
    assert_eq!(
        server.state("s", "g2").await.lmid("c2"),
        0,
        "the poisoned push wrote nothing"
    );
    wait_for_none_waiting(&server).await;
}

/// A group stops taking pushes at its size limit: the rest wait for the next group.
async fn a_group_takes_at_most_its_size_limit(backend: Backend) {
    let gate = Gate::default();
    let limits = groups_of(4);
    let server = Arc::new(TestServer::start_with(backend, options_with(&gate, limits)).await);
    let held = gate.hold(&server, "s").await;
    let groups_before = server.metrics.push_groups.get();
    let sent: Vec<_> = (0..10)
        .map(|c| {
            let body = push_body(
                &format!("g{c}"),
                &[(&format!("c{c}"), 1, "increment", inc("n", 1))],
            );
            send(&server, "s", body)
        })
        .collect();
    gate.open_when_waiting(&server, 10).await;
    assert_eq!(held.await.unwrap(), (200, json!({})));
    for push in sent {
        assert_eq!(push.await.unwrap(), (200, json!({})));
    }
    assert_eq!(
        server.metrics.push_groups.get() - groups_before,
        4,
        "the gate's group, then 4 + 4 + 2 ({} conflicts)",
        server.metrics.push_conflicts.get()
    );
    assert_eq!(server.state("s", "g0").await.entries["n"], json!(10));
    wait_for_none_waiting(&server).await;
}

/// The push applied by its own request's task (its space was idle) dies with that task; the
/// pushes that queued behind it are still applied.
async fn pushes_waiting_behind_a_push_that_dies_are_still_applied(backend: Backend) {
    let gate = Gate {
        panics: true,
        ..Gate::default()
    };
    let server =
        Arc::new(TestServer::start_with(backend, options_with(&gate, PushLimits::default())).await);
    let held = gate.hold(&server, "s").await;
    let queued = gate
        .queue(
            &server,
            "s",
            vec![push_body("g", &[("c", 1, "increment", inc("n", 1))])],
        )
        .await;
    gate.open.add_permits(1);
    // The panic is caught around its request: answered 500, asking for the push again.
    let (status, body) = held
        .await
        .expect("the test's request task itself does not fail");
    assert_eq!(
        (status, &body["error"]),
        (500, &json!("Internal")),
        "{body}"
    );
    for push in queued {
        let answer = tokio::time::timeout(Duration::from_secs(20), push)
            .await
            .expect("the waiting push was answered");
        assert_eq!(answer.unwrap(), (200, json!({})));
    }
    let state = server.state("s", "g").await;
    assert_eq!(state.entries["n"], json!(1));
    assert!(server.state("s", "gate").await.last_mutation_ids.is_empty());
    wait_for_none_waiting(&server).await;
}

/// Appends its arguments to the list under the key `order`.
struct Append;

#[async_trait]
impl Mutator for Append {
    async fn apply(&self, tx: &mut WriteTx<'_>, args: &Value) -> Result<(), MutationError> {
        let mut order = match tx.get("order").await? {
            Some(Value::Array(order)) => order,
            _ => Vec::new(),
        };
        order.push(args.clone());
        tx.put("order", Value::Array(order))
    }
}

/// Pushes that wait together commit in one group, in the order they arrived: their writes land
/// in that order, and each moves the space one version on, the later push the later version.
async fn pushes_that_wait_together_commit_in_arrival_order(backend: Backend) {
    const PUSHES: u64 = 5;
    let gate = Gate::default();
    let options = App::builder().mutators(gated(&gate).register("append", Append));
    let server = Arc::new(TestServer::start_with(backend, options).await);
    let held = gate.hold(&server, "s").await;
    let groups_before = server.metrics.push_groups.get();
    let bodies = (1..=PUSHES)
        .map(|n| {
            let client = format!("c{n}");
            let mark = json!({"key": format!("k{n}"), "value": n});
            push_body(
                &format!("g{n}"),
                &[(&client, 1, "append", json!(n)), (&client, 2, "set", mark)],
            )
        })
        .collect();
    let sent = gate.queue(&server, "s", bodies).await;
    gate.open.add_permits(1);
    assert_eq!(held.await.unwrap(), (200, json!({})));
    for push in sent {
        assert_eq!(push.await.unwrap(), (200, json!({})));
    }
    assert_eq!(
        server.metrics.push_groups.get() - groups_before,
        2,
        "the gate's group, then one for the five"
    );
    let state = server.state("s", "g1").await;
    assert_eq!(state.entries["order"], json!([1, 2, 3, 4, 5]));
    assert_eq!(state.cookie, 1 + PUSHES, "one version per push");
    for n in 1..=PUSHES {
        // Push n moved the space to version n + 1: a pull from version n sees its key onwards.
        let (status, body) = server.pull("s", "g1", json!(n)).await;
        assert_eq!(status, 200, "{body}");
        let mut marks: Vec<&str> = body["patch"]
            .as_array()
            .expect("patch")
            .iter()
            .filter_map(|op| op["key"].as_str())
            .filter(|key| key.starts_with('k'))
            .collect();
        marks.sort_unstable();
        let expected: Vec<String> = (n..=PUSHES).map(|k| format!("k{k}")).collect();
        assert_eq!(marks, expected, "pulled from version {n}");
    }
    wait_for_none_waiting(&server).await;
}

/// A group that reaches its age limit leaves the pushes it has not started: they go back to the
/// head of the space's queue in arrival order, ahead of a push that arrived while the group
/// ran, and each is answered and applied.
async fn pushes_a_group_left_at_its_age_limit_go_first_in_arrival_order(backend: Backend) {
    const MAX_AGE: Duration = Duration::from_millis(100);
    let (gate, holds) = (Gate::default(), Gate::default());
    let mutators = gated(&gate)
        .register("append", Append)
        .register("hold", holds.clone());
    let limits = PushLimits {
        group: GroupLimits {
            max_pushes: 64,
            max_age: MAX_AGE,
        },
        ..PushLimits::default()
    };
    let options = App::builder().mutators(mutators).push(limits);
    let server = Arc::new(TestServer::start_with(backend, options).await);
    let append = |n: u64| {
        push_body(
            &format!("g{n}"),
            &[(&format!("c{n}"), 1, "append", json!(n))],
        )
    };
    let held = gate.hold(&server, "s").await;
    let mut bodies = vec![push_body("hold", &[("hold-c", 1, "hold", json!({}))])];
    bodies.extend((1..=4).map(append));
    let mut sent = gate.queue(&server, "s", bodies).await;
    gate.open.add_permits(1);
    assert_eq!(held.await.unwrap(), (200, json!({})));
    // The group of five runs its first push, which holds it.
    holds.entered.acquire().await.unwrap().forget();
    let held_since = Instant::now();
    sent.push(send(&server, "s", append(5)));
    wait_for_waiting(&server, 1).await;
    // The group's age is the behaviour under test: its first push holds it past the limit, so
    // it starts none of the four pushes behind that one.
    tokio::time::sleep_until((held_since + MAX_AGE).into()).await;
    holds.open.add_permits(1);
    for push in sent {
        assert_eq!(push.await.unwrap(), (200, json!({})));
    }
    let state = server.state("s", "g1").await;
    assert_eq!(state.entries["order"], json!([1, 2, 3, 4, 5]));
    assert_eq!(
        state.cookie, 7,
        "the gate's push, the holding push, then one per push"
    );
    for n in 1..=5 {
        assert_eq!(
            server
                .state("s", &format!("g{n}"))
                .await
                .lmid(&format!("c{n}")),
            1
        );
    }
    wait_for_none_waiting(&server).await;
}

/// Panics: a bug in a mutator.
struct Panics;

#[async_trait]
impl Mutator for Panics {
    async fn apply(&self, _tx: &mut WriteTx<'_>, _args: &Value) -> Result<(), MutationError> {
        panic!("the mutator fails hard, as a test asked")
    }
}

/// A group runner that panics (a mutator's bug) answers each push of its group, and each push
/// queued behind it, with a 500; commits nothing of the group; and leaves the space free, so
/// that the next push to it is applied.
async fn a_runner_that_panics_answers_its_pushes_and_frees_the_space(backend: Backend) {
    let gate = Gate::default();
    let options = App::builder()
        .mutators(gated(&gate).register("panic", Panics))
        .push(groups_of(2));
    let server = Arc::new(TestServer::start_with(backend, options).await);
    let increment =
        |group: &str, client: &str| push_body(group, &[(client, 1, "increment", inc("n", 1))]);
    let held = gate.hold(&server, "s").await;
    let bodies = vec![
        increment("ga", "a"),
        push_body("gp", &[("p", 1, "panic", json!({}))]),
        // Beyond the group's size: it waits in the queue while the group panics.
        increment("gb", "b"),
    ];
    let sent = gate.queue(&server, "s", bodies).await;
    gate.open.add_permits(1);
    assert_eq!(held.await.unwrap(), (200, json!({})));
    let mut answers = Vec::new();
    for push in sent {
        let answer = tokio::time::timeout(Duration::from_secs(20), push)
            .await
            .expect("the waiting push was answered");
        let (status, body) = answer.unwrap();
        answers.push((status, body["error"].clone()));
    }
    assert_eq!(answers, vec![(500, json!("Internal")); 3]);
    wait_for_none_waiting(&server).await;
    assert_eq!(
        server.db.client_group_ids().await,
        ["gate"],
        "no group of the failed pushes"
    );
    let state = server.state("s", "ga").await;
    assert_eq!(state.cookie, 1, "only the gate's push committed");
    assert!(!state.entries.contains_key("n"), "{:?}", state.entries);
    for (group, client) in [("ga", "a"), ("gp", "p"), ("gb", "b")] {
        assert_eq!(server.state("s", group).await.lmid(client), 0, "{group}");
    }

    let next = tokio::time::timeout(
        Duration::from_secs(20),
        server.push("s", &increment("gc", "c")),
    )
    .await
    .expect("the next push to the space was answered");
    assert_eq!(next, (200, json!({})));
    assert_eq!(server.state("s", "gc").await.entries["n"], json!(1));
    wait_for_none_waiting(&server).await;
}

/// A push that panics while it runs in its caller's own task (the first push of its group) is
/// answered 500 with a JSON body that says to push again, writes nothing, and leaves the space
/// free for the next push.
async fn a_push_that_panics_in_its_callers_task_is_answered_500(backend: Backend) {
    let options = App::builder().mutators(Mutators::builtin().register("panic", Panics));
    let server = TestServer::start_with(backend, options).await;
    let (status, body) = server
        .push("s", &push_body("gp", &[("p", 1, "panic", json!({}))]))
        .await;
    assert_eq!(
        (status, &body["error"]),
        (500, &json!("Internal")),
        "{body}"
    );
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("send it again"), "{message}");
    assert!(
        server.db.client_group_ids().await.is_empty(),
        "the panicked push made no group"
    );
    let next = push_body("gc", &[("c", 1, "increment", inc("n", 1))]);
    assert_eq!(server.push("s", &next).await, (200, json!({})));
    assert_eq!(server.state("s", "gc").await.entries["n"], json!(1));
    wait_for_none_waiting(&server).await;
}

/// A push that waits behind a busy space is applied by the group runner after its caller hung
/// up, in one group with the push that waited after it, and the group's commit is poked like
/// any other: the poke belongs to the commit.
async fn a_push_whose_caller_left_is_applied_and_poked(backend: Backend) {
    let gate = Gate::default();
    let pokes = Arc::new(PokeRecorder::default());
    let options = options_with(&gate, PushLimits::default()).poke_sink(pokes.clone());
    let server = Arc::new(TestServer::start_with(backend, options).await);
    let held = gate.hold(&server, "s").await;
    let groups_before = server.metrics.push_groups.get();
    let left = send(
        &server,
        "s",
        push_body("g", &[("c", 1, "increment", inc("n", 1))]),
    );
    wait_for_waiting(&server, 1).await;
    let open = server.metrics.open_connections.get();
    left.abort(); // the caller hangs up: its connection closes
    let _ = left.await;
    let metrics = server.metrics.clone();
    let connections = || metrics.open_connections.get();
    wait_until("the server to see the hang-up", connections, |n| *n < open).await;
    let stays = send(
        &server,
        "s",
        push_body("g2", &[("c2", 1, "increment", inc("n", 10))]),
    );
    gate.open_when_waiting(&server, 2).await;
    assert_eq!(held.await.unwrap(), (200, json!({})));
    assert_eq!(stays.await.unwrap(), (200, json!({})));

    let deadline = Instant::now() + Duration::from_secs(20);
    while server.state("s", "g").await.lmid("c") != 1 {
        assert!(
            Instant::now() < deadline,
            "the push that waited was never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.state("s", "g").await.entries["n"], json!(11));
    assert_eq!(
        server.metrics.push_groups.get() - groups_before,
        2,
        "the gate's group, then one for both"
    );
    assert!(
        pokes.wait_for("s", 2, Duration::from_secs(10)).await,
        "two commits, {} pokes",
        pokes.count("s")
    );
    assert_eq!(
        server.metrics.push_commits.get(),
        3,
        "every committed push counted"
    );
    wait_for_none_waiting(&server).await;
}

/// A commit whose acknowledgement was lost is run again, finds its mutations applied, and still
/// pokes; so does a client's resend of the same push.
async fn a_commit_whose_answer_was_lost_is_poked(backend: Backend) {
    let pokes = Arc::new(PokeRecorder::default());
    let store = StoreOptions::wrapped(|store| {
        // Commits, then answers as if the connection died before the answer arrived.
        let lost = StoreError::Disconnected("the answer to the commit was lost".into());
        Faulty::wrap(store, FailTimes::new(Op::CommitAnswer, 1, lost))
    });
    let app = App::builder().poke_sink(pokes.clone());
    let server = TestServer::start_on(backend, store, app).await;
    let body = push_body("g", &[("c", 1, "increment", inc("n", 1))]);
    assert_eq!(server.push("s", &body).await, (200, json!({})));
    assert_eq!(server.state("s", "g").await.lmid("c"), 1, "committed once");
    // Both pokes are made before the push is answered: the commit's, and its rerun's (which
    // found the push applied, a replay).
    assert_eq!(
        pokes.count("s"),
        2,
        "the commit whose answer was lost was poked, then its rerun"
    );

    let before = pokes.count("s");
    assert_eq!(server.push("s", &body).await, (200, json!({})));
    assert_eq!(pokes.count("s"), before + 1, "a resend pokes again");
    assert_eq!(server.state("s", "g").await.entries["n"], json!(1));
    wait_for_none_waiting(&server).await;
}

/// Takes 300 ms.
struct Slow;

#[async_trait]
impl Mutator for Slow {
    async fn apply(&self, tx: &mut WriteTx<'_>, _args: &Value) -> Result<(), MutationError> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let done = tx.get("slow").await?.and_then(|v| v.as_u64()).unwrap_or(0);
        tx.put("slow", json!(done + 1))
    }
}

/// A push that runs past its group's age limit starts no more mutations: it commits what it
/// applied (the client pushes the rest at once), and the pushes behind it go to the next group,
/// instead of waiting for all of its slow mutations.
async fn a_slow_push_stops_at_its_groups_age_limit(backend: Backend) {
    let gate = Gate::default();
    let options = App::builder()
        .mutators(gated(&gate).register("slow", Slow))
        .push(PushLimits {
            group: GroupLimits {
                max_pushes: 64,
                max_age: Duration::from_millis(50),
            },
            ..PushLimits::default()
        });
    let server = Arc::new(TestServer::start_with(backend, options).await);
    let held = gate.hold(&server, "s").await;
    let slow_mutations: Vec<_> = (1..=10)
        .map(|id| ("slow-c", id, "slow", json!({})))
        .collect();
    let queued = gate
        .queue(
            &server,
            "s",
            vec![
                push_body("first", &[("first-c", 1, "increment", inc("n", 1))]),
                push_body("slow", &slow_mutations),
                push_body("fast", &[("fast-c", 1, "increment", inc("n", 1))]),
            ],
        )
        .await;
    gate.open.add_permits(1);
    assert_eq!(held.await.unwrap(), (200, json!({})));
    let mut answers = Vec::new();
    for push in queued {
        answers.push(push.await.unwrap());
    }
    assert_eq!(answers[0], (200, json!({})));
    let (status, body) = &answers[1];
    assert_eq!(
        *status, 503,
        "the slow push stopped at the group's age: {body}"
    );
    assert_eq!(body["error"], "PartiallyApplied", "{body}");
    assert_eq!(
        answers[2],
        (200, json!({})),
        "the fast push went to the next group"
    );
    let slow = server.state("s", "slow").await;
    assert!(
        (1..10).contains(&slow.lmid("slow-c")),
        "a prefix of the slow push committed: {}",
        slow.lmid("slow-c")
    );
    assert_eq!(server.state("s", "fast").await.lmid("fast-c"), 1);
    wait_for_none_waiting(&server).await;
}

/// A slow push alone in its group (the space was idle) is cut at the group's age limit once
/// another push waits for the space, and runs on when none does.
async fn a_slow_push_alone_yields_to_a_push_that_waits(backend: Backend) {
    let options = App::builder()
        .mutators(Mutators::builtin().register("slow", Slow))
        .push(PushLimits {
            group: GroupLimits {
                max_pushes: 64,
                max_age: Duration::from_millis(50),
            },
            ..PushLimits::default()
        });
    let began = Arc::new(Semaphore::new(0));
    let reached = began.clone();
    let store = StoreOptions::wrapped(|store| {
        let op = Op::BeginPush;
        Faulty::wrap(store, Signal { op, reached })
    });
    let server = Arc::new(TestServer::start_on(backend, store, options).await);
    let slow_push = |group: &str, space: &str| {
        let client = format!("{group}-c");
        let mutations: Vec<_> = (1..=5)
            .map(|id| (client.as_str(), id, "slow", json!({})))
            .collect();
        send(&server, space, push_body(group, &mutations))
    };
    // Alone: nothing waits, so it runs to its end.
    let alone = slow_push("alone", "quiet").await.unwrap();
    assert_eq!(alone, (200, json!({})), "nothing waited: the whole push");
    began.acquire().await.unwrap().forget();

    let slow = slow_push("slow", "s");
    let holds = tokio::time::timeout(Duration::from_secs(20), began.acquire()).await;
    holds.expect("the slow push began").unwrap().forget(); // it holds the space
    let fast = send(
        &server,
        "s",
        push_body("fast", &[("fast-c", 1, "increment", inc("n", 1))]),
    );
    wait_for_waiting(&server, 1).await;
    let (status, body) = slow.await.unwrap();
    assert_eq!(
        status, 503,
        "the slow push yielded to the one waiting: {body}"
    );
    assert_eq!(body["error"], "PartiallyApplied", "{body}");
    assert_eq!(fast.await.unwrap(), (200, json!({})));
    let applied = server.state("s", "slow").await.lmid("slow-c");
    assert!((1..5).contains(&applied), "{applied} of 5 applied");
    wait_for_none_waiting(&server).await;
}

crate::on_both_stores!(
    pushes_that_wait_together_commit_in_arrival_order,
    pushes_a_group_left_at_its_age_limit_go_first_in_arrival_order,
    a_runner_that_panics_answers_its_pushes_and_frees_the_space,
    a_push_that_panics_in_its_callers_task_is_answered_500,
    a_slow_push_alone_yields_to_a_push_that_waits,
    a_slow_push_stops_at_its_groups_age_limit,
    a_push_whose_caller_left_is_applied_and_poked,
    a_commit_whose_answer_was_lost_is_poked,
    pushes_waiting_behind_a_push_that_dies_are_still_applied,
    pushes_with_every_kind_of_outcome_in_one_group_each_get_their_own,
    the_same_push_many_times_in_one_group_applies_once,
    sixty_four_clients_on_one_space_land_exact_totals,
    a_database_error_fails_only_the_push_that_caused_it,
    a_group_takes_at_most_its_size_limit,
);
