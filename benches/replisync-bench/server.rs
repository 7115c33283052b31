//! The processes under test: a replisync server on Postgres or on its embedded SQLite (its
//! address, log and memory read back) and, for poke latency, sockudo; both on loopback, both
//! killed when dropped. (socket.io's Redis side: socketio.rs.)

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use crate::POOL_SIZE;

/// A replisync process whose log lines are kept (with when they arrived) for the poke
/// latencies and the garbage collection passes.
pub(crate) struct Server {
    child: Child,
    pub base: String,
    log: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Server {
    /// Starts `binary` on a free loopback port against `database_url`, poking through
    /// `sockudo` when given, and waits until it logs its address.
    pub(crate) async fn start(
        binary: &Path,
        database_url: &str,
        sockudo: Option<&Sockudo>,
        jwt_secret: Option<&str>,
    ) -> anyhow::Result<Server> {
        Server::start_with_env(binary, database_url, sockudo, jwt_secret, &[]).await
    }

    /// `start`, with these variables set too.
    pub(crate) async fn start_with_env(
        binary: &Path,
        database_url: &str,
        sockudo: Option<&Sockudo>,
        jwt_secret: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        let database = Database::Postgres(database_url);
        Server::launch(binary, database, sockudo, jwt_secret, env).await
    }

    /// Starts `binary` on its embedded SQLite store (no DATABASE_URL), in `file`, with pokes
    /// off, and waits until it logs its address; fails unless it logged that store.
    pub(crate) async fn start_on_sqlite(
        binary: &Path,
        file: &Path,
        jwt_secret: Option<&str>,
    ) -> anyhow::Result<Server> {
        Server::start_on_sqlite_with_env(binary, file, jwt_secret, &[]).await
    }

    /// `start_on_sqlite`, with these variables set too.
    pub(crate) async fn start_on_sqlite_with_env(
        binary: &Path,
        file: &Path,
        jwt_secret: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        let server =
            Server::launch(binary, Database::SqliteFile(file), None, jwt_secret, env).await?;
        anyhow::ensure!(
            server.logged_message_starting("store: sqlite"),
            "the replisync meant to run on SQLite did not log \"store: sqlite\" before its address (a --server-env DATABASE_URL overrides the benchmark's choice)"
        );
        Ok(server)
    }

    async fn launch(
        binary: &Path,
        database: Database<'_>,
        sockudo: Option<&Sockudo>,
        jwt_secret: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        let mut command = server_command(binary, database);
        command.envs(env.iter().copied());
        if let Some(secret) = jwt_secret {
            command.env("REPLISYNC_JWT_SECRET", secret);
        }
        if let Some(sockudo) = sockudo {
            sockudo.configure_pusher(&mut command);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let address = match collect_log(stdout, log.clone()).recv_timeout(Duration::from_secs(30)) {
            Ok(address) => address,
            Err(_) => {
                // Not left running (and holding database sessions) after the benchmark ends.
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "replisync did not report its address in JSON logs (a --server-env that changes REPLISYNC_LOG_FORMAT cannot be benchmarked)"
                );
            }
        };
        Ok(Server {
            child,
            base: format!("http://{address}"),
            log,
        })
    }

    pub(crate) fn rss_mb(&self) -> f64 {
        proc_status_kb(self.child.id(), "VmRSS:") as f64 / 1024.0
    }

    /// Resets the peak resident size (Linux `clear_refs` 5), so `peak_rss_mb` covers what follows.
    pub(crate) fn reset_peak_rss(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5").is_ok()
    }

    pub(crate) fn peak_rss_mb(&self) -> f64 {
        proc_status_kb(self.child.id(), "VmHWM:") as f64 / 1024.0
    }

    /// Poke latencies (commit to accepted) the server logged since `from_line` for `service`
    /// (the `service` field of its "space poked" lines: "Pusher" or "socket.io").
    pub(crate) fn poke_latencies_since(&self, from_line: usize, service: &str) -> Vec<f64> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter()
            .skip(from_line)
            .filter_map(|(_, line)| serde_json::from_str::<Value>(line).ok())
            .filter(|entry| entry["fields"]["service"].as_str() == Some(service))
            .filter_map(|entry| entry["fields"]["poke_latency_ms"].as_f64())
            .collect()
    }

    /// When the server logged the end of its first garbage collection pass that removed
    /// something, if it has.
    pub(crate) fn first_gc_removal_logged_at(&self) -> Option<Instant> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().find_map(|(at, line)| {
            let entry = serde_json::from_str::<Value>(line).ok()?;
            let fields = &entry["fields"];
            let removed = ["client_groups", "tombstones"]
                .iter()
                .any(|field| fields[*field].as_u64().is_some_and(|n| n > 0));
            removed.then_some(*at)
        })
    }

    /// Whether the server has logged a line whose message starts with `prefix`.
    fn logged_message_starting(&self, prefix: &str) -> bool {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter()
            .filter_map(|(_, line)| serde_json::from_str::<Value>(line).ok())
            .any(|entry| {
                entry["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(prefix))
            })
    }

    pub(crate) fn log_len(&self) -> usize {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Runs `replisync gc` (one garbage collection pass) with `binary` against `database_url`,
/// these variables set too; answers how long the process took and what it printed. Killed
/// after two minutes.
pub(crate) async fn run_gc_once(
    binary: &Path,
    database_url: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(Duration, String)> {
    let mut command = server_command(binary, Database::Postgres(database_url));
    command
        .arg("gc")
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn");
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    let started = Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .context("replisync gc ran for more than two minutes")??;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    anyhow::ensure!(
        output.status.success(),
        "replisync gc failed ({}): {stdout}",
        output.status
    );
    Ok((elapsed, stdout))
}

/// `command` (replisync, or a program that runs it, such as GNU time) set up to run a
/// replisync command (`export`, `import`, `migrate`...) against `database` as the servers are
/// (nothing from this environment, `--server-env`'s variables), its logs on stderr (warnings
/// only), its standard output discarded: the caller adds the arguments and runs it.
pub(crate) fn cli_command(command: Command, database: Database<'_>) -> Command {
    let mut command = with_server_env(command, database);
    command
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Variables given with `--server-env`, set for every server the benchmark starts.
static EXTRA_ENV: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

pub(crate) fn set_extra_env(env: Vec<(String, String)>) {
    let _ = EXTRA_ENV.set(env);
}

/// Which database a replisync the benchmark starts uses.
#[derive(Clone, Copy)]
pub(crate) enum Database<'a> {
    /// DATABASE_URL.
    Postgres(&'a str),
    /// No DATABASE_URL: the embedded SQLite store, in this file (REPLISYNC_SQLITE_PATH).
    SqliteFile(&'a Path),
}

/// replisync with nothing from this environment but the settings below: its database, JSON
/// logs on stdout, SSE off, the benchmark's pool size, and `--server-env`'s variables.
fn server_command(binary: &Path, database: Database<'_>) -> Command {
    with_server_env(Command::new(binary), database)
}

/// `command` (replisync, or a program that runs it) with replisync's environment as
/// `server_command` sets it.
fn with_server_env(mut command: Command, database: Database<'_>) -> Command {
    command
        .current_dir(std::env::temp_dir()) // no `.env` of the developer's
        .env_clear();
    match database {
        Database::Postgres(url) => command.env("DATABASE_URL", url),
        Database::SqliteFile(file) => command.env("REPLISYNC_SQLITE_PATH", file),
    };
    command
        .env("REPLISYNC_LISTEN", "127.0.0.1:0")
        .env("REPLISYNC_DB_MAX_CONNECTIONS", POOL_SIZE.to_string())
        .env("REPLISYNC_LOG_FORMAT", "json")
        .env("REPLISYNC_SSE", "false")
        // Debug for the poke services' worker: it logs each poke's latency.
        .env(
            "RUST_LOG",
            "warn,replisync=info,replisync::poke::delivery=debug",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command.envs(EXTRA_ENV.get().into_iter().flatten().map(|(k, v)| (k, v)));
    command
}

/// Keeps every line of the server's stdout in `log` (on a thread of its own); the returned
/// channel receives the address the server says it listens on.
fn collect_log(
    stdout: impl std::io::Read + Send + 'static,
    log: Arc<Mutex<Vec<(Instant, String)>>>,
) -> std::sync::mpsc::Receiver<String> {
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut address_found = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // Parsed only until the address: after it, a line per request would cost the
            // benchmark's own CPU, on the cores the server shares.
            if !address_found
                && let Ok(entry) = serde_json::from_str::<Value>(&line)
                && let Some(address) = entry["fields"]["address"].as_str()
            {
                address_found = true;
                let _ = address_tx.send(address.to_owned());
            }
            let arrived = Instant::now();
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((arrived, line));
        }
    });
    address_rx
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse().ok())
        })
        .unwrap_or(0)
}

/// sockudo on loopback, when it is installed (scripts/setup installs it).
pub(crate) struct Sockudo {
    child: Child,
    port: u16,
}

impl Sockudo {
    const APP_ID: &str = "12345";
    const KEY: &str = "app-key-abc";
    const SECRET: &str = "app-secret-xyz";

    /// Starts sockudo and waits (10 s at most) until it is up; None, said on stderr, when it
    /// is not installed or does not come up.
    pub(crate) async fn start() -> Option<Sockudo> {
        // An empty directory: sockudo reads ./config/config.toml when there is one.
        let dir =
            std::env::temp_dir().join(format!("replisync-bench-sockudo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let (port, metrics_port) = (free_port()?, free_port()?);
        let child = Command::new("sockudo")
            .current_dir(&dir)
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("METRICS_HOST", "127.0.0.1")
            .env("METRICS_PORT", metrics_port.to_string())
            .env("SOCKUDO_DEFAULT_APP_ID", Self::APP_ID)
            .env("SOCKUDO_DEFAULT_APP_KEY", Self::KEY)
            .env("SOCKUDO_DEFAULT_APP_SECRET", Self::SECRET)
            .env("RATE_LIMITER_ENABLED", "false")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!(
                "sockudo is not installed (scripts/setup installs it): skipping poke latency"
            );
            return None;
        };
        let sockudo = Sockudo { child, port };
        if sockudo.wait_until_up().await {
            Some(sockudo)
        } else {
            eprintln!("sockudo did not come up: skipping poke latency");
            None
        }
    }

    async fn wait_until_up(&self) -> bool {
        let up = format!("http://127.0.0.1:{}/up", self.port);
        for _ in 0..100 {
            if reqwest::get(&up)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Points a replisync `command` at this sockudo.
    fn configure_pusher(&self, command: &mut Command) {
        command
            .env("PUSHER_APP_ID", Self::APP_ID)
            .env("PUSHER_KEY", Self::KEY)
            .env("PUSHER_SECRET", Self::SECRET)
            .env("PUSHER_HOST", "127.0.0.1")
            .env("PUSHER_PORT", self.port.to_string())
            .env("PUSHER_SCHEME", "http");
    }
}

impl Drop for Sockudo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()
        .map(|a| a.port())
}
