//! The real binary, as a new user runs it: an empty environment, a fresh directory. Data pushed
//! before a restart is pulled back after it (the embedded SQLite default is durable).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

struct Server {
    child: Child,
    base: String,
}

/// Starts `replisync` in `dir` with nothing in its environment and `--listen 127.0.0.1:0`
/// (so parallel tests never fight over a port); returns once it logs its address.
fn start(dir: &std::path::Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_replisync"))
        .args(["--listen", "127.0.0.1:0"])
        .env_clear()
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the replisync binary starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("replisync: {line}");
            if let Some(address) = line.split("address=").nth(1) {
                let _ = tx.send(address.trim().to_owned());
            }
        }
    });
    let address = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("replisync logs its address");
    Server {
        child,
        base: format!("http://{address}"),
    }
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
    let output = Command::new(env!("CARGO_BIN_EXE_replisync"))
        .args(["--listen", "127.0.0.1:0"])
        .env_clear()
        .env("PUSHER_KEY", "app-key-abc")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for missing in ["PUSHER_APP_ID", "PUSHER_SECRET"] {
        assert!(stderr.contains(missing), "{missing} not named in: {stderr}");
    }
}

#[test]
fn migrate_applies_migrations_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_replisync"))
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", "sqlite://ops/replisync.db")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("migrations applied"));
    assert!(dir.path().join("ops/replisync.db").exists());
}

#[test]
fn no_authentication_on_a_public_address_stops_start_up_naming_both_ways_out() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_replisync"))
        .args(["--listen", "0.0.0.0:0"])
        .env_clear()
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
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
