//! The store's settings: which database (DATABASE_URL, or the embedded SQLite file), its pool
//! size, migrations at start-up, and the bounds of every Postgres session; `open` opens it.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;

use super::pg_connect;
use super::pg_session::SessionLimits;
use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::{BatchLimits, Store};

/// The store's variables as given; [`StoreArgs::choice`] and [`StoreArgs::session_limits`]
/// check them.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Database")]
pub struct StoreArgs {
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

    /// Database connections per instance (Postgres: the pool; read and commit batching keep up
    /// to 4 more outside it).
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

    /// Most push groups (each the pushes to one space) one commit carries: pushes to different
    /// spaces that are ready while another commit is in flight share the next one. On Postgres
    /// also the most reads of pushes one statement carries (read batching). 1 turns commit and
    /// read batching off.
    #[arg(long, env = "REPLISYNC_COMMIT_BATCH_MAX_PUSHES", default_value_t = 64)]
    pub commit_batch_max_pushes: usize,

    /// Milliseconds a batch waits for the commit ahead of it before it commits beside it: the
    /// most a push's commit is delayed by batching.
    #[arg(long, env = "REPLISYNC_COMMIT_BATCH_MAX_AGE_MS", default_value_t = 5)]
    pub commit_batch_max_age_ms: u64,

    /// Postgres: megabytes of what each instance keeps of the spaces it pushed to lately (the
    /// space's version, its client groups and clients, the keys its mutations read), so that the
    /// next push there skips its first read; a commit whose space another writer moved is run
    /// again from a fresh read. 0 turns it off: every push reads first.
    #[arg(long, env = "REPLISYNC_KNOWN_STATE_MB", default_value_t = 16)]
    pub known_state_mb: u64,

    /// Apply migrations at start-up (`false` when operators run `replisync migrate` themselves).
    #[arg(long, env = "REPLISYNC_AUTO_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_migrate: bool,
}

/// Which database to use, decided from DATABASE_URL.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    Postgres(Box<PgConnectOptions>),
    Sqlite(PathBuf),
}

impl StoreArgs {
    /// The database DATABASE_URL names, or the embedded SQLite file when it is unset.
    pub fn choice(&self) -> Result<StoreChoice, String> {
        let Some(url) = self
            .database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        else {
            return Ok(StoreChoice::Sqlite(self.sqlite_path.clone()));
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return PgConnectOptions::from_str(url)
                .map(|options| options.log_statements(super::STATEMENT_LOG_LEVEL))
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

    /// The bounds of every Postgres session, checked: the idle-in-transaction timeout must
    /// leave a push the whole request timeout. Unset bounds follow the request timeout and the
    /// pull stream timeout.
    pub fn session_limits(
        &self,
        request: Duration,
        stream: Duration,
    ) -> Result<SessionLimits, String> {
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
}

impl StoreArgs {
    /// The commit batches' bounds, checked.
    pub fn batch_limits(&self) -> Result<BatchLimits, String> {
        if self.commit_batch_max_pushes == 0 {
            return Err("REPLISYNC_COMMIT_BATCH_MAX_PUSHES must be at least 1 (1 turns commit batching off)".into());
        }
        Ok(BatchLimits {
            max_pushes: self.commit_batch_max_pushes,
            max_age: Duration::from_millis(self.commit_batch_max_age_ms),
        })
    }
}

/// What opening a store needs from the rest of the configuration.
#[derive(Clone, Copy, Debug)]
pub struct OpenOptions {
    /// REPLISYNC_REQUEST_TIMEOUT_SECS and the pull stream deadline: unset session bounds
    /// follow them.
    pub request_timeout: Duration,
    pub stream_deadline: Duration,
    /// Seconds between writes of a client group's last activity (`activity_granularity`).
    pub activity_granularity: i64,
    /// Apply the migrations first.
    pub migrate: bool,
}

impl StoreArgs {
    /// Opens the database these settings name and, when asked, applies its migrations.
    pub async fn open(&self, options: OpenOptions) -> anyhow::Result<Arc<dyn Store>> {
        let batch_limits = self.batch_limits().map_err(anyhow::Error::msg)?;
        let store: Arc<dyn Store> = match self.choice().map_err(anyhow::Error::msg)? {
            StoreChoice::Postgres(connect) => {
                let limits = self
                    .session_limits(options.request_timeout, options.stream_deadline)
                    .map_err(anyhow::Error::msg)?;
                pg_connect::first_contact(&connect, pg_connect::FIRST_CONTACT_TIMEOUT)
                    .await
                    .map_err(anyhow::Error::msg)?;
                let target = pg_connect::describe_target(&connect);
                let store = PgStore::connect_with_limits(*connect, self.db_max_connections, limits)
                    .await
                    .with_context(|| format!("cannot connect to Postgres at {target}"))?
                    .with_activity_granularity(options.activity_granularity)
                    .with_batch_limits(batch_limits)
                    .with_known_state_bytes(self.known_state_mb.saturating_mul(1 << 20));
                if options.migrate {
                    store.migrate().await?;
                }
                tracing::info!("store: postgres");
                Arc::new(store)
            }
            StoreChoice::Sqlite(path) => {
                let store = SqliteStore::open(&path, self.db_max_connections)
                    .await
                    .with_context(|| format!("cannot open the SQLite file {}", path.display()))?
                    .with_activity_granularity(options.activity_granularity)
                    .with_batch_limits(batch_limits);
                if options.migrate {
                    store.migrate().await?;
                }
                tracing::info!(
                    path = %path.display(),
                    "store: sqlite (one instance only; several instances behind a load balancer need DATABASE_URL=postgres://...)"
                );
                Arc::new(store)
            }
        };
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(args: &[&str]) -> StoreArgs {
        crate::config::parse_feature_args(args)
    }

    #[test]
    fn no_database_url_means_the_embedded_sqlite_file() {
        let mut c = args(&[]);
        c.database_url = None;
        assert!(matches!(c.choice(), Ok(StoreChoice::Sqlite(p)) if p == c.sqlite_path));
    }

    #[test]
    fn database_urls_choose_the_store() {
        let mut c = args(&[]);
        c.database_url = Some("postgres://postgres@127.0.0.1/test".into());
        assert!(matches!(c.choice(), Ok(StoreChoice::Postgres(_))));
        c.database_url = Some("sqlite://data/x.db?mode=rwc".into());
        assert!(
            matches!(c.choice(), Ok(StoreChoice::Sqlite(p)) if p.as_path() == std::path::Path::new("data/x.db"))
        );
        c.database_url = Some("mysql://x".into());
        assert!(c.choice().unwrap_err().contains("DATABASE_URL"));
    }

    #[test]
    fn database_session_limits_follow_the_request_timeout_and_name_their_variable() {
        // The defaults of REPLISYNC_PULL_STREAM_TIMEOUT_SECS and REPLISYNC_REQUEST_TIMEOUT_SECS.
        let (stream, request) = (Duration::from_secs(120), Duration::from_secs(30));
        let limits = args(&[])
            .session_limits(Duration::from_secs(60), stream)
            .unwrap();
        assert_eq!(limits.lock_timeout, Duration::from_secs(20));
        assert_eq!(limits.idle_in_transaction_timeout, Duration::from_secs(120));
        assert_eq!(limits.statement_timeout, Duration::from_secs(180));
        assert_eq!(limits.tcp_keepalive, Duration::from_secs(15));
        let c = args(&[
            "--db-lock-timeout-ms",
            "250",
            "--db-statement-timeout-ms",
            "0",
        ]);
        let limits = c.session_limits(request, stream).unwrap();
        assert_eq!(limits.lock_timeout, Duration::from_millis(250));
        assert_eq!(limits.statement_timeout, Duration::ZERO);
        let c = args(&["--db-idle-in-transaction-timeout-ms", "1000"]);
        assert!(
            c.session_limits(request, stream)
                .unwrap_err()
                .contains("REPLISYNC_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS")
        );
    }
}
