//! Starting and stopping the binary for a test: a server on a free port with its log kept,
//! subcommands run to their end, raw pushes and pulls, and a Postgres database of its own.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Connection;

pub(crate) struct Server {
    pub child: Child,
    pub base: String,
    /// Every line the server logged so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Starts `replisync` in `dir` with nothing in its environment and `--listen 127.0.0.1:0`
/// (so parallel tests never fight over a port); returns once it logs its address.
pub(crate) fn start(dir: &std::path::Path) -> Server {
    start_with(dir, &[])
}

/// `start`, with these variables in the environment.
pub(crate) fn start_with(dir: &std::path::Path, env: &[(&str, &str)]) -> Server {
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
pub(crate) fn refused_start_up(
    dir: &std::path::Path,
    listen: &str,
    env: &[(&str, &str)],
) -> String {
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
    pub(crate) fn stop(mut self) {
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

pub(crate) async fn post(base: &str, path: &str, body: Value) -> Value {
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
pub(crate) fn run_subcommand(
    dir: &std::path::Path,
    subcommand: &str,
    env: &[(&str, &str)],
) -> Output {
    Command::new(env!("CARGO_BIN_EXE_replisync"))
        .arg(subcommand)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .unwrap()
}

/// The standard output of a run that must have exited 0 (its standard error otherwise).
pub(crate) fn stdout_of_success(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Pushes one `increment` of `n` by `group`'s client to space `demo`, with mutation id `id`.
pub(crate) async fn push_increment(base: &str, group: &str, id: u64) -> Value {
    let push = json!({"pushVersion": 1, "schemaVersion": "", "profileID": "p", "clientGroupID": group,
        "mutations": [{"id": id, "name": "increment", "args": {"key": "n", "delta": 1}, "timestamp": 1.0, "clientID": format!("{group}-client")}]});
    post(base, "/spaces/demo/push", push).await
}

/// A database of its own on the test Postgres (TEST_DATABASE_URL's server), dropped at the end.
pub(crate) struct PgDatabase {
    admin: String,
    name: String,
}

impl PgDatabase {
    pub(crate) async fn create() -> PgDatabase {
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
    pub(crate) fn url(&self) -> String {
        let (server, _) = self.admin.rsplit_once('/').expect("a URL with a database");
        format!("{server}/{}", self.name)
    }

    pub(crate) async fn connect(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.url()).await.unwrap()
    }

    pub(crate) async fn drop_it(self) {
        let mut conn = sqlx::PgConnection::connect(&self.admin).await.unwrap();
        let drop = format!("DROP DATABASE {} WITH (FORCE)", self.name);
        sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
            .execute(&mut conn)
            .await
            .unwrap();
    }
}
