//! The server API (REPLISYNC_SERVICE_TOKEN): refused without the service token (an end user's
//! token included) and off by default; a call's mutations apply all or nothing, once per
//! idempotency key (also when retried concurrently), are poked, and reach pulling clients;
//! reads page through one snapshot of a space.

use std::sync::Arc;

use futures::future::join_all;
use replisync::push::settings::PushLimits;
use replisync::server_api::{ServerApi, ServiceToken};
use replisync::startup::{App, AppBuilder};
use serde_json::{Value, json};

use crate::auth::{claims, hmac_options, token};
use crate::harness::{Backend, PokeRecorder, TestServer, inc, push_body};
use crate::js_mutators::{fixture, metric, test_limits};

pub(crate) const SERVICE_TOKEN: &str = "service-token-0123456789abcdef0123456789";

pub(crate) fn bearer() -> String {
    format!("Bearer {SERVICE_TOKEN}")
}

fn with_api(app: AppBuilder) -> AppBuilder {
    app.server_api(ServerApi::with_token(ServiceToken::new(SERVICE_TOKEN)))
}

/// POSTs a call to `space` as the service; the status and body.
pub(crate) async fn call(
    server: &TestServer,
    space: &str,
    key: &str,
    mutations: Value,
) -> (u16, Value) {
    let body = json!({"idempotencyKey": key, "mutations": mutations});
    server
        .post_raw(
            &format!("/api/spaces/{space}/mutations"),
            body.to_string(),
            &bearer(),
        )
        .await
}

/// GETs `path` with `auth`; the status and body.
async fn get_as(server: &TestServer, path: &str, auth: &str) -> (u16, Value) {
    let response = server
        .http
        .get(server.url(path))
        .header("authorization", auth)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn increment(key: &str, delta: i64) -> Value {
    json!({"name": "increment", "args": inc(key, delta)})
}

fn set(key: &str, value: Value) -> Value {
    json!({"name": "set", "args": {"key": key, "value": value}})
}

async fn calls_without_the_service_token_are_refused_and_change_nothing(backend: Backend) {
    let server = TestServer::start_with(backend, with_api(hmac_options())).await;
    let user = token(&claims("alice", &["doc"]));
    // The end user's token works where it belongs.
    let push = push_body("g", &[("c", 1, "increment", inc("n", 1))]);
    assert_eq!(server.push_as("doc", &push, &user).await.0, 200);
    let before = server.db.fingerprint().await;
    let body = json!({"idempotencyKey": "k", "mutations": [increment("n", 5)]}).to_string();
    let wrong = format!("Bearer {}x", SERVICE_TOKEN);
    for auth in ["", user.as_str(), wrong.as_str(), SERVICE_TOKEN] {
        let (status, answer) = server
            .post_raw("/api/spaces/doc/mutations", body.clone(), auth)
            .await;
        assert_eq!(status, 401, "{auth:?}: {answer}");
        assert_eq!(answer["error"], "Unauthorized");
        for path in ["/api/spaces/doc/entries", "/api/spaces/doc/entry?key=n"] {
            let (status, answer) = get_as(&server, path, auth).await;
            assert_eq!(status, 401, "{path} {auth:?}: {answer}");
        }
    }
    // Nor is the service token an end user's: push and pull refuse it.
    assert_eq!(server.push_as("doc", &push, &bearer()).await.0, 401);
    assert_eq!(server.db.fingerprint().await, before);

    // Off by default: 404, whatever the token.
    let off = TestServer::start(backend).await;
    let (status, answer) = call(&off, "doc", "k", json!([increment("n", 1)])).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (404, Some("ServerApiOff"))
    );
    let (status, _) = get_as(&off, "/api/spaces/doc/entries", &bearer()).await;
    assert_eq!(status, 404);
}

async fn an_idempotency_key_applied_twice_commits_once(backend: Backend) {
    let pokes = Arc::new(PokeRecorder::default());
    let app = with_api(App::builder()).poke_sink(pokes.clone());
    let server = Arc::new(TestServer::start_with(backend, app).await);
    let first = call(
        &server,
        "doc",
        "evt-1",
        json!([increment("n", 5), set("last", json!("evt-1"))]),
    )
    .await;
    assert_eq!(first, (200, json!({"status": "committed", "version": 1})));
    assert!(
        pokes
            .wait_for("doc", 1, std::time::Duration::from_secs(10))
            .await
    );
    let again = call(
        &server,
        "doc",
        "evt-1",
        json!([increment("n", 5), set("last", json!("evt-1"))]),
    )
    .await;
    assert_eq!(again, (200, json!({"status": "alreadyApplied"})));
    // A key names one call: sent again with more (or other) mutations, nothing of it applies.
    let longer = call(
        &server,
        "doc",
        "evt-1",
        json!([
            increment("n", 5),
            set("last", json!("evt-1")),
            increment("n", 100)
        ]),
    )
    .await;
    assert_eq!(longer, (200, json!({"status": "alreadyApplied"})));

    // Ten concurrent retries of a new key: one commits, the others find it applied.
    let answers = join_all((0..10).map(|_| {
        let server = server.clone();
        async move { call(&server, "doc", "evt-2", json!([increment("n", 1)])).await }
    }))
    .await;
    let committed = answers
        .iter()
        .filter(|(_, a)| a["status"] == "committed")
        .count();
    let replayed = answers
        .iter()
        .filter(|(_, a)| a["status"] == "alreadyApplied")
        .count();
    assert_eq!((committed, replayed), (1, 9), "{answers:?}");

    // The same key in another space is another call.
    let other = call(&server, "other", "evt-1", json!([increment("n", 1)])).await;
    assert_eq!(other.1["status"], "committed");

    // A client pulling the space sees each call once, at the version the call answered.
    let view = server.state("doc", "reader").await;
    assert_eq!(view.entries["n"], 6);
    assert_eq!(view.entries["last"], "evt-1");
    assert_eq!(view.cookie, 2);
    assert_eq!(
        metric(&server, "replisync_server_api_commits_total").await,
        3
    );
    assert_eq!(
        metric(&server, "replisync_server_api_replays_total").await,
        11
    );
}

async fn a_failing_mutation_applies_none_of_the_call(backend: Backend) {
    let limits = PushLimits {
        max_mutations: 3,
        ..PushLimits::default()
    };
    let server = TestServer::start_with(backend, with_api(App::builder()).push(limits)).await;
    assert_eq!(
        call(&server, "doc", "seed", json!([set("a", json!(1))]))
            .await
            .0,
        200
    );
    let before = server.db.fingerprint().await;
    let (status, answer) = call(
        &server,
        "doc",
        "evt",
        json!([set("a", json!(2)), {"name": "no-such-mutator"}, set("b", json!(3))]),
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(
        (
            &answer["error"],
            &answer["index"],
            &answer["name"],
            &answer["reason"]
        ),
        (
            &json!("MutationFailed"),
            &json!(1),
            &json!("no-such-mutator"),
            &json!("rejected")
        )
    );
    let (status, answer) = call(
        &server,
        "doc",
        "evt",
        json!([
            increment("a", 1),
            increment("a", 1),
            increment("a", 1),
            increment("a", 1)
        ]),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (413, Some("TooManyMutations"))
    );
    for (body, problem) in [
        (
            json!({"idempotencyKey": "", "mutations": [set("a", json!(1))]}),
            "idempotencyKey",
        ),
        (json!({"idempotencyKey": "k", "mutations": []}), "empty"),
        (
            json!({"idempotencyKey": "k", "mutations": [set("a", json!(1))], "extra": 1}),
            "extra",
        ),
        (json!({"mutations": [set("a", json!(1))]}), "idempotencyKey"),
    ] {
        let (status, answer) = server
            .post_raw("/api/spaces/doc/mutations", body.to_string(), &bearer())
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(problem),
            "{answer}"
        );
    }
    let (status, _) = call(&server, "bad space!", "k", json!([set("a", json!(1))])).await;
    assert_eq!(status, 400);
    assert_eq!(
        server.db.fingerprint().await,
        before,
        "nothing of a refused call is written"
    );

    // The failed call's key was not used up: sent again, fixed, it applies.
    let fixed = call(
        &server,
        "doc",
        "evt",
        json!([set("a", json!(2)), set("b", json!(3))]),
    )
    .await;
    assert_eq!(fixed, (200, json!({"status": "committed", "version": 2})));
    let view = server.state("doc", "reader").await;
    assert_eq!(
        (&view.entries["a"], &view.entries["b"]),
        (&json!(2), &json!(3))
    );
}

async fn calls_and_client_pushes_to_one_space_all_count(backend: Backend) {
    let server = Arc::new(TestServer::start_with(backend, with_api(App::builder())).await);
    let pushes = (0..8).map(|client| {
        let server = server.clone();
        async move {
            for id in 1..=5 {
                let group = format!("g{client}");
                let name = format!("c{client}");
                let body = push_body(&group, &[(&name, id, "increment", inc("n", 1))]);
                assert_eq!(server.push("doc", &body).await, (200, json!({})));
            }
        }
    });
    let calls = (0..8).map(|caller| {
        let server = server.clone();
        async move {
            for n in 0..5 {
                let key = format!("job-{caller}-{n}");
                let (status, answer) =
                    call(&server, "doc", &key, json!([increment("n", 10)])).await;
                assert_eq!(status, 200, "{answer}");
            }
        }
    });
    futures::join!(join_all(pushes), join_all(calls));
    let view = server.state("doc", "reader").await;
    assert_eq!(view.entries["n"], 8 * 5 + 8 * 5 * 10);
    assert_eq!(
        view.cookie, 80,
        "each push and each call moved the space one version"
    );
}

async fn an_end_user_cannot_take_the_servers_client_group(backend: Backend) {
    let server = TestServer::start_with(backend, with_api(hmac_options())).await;
    let service = ServiceToken::new(SERVICE_TOKEN);
    let space = replisync::protocol::SpaceId::parse("doc").unwrap();
    let call_body: replisync::server_api::MutationCall = serde_json::from_value(
        json!({"idempotencyKey": "evt-9", "mutations": [increment("n", 1)]}),
    )
    .unwrap();
    let group = service.push_request(&space, call_body).client_group_id;
    assert_eq!(
        call(&server, "doc", "evt-9", json!([increment("n", 1)]))
            .await
            .0,
        200
    );
    let mallory = token(&claims("mallory", &["doc"]));
    let push = push_body(&group, &[(&group, 2, "increment", inc("n", 100))]);
    let (status, answer) = server.push_as("doc", &push, &mallory).await;
    assert_eq!(status, 403, "{answer}");
    // Nor may a token name the server as its user.
    let forged = token(&claims("replisync:server", &["doc"]));
    let (status, answer) = server.push_as("doc", &push, &forged).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = get_as(&server, "/api/spaces/doc/entry?key=n", &bearer()).await;
    assert_eq!((status, &answer["value"]), (200, &json!(1)));
}

async fn reads_page_through_a_space_from_one_snapshot(backend: Backend) {
    let server = TestServer::start_with(backend, with_api(App::builder())).await;
    let todos: Vec<Value> = (0..25)
        .map(|i| set(&format!("todo/{i:02}"), json!({"title": format!("t{i}")})))
        .collect();
    assert_eq!(
        call(&server, "doc", "fill", Value::Array(todos)).await.0,
        200
    );
    let others = json!([set("a", json!(true)), set("user/x", json!(1))]);
    assert_eq!(call(&server, "doc", "others", others).await.0, 200);
    let mut keys = Vec::new();
    let mut path = "/api/spaces/doc/entries?prefix=todo/&limit=10".to_owned();
    for page in 0.. {
        assert!(page < 5, "pages never end");
        let (status, answer) = get_as(&server, &path, &bearer()).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["version"], 2);
        for entry in answer["entries"].as_array().unwrap() {
            keys.push(entry["key"].as_str().unwrap().to_owned());
        }
        let Some(next) = answer["next"].as_str() else {
            break;
        };
        path = format!("/api/spaces/doc/entries?prefix=todo/&limit=10&start={next}");
    }
    let expected: Vec<String> = (0..25).map(|i| format!("todo/{i:02}")).collect();
    assert_eq!(keys, expected);

    let (status, answer) = get_as(&server, "/api/spaces/doc/entry?key=todo/07", &bearer()).await;
    assert_eq!(status, 200);
    assert_eq!(
        answer,
        json!({"space": "doc", "version": 2, "key": "todo/07", "value": {"title": "t7"}})
    );
    let (status, answer) = get_as(&server, "/api/spaces/doc/entry?key=todo/7", &bearer()).await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("NoSuchKey")));
    let (status, answer) = get_as(&server, "/api/spaces/empty/entries", &bearer()).await;
    assert_eq!(
        (status, &answer["version"], &answer["entries"]),
        (200, &json!(0), &json!([]))
    );
    for bad in [
        "/api/spaces/doc/entries?limit=0",
        "/api/spaces/doc/entries?limit=1001",
        "/api/spaces/doc/entries?limit=x",
        "/api/spaces/doc/entries?other=1",
        "/api/spaces/doc/entries?start=%00",
        "/api/spaces/doc/entries?prefix=a%00",
        "/api/spaces/doc/entry?key=%00",
        "/api/spaces/doc/entry",
        "/api/spaces/bad%20space/entries",
        "/api/spaces/%FF/entries",
        "/api/spaces/doc/entries?prefix=%FF",
        "/api/spaces/doc/entry?key=%C3",
    ] {
        let (status, answer) = get_as(&server, bad, &bearer()).await;
        assert_eq!(status, 400, "{bad}: {answer}");
        assert!(answer["message"].is_string(), "{bad}: {answer}");
    }
}

async fn javascript_mutators_apply_all_or_nothing(backend: Backend) {
    let js = replisync::mutators::js::JsMutators::load(&fixture(), test_limits()).unwrap();
    let app =
        with_api(App::builder()).mutators(js.register(replisync::mutators::Mutators::builtin()));
    let server = TestServer::start_with(backend, app).await;
    let js_inc = |delta: i64| json!({"name": "increment", "args": inc("n", delta)});
    let probe = json!({"name": "probeTx", "args": {"into": "tx"}});
    let (status, answer) = call(&server, "doc", "a", json!([js_inc(1), js_inc(2), probe])).await;
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("committed")),
        "{answer}"
    );
    let view = server.state("doc", "reader").await;
    assert_eq!(
        view.entries["n"], 3,
        "each mutation sees the ones before it"
    );
    let tx = &view.entries["tx"];
    assert_eq!(tx["mutationID"], 3);
    assert!(
        tx["clientID"]
            .as_str()
            .unwrap()
            .starts_with("replisync-server-"),
        "{tx}"
    );
    let before = server.db.fingerprint().await;
    for (failing, reason) in [
        ("throws", "threw"),
        ("rejects", "threw"),
        ("spins", "timeout"),
    ] {
        let mutations = json!([js_inc(10), {"name": failing, "args": {"key": "x"}}]);
        let (status, answer) = call(&server, "doc", failing, mutations).await;
        assert_eq!(status, 422, "{failing}: {answer}");
        assert_eq!(
            (&answer["index"], &answer["reason"]),
            (&json!(1), &json!(reason))
        );
    }
    assert_eq!(
        server.db.fingerprint().await,
        before,
        "no failed call wrote anything"
    );
}

async fn a_page_of_large_values_is_cut_by_size(backend: Backend) {
    let server = TestServer::start_with(backend, with_api(App::builder())).await;
    let big = "x".repeat(3 * 1024 * 1024);
    for i in 0..3 {
        let key = format!("big/{i}");
        let (status, answer) = call(&server, "doc", &key, json!([set(&key, json!(big))])).await;
        assert_eq!(status, 200, "{answer}");
    }
    let (status, page) = get_as(&server, "/api/spaces/doc/entries?limit=1000", &bearer()).await;
    assert_eq!(status, 200);
    let keys: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["big/0", "big/1"], "a page stops past 4 MB");
    assert_eq!(page["next"], "big/2");
}

async fn the_authorization_header_is_read_as_http_reads_it(backend: Backend) {
    let server = TestServer::start_with(backend, with_api(App::builder())).await;
    let lower = format!("bearer {SERVICE_TOKEN}");
    let (status, _) = get_as(&server, "/api/spaces/doc/entries", &lower).await;
    assert_eq!(status, 200, "the scheme is case-insensitive");
    let twice = server
        .http
        .get(server.url("/api/spaces/doc/entries"))
        .header("authorization", bearer())
        .header("authorization", "Bearer other")
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), 401, "two Authorization headers are refused");
}

/// A Rust mutator that takes its time, then sets `slow`.
struct Slow;

#[async_trait::async_trait]
impl replisync::mutators::Mutator for Slow {
    async fn apply(
        &self,
        tx: &mut replisync::mutators::WriteTx<'_>,
        _args: &Value,
    ) -> Result<(), replisync::mutators::MutationError> {
        tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        tx.put("slow", json!(true))
    }
}

async fn a_call_past_its_time_budget_applies_nothing(backend: Backend) {
    let limits = PushLimits {
        time_budget: Some(std::time::Duration::from_millis(200)),
        ..PushLimits::default()
    };
    let mutators = replisync::mutators::Mutators::builtin().register("slow", Slow);
    let app = with_api(App::builder()).push(limits).mutators(mutators);
    let server = TestServer::start_with(backend, app).await;
    let before = server.db.fingerprint().await;
    let slow = json!({"name": "slow"});
    let (status, answer) = call(&server, "doc", "k", json!([slow, slow, slow, slow])).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (422, Some("CallTookTooLong")),
        "{answer}"
    );
    assert!(
        answer["message"].as_str().unwrap().contains(" of 4"),
        "{answer}"
    );
    assert_eq!(server.db.fingerprint().await, before);
    // Within the budget, the same key still applies.
    let (status, answer) = call(&server, "doc", "k", json!([slow])).await;
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("committed")),
        "{answer}"
    );
}

crate::on_both_stores!(
    a_call_past_its_time_budget_applies_nothing,
    a_page_of_large_values_is_cut_by_size,
    the_authorization_header_is_read_as_http_reads_it,
    javascript_mutators_apply_all_or_nothing,
    calls_without_the_service_token_are_refused_and_change_nothing,
    an_idempotency_key_applied_twice_commits_once,
    a_failing_mutation_applies_none_of_the_call,
    calls_and_client_pushes_to_one_space_all_count,
    an_end_user_cannot_take_the_servers_client_group,
    reads_page_through_a_space_from_one_snapshot,
);
