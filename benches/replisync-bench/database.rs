//! The benchmark's Postgres: a fresh database `replisync_bench` on this machine only (any
//! other host is refused), and its count of committed transactions.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::Connection;
use sqlx::postgres::PgConnectOptions;

/// Also written out in the DROP and CREATE statements (sqlx takes only literal SQL).
const DB_NAME: &str = "replisync_bench";

/// Drops and recreates the benchmark database on the server of `admin_url`; returns its URL.
pub async fn fresh_database(admin_url: &str) -> anyhow::Result<String> {
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

/// Transactions committed in the benchmark database so far (each single statement outside
/// a transaction counts as one), read through `admin_url`.
pub async fn transactions_so_far(admin_url: &str) -> anyhow::Result<i64> {
    // Backends flush their statistics at most once a second, and after 10 s when idle.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut conn =
        sqlx::PgConnection::connect_with(&PgConnectOptions::from_str(admin_url)?).await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
    )
    .bind(DB_NAME)
    .fetch_one(&mut conn)
    .await?;
    Ok(n)
}
