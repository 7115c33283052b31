//! The one-commit floor: one durable one-statement commit per push (an UPDATE of the space's
//! row, autocommit), with the same clients, spaces and concurrency: the machine's commit limit.

use std::str::FromStr;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::POOL_SIZE;
use crate::load::{PushFigures, drive_clients, space_name};

/// A pool on the benchmark's database (the same URL, so the same TLS, as replisync and the
/// six-statement floor) and the table whose rows the floor updates, one per space.
pub(crate) struct CommitFloor {
    pool: PgPool,
}

impl CommitFloor {
    /// Connects to `database_url` and creates the floor's table (logged, so every commit
    /// waits for its WAL flush as a push's does).
    pub(crate) async fn connect(database_url: &str) -> anyhow::Result<CommitFloor> {
        let options = PgConnectOptions::from_str(database_url)?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            // No ping before each commit: the floor is one round trip per push.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .context("the one-commit floor cannot connect to the benchmark database")?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS bench_commit_floor (space text PRIMARY KEY, n bigint NOT NULL)",
        )
        .execute(&pool)
        .await?;
        let synchronous: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&pool)
            .await?;
        if synchronous != "on" {
            eprintln!(
                "the one-commit floor runs with synchronous_commit={synchronous}: its commits wait for no flush"
            );
        }
        Ok(CommitFloor { pool })
    }

    /// `clients` concurrent clients each making their share of `total_pushes` commits, in turn
    /// to each of `spaces` rows (as a push workload's clients visit its spaces).
    pub(crate) async fn run(
        &self,
        name: &str,
        clients: usize,
        spaces: usize,
        total_pushes: usize,
    ) -> anyhow::Result<PushFigures> {
        self.add_rows(name, spaces).await?;
        let (pool, name) = (self.pool.clone(), name.to_owned());
        drive_clients(clients, spaces, 1, total_pushes, move |job| {
            let pool = pool.clone();
            let space = space_name(&name, job.space);
            async move { one_commit(&pool, &space).await }
        })
        .await
    }

    /// One row (n = 0) for each of the workload's spaces, written before the clock starts.
    async fn add_rows(&self, name: &str, spaces: usize) -> anyhow::Result<()> {
        let ids: Vec<String> = (0..spaces).map(|s| space_name(name, s)).collect();
        sqlx::query("INSERT INTO bench_commit_floor (space, n) SELECT unnest($1::text[]), 0")
            .bind(&ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }
}

/// One autocommitted UPDATE of `space`'s row: one statement, one durable commit.
async fn one_commit(pool: &PgPool, space: &str) -> anyhow::Result<()> {
    let updated = sqlx::query("UPDATE bench_commit_floor SET n = n + 1 WHERE space = $1")
        .bind(space)
        .execute(pool)
        .await?
        .rows_affected();
    anyhow::ensure!(
        updated == 1,
        "the one-commit floor updated {updated} rows for {space}, not 1"
    );
    Ok(())
}
