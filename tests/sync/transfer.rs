//! Export and import (`replisync export` / `import`, here through the functions they call): an
//! export under concurrent pushes is one snapshot; an import creates spaces all or nothing,
//! never over an existing one, and clients of the old database (any cookie) get the whole
//! imported space on their next pull.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use replisync::protocol::SpaceId;
use replisync::transfer::{self, ExportArgs, IMPORT_VERSION_GAP, Which, export_to, import_from};
use serde_json::{Value, json};

use crate::harness::{Backend, PullView, TestServer, inc, push_body};

/// Exports `spaces` of `server`'s store; the NDJSON text.
async fn export(server: &TestServer, which: Which) -> String {
    let mut out = Vec::new();
    export_to(&*server.store, which, &mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

fn named(spaces: &[&str]) -> Which {
    Which::Named(spaces.iter().map(|s| SpaceId::parse(s).unwrap()).collect())
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Pushes one mutation of client `c{group}` to `space`.
async fn push(server: &TestServer, space: &str, group: &str, id: u64, name: &str, args: Value) {
    let client = format!("c{group}");
    server
        .push_ok(space, &push_body(group, &[(&client, id, name, args)]))
        .await;
}

async fn an_export_under_concurrent_pushes_is_one_snapshot(backend: Backend) {
    let server = Arc::new(TestServer::start(backend).await);
    push(
        &server,
        "doc",
        "seed",
        1,
        "set",
        json!({"key": "count", "value": 0}),
    )
    .await;
    let done = Arc::new(AtomicBool::new(false));
    // Each push sets one new key and counts it, in one commit: a snapshot has as many keys as
    // the count says, at one version more (the seed's).
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let (server, done) = (server.clone(), done.clone());
            tokio::spawn(async move {
                for id in 1..=40u64 {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    let group = format!("w{writer}");
                    let client = format!("c{writer}");
                    let key = format!("k/{writer}/{id}");
                    let body = push_body(
                        &group,
                        &[
                            (&client, 2 * id - 1, "set", json!({"key": key, "value": id})),
                            (&client, 2 * id, "increment", inc("count", 1)),
                        ],
                    );
                    server.push_ok("doc", &body).await;
                }
            })
        })
        .collect();
    let mut exports = 0;
    for _ in 0..30 {
        let text = export(&server, named(&["doc"])).await;
        let lines = lines(&text);
        let header = &lines[0];
        let count = lines
            .iter()
            .find(|l| l["key"] == "count")
            .map_or(0, |l| l["value"].as_u64().unwrap());
        let keys = lines
            .iter()
            .filter(|l| l["key"].as_str().is_some_and(|k| k.starts_with("k/")))
            .count() as u64;
        assert_eq!(keys, count, "one snapshot: as many keys as counted");
        assert_eq!(
            header["version"],
            count + 1,
            "the header's version is the snapshot's"
        );
        let end = lines.last().unwrap();
        assert_eq!(end["entries"], lines.len() as u64 - 2);
        exports += 1;
    }
    done.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(exports > 0);
}

async fn an_import_converges_new_and_old_clients(backend: Backend) {
    let old = TestServer::start(backend).await;
    push(
        &old,
        "doc",
        "a",
        1,
        "set",
        json!({"key": "keep", "value": 1}),
    )
    .await;
    push(
        &old,
        "doc",
        "a",
        2,
        "set",
        json!({"key": "gone", "value": 2}),
    )
    .await;
    let early = old.state("doc", "a").await;
    push(&old, "doc", "a", 3, "delete", json!({"key": "gone"})).await;
    push(&old, "doc", "a", 4, "increment", inc("n", 7)).await;
    let text = export(&old, named(&["doc"])).await;
    // The old database goes on after the export: a client there is ahead of it.
    push(
        &old,
        "doc",
        "a",
        5,
        "set",
        json!({"key": "late", "value": 5}),
    )
    .await;
    let late = old.state("doc", "a").await;

    let new = TestServer::start(backend).await;
    let imported = import_from(&*new.store, text.as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(imported.entries, 2);
    assert_eq!(
        imported.spaces,
        vec![("doc".to_owned(), 4 + IMPORT_VERSION_GAP)]
    );

    let expected = json!({"keep": 1, "n": 7});
    let fresh = new.state("doc", "fresh").await;
    assert_eq!(Value::Object(fresh.entries.clone()), expected);
    assert_eq!(fresh.cookie, 4 + IMPORT_VERSION_GAP);
    // Old clients, whatever their cookie (before the export, or past it on the old database),
    // get `clear` and the whole space, and no mutation ids from a database that never saw
    // their group.
    for (name, mut view) in [("early", early), ("late", late)] {
        let answer = new.pull_ok("doc", "a", json!(view.cookie)).await;
        assert_eq!(
            answer["patch"][0],
            json!({"op": "clear"}),
            "{name}: {answer}"
        );
        assert_eq!(answer["lastMutationIDChanges"], json!({}), "{name}");
        view.apply(&answer);
        assert_eq!(Value::Object(view.entries), expected, "{name}");
    }
    // The old client's next mutation (id 6) is not applied on a database that never saw it:
    // ClientStateNotFound, and Replicache starts a new group.
    let (status, answer) = new
        .push(
            "doc",
            &push_body("a", &[("ca", 6, "increment", inc("n", 1))]),
        )
        .await;
    assert_eq!(
        (status, answer),
        (200, json!({"error": "ClientStateNotFound"}))
    );
    // A write on the new database reaches a client of the import by a plain delta.
    push(&new, "doc", "b", 1, "increment", inc("n", 1)).await;
    let mut fresh: PullView = fresh;
    let answer = new.pull_ok("doc", "fresh", json!(fresh.cookie)).await;
    fresh.apply(&answer);
    assert_eq!(fresh.entries["n"], 8);
}

async fn an_import_is_all_or_nothing_and_never_over_a_space(backend: Backend) {
    let source = TestServer::start(backend).await;
    push(
        &source,
        "a",
        "g",
        1,
        "set",
        json!({"key": "x", "value": "a"}),
    )
    .await;
    push(
        &source,
        "b",
        "h",
        1,
        "set",
        json!({"key": "y", "value": "b"}),
    )
    .await;
    let both = export(&source, Which::All).await;
    assert_eq!(
        lines(&both)
            .iter()
            .filter(|l| l["space"].is_string())
            .count(),
        2
    );

    let target = TestServer::start(backend).await;
    push(
        &target,
        "b",
        "t",
        1,
        "set",
        json!({"key": "mine", "value": 1}),
    )
    .await;
    let before = target.db.fingerprint().await;
    let refused = import_from(&*target.store, both.as_bytes(), None).await;
    let message = format!("{:#}", refused.unwrap_err());
    assert!(message.contains("space b exists"), "{message}");
    assert_eq!(
        target.db.fingerprint().await,
        before,
        "space a was not imported either"
    );

    let only_a = export(&source, named(&["a"])).await;
    let cut: String = only_a.lines().take(2).map(|l| format!("{l}\n")).collect();
    let damaged = only_a.replace("\"entries\":1", "\"entries\":2");
    for (bad, problem) in [
        (cut.as_str(), "cut short"),
        (damaged.as_str(), "damaged"),
        ("{\"key\":\"x\",\"value\":1}\n", "header"),
        ("not json\n", "line 1"),
        ("", "no space"),
    ] {
        let refused = import_from(&*target.store, bad.as_bytes(), None).await;
        let message = format!("{:#}", refused.unwrap_err());
        assert!(message.contains(problem), "{problem}: {message}");
    }
    // Values are checked as a push's are; `null` is one; a key twice is a damaged file.
    let header = r#"{"space":"v","version":1,"format":"replisync-space/1"}"#;
    for (value, problem) in [("1e400", "out of range"), (r#""\ud800""#, "hex escape")] {
        let file = format!(
            "{header}\n{{\"key\":\"a\",\"value\":{value}}}\n{{\"end\":\"v\",\"entries\":1}}\n"
        );
        let refused = import_from(&*target.store, file.as_bytes(), None).await;
        let message = format!("{:#}", refused.unwrap_err());
        assert!(message.contains(problem), "{value}: {message}");
    }
    let twice = format!(
        "{header}\n{{\"key\":\"a\",\"value\":1}}\n{{\"key\":\"a\",\"value\":2}}\n{{\"end\":\"v\",\"entries\":2}}\n"
    );
    let refused = import_from(&*target.store, twice.as_bytes(), None).await;
    let message = format!("{:#}", refused.unwrap_err());
    assert!(message.contains("a key appears twice"), "{message}");
    assert_eq!(target.db.fingerprint().await, before);
    let null =
        format!("{header}\n{{\"key\":\"a\",\"value\":null}}\n{{\"end\":\"v\",\"entries\":1}}\n");
    import_from(&*target.store, null.as_bytes(), None)
        .await
        .unwrap();
    let view = target.state("v", "r").await;
    assert_eq!(Value::Object(view.entries), json!({"a": null}));
    let before = target.db.fingerprint().await;

    // A space's file may go under another id, but a file of two spaces may not.
    let renamed = Some(SpaceId::parse("a2").unwrap());
    let refused = import_from(&*target.store, both.as_bytes(), renamed.clone()).await;
    assert!(format!("{:#}", refused.unwrap_err()).contains("more than one space"));
    assert_eq!(target.db.fingerprint().await, before);
    import_from(&*target.store, only_a.as_bytes(), renamed)
        .await
        .unwrap();
    let view = target.state("a2", "r").await;
    assert_eq!(Value::Object(view.entries), json!({"x": "a"}));
    // An export of a space never written is refused, and leaves the file it was to replace.
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup.ndjson");
    std::fs::write(&backup, "an earlier backup").unwrap();
    let args = |spaces: &[&str]| ExportArgs {
        spaces: spaces.iter().map(|s| (*s).to_owned()).collect(),
        all: false,
        output: Some(backup.clone()),
    };
    let missing = transfer::export(&*target.store, &args(&["a2", "nothing"])).await;
    assert!(format!("{:#}", missing.unwrap_err()).contains("never been written"));
    assert_eq!(
        std::fs::read_to_string(&backup).unwrap(),
        "an earlier backup"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no partial file is left"
    );
    transfer::export(&*target.store, &args(&["a2"]))
        .await
        .unwrap();
    assert!(
        std::fs::read_to_string(&backup)
            .unwrap()
            .starts_with(r#"{"space":"a2""#)
    );
}

crate::on_both_stores!(
    an_export_under_concurrent_pushes_is_one_snapshot,
    an_import_converges_new_and_old_clients,
    an_import_is_all_or_nothing_and_never_over_a_space,
);
