//! Starting and stopping the binary for a test: a server on a free port with its log kept,
//! subcommands run to their end, raw pushes and pulls, and a Postgres database of its own.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::Connection;

pub(crate) struct Server {
    pub child: Child,
    pub base: String,
    /// Every line the server logged so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

/// `replisync ARGS` to run in `dir` with nothing in its environment but `env`.
pub(crate) fn replisync_command(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_replisync"));
    command
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(dir);
    command
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
            if let Some(address) = listening_address(&line) {
                let _ = tx.send(address);
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

/// The address of the line saying where replisync listens, in text (`address=...`) or JSON logs.
fn listening_address(line: &str) -> Option<String> {
    if let Some(address) = line.split("address=").nth(1) {
        return Some(address.trim().to_owned());
    }
    let json: Value = serde_json::from_str(line).ok()?;
    let fields = &json["fields"];
    (fields["message"] == "replisync listening")
        .then(|| fields["address"].as_str())?
        .map(str::to_owned)
}

/// Runs `replisync --listen LISTEN` in `dir` with only `env`, expects it to refuse to start
/// within 30 s, and returns what it wrote to stderr. One that starts instead is killed.
pub(crate) fn refused_start_up(
    dir: &std::path::Path,
    listen: &str,
    env: &[(&str, &str)],
) -> String {
    let mut child = replisync_command(dir, &["--listen", listen], env)
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
        self.sigterm();
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

    /// Sends SIGTERM, as an orchestrator does to stop it.
    pub(crate) fn sigterm(&self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
    }

    /// Its exit status, once it has exited within `within`; `None` while it still runs.
    pub(crate) async fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let child = &mut self.child;
        poll_for(within, || child.try_wait().unwrap()).await
    }

    /// Every line it logged so far.
    pub(crate) fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The first line it logged that contains `needle`, waiting up to `within` for it.
    pub(crate) async fn wait_for_log(&self, needle: &str, within: Duration) -> Option<String> {
        poll_for(within, || {
            let log = self.log.lock().unwrap();
            log.iter().find(|line| line.contains(needle)).cloned()
        })
        .await
    }
}

/// The first `Some` that `check` returns, asking every 20 ms (so a bounded number of times)
/// until `within` has passed.
pub(crate) async fn poll_for<T>(
    within: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    const EVERY: Duration = Duration::from_millis(20);
    let deadline = Instant::now() + within;
    let rounds = within.as_millis() / EVERY.as_millis() + 1;
    for _ in 0..rounds {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(EVERY).await;
    }
    check()
}

/// An SSE stream read to its end in the background: the text so far, and how it ended.
pub(crate) struct SseReader {
    text: Arc<Mutex<String>>,
    reading: tokio::task::JoinHandle<Result<(), String>>,
}

impl SseReader {
    /// Opens `url` (it must answer 200) and reads it in a task of its own.
    pub(crate) async fn open(url: &str) -> SseReader {
        let response = reqwest::get(url).await.expect("the SSE stream opens");
        assert_eq!(response.status(), 200, "GET {url}");
        let text = Arc::new(Mutex::new(String::new()));
        let kept = text.clone();
        let reading = tokio::spawn(async move {
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|error| format!("{error:?}"))?;
                kept.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk));
            }
            Ok(())
        });
        SseReader { text, reading }
    }

    /// Everything read so far.
    pub(crate) fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Whether `needle` was read within `within`.
    pub(crate) async fn wait_for(&self, needle: &str, within: Duration) -> bool {
        poll_for(within, || self.text().contains(needle).then_some(()))
            .await
            .is_some()
    }

    /// How the stream ended, waiting up to `within`: `Ok` with all its text at a clean end,
    /// `Err` with the transport error otherwise. Panics when it is still open.
    pub(crate) async fn end(self, within: Duration) -> Result<String, String> {
        let ended = tokio::time::timeout(within, self.reading).await;
        let ended =
            ended.unwrap_or_else(|_| panic!("the SSE stream is still open after {within:?}"));
        ended.expect("the SSE reading task")?;
        Ok(self.text.lock().unwrap().clone())
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

/// Runs `replisync ARGS` in `dir` with only `env`; it must end by itself within 30 s (a
/// refusal, or `--help`). One still running then is killed and the test fails.
pub(crate) fn run_until_exit(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = replisync_command(dir, args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("replisync {args:?} still runs after 30 s: it did not refuse");
        }
    }
}
