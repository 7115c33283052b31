//! JSON logs with JSON types: a list is a JSON array, numbers are numbers, and an event inside a
//! request carries the request span's fields, those recorded later (the space) included.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{poll_for, start_with};

#[tokio::test]
async fn lists_are_arrays_and_span_fields_keep_their_types() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(
        dir.path(),
        &[
            ("REPLISYNC_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,replisync::push=debug"),
        ],
    );
    let push = json!({"pushVersion": 1, "schemaVersion": "", "profileID": "p", "clientGroupID": "g1",
        "mutations": [{"id": 1, "name": "no-such-mutator", "args": {}, "timestamp": 1.0, "clientID": "c1"}]});
    crate::harness::post(&server.base, "/spaces/demo/push", push).await;
    let failed = poll_for(Duration::from_secs(10), || {
        server
            .log_lines()
            .into_iter()
            .find(|line| line.contains("mutations failed"))
    })
    .await
    .expect("the failed mutation is logged");
    let failed: Value = serde_json::from_str(&failed).unwrap();
    let first = failed["fields"]["first"]
        .as_array()
        .unwrap_or_else(|| panic!("an array: {failed}"));
    assert_eq!(first.len(), 1, "{failed}");
    assert!(
        first[0].as_str().unwrap().contains("no-such-mutator"),
        "{failed}"
    );
    assert_eq!(failed["fields"]["failed"], 1, "{failed}");
    assert_eq!(failed["span"]["name"], "request", "{failed}");
    assert_eq!(failed["span"]["route"], "/spaces/{space}/push", "{failed}");
    assert_eq!(
        failed["span"]["space"], "demo",
        "recorded after the span began: {failed}"
    );
    assert_eq!(failed["spans"][0]["name"], "request", "{failed}");
    server.stop();
}
