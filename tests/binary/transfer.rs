//! Outgrowing one machine, as docs/export-import.md walks through it: every space of the
//! embedded SQLite store exported with `replisync export --all`, imported into Postgres with
//! `replisync import`, and served from there to new clients and to clients of the old store.

use std::process::Output;

use serde_json::{Value, json};

use crate::harness::{PgDatabase, post, replisync_command, start_with, stdout_of_success};

/// Runs `replisync ARGS` in `dir` with only `env`, to its end.
fn run(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    replisync_command(dir, args, env).output().unwrap()
}

fn push(space: &str, group: &str, id: u64, name: &str, args: Value) -> (String, Value) {
    let body = json!({"pushVersion": 1, "schemaVersion": "", "profileID": "p", "clientGroupID": group,
        "mutations": [{"id": id, "name": name, "args": args, "timestamp": 1.0,
                       "clientID": format!("{group}-client")}]});
    (format!("/spaces/{space}/push"), body)
}

fn pull_body(group: &str, cookie: Value) -> Value {
    json!({"pullVersion": 1, "schemaVersion": "", "profileID": "p", "clientGroupID": group,
           "cookie": cookie})
}

/// The entries a pull answer from scratch holds.
fn entries(answer: &Value) -> Value {
    assert_eq!(answer["patch"][0], json!({"op": "clear"}), "{answer}");
    let entries: serde_json::Map<String, Value> = answer["patch"].as_array().unwrap()[1..]
        .iter()
        .map(|op| (op["key"].as_str().unwrap().to_owned(), op["value"].clone()))
        .collect();
    Value::Object(entries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_space_moves_from_sqlite_to_postgres() {
    let dir = tempfile::tempdir().unwrap();
    // The embedded store: no DATABASE_URL.
    let sqlite = start_with(dir.path(), &[]);
    let writes = [
        push(
            "todos",
            "g1",
            1,
            "set",
            json!({"key": "todo/1", "value": {"title": "milk"}}),
        ),
        push(
            "todos",
            "g1",
            2,
            "set",
            json!({"key": "todo/2", "value": {"title": "eggs"}}),
        ),
        push("todos", "g1", 3, "delete", json!({"key": "todo/1"})),
        push(
            "counter",
            "g2",
            1,
            "increment",
            json!({"key": "n", "delta": 41}),
        ),
        push(
            "counter",
            "g2",
            2,
            "increment",
            json!({"key": "n", "delta": 1}),
        ),
    ];
    for (path, body) in writes {
        assert_eq!(post(&sqlite.base, &path, body).await, json!({}));
    }
    let mut before = Vec::new();
    for space in ["counter", "todos"] {
        let answer = post(
            &sqlite.base,
            &format!("/spaces/{space}/pull"),
            pull_body("old", Value::Null),
        )
        .await;
        before.push((space, answer["cookie"].clone(), entries(&answer)));
    }
    sqlite.stop();

    // Export: stdout holds the spaces and nothing else (log lines go to stderr).
    let exported = run(dir.path(), &["export", "--all"], &[]);
    let text = stdout_of_success(&exported);
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("every stdout line is JSON"))
        .collect();
    assert_eq!(
        lines.len(),
        2 * 2 + 2,
        "two headers, two ends, two entries: {text}"
    );
    assert!(String::from_utf8_lossy(&exported.stderr).contains("exported 2 spaces, 2 entries"));
    std::fs::write(dir.path().join("all.ndjson"), &text).unwrap();

    let db = PgDatabase::create().await;
    let url = db.url();
    let postgres = [("DATABASE_URL", url.as_str())];
    let imported = run(dir.path(), &["import", "--input", "all.ndjson"], &postgres);
    stdout_of_success(&imported);
    let report = String::from_utf8_lossy(&imported.stderr).into_owned();
    assert!(report.contains("imported 2 spaces, 2 entries"), "{report}");
    // A second import finds the spaces there and changes nothing.
    let again = run(dir.path(), &["import", "--input", "all.ndjson"], &postgres);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists in this database already"));

    let server = start_with(dir.path(), &postgres);
    for (space, old_cookie, data) in &before {
        let path = format!("/spaces/{space}/pull");
        let fresh = post(&server.base, &path, pull_body("new", Value::Null)).await;
        assert_eq!(
            &entries(&fresh),
            data,
            "{space}: a new client gets the same data"
        );
        // A client of the SQLite store pulls with its old cookie: the whole space again.
        let old = post(&server.base, &path, pull_body("old", old_cookie.clone())).await;
        assert_eq!(&entries(&old), data, "{space}");
        assert!(old["cookie"].as_u64().unwrap() > old_cookie.as_u64().unwrap());
    }
    // And Postgres takes new writes.
    let (path, body) = push(
        "counter",
        "g3",
        1,
        "increment",
        json!({"key": "n", "delta": 1}),
    );
    assert_eq!(post(&server.base, &path, body).await, json!({}));
    server.stop();
    db.drop_it().await;
}
