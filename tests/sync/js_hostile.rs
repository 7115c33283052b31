//! Hostile JavaScript mutators (issue 21): what one push's code does to an engine never costs
//! another push its writes, and what a push's mutators write is bounded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use replisync::http::settings::HttpSettings;
use replisync::mutators::Mutators;
use replisync::mutators::js::{JsLimits, JsMutators};
use replisync::push::settings::PushLimits;
use replisync::startup::App;
use serde_json::{Value, json};

use crate::harness::{Backend, TestServer, push_body};
use crate::js_mutators::{
    TokenIsUser, failures, fixture, js_server_with, metric, run, test_limits,
};

/// One engine, so that every push meets what the earlier ones left in it.
fn one_engine() -> JsLimits {
    JsLimits {
        engines: 1,
        ..test_limits()
    }
}

/// Arguments of about `bytes` of JSON: an array of one-element arrays, which takes far more
/// engine memory than its text.
fn huge_arguments(bytes: usize) -> Value {
    json!({"key": "big", "value": vec![[0]; bytes / 4]})
}

/// Mutations failed over the push write limit, JavaScript and built-in together.
async fn write_limit_failures(server: &TestServer) -> u64 {
    let series = |kind| {
        format!("replisync_mutations_failed_total{{kind=\"{kind}\",reason=\"write_limit\"}}")
    };
    metric(server, &series("javascript")).await + metric(server, &series("builtin")).await
}

/// After a push whose arguments exhaust the engine's memory, the engine still runs every later
/// push: 3,000 pushes to distinct spaces (each a context of its own) are all applied. Parsing
/// megabytes of arguments takes seconds on a loaded machine: the push's time budget is set far
/// above that (the default, a third of the request timeout, left the second mutation for a
/// later push: 503 PartiallyApplied).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_arguments_leave_the_engine_serving() {
    let write_limit = PushLimits::default().max_write_bytes;
    let server =
        Arc::new(server_with_write_limit(Backend::Postgres, one_engine(), write_limit).await);
    let body = push_body(
        "g-huge",
        &[
            ("c-huge", 1, "setValue", huge_arguments(9_000_000)),
            ("c-huge", 2, "setValue", json!({"key": "after", "value": 1})),
        ],
    );
    let (status, answer) = server.push("huge", &body).await;
    assert_eq!((status, answer), (200, json!({})));
    assert_eq!(failures(&server, "memory").await, 1);
    let entries = server.state("huge", "g-huge").await.entries;
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["after"]);

    const SPACES: usize = 3000;
    let statuses: Vec<u16> = futures::stream::iter(0..SPACES)
        .map(|n| {
            let server = server.clone();
            async move {
                let (space, group, client) = (format!("s{n}"), format!("g{n}"), format!("c{n}"));
                let args = json!({"key": "k", "value": n});
                let body = push_body(&group, &[(client.as_str(), 1, "setValue", args)]);
                server.push(&space, &body).await.0
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every push answered 200"
    );
    let applied = server
        .db
        .scalar("SELECT count(*) FROM replisync_entries WHERE key = 'k' AND NOT deleted")
        .await;
    assert_eq!(applied, Some(SPACES as i64), "every push's write is stored");
    assert_eq!(failures(&server, "memory").await, 1, "no other push failed");
    assert_eq!(failures(&server, "threw").await, 0);
}

/// A space whose module state holds most of the engine's memory, or tries to hold more than
/// it may, does not stop another space's push: only the hog's own mutation fails.
async fn module_state_hog_does_not_fail_another_space(backend: Backend) {
    let server = js_server_with(backend, one_engine()).await;
    let hoard = |kibibytes: usize| ("hoardsGlobally", json!({"kibibytes": kibibytes}));
    run(&server, "a", 1, &[hoard(15 * 1024)]).await;
    assert_eq!(failures(&server, "memory").await, 0, "15 of 16 MiB fit");
    let entries = run(
        &server,
        "b",
        1,
        &[("setValue", json!({"key": "k", "value": 1}))],
    )
    .await;
    assert_eq!(entries["k"], json!(1));

    run(&server, "a", 2, &[hoard(20 * 1024)]).await;
    assert_eq!(failures(&server, "memory").await, 1, "20 of 16 MiB do not");
    let entries = run(
        &server,
        "c",
        1,
        &[("setValue", json!({"key": "k", "value": 2}))],
    )
    .await;
    assert_eq!(entries["k"], json!(2));
    assert_eq!(failures(&server, "memory").await, 1);
    assert_eq!(failures(&server, "threw").await, 0);
}

/// A thrown value whose description loops (a `message` getter, a `toJSON`) fails its mutation
/// within the time limit, and the engine serves the next push.
async fn looping_description_fails_in_time(backend: Backend) {
    let server = js_server_with(backend, one_engine()).await;
    let started = Instant::now();
    let pushed = tokio::time::timeout(
        Duration::from_secs(10),
        run(
            &server,
            "s",
            1,
            &[
                ("throwsLoopingMessage", json!({"how": "error"})),
                ("throwsLoopingMessage", json!({"how": "object"})),
                ("setValue", json!({"key": "after", "value": 1})),
            ],
        ),
    )
    .await;
    let entries = pushed.expect("the push is answered within the time limits");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["after"]);
    assert_eq!(failures(&server, "timeout").await, 2);
    let next = tokio::time::timeout(
        Duration::from_secs(10),
        run(
            &server,
            "t",
            1,
            &[("setValue", json!({"key": "k", "value": 2}))],
        ),
    )
    .await
    .expect("the engine serves the next push");
    assert_eq!(next["k"], json!(2));
}

/// A `tx` a mutator kept throws when used after its mutation, even during another user's push
/// to the space, and writes nothing.
async fn kept_tx_throws_later(backend: Backend) {
    let server = js_server_with(backend, one_engine()).await;
    let keep = push_body("g-alice", &[("c-alice", 1, "keepsTx", json!({}))]);
    assert_eq!(server.push_as("s", &keep, "alice").await.0, 200);
    let args = json!({"key": "stolen", "into": "out"});
    let reuse = push_body("g-bob", &[("c-bob", 1, "usesKeptTx", args)]);
    assert_eq!(server.push_as("s", &reuse, "bob").await.0, 200);
    let entries = server.state_as("s", "g-bob", "bob").await.entries;
    assert!(!entries.contains_key("stolen"), "the kept tx wrote nothing");
    let outcome = entries["out"].as_str().unwrap();
    assert!(outcome.contains("mutation that has ended"), "{outcome}");
}

/// A mutator that catches the out-of-memory error still fails, with reason memory, and what it
/// wrote (before and after) is discarded; the push's next mutation runs.
async fn caught_out_of_memory_still_fails(backend: Backend) {
    let limits = JsLimits {
        timeout: Duration::from_secs(20), // the memory limit, not the clock, must stop it
        ..one_engine()
    };
    let server = js_server_with(backend, limits).await;
    let entries = run(
        &server,
        "s",
        1,
        &[
            ("catchesOutOfMemory", json!({"key": "k"})),
            ("setValue", json!({"key": "after", "value": 1})),
        ],
    )
    .await;
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["after"]);
    assert_eq!(failures(&server, "memory").await, 1);
    assert_eq!(failures(&server, "threw").await, 0);
}

/// A server with JavaScript mutators and a push write limit of `max_write_bytes`.
async fn server_with_write_limit(
    backend: Backend,
    limits: JsLimits,
    max_write_bytes: usize,
) -> TestServer {
    let js = JsMutators::load(&fixture(), limits).expect("the fixture loads");
    // Megabytes of writes take a while in a debug build on a busy machine: no partial pushes.
    let http = HttpSettings {
        request_timeout: Duration::from_secs(120),
        ..HttpSettings::default()
    };
    let push = PushLimits {
        max_write_bytes,
        time_budget: Some(Duration::from_secs(100)),
        ..PushLimits::default()
    };
    let options = App::builder()
        .mutators(js.register(Mutators::builtin()))
        .authenticator(Arc::new(TokenIsUser))
        .http(http)
        .push(push);
    TestServer::start_with(backend, options).await
}

/// Twelve mutations each writing a 16 MB string, from a tiny push: the push is answered 200,
/// the mutations that would take the push past REPLISYNC_MAX_PUSH_WRITE_BYTES (64 MiB by
/// default) fail, and at most the limit is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_js_writes_stop_at_the_push_limit() {
    const LIMIT: usize = 64 * 1024 * 1024;
    let limits = JsLimits {
        timeout: Duration::from_secs(20),
        memory_bytes: 64 * 1024 * 1024,
        engines: 1,
        ..JsLimits::default()
    };
    let server = server_with_write_limit(Backend::Postgres, limits, LIMIT).await;
    let mutations: Vec<(&str, u64, &str, Value)> = (0..12)
        .map(|n| {
            let args = json!({"key": format!("big/{n:02}"), "bytes": 16_000_000});
            ("c-s", n + 1, "writesLarge", args)
        })
        .collect();
    let body = push_body("g-s", &mutations);
    let (status, answer) = server.push("s", &body).await;
    assert_eq!((status, answer), (200, json!({})));
    let written = server
        .db
        .scalar(
            "SELECT coalesce(sum(length(key) + length(value)), 0)::bigint FROM replisync_entries",
        )
        .await
        .unwrap();
    assert!(written as usize <= LIMIT, "{written} bytes written");
    let stored = server
        .db
        .scalar("SELECT count(*) FROM replisync_entries")
        .await
        .unwrap();
    assert_eq!(stored, 4, "the first four fit in 64 MiB");
    assert_eq!(
        server.state("s", "g-s").await.lmid("c-s"),
        12,
        "all count as processed"
    );
    assert_eq!(write_limit_failures(&server).await, 8);
}

/// Built-in mutators are bounded alike; a mutation that goes past the limit fails even if its
/// code catches the error, and smaller writes after it still fit.
async fn writes_past_the_limit_fail_their_mutation(backend: Backend) {
    let server = server_with_write_limit(backend, one_engine(), 1000).await;
    let text = "x".repeat(400);
    let entries = run(
        &server,
        "s",
        1,
        &[
            ("set", json!({"key": "a", "value": text})),
            ("set", json!({"key": "b", "value": text})),
            ("set", json!({"key": "c", "value": text})),
            ("writesLargeAndCatches", json!({"key": "js", "bytes": 2000})),
            ("set", json!({"key": "d", "value": "y"})),
        ],
    )
    .await;
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["a", "b", "d"]);
    assert_eq!(write_limit_failures(&server).await, 2);
    assert_eq!(server.state("s", "g-s").await.lmid("c-s"), 5);
}

crate::on_both_stores!(
    module_state_hog_does_not_fail_another_space,
    looping_description_fails_in_time,
    kept_tx_throws_later,
    caught_out_of_memory_still_fails,
    writes_past_the_limit_fail_their_mutation,
    an_engine_that_cannot_serve_fails_the_push,
);

/// When no engine can load the module for a push (here: the module's top-level code starts
/// needing more than the engine may hold, after start-up), the push fails as the server's
/// fault: 503, nothing written, the mutation not counted as processed, so the client sends it
/// again.
async fn an_engine_that_cannot_serve_fails_the_push(backend: Backend) {
    let from = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 1000;
    let source = format!(
        "const hog = Date.now() > {from} ? new Float64Array(4 * 1024 * 1024) : null;\n\
         export const mutators = {{\n  async setValue(tx, {{key, value}}) {{ await tx.set(key, value); }},\n}};\n"
    );
    let js = JsMutators::from_source("grows.js", source, one_engine()).expect("it loads at first");
    let options = App::builder()
        .mutators(js.register(Mutators::builtin()))
        .authenticator(Arc::new(TokenIsUser));
    let server = TestServer::start_with(backend, options).await;
    // Past `from` (the clock is the module's condition): a new context cannot load it now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let body = push_body(
        "g-s",
        &[("c-s", 1, "setValue", json!({"key": "k", "value": 1}))],
    );
    let (status, answer) = server.push("s", &body).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"], json!("Unavailable"));
    let state = server.state("s", "g-s").await;
    assert!(state.entries.is_empty(), "nothing written");
    assert!(
        state.last_mutation_ids.is_empty(),
        "the mutation is not processed"
    );
    assert_eq!(failures(&server, "memory").await, 0);
}
