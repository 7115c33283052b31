//! The benchmark (`cargo bench --bench replisync-bench`): starts a real replisync (and sockudo,
//! when installed, and a Redis subscriber, when Redis answers) on loopback, runs the chosen
//! workloads, prints the tables and writes JSON.

mod api;
mod commit_floor;
mod database;
mod floor;
mod gc_workloads;
mod load;
mod poke_workloads;
mod report;
mod rules_data;
mod rules_report;
mod rules_workloads;
mod server;
mod server_api_workloads;
mod soak;
mod socketio;
mod transfer;
mod workloads;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use replisync::store::Store;
use replisync::store::postgres::PgStore;
use sqlx::postgres::PgConnectOptions;

use api::Api;
use commit_floor::CommitFloor;
use report::Report;
use server::Server;
use workloads::{Bench, Floors, PUSH_WORKLOADS};

#[derive(Parser, Debug)]
#[command(
    name = "replisync-bench",
    about = "Benchmarks a replisync server on loopback"
)]
struct Args {
    /// A Postgres server where the benchmark may create and drop the database `replisync_bench`
    /// (BENCH_DATABASE_NAME names another).
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
    /// The replisync binary to benchmark (by default the one cargo built along with this bench).
    #[arg(long, default_value = env!("CARGO_BIN_EXE_replisync"))]
    server: PathBuf,
    /// Run only these workloads (comma-separated): push (on Postgres, then on a replisync
    /// started on its embedded SQLite store, in a fresh temporary file), storm, first-pull,
    /// poke, js, gc, rules (visibility rules against none; not by default: it fills 211,200
    /// entries), server-api (server API mutation calls beside pushes, on Postgres then SQLite;
    /// not by default), transfer (`replisync export` and `import` of 100,000 and 1,000,000
    /// entries, on Postgres then SQLite; not by default: it writes 1.1 million entries per
    /// store and as many again per round, and needs about 1 GB of disk), and soak (never by
    /// default; best alone: it starts from the fresh database).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "push,storm,first-pull,poke,js,gc"
    )]
    only: Vec<String>,
    /// Of the push workloads, run only these (comma-separated): one-1, one-8, one-64, many-8,
    /// many-64, batched (on Postgres); sqlite-one-8, sqlite-one-64, sqlite-many-8,
    /// sqlite-many-64 (the same on SQLite, no floor).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(PUSH_WORKLOADS))]
    push_workloads: Vec<String>,
    /// Skip both floors beside each Postgres push workload: the six statements of a push, and
    /// one durable one-statement commit per push (to compare server builds whose schemas
    /// differ from this benchmark's store).
    #[arg(long)]
    no_floor: bool,
    /// Run the server with REPLISYNC_JWT_SECRET set to this, and send every request with an
    /// HS256 token signed with it (to measure what token checks cost).
    #[arg(long)]
    jwt_secret: Option<String>,
    /// Seconds of the soak's phase of duplicated first pushes (each sent 16 times at once).
    #[arg(long, default_value_t = 240)]
    soak_duplicated_secs: u64,
    /// Seconds of the soak's phase of distinct new client groups.
    #[arg(long, default_value_t = 600)]
    soak_distinct_secs: u64,
    /// Also set these variables for every replisync the benchmark starts (`NAME=VALUE`,
    /// repeatable): e.g. `REPLISYNC_ACCESS_LOG=false`, or `OTEL_EXPORTER_OTLP_ENDPOINT=...` to
    /// measure what tracing costs.
    #[arg(long = "server-env", value_parser = parse_server_env)]
    server_env: Vec<(String, String)>,
    /// Passed by `cargo bench` to every bench target; ignored.
    #[arg(long = "bench", hide = true)]
    _cargo_bench: bool,
}

/// `NAME=VALUE`.
fn parse_server_env(pair: &str) -> Result<(String, String), String> {
    let (name, value) = pair
        .split_once('=')
        .ok_or_else(|| format!("{pair:?} is not NAME=VALUE"))?;
    Ok((name.to_owned(), value.to_owned()))
}

impl Args {
    fn runs(&self, workload: &str) -> bool {
        self.only.iter().any(|w| w == workload)
    }
}

/// Connections of replisync's pool, and of each floor's.
const POOL_SIZE: u32 = 16;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    server::set_extra_env(args.server_env.clone());
    let bench_url = database::fresh_database(&args.database_url).await?;
    // Pokes off for workloads 1-5: sockudo on the same two cores would compete with them.
    let jwt_secret = args.jwt_secret.as_deref();
    let server = Server::start(&args.server, &bench_url, None, jwt_secret).await?;
    let bench = Bench {
        api: Api::new(http_client(jwt_secret)?, &server.base),
        scale: if args.quick { 4 } else { 1 },
        repeat: args.repeat.max(1),
        admin_url: args.database_url.clone(),
        server_binary: args.server.clone(),
        database_url: bench_url.clone(),
        jwt_secret: args.jwt_secret.clone(),
        push_workloads: args.push_workloads.clone(),
        floor: !args.no_floor,
    };
    let floors = Floors {
        statements: Arc::new(
            PgStore::connect(PgConnectOptions::from_str(&bench_url)?, POOL_SIZE).await?,
        ),
        commit: CommitFloor::connect(&bench_url).await?,
    };
    let mut report = Report::default();
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.idle_rss_mb = server.rss_mb();

    if args.runs("soak") {
        let settings = soak::SoakSettings {
            duplicated: Duration::from_secs(args.soak_duplicated_secs),
            distinct: Duration::from_secs(args.soak_distinct_secs),
        };
        report.soak = Some(bench.soak(&server, settings).await?);
    }
    if args.runs("push") {
        bench.push_workloads(&floors, &mut report).await?;
    }
    if args.runs("js") {
        bench.js_workloads(&mut report).await?;
    }
    if args.runs("server-api") {
        bench.server_api_workloads(&mut report).await?;
    }
    if args.runs("transfer") {
        bench.transfer_workloads(&mut report).await?;
    }
    if args.runs("storm") {
        report.poke_storm = Some(bench.poke_storm("storm", 1000).await?);
    }
    if args.runs("first-pull") {
        for entries in [10_000, 100_000] {
            report.first_pulls.push(bench.first_pull(entries).await?);
        }
    }
    if args.runs("rules") {
        report.rules = Some(bench.rules_workloads().await?);
    }
    if args.runs("gc") {
        report.compaction = Some(bench.compaction().await?);
        bench.pushes_beside_gc(&mut report).await?;
    }
    report.idle_rss_after_mb = server.rss_mb();
    if args.runs("poke") {
        bench.poke_workloads(&mut report).await?;
    }
    if let Some(secret) = jwt_secret {
        report.token_check_us = Some(token_check_micros(secret).await?);
    }
    report.print();
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    println!("\nwrote {}", args.json);
    floors.statements.close().await;
    floors.commit.close().await;
    let problems = poke_workloads::poke_problems(&report);
    for problem in &problems {
        eprintln!("poke workload: {problem}");
    }
    anyhow::ensure!(
        problems.is_empty(),
        "the poke figures broke {} expectation(s), listed above (the figures are written all the same)",
        problems.len()
    );
    Ok(())
}

/// Verifies the benchmark's token 20,000 times in this process (as the server does on every
/// request: signature, claims, grants) and answers the median of 20 batches, in µs per check.
async fn token_check_micros(secret: &str) -> anyhow::Result<f64> {
    use replisync::auth::jwt::{ClaimRules, JwtAuthenticator, Keys};
    use replisync::auth::{Access, Authenticator};
    let authenticator = JwtAuthenticator::new(
        Keys::Secret(jsonwebtoken::DecodingKey::from_secret(secret.as_bytes())),
        ClaimRules::default(),
    );
    let header = bearer_token(secret)?;
    let space = replisync::protocol::SpaceId::parse("bench-space").map_err(anyhow::Error::msg)?;
    let mut batches = Vec::new();
    for _ in 0..20 {
        let started = std::time::Instant::now();
        for _ in 0..1000 {
            let identity = authenticator
                .authenticate(Some(&header))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            anyhow::ensure!(identity.grants.allow(&space, Access::Write));
        }
        batches.push(started.elapsed().as_secs_f64() * 1e6 / 1000.0);
    }
    batches.sort_by(f64::total_cmp);
    Ok(batches[batches.len() / 2])
}

/// `Bearer <token>` for user `bench`, granting every space for a day.
fn bearer_token(secret: &str) -> anyhow::Result<String> {
    rules_data::bearer(secret, "bench", &[])
}

/// The benchmark's HTTP client; with a JWT secret, every request carries a token granting
/// every space.
fn http_client(jwt_secret: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(secret) = jwt_secret {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            bearer_token(secret)?.parse()?,
        );
    }
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .default_headers(headers)
        .build()?)
}
