//! The real binary, as a new user runs it: an empty environment, a fresh directory. Data pushed
//! before a restart is pulled back after it (the embedded SQLite default is durable).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Connection;

struct Server {
    child: Child,
    base: String,
    /// Every line the server logged so far.
    log: Arc<Mutex<Vec<String>>>,
}

/// Starts `replisync` in `dir` with nothing in its environment and `--listen 127.0.0.1:0`
/// (so parallel tests never fight over a port); returns once it logs its address.
fn start(dir: &std::path::Path) -> Server {
    start_with(dir, &[])
}

/// `start`, with these variables in the environment.
fn start_with(dir: &std::path::Path, env: &[(&str, &str)]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_replisync"))
        .args(["--listen", "127.0.0.1:0"])
        .env_clear()
        .env("REPLISYNC_DRAIN_DELAY_SECS", "0") // stop at once unless a test asks otherwise
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the replisync binary starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("replisync: {}", line.chars().take(300).collect::<String>());
            if let Some(address) = line.split("address=").nth(1) {
                let _ = tx.send(address.trim().to_owned());
            }
            kept.lock().unwrap().push(line);
        }
    });
    let address = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("replisync logs its address");
    Server {
        child,
        base: format!("http://{address}"),
        log,
    }
}

/// Runs `replisync --listen LISTEN` in `dir` with only `env`, expects it to refuse to start
/// within 30 s, and returns what it wrote to stderr. One that starts instead is killed.
fn refused_start_up(dir: &std::path::Path, listen: &str, env: &[(&str, &str)]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_replisync"))
        .args(["--listen", listen])
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = reader.join().unwrap();
    match status {
        // 1 is a refusal; a panic exits 101 and a crash by signal has no code.
        Some(status) => assert_eq!(status.code(), Some(1), "{stderr}"),
        None => panic!("replisync started (still running after 30 s): {stderr}"),
    }
    stderr
}

impl Server {
    /// SIGTERM, as an orchestrator stops it; it must exit cleanly within its shutdown timeout.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success());
        for _ in 0..150 {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "replisync exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        panic!("replisync did not stop within 15 s of SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

async fn post(base: &str, path: &str, body: Value) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .body(body.to_string())
        .send()
        .await
        .expect("replisync answers");
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Runs `replisync SUBCOMMAND` in `dir` with only `env`, to its end.
fn run_subcommand(dir: &std::path::Path, subcommand: &str, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_replisync"))
        .arg(subcommand)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .unwrap()
}

/// The standard output of a run that must have exited 0 (its standard error otherwise).
fn stdout_of_success(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Pushes one `increment` of `n` by `group`'s client to space `demo`, with mutation id `id`.
async fn push_increment(base: &str, group: &str, id: u64) -> Value {
    let push = json!({"pushVersion": 1, "schemaVersion": "", "profileID": "p", "clientGroupID": group,
        "mutations": [{"id": id, "name": "increment", "args": {"key": "n", "delta": 1}, "timestamp": 1.0, "clientID": format!("{group}-client")}]});
    post(base, "/spaces/demo/push", push).await
}

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

#[test]
fn half_a_pusher_configuration_stops_start_up_naming_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = refused_start_up(dir.path(), "127.0.0.1:0", &[("PUSHER_KEY", "app-key-abc")]);
    for missing in ["PUSHER_APP_ID", "PUSHER_SECRET"] {
        assert!(stderr.contains(missing), "{missing} not named in: {stderr}");
    }
}

#[test]
fn migrate_applies_migrations_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_subcommand(
        dir.path(),
        "migrate",
        &[("DATABASE_URL", "sqlite://ops/replisync.db")],
    );
    assert!(stdout_of_success(&output).contains("migrations applied"));
    assert!(dir.path().join("ops/replisync.db").exists());
}

#[test]
fn no_authentication_on_a_public_address_stops_start_up_naming_both_ways_out() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = refused_start_up(dir.path(), "0.0.0.0:0", &[]);
    for named in [
        "REPLISYNC_JWT_SECRET",
        "REPLISYNC_JWT_JWKS_URL",
        "REPLISYNC_ALLOW_ANONYMOUS",
    ] {
        assert!(stderr.contains(named), "{named} not named in: {stderr}");
    }
    assert!(
        !dir.path().join("replisync-data").exists(),
        "it opened a database before refusing"
    );
}

#[test]
fn help_lists_the_secret_variables_without_their_values() {
    let help = Command::new(env!("CARGO_BIN_EXE_replisync"))
        .arg("--help")
        .env_clear()
        .env("REPLISYNC_JWT_SECRET", "top-secret-value")
        .env("PUSHER_SECRET", "pusher-secret-value")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for variable in ["REPLISYNC_JWT_SECRET", "PUSHER_SECRET", "PUSHER_APP_ID"] {
        assert!(help.contains(variable), "--help does not list {variable}");
    }
    assert!(!help.contains("top-secret-value") && !help.contains("pusher-secret-value"));
}

/// A reader that stops reading a large first pull holds a database snapshot; shutdown must
/// still end at its deadline (the process exits, saying it cut work short), not wait forever.
#[tokio::test]
async fn shutdown_ends_at_its_deadline_even_with_a_stalled_reader() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_with(dir.path(), &[("REPLISYNC_SHUTDOWN_TIMEOUT_SECS", "1")]);
    // 16 MB of data: far more than the socket buffers between a stalled reader and replisync.
    let megabyte = "x".repeat(1024 * 1024);
    for id in 1..=16u64 {
        let push = json!({"pushVersion": 1, "clientGroupID": "g", "mutations": [
            {"id": id, "name": "set", "clientID": "c", "timestamp": 1.0,
             "args": {"key": format!("k{id}"), "value": megabyte}}]});
        assert_eq!(
            post(&server.base, "/spaces/big/push", push).await,
            json!({})
        );
    }
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut stalled = std::net::TcpStream::connect(&address).unwrap();
    let pull = r#"{"pullVersion":1,"clientGroupID":"g2","cookie":null}"#;
    write!(
        stalled,
        "POST /spaces/big/pull HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{pull}",
        pull.len()
    )
    .unwrap();
    let mut first_bytes = [0u8; 64];
    stalled.read_exact(&mut first_bytes).unwrap(); // the answer has begun; now stop reading
    std::thread::sleep(Duration::from_millis(500));

    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut exited = None;
    for _ in 0..100 {
        if let Some(status) = server.child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status =
        exited.expect("replisync still runs 10 s after SIGTERM with a 1 s shutdown timeout");
    assert_eq!(
        status.code(),
        Some(1),
        "cutting a response short must show in the exit status (1, not a crash)"
    );
    drop(stalled);
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
    let mut metrics_address = None;
    for _ in 0..100 {
        metrics_address = server.log.lock().unwrap().iter().find_map(|line| {
            let rest = line.split("/metrics listening").nth(1)?;
            Some(rest.split("address=").nth(1)?.trim().to_owned())
        });
        if metrics_address.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics_address = metrics_address.expect("the metrics address is logged");
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

#[test]
fn a_broken_mutators_module_stops_start_up_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.js"),
        "export const mutators = {\n  async ok(tx) {},\n  async bad(tx) { let = ; },\n};\n",
    )
    .unwrap();
    let stderr = refused_start_up(
        dir.path(),
        "127.0.0.1:0",
        &[("REPLISYNC_MUTATORS", "broken.js")],
    );
    assert!(stderr.contains("broken.js:3"), "file and line in: {stderr}");
    assert!(stderr.contains("SyntaxError"), "{stderr}");
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

/// After SIGTERM the server drains: `/readyz` turns 503 at once (so a load balancer takes it
/// out) while `/healthz`, pushes and pulls are still served for REPLISYNC_DRAIN_DELAY_SECS;
/// then it stops cleanly.
#[tokio::test]
async fn readyz_turns_503_while_draining_and_requests_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), &[("REPLISYNC_DRAIN_DELAY_SECS", "3")]);
    let client = reqwest::Client::new();
    let status = |path: &'static str| {
        let (client, url) = (client.clone(), format!("{}{path}", server.base));
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/readyz").await, 200);
    assert_eq!(status("/healthz").await, 200);

    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut ready = 200;
    for _ in 0..40 {
        ready = status("/readyz").await;
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(ready, 503, "/readyz while draining");
    assert_eq!(status("/healthz").await, 200, "alive while draining");
    let push = json!({"pushVersion": 1, "clientGroupID": "g", "mutations": [
        {"id": 1, "name": "set", "clientID": "c", "timestamp": 1.0,
         "args": {"key": "k", "value": "drained"}}]});
    assert_eq!(post(&server.base, "/spaces/s/push", push).await, json!({}));
    let pull = post(
        &server.base,
        "/spaces/s/pull",
        json!({"pullVersion": 1, "clientGroupID": "g2", "cookie": null}),
    )
    .await;
    assert_eq!(pull["patch"][1]["value"], "drained", "{pull}");
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("draining")),
        "the drain is logged"
    );
    let mut server = server;
    let mut exited = None;
    for _ in 0..150 {
        if let Some(status) = server.child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = exited.expect("replisync stops within 15 s of SIGTERM with a 3 s drain delay");
    assert!(status.success(), "replisync exited with {status}");
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

/// `replisync gc` runs one pass against the configured database and says what it removed; a
/// client it collected starts over at its next push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gc_subcommand_forgets_idle_client_groups() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    for group in ["idle", "active"] {
        assert_eq!(push_increment(&server.base, group, 1).await, json!({}));
    }
    let deletion = json!({"pushVersion": 1, "schemaVersion": "", "profileID": "p", "clientGroupID": "other",
        "mutations": [{"id": 1, "name": "delete", "args": {"key": "gone"}, "timestamp": 1.0, "clientID": "other-client"}]});
    assert_eq!(
        post(&server.base, "/spaces/demo/push", deletion).await,
        json!({})
    );
    server.stop();

    // Forty days without a push or pull, as far as the database knows, and as old a deletion.
    let file = dir.path().join("replisync-data/replisync.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&file);
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    sqlx::query("UPDATE replisync_client_groups SET last_active = last_active - 40 * 86400 WHERE id = 'idle'")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE replisync_entries SET changed_at = changed_at - 40 * 86400 WHERE deleted")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    let refused = run_subcommand(dir.path(), "gc", &[("REPLISYNC_CLIENT_TTL", "0s")]);
    assert_eq!(refused.status.code(), Some(1), "a refusal, not a crash");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("REPLISYNC_CLIENT_TTL"));
    let stdout = stdout_of_success(&run_subcommand(dir.path(), "gc", &[]));
    assert!(
        stdout.contains("removed 1 client groups and 1 clients"),
        "{stdout}"
    );
    assert!(stdout.contains("and 1 deletions"), "{stdout}");

    let server = start(dir.path());
    assert_eq!(
        push_increment(&server.base, "idle", 2).await,
        json!({"error": "ClientStateNotFound"})
    );
    assert_eq!(push_increment(&server.base, "active", 2).await, json!({}));
    let pull = json!({"pullVersion": 1, "schemaVersion": "", "profileID": "p", "clientGroupID": "new", "cookie": null});
    let body = post(&server.base, "/spaces/demo/pull", pull).await;
    assert_eq!(
        body["patch"][1],
        json!({"op": "put", "key": "n", "value": 3})
    );
    server.stop();
}

/// The authorization webhook is sent callers' tokens: over http, only to this machine.
#[test]
fn a_webhook_url_in_the_clear_to_another_host_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = refused_start_up(
        dir.path(),
        "127.0.0.1:0",
        &[
            ("REPLISYNC_JWT_SECRET", "a-secret-of-some-length"),
            ("REPLISYNC_AUTHZ_URL", "http://authz.example.com/check"),
        ],
    );
    assert!(stderr.contains("REPLISYNC_AUTHZ_URL"), "{stderr}");
    assert!(stderr.contains("https"), "{stderr}");
    assert!(
        !dir.path().join("replisync-data").exists(),
        "it opened a database before refusing"
    );
}

/// Serves `body` with `status` at `/jwks.json` on `listener`, in the background.
fn serve_jwks(listener: tokio::net::TcpListener, status: u16, body: &'static str) {
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || async move {
            (axum::http::StatusCode::from_u16(status).unwrap(), body)
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
}

/// An Ed25519 public key, as an identity provider publishes it.
const JWKS: &str = r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "key-1", "alg": "EdDSA",
    "use": "sig", "x": "9M4Die81kgeJIb8OIpnT00l979ONNSwhfppI-YV3Wlc"}]}"#;

/// A JWKS URL that cannot work stops start-up, naming the variable or the URL: one that does
/// not parse or is in the clear to another host, and one whose answer is not a JWKS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_that_cannot_work_stops_start_up() {
    let mut cases = vec![
        (
            "not a URL",
            "jwks.example.com/keys".to_owned(),
            "REPLISYNC_JWT_JWKS_URL",
        ),
        (
            "http to another host",
            "http://idp.example.com/.well-known/jwks.json".to_owned(),
            "REPLISYNC_JWT_JWKS_URL",
        ),
    ];
    for (case, status, body) in [
        ("404", 404, "not found"),
        ("not JSON", 200, "<html>sign in</html>"),
        (
            "no usable key",
            200,
            r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#,
        ),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        serve_jwks(listener, status, body);
        cases.push((case, url.clone(), "REPLISYNC_JWT_JWKS_URL"));
    }
    for (case, url, variable) in cases {
        let dir = tempfile::tempdir().unwrap();
        let env_url = url.clone();
        let stderr = tokio::task::spawn_blocking(move || {
            refused_start_up(
                dir.path(),
                "127.0.0.1:0",
                &[("REPLISYNC_JWT_JWKS_URL", &env_url)],
            )
        })
        .await
        .unwrap();
        assert!(stderr.contains(variable), "{case}: {stderr}");
        if url.starts_with("http://127.0.0.1") {
            assert!(
                stderr.contains(&url),
                "{case}: the URL is not named: {stderr}"
            );
        }
    }
}

/// An identity provider that is down at start-up: replisync starts, `/readyz` answers 503
/// saying the JWKS is not fetched yet, then 200 once the provider is up and the keys fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_a_jwks_that_is_down_at_start() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/jwks.json");
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), &[("REPLISYNC_JWT_JWKS_URL", url.as_str())]);
    let client = reqwest::Client::new();
    let readyz = || {
        let (client, url) = (client.clone(), format!("{}/readyz", server.base));
        async move {
            let response = client.get(url).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "/readyz before the JWKS is fetched: {body}");
    assert!(body.contains("JWKS") && body.contains(&url), "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(readyz().await.0, 503, "still down");

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    serve_jwks(listener, 200, JWKS);
    let mut ready = (0, String::new());
    for _ in 0..200 {
        ready = readyz().await;
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready.0, 200, "/readyz once the JWKS is up: {}", ready.1);
    let log = server.log.lock().unwrap().clone();
    let about_jwks: Vec<&String> = log.iter().filter(|l| l.contains("JWKS")).collect();
    assert!(about_jwks.len() >= 2, "{log:?}");
    for line in about_jwks {
        assert!(
            line.contains(&url),
            "a log line about the JWKS without its URL: {line}"
        );
    }
    server.stop();
}

/// A database of its own on the test Postgres (TEST_DATABASE_URL's server), dropped at the end.
struct PgDatabase {
    admin: String,
    name: String,
}

impl PgDatabase {
    async fn create() -> PgDatabase {
        let admin = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("replisync_binary_{}_{nanos}", std::process::id());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("Postgres for tests (TEST_DATABASE_URL) is reachable");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        PgDatabase { admin, name }
    }

    /// The URL of this database, on the admin URL's server.
    fn url(&self) -> String {
        let (server, _) = self.admin.rsplit_once('/').expect("a URL with a database");
        format!("{server}/{}", self.name)
    }

    async fn connect(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.url()).await.unwrap()
    }

    async fn drop_it(self) {
        let mut conn = sqlx::PgConnection::connect(&self.admin).await.unwrap();
        let drop = format!("DROP DATABASE {} WITH (FORCE)", self.name);
        sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
            .execute(&mut conn)
            .await
            .unwrap();
    }
}

/// On Postgres, as an operator runs it: `replisync migrate` creates the schema (the server then
/// starts with REPLISYNC_AUTO_MIGRATE=false), and `replisync gc` removes an idle client group
/// and leaves the active one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_and_gc_subcommands_work_on_postgres() {
    let db = PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let url = db.url();
    let database = [("DATABASE_URL", url.as_str())];
    let migrated = run_subcommand(dir.path(), "migrate", &database);
    assert!(stdout_of_success(&migrated).contains("migrations applied"));

    let env = [
        ("DATABASE_URL", url.as_str()),
        ("REPLISYNC_AUTO_MIGRATE", "false"),
    ];
    let server = start_with(dir.path(), &env);
    for group in ["idle", "active"] {
        assert_eq!(push_increment(&server.base, group, 1).await, json!({}));
    }
    server.stop();

    let mut conn = db.connect().await;
    sqlx::query("UPDATE replisync_client_groups SET last_active = last_active - 40 * 86400 WHERE id = 'idle'")
        .execute(&mut conn)
        .await
        .unwrap();
    let stdout = stdout_of_success(&run_subcommand(dir.path(), "gc", &database));
    assert!(
        stdout.contains("removed 1 client groups and 1 clients"),
        "{stdout}"
    );
    let left: Vec<String> =
        sqlx::query_scalar("SELECT id FROM replisync_client_groups ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(left, ["active"]);
    conn.close().await.unwrap();
    db.drop_it().await;
}
