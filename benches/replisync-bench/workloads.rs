//! The workloads, each bounded in requests and in time: pushes (with their floors, and on
//! SQLite), the poke storm and first pulls of big spaces (poke latency: poke_workloads.rs); each
//! returns its typed figures.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use replisync::store::postgres::PgStore;
use serde_json::{Value, json};

use crate::api::{Api, Mutation, increment, js_increment, pull_body, push_body, set};
use crate::commit_floor::CommitFloor;
use crate::database::transactions_so_far;
use crate::floor::floor_workload;
use crate::load::{PushFigures, client_name, drive_clients, group_name, space_name};
use crate::report::{FirstPullFigures, PushRound, Report, StormFigures, percentile};
use crate::server::Server;

/// Entries of the space a first pull reads are loaded this many per push.
const LOAD_BATCH: usize = 500;
/// Loading the entries a first pull reads may take this long at most.
const LOAD_DEADLINE: Duration = Duration::from_secs(300);

/// The push workloads --push-workloads may name: on Postgres, then on SQLite.
pub(crate) const PUSH_WORKLOADS: [&str; 10] = [
    "one-1",
    "one-8",
    "one-64",
    "many-8",
    "many-64",
    "batched",
    "sqlite-one-8",
    "sqlite-one-64",
    "sqlite-many-8",
    "sqlite-many-64",
];

/// What each Postgres push workload is compared with, in the same run.
pub(crate) struct Floors {
    /// The six statements of a one-increment push, through the Postgres store (floor.rs).
    pub statements: Arc<PgStore>,
    /// One durable one-statement commit per push (commit_floor.rs).
    pub commit: CommitFloor,
}

#[derive(Clone)]
pub(crate) struct Bench {
    /// The server the push workloads and the storm run against.
    pub api: Api,
    /// Divides request counts (4 with --quick).
    pub scale: usize,
    /// Rounds of each push workload.
    pub repeat: usize,
    /// For Postgres's statistics views.
    pub admin_url: String,
    /// What the first pulls start a fresh server with: its binary and database.
    pub server_binary: PathBuf,
    pub database_url: String,
    /// REPLISYNC_JWT_SECRET of every server started, when tokens are measured.
    pub jwt_secret: Option<String>,
    /// The push workloads to run (of PUSH_WORKLOADS); empty: all.
    pub push_workloads: Vec<String>,
    /// Whether each Postgres push workload is compared with its floors.
    pub floor: bool,
}

impl Bench {
    /// Workloads 1 to 3 and their floors: one space, 100 spaces, batches of 100; then one
    /// space and 100 spaces on SQLite.
    pub(crate) async fn push_workloads(
        &self,
        floors: &Floors,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        for (name, label, clients, spaces) in postgres_shapes() {
            if self.runs_push(&name) {
                let rounds = self
                    .compare_with_floors(floors, &name, clients, spaces)
                    .await?;
                report.add_push_row(label, &rounds);
            }
        }
        if self.runs_push("batched") {
            self.batched_workload(report).await?;
        }
        self.sqlite_push_workloads(report).await
    }

    /// Pushes of 100 increments each, 8 clients, one space.
    async fn batched_workload(&self, report: &mut Report) -> anyhow::Result<()> {
        let mut rounds = Vec::new();
        for round in 0..self.repeat {
            let served = self
                .push_workload(&format!("batched-r{round}"), 8, 1, 100, 400 / self.scale)
                .await?;
            rounds.push(PushRound::alone(served));
        }
        report.add_push_row("push, 100 mutations each, C=8".into(), &rounds);
        Ok(())
    }

    /// Runs a push workload and its floors `self.repeat` times, alternating, each round on
    /// fresh spaces and clients.
    async fn compare_with_floors(
        &self,
        floors: &Floors,
        name: &str,
        clients: usize,
        spaces: usize,
    ) -> anyhow::Result<Vec<PushRound>> {
        let total = self.total_pushes(clients);
        let mut rounds = Vec::new();
        for round in 0..self.repeat {
            let served = self
                .push_workload(&format!("{name}-r{round}"), clients, spaces, 1, total)
                .await?;
            let mut round_figures = PushRound::alone(served);
            if self.floor {
                let floor_name = format!("floor-{name}-r{round}");
                let floor =
                    floor_workload(&floors.statements, &floor_name, clients, spaces, total).await?;
                let commit_name = format!("commit-{name}-r{round}");
                let commit = floors
                    .commit
                    .run(&commit_name, clients, spaces, total)
                    .await?;
                round_figures.floor = Some(floor);
                round_figures.commit_floor = Some(commit);
            }
            rounds.push(round_figures);
        }
        Ok(rounds)
    }

    /// The one-space and 100-space workloads at C=8 and C=64 on a replisync started on its
    /// embedded SQLite store, in a fresh file; no floor.
    async fn sqlite_push_workloads(&self, report: &mut Report) -> anyhow::Result<()> {
        let shapes: Vec<_> = sqlite_shapes()
            .filter(|(name, ..)| self.runs_push(name))
            .collect();
        if shapes.is_empty() {
            return Ok(());
        }
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("replisync.db");
        let jwt_secret = self.jwt_secret.as_deref();
        let server = Server::start_on_sqlite(&self.server_binary, &file, jwt_secret).await?;
        let api = self.api.at(&server.base);
        for (name, label, clients, spaces) in shapes {
            let shape = (clients, spaces, 1, self.total_pushes(clients));
            let mut rounds = Vec::new();
            for round in 0..self.repeat {
                let round_name = format!("{name}-r{round}");
                let served = push_workload_on(&api, increment, &round_name, shape).await?;
                rounds.push(PushRound::alone(served));
            }
            report.add_push_row(label, &rounds);
        }
        Ok(())
    }

    fn runs_push(&self, name: &str) -> bool {
        self.push_workloads.is_empty() || self.push_workloads.iter().any(|w| w == name)
    }

    pub(crate) fn total_pushes(&self, clients: usize) -> usize {
        (match clients {
            1 => 1000,
            8 => 2400,
            _ => 3200,
        }) / self.scale
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
        let shape = (clients, spaces, batch, total_pushes);
        push_workload_on(&self.api, increment, name, shape).await
    }

    /// One-mutation pushes through the JavaScript `jsIncrement` beside the built-in `increment`,
    /// on one server started with the benchmark's module (mutators.js), rounds alternating.
    pub(crate) async fn js_workloads(&self, report: &mut Report) -> anyhow::Result<()> {
        let module = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/replisync-bench/mutators.js"
        );
        let server = Server::start_with_env(
            &self.server_binary,
            &self.database_url,
            None,
            self.jwt_secret.as_deref(),
            &[("REPLISYNC_MUTATORS", module)],
        )
        .await?;
        let api = self.api.at(&server.base);
        for (clients, spaces) in [(1, 1), (8, 100)] {
            let shape = (clients, spaces, 1, self.total_pushes(clients));
            let (mut builtin, mut js) = (Vec::new(), Vec::new());
            for round in 0..self.repeat {
                let name = format!("js-{clients}-{spaces}-r{round}");
                let served = push_workload_on(&api, increment, &format!("{name}-b"), shape).await?;
                builtin.push(PushRound::alone(served));
                let served =
                    push_workload_on(&api, js_increment, &format!("{name}-j"), shape).await?;
                js.push(PushRound::alone(served));
            }
            let label = format!("one-mutation pushes, {spaces} space(s), C={clients}");
            report.add_js_row(label, &builtin, &js);
        }
        Ok(())
    }

    /// N clients hold cookie V; one push makes V+1; all N pull from V at once.
    pub(crate) async fn poke_storm(
        &self,
        space: &str,
        watchers: usize,
    ) -> anyhow::Result<StormFigures> {
        let push = |id: u64| push_body("storm-writer", "storm-writer-c", id, [increment("n", 1)]);
        self.api.push(space, &push(1)).await?;
        let first = self
            .api
            .pull(space, &pull_body("storm-w0", Value::Null))
            .await?;
        let cookie = first["cookie"].clone();
        self.api.push(space, &push(2)).await?;

        let reads_before = self.api.metric("replisync_pull_reads_total").await?;
        let xacts_before = transactions_so_far(&self.admin_url).await?;
        let started = Instant::now();
        let mut latencies = self.pull_all_at_once(space, watchers, &cookie).await?;
        let elapsed = started.elapsed();
        let xacts = transactions_so_far(&self.admin_url).await? - xacts_before;
        let reads = self.api.metric("replisync_pull_reads_total").await? - reads_before;
        Ok(StormFigures {
            watchers,
            all_answered_ms: elapsed.as_secs_f64() * 1000.0,
            pulls_per_second: watchers as f64 / elapsed.as_secs_f64(),
            pull_latency_p50_ms: percentile(&mut latencies, 50.0),
            pull_latency_p99_ms: percentile(&mut latencies, 99.0),
            snapshot_reads: reads,
            database_transactions_per_pull: xacts as f64 / watchers as f64,
        })
    }

    /// `watchers` client groups pull `space` from `cookie` concurrently; each must get a patch
    /// of one operation. Returns their latencies in milliseconds.
    async fn pull_all_at_once(
        &self,
        space: &str,
        watchers: usize,
        cookie: &Value,
    ) -> anyhow::Result<Vec<f64>> {
        let pulls: Vec<_> = (0..watchers)
            .map(|w| {
                let (api, space) = (self.api.clone(), space.to_owned());
                let body = pull_body(&format!("storm-w{w}"), cookie.clone());
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let body = api.pull(&space, &body).await?;
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
        Ok(latencies)
    }

    /// A space of `entries` entries of about 200 bytes, then one first pull of it.
    /// The pull is served by a freshly started server (after loading through the main one),
    /// so its memory figures are not blurred by what loading left in the allocator.
    pub(crate) async fn first_pull(&self, entries: usize) -> anyhow::Result<FirstPullFigures> {
        let space = format!("big-{entries}");
        self.load_entries(&space, entries).await?;
        let fresh = FreshServer {
            jwt_secret: self.jwt_secret.as_deref(),
            env: &[],
        };
        self.first_pull_on_fresh_server(&fresh, &self.api, &space, entries)
            .await
    }

    /// One first pull of `space` (holding `entries` entries) through `api` (its token) from a
    /// replisync started for it as `fresh` says: latency, response size, memory.
    pub(crate) async fn first_pull_on_fresh_server(
        &self,
        fresh: &FreshServer<'_>,
        api: &Api,
        space: &str,
        entries: usize,
    ) -> anyhow::Result<FirstPullFigures> {
        let server = Server::start_with_env(
            &self.server_binary,
            &self.database_url,
            None,
            fresh.jwt_secret,
            fresh.env,
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss_before = server.rss_mb();
        let peak_reset = server.reset_peak_rss();
        let started = Instant::now();
        let bytes = api
            .at(&server.base)
            .pull_response_bytes(space, &pull_body("reader", Value::Null))
            .await?;
        let latency = started.elapsed();
        let peak = server.peak_rss_mb();
        Ok(FirstPullFigures {
            entries,
            latency_ms: latency.as_secs_f64() * 1000.0,
            response_mb: bytes as f64 / 1_048_576.0,
            server_rss_before_mb: rss_before,
            server_peak_rss_mb: peak_reset.then_some(peak),
        })
    }

    /// Sets `item/00000000`... in `space`, `entries` of them, through pushes of LOAD_BATCH.
    async fn load_entries(&self, space: &str, entries: usize) -> anyhow::Result<()> {
        let client = format!("{space}-loader");
        let text = "x".repeat(180);
        let started = Instant::now();
        for first in (0..entries).step_by(LOAD_BATCH) {
            let chunk = first..(first + LOAD_BATCH).min(entries);
            let sets = chunk.map(|i| set(&format!("item/{i:08}"), json!({"i": i, "text": text})));
            let body = push_body(&group_name(&client), &client, first as u64 + 1, sets);
            self.api.push(space, &body).await?;
            anyhow::ensure!(
                started.elapsed() < LOAD_DEADLINE,
                "loading {entries} entries took too long"
            );
        }
        Ok(())
    }
}

/// How a first pull's fresh replisync is started: REPLISYNC_JWT_SECRET, and other variables.
pub(crate) struct FreshServer<'a> {
    pub jwt_secret: Option<&'a str>,
    pub env: &'a [(&'a str, &'a str)],
}

/// The Postgres one-increment push workloads: name, table label, clients, spaces.
fn postgres_shapes() -> impl Iterator<Item = (String, String, usize, usize)> {
    let one = [1, 8, 64].map(|c| (format!("one-{c}"), format!("push, one space, C={c}"), c, 1));
    let many = [8, 64].map(|c| {
        (
            format!("many-{c}"),
            format!("push, 100 spaces, C={c}"),
            c,
            100,
        )
    });
    one.into_iter().chain(many)
}

/// The same workloads at C=8 and C=64 on SQLite, named `sqlite-` and labelled `SQLite, `.
fn sqlite_shapes() -> impl Iterator<Item = (String, String, usize, usize)> {
    postgres_shapes()
        .filter(|(.., clients, _)| *clients > 1)
        .map(|(name, label, clients, spaces)| {
            (
                format!("sqlite-{name}"),
                format!("SQLite, {label}"),
                clients,
                spaces,
            )
        })
}

/// `clients` concurrent clients of `api`, each pushing `batch` mutations made by `mutation` (an
/// increment of one of 10 counters) per push in turn to the `spaces` spaces of this workload (one
/// client group per client and space), until `total_pushes` pushes are answered.
pub(crate) async fn push_workload_on(
    api: &Api,
    mutation: fn(&str, i64) -> Mutation,
    name: &str,
    (clients, spaces, batch, total_pushes): (usize, usize, usize, usize),
) -> anyhow::Result<PushFigures> {
    let (api, name) = (api.clone(), name.to_owned());
    drive_clients(clients, spaces, batch, total_pushes, move |job| {
        let api = api.clone();
        let client = client_name(&name, job);
        let mutations = (0..batch).map(|i| mutation(&format!("counter-{}", i % 10), 1));
        let body = push_body(&group_name(&client), &client, job.first_id, mutations);
        let space = space_name(&name, job.space);
        async move { api.push(&space, &body).await.map(drop) }
    })
    .await
}
