//! JavaScript mutators (REPLISYNC_MUTATORS): the fixture module tests/fixtures/mutators.js run
//! by the embedded engine, against each store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use replisync::auth::{AuthError, Authenticator, Identity};
use replisync::mutators::Mutators;
use replisync::mutators::js::{JsLimits, JsMutators};
use replisync::startup::App;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::faults::{Faulty, Op, Signal};
use crate::harness::{Backend, StoreOptions, TestServer, push_body};

pub(crate) fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mutators.js")
}

/// Limits small enough for the failure tests to be quick.
pub(crate) fn test_limits() -> JsLimits {
    JsLimits {
        timeout: Duration::from_millis(500),
        memory_bytes: 16 * 1024 * 1024,
        engines: 2,
        ..JsLimits::default()
    }
}

async fn js_server(backend: Backend) -> TestServer {
    js_server_with(backend, test_limits()).await
}

pub(crate) async fn js_server_with(backend: Backend, limits: JsLimits) -> TestServer {
    let js = JsMutators::load(&fixture(), limits).expect("the fixture loads");
    let options = App::builder()
        .mutators(js.register(Mutators::builtin()))
        .authenticator(Arc::new(TokenIsUser));
    TestServer::start_with(backend, options).await
}

/// The Authorization header is the user id (empty: "nobody").
pub(crate) struct TokenIsUser;

#[async_trait]
impl Authenticator for TokenIsUser {
    async fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, AuthError> {
        let user = authorization.filter(|a| !a.is_empty()).unwrap_or("nobody");
        Ok(Identity::with_full_access(user))
    }
}

/// Pushes `mutations` (client `c-<space>` of group `g-<space>`, ids from `first_id`) to `space` and answers its entries.
pub(crate) async fn run(
    server: &TestServer,
    space: &str,
    first_id: u64,
    mutations: &[(&str, Value)],
) -> serde_json::Map<String, Value> {
    let (group, client) = (format!("g-{space}"), format!("c-{space}"));
    let numbered: Vec<(&str, u64, &str, Value)> = mutations
        .iter()
        .enumerate()
        .map(|(i, (name, args))| (client.as_str(), first_id + i as u64, *name, args.clone()))
        .collect();
    let (status, body) = server.push(space, &push_body(&group, &numbered)).await;
    assert_eq!((status, &body), (200, &json!({})), "push to {space}");
    server.state(space, &group).await.entries
}

fn set(key: &str, value: Value) -> (&'static str, Value) {
    ("set", json!({"key": key, "value": value}))
}

/// The value of one labelled series in the /metrics text.
/// JavaScript mutations failed for `reason` (threw, timeout, memory).
pub(crate) async fn failures(server: &TestServer, reason: &str) -> u64 {
    metric(
        server,
        &format!("replisync_mutations_failed_total{{kind=\"javascript\",reason=\"{reason}\"}}"),
    )
    .await
}

pub(crate) async fn metric(server: &TestServer, series: &str) -> u64 {
    let text = server.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

async fn get_has_and_is_empty(backend: Backend) {
    let server = js_server(backend).await;
    let entries = run(
        &server,
        "s",
        1,
        &[
            ("probeIsEmpty", json!({"into": "out/empty"})),
            ("probeGet", json!({"key": "missing", "into": "out/missing"})),
        ],
    )
    .await;
    assert_eq!(entries["out/empty"], json!(true));
    assert_eq!(
        entries["out/missing"],
        json!({"found": false, "value": null, "has": false})
    );

    // From the database, and a write of an earlier mutation in the same push.
    let entries = run(
        &server,
        "s",
        3,
        &[
            ("probeIsEmpty", json!({"into": "out/empty"})),
            (
                "probeGet",
                json!({"key": "out/missing", "into": "out/stored"}),
            ),
            ("setValue", json!({"key": "fresh", "value": {"n": [1, 2]}})),
            ("probeGet", json!({"key": "fresh", "into": "out/fresh"})),
        ],
    )
    .await;
    assert_eq!(entries["out/empty"], json!(false));
    assert_eq!(
        entries["out/stored"],
        json!({"found": true, "value": {"found": false, "value": null, "has": false}, "has": true})
    );
    assert_eq!(
        entries["out/fresh"],
        json!({"found": true, "value": {"n": [1, 2]}, "has": true})
    );
}

/// A key a mutator read before goes along with its next mutations, its value as the push knows
/// it (read ahead with the push's first read on Postgres, or written by an earlier mutation of
/// the push), and the engine answers `tx.get` and `tx.has` of it itself: those answers follow
/// the mutation's own writes and deletes, and the next mutation sees the last write.
async fn what_goes_along_with_a_mutation_follows_its_writes(backend: Backend) {
    let server = js_server(backend).await;
    let probe = |into: &str| ("probeKnownKey", json!({"key": "k", "into": into}));
    let entries = run(&server, "s", 1, &[probe("out/0")]).await;
    assert_eq!(entries["k"], json!(11));
    let entries = run(&server, "s", 2, &[probe("out/1"), probe("out/2")]).await;
    let seen = |before: i64| {
        json!({
            "before": before, "afterSet": before + 1, "hasAfterSet": true,
            "afterDel": null, "hasAfterDel": false,
        })
    };
    assert_eq!(entries["out/1"], seen(11));
    assert_eq!(entries["out/2"], seen(22));
    assert_eq!(entries["k"], json!(33));
}

async fn set_put_and_del(backend: Backend) {
    let server = js_server(backend).await;
    let entries = run(
        &server,
        "s",
        1,
        &[
            ("setValue", json!({"key": "a", "value": 1})),
            ("putValue", json!({"key": "b", "value": "two"})),
            ("setValue", json!({"key": "gone", "value": true})),
        ],
    )
    .await;
    assert_eq!(entries["a"], json!(1));
    assert_eq!(entries["b"], json!("two"));
    assert_eq!(entries["gone"], json!(true));

    // Stored a, b, c; the mutation writes b and d, deletes a, then reads.
    run(
        &server,
        "s",
        4,
        &[
            set("w/a", json!("old a")),
            set("w/b", json!("old b")),
            set("w/c", json!("old c")),
        ],
    )
    .await;
    let entries = run(
        &server,
        "s",
        7,
        &[("probeOwnWrites", json!({"prefix": "w/", "into": "out"}))],
    )
    .await;
    assert_eq!(
        entries["out"],
        json!({
            "b": "new b", "a": null, "hasA": false, "deleted": true, "deletedMissing": false,
            "keys": ["w/b", "w/c", "w/d"],
        })
    );
    assert!(!entries.contains_key("w/a"), "the delete is committed");
    assert_eq!(entries["w/d"], json!("new d"));
}

/// Scans the fixture's keys with `options`, read back as `how` says.
fn scan(options: Value, how: &str, into: &str) -> (&'static str, Value) {
    (
        "probeScan",
        json!({"options": options, "how": how, "into": into}),
    )
}

async fn scan_options_and_results(backend: Backend) {
    let server = js_server(backend).await;
    run(
        &server,
        "s",
        1,
        &[
            set("a", json!("A")),
            set("b/1", json!(1)),
            set("b/2", json!(2)),
            set("b/3", json!(3)),
            set("c", json!("C")),
        ],
    )
    .await;
    let entries = run(
        &server,
        "s",
        6,
        &[
            scan(json!({"prefix": "b/"}), "values", "out/values"),
            scan(json!({"prefix": "b/"}), "keys", "out/keys"),
            scan(json!({"prefix": "b/"}), "entries", "out/entries"),
            scan(json!({"prefix": "b/"}), "toArray", "out/toArray"),
            scan(json!({"prefix": "b/"}), "forAwait", "out/forAwait"),
            scan(json!({"prefix": "b/"}), "keysToArray", "out/keysToArray"),
            scan(
                json!({"prefix": "b/"}),
                "entriesToArray",
                "out/entriesToArray",
            ),
            scan(
                json!({"prefix": "b/", "start": {"key": "b/2"}}),
                "keys",
                "out/start",
            ),
            scan(
                json!({"prefix": "b/", "start": {"key": "b/2", "exclusive": true}}),
                "keys",
                "out/exclusive",
            ),
            scan(
                json!({"prefix": "b/", "start": {"key": "a"}}),
                "keys",
                "out/startBeforePrefix",
            ),
            scan(
                json!({"start": {"key": "b/3"}}),
                "keys",
                "out/startNoPrefix",
            ),
            scan(json!({"limit": 2}), "keys", "out/limit"),
            scan(json!({"prefix": "b/", "limit": 0}), "keys", "out/limit0"),
            scan(json!({"prefix": "nothing/"}), "keys", "out/none"),
        ],
    )
    .await;
    assert_eq!(entries["out/values"], json!([1, 2, 3]));
    assert_eq!(entries["out/keys"], json!(["b/1", "b/2", "b/3"]));
    let pairs = json!([["b/1", 1], ["b/2", 2], ["b/3", 3]]);
    assert_eq!(entries["out/entries"], pairs);
    assert_eq!(entries["out/toArray"], json!([1, 2, 3]));
    assert_eq!(entries["out/forAwait"], json!([1, 2, 3]));
    assert_eq!(entries["out/keysToArray"], json!(["b/1", "b/2", "b/3"]));
    assert_eq!(entries["out/entriesToArray"], pairs);
    assert_eq!(entries["out/start"], json!(["b/2", "b/3"]));
    assert_eq!(entries["out/exclusive"], json!(["b/3"]));
    assert_eq!(
        entries["out/startBeforePrefix"],
        json!(["b/1", "b/2", "b/3"])
    );
    // Without a prefix the scan runs on to the end, through this push's own `out/` writes.
    assert_eq!(
        entries["out/startNoPrefix"],
        json!([
            "b/3",
            "c",
            "out/entries",
            "out/entriesToArray",
            "out/exclusive",
            "out/forAwait",
            "out/keys",
            "out/keysToArray",
            "out/start",
            "out/startBeforePrefix",
            "out/toArray",
            "out/values"
        ])
    );
    assert_eq!(entries["out/limit"], json!(["a", "b/1"]));
    assert_eq!(entries["out/limit0"], json!([]));
    assert_eq!(entries["out/none"], json!([]));
}

/// A scan longer than a page, over stored keys some of which this push deleted or overwrote,
/// beside keys it added.
async fn scan_merges_pages_with_the_push_writes(backend: Backend) {
    let server = js_server(backend).await;
    run(
        &server,
        "s",
        1,
        &[("seed", json!({"prefix": "p/", "count": 300}))],
    )
    .await;
    let entries = run(
        &server,
        "s",
        2,
        &[
            ("delete", json!({"key": "p/005"})),
            ("delete", json!({"key": "p/299"})),
            set("p/0055", json!("added")),
            set("p/150", json!("overwritten")),
            scan(json!({"prefix": "p/"}), "entries", "out/all"),
            scan(
                json!({"prefix": "p/", "start": {"key": "p/004", "exclusive": true}, "limit": 3}),
                "keys",
                "out/window",
            ),
        ],
    )
    .await;
    let all = entries["out/all"].as_array().unwrap();
    let mut expected: Vec<Value> = (0..299)
        .filter(|i| *i != 5)
        .map(|i| json!([format!("p/{i:03}"), i]))
        .collect();
    expected.insert(5, json!(["p/0055", "added"]));
    expected[150] = json!(["p/150", "overwritten"]);
    assert_eq!(all.len(), expected.len());
    assert_eq!(all, &expected);
    assert_eq!(entries["out/window"], json!(["p/0055", "p/006", "p/007"]));
}

/// A mutation's own writes, made in its engine, reach a scan in the middle of it and are kept
/// with those after it; a delete answers whether the key was there.
async fn writes_cross_a_scan_in_their_mutation(backend: Backend) {
    let server = js_server(backend).await;
    run(
        &server,
        "s",
        1,
        &[("seed", json!({"prefix": "p/", "count": 3}))],
    )
    .await;
    let probe = json!({"prefix": "p/", "deleteFirst": "p/001", "into": "out"});
    let entries = run(&server, "s", 2, &[("probeWritesAroundScan", probe)]).await;
    assert_eq!(
        entries["out"],
        json!({
            "deleted": true,
            "seen": [["p/000", 0], ["p/002", 2], ["p/new", "written before the scan"]],
            "again": "written before the scan",
        })
    );
    assert_eq!(entries.get("p/001"), None, "the delete is kept");
    assert_eq!(entries["p/new"], json!("written before the scan"));
    assert_eq!(entries["p/zz"], json!("written after the scan"));
    let probe = json!({"prefix": "q/", "deleteFirst": "q/absent", "into": "out"});
    let entries = run(&server, "s", 3, &[("probeWritesAroundScan", probe)]).await;
    assert_eq!(entries["out"]["deleted"], json!(false));
}

/// Keys in Replicache's order: by code point (UTF-8 bytes), so U+1F600 (a surrogate pair in
/// UTF-16) sorts after U+E000 and U+FFFD, unlike JavaScript's `<` on strings.
async fn non_ascii_keys_in_code_point_order(backend: Backend) {
    let server = js_server(backend).await;
    let keys = [
        "k/😀",
        "k/\u{FFFD}",
        "k/\u{E000}",
        "k/é",
        "k/a",
        "k/Z",
        "k/\u{10FFFF}",
        "k/ÿ",
    ];
    let ordered = json!([
        "k/Z",
        "k/a",
        "k/é",
        "k/ÿ",
        "k/\u{E000}",
        "k/\u{FFFD}",
        "k/😀",
        "k/\u{10FFFF}"
    ]);
    // Keys written earlier in the same push (merged in memory)...
    let mut mutations: Vec<(&str, Value)> = keys.iter().map(|k| set(k, json!(k))).collect();
    mutations.push(scan(json!({"prefix": "k/"}), "keys", "out/pending"));
    let entries = run(&server, "s", 1, &mutations).await;
    assert_eq!(entries["out/pending"], ordered);
    // ...and stored (ordered by the database).
    let entries = run(
        &server,
        "s",
        10,
        &[
            scan(json!({"prefix": "k/"}), "keys", "out/stored"),
            scan(
                json!({"prefix": "k/", "start": {"key": "k/\u{E000}", "exclusive": true}}),
                "keys",
                "out/after",
            ),
        ],
    )
    .await;
    assert_eq!(entries["out/stored"], ordered);
    assert_eq!(
        entries["out/after"],
        json!(["k/\u{FFFD}", "k/😀", "k/\u{10FFFF}"])
    );
}

/// Keys no store can hold never reach the database (Postgres refuses a NUL): reading one finds
/// nothing, writing one throws in the mutator, and the push succeeds.
async fn keys_no_store_can_hold(backend: Backend) {
    let server = js_server(backend).await;
    let entries = run(&server, "s", 1, &[("probeOddKeys", json!({"into": "out"}))]).await;
    let seen = &entries["out"];
    assert_eq!(seen["getNul"], json!(null));
    assert_eq!(seen["hasNul"], json!(false));
    assert_eq!(seen["scanNulPrefix"], json!([]));
    let start = seen["scanNulStart"].as_str().unwrap();
    assert!(start.contains("NUL"), "{start}");
    let long = seen["setLong"].as_str().unwrap();
    assert!(long.contains("1001 bytes"), "{long}");
}

async fn tx_says_who_where_and_why(backend: Backend) {
    let server = js_server(backend).await;
    let body = push_body("g1", &[("c7", 1, "probeTx", json!({"into": "out"}))]);
    assert_eq!(server.push_as("space-9", &body, "alice").await.0, 200);
    let entries = server.state_as("space-9", "g1", "alice").await.entries;
    assert_eq!(
        entries["out"],
        json!({
            "clientID": "c7", "mutationID": 1, "reason": "authoritative", "location": "server",
            "auth": {"userID": "alice", "spaceID": "space-9"},
        })
    );
}

/// A rule the client does not check: titles of at most 100 characters.
async fn server_only_rule(backend: Backend) {
    let server = js_server(backend).await;
    let body = push_body(
        "g1",
        &[
            (
                "c1",
                1,
                "createTodo",
                json!({"id": 1, "title": "x".repeat(100)}),
            ),
            (
                "c1",
                2,
                "createTodo",
                json!({"id": 2, "title": "x".repeat(101)}),
            ),
        ],
    );
    assert_eq!(server.push_as("s", &body, "bob").await.0, 200);
    let view = server.state_as("s", "g1", "bob").await;
    assert_eq!(
        view.entries["todo/1"],
        json!({"id": 1, "title": "x".repeat(100), "createdBy": "bob"})
    );
    assert!(!view.entries.contains_key("todo/2"), "the rule refused it");
    assert_eq!(view.lmid("c1"), 2, "a refused mutation still counts");
}

/// A mutator that throws, rejects or writes what JSON cannot hold fails alone: its writes are
/// discarded, its id counts, and the push goes on.
async fn failing_mutators_fail_alone(backend: Backend) {
    let server = js_server(backend).await;
    let entries = run(
        &server,
        "s",
        1,
        &[
            ("throws", json!({"key": "k1"})),
            ("rejects", json!({"key": "k2"})),
            ("setsUndefined", json!({"key": "k3"})),
            ("setsFunction", json!({"key": "k4"})),
            ("setValue", json!({"key": "after", "value": 1})),
        ],
    )
    .await;
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["after"]);
    assert_eq!(server.state("s", "g-s").await.lmid("c-s"), 5);
    assert_eq!(failures(&server, "threw").await, 4);
    assert_eq!(failures(&server, "timeout").await, 0);
}

/// An endless loop is stopped at the time limit; the push's later mutations still run.
async fn endless_loop_times_out(backend: Backend) {
    let server = js_server(backend).await;
    let entries = run(
        &server,
        "s",
        1,
        &[
            ("spins", json!({"key": "k"})),
            ("increment", json!({"key": "after", "delta": 1})),
        ],
    )
    .await;
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["after"]);
    assert_eq!(server.state("s", "g-s").await.lmid("c-s"), 2);
    assert_eq!(failures(&server, "timeout").await, 1);
    assert_eq!(failures(&server, "threw").await, 0);
}

/// A mutator that allocates without end is stopped at the memory limit.
async fn memory_hog_hits_the_limit(backend: Backend) {
    let limits = JsLimits {
        timeout: Duration::from_secs(20), // the memory limit, not the clock, must stop it
        ..test_limits()
    };
    let server = js_server_with(backend, limits).await;
    let entries = run(
        &server,
        "s",
        1,
        &[
            ("hogs", json!({"key": "k"})),
            ("increment", json!({"key": "after", "delta": 1})),
        ],
    )
    .await;
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["after"]);
    assert_eq!(failures(&server, "memory").await, 1);
    assert_eq!(failures(&server, "timeout").await, 0);
}

/// What a mutator leaves in globals or module state stays in its space: another space starts
/// from a context of its own.
async fn globals_do_not_leak(backend: Backend) {
    let limits = JsLimits {
        engines: 1, // every push on the same engine
        ..test_limits()
    };
    let server = js_server_with(backend, limits).await;
    let fresh = json!({"leaked": null, "polluted": null, "calls": 1});
    let entries = run(
        &server,
        "a",
        1,
        &[
            ("leakGlobal", json!({"value": "secret of a"})),
            ("probeGlobals", json!({"into": "out"})),
        ],
    )
    .await;
    assert_eq!(
        entries["out"],
        json!({"leaked": "secret of a", "polluted": "secret of a", "calls": 101}),
        "one push shares its context"
    );
    let entries = run(&server, "b", 1, &[("probeGlobals", json!({"into": "out"}))]).await;
    assert_eq!(entries["out"], fresh);
    // The engine keeps the contexts of the spaces it served lately for their next pushes: the
    // module state a push finds is its own space's (never another's).
    let entries = run(
        &server,
        "a",
        3,
        &[("probeGlobals", json!({"into": "out2"}))],
    )
    .await;
    assert_eq!(
        entries["out2"],
        json!({"leaked": "secret of a", "polluted": "secret of a", "calls": 102})
    );
}

/// No timers, network, filesystem or process, and no module to import them from.
async fn no_timers_network_or_files(backend: Backend) {
    let server = js_server(backend).await;
    let entries = run(&server, "s", 1, &[("probeSandbox", json!({"into": "out"}))]).await;
    let seen = entries["out"].as_object().unwrap();
    for name in [
        "setTimeout",
        "setInterval",
        "fetch",
        "XMLHttpRequest",
        "require",
        "process",
        "std",
        "os",
        "Deno",
        "Bun",
    ] {
        assert_eq!(seen[name], json!("undefined"), "{name} is not there");
    }
    let import = seen["importOs"].as_str().unwrap();
    assert!(
        import.starts_with("failed: "),
        "import('os') failed: {import}"
    );
    assert!(
        import.contains("os"),
        "the error names the module: {import}"
    );
}

/// `import()` in a mutator fails that mutation (with the same refusal), at once: the push goes on.
async fn an_import_in_a_mutator_fails_its_mutation(backend: Backend) {
    let source = "export const mutators = {\n  async caught(tx) {\n    try { await import('./rules.js'); } catch (e) { await tx.set('error', String(e)); }\n  },\n  async uncaught(tx) {\n    await import('./rules.js');\n    await tx.set('imported', true);\n  },\n  async after(tx) { await tx.set('after', true); },\n};\n";
    let js = JsMutators::from_source("dynamic.js", source.into(), test_limits()).unwrap();
    let options = App::builder().mutators(js.register(Mutators::builtin()));
    let server = TestServer::start_with(backend, options).await;
    let entries = run(
        &server,
        "s",
        1,
        &[
            ("caught", json!({})),
            ("uncaught", json!({})),
            ("after", json!({})),
        ],
    )
    .await;
    let error = entries["error"].as_str().unwrap();
    assert!(
        error.contains("dynamic.js imports"),
        "names the file: {error}"
    );
    assert_says_to_bundle(error, "./rules.js");
    assert!(!entries.contains_key("imported"), "the import failed");
    assert_eq!(entries["after"], json!(true));
    assert_eq!(failures(&server, "threw").await, 1);
    assert_eq!(failures(&server, "timeout").await, 0);
}

/// A module's mutator named like a built-in replaces it.
async fn module_mutator_replaces_builtin(backend: Backend) {
    let source = "export const mutators = {\n  async increment(tx, {key, delta}) {\n    await tx.set(key, `js:${delta}`);\n  },\n};\n";
    let js = JsMutators::from_source("clash.js", source.into(), test_limits()).unwrap();
    assert_eq!(js.names(), ["increment"]);
    let options = App::builder().mutators(js.register(Mutators::builtin()));
    let server = TestServer::start_with(backend, options).await;
    let entries = run(
        &server,
        "s",
        1,
        &[
            ("increment", json!({"key": "n", "delta": 2})),
            set("other", json!("builtin set")),
        ],
    )
    .await;
    assert_eq!(entries["n"], json!("js:2"));
    assert_eq!(entries["other"], json!("builtin set"));
}

crate::on_both_stores!(
    get_has_and_is_empty,
    what_goes_along_with_a_mutation_follows_its_writes,
    set_put_and_del,
    scan_options_and_results,
    scan_merges_pages_with_the_push_writes,
    writes_cross_a_scan_in_their_mutation,
    non_ascii_keys_in_code_point_order,
    tx_says_who_where_and_why,
    keys_no_store_can_hold,
    server_only_rule,
    failing_mutators_fail_alone,
    endless_loop_times_out,
    memory_hog_hits_the_limit,
    globals_do_not_leak,
    no_timers_network_or_files,
    an_import_in_a_mutator_fails_its_mutation,
    module_mutator_replaces_builtin,
);

/// The error of loading `source` as the module file `name`.
fn load_error(name: &str, source: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, source).unwrap();
    let error = JsMutators::load(&path, test_limits()).expect_err("the module is refused");
    let text = format!("{error:#}");
    assert!(
        text.contains(&path.display().to_string()),
        "names the file: {text}"
    );
    text
}

#[test]
fn a_syntax_error_names_file_and_line() {
    let text = load_error(
        "broken.js",
        "export const mutators = {\n  async ok(tx) {},\n  async broken(tx) { const = 1; },\n};\n",
    );
    assert!(text.contains("SyntaxError"), "{text}");
    assert!(text.contains("broken.js:3"), "names line 3: {text}");
}

#[test]
fn a_module_without_mutators_is_refused() {
    let text = load_error("empty.js", "export const answer = 42;\n");
    assert!(text.contains("exports no mutators"), "{text}");
}

/// Asserts that `text` refuses `specifier` and says to bundle, with the command and the docs.
fn assert_says_to_bundle(text: &str, specifier: &str) {
    assert!(
        text.contains(&format!("imports \"{specifier}\"")),
        "names the import {specifier}: {text}"
    );
    for words in [
        "a single self-contained ES module",
        "bundle the mutators and what they import into one file",
        "npx esbuild src/mutators.ts --bundle --format=esm --outfile=mutators.js",
        "docs/javascript-mutators.md",
    ] {
        assert!(text.contains(words), "says {words:?}: {text}");
    }
}

#[test]
fn imports_fail_at_start_up_saying_to_bundle() {
    for (file, source, specifier) in [
        (
            "mutators.js",
            "import { checkTitle } from './rules.js';\nexport function m(tx) { checkTitle(''); }\n",
            "./rules.js",
        ),
        (
            "package.js",
            "import * as os from 'os';\nexport function m(tx) {}\n",
            "os",
        ),
        (
            "reexports.js",
            "export * from 'replicache';\nexport function m(tx) {}\n",
            "replicache",
        ),
    ] {
        let text = load_error(file, source);
        assert!(
            text.contains(&format!("{file} imports")),
            "names the file: {text}"
        );
        assert_says_to_bundle(&text, specifier);
    }
}

#[test]
fn top_level_code_that_throws_names_file_and_line() {
    let text = load_error(
        "throws.js",
        "export function m(tx) {}\n\nthrow new Error('not today');\n",
    );
    assert!(text.contains("not today"), "{text}");
    assert!(text.contains("throws.js:3"), "names line 3: {text}");
}

#[test]
fn a_missing_file_is_named() {
    let error = JsMutators::load(
        std::path::Path::new("/nonexistent/mutators.js"),
        test_limits(),
    )
    .err()
    .unwrap();
    assert!(format!("{error:#}").contains("/nonexistent/mutators.js"));
}

#[test]
fn mutators_are_found_in_each_export_shape() {
    for (source, expected) in [
        (
            "export const mutators = {a() {}, b: async () => {}, notOne: 1};",
            vec!["a", "b"],
        ),
        (
            "export default {c() {}};\nexport function ignored() {}",
            vec!["c"],
        ),
        (
            "export function d() {}\nexport async function e() {}\nexport const f = 2;",
            vec!["d", "e"],
        ),
    ] {
        let js = JsMutators::from_source("shapes.js", source.into(), test_limits()).unwrap();
        let mut names = js.names().to_vec();
        names.sort();
        assert_eq!(names, expected, "{source}");
    }
}

/// Two engines: a push to another space runs while one space's push spins in its mutator
/// (Postgres only: SQLite has a single writer, so its pushes wait for each other anyway).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_to_other_spaces_run_while_one_spins() {
    let limits = JsLimits {
        timeout: Duration::from_secs(5),
        engines: 2,
        ..test_limits()
    };
    let js = JsMutators::load(&fixture(), limits).expect("the fixture loads");
    let reads = Arc::new(Semaphore::new(0));
    let signal = reads.clone();
    let store = StoreOptions::wrapped(|store| {
        let reached = Signal {
            op: Op::Entry,
            reached: signal,
        };
        Faulty::wrap(store, reached)
    });
    let options = App::builder()
        .mutators(js.register(Mutators::builtin()))
        .authenticator(Arc::new(TokenIsUser));
    let server = Arc::new(TestServer::start_on(Backend::Postgres, store, options).await);
    let spinning = {
        let server = server.clone();
        tokio::spawn(async move {
            let body = push_body("g-a", &[("c-a", 1, "spins", json!({"key": "k"}))]);
            server.push("a", &body).await
        })
    };
    // `spins` reads its key, then spins: once the store saw the read, it holds its engine.
    let read = tokio::time::timeout(Duration::from_secs(20), reads.acquire()).await;
    read.expect("the spinning mutation started")
        .unwrap()
        .forget();
    assert!(
        !spinning.is_finished(),
        "the spinning push is still running"
    );
    let entries = run(
        &server,
        "b",
        1,
        &[("setValue", json!({"key": "k", "value": 1}))],
    )
    .await;
    assert_eq!(entries["k"], json!(1));
    assert!(
        !spinning.is_finished(),
        "the other space's push was answered while the first one still spun"
    );
    let (status, _) = spinning.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(failures(&server, "timeout").await, 1);
}
