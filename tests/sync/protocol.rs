//! Push and pull semantics, run against each store.

use std::sync::Arc;

use async_trait::async_trait;
use replisync::auth::{AuthError, Authenticator, Identity};
use replisync::http::settings::{CorsOrigins, HttpSettings};
use replisync::mutators::{MutationError, Mutator, Mutators, WriteTx};
use replisync::startup::App;
use replisync::store::StoreError;
use serde_json::{Value, json};

use crate::harness::{Backend, PullView, TestServer, inc, push_body};

async fn push_then_pull_round_trips(backend: Backend) {
    let server = TestServer::start(backend).await;
    let body = push_body(
        "g1",
        &[
            (
                "c1",
                1,
                "set",
                json!({"key": "todo/1", "value": {"title": "milk", "done": false}}),
            ),
            ("c1", 2, "increment", inc("count", 5)),
            ("c2", 1, "increment", inc("count", -2)),
        ],
    );
    let (status, response) = server.push("s1", &body).await;
    assert_eq!((status, response), (200, json!({})));

    let (status, first) = server.pull("s1", "g1", Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(first["cookie"], json!(1));
    assert_eq!(first["lastMutationIDChanges"], json!({"c1": 2, "c2": 1}));
    let patch = first["patch"].as_array().unwrap();
    assert_eq!(patch[0], json!({"op": "clear"}));
    let view = PullView::from_response(&first);
    assert_eq!(
        view.entries["todo/1"],
        json!({"title": "milk", "done": false})
    );
    assert_eq!(view.entries["count"], json!(3));

    // Nothing changed since: same cookie, empty patch, no lmids.
    let again = server.pull_ok("s1", "g1", json!(1)).await;
    assert_eq!(
        again,
        json!({"cookie": 1, "lastMutationIDChanges": {}, "patch": []})
    );

    // A delete and a new put: the incremental pull reports exactly those.
    let body = push_body(
        "g1",
        &[
            ("c1", 3, "delete", json!({"key": "todo/1"})),
            (
                "c1",
                4,
                "set",
                json!({"key": "b", "value": [1, "two", null]}),
            ),
        ],
    );
    assert_eq!(server.push("s1", &body).await.0, 200);
    let delta = server.pull_ok("s1", "g1", json!(1)).await;
    assert_eq!(delta["cookie"], json!(2));
    assert_eq!(delta["lastMutationIDChanges"], json!({"c1": 4}));
    let mut ops: Vec<Value> = delta["patch"].as_array().unwrap().clone();
    ops.sort_by_key(|op| op["key"].as_str().unwrap_or_default().to_owned());
    assert_eq!(
        ops,
        vec![
            json!({"op": "put", "key": "b", "value": [1, "two", null]}),
            json!({"op": "del", "key": "todo/1"}),
        ]
    );

    // A first pull never carries deletes.
    let fresh = server.pull_ok("s1", "g-other", Value::Null).await;
    assert!(
        fresh["patch"]
            .as_array()
            .unwrap()
            .iter()
            .all(|op| op["op"] != "del")
    );
    assert_eq!(
        fresh["lastMutationIDChanges"],
        json!({}),
        "other group's clients are not reported"
    );
}

async fn a_space_never_written_pulls_empty(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (status, body) = server.pull("never-written", "g", Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"cookie": 0, "lastMutationIDChanges": {}, "patch": [{"op": "clear"}]})
    );
    let body = server.pull_ok("never-written", "g", json!(0)).await;
    assert_eq!(
        body,
        json!({"cookie": 0, "lastMutationIDChanges": {}, "patch": []})
    );
}

async fn spaces_are_separate(backend: Backend) {
    let server = TestServer::start(backend).await;
    server
        .push_ok(
            "a",
            &push_body(
                "ga",
                &[("ca", 1, "set", json!({"key": "k", "value": "in a"}))],
            ),
        )
        .await;
    server
        .push_ok(
            "b",
            &push_body(
                "gb",
                &[("cb", 1, "set", json!({"key": "k", "value": "in b"}))],
            ),
        )
        .await;
    assert_eq!(server.state("a", "ga").await.entries["k"], json!("in a"));
    assert_eq!(server.state("b", "gb").await.entries["k"], json!("in b"));
    assert_eq!(
        server.state("b", "gb").await.cookie,
        1,
        "versions are per space"
    );
}

async fn a_resent_push_changes_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let body = push_body(
        "g",
        &[
            ("c", 1, "increment", inc("n", 1)),
            ("c", 2, "increment", inc("n", 1)),
        ],
    );
    assert_eq!(server.push("s", &body).await.0, 200);
    let before = server.db.fingerprint().await;
    assert_eq!(server.push("s", &body).await, (200, json!({})));
    assert_eq!(
        server.db.fingerprint().await,
        before,
        "a re-sent push wrote something"
    );
    // A push that repeats old mutations and adds a new one applies only the new one.
    let body = push_body(
        "g",
        &[
            ("c", 1, "increment", inc("n", 1)),
            ("c", 2, "increment", inc("n", 1)),
            ("c", 3, "increment", inc("n", 10)),
        ],
    );
    assert_eq!(server.push("s", &body).await.0, 200);
    let view = server.state("s", "g").await;
    assert_eq!(view.entries["n"], json!(12));
    assert_eq!(view.lmid("c"), 3);
    assert_eq!(view.cookie, 2);
}

async fn a_gap_stops_that_clients_later_mutations(backend: Backend) {
    let server = TestServer::start(backend).await;
    server
        .push(
            "s",
            &push_body(
                "g",
                &[
                    ("c1", 1, "increment", inc("a", 1)),
                    ("c2", 1, "increment", inc("b", 1)),
                ],
            ),
        )
        .await;
    // c1 skips id 2; c2 goes on normally in the same push.
    let body = push_body(
        "g",
        &[
            ("c1", 3, "increment", inc("a", 100)),
            ("c2", 2, "increment", inc("b", 1)),
            ("c1", 4, "increment", inc("a", 100)),
        ],
    );
    assert_eq!(server.push("s", &body).await.0, 200);
    let view = server.state("s", "g").await;
    assert_eq!((view.lmid("c1"), view.lmid("c2")), (1, 2));
    assert_eq!(
        (view.entries["a"].clone(), view.entries["b"].clone()),
        (json!(1), json!(2))
    );
    // Once the missing mutation arrives, everything applies in order.
    let body = push_body(
        "g",
        &[
            ("c1", 2, "increment", inc("a", 10)),
            ("c1", 3, "increment", inc("a", 100)),
            ("c1", 4, "increment", inc("a", 100)),
        ],
    );
    assert_eq!(server.push("s", &body).await.0, 200);
    let view = server.state("s", "g").await;
    assert_eq!(view.lmid("c1"), 4);
    assert_eq!(view.entries["a"], json!(211));
}

async fn a_push_that_only_gaps_writes_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    server
        .push_ok("s", &push_body("g", &[("c", 1, "increment", inc("a", 1))]))
        .await;
    let before = server.db.fingerprint().await;
    assert_eq!(
        server
            .push("s", &push_body("g", &[("c", 5, "increment", inc("a", 1))]))
            .await
            .0,
        200
    );
    assert_eq!(server.db.fingerprint().await, before);
}

async fn client_group_of_another_space_is_rejected(backend: Backend) {
    let server = TestServer::start(backend).await;
    server
        .push_ok(
            "home",
            &push_body("g", &[("c", 1, "increment", inc("n", 1))]),
        )
        .await;
    let before = server.db.fingerprint().await;
    let (status, body) = server
        .push(
            "elsewhere",
            &push_body("g", &[("c", 2, "increment", inc("n", 1))]),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "Forbidden");
    assert!(body["message"].as_str().unwrap().contains("another space"));
    let (status, _) = server.pull("elsewhere", "g", Value::Null).await;
    assert_eq!(status, 403);
    assert_eq!(server.db.fingerprint().await, before);
}

async fn client_of_another_group_is_rejected(backend: Backend) {
    let server = TestServer::start(backend).await;
    server
        .push_ok("s", &push_body("g1", &[("c", 1, "increment", inc("n", 1))]))
        .await;
    let before = server.db.fingerprint().await;
    // g2 is new, but names g1's client: nothing at all may be applied, g2 not even created.
    let body = push_body(
        "g2",
        &[
            ("fresh", 1, "increment", inc("n", 1)),
            ("c", 2, "increment", inc("n", 1)),
        ],
    );
    let (status, body) = server.push("s", &body).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("another client group")
    );
    assert_eq!(server.db.fingerprint().await, before);
}

/// Maps `Bearer <name>` to user `<name>`; no token is a 401.
struct TokenIsUser;

#[async_trait]
impl Authenticator for TokenIsUser {
    async fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, AuthError> {
        authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .filter(|user| !user.is_empty())
            .map(Identity::with_full_access)
            .ok_or_else(|| AuthError::Unauthorized("send Authorization: Bearer <token>".into()))
    }
}

async fn client_group_of_another_user_is_rejected(backend: Backend) {
    let options = App::builder().authenticator(Arc::new(TokenIsUser));
    let server = TestServer::start_with(backend, options).await;
    let body = push_body("alice-group", &[("c", 1, "increment", inc("n", 1))]);
    assert_eq!(server.push_as("s", &body, "Bearer alice").await.0, 200);
    let before = server.db.fingerprint().await;

    let body = push_body("alice-group", &[("c", 2, "increment", inc("n", 1))]);
    let (status, response) = server.push_as("s", &body, "Bearer mallory").await;
    assert_eq!(status, 403);
    assert!(
        response["message"]
            .as_str()
            .unwrap()
            .contains("another user")
    );
    assert_eq!(
        server
            .pull_as("s", "alice-group", Value::Null, "Bearer mallory")
            .await
            .0,
        403
    );

    let (status, response) = server.push_as("s", &body, "").await;
    assert_eq!(status, 401);
    assert_eq!(response["error"], "Unauthorized");
    assert_eq!(
        server.pull_as("s", "alice-group", Value::Null, "").await.0,
        401
    );
    assert_eq!(server.db.fingerprint().await, before);

    let (status, response) = server
        .pull_as("s", "alice-group", Value::Null, "Bearer alice")
        .await;
    assert_eq!(status, 200);
    assert_eq!(response["lastMutationIDChanges"], json!({"c": 1}));
}

async fn unknown_client_past_its_first_mutation_is_client_state_not_found(backend: Backend) {
    let server = TestServer::start(backend).await;
    let before = server.db.fingerprint().await;
    let body = push_body(
        "g",
        &[
            ("new", 1, "increment", inc("n", 1)),
            ("lost", 7, "increment", inc("n", 1)),
        ],
    );
    assert_eq!(
        server.push("s", &body).await,
        (200, json!({"error": "ClientStateNotFound"}))
    );
    assert_eq!(
        server.db.fingerprint().await,
        before,
        "nothing of that push may apply"
    );
}

async fn cookies_the_server_cannot_honour_are_client_state_not_found(backend: Backend) {
    let server = TestServer::start(backend).await;
    server
        .push_ok("s", &push_body("g", &[("c", 1, "increment", inc("n", 1))]))
        .await;
    let not_found = json!({"error": "ClientStateNotFound"});
    for cookie in [
        json!(1u64 << 51),
        json!("1"),
        json!({"order": 1}),
        json!(-1),
        json!(0.5),
        // Beyond the database's BIGINT: found by tests/fuzz (`"cookie":9223372036854775808`
        // was a 500).
        json!(i64::MAX as u64 + 1),
        json!(u64::MAX),
    ] {
        assert_eq!(
            server.pull("s", "g", cookie.clone()).await,
            (200, not_found.clone()),
            "cookie {cookie}"
        );
    }
}

/// A cookie ahead of the space (its database was wiped or restored from a backup): the space
/// moves up to the cookie and the pull gets all of it, so cookies never go down and the client
/// needs no reload (ClientStateNotFound would make Replicache fork a new group from the same
/// local data and cookie, which would be answered the same way, forever).
async fn a_cookie_ahead_of_the_space_gets_the_whole_space_at_that_cookie(backend: Backend) {
    let server = TestServer::start(backend).await;
    let first = [
        ("c", 1, "increment", inc("n", 1)),
        ("c", 2, "increment", inc("n", 1)),
    ];
    server.push_ok("s", &push_body("g", &first)).await; // version 1
    let pulled = server.pull_ok("s", "g", Value::Null).await;
    let before_the_wipe = PullView::from_response(&pulled);
    assert_eq!(before_the_wipe.cookie, 1);

    // A client of the old database, 1000 versions ahead: everything, just past its cookie.
    let (status, reset) = server.pull("s", "lost", json!(1000)).await;
    assert_eq!(status, 200, "{reset}");
    assert_eq!(reset["cookie"], json!(1001));
    assert_eq!(reset["patch"][0], json!({"op": "clear"}));
    let mut lost = PullView::default();
    lost.apply(&reset);
    assert_eq!(lost.entries, before_the_wipe.entries);

    // Versions go on from there; the client's next pull is a delta.
    let next = push_body("g", &[("c", 3, "increment", inc("n", 5))]);
    assert_eq!(server.push("s", &next).await, (200, json!({})));
    let delta = server.pull_ok("s", "lost", json!(1001)).await;
    assert_eq!(delta["cookie"], json!(1002));
    assert_eq!(
        delta["patch"],
        json!([{"op": "put", "key": "n", "value": 7}])
    );
    // Cookies up to the one that moved the space may come from the old database too, where
    // they named other data: a reset, even for that very cookie (a fork of that client).
    for old in [1, 1000] {
        let again = server.pull_ok("s", "g", json!(old)).await;
        assert_eq!(again["patch"][0], json!({"op": "clear"}), "cookie {old}");
        assert_eq!(again["cookie"], json!(1002));
        assert_eq!(again["lastMutationIDChanges"], json!({"c": 3}));
    }

    // A space the database has never seen: created past the cookie, empty.
    let empty = server.pull_ok("wiped", "other-group", json!(3)).await;
    assert_eq!(
        empty,
        json!({"cookie": 4, "lastMutationIDChanges": {}, "patch": [{"op": "clear"}]})
    );
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("replisync_pull_resets_total 4\n"),
        "{metrics}"
    );
}

async fn other_protocol_versions_are_not_supported(backend: Backend) {
    let server = TestServer::start(backend).await;
    let before = server.db.fingerprint().await;
    let legacy_push = json!({"pushVersion": 0, "clientID": "c", "mutations": [
        {"id": 1, "name": "increment", "args": {"key": "n", "delta": 1}, "timestamp": 1}]});
    assert_eq!(
        server.push("s", &legacy_push).await,
        (
            200,
            json!({"error": "VersionNotSupported", "versionType": "push"})
        )
    );
    let mut future_push = push_body("g", &[("c", 1, "increment", inc("n", 1))]);
    future_push["pushVersion"] = json!(2);
    assert_eq!(
        server.push("s", &future_push).await.1,
        json!({"error": "VersionNotSupported", "versionType": "push"})
    );
    let legacy_pull = json!({"pullVersion": 0, "clientID": "c", "cookie": null});
    assert_eq!(
        server
            .post_raw("/spaces/s/pull", legacy_pull.to_string(), "")
            .await,
        (
            200,
            json!({"error": "VersionNotSupported", "versionType": "pull"})
        )
    );
    assert_eq!(server.db.fingerprint().await, before);
}

/// Writes, then fails with a business error: its write must not survive.
struct WriteThenReject;

#[async_trait]
impl Mutator for WriteThenReject {
    async fn apply(&self, tx: &mut WriteTx<'_>, _args: &Value) -> Result<(), MutationError> {
        tx.put("poison", json!("should never be stored"))?;
        tx.put("n", json!(-1000))?;
        Err(MutationError::Rejected("business rule says no".into()))
    }
}

async fn failing_mutations_roll_back_and_still_count(backend: Backend) {
    let options =
        App::builder().mutators(Mutators::builtin().register("writeThenReject", WriteThenReject));
    let server = TestServer::start_with(backend, options).await;
    let body = push_body(
        "g",
        &[
            ("c", 1, "increment", inc("n", 1)),
            ("c", 2, "writeThenReject", json!({})),
            ("c", 3, "noSuchMutator", json!({})),
            ("c", 4, "increment", json!({"key": "n", "delta": "one"})),
            ("c", 5, "set", json!({"key": "text", "value": "hello"})),
            ("c", 6, "increment", inc("text", 1)),
            ("c", 7, "set", json!(["not", "an", "object"])),
            ("c", 8, "increment", inc("n", 1)),
        ],
    );
    assert_eq!(server.push("s", &body).await, (200, json!({})));
    let view = server.state("s", "g").await;
    assert_eq!(
        view.lmid("c"),
        8,
        "failed mutations must still advance lastMutationID"
    );
    assert_eq!(
        view.entries["n"],
        json!(2),
        "only the two good increments apply"
    );
    assert_eq!(view.entries["text"], json!("hello"));
    assert!(!view.entries.contains_key("poison"));
}

/// Stands in for a database fault in the middle of a push (a real database cannot be made to
/// fail at exactly that point on demand): it writes, then reports the store unavailable.
struct DatabaseFault;

#[async_trait]
impl Mutator for DatabaseFault {
    async fn apply(&self, tx: &mut WriteTx<'_>, _args: &Value) -> Result<(), MutationError> {
        tx.put("half", json!("applied"))?;
        Err(MutationError::Store(StoreError::Unavailable(
            "injected fault".into(),
        )))
    }
}

async fn a_database_fault_rolls_the_whole_push_back(backend: Backend) {
    let options = App::builder().mutators(Mutators::builtin().register("fault", DatabaseFault));
    let server = TestServer::start_with(backend, options).await;
    server
        .push_ok("s", &push_body("g", &[("c", 1, "increment", inc("n", 1))]))
        .await;
    let before = server.db.fingerprint().await;
    let body = push_body(
        "g",
        &[
            ("c", 2, "increment", inc("n", 1)),
            ("c", 3, "fault", json!({})),
        ],
    );
    let (status, response) = server.push("s", &body).await;
    assert_eq!(status, 503);
    assert_eq!(response["error"], "Unavailable");
    assert!(
        !response["message"].as_str().unwrap().contains("injected"),
        "internal details leaked"
    );
    assert_eq!(server.db.fingerprint().await, before, "a half-applied push");
}

async fn health_reports_the_store(backend: Backend) {
    let server = TestServer::start(backend).await;
    let response = server.get("/healthz").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let kind = if backend == Backend::Postgres {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(body, json!({"status": "ok", "store": kind}));
    server.store.close().await;
    let response = server.get("/healthz").await;
    assert_eq!(response.status(), 503);
}

async fn metrics_count_requests_and_reads(backend: Backend) {
    let server = TestServer::start(backend).await;
    let body = push_body("g", &[("c", 1, "increment", inc("n", 1))]);
    server.push_ok("s", &body).await;
    server.push_ok("s", &body).await; // re-sent: answered, but commits nothing
    server.pull("s", "g", Value::Null).await;
    let text = server.get("/metrics").await.text().await.unwrap();
    for line in [
        "replisync_pushes_total 2",
        "replisync_push_commits_total 1",
        "replisync_pulls_total 1",
        "replisync_pull_reads_total 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing from:\n{text}"
        );
    }
}

async fn browsers_on_other_origins_may_push_and_pull(backend: Backend) {
    let options = App::builder().http(HttpSettings {
        cors_origins: CorsOrigins::List(vec!["https://app.example".parse().unwrap()]),
        ..HttpSettings::default()
    });
    let server = TestServer::start_with(backend, options).await;
    let preflight = server
        .http
        .request(reqwest::Method::OPTIONS, server.url("/spaces/s/push"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-replicache-requestid",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    for header in ["authorization", "content-type", "x-replicache-requestid"] {
        assert!(allowed.contains(header), "{header} not allowed: {allowed}");
    }
    let pull = server
        .http
        .post(server.url("/spaces/s/pull"))
        .header("origin", "https://app.example")
        .body(json!({"pullVersion": 1, "clientGroupID": "g", "cookie": null, "profileID": "p", "schemaVersion": ""}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        pull.headers()["access-control-allow-origin"],
        "https://app.example"
    );
}

/// With no REPLISYNC_CORS_ORIGINS, only pages served from this machine may call replisync
/// from a browser: a web page elsewhere cannot drive a local anonymous server. `/metrics` is
/// never served cross-origin.
async fn by_default_only_loopback_pages_are_allowed_cross_origin(backend: Backend) {
    let server = TestServer::start(backend).await;
    let preflight = |origin: &'static str, path: &'static str| {
        let server = &server;
        async move {
            server
                .http
                .request(reqwest::Method::OPTIONS, server.url(path))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "content-type")
                .send()
                .await
                .unwrap()
                .headers()
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap().to_owned())
        }
    };
    for origin in [
        "http://127.0.0.1:3000",
        "http://localhost:5173",
        "http://[::1]:8000",
    ] {
        assert_eq!(
            preflight(origin, "/spaces/s/push").await.as_deref(),
            Some(origin),
            "{origin}"
        );
    }
    for origin in [
        "https://evil.example",
        "http://localhost.evil.example",
        "null",
    ] {
        assert_eq!(preflight(origin, "/spaces/s/push").await, None, "{origin}");
        assert_eq!(preflight(origin, "/spaces/s/pull").await, None, "{origin}");
    }
    let metrics = server
        .http
        .get(server.url("/metrics"))
        .header("origin", "http://127.0.0.1:3000")
        .send()
        .await
        .unwrap();
    assert!(
        metrics
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

crate::on_both_stores!(
    push_then_pull_round_trips,
    a_space_never_written_pulls_empty,
    spaces_are_separate,
    a_resent_push_changes_nothing,
    a_gap_stops_that_clients_later_mutations,
    a_push_that_only_gaps_writes_nothing,
    client_group_of_another_space_is_rejected,
    client_of_another_group_is_rejected,
    client_group_of_another_user_is_rejected,
    unknown_client_past_its_first_mutation_is_client_state_not_found,
    cookies_the_server_cannot_honour_are_client_state_not_found,
    a_cookie_ahead_of_the_space_gets_the_whole_space_at_that_cookie,
    other_protocol_versions_are_not_supported,
    failing_mutations_roll_back_and_still_count,
    a_database_fault_rolls_the_whole_push_back,
    health_reports_the_store,
    metrics_count_requests_and_reads,
    browsers_on_other_origins_may_push_and_pull,
    by_default_only_loopback_pages_are_allowed_cross_origin,
);

/// Postgres restarted or failed over under a running server: every pooled connection is dead,
/// most of them used a moment ago (so not pinged before use). Pushes, pulls and the health
/// check run again on live connections instead of answering an error. Postgres only: ending
/// the server's sessions is a fault a real Postgres produces on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_database_sessions_cost_no_request_an_error() {
    let server = TestServer::start(Backend::Postgres).await;
    // Several connections in the pool, all used within the last second.
    let readers: Vec<String> = (0..6).map(|i| format!("reader-{i}")).collect();
    let pulls: Vec<_> = readers
        .iter()
        .map(|reader| server.pull("s", reader, Value::Null))
        .collect();
    for (status, body) in futures::future::join_all(pulls).await {
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = server
        .push("s", &push_body("g", &[("c", 1, "increment", inc("n", 1))]))
        .await;
    assert_eq!(status, 200, "{body}");

    assert!(
        server.db.end_server_sessions().await >= 1,
        "no session ended"
    );
    let (status, body) = server
        .push("s", &push_body("g", &[("c", 2, "increment", inc("n", 1))]))
        .await;
    assert_eq!(status, 200, "push after the sessions ended: {body}");

    server.db.end_server_sessions().await;
    let (status, body) = server.pull("s", "g", Value::Null).await;
    assert_eq!(status, 200, "first pull after the sessions ended: {body}");
    let view = PullView::from_response(&body);
    assert_eq!(view.entries["n"], json!(2));
    assert_eq!(view.lmid("c"), 2);

    server.db.end_server_sessions().await;
    let (status, body) = server.pull("s", "g", json!(1)).await;
    assert_eq!(
        status, 200,
        "incremental pull after the sessions ended: {body}"
    );
    assert_eq!(body["cookie"], json!(2));

    server.db.end_server_sessions().await;
    let health = server.get("/healthz").await;
    assert_eq!(
        health.status(),
        200,
        "health check after the sessions ended"
    );
}
