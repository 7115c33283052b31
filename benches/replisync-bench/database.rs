//! The benchmark's Postgres: a fresh database (`replisync_bench`, or BENCH_DATABASE_NAME) on this machine only (any
//! other host is refused), and its count of committed transactions.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::Connection;
use sqlx::postgres::PgConnectOptions;

/// The benchmark's database unless BENCH_DATABASE_NAME names another (so that benchmarks run
/// by several people on one Postgres do not drop each other's database).
const DEFAULT_DB_NAME: &str = "replisync_bench";

/// The benchmark database's name: BENCH_DATABASE_NAME (lower-case letters, digits and `_`
/// only: it is written into DROP and CREATE statements), or `replisync_bench`.
fn db_name() -> anyhow::Result<String> {
    let name = std::env::var("BENCH_DATABASE_NAME").unwrap_or_else(|_| DEFAULT_DB_NAME.into());
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !plain {
        bail!("BENCH_DATABASE_NAME must be lower-case letters, digits and _ only, not {name:?}");
    }
    Ok(name)
}

/// Drops and recreates the benchmark database on the server of `admin_url`; returns its URL.
pub(crate) async fn fresh_database(admin_url: &str) -> anyhow::Result<String> {
    fresh_database_named(admin_url, &db_name()?).await
}

/// Drops and recreates the benchmark's second database (the benchmark database's name with
/// `_` and `suffix`, lower-case letters and digits only), for workloads that need an empty
/// database beside the benchmark's; returns its URL.
pub(crate) async fn fresh_side_database(admin_url: &str, suffix: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        !suffix.is_empty()
            && suffix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
        "a side database's suffix must be lower-case letters and digits, not {suffix:?}"
    );
    fresh_database_named(admin_url, &format!("{}_{suffix}", db_name()?)).await
}

/// Drops and recreates database `name` (checked plain by the callers) on the server of
/// `admin_url`; returns its URL.
async fn fresh_database_named(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let options = PgConnectOptions::from_str(admin_url).context("BENCH_DATABASE_URL")?;
    ensure_loopback(options.get_host())?;
    let mut conn = sqlx::PgConnection::connect_with(&options).await?;
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await?;
    }
    let mut url = reqwest::Url::parse(admin_url)?;
    url.set_path(name);
    Ok(url.to_string())
}

/// Drops the side database `fresh_side_database` made with `suffix`, if it exists.
pub(crate) async fn drop_side_database(admin_url: &str, suffix: &str) -> anyhow::Result<()> {
    let options = PgConnectOptions::from_str(admin_url).context("BENCH_DATABASE_URL")?;
    ensure_loopback(options.get_host())?;
    let mut conn = sqlx::PgConnection::connect_with(&options).await?;
    let sql = format!(
        "DROP DATABASE IF EXISTS {}_{suffix} WITH (FORCE)",
        db_name()?
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// Settles the database of `url` before a measurement: `VACUUM ANALYZE` of the entries (hint
/// bits and the visibility map set, statistics fresh, as on a database that has been running),
/// then a `CHECKPOINT` (so that no flush of earlier writes runs during it; skipped, with a note,
/// when the role may not).
pub(crate) async fn settle(url: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect_with(&PgConnectOptions::from_str(url)?).await?;
    sqlx::raw_sql("VACUUM ANALYZE replisync_entries")
        .execute(&mut conn)
        .await?;
    if let Err(e) = sqlx::raw_sql("CHECKPOINT").execute(&mut conn).await {
        eprintln!("CHECKPOINT before a measurement failed (measured all the same): {e}");
    }
    Ok(())
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

/// Transactions committed in the benchmark database so far (each single statement outside
/// a transaction counts as one), read through `admin_url`.
pub(crate) async fn transactions_so_far(admin_url: &str) -> anyhow::Result<i64> {
    // Backends flush their statistics at most once a second, and after 10 s when idle.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut conn =
        sqlx::PgConnection::connect_with(&PgConnectOptions::from_str(admin_url)?).await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
    )
    .bind(db_name()?)
    .fetch_one(&mut conn)
    .await?;
    Ok(n)
}

/// The prefix of everything `seed_gc_backlog` writes (client groups, clients, spaces).
pub(crate) const BACKLOG_PREFIX: &str = "gcb-";
/// Spaces the seeded tombstones are spread over.
const BACKLOG_SPACES: i64 = 100;
/// How long ago the backlog was last active or deleted: far past any TTL the benchmark sets.
const BACKLOG_AGE_SECS: i64 = 30 * 86_400;

/// Replaces whatever backlog is left in the database of `url` with exactly `groups` client
/// groups (one client each) idle for 30 days and `tombstones` deletions 30 days old, spread over
/// 100 spaces of their own; then vacuums, so that every round starts from the same tables.
pub(crate) async fn seed_gc_backlog(url: &str, groups: i64, tombstones: i64) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect_with(&PgConnectOptions::from_str(url)?).await?;
    let old = replisync::store::unix_now() - BACKLOG_AGE_SECS;
    let like = format!("{BACKLOG_PREFIX}%");
    for table_and_column in [
        ("replisync_clients", "id"),
        ("replisync_client_groups", "id"),
        ("replisync_collected_client_groups", "id"),
        ("replisync_entries", "space_id"),
        ("replisync_spaces", "id"),
    ] {
        let (table, column) = table_and_column;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE {column} LIKE $1"
        )))
        .bind(&like)
        .execute(&mut conn)
        .await?;
    }
    let per_space = ((tombstones + BACKLOG_SPACES - 1) / BACKLOG_SPACES).max(1);
    sqlx::query(
        "INSERT INTO replisync_spaces (id, version, compacted_version)
         SELECT 'gcb-space-' || s, $1, 0 FROM generate_series(0, $2 - 1) s",
    )
    .bind(per_space)
    .bind(BACKLOG_SPACES)
    .execute(&mut conn)
    .await?;
    sqlx::query(
        "INSERT INTO replisync_client_groups (id, space_id, user_id, last_active)
         SELECT 'gcb-g' || g, 'gcb-space-' || (g % $2), 'bench', $3
         FROM generate_series(0, $1 - 1) g",
    )
    .bind(groups)
    .bind(BACKLOG_SPACES)
    .bind(old)
    .execute(&mut conn)
    .await?;
    sqlx::query(
        "INSERT INTO replisync_clients (id, client_group_id, last_mutation_id, last_modified_version)
         SELECT 'gcb-c' || g, 'gcb-g' || g, 1, 1 FROM generate_series(0, $1 - 1) g",
    )
    .bind(groups)
    .execute(&mut conn)
    .await?;
    sqlx::query(
        "INSERT INTO replisync_entries (space_id, key, value, deleted, version, changed_at)
         SELECT 'gcb-space-' || (t % $2), 'item/' || lpad(t::text, 8, '0'), NULL, true,
                t / $2 + 1, $3
         FROM generate_series(0, $1 - 1) t",
    )
    .bind(tombstones)
    .bind(BACKLOG_SPACES)
    .bind(old)
    .execute(&mut conn)
    .await?;
    sqlx::raw_sql(
        "VACUUM ANALYZE replisync_clients, replisync_client_groups, \
         replisync_collected_client_groups, replisync_entries, replisync_spaces",
    )
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// The backlog's client groups and tombstones still in the database of `url`.
pub(crate) async fn gc_backlog_left(url: &str) -> anyhow::Result<(i64, i64)> {
    let mut conn = sqlx::PgConnection::connect_with(&PgConnectOptions::from_str(url)?).await?;
    let like = format!("{BACKLOG_PREFIX}%");
    let groups: i64 =
        sqlx::query_scalar("SELECT count(*) FROM replisync_client_groups WHERE id LIKE $1")
            .bind(&like)
            .fetch_one(&mut conn)
            .await?;
    let tombstones: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM replisync_entries WHERE space_id LIKE $1 AND deleted",
    )
    .bind(&like)
    .fetch_one(&mut conn)
    .await?;
    Ok((groups, tombstones))
}

/// Rows of `space` in replisync_entries, in the database of `url`: all of them, and tombstones.
pub(crate) async fn entry_rows(url: &str, space: &str) -> anyhow::Result<(i64, i64)> {
    let mut conn = sqlx::PgConnection::connect_with(&PgConnectOptions::from_str(url)?).await?;
    let rows = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE deleted) FROM replisync_entries WHERE space_id = $1",
    )
    .bind(space)
    .fetch_one(&mut conn)
    .await?;
    Ok(rows)
}

/// What the soak watches in the database of `url`: the server's autovacuum setting, and for
/// replisync_client_groups and replisync_clients together, their sequential scans and
/// analyzes so far (as the statistics have them) and their rows.
pub(crate) struct DatabaseCounters {
    pub autovacuum: String,
    pub seq_scans: i64,
    pub analyzes: i64,
    pub client_group_rows: i64,
    pub client_rows: i64,
}

pub(crate) async fn database_counters(url: &str) -> anyhow::Result<DatabaseCounters> {
    let mut conn = sqlx::PgConnection::connect_with(&PgConnectOptions::from_str(url)?).await?;
    let autovacuum: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&mut conn)
        .await?;
    let (seq_scans, analyzes): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(seq_scan), 0)::bigint,
                coalesce(sum(analyze_count + autoanalyze_count), 0)::bigint
         FROM pg_stat_user_tables
         WHERE relname IN ('replisync_client_groups', 'replisync_clients')",
    )
    .fetch_one(&mut conn)
    .await?;
    // Counted through the indexes: the soak's own reads must not add sequential scans.
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut conn)
        .await?;
    let client_group_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM replisync_client_groups")
        .fetch_one(&mut conn)
        .await?;
    let client_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM replisync_clients")
        .fetch_one(&mut conn)
        .await?;
    Ok(DatabaseCounters {
        autovacuum,
        seq_scans,
        analyzes,
        client_group_rows,
        client_rows,
    })
}
