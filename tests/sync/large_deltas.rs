//! Incremental pulls of a delta too large to build in memory are streamed from a snapshot of
//! their own, and answer exactly what a shared (built) delta would: puts, deletions and clients.

use replisync::pull::PullLimits;
use replisync::startup::{App, AppBuilder};
use serde_json::{Value, json};

use crate::harness::{Backend, PullView, TestServer, inc, push_body};

fn small_shared_deltas() -> AppBuilder {
    App::builder().pulls(PullLimits {
        max_shared_delta_bytes: 2048,
        ..PullLimits::default()
    })
}

async fn a_delta_too_large_to_share_is_streamed_with_the_same_answer(backend: Backend) {
    let server = TestServer::start_with(backend, small_shared_deltas()).await;
    let set = |key: &str, value: Value| json!({"key": key, "value": value});
    let early = push_body(
        "writers",
        &[
            ("w", 1, "set", set("gone", json!("soon deleted"))),
            ("w", 2, "set", set("kept", json!("as it was"))),
        ],
    );
    assert_eq!(server.push("s", &early).await.0, 200);
    let (status, first) = server.pull("s", "readers", Value::Null).await;
    assert_eq!(status, 200);
    let mut view = PullView::from_response(&first);

    // 40 values of 100 bytes and a deletion: well over the 2 KB shared-delta limit.
    let mut later = vec![("w", 3, "delete", json!({"key": "gone"}))];
    for index in 0..40u64 {
        later.push((
            "w",
            4 + index,
            "set",
            set(&format!("big/{index:02}"), json!("v".repeat(100))),
        ));
    }
    assert_eq!(server.push("s", &push_body("writers", &later)).await.0, 200);
    let own = push_body("readers", &[("r", 1, "increment", inc("count", 2))]);
    assert_eq!(server.push("s", &own).await.0, 200);

    let (status, delta) = server.pull("s", "readers", json!(view.cookie)).await;
    assert_eq!(status, 200, "{delta}");
    assert_eq!(
        server.metrics.pull_deltas_streamed.get(),
        1,
        "the delta was not streamed"
    );
    let patch = delta["patch"].as_array().unwrap();
    assert_eq!(
        patch.len(),
        42,
        "40 puts, one deletion, one increment: {delta}"
    );
    assert!(patch.contains(&json!({"op": "del", "key": "gone"})));
    assert!(
        !patch.iter().any(|op| op["op"] == "clear"),
        "a delta never clears"
    );
    assert_eq!(
        delta["lastMutationIDChanges"],
        json!({"r": 1}),
        "only the pulling group's clients"
    );

    // Applied to the earlier state, the streamed delta gives exactly what a first pull gives.
    view.apply(&delta);
    let fresh = server.state("s", "readers").await;
    assert_eq!(view.cookie, fresh.cookie);
    assert_eq!(view.entries, fresh.entries);
    assert_eq!(view.entries.len(), 42); // kept, count and 40 big ones

    // A small delta is still built once and shared.
    let small = push_body("readers", &[("r", 2, "increment", inc("count", 1))]);
    assert_eq!(server.push("s", &small).await.0, 200);
    let (status, delta) = server.pull("s", "readers", json!(view.cookie)).await;
    assert_eq!(status, 200);
    assert_eq!(
        delta["patch"],
        json!([{"op": "put", "key": "count", "value": 3}])
    );
    assert_eq!(server.metrics.pull_deltas_streamed.get(), 1);
}

crate::on_both_stores!(a_delta_too_large_to_share_is_streamed_with_the_same_answer);
