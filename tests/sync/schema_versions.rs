//! Schema versions (REPLISYNC_SCHEMA_VERSIONS): a push or pull from a client schemaVersion the
//! server does not serve is answered VersionNotSupported (schema), changes nothing and is counted.

use replisync::http::settings::HttpSettings;
use replisync::protocol::SchemaVersions;
use replisync::startup::App;
use serde_json::{Value, json};

use crate::harness::{Backend, TestServer, inc, push_body};
use crate::js_mutators::metric;

async fn serving(backend: Backend, versions: SchemaVersions) -> TestServer {
    let http = HttpSettings {
        schema_versions: versions,
        ..HttpSettings::default()
    };
    TestServer::start_with(backend, App::builder().http(http)).await
}

fn with_schema(mut body: Value, schema_version: &str) -> Value {
    body["schemaVersion"] = json!(schema_version);
    body
}

async fn an_old_schema_version_is_told_to_update_and_changes_nothing(backend: Backend) {
    let server = serving(backend, SchemaVersions::parse("2,3")).await;
    let not_supported = json!({"error": "VersionNotSupported", "versionType": "schema"});
    let old_push = with_schema(push_body("g1", &[("c1", 1, "increment", inc("n", 1))]), "1");
    assert_eq!(
        server.push("s", &old_push).await,
        (200, not_supported.clone())
    );
    let pull = |group: &str, schema: &str| {
        json!({"pullVersion": 1, "schemaVersion": schema, "profileID": "p",
               "clientGroupID": group, "cookie": null})
    };
    let old_pull = server
        .post_raw("/spaces/s/pull", pull("g1", "1").to_string(), "")
        .await;
    assert_eq!(old_pull, (200, not_supported.clone()));
    // A client that sets no schemaVersion sends "", which this list does not serve either.
    let unset = server
        .post_raw("/spaces/s/pull", pull("g1", "").to_string(), "")
        .await;
    assert_eq!(unset, (200, not_supported));
    assert_eq!(
        metric(&server, "replisync_schema_version_refused_total").await,
        3
    );
    // The served versions work, and the refused push wrote nothing.
    let new_push = with_schema(push_body("g2", &[("c2", 1, "increment", inc("n", 1))]), "3");
    assert_eq!(server.push("s", &new_push).await, (200, json!({})));
    let (status, answer) = server
        .post_raw("/spaces/s/pull", pull("g2", "2").to_string(), "")
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["cookie"], 1, "one push applied: {answer}");
    assert_eq!(
        answer["patch"][1],
        json!({"op": "put", "key": "n", "value": 1})
    );
    assert_eq!(answer["lastMutationIDChanges"], json!({"c2": 1}));
}

async fn unset_serves_every_schema_version(backend: Backend) {
    let server = serving(backend, SchemaVersions::any()).await;
    for (i, schema) in ["", "1", "anything"].into_iter().enumerate() {
        let group = format!("g{i}");
        let client = format!("c{i}");
        let push = with_schema(
            push_body(&group, &[(&client, 1, "increment", inc("n", 1))]),
            schema,
        );
        assert_eq!(
            server.push("s", &push).await,
            (200, json!({})),
            "{schema:?}"
        );
    }
}

crate::on_both_stores!(
    an_old_schema_version_is_told_to_update_and_changes_nothing,
    unset_serves_every_schema_version,
);
