//! The JavaScript engine under its edge cases (issue 23): jobs left queued, promises that never
//! settle, writes not awaited, a module that cannot load for a while, and pushes in one group.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use replisync::mutators::Mutators;
use replisync::mutators::js::{JsLimits, JsMutators};
use replisync::push::settings::{GroupLimits, PushLimits};
use replisync::startup::App;
use serde_json::{Value, json};

use crate::group_commit::{Gate, wait_for_none_waiting};
use crate::harness::{Backend, TestServer, push_body};
use crate::js_mutators::{TokenIsUser, failures, run, test_limits};

fn engine_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/engine_mutators.js")
}

/// One engine, so that every push meets what the earlier ones left in it.
fn one_engine(timeout: Duration) -> JsLimits {
    JsLimits {
        timeout,
        engines: 1,
        ..test_limits()
    }
}

/// A server running tests/fixtures/engine_mutators.js (and the built-in mutators, and `gate`).
async fn engine_server(backend: Backend, limits: JsLimits, gate: &Gate) -> TestServer {
    let js = JsMutators::load(&engine_fixture(), limits).expect("the fixture loads");
    let mutators = js.register(Mutators::builtin().register("gate", gate.clone()));
    let push = PushLimits {
        // Only the size limit splits groups, however slow the machine.
        group: GroupLimits {
            max_pushes: 64,
            max_age: Duration::from_secs(20),
        },
        time_budget: Some(Duration::from_secs(20)),
        ..PushLimits::default()
    };
    let options = App::builder()
        .mutators(mutators)
        .authenticator(Arc::new(TokenIsUser))
        .push(push);
    TestServer::start_with(backend, options).await
}

/// A mutation failed by what its own code did: threw, ran out of time or of memory.
async fn script_failures(server: &TestServer) -> [u64; 3] {
    [
        failures(server, "threw").await,
        failures(server, "timeout").await,
        failures(server, "memory").await,
    ]
}

/// A job a mutation left queued when it threw is dropped with its runtime when the push ends:
/// it never runs in the next push to the space (another user's, on the same engine), where it
/// would write through that push's `tx`; and the space's next push gets a fresh context.
async fn a_job_left_queued_never_runs_in_the_next_push(backend: Backend) {
    let server = engine_server(
        backend,
        one_engine(Duration::from_secs(5)),
        &Gate::default(),
    )
    .await;
    let alice = push_body(
        "g-alice",
        &[
            ("c-alice", 1, "setValue", json!({"key": "a", "value": 1})),
            ("c-alice", 2, "leavesJobAndThrows", json!({"key": "stale"})),
        ],
    );
    assert_eq!(server.push_as("s", &alice, "alice").await, (200, json!({})));
    assert_eq!(script_failures(&server).await, [1, 0, 0]);

    let bob = push_body(
        "g-bob",
        &[
            ("c-bob", 1, "setValue", json!({"key": "b", "value": 2})),
            ("c-bob", 2, "probeCalls", json!({"into": "calls"})),
        ],
    );
    assert_eq!(server.push_as("s", &bob, "bob").await, (200, json!({})));
    let view = server.state_as("s", "g-bob", "bob").await;
    assert_eq!(
        Value::Object(view.entries.clone()),
        json!({"a": 1, "b": 2, "calls": 2}),
        "the job alice's push left never ran in bob's, and bob's push ran in a fresh context"
    );
    assert_eq!(view.lmid("c-bob"), 2);
    assert_eq!(script_failures(&server).await, [1, 0, 0]);
}

/// A mutation awaiting a promise nothing can resolve fails at once, as having thrown (no job is
/// left that could settle it); one that keeps the job queue busy meanwhile is stopped at the
/// time limit. Each push is answered, its later mutations applied, and the engine serves on.
async fn a_promise_that_never_settles_fails_its_mutation(backend: Backend) {
    let server = engine_server(
        backend,
        one_engine(Duration::from_secs(1)),
        &Gate::default(),
    )
    .await;
    let idle = [
        ("neverSettles", json!({"key": "idle"})),
        ("setValue", json!({"key": "after-idle", "value": 1})),
    ];
    let entries = answered_in_time(run(&server, "s", 1, &idle)).await;
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["after-idle"]);
    assert_eq!(
        script_failures(&server).await,
        [1, 0, 0],
        "threw, not timed out"
    );

    let busy = [
        ("neverSettlesBusily", json!({"key": "busy"})),
        ("setValue", json!({"key": "after-busy", "value": 2})),
    ];
    let entries = answered_in_time(run(&server, "s", 3, &busy)).await;
    assert_eq!(
        entries.keys().collect::<Vec<_>>(),
        ["after-busy", "after-idle"]
    );
    assert_eq!(
        script_failures(&server).await,
        [1, 1, 0],
        "stopped by the clock"
    );
    assert_eq!(server.state("s", "g-s").await.lmid("c-s"), 4);

    let next = [("setValue", json!({"key": "next", "value": 3}))];
    let entries = answered_in_time(run(&server, "t", 1, &next)).await;
    assert_eq!(Value::Object(entries), json!({"next": 3}));
}

/// `future`'s output, which must come within 20 s (the mutation time limit is 1 s).
async fn answered_in_time<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future)
        .await
        .expect("the push is answered within its time limits")
}

/// Writes a mutator starts without awaiting them belong to its mutation: a `tx.set` not
/// awaited, a write chained on a read, a write in a job of a mutator that returns nothing are
/// all applied; a write that fails unawaited is refused (nothing written for it) without failing
/// the mutation, as its rejection is handled by no one.
async fn writes_not_awaited_belong_to_their_mutation(backend: Backend) {
    let server = engine_server(
        backend,
        one_engine(Duration::from_secs(5)),
        &Gate::default(),
    )
    .await;
    let entries = run(
        &server,
        "s",
        1,
        &[
            ("setValue", json!({"key": "source", "value": "v"})),
            ("setsWithoutAwait", json!({"key": "plain"})),
            (
                "copiesWithoutAwait",
                json!({"from": "source", "key": "chained"}),
            ),
            ("queuesWrite", json!({"key": "queued"})),
            ("failsWithoutAwait", json!({"key": "failing"})),
        ],
    )
    .await;
    assert_eq!(
        Value::Object(entries),
        json!({
            "source": "v",
            "plain": "not awaited",
            "chained": {"copied": "v"},
            "queued": "written by a job",
            "failing": "awaited",
        })
    );
    assert_eq!(script_failures(&server).await, [0, 0, 0]);
    assert_eq!(server.state("s", "g-s").await.lmid("c-s"), 5);
}

crate::on_both_stores!(
    a_job_left_queued_never_runs_in_the_next_push,
    a_promise_that_never_settles_fails_its_mutation,
    writes_not_awaited_belong_to_their_mutation,
    a_module_that_cannot_load_for_a_while_fails_pushes_then_recovers,
    a_module_too_slow_to_load_for_a_while_fails_pushes_then_recovers,
    a_module_that_throws_for_a_while_is_loaded_again_after,
    js_pushes_in_one_group_each_get_their_own_answer,
);

/// A module source whose top-level `statement` runs only while the clock is in a window (the
/// one thing the test can make the module see) that opens in 1 s and closes 6 s later; and the
/// instant it opens.
fn module_with_window(statement: &str) -> (String, tokio::time::Instant) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let opens = tokio::time::Instant::now() + Duration::from_millis(1200);
    let (from, until) = (now_ms + 1000, now_ms + 7000);
    let source = format!(
        "const now = Date.now();\n\
         if (now > {from} && now < {until}) {{ {statement}; }}\n\
         export const mutators = {{\n  async setValue(tx, {{key, value}}) {{ await tx.set(key, value); }},\n}};\n"
    );
    (source, opens)
}

/// A server running `source` (loaded now) on one engine.
async fn server_running(backend: Backend, source: String) -> TestServer {
    let limits = one_engine(Duration::from_secs(5));
    let js = JsMutators::from_source("window.js", source, limits).expect("it loads at first");
    let options = App::builder()
        .mutators(js.register(Mutators::builtin()))
        .authenticator(Arc::new(TokenIsUser));
    TestServer::start_with(backend, options).await
}

/// A module whose top-level code needs more memory than the engine may hold during a window:
/// while no context can be made, a push fails whole (503, nothing written, not processed); once
/// it can, the engine (renewed) applies the same push, once.
async fn a_module_that_cannot_load_for_a_while_fails_pushes_then_recovers(backend: Backend) {
    let hogs = "globalThis.hog = new Float64Array(4 * 1024 * 1024)";
    pushes_fail_whole_while_the_module_cannot_load(backend, hogs, Duration::from_secs(5)).await;
}

/// A module whose top-level code runs past the time limit during a window (as on a machine too
/// loaded to load it in time): the push fails whole, as when memory is short, instead of its
/// mutations failing as timeouts and counting as processed (the client would not send them
/// again).
async fn a_module_too_slow_to_load_for_a_while_fails_pushes_then_recovers(backend: Backend) {
    let spins = "for (;;) {}";
    pushes_fail_whole_while_the_module_cannot_load(backend, spins, Duration::from_millis(300))
        .await;
}

/// Runs a server whose module runs `statement` at its top level during a window, and asserts
/// that a push in the window fails whole (503, nothing written, not processed) and the same
/// push is applied once the window has closed.
async fn pushes_fail_whole_while_the_module_cannot_load(
    backend: Backend,
    statement: &str,
    timeout: Duration,
) {
    let (source, window_opens) = module_with_window(statement);
    let limits = one_engine(timeout);
    let js = JsMutators::from_source("window.js", source, limits).expect("it loads at first");
    let options = App::builder()
        .mutators(js.register(Mutators::builtin()))
        .authenticator(Arc::new(TokenIsUser));
    let server = TestServer::start_with(backend, options).await;
    let body = push_body(
        "g-s",
        &[("c-s", 1, "setValue", json!({"key": "k", "value": 1}))],
    );
    // The window is the behaviour under test: the module's own clock decides when it fails.
    tokio::time::sleep_until(window_opens).await;
    let (status, answer) = server.push("s", &body).await;
    assert_eq!(
        (status, answer),
        (
            503,
            json!({"error": "Unavailable", "message": "the server could not run the push's JavaScript mutators; nothing was written, retry later"})
        )
    );
    let state = server.state("s", "g-s").await;
    assert!(state.entries.is_empty() && state.last_mutation_ids.is_empty());

    // The client sends the push again until it is applied; the window closes within 7 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, answer) = server.push("s", &body).await;
        if status == 200 {
            assert_eq!(answer, json!({}));
            break;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(Instant::now() < deadline, "the engine never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = server.state("s", "g-s").await;
    assert_eq!(Value::Object(state.entries.clone()), json!({"k": 1}));
    assert_eq!(state.lmid("c-s"), 1);
    assert_eq!(script_failures(&server).await, [0, 0, 0]);
}

/// A module whose top-level code throws during a window: the space's mutations fail as thrown
/// (the module's own doing) while it does; once it loads again, the space's next push applies,
/// although the engine served that space last (a context that failed to load is not kept).
async fn a_module_that_throws_for_a_while_is_loaded_again_after(backend: Backend) {
    let (source, window_opens) = module_with_window("throw new Error('not now')");
    let server = server_running(backend, source).await;
    // The window is the behaviour under test: the module's own clock decides when it throws.
    tokio::time::sleep_until(window_opens).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut id = 0;
    let entries = loop {
        id += 1;
        let set = json!({"key": "k", "value": id});
        let body = push_body("g-s", &[("c-s", id, "setValue", set)]);
        assert_eq!(server.push("s", &body).await, (200, json!({})));
        let state = server.state("s", "g-s").await;
        assert_eq!(state.lmid("c-s"), id, "every mutation is processed");
        if !state.entries.is_empty() {
            break state.entries;
        }
        assert!(Instant::now() < deadline, "the module never loaded again");
        // A client's next mutation, a moment later.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(id > 1, "the first push came while the module threw");
    assert_eq!(Value::Object(entries), json!({"k": id}));
    assert_eq!(script_failures(&server).await, [id - 1, 0, 0]);
}

/// Pushes of JavaScript mutations queued behind a held push are applied in one group, one
/// engine session after another: each push gets its own answer (a mutation that throws or
/// times out fails alone, a refused push writes nothing), each sees the writes of the pushes
/// before it, and the entries are exactly what they wrote.
async fn js_pushes_in_one_group_each_get_their_own_answer(backend: Backend) {
    let gate = Gate::default();
    let server =
        Arc::new(engine_server(backend, one_engine(Duration::from_millis(500)), &gate).await);
    let held = gate.hold(&server, "s").await;
    let groups_before = server.metrics.push_groups.get();
    let inc = |delta: i64| json!({"key": "n", "delta": delta});
    let bodies = vec![
        push_body("g1", &[("c1", 1, "increment", inc(1))]),
        // Its throw leaves a job queued: the runtime is renewed before the next push.
        push_body(
            "g2",
            &[
                ("c2", 1, "increment", inc(10)),
                ("c2", 2, "leavesJobAndThrows", json!({"key": "stale"})),
            ],
        ),
        push_body(
            "g3",
            &[
                ("c3", 1, "neverSettlesBusily", json!({"key": "busy"})),
                ("c3", 2, "increment", inc(100)),
            ],
        ),
        // An unknown client past its first mutation: ClientStateNotFound, nothing run.
        push_body("g4", &[("c4", 5, "increment", inc(1000))]),
        push_body(
            "g1",
            &[
                ("c1", 2, "probeCalls", json!({"into": "calls"})),
                ("c1", 3, "setValue", json!({"key": "last", "value": "end"})),
            ],
        ),
    ];
    let sent = gate.queue(&server, "s", bodies).await;
    gate.open.add_permits(1);
    assert_eq!(held.await.unwrap(), (200, json!({})));
    let mut answers = Vec::new();
    for push in sent {
        answers.push(push.await.unwrap());
    }
    assert_eq!(
        answers,
        vec![
            (200, json!({})),
            (200, json!({})),
            (200, json!({})),
            (200, json!({"error": "ClientStateNotFound"})),
            (200, json!({})),
        ]
    );
    wait_for_none_waiting(&server).await;
    assert_eq!(
        server.metrics.push_groups.get() - groups_before,
        2,
        "the gate's group, then one for the five pushes"
    );
    let view = server.state("s", "g1").await;
    // n: 1 + 10 + 100, each increment reading the one before. The timed-out mutation left its
    // context behind, so g1's second push ran in a fresh one: its probe is that context's first
    // mutation (after g3's increment, its second).
    assert_eq!(
        Value::Object(view.entries.clone()),
        json!({"n": 111, "calls": 2, "last": "end"})
    );
    assert_eq!(view.lmid("c1"), 3);
    for (group, client, lmid) in [("g2", "c2", 2), ("g3", "c3", 2), ("g4", "c4", 0)] {
        assert_eq!(server.state("s", group).await.lmid(client), lmid, "{group}");
    }
    assert_eq!(script_failures(&server).await, [1, 1, 0]);
}
