//! JavaScript mutators (REPLISYNC_MUTATORS): the fixture module tests/fixtures/mutators.js run
//! by the embedded engine, against each store.

use std::path::PathBuf;
use std::time::Duration;

use replisync::mutators::Mutators;
use replisync::mutators::js::{JsLimits, JsMutators};
use serde_json::{Value, json};

use crate::harness::{Backend, Options, TestServer, push_body};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mutators.js")
}

/// Limits small enough for the failure tests to be quick.
fn test_limits() -> JsLimits {
    JsLimits {
        timeout: Duration::from_millis(500),
        memory_bytes: 16 * 1024 * 1024,
        engines: 2,
    }
}

async fn js_server(backend: Backend) -> TestServer {
    let js = JsMutators::load(&fixture(), test_limits()).expect("the fixture loads");
    let options = Options {
        mutators: js.register(Mutators::builtin()),
        ..Options::default()
    };
    TestServer::start_with(backend, options).await
}

/// Pushes `mutations` (client `c1`, ids from `first_id`) to `space` and answers its entries.
async fn run(
    server: &TestServer,
    space: &str,
    first_id: u64,
    mutations: &[(&str, Value)],
) -> serde_json::Map<String, Value> {
    let numbered: Vec<(&str, u64, &str, Value)> = mutations
        .iter()
        .enumerate()
        .map(|(i, (name, args))| ("c1", first_id + i as u64, *name, args.clone()))
        .collect();
    let (status, body) = server.push(space, &push_body("g1", &numbered)).await;
    assert_eq!((status, &body), (200, &json!({})), "push to {space}");
    server.state(space, "g1").await.entries
}

async fn smoke(backend: Backend) {
    let server = js_server(backend).await;
    let entries = run(
        &server,
        "s",
        1,
        &[
            ("increment", json!({"key": "n", "delta": 2})),
            ("increment", json!({"key": "n", "delta": 3})),
            ("probeGet", json!({"key": "n", "into": "out"})),
        ],
    )
    .await;
    assert_eq!(entries["n"], json!(5));
    assert_eq!(
        entries["out"],
        json!({"found": true, "value": 5, "has": true})
    );
}

crate::on_both_stores!(smoke);
