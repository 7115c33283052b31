//! The running server: data kept across restarts, JavaScript mutators, logs that cannot be
//! flooded, `/metrics` on its own address and the `healthcheck` subcommand.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{post, start, start_with};

#[tokio::test]
async fn data_survives_a_restart_with_no_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let health: Value = reqwest::get(format!("{}/healthz", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health, json!({"status": "ok", "store": "sqlite"}));
    let push = json!({"pushVersion": 1, "schemaVersion": "", "profileID": "p", "clientGroupID": "g",
        "mutations": [
            {"id": 1, "name": "set", "args": {"key": "greeting", "value": "hello"}, "timestamp": 1.0, "clientID": "c"},
            {"id": 2, "name": "increment", "args": {"key": "n", "delta": 41}, "timestamp": 2.0, "clientID": "c"},
            {"id": 3, "name": "increment", "args": {"key": "n", "delta": 1}, "timestamp": 3.0, "clientID": "c"}]});
    assert_eq!(
        post(&server.base, "/spaces/demo/push", push).await,
        json!({})
    );
    server.stop();
    assert!(
        dir.path().join("replisync-data/replisync.db").exists(),
        "the default SQLite file"
    );

    let server = start(dir.path());
    let pull = json!({"pullVersion": 1, "schemaVersion": "", "profileID": "p", "clientGroupID": "g", "cookie": null});
    let body = post(&server.base, "/spaces/demo/pull", pull).await;
    assert_eq!(body["cookie"], json!(1));
    assert_eq!(body["lastMutationIDChanges"], json!({"c": 3}));
    let mut patch = body["patch"].as_array().unwrap().clone();
    patch.sort_by_key(|op| op["key"].as_str().unwrap_or("").to_owned());
    assert_eq!(
        patch,
        vec![
            json!({"op": "clear"}),
            json!({"op": "put", "key": "greeting", "value": "hello"}),
            json!({"op": "put", "key": "n", "value": 42}),
        ]
    );
    server.stop();
}

/// Failing mutations cannot flood or forge the log: one line per push, arguments cut short,
/// client strings escaped.
#[tokio::test]
async fn failing_mutations_are_one_short_escaped_log_line_per_push() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let huge = "y".repeat(1024 * 1024);
    let mut mutations = vec![
        // Invalid arguments of a megabyte: the error quotes them.
        json!({"id": 1, "name": "set", "args": [huge], "timestamp": 1.0, "clientID": "c"}),
        json!({"id": 2, "name": "nope\nINFO forged: all is well", "args": {},
               "timestamp": 1.0, "clientID": "c"}),
    ];
    for id in 3..=2000u64 {
        mutations.push(json!({"id": id, "name": "unknownMutator", "args": {},
            "timestamp": 1.0, "clientID": "c"}));
    }
    let push = json!({"pushVersion": 1, "clientGroupID": "g", "mutations": mutations});
    assert_eq!(
        post(&server.base, "/spaces/logs/push", push).await,
        json!({})
    );
    let pull = json!({"pullVersion": 1, "clientGroupID": "g", "cookie": null});
    assert_eq!(
        post(&server.base, "/spaces/logs/pull", pull).await["lastMutationIDChanges"],
        json!({"c": 2000})
    );
    let log = server.log.lock().unwrap().clone();
    let failure_lines: Vec<&String> = log
        .iter()
        .filter(|line| line.contains("mutations failed"))
        .collect();
    assert_eq!(
        failure_lines.len(),
        1,
        "one line per push: {failure_lines:#?}"
    );
    assert!(
        failure_lines[0].contains("failed=2000"),
        "{}",
        failure_lines[0]
    );
    assert!(
        log.iter().all(|line| line.len() < 4096),
        "a log line of {} bytes",
        log.iter().map(String::len).max().unwrap_or(0)
    );
    assert!(
        !log.iter().any(|line| line.starts_with("INFO forged")),
        "a mutation name forged a log line"
    );
}

#[tokio::test]
async fn metrics_can_move_to_an_address_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), &[("REPLISYNC_METRICS_LISTEN", "127.0.0.1:0")]);
    let logged = server.wait_for_log("/metrics listening", Duration::from_secs(5));
    let logged = logged.await.expect("the metrics address is logged");
    let metrics_address = logged.split("address=").nth(1).expect("an address").trim();
    let client = reqwest::Client::new();
    let main = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        main.status(),
        404,
        "/metrics is still served beside push and pull"
    );
    let own = client
        .get(format!("http://{metrics_address}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    assert!(own.text().await.unwrap().contains("replisync_pushes_total"));
    let pull = client
        .post(format!("http://{metrics_address}/spaces/s/pull"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        pull.status(),
        404,
        "the metrics address serves nothing else"
    );
    server.stop();
}

/// The fixture module's mutators run in the binary; a failing one is logged with its name, id
/// and reason, and its `increment` replaces the built-in one (said at start-up).
#[tokio::test]
async fn javascript_mutators_run_and_their_failures_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mutators.js");
    let server = start_with(dir.path(), &[("REPLISYNC_MUTATORS", fixture)]);
    let mutation = |id: u64, name: &str, args: Value| json!({"id": id, "name": name, "args": args, "timestamp": 1.0, "clientID": "c"});
    let push = json!({"pushVersion": 1, "clientGroupID": "g", "mutations": [
        mutation(1, "increment", json!({"key": "n", "delta": 4})),
        mutation(2, "throws", json!({"key": "k"})),
        mutation(3, "createTodo", json!({"id": 1, "title": "milk"})),
    ]});
    assert_eq!(post(&server.base, "/spaces/js/push", push).await, json!({}));
    let pull = json!({"pullVersion": 1, "clientGroupID": "g", "cookie": null});
    let pulled = post(&server.base, "/spaces/js/pull", pull).await;
    assert_eq!(pulled["lastMutationIDChanges"], json!({"c": 3}));
    let mut puts: Vec<Value> = pulled["patch"].as_array().unwrap()[1..].to_vec();
    puts.sort_by_key(|op| op["key"].as_str().unwrap().to_owned());
    assert_eq!(
        puts,
        [
            json!({"op": "put", "key": "n", "value": 4}),
            json!({"op": "put", "key": "todo/1",
                   "value": {"id": 1, "title": "milk", "createdBy": "anonymous"}}),
        ]
    );
    let log = server.log.lock().unwrap().clone();
    let failure = log
        .iter()
        .find(|line| line.contains("mutations failed"))
        .expect("the failure is logged");
    for part in ["c#2 throws", "threw", "refused on purpose"] {
        assert!(failure.contains(part), "{part:?} in {failure}");
    }
    assert!(
        log.iter()
            .any(|line| line.contains("replaces the built-in") && line.contains("increment")),
        "the clash with the built-in increment is logged"
    );
    server.stop();
}

/// `replisync healthcheck` exits 0 while the server on its port answers, 1 once it is gone.
#[tokio::test]
async fn the_healthcheck_subcommand_asks_the_server_on_its_port() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let address = server.base.trim_start_matches("http://").to_owned();
    let port = address.rsplit(':').next().unwrap().to_owned();
    let check = |listen: String| {
        Command::new(env!("CARGO_BIN_EXE_replisync"))
            .args(["--listen", &listen, "healthcheck"])
            .env_clear()
            .output()
            .unwrap()
    };
    let up = check(format!("0.0.0.0:{port}"));
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    server.stop();
    let down = check(address);
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("/healthz"));
}
