//! Configuration from environment variables (or the matching command-line flags), validated
//! at start-up with messages that name the variable. Every variable is in `.env.example`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use axum::http::HeaderValue;
use clap::{Parser, Subcommand};
use secrecy::SecretString;

use crate::gc::GcSettings;
use crate::mutators::js::JsLimits;
use crate::poke::pusher::PusherArgs;
use crate::pull::{PullLimits, StreamLimits};
use crate::store::pg_session::SessionLimits;
use sqlx::postgres::PgConnectOptions;

#[derive(Parser, Debug)]
#[command(
    name = "replisync",
    version,
    about = "A sync server for Replicache apps"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Serve push, pull and pokes (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Run one garbage collection pass (forget client groups idle past REPLISYNC_CLIENT_TTL)
    /// and exit; does nothing when another instance is collecting.
    Gc,
    /// Ask the server on REPLISYNC_LISTEN's port (through 127.0.0.1 when it listens on every
    /// address) for `GET /healthz`; exit 0 on 200, 1 otherwise. For container health checks.
    Healthcheck,
}

#[derive(Parser, Debug, Clone)]
pub struct Config {
    /// `postgres://...` for Postgres, `sqlite://path` for a SQLite file. Unset: the embedded
    /// SQLite file at REPLISYNC_SQLITE_PATH.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// The SQLite file used when DATABASE_URL is unset.
    #[arg(
        long,
        env = "REPLISYNC_SQLITE_PATH",
        default_value = "replisync-data/replisync.db"
    )]
    pub sqlite_path: PathBuf,

    /// Address and port to listen on.
    #[arg(long, env = "REPLISYNC_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address and port for `/metrics` alone (e.g. 127.0.0.1:9090, for a scraper on a private
    /// network). Unset: `/metrics` is served on REPLISYNC_LISTEN, beside push and pull.
    #[arg(long, env = "REPLISYNC_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Largest accepted request body but a push's, in bytes (larger ones get 413).
    #[arg(long, env = "REPLISYNC_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Largest accepted push body, in bytes (larger ones get 413). Replicache sends every
    /// pending mutation in one push, so this is what a client may have pending.
    #[arg(long, env = "REPLISYNC_MAX_PUSH_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_push_body_bytes: usize,

    /// Most distinct client ids in one push (more get 400 and change nothing).
    #[arg(long, env = "REPLISYNC_MAX_CLIENTS_PER_PUSH", default_value_t = 100)]
    pub max_clients_per_push: usize,

    /// Most mutations one push applies; the rest stay pending on the client and are applied
    /// by its next pushes.
    #[arg(
        long,
        env = "REPLISYNC_MAX_MUTATIONS_PER_PUSH",
        default_value_t = 10_000
    )]
    pub max_mutations_per_push: usize,

    /// Most bytes of keys and values one push's mutators may put (built-in and JavaScript
    /// alike); the mutation that goes past it fails, its writes discarded, and the push goes on.
    #[arg(
        long,
        env = "REPLISYNC_MAX_PUSH_WRITE_BYTES",
        default_value_t = 64 * 1024 * 1024
    )]
    pub max_push_write_bytes: usize,

    /// Milliseconds a push spends running mutators before it commits what it applied and
    /// answers 503 PartiallyApplied (the client sends the rest at once). Unset: a third of
    /// REPLISYNC_REQUEST_TIMEOUT_SECS, so the wait for the space's lock and the commit fit in
    /// what remains.
    #[arg(long, env = "REPLISYNC_PUSH_TIME_BUDGET_MS")]
    pub push_time_budget_ms: Option<u64>,

    /// Bytes of push bodies read at once across all requests; a push beyond it gets 503 with
    /// `Retry-After` (the client retries).
    #[arg(long, env = "REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT", default_value_t = 64 * 1024 * 1024)]
    pub max_push_bytes_in_flight: usize,

    /// Most pushes to one space applied in one transaction (group commit: pushes that arrive
    /// while their space's transaction is busy are applied together in the next). 1 applies
    /// every push in a transaction of its own.
    #[arg(long, env = "REPLISYNC_PUSH_GROUP_MAX_PUSHES", default_value_t = 64)]
    pub push_group_max_pushes: usize,

    /// Milliseconds after which a push group starts no more pushes; those left go to the next
    /// group, so no push waits long behind others.
    #[arg(long, env = "REPLISYNC_PUSH_GROUP_MAX_AGE_MS", default_value_t = 50)]
    pub push_group_max_age_ms: u64,

    /// Database connections per instance.
    #[arg(long, env = "REPLISYNC_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,

    /// Postgres: milliseconds a statement waits for a lock (a space's lock held by another
    /// instance, or by a connection that died) before the push is answered 503 and changes
    /// nothing; 0 waits forever. Unset: a third of REPLISYNC_REQUEST_TIMEOUT_SECS.
    #[arg(long, env = "REPLISYNC_DB_LOCK_TIMEOUT_MS")]
    pub db_lock_timeout_ms: Option<u64>,

    /// Postgres: milliseconds a session may sit idle inside a transaction before the server
    /// ends it, releasing its locks (a replisync that froze or lost its network mid-push); 0:
    /// never. Unset: twice REPLISYNC_REQUEST_TIMEOUT_SECS.
    #[arg(long, env = "REPLISYNC_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS")]
    pub db_idle_in_transaction_timeout_ms: Option<u64>,

    /// Postgres: milliseconds one statement may run (a streamed pull's read lasts as long as
    /// its stream); 0: no limit. Unset: REPLISYNC_PULL_STREAM_TIMEOUT_SECS plus
    /// REPLISYNC_REQUEST_TIMEOUT_SECS.
    #[arg(long, env = "REPLISYNC_DB_STATEMENT_TIMEOUT_MS")]
    pub db_statement_timeout_ms: Option<u64>,

    /// Postgres: seconds of silence after which the database server probes a connection (TCP
    /// keepalive); it drops the connection, and its locks, after three unanswered probes a
    /// third of this apart. 0 leaves the operating system's defaults (about two hours).
    #[arg(long, env = "REPLISYNC_DB_TCP_KEEPALIVE_SECS", default_value_t = 15)]
    pub db_tcp_keepalive_secs: u64,

    /// Seconds any request may take, its body included, before it is answered 503 (a push is
    /// rolled back) and its connection closed. Streamed responses (pull streams, SSE) are
    /// bounded by their own limits once they have started.
    #[arg(long, env = "REPLISYNC_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,

    /// Seconds to finish in-flight requests and pending pokes after SIGTERM or Ctrl-C; then what
    /// still runs is dropped and the process exits with status 1.
    #[arg(long, env = "REPLISYNC_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
    pub shutdown_timeout_secs: u64,

    /// Seconds to keep serving after SIGTERM, with `GET /readyz` answering 503, before the
    /// server stops accepting connections: time for a load balancer to take it out of rotation.
    /// 0 stops accepting at once. The shutdown timeout counts from the end of this delay.
    #[arg(long, env = "REPLISYNC_DRAIN_DELAY_SECS", default_value_t = 5)]
    pub drain_delay_secs: u64,

    /// Streamed pulls (first pulls, and deltas over REPLISYNC_MAX_SHARED_DELTA_BYTES) in flight
    /// at once; others wait up to 5 s for a turn,
    /// then get 503. Unset: half of REPLISYNC_DB_MAX_CONNECTIONS, so pushes and health checks
    /// always find a connection.
    #[arg(long, env = "REPLISYNC_MAX_FIRST_PULLS")]
    pub max_first_pulls: Option<usize>,

    /// Largest delta, in bytes, that an incremental pull builds in memory and shares with
    /// identical concurrent pulls. A larger delta is streamed to each pull from a snapshot of its
    /// own, like a first pull, and counts against REPLISYNC_MAX_FIRST_PULLS.
    #[arg(long, env = "REPLISYNC_MAX_SHARED_DELTA_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_shared_delta_bytes: usize,

    /// Seconds a client may leave a streamed pull unread before it is cut off (its database
    /// snapshot and connection released).
    #[arg(long, env = "REPLISYNC_PULL_STALL_TIMEOUT_SECS", default_value_t = 15)]
    pub pull_stall_timeout_secs: u64,

    /// Seconds a streamed pull may take in all before it is cut off.
    #[arg(
        long,
        env = "REPLISYNC_PULL_STREAM_TIMEOUT_SECS",
        default_value_t = 120
    )]
    pub pull_stream_timeout_secs: u64,
    /// Seconds a connection may take to send complete request headers (counted from accept, or
    /// from the first byte of a later request); then it is closed.
    #[arg(long, env = "REPLISYNC_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,

    /// Seconds a request body may pause between two of its bytes; a body that stalls longer is
    /// cut (408) and its connection closed. Every request, body included, must also be answered
    /// within REPLISYNC_REQUEST_TIMEOUT_SECS.
    #[arg(long, env = "REPLISYNC_BODY_READ_TIMEOUT_SECS", default_value_t = 30)]
    pub body_read_timeout_secs: u64,

    /// Seconds a keep-alive connection may stay open with no request in flight; then it is
    /// closed.
    #[arg(long, env = "REPLISYNC_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,

    /// Most client connections open at once; beyond it, new connections are answered 503 with
    /// Retry-After and closed.
    #[arg(long, env = "REPLISYNC_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Client groups that have neither pushed nor pulled for this long are deleted with their
    /// clients (a duration: `30d`, `12h`, `90m`, `3600s`, or seconds). A client that comes back
    /// later starts over by itself; its unpushed mutations are lost. Activity is recorded at
    /// most once per 24th of this, and at most hourly.
    #[arg(long, env = "REPLISYNC_CLIENT_TTL", default_value = "30d", value_parser = duration)]
    pub client_ttl: Duration,

    /// Deleted entries (tombstones) older than this are removed (a duration, as
    /// REPLISYNC_CLIENT_TTL). A client whose cookie is older than a removed deletion gets the
    /// whole space at its next pull instead of a delta.
    #[arg(long, env = "REPLISYNC_TOMBSTONE_TTL", default_value = "30d", value_parser = duration)]
    pub tombstone_ttl: Duration,

    /// Time between background garbage collection passes (a duration, as REPLISYNC_CLIENT_TTL);
    /// 0 turns them off (`replisync gc` still runs a pass). With Postgres, one instance at a
    /// time collects.
    #[arg(long, env = "REPLISYNC_GC_INTERVAL", default_value = "1h", value_parser = duration)]
    pub gc_interval: Duration,

    /// After each batch of 1000 rows, a background garbage collection pass pauses this many
    /// times as long as the batch took: it keeps at most 1/(1 + this) of one database connection
    /// busy. Lower drains a large backlog faster; 0 runs at full speed, as `replisync gc` does.
    #[arg(long, env = "REPLISYNC_GC_PAUSE_FACTOR", default_value_t = 19)]
    pub gc_pause_factor: u32,

    /// Apply migrations at start-up (`false` when operators run `replisync migrate` themselves).
    #[arg(long, env = "REPLISYNC_AUTO_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_migrate: bool,

    /// Origins allowed to call push, pull and pokes from a browser: a comma-separated list, or
    /// `*` for every origin. Unset: loopback origins only (http://localhost:PORT, 127.0.0.1).
    #[arg(long, env = "REPLISYNC_CORS_ORIGINS", default_value = "")]
    pub cors_origins: String,

    /// The built-in SSE poke stream: on by default without Pusher, off with Pusher.
    #[arg(long, env = "REPLISYNC_SSE", action = clap::ArgAction::Set)]
    pub sse: Option<bool>,

    /// Seconds between keep-alive comments on SSE poke streams.
    #[arg(long, env = "REPLISYNC_SSE_KEEPALIVE_SECS", default_value_t = 15)]
    pub sse_keepalive_secs: u64,

    /// Most SSE poke streams open at once; beyond it, `GET /spaces/{space}/poke` is answered 503
    /// with Retry-After.
    #[arg(long, env = "REPLISYNC_SSE_MAX_STREAMS", default_value_t = 1000)]
    pub sse_max_streams: usize,

    /// Most SSE poke streams open at once on one space; beyond it, 503 with Retry-After.
    #[arg(
        long,
        env = "REPLISYNC_SSE_MAX_STREAMS_PER_SPACE",
        default_value_t = 100
    )]
    pub sse_max_streams_per_space: usize,

    /// Most SSE poke streams one user may have open at once (across spaces and tabs), so that
    /// no user can fill the per-space or total caps for others; beyond it, 503 with Retry-After.
    /// Not applied without authentication, where every caller is the same anonymous user.
    #[arg(long, env = "REPLISYNC_SSE_MAX_STREAMS_PER_USER", default_value_t = 20)]
    pub sse_max_streams_per_user: usize,

    /// `text` or `json` log lines. Levels come from RUST_LOG (default `info`).
    #[arg(long, env = "REPLISYNC_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub auth: AuthArgs,

    #[command(flatten)]
    pub js: MutatorArgs,

    #[command(flatten)]
    pub pusher: PusherArgs,
}

/// The app's own mutators, in JavaScript, and the bounds on running them.
#[derive(clap::Args, Debug, Clone)]
pub struct MutatorArgs {
    /// A JavaScript module exporting the app's mutators (the file the client passes to
    /// `new Replicache({mutators})`), run on every push beside the built-in ones.
    #[arg(long, env = "REPLISYNC_MUTATORS")]
    pub mutators: Option<PathBuf>,

    /// Milliseconds one JavaScript mutation may run, its reads included; past it the mutation
    /// fails (its writes discarded) and the push goes on.
    #[arg(long, env = "REPLISYNC_MUTATOR_TIMEOUT_MS", default_value_t = 1000)]
    pub mutator_timeout_ms: u64,

    /// Megabytes a JavaScript engine may hold while it runs a push's mutations; past it the
    /// mutation fails.
    #[arg(long, env = "REPLISYNC_MUTATOR_MEMORY_MB", default_value_t = 64)]
    pub mutator_memory_mb: usize,

    /// JavaScript engines (threads), hence pushes to different spaces running JavaScript at
    /// once. Unset: the number of CPUs.
    #[arg(long, env = "REPLISYNC_MUTATOR_ENGINES")]
    pub mutator_engines: Option<usize>,
}

impl MutatorArgs {
    /// The limits, checked.
    pub fn limits(&self) -> Result<JsLimits, String> {
        if self.mutator_timeout_ms == 0 {
            return Err("REPLISYNC_MUTATOR_TIMEOUT_MS must be above 0".into());
        }
        if self.mutator_memory_mb < MIN_MUTATOR_MEMORY_MB {
            return Err(format!(
                "REPLISYNC_MUTATOR_MEMORY_MB must be at least {MIN_MUTATOR_MEMORY_MB}: an engine needs that much for the module and its context"
            ));
        }
        if self.mutator_engines == Some(0) {
            return Err("REPLISYNC_MUTATOR_ENGINES must be above 0".into());
        }
        let defaults = JsLimits::default();
        Ok(JsLimits {
            timeout: Duration::from_millis(self.mutator_timeout_ms),
            memory_bytes: self.mutator_memory_mb.saturating_mul(1024 * 1024),
            engines: self.mutator_engines.unwrap_or(defaults.engines),
        })
    }
}

/// Below this an engine cannot even hold a context.
const MIN_MUTATOR_MEMORY_MB: usize = 4;

/// Who may read and write which space. With no JWT variable set, every caller is one
/// anonymous user with access to every space (allowed on loopback addresses only).
#[derive(clap::Args, Debug, Clone)]
pub struct AuthArgs {
    /// Verify HS256/384/512 tokens signed with this secret (turns authentication on).
    #[arg(long, env = "REPLISYNC_JWT_SECRET", hide_env_values = true, value_parser = secret)]
    pub jwt_secret: Option<SecretString>,

    /// Verify RS256/ES256/EdDSA tokens with the keys of an identity provider's JWKS
    /// (turns authentication on). https, or http to a loopback host; fetched at start-up.
    #[arg(long, env = "REPLISYNC_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,

    /// Fetch the JWKS again for an unknown key id at most once per this many seconds.
    #[arg(long, env = "REPLISYNC_JWT_JWKS_REFETCH_SECS", default_value_t = 30)]
    pub jwt_jwks_refetch_secs: u64,

    /// Tokens must name this issuer (`iss`), when set.
    #[arg(long, env = "REPLISYNC_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Tokens must name this audience (`aud`), when set.
    #[arg(long, env = "REPLISYNC_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// The claim that holds the user id.
    #[arg(long, env = "REPLISYNC_JWT_USER_CLAIM", default_value = "sub")]
    pub jwt_user_claim: String,

    /// The claim listing spaces the user may read and write (`team-7-*` matches a prefix).
    #[arg(long, env = "REPLISYNC_JWT_SPACES_CLAIM", default_value = "spaces")]
    pub jwt_spaces_claim: String,

    /// The claim listing spaces the user may only read.
    #[arg(
        long,
        env = "REPLISYNC_JWT_SPACES_READ_CLAIM",
        default_value = "spaces_read"
    )]
    pub jwt_spaces_read_claim: String,

    /// The app's authorization webhook, asked about spaces the token does not grant (and sent
    /// the caller's token): https, or http to a loopback host.
    #[arg(long, env = "REPLISYNC_AUTHZ_URL")]
    pub authz_url: Option<String>,

    /// Seconds the webhook's decisions are cached.
    #[arg(long, env = "REPLISYNC_AUTHZ_CACHE_SECS", default_value_t = 30)]
    pub authz_cache_secs: u64,

    /// Most decisions kept in the cache.
    #[arg(long, env = "REPLISYNC_AUTHZ_CACHE_SIZE", default_value_t = 100_000)]
    pub authz_cache_size: u64,

    /// Milliseconds the webhook (and a JWKS fetch) may take before the request is answered 503.
    #[arg(long, env = "REPLISYNC_AUTHZ_TIMEOUT_MS", default_value_t = 3000)]
    pub authz_timeout_ms: u64,

    /// Serve without authentication on a non-loopback address (everyone may read and write
    /// every space).
    #[arg(long, env = "REPLISYNC_ALLOW_ANONYMOUS", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_anonymous: bool,
}

impl AuthArgs {
    /// Whether tokens are verified (either JWT variable is set).
    pub fn tokens_on(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_jwks_url.is_some()
    }
}

/// A duration: a whole number with an optional unit, `s` (the default), `m`, `h` or `d`.
fn duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration such as 30d, 12h, 90m or 3600s"))?;
    let unit_secs = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown duration unit {other:?}: use s, m, h or d")),
    };
    number
        .checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{raw:?} is too long"))
}

fn secret(raw: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(raw))
}

/// Limits and switches of the HTTP edge, validated from [`Config`].
#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// Which browser origins may call push, pull and pokes.
    pub cors_origins: CorsOrigins,
    /// How long shutdown waits for in-flight requests and pending pokes.
    pub shutdown_timeout: Duration,
    /// How long the server keeps serving after SIGTERM (`/readyz` answering 503) before it
    /// stops accepting connections.
    pub drain_delay: Duration,
    /// First pulls in flight, the wait for a turn, and how long a streamed one may take.
    pub pulls: PullLimits,
    /// How long a connection may take to send complete request headers.
    pub header_read_timeout: Duration,
    /// How long a request body may pause between two of its bytes before it is cut.
    pub body_read_timeout: Duration,
    /// How long a keep-alive connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Most client connections open at once.
    pub max_connections: usize,
    /// Most SSE poke streams open at once, in all.
    pub sse_max_streams: usize,
    /// Most SSE poke streams open at once on one space.
    pub sse_max_streams_per_space: usize,
    /// Most SSE poke streams one user may have open at once.
    pub sse_max_streams_per_user: usize,
    /// What one push may carry and do.
    pub push: PushLimits,
}

/// Bounds on one push, and on pushes together; a real client never meets them.
#[derive(Clone, Debug)]
pub struct PushLimits {
    /// Largest push body, in bytes (413 beyond it).
    pub max_body_bytes: usize,
    /// Most distinct client ids in one push (400 beyond it).
    pub max_clients: usize,
    /// Most mutations one push applies; later ones are left for the next push.
    pub max_mutations: usize,
    /// Most bytes of keys and values one push's mutators may put; the mutation that goes past
    /// it fails.
    pub max_write_bytes: usize,
    /// Bytes of push bodies read at once (503 with `Retry-After` beyond it).
    pub max_bytes_in_flight: usize,
    /// Time spent running mutators before the push commits what it applied; `None`: a third of
    /// the request timeout.
    pub time_budget: Option<Duration>,
    /// How many pushes to one space share a transaction.
    pub group: GroupLimits,
}

/// How large a push group may grow: no push waits long behind others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Most pushes in one transaction; 1 turns grouping off.
    pub max_pushes: usize,
    /// No push after a group's first is started once the group has run this long: the rest go
    /// to the next group.
    pub max_age: Duration,
}

impl Default for GroupLimits {
    fn default() -> Self {
        GroupLimits {
            max_pushes: 64,
            max_age: Duration::from_millis(50),
        }
    }
}

impl Default for PushLimits {
    fn default() -> Self {
        PushLimits {
            max_body_bytes: 32 * 1024 * 1024,
            max_clients: 100,
            max_mutations: 10_000,
            max_write_bytes: 64 * 1024 * 1024,
            max_bytes_in_flight: 64 * 1024 * 1024,
            time_budget: None,
            group: GroupLimits::default(),
        }
    }
}

impl HttpSettings {
    /// Time a push spends running mutators before it commits what it applied and leaves the
    /// rest for the next push: as configured, or a third of the request timeout, so the commit
    /// and the wait for the space's lock fit in what remains.
    pub fn push_work_budget(&self) -> Duration {
        self.push.time_budget.unwrap_or(self.request_timeout / 3)
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            cors_origins: CorsOrigins::Loopback,
            shutdown_timeout: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            pulls: PullLimits {
                max_first_pulls: 4,
                max_shared_delta_bytes: 4 * 1024 * 1024,
                queue_wait: Duration::from_secs(5),
                stream: StreamLimits {
                    stall: Duration::from_secs(15),
                    deadline: Duration::from_secs(120),
                },
            },
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            sse_max_streams: 1000,
            sse_max_streams_per_space: 100,
            sse_max_streams_per_user: 20,
            push: PushLimits::default(),
        }
    }
}

/// Browser origins allowed to call replisync cross-origin. `/metrics` and `/healthz` are never
/// served cross-origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CorsOrigins {
    /// Pages served from this machine only (`http://localhost:3000`, `http://127.0.0.1:5173`):
    /// no web page on the internet can reach a local replisync through a visitor's browser.
    Loopback,
    /// Every origin (`REPLISYNC_CORS_ORIGINS=*`).
    Any,
    /// These origins exactly.
    List(Vec<HeaderValue>),
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Which database to use, decided from DATABASE_URL.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    Postgres(Box<PgConnectOptions>),
    Sqlite(PathBuf),
}

impl Config {
    /// Garbage collection's settings, checked: a TTL below a second would forget a client
    /// group between two of its requests.
    pub fn gc_settings(&self) -> Result<GcSettings, String> {
        if self.client_ttl < Duration::from_secs(1) {
            return Err("REPLISYNC_CLIENT_TTL must be at least 1s (the default is 30d)".into());
        }
        if self.tombstone_ttl < Duration::from_secs(1) {
            return Err("REPLISYNC_TOMBSTONE_TTL must be at least 1s (the default is 30d)".into());
        }
        Ok(GcSettings {
            client_ttl: self.client_ttl,
            tombstone_ttl: self.tombstone_ttl,
            interval: Some(self.gc_interval).filter(|interval| !interval.is_zero()),
            pause_factor: self.gc_pause_factor,
        })
    }

    /// The bounds of every Postgres session, checked: the idle-in-transaction timeout must
    /// leave a push the whole request timeout.
    pub fn db_session_limits(&self) -> Result<SessionLimits, String> {
        let request = Duration::from_secs(self.request_timeout_secs.max(1));
        let stream = Duration::from_secs(self.pull_stream_timeout_secs.max(1));
        let defaults = SessionLimits::for_timeouts(request, stream);
        let or_default =
            |millis: Option<u64>, default| millis.map_or(default, Duration::from_millis);
        let limits = SessionLimits {
            lock_timeout: or_default(self.db_lock_timeout_ms, defaults.lock_timeout),
            idle_in_transaction_timeout: or_default(
                self.db_idle_in_transaction_timeout_ms,
                defaults.idle_in_transaction_timeout,
            ),
            statement_timeout: or_default(self.db_statement_timeout_ms, defaults.statement_timeout),
            tcp_keepalive: Duration::from_secs(self.db_tcp_keepalive_secs),
        };
        let idle = limits.idle_in_transaction_timeout;
        if !idle.is_zero() && idle < request {
            return Err(format!(
                "REPLISYNC_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS ({} ms) must be 0 or at least REPLISYNC_REQUEST_TIMEOUT_SECS ({} s): a push's transaction idles while its mutators run",
                idle.as_millis(),
                request.as_secs()
            ));
        }
        Ok(limits)
    }

    pub fn store_choice(&self) -> Result<StoreChoice, String> {
        let Some(url) = self
            .database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        else {
            return Ok(StoreChoice::Sqlite(self.sqlite_path.clone()));
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return PgConnectOptions::from_str(url)
                .map(|options| StoreChoice::Postgres(Box::new(options)))
                .map_err(|e| format!("DATABASE_URL is not a valid Postgres URL: {e}"));
        }
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err("DATABASE_URL=sqlite://... needs a file path".into());
            }
            return Ok(StoreChoice::Sqlite(PathBuf::from(path)));
        }
        Err("DATABASE_URL must start with postgres://, postgresql:// or sqlite://".into())
    }

    pub fn http_settings(&self) -> Result<HttpSettings, String> {
        let cors_origins = match self.cors_origins.trim() {
            "" => CorsOrigins::Loopback,
            "*" => CorsOrigins::Any,
            list => CorsOrigins::List(
                list.split(',')
                    .map(|origin| {
                        origin.trim().parse().map_err(|_| {
                            format!("REPLISYNC_CORS_ORIGINS has an invalid origin: {origin:?}")
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        for (value, name) in [
            (self.max_body_bytes, "REPLISYNC_MAX_BODY_BYTES"),
            (self.max_connections, "REPLISYNC_MAX_CONNECTIONS"),
            (self.sse_max_streams, "REPLISYNC_SSE_MAX_STREAMS"),
            (
                self.sse_max_streams_per_space,
                "REPLISYNC_SSE_MAX_STREAMS_PER_SPACE",
            ),
            (
                self.sse_max_streams_per_user,
                "REPLISYNC_SSE_MAX_STREAMS_PER_USER",
            ),
        ] {
            if value == 0 {
                return Err(format!("{name} must be above 0"));
            }
        }
        for (value, variable) in [
            (self.max_push_body_bytes, "REPLISYNC_MAX_PUSH_BODY_BYTES"),
            (self.max_clients_per_push, "REPLISYNC_MAX_CLIENTS_PER_PUSH"),
            (
                self.max_mutations_per_push,
                "REPLISYNC_MAX_MUTATIONS_PER_PUSH",
            ),
            (self.max_push_write_bytes, "REPLISYNC_MAX_PUSH_WRITE_BYTES"),
            (
                self.push_group_max_pushes,
                "REPLISYNC_PUSH_GROUP_MAX_PUSHES",
            ),
        ] {
            if value == 0 {
                return Err(format!("{variable} must be above 0"));
            }
        }
        if let Some(budget) = self.push_time_budget_ms
            && (budget == 0 || budget >= self.request_timeout_secs.max(1) * 1000)
        {
            return Err(format!(
                "REPLISYNC_PUSH_TIME_BUDGET_MS ({budget}) must be above 0 and below REPLISYNC_REQUEST_TIMEOUT_SECS ({} s), or the push would time out before it commits",
                self.request_timeout_secs
            ));
        }
        if self.max_push_bytes_in_flight < self.max_push_body_bytes {
            return Err(format!(
                "REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT ({}) must be at least REPLISYNC_MAX_PUSH_BODY_BYTES ({}): a push of the largest size must be able to get in",
                self.max_push_bytes_in_flight, self.max_push_body_bytes
            ));
        }
        Ok(HttpSettings {
            max_body_bytes: self.max_body_bytes,
            request_timeout: Duration::from_secs(self.request_timeout_secs.max(1)),
            cors_origins,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            drain_delay: Duration::from_secs(self.drain_delay_secs),
            pulls: PullLimits {
                max_first_pulls: self
                    .max_first_pulls
                    .unwrap_or(self.db_max_connections as usize / 2)
                    .max(1),
                max_shared_delta_bytes: self.max_shared_delta_bytes,
                queue_wait: Duration::from_secs(5),
                stream: StreamLimits {
                    stall: Duration::from_secs(self.pull_stall_timeout_secs.max(1)),
                    deadline: Duration::from_secs(self.pull_stream_timeout_secs.max(1)),
                },
            },
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs.max(1)),
            body_read_timeout: Duration::from_secs(self.body_read_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs.max(1)),
            max_connections: self.max_connections,
            sse_max_streams: self.sse_max_streams,
            sse_max_streams_per_space: self.sse_max_streams_per_space,
            sse_max_streams_per_user: self.sse_max_streams_per_user,
            push: PushLimits {
                max_body_bytes: self.max_push_body_bytes,
                max_clients: self.max_clients_per_push,
                max_mutations: self.max_mutations_per_push,
                max_write_bytes: self.max_push_write_bytes,
                max_bytes_in_flight: self.max_push_bytes_in_flight,
                time_budget: self.push_time_budget_ms.map(Duration::from_millis),
                group: GroupLimits {
                    max_pushes: self.push_group_max_pushes,
                    max_age: Duration::from_millis(self.push_group_max_age_ms),
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut argv = vec!["replisync"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("valid arguments").config
    }

    #[test]
    fn no_database_url_means_the_embedded_sqlite_file() {
        let mut c = config(&[]);
        c.database_url = None;
        assert!(matches!(c.store_choice(), Ok(StoreChoice::Sqlite(p)) if p == c.sqlite_path));
    }

    #[test]
    fn database_urls_choose_the_store() {
        let mut c = config(&[]);
        c.database_url = Some("postgres://postgres@127.0.0.1/test".into());
        assert!(matches!(c.store_choice(), Ok(StoreChoice::Postgres(_))));
        c.database_url = Some("sqlite://data/x.db?mode=rwc".into());
        assert!(
            matches!(c.store_choice(), Ok(StoreChoice::Sqlite(p)) if p.as_path() == std::path::Path::new("data/x.db"))
        );
        c.database_url = Some("mysql://x".into());
        assert!(c.store_choice().unwrap_err().contains("DATABASE_URL"));
    }

    #[test]
    fn database_session_limits_follow_the_request_timeout_and_name_their_variable() {
        let c = config(&["--request-timeout-secs", "60"]);
        let limits = c.db_session_limits().unwrap();
        assert_eq!(limits.lock_timeout, Duration::from_secs(20));
        assert_eq!(limits.idle_in_transaction_timeout, Duration::from_secs(120));
        assert_eq!(limits.statement_timeout, Duration::from_secs(180));
        assert_eq!(limits.tcp_keepalive, Duration::from_secs(15));
        let c = config(&[
            "--db-lock-timeout-ms",
            "250",
            "--db-statement-timeout-ms",
            "0",
        ]);
        let limits = c.db_session_limits().unwrap();
        assert_eq!(limits.lock_timeout, Duration::from_millis(250));
        assert_eq!(limits.statement_timeout, Duration::ZERO);
        let c = config(&["--db-idle-in-transaction-timeout-ms", "1000"]);
        assert!(
            c.db_session_limits()
                .unwrap_err()
                .contains("REPLISYNC_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS")
        );
    }

    #[test]
    fn cors_origins_parse_as_a_list() {
        let mut c = config(&[]);
        c.cors_origins = "https://a.example, https://b.example".into();
        assert!(
            matches!(c.http_settings().unwrap().cors_origins, CorsOrigins::List(list) if list.len() == 2)
        );
        c.cors_origins = "*".into();
        assert_eq!(c.http_settings().unwrap().cors_origins, CorsOrigins::Any);
        c.cors_origins = String::new();
        assert_eq!(
            c.http_settings().unwrap().cors_origins,
            CorsOrigins::Loopback
        );
    }

    #[test]
    fn mutator_limits_default_and_name_their_variable() {
        let c = config(&[]);
        assert!(c.js.mutators.is_none());
        let limits = c.js.limits().unwrap();
        assert_eq!(limits.timeout, Duration::from_millis(1000));
        assert_eq!(limits.memory_bytes, 64 * 1024 * 1024);
        assert!(limits.engines >= 1);
        let c = config(&["--mutator-timeout-ms", "0"]);
        assert!(
            c.js.limits()
                .unwrap_err()
                .contains("REPLISYNC_MUTATOR_TIMEOUT_MS")
        );
        let c = config(&["--mutator-memory-mb", "1"]);
        assert!(
            c.js.limits()
                .unwrap_err()
                .contains("REPLISYNC_MUTATOR_MEMORY_MB")
        );
        let c = config(&["--mutator-engines", "3", "--mutators", "app/mutators.js"]);
        assert_eq!(c.js.limits().unwrap().engines, 3);
        assert_eq!(c.js.mutators.unwrap(), PathBuf::from("app/mutators.js"));
    }

    #[test]
    fn push_limits_are_checked_and_name_their_variable() {
        let c = config(&[]);
        let push = c.http_settings().unwrap().push;
        assert_eq!(push.max_body_bytes, 32 * 1024 * 1024);
        assert_eq!(push.max_bytes_in_flight, 64 * 1024 * 1024);
        let mut small = config(&["--max-push-bytes-in-flight", "1024"]);
        assert!(
            small
                .http_settings()
                .unwrap_err()
                .contains("REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT")
        );
        small.max_push_bytes_in_flight = small.max_push_body_bytes;
        small.max_mutations_per_push = 0;
        assert!(
            small
                .http_settings()
                .unwrap_err()
                .contains("REPLISYNC_MAX_MUTATIONS_PER_PUSH")
        );
    }

    #[test]
    fn the_push_time_budget_defaults_to_a_third_of_the_request_timeout() {
        let settings = config(&["--request-timeout-secs", "9"])
            .http_settings()
            .unwrap();
        assert_eq!(settings.push_work_budget(), Duration::from_secs(3));
        let settings = config(&["--push-time-budget-ms", "250"])
            .http_settings()
            .unwrap();
        assert_eq!(settings.push_work_budget(), Duration::from_millis(250));
        let too_long = config(&[
            "--request-timeout-secs",
            "2",
            "--push-time-budget-ms",
            "2000",
        ]);
        assert!(
            too_long
                .http_settings()
                .unwrap_err()
                .contains("REPLISYNC_PUSH_TIME_BUDGET_MS")
        );
    }

    #[test]
    fn gc_durations_take_units_and_the_ttl_has_a_floor() {
        let defaults = config(&[]).gc_settings().unwrap();
        assert_eq!(defaults.client_ttl, Duration::from_secs(30 * 86_400));
        assert_eq!(defaults.interval, Some(Duration::from_secs(3600)));
        assert_eq!(defaults.pause_factor, 19);
        let set = config(&["--client-ttl", "36h", "--gc-interval", "90m"]);
        assert_eq!(set.client_ttl, Duration::from_secs(36 * 3600));
        assert_eq!(set.gc_interval, Duration::from_secs(90 * 60));
        assert_eq!(duration("45"), Ok(Duration::from_secs(45)));
        assert!(duration("3 weeks").is_err());
        assert!(duration("d").is_err());
        // Activity is recorded to a 24th of the TTL, from a second up to an hour.
        let granularity = |ttl| crate::store::activity_granularity(duration(ttl).unwrap());
        assert_eq!(granularity("30d"), 3600);
        assert_eq!(granularity("2h"), 300);
        assert_eq!(granularity("4s"), 1);
        let off = config(&["--gc-interval", "0"]).gc_settings().unwrap();
        assert_eq!(off.interval, None);
        let short = config(&["--client-ttl", "0"]).gc_settings().unwrap_err();
        assert!(short.contains("REPLISYNC_CLIENT_TTL"), "{short}");
        let tombstones = config(&["--tombstone-ttl", "0s"])
            .gc_settings()
            .unwrap_err();
        assert!(
            tombstones.contains("REPLISYNC_TOMBSTONE_TTL"),
            "{tombstones}"
        );
    }
}
