//! Bad input gets a 4xx with a JSON body naming the problem, and changes nothing.

use replisync::http::settings::HttpSettings;
use replisync::push::settings::PushLimits;
use replisync::startup::App;
use serde_json::{Value, json};

use crate::harness::{Backend, TestServer, inc, push_body};

/// Asserts a 4xx `{"error", "message"}` answer whose message mentions `mentions`.
fn assert_client_error(
    status: u16,
    body: &Value,
    expected_status: u16,
    error: &str,
    mentions: &str,
) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["error"], error, "{body}");
    let message = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {body}"));
    assert!(
        message.contains(mentions),
        "message {message:?} should mention {mentions:?}"
    );
}

async fn every_kind_of_bad_push_changes_nothing(backend: Backend) {
    let options = App::builder()
        .http(HttpSettings {
            max_body_bytes: 64 * 1024,
            ..HttpSettings::default()
        })
        .push(PushLimits {
            max_body_bytes: 64 * 1024,
            ..PushLimits::default()
        });
    let server = TestServer::start_with(backend, options).await;
    server
        .push_ok("s", &push_body("g", &[("c", 1, "increment", inc("n", 1))]))
        .await;
    let before = server.db.fingerprint().await;

    let good = push_body("g", &[("c", 2, "increment", inc("n", 1))]);
    let without = |field: &str| {
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove(field);
        body.to_string()
    };
    let with = |pointer: &str, value: Value| {
        let mut body = good.clone();
        *body.pointer_mut(pointer).unwrap() = value;
        body.to_string()
    };
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        (
            "not JSON",
            "{\"pushVersion\": 1,".into(),
            400,
            "InvalidRequest",
            "EOF",
        ),
        ("empty body", String::new(), 400, "InvalidRequest", "EOF"),
        (
            "trailing garbage",
            format!("{good} trailing"),
            400,
            "InvalidRequest",
            "trailing",
        ),
        (
            "missing clientGroupID",
            without("clientGroupID"),
            400,
            "InvalidRequest",
            "clientGroupID",
        ),
        (
            "missing mutations",
            without("mutations"),
            400,
            "InvalidRequest",
            "mutations",
        ),
        (
            "mutations not a list",
            with("/mutations", json!({"id": 2})),
            400,
            "InvalidRequest",
            "mutations",
        ),
        (
            "id a string",
            with("/mutations/0/id", json!("2")),
            400,
            "InvalidRequest",
            "mutations[0].id",
        ),
        (
            "id negative",
            with("/mutations/0/id", json!(-2)),
            400,
            "InvalidRequest",
            "mutations[0].id",
        ),
        (
            "id too large",
            with("/mutations/0/id", json!(u64::MAX)),
            400,
            "InvalidRequest",
            "mutations[0].id",
        ),
        (
            "name missing",
            {
                let mut body = good.clone();
                body["mutations"][0].as_object_mut().unwrap().remove("name");
                body.to_string()
            },
            400,
            "InvalidRequest",
            "name",
        ),
        (
            "clientID a number",
            with("/mutations/0/clientID", json!(7)),
            400,
            "InvalidRequest",
            "mutations[0].clientID",
        ),
        (
            "empty clientID",
            with("/mutations/0/clientID", json!("")),
            400,
            "InvalidRequest",
            "clientID is empty",
        ),
        (
            "empty clientGroupID",
            with("/clientGroupID", json!("")),
            400,
            "InvalidRequest",
            "clientGroupID is empty",
        ),
        (
            "NUL in clientGroupID",
            with("/clientGroupID", json!("g\u{0}")),
            400,
            "InvalidRequest",
            "clientGroupID contains a NUL",
        ),
        (
            "clientID too long",
            with("/mutations/0/clientID", json!("c".repeat(201))),
            400,
            "InvalidRequest",
            "clientID is longer than",
        ),
        (
            "oversized body",
            {
                let mut body = good.clone();
                body["mutations"][0]["args"]["pad"] = json!("x".repeat(100 * 1024));
                body.to_string()
            },
            413,
            "PayloadTooLarge",
            "limit",
        ),
    ];
    for (what, body, status, error, mentions) in cases {
        let (got_status, got_body) = server.post_raw("/spaces/s/push", body, "").await;
        eprintln!("{what}: {got_status} {got_body}");
        assert_client_error(got_status, &got_body, status, error, mentions);
        assert_eq!(
            server.db.fingerprint().await,
            before,
            "{what} changed the database"
        );
    }

    let (status, body) = server
        .post_raw("/spaces/has%20space/push", good.to_string(), "")
        .await;
    assert_client_error(status, &body, 400, "InvalidSpaceId", "space id");
    let long_space = "a".repeat(101);
    let (status, body) = server
        .post_raw(&format!("/spaces/{long_space}/push"), good.to_string(), "")
        .await;
    assert_client_error(status, &body, 400, "InvalidSpaceId", "space id");
    let (status, body) = server.post_raw("/nowhere", "{}", "").await;
    assert_client_error(status, &body, 404, "NotFound", "push");
    // A route asked with another method: found by tests/fuzz (`GET /spaces/0/push` was a 405
    // with an empty body).
    let response = server.get("/spaces/s/push").await;
    assert_eq!(response.headers()["allow"], "POST");
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    assert_client_error(status, &body, 405, "MethodNotAllowed", "POST");
    assert_eq!(server.db.fingerprint().await, before);
}

async fn every_kind_of_bad_pull_is_a_clear_error(backend: Backend) {
    let server = TestServer::start(backend).await;
    for (body, mentions) in [
        ("[]", "PullRequest"),
        ("{\"pullVersion\":1,\"cookie\":null}", "clientGroupID"),
        (
            "{\"pullVersion\":\"1\",\"clientGroupID\":\"g\",\"cookie\":null}",
            "pullVersion",
        ),
        (
            "{\"pullVersion\":1,\"clientGroupID\":5,\"cookie\":null}",
            "clientGroupID",
        ),
        (
            "{\"pullVersion\":1,\"clientGroupID\":\"g\\u0000\",\"cookie\":null}",
            "clientGroupID contains a NUL",
        ),
    ] {
        let (status, response) = server.post_raw("/spaces/s/pull", body, "").await;
        assert_client_error(status, &response, 400, "InvalidRequest", mentions);
    }
}

/// `[[...[1]...]]`, `depth` arrays deep.
fn nested_arrays(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!([inner]))
}

/// Mutator arguments are the mutator's business: a wrong shape fails that one mutation (it
/// is logged, skipped, and counted as processed, or the client would resend it forever).
async fn mutator_arguments_of_the_wrong_shape_fail_only_that_mutation(backend: Backend) {
    let server = TestServer::start(backend).await;
    let body = push_body(
        "g",
        &[
            ("c", 1, "set", json!({"key": "k"})),
            ("c", 2, "set", json!({"key": 5, "value": 1})),
            ("c", 3, "delete", json!("k")),
            ("c", 4, "increment", json!({"key": "n"})),
            ("c", 5, "set", json!({"key": "nul\u{0}byte", "value": 1})),
            ("c", 6, "set", json!({"key": "k".repeat(1001), "value": 1})),
            ("c", 7, "delete", json!({"key": "k".repeat(1001)})),
            // Deeper than serde_json parses (found by tests/fuzz): the body takes it as raw
            // JSON, the mutator cannot.
            (
                "c",
                8,
                "set",
                json!({"key": "deep", "value": nested_arrays(200)}),
            ),
        ],
    );
    assert_eq!(server.push("s", &body).await.0, 200);
    let view = server.state("s", "g").await;
    assert_eq!(view.lmid("c"), 8);
    assert!(
        view.entries.is_empty(),
        "no write may survive: {:?}",
        view.entries
    );
}

/// Keys and ids made of what SQL, JSON and JSON paths treat specially travel through every read
/// and write unchanged: on SQLite the reads of several pushes travel as JSON arrays, and a
/// group's writes as one text of statements. Each key is incremented twice (the second push
/// reads what the first wrote) by a client of a group with such ids, in two spaces at once.
async fn odd_keys_and_ids_round_trip_through_reads_and_writes(backend: Backend) {
    let long = "k".repeat(replisync::protocol::MAX_KEY_BYTES);
    let keys = [
        "q\"uote",
        "back\\slash",
        "$.path[0]",
        "tab\tnew\nline",
        "\u{1}\u{1f}ctl\u{7f}",
        "é-🦀-\u{fffd}",
        "'; DROP TABLE replisync_entries; --",
        "?1 ?2 ?",
        "",
        long.as_str(),
    ];
    let ids = |space: &str| (format!("g\"\\🦀'?{space}"), format!("c\t\"{{}}[]{space}"));
    let server = std::sync::Arc::new(TestServer::start(backend).await);
    let mut pushes = Vec::new();
    for space in ["odd-a", "odd-b"] {
        let (server, keys) = (server.clone(), keys.map(str::to_owned));
        let (group, client) = ids(space);
        pushes.push(tokio::spawn(async move {
            for round in 0..2 {
                let mutations: Vec<_> = (1..)
                    .zip(&keys)
                    .map(|(n, key)| (client.as_str(), round * 10 + n, "increment", inc(key, 1)))
                    .collect();
                server.push_ok(space, &push_body(&group, &mutations)).await;
            }
        }));
    }
    for push in pushes {
        push.await.unwrap();
    }
    for space in ["odd-a", "odd-b"] {
        let (group, client) = ids(space);
        let view = server.state(space, &group).await;
        for key in keys {
            assert_eq!(view.entries.get(key), Some(&json!(2)), "{space}: {key:?}");
        }
        assert_eq!(view.lmid(&client), 20, "{space}");
    }
}

crate::on_both_stores!(
    odd_keys_and_ids_round_trip_through_reads_and_writes,
    every_kind_of_bad_push_changes_nothing,
    every_kind_of_bad_pull_is_a_clear_error,
    mutator_arguments_of_the_wrong_shape_fail_only_that_mutation,
    an_oversized_body_is_answered_413_and_the_next_request_is_too,
);

/// A body over its limit is answered 413 that the client can read, and its connection stays
/// usable or is said to close: the server reads what is left of the body (at most
/// REPLISYNC_MAX_BODY_BYTES more) before it answers. Found in CI, where the request after the
/// oversized case of `every_kind_of_bad_push_changes_nothing`, sent on the same kept-alive
/// connection, once found that connection closed under it.
async fn an_oversized_body_is_answered_413_and_the_next_request_is_too(backend: Backend) {
    const PUSH_LIMIT: usize = 64 * 1024;
    const LIMIT: usize = 2 * PUSH_LIMIT;
    let options = App::builder()
        .http(HttpSettings {
            max_body_bytes: LIMIT,
            // Longer than a loaded machine may keep a sender waiting (the default is 1 s).
            unread_body_linger: std::time::Duration::from_secs(10),
            ..HttpSettings::default()
        })
        .push(PushLimits {
            max_body_bytes: PUSH_LIMIT,
            ..PushLimits::default()
        });
    let server = std::sync::Arc::new(TestServer::start_with(backend, options).await);
    let mut senders = Vec::new();
    for sender in 0..4 {
        let server = server.clone();
        senders.push(tokio::spawn(async move {
            for round in 0..48 {
                // Within the drain's bound but the last, which is answered Connection: close.
                let over = [1, 1024, PUSH_LIMIT / 2, PUSH_LIMIT, 4 * LIMIT][round % 5];
                let (path, limit) =
                    [("/spaces/s/push", PUSH_LIMIT), ("/spaces/s/pull", LIMIT)][round % 2];
                let chunked = round % 3 == 0;
                let what = format!(
                    "sender {sender} round {round} ({over} over at {path}, chunked {chunked})"
                );
                match send_oversized(&server, path, limit + over, chunked).await {
                    Ok((status, body)) => {
                        assert_client_error(status, &body, 413, "PayloadTooLarge", "limit")
                    }
                    Err(error) if over > LIMIT => eprintln!("{what}: reset: {error}"),
                    Err(error) => panic!("{what}: no answer: {error}"),
                }
                let pull = json!({"pullVersion": 1, "clientGroupID": "p", "cookie": null});
                let next = server
                    .http
                    .post(server.url("/spaces/s/pull"))
                    .json(&pull)
                    .send();
                let status = next
                    .await
                    .unwrap_or_else(|error| panic!("{what}: the next request: {error}"))
                    .status();
                assert_eq!(status, 200, "{what}: the next request");
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    assert_eq!(server.state("s", "g").await.lmid("c"), 0);
    let (drained, left) = (
        server.metrics.request_bodies_drained.get(),
        server.metrics.request_bodies_left_unread.get(),
    );
    // At least the pushes with a declared length, which are refused before a byte is read: 48
    // within the drain's bound, 16 past it.
    assert!(
        drained >= 48 && left >= 16,
        "drained {drained}, left {left}"
    );
}

/// Posts a push body padded to `length` bytes, whole or in 8 KiB chunks (without a length).
async fn send_oversized(
    server: &TestServer,
    path: &str,
    length: usize,
    chunked: bool,
) -> Result<(u16, Value), reqwest::Error> {
    let mut body = push_body("g", &[("c", 1, "increment", inc("n", 1))]);
    let unpadded = body.to_string().len() + r#","pad":"""#.len();
    body["mutations"][0]["args"]["pad"] = json!("x".repeat(length.saturating_sub(unpadded)));
    let body = body.to_string();
    let body = if chunked {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
            .as_bytes()
            .chunks(8 * 1024)
            .map(|chunk| Ok(chunk.to_vec()))
            .collect();
        reqwest::Body::wrap_stream(futures::stream::iter(chunks))
    } else {
        reqwest::Body::from(body)
    };
    let response = server
        .http
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}
