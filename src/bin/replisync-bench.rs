//! The benchmark: starts a real replisync (and sockudo, when installed) on loopback, drives it
//! with the real protocol over HTTP, and prints a table of medians and p99s (and writes JSON).
//!
//! Every workload is bounded in requests and in time. The "floor" runs the same SQL work a
//! push performs (through the Postgres store, no HTTP, no handlers) at the same concurrency, in
//! the same run, so replisync's throughput can be read as a ratio that means the same anywhere.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use replisync::protocol::SpaceId;
use replisync::store::postgres::PgStore;
use replisync::store::{ClientGroupRecord, ClientRecord, EntryChange, PushChanges, Store};
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::PgConnectOptions;
use std::str::FromStr;

#[derive(Parser, Debug)]
#[command(about = "Benchmarks a replisync server on loopback")]
struct Args {
    /// A Postgres server where the benchmark may create and drop the database `replisync_bench`.
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Fewer requests per workload, for a quick look (the figures are noisier).
    #[arg(long)]
    quick: bool,
    /// Rounds of each push workload (medians are reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-results.json")]
    json: String,
    /// The replisync binary (default: next to this one).
    #[arg(long)]
    server: Option<String>,
    /// Run only these workloads (comma-separated): push, storm, first-pull, poke.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "push,storm,first-pull,poke"
    )]
    only: Vec<String>,
}

const DB_NAME: &str = "replisync_bench";
const POOL_SIZE: u32 = 16;
/// No workload runs longer than this, whatever its request count.
const WORKLOAD_DEADLINE: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bench_url = fresh_database(&args.database_url).await?;
    // Pokes off for workloads 1-5: sockudo on the same two cores would compete with them.
    let server = Server::start(&args, &bench_url, None).await?;
    let bench = Bench {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()?,
        base: server.base.clone(),
        scale: if args.quick { 4 } else { 1 },
        admin_url: args.database_url.clone(),
        repeat: args.repeat.max(1),
    };
    let floor_store =
        Arc::new(PgStore::connect(PgConnectOptions::from_str(&bench_url)?, POOL_SIZE).await?);
    let mut report = Report::default();
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.idle_rss_mb = server.rss_mb();

    let run = |workload: &str| args.only.iter().any(|w| w == workload);
    if run("push") {
        push_workloads(&bench, &floor_store, &mut report).await?;
    }
    if run("storm") {
        report.storm = Some(bench.poke_storm(1000).await?);
    }
    if run("first-pull") {
        for entries in [10_000, 100_000] {
            report
                .first_pulls
                .push(bench.first_pull(&args, &bench_url, entries).await?);
        }
    }
    report.idle_rss_after_mb = server.rss_mb();
    if run("poke")
        && let Some(sockudo) = Sockudo::start().await
    {
        let poking_server = Server::start(&args, &bench_url, Some(&sockudo)).await?;
        report.poke = Some(bench.poke_latency(&poking_server, 60).await?);
    }
    report.print();
    std::fs::write(&args.json, serde_json::to_string_pretty(&report.to_json())?)?;
    println!("\nwrote {}", args.json);
    floor_store.close().await;
    Ok(())
}

/// Workloads 1 to 3 and the floor: one space, 100 spaces, batches of 100.
async fn push_workloads(
    bench: &Bench,
    floor_store: &Arc<PgStore>,
    report: &mut Report,
) -> anyhow::Result<()> {
    for clients in [1, 8, 64] {
        let label = format!("push, one space, C={clients}");
        let rounds =
            compare_with_floor(bench, floor_store, &format!("one-{clients}"), clients, 1).await?;
        report.push_rows(label, rounds);
    }
    for clients in [8, 64] {
        let label = format!("push, 100 spaces, C={clients}");
        let rounds =
            compare_with_floor(bench, floor_store, &format!("many-{clients}"), clients, 100)
                .await?;
        report.push_rows(label, rounds);
    }
    let mut rounds = Vec::new();
    for round in 0..bench.repeat {
        let served = bench
            .push_workload(&format!("batched-r{round}"), 8, 1, 100, 400 / bench.scale)
            .await?;
        rounds.push((served, None));
    }
    report.push_rows("push, 100 mutations each, C=8".into(), rounds);
    Ok(())
}

/// Runs a push workload and its floor `bench.repeat` times, alternating, each round on
/// fresh spaces and clients.
async fn compare_with_floor(
    bench: &Bench,
    floor_store: &Arc<PgStore>,
    name: &str,
    clients: usize,
    spaces: usize,
) -> anyhow::Result<Vec<(PushFigures, Option<PushFigures>)>> {
    let total = bench.total_pushes(clients);
    let mut rounds = Vec::new();
    for round in 0..bench.repeat {
        let served = bench
            .push_workload(&format!("{name}-r{round}"), clients, spaces, 1, total)
            .await?;
        let floor = floor_workload(
            floor_store,
            &format!("floor-{name}-r{round}"),
            clients,
            spaces,
            total,
        )
        .await?;
        rounds.push((served, Some(floor)));
    }
    Ok(rounds)
}

/// Drops and recreates the benchmark database; returns its URL.
async fn fresh_database(admin_url: &str) -> anyhow::Result<String> {
    let options = PgConnectOptions::from_str(admin_url).context("BENCH_DATABASE_URL")?;
    ensure_loopback(options.get_host())?;
    let mut conn = sqlx::PgConnection::connect_with(&options).await?;
    sqlx::query("DROP DATABASE IF EXISTS replisync_bench WITH (FORCE)")
        .execute(&mut conn)
        .await?;
    sqlx::query("CREATE DATABASE replisync_bench")
        .execute(&mut conn)
        .await?;
    let mut url = reqwest::Url::parse(admin_url)?;
    url.set_path(DB_NAME);
    Ok(url.to_string())
}

/// The benchmark loads the database as hard as it can: it refuses any but this machine's.
fn ensure_loopback(host: &str) -> anyhow::Result<()> {
    let is_socket_dir = host.starts_with('/');
    let is_loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !(is_socket_dir || is_loopback) {
        bail!(
            "BENCH_DATABASE_URL must name a Postgres on this machine (loopback or a Unix socket), not {host}"
        );
    }
    Ok(())
}

/// A replisync process whose log lines are kept for the poke latencies.
struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    async fn start(
        args: &Args,
        database_url: &str,
        sockudo: Option<&Sockudo>,
    ) -> anyhow::Result<Server> {
        let binary = match &args.server {
            Some(path) => path.into(),
            None => std::env::current_exe()?.with_file_name("replisync"),
        };
        let mut command = Command::new(&binary);
        command
            .env_clear()
            .env("DATABASE_URL", database_url)
            .env("REPLISYNC_LISTEN", "127.0.0.1:0")
            .env("REPLISYNC_DB_MAX_CONNECTIONS", POOL_SIZE.to_string())
            .env("REPLISYNC_LOG_FORMAT", "json")
            .env("REPLISYNC_SSE", "false")
            .env(
                "RUST_LOG",
                "warn,replisync=info,replisync::poke::pusher=debug",
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(sockudo) = sockudo {
            command
                .env("PUSHER_APP_ID", Sockudo::APP_ID)
                .env("PUSHER_KEY", Sockudo::KEY)
                .env("PUSHER_SECRET", Sockudo::SECRET)
                .env("PUSHER_HOST", "127.0.0.1")
                .env("PUSHER_PORT", sockudo.port.to_string())
                .env("PUSHER_SCHEME", "http");
        }
        let mut child = command.spawn().with_context(|| {
            format!(
                "cannot start {} (build it: cargo build --release)",
                binary.display()
            )
        })?;
        let stdout = child.stdout.take().context("server stdout")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(entry) = serde_json::from_str::<Value>(&line)
                    && let Some(address) = entry["fields"]["address"].as_str()
                {
                    let _ = address_tx.send(address.to_owned());
                }
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let address = address_rx
            .recv_timeout(Duration::from_secs(30))
            .context("replisync did not report its address")?;
        Ok(Server {
            child,
            base: format!("http://{address}"),
            log,
        })
    }

    fn rss_mb(&self) -> f64 {
        proc_status_kb(self.child.id(), "VmRSS:") as f64 / 1024.0
    }

    /// Resets the peak resident size (Linux `clear_refs` 5), so `peak_rss_mb` covers what follows.
    fn reset_peak_rss(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5").is_ok()
    }

    fn peak_rss_mb(&self) -> f64 {
        proc_status_kb(self.child.id(), "VmHWM:") as f64 / 1024.0
    }

    /// Poke latencies (commit to accepted) the server logged since `from_line`.
    fn poke_latencies_since(&self, from_line: usize) -> Vec<f64> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter()
            .skip(from_line)
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter_map(|entry| entry["fields"]["poke_latency_ms"].as_f64())
            .collect()
    }

    fn log_len(&self) -> usize {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
struct Sockudo {
    child: Child,
    port: u16,
}

impl Sockudo {
    const APP_ID: &str = "12345";
    const KEY: &str = "app-key-abc";
    const SECRET: &str = "app-secret-xyz";

    async fn start() -> Option<Sockudo> {
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
        let up = format!("http://127.0.0.1:{port}/up");
        for _ in 0..100 {
            if reqwest::get(&up)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Some(sockudo);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("sockudo did not come up: skipping poke latency");
        None
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

struct Bench {
    http: reqwest::Client,
    base: String,
    /// Divides request counts (4 with --quick).
    scale: usize,
    /// For Postgres's statistics views.
    admin_url: String,
    /// Rounds of each push workload.
    repeat: usize,
}

/// Latencies and throughput of one push workload.
struct PushFigures {
    mutations: usize,
    elapsed: Duration,
    latencies_ms: Vec<f64>,
}

impl PushFigures {
    fn mutations_per_second(&self) -> f64 {
        self.mutations as f64 / self.elapsed.as_secs_f64()
    }
}

impl Bench {
    fn total_pushes(&self, clients: usize) -> usize {
        (match clients {
            1 => 1000,
            8 => 2400,
            _ => 3200,
        }) / self.scale
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        post(&self.http, &self.base, path, body).await
    }

    /// `clients` concurrent clients, each pushing `batch` increments per push in turn to the
    /// `spaces` spaces of this workload (one client group per client and space), until
    /// `total_pushes` pushes are answered.
    async fn push_workload(
        &self,
        name: &str,
        clients: usize,
        spaces: usize,
        batch: usize,
        total_pushes: usize,
    ) -> anyhow::Result<PushFigures> {
        let (http, base, name) = (self.http.clone(), self.base.clone(), name.to_owned());
        drive_clients(clients, spaces, batch, total_pushes, move |job| {
            let (http, base) = (http.clone(), base.clone());
            let client = format!("{name}-c{}-s{}", job.client, job.space);
            let mutations: Vec<Value> = (0..batch as u64)
                .map(|i| json!({"id": job.first_id + i, "name": "increment", "clientID": client,
                                "args": {"key": format!("counter-{}", i % 10), "delta": 1}, "timestamp": 1.0}))
                .collect();
            let body = json!({"pushVersion": 1, "schemaVersion": "", "profileID": "bench",
                              "clientGroupID": format!("{client}-group"), "mutations": mutations});
            let path = format!("/spaces/{name}-{}/push", job.space);
            async move { post(&http, &base, &path, &body).await.map(drop) }
        })
        .await
    }

    /// N clients hold cookie V; one push makes V+1; all N pull from V at once.
    async fn poke_storm(&self, watchers: usize) -> anyhow::Result<Value> {
        let space = "storm";
        let push = |id: u64| {
            json!({"pushVersion": 1, "schemaVersion": "", "profileID": "bench", "clientGroupID": "storm-writer",
            "mutations": [{"id": id, "name": "increment", "clientID": "storm-writer-c", "args": {"key": "n", "delta": 1}, "timestamp": 1.0}]})
        };
        self.post(&format!("/spaces/{space}/push"), &push(1))
            .await?;
        let first = self
            .post(
                &format!("/spaces/{space}/pull"),
                &pull_body("storm-w0", Value::Null),
            )
            .await?;
        let cookie = first["cookie"].clone();
        self.post(&format!("/spaces/{space}/push"), &push(2))
            .await?;

        let metrics_before = self.metrics().await?;
        let xacts_before = self.database_transactions().await?;
        let started = Instant::now();
        let pulls: Vec<_> = (0..watchers)
            .map(|w| {
                let (http, url) = (
                    self.http.clone(),
                    format!("{}/spaces/{space}/pull", self.base),
                );
                let body = pull_body(&format!("storm-w{w}"), cookie.clone());
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let response = http.post(url).body(body.to_string()).send().await?;
                    let body: Value = response.json().await?;
                    anyhow::ensure!(
                        body["patch"].as_array().is_some_and(|p| p.len() == 1),
                        "bad storm pull: {body}"
                    );
                    anyhow::Ok(sent.elapsed().as_secs_f64() * 1000.0)
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for pull in pulls {
            latencies.push(pull.await??);
        }
        let elapsed = started.elapsed();
        let xacts = self.database_transactions().await? - xacts_before;
        let metrics_after = self.metrics().await?;
        let reads = metric(&metrics_after, "replisync_pull_reads_total")
            - metric(&metrics_before, "replisync_pull_reads_total");
        Ok(json!({
            "watchers": watchers,
            "all_answered_ms": elapsed.as_secs_f64() * 1000.0,
            "pulls_per_second": watchers as f64 / elapsed.as_secs_f64(),
            "pull_latency_p50_ms": percentile(&mut latencies, 50.0),
            "pull_latency_p99_ms": percentile(&mut latencies, 99.0),
            "snapshot_reads": reads,
            "database_transactions_per_pull": xacts as f64 / watchers as f64,
        }))
    }

    /// A space of `entries` entries of about 200 bytes, then one first pull of it.
    /// The pull is served by a freshly started server (after loading through the main one),
    /// so its memory figures are not blurred by what loading left in the allocator.
    async fn first_pull(
        &self,
        args: &Args,
        database_url: &str,
        entries: usize,
    ) -> anyhow::Result<Value> {
        let space = format!("big-{entries}");
        let value = "x".repeat(180);
        let mut id = 1u64;
        let setup_started = Instant::now();
        for chunk in (0..entries).collect::<Vec<_>>().chunks(500) {
            let mutations: Vec<Value> = chunk
                .iter()
                .map(|i| {
                    id += 1;
                    json!({"id": id - 1, "name": "set", "clientID": format!("{space}-loader"), "timestamp": 1.0,
                           "args": {"key": format!("item/{i:08}"), "value": {"i": i, "text": value}}})
                })
                .collect();
            let body = json!({"pushVersion": 1, "schemaVersion": "", "profileID": "bench",
                              "clientGroupID": format!("{space}-loader-group"), "mutations": mutations});
            self.post(&format!("/spaces/{space}/push"), &body).await?;
            anyhow::ensure!(
                setup_started.elapsed() < Duration::from_secs(300),
                "loading {entries} entries took too long"
            );
        }
        let server = Server::start(args, database_url, None).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss_before = server.rss_mb();
        let peak_reset = server.reset_peak_rss();
        let started = Instant::now();
        let response = self
            .http
            .post(format!("{}/spaces/{space}/pull", server.base))
            .body(pull_body("reader", Value::Null).to_string())
            .send()
            .await?;
        let mut bytes = 0usize;
        let mut stream = response;
        while let Some(chunk) = stream.chunk().await? {
            bytes += chunk.len();
        }
        let latency = started.elapsed();
        let peak = server.peak_rss_mb();
        Ok(json!({
            "entries": entries,
            "latency_ms": latency.as_secs_f64() * 1000.0,
            "response_mb": bytes as f64 / 1_048_576.0,
            "server_rss_before_mb": rss_before,
            "server_peak_rss_mb": if peak_reset { Value::from(peak) } else { Value::Null },
        }))
    }

    /// Pushes spaced out so that they do not coalesce; latency from commit to sockudo's 200,
    /// as the server logs it.
    async fn poke_latency(&self, server: &Server, pokes: u64) -> anyhow::Result<Value> {
        let from_line = server.log_len();
        for id in 1..=pokes {
            let body = json!({"pushVersion": 1, "schemaVersion": "", "profileID": "bench", "clientGroupID": "poker-group",
                "mutations": [{"id": id, "name": "increment", "clientID": "poker", "args": {"key": "n", "delta": 1}, "timestamp": 1.0}]});
            post(&self.http, &server.base, "/spaces/poked/push", &body).await?;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut latencies = server.poke_latencies_since(from_line);
        Ok(json!({
            "pokes": latencies.len(),
            "commit_to_accepted_p50_ms": percentile(&mut latencies, 50.0),
            "commit_to_accepted_p99_ms": percentile(&mut latencies, 99.0),
        }))
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Transactions committed in the benchmark database so far (each single statement outside
    /// a transaction counts as one).
    async fn database_transactions(&self) -> anyhow::Result<i64> {
        // Backends flush their statistics at most once a second, and after 10 s when idle.
        tokio::time::sleep(Duration::from_secs(11)).await;
        let mut conn =
            sqlx::PgConnection::connect_with(&PgConnectOptions::from_str(&self.admin_url)?).await?;
        let n: i64 = sqlx::query_scalar("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'replisync_bench'")
            .fetch_one(&mut conn)
            .await?;
        Ok(n)
    }
}

/// POSTs a push or pull; anything but a 200 without an `error` field is an error.
async fn post(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let response = http
        .post(format!("{base}{path}"))
        .body(body.to_string())
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if status != 200 || body.get("error").is_some() {
        bail!("{path} answered {status}: {body}");
    }
    Ok(body)
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn pull_body(group: &str, cookie: Value) -> Value {
    json!({"pullVersion": 1, "schemaVersion": "", "profileID": "bench", "clientGroupID": group, "cookie": cookie})
}

/// The floor: the SQL work of a one-increment push, straight through the Postgres store (the
/// same statements, in the same order), with the same clients, spaces and concurrency.
async fn floor_workload(
    store: &Arc<PgStore>,
    name: &str,
    clients: usize,
    spaces: usize,
    total_pushes: usize,
) -> anyhow::Result<PushFigures> {
    let (store, name) = (store.clone(), name.to_owned());
    drive_clients(clients, spaces, 1, total_pushes, move |job| {
        let store = store.clone();
        let space = format!("{name}-{}", job.space);
        let client = format!("{name}-c{}-s{}", job.client, job.space);
        async move { floor_push(&*store, &space, &client, job.first_id).await }
    })
    .await
}

/// One push for a workload to make: which client, to which of the workload's spaces, and the
/// id of its first mutation.
#[derive(Clone, Copy)]
struct PushJob {
    client: usize,
    space: usize,
    first_id: u64,
}

/// Runs `clients` concurrent clients; each makes its share of `total_pushes` pushes (of
/// `batch` mutations) one after another, in turn to each of `spaces` spaces, through `push`.
/// Bounded by WORKLOAD_DEADLINE as well.
async fn drive_clients<F, Fut>(
    clients: usize,
    spaces: usize,
    batch: usize,
    total_pushes: usize,
    push: F,
) -> anyhow::Result<PushFigures>
where
    F: Fn(PushJob) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let per_client = total_pushes.div_ceil(clients);
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|client| {
            let push = push.clone();
            tokio::spawn(async move {
                let mut next_ids = vec![1u64; spaces];
                let mut latencies = Vec::with_capacity(per_client);
                for k in 0..per_client {
                    if started.elapsed() > WORKLOAD_DEADLINE {
                        break;
                    }
                    let space = (client + k) % spaces;
                    let job = PushJob {
                        client,
                        space,
                        first_id: next_ids[space],
                    };
                    next_ids[space] += batch as u64;
                    let sent = Instant::now();
                    push(job).await?;
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies_ms = Vec::new();
    for worker in workers {
        latencies_ms.extend(worker.await??);
    }
    Ok(PushFigures {
        mutations: latencies_ms.len() * batch,
        elapsed: started.elapsed(),
        latencies_ms,
    })
}

async fn floor_push(store: &dyn Store, space: &str, client: &str, id: u64) -> anyhow::Result<()> {
    let space = SpaceId::parse(space).map_err(anyhow::Error::msg)?;
    let group_id = format!("{client}-group");
    let mut tx = store.begin_push(&space).await?;
    let state = tx.client_state(&group_id, &[client.to_owned()]).await?;
    let key = "counter-0";
    let current: i64 = tx
        .entry(key)
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let changes = PushChanges {
        version: state.space_version + 1,
        new_client_group: state.group.is_none().then(|| ClientGroupRecord {
            id: group_id.clone(),
            space_id: space.as_str().to_owned(),
            user_id: "anonymous".into(),
        }),
        clients: vec![ClientRecord {
            id: client.to_owned(),
            client_group_id: group_id,
            last_mutation_id: id,
        }],
        entries: vec![EntryChange {
            key: key.into(),
            value: Some((current + 1).to_string()),
        }],
    };
    tx.commit(changes).await?;
    Ok(())
}

fn percentile(values: &mut [f64], pct: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((pct / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank]
}

#[derive(Default)]
struct Report {
    idle_rss_mb: f64,
    idle_rss_after_mb: f64,
    pushes: Vec<Value>,
    storm: Option<Value>,
    first_pulls: Vec<Value>,
    poke: Option<Value>,
}

impl Report {
    /// One table row from several rounds: median throughputs, the median of the rounds'
    /// ratios, and latency percentiles over every push of every round.
    fn push_rows(&mut self, workload: String, rounds: Vec<(PushFigures, Option<PushFigures>)>) {
        let mut throughputs: Vec<f64> = rounds
            .iter()
            .map(|(s, _)| s.mutations_per_second())
            .collect();
        let mut latencies: Vec<f64> = rounds
            .iter()
            .flat_map(|(s, _)| s.latencies_ms.iter().copied())
            .collect();
        let mut row = json!({
            "workload": workload,
            "rounds": rounds.len(),
            "mutations_per_second": percentile(&mut throughputs, 50.0),
            "mutations_per_second_rounds": throughputs,
            "push_p50_ms": percentile(&mut latencies, 50.0),
            "push_p99_ms": percentile(&mut latencies, 99.0),
            "pushes": latencies.len(),
        });
        let floors: Vec<(f64, f64)> = rounds
            .iter()
            .filter_map(|(served, floor)| {
                floor
                    .as_ref()
                    .map(|f| (served.mutations_per_second(), f.mutations_per_second()))
            })
            .collect();
        if !floors.is_empty() {
            let mut floor_throughputs: Vec<f64> = floors.iter().map(|(_, f)| *f).collect();
            let mut ratios: Vec<f64> = floors.iter().map(|(s, f)| s / f).collect();
            let mut floor_latencies: Vec<f64> = rounds
                .iter()
                .filter_map(|(_, f)| f.as_ref())
                .flat_map(|f| f.latencies_ms.iter().copied())
                .collect();
            row["floor_mutations_per_second"] = json!(percentile(&mut floor_throughputs, 50.0));
            row["floor_p50_ms"] = json!(percentile(&mut floor_latencies, 50.0));
            row["ratio_to_floor"] = json!(percentile(&mut ratios, 50.0));
            row["ratio_to_floor_rounds"] = json!(ratios);
        }
        eprintln!("  {}", row);
        self.pushes.push(row);
    }

    fn to_json(&self) -> Value {
        json!({
            "idle_rss_mb": self.idle_rss_mb,
            "idle_rss_after_mb": self.idle_rss_after_mb,
            "pushes": self.pushes,
            "poke_storm": self.storm,
            "first_pulls": self.first_pulls,
            "poke_latency": self.poke,
        })
    }

    fn print(&self) {
        let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
        println!(
            "\n| workload | mutations/s | push p50 ms | push p99 ms | floor mutations/s | ratio to floor |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for row in &self.pushes {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                row["workload"].as_str().unwrap_or(""),
                f(&row["mutations_per_second"]),
                f(&row["push_p50_ms"]),
                f(&row["push_p99_ms"]),
                f(&row["floor_mutations_per_second"]),
                row["ratio_to_floor"]
                    .as_f64()
                    .map_or("-".to_owned(), |x| format!("{x:.2}")),
            );
        }
        if let Some(storm) = &self.storm {
            println!(
                "\npoke storm: {} watchers pulled at once; all answered in {} ms ({} pulls/s; pull p50 {} ms, p99 {} ms); \
                 {} snapshot reads, {:.3} database transactions per pull",
                storm["watchers"],
                f(&storm["all_answered_ms"]),
                f(&storm["pulls_per_second"]),
                f(&storm["pull_latency_p50_ms"]),
                f(&storm["pull_latency_p99_ms"]),
                storm["snapshot_reads"],
                storm["database_transactions_per_pull"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            );
        }
        println!(
            "\n| first pull | latency ms | response MB | server RSS before MB | server peak RSS MB |"
        );
        println!("|---|---:|---:|---:|---:|");
        for pull in &self.first_pulls {
            println!(
                "| {} entries | {} | {} | {} | {} |",
                pull["entries"],
                f(&pull["latency_ms"]),
                f(&pull["response_mb"]),
                f(&pull["server_rss_before_mb"]),
                f(&pull["server_peak_rss_mb"]),
            );
        }
        if let Some(poke) = &self.poke {
            println!(
                "\npoke latency (commit to accepted by sockudo, {} pokes): p50 {} ms, p99 {} ms",
                poke["pokes"],
                f(&poke["commit_to_accepted_p50_ms"]),
                f(&poke["commit_to_accepted_p99_ms"])
            );
        }
        println!(
            "\nserver resident memory: {:.1} MB idle at start, {:.1} MB at the end",
            self.idle_rss_mb, self.idle_rss_after_mb
        );
    }
}
