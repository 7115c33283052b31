//! The Postgres store, for production and any number of instances behind a load balancer. A push
//! reads (with other pushes' reads in one statement when one is in flight: `reads`) and commits
//! in one statement if its space did not move (with other spaces' in a batch when a commit is in
//! flight: `batch`), or under the space's lock (READ COMMITTED: `push`); pulls read REPEATABLE
//! READ snapshots. Every session is bounded (see [`SessionLimits`]).

mod batch;
mod commit;
mod kept;
mod known;
mod push;
mod reads;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, Postgres};

use self::batch::CommitBatcher;
use self::kept::KeptConnections;
use self::known::{HeldBase, KnownSpaces};
use self::push::{PgPushTx, PushConnection};
use self::reads::{SharedReads, decode_rows};
use super::migrations;
use super::pg_session::SessionLimits;
use super::shared::{self, client_group_record, to_space_version};
use super::transfer::{self, ImportTx};
use super::{
    ACTIVITY_GRANULARITY_SECS, Collected, DELTA_BYTES_PER_ENTRY, EntryChange, GcBatches,
    PullChanges, PullSnapshot, PushTx, Store, StoreError, to_i64, to_u64, unix_now,
};
use super::{BatchLimits, CommitBatchCounts};
use super::{EntryPage, PoolStats, SpaceImport, pool_stats};
use crate::protocol::SpaceId;

/// replisync's migrations, recorded in its own table (see [`migrations`]).
static MIGRATOR: LazyLock<sqlx::migrate::Migrator> =
    LazyLock::new(|| migrations::in_own_table(sqlx::migrate!("./migrations/postgres")));

/// A pooled connection idle for longer than this is pinged before use; one used more recently
/// is handed out as it is (a ping is a full round trip, on every push and pull).
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// The default of REPLISYNC_KNOWN_STATE_MB, in bytes.
pub const DEFAULT_KNOWN_STATE_BYTES: u64 = 16 << 20;

#[derive(Debug)]
pub struct PgStore {
    pool: PgPool,
    /// See [`activity_granularity`](super::activity_granularity).
    activity_granularity: i64,
    batch_limits: BatchLimits,
    batcher: Arc<CommitBatcher>,
    reads: SharedReads,
    /// The connections the batchers keep between statements.
    kept: Arc<KeptConnections>,
    /// What the instance knows of the spaces it pushed to lately (see `known`).
    known: Arc<KnownSpaces>,
}

/// The statement that starts a transaction (a locked push, a compaction batch): the isolation
/// replisync's statements are written for, whatever the database's default.
const BEGIN_READ_COMMITTED: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// The statement that starts a read of one snapshot (a streamed pull, a page of entries).
const BEGIN_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

impl PgStore {
    /// Connects with the default [`SessionLimits`]; see [`PgStore::connect_with_limits`].
    pub async fn connect(
        options: PgConnectOptions,
        max_connections: u32,
    ) -> Result<PgStore, StoreError> {
        PgStore::connect_with_limits(options, max_connections, SessionLimits::default()).await
    }

    /// Connects lazily-checked: fails now if the first connection cannot be made. Every
    /// session gets `limits` (and READ COMMITTED as its default isolation) at connect time.
    pub async fn connect_with_limits(
        options: PgConnectOptions,
        max_connections: u32,
        limits: SessionLimits,
    ) -> Result<PgStore, StoreError> {
        let options = limits
            .apply(options)
            .log_statements(super::STATEMENT_LOG_LEVEL);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > PING_IF_IDLE_FOR {
                        // A dead connection fails here and the pool opens a fresh one.
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await?;
        let batch_limits = BatchLimits::default();
        let kept = Arc::new(KeptConnections::new(pool.clone()));
        Ok(PgStore {
            batcher: Arc::new(CommitBatcher::new(
                Arc::clone(&kept),
                batch_limits,
                ACTIVITY_GRANULARITY_SECS,
            )),
            reads: SharedReads::new(&kept, batch_limits.max_pushes),
            kept,
            pool,
            activity_granularity: ACTIVITY_GRANULARITY_SECS,
            batch_limits,
            known: Arc::new(KnownSpaces::new(DEFAULT_KNOWN_STATE_BYTES)),
        })
    }

    /// Records a client group's activity at most once per `secs` (the default is an hour).
    pub fn with_activity_granularity(mut self, secs: i64) -> PgStore {
        self.activity_granularity = secs.max(1);
        self.new_batcher()
    }

    /// Bounds the batches that commit pushes to several spaces together.
    pub fn with_batch_limits(mut self, limits: BatchLimits) -> PgStore {
        self.batch_limits = limits;
        self.new_batcher()
    }

    /// Keeps what pushes read and commit of each space, within `bytes` (0: every push reads).
    pub fn with_known_state_bytes(mut self, bytes: u64) -> PgStore {
        self.known = Arc::new(KnownSpaces::new(bytes));
        self
    }

    /// The batcher, made again with the store's settings (before any push).
    fn new_batcher(mut self) -> PgStore {
        self.batcher = Arc::new(CommitBatcher::new(
            Arc::clone(&self.kept),
            self.batch_limits,
            self.activity_granularity,
        ));
        self.reads = SharedReads::new(&self.kept, self.batch_limits.max_pushes);
        self
    }

    /// Applies the migrations in `migrations/postgres` that have not run yet. Safe to run from
    /// several instances at once (the migrator takes an advisory lock).
    /// Runs on a connection of its own without the sessions' lock and statement timeouts
    /// (waiting for another instance's migration, or building an index, may take longer),
    /// closed afterwards; the pool then opens one of its own, so that the first request does not
    /// pay for a connect.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?.detach();
        sqlx::raw_sql("SET lock_timeout = 0; SET statement_timeout = 0")
            .execute(&mut conn)
            .await?;
        let adopted = migrations::adopt_old_records_pg(&mut conn, &MIGRATOR).await;
        let migrated = match adopted {
            Ok(()) => MIGRATOR.run(&mut conn).await.map_err(|e| e.to_string()),
            Err(e) => Err(format!(
                "cannot move the records of {}: {e}",
                migrations::OLD_TABLE
            )),
        }
        .map_err(|e| StoreError::Database(format!("migration failed: {e}")));
        let _ = conn.close().await;
        migrated?;
        drop(self.pool.acquire().await?); // back in the pool, warm
        Ok(())
    }

    /// A push to `space` on `conn`.
    fn push_on(&self, conn: PushConnection, space: &SpaceId) -> Box<dyn PushTx> {
        Box::new(PgPushTx {
            conn,
            pool: self.pool.clone(),
            space: space.clone(),
            activity_granularity: self.activity_granularity,
            batcher: Arc::clone(&self.batcher),
            reads: self.reads.clone(),
            known: Arc::clone(&self.known),
            base: HeldBase::new(Arc::clone(&self.known), space.clone()),
        })
    }

    /// Analyzes replisync's tables that changed by more than a tenth since their statistics
    /// were last gathered (by autovacuum, an operator, or this), skipping any table locked by
    /// a vacuum; answers which. One instance at a time: `None` when another is at it.
    pub async fn refresh_statistics(&self) -> Result<Option<Vec<String>>, StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_READ_COMMITTED).await?;
        let ours: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema()))")
                .bind(STATISTICS_LOCK_KEY)
                .fetch_one(&mut *tx)
                .await?;
        if !ours {
            return Ok(None);
        }
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT s.relname::text FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
             WHERE s.schemaname = current_schema() AND s.relname = ANY($1)
               AND s.n_mod_since_analyze > $2 + $3 * greatest(c.reltuples, 0)
             ORDER BY 1",
        )
        .bind(&TABLES[..])
        .bind(ANALYZE_THRESHOLD_ROWS)
        .bind(ANALYZE_SCALE_FACTOR)
        .fetch_all(&mut *tx)
        .await?;
        for table in &stale {
            // The name is one of TABLES, never input.
            let sql = format!("ANALYZE (SKIP_LOCKED) {table}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Some(stale))
    }
}

#[async_trait]
impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn pools(&self) -> Vec<PoolStats> {
        vec![pool_stats("postgres", &self.pool), self.kept.stats()]
    }

    fn commit_batches(&self) -> CommitBatchCounts {
        let (read_batches, batched_reads, reads_waiting) = self.reads.counts();
        CommitBatchCounts {
            read_batches,
            batched_reads,
            reads_waiting,
            known: self.known.counts(),
            ..self.batcher.counts()
        }
    }

    async fn begin_push(&self, space: &SpaceId) -> Result<Box<dyn PushTx>, StoreError> {
        // No transaction at all: the reads run on their own and the commit is one statement,
        // its own transaction, each on a connection taken for it (`kept`).
        Ok(self.push_on(PushConnection::Unlocked, space))
    }

    async fn begin_locked_push(&self, space: &SpaceId) -> Result<Box<dyn PushTx>, StoreError> {
        // The space's lock is taken by `client_state`, together with its reads, so that it is
        // held for one round trip fewer.
        let conn = PushConnection::Locked(self.pool.begin_with(BEGIN_READ_COMMITTED).await?);
        Ok(self.push_on(conn, space))
    }

    async fn streamed_pull(
        &self,
        space: &SpaceId,
        client_group_id: &str,
        since: Option<u64>,
    ) -> Result<PullSnapshot, StoreError> {
        let tx = self.pool.begin_with(BEGIN_SNAPSHOT).await?;
        shared::streamed_pull(tx, space, client_group_id, since).await
    }

    async fn pull_changes(
        &self,
        space: &SpaceId,
        client_group_ids: &[String],
        from: u64,
        max_delta_bytes: usize,
    ) -> Result<PullChanges, StoreError> {
        // One statement is one snapshot, even without a transaction: one round trip for
        // every pull in the batch. It also records the groups' activity, at most once per
        // granularity per group, skipping a row another transaction has locked (a push touching
        // it): the pull never waits for it. The lock is FOR NO KEY UPDATE, which a push's check
        // that its groups still exist (FOR KEY SHARE) does not wait for. The entries are aggregated only up to `$4` bytes (a
        // running sum over the delta, which reads value sizes without reading large values), so
        // no delta is built whole past the limit, nor meets the 1 GB limit of one `json_agg`.
        let (version, compacted, groups, collected, clients, entries): PullRow = sqlx::query_as(
                "WITH touched AS (
                   UPDATE replisync_client_groups SET last_active = $6
                   WHERE id IN (SELECT id FROM replisync_client_groups
                                WHERE id = ANY($2) AND last_active < $6 - $7
                                FOR NO KEY UPDATE SKIP LOCKED)
                 )
                 SELECT
                   (SELECT version FROM replisync_spaces WHERE id = $1),
                   (SELECT compacted_version FROM replisync_spaces WHERE id = $1),
                   (SELECT coalesce(json_agg(json_build_array(id, space_id, user_id)), '[]')
                      FROM replisync_client_groups WHERE id = ANY($2)),
                   (SELECT coalesce(json_agg(id), '[]')
                      FROM replisync_collected_client_groups WHERE id = ANY($2)),
                   (SELECT coalesce(json_agg(json_build_array(client_group_id, id, last_mutation_id)), '[]')
                      FROM replisync_clients
                      WHERE client_group_id = ANY($2) AND last_modified_version > $3),
                   (SELECT CASE WHEN bool_or(running > $4) THEN NULL
                               ELSE coalesce(json_agg(json_build_array(key, value)) FILTER (WHERE running <= $4), '[]') END
                      FROM (SELECT key, CASE WHEN deleted THEN NULL ELSE value END AS value,
                                   sum(octet_length(key) + coalesce(octet_length(value), 0) + $5)
                                       OVER (ROWS UNBOUNDED PRECEDING) AS running
                              FROM replisync_entries WHERE space_id = $1 AND version > $3) AS delta)",
            )
            .bind(space.as_str())
            .bind(client_group_ids)
            .bind(to_i64(from)?)
            .bind(to_i64(max_delta_bytes as u64)?)
            .bind(DELTA_BYTES_PER_ENTRY as i32)
            .bind(unix_now())
            .bind(self.activity_granularity)
            .fetch_one(&self.pool)
            .await?;
        Ok(PullChanges {
            version: to_space_version(version)?,
            compacted_version: to_space_version(compacted)?,
            client_groups: decode_rows(groups, client_group_record)?,
            collected_client_groups: decode_rows(collected, |id: String| id)?,
            changed_clients: decode_rows(clients, |row: (String, String, u64)| row)?,
            entries: entries
                .map(|rows| decode_rows(rows, |(key, value)| EntryChange { key, value }))
                .transpose()?,
        })
    }

    async fn lock_gc(&self) -> Result<Option<Box<dyn GcBatches>>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        if !try_gc_lock(&mut conn).await? {
            return Ok(None);
        }
        Ok(Some(Box::new(PgGcBatches {
            conn,
            known: Arc::clone(&self.known),
        })))
    }

    async fn raise_space_version(&self, space: &SpaceId, to: u64) -> Result<(), StoreError> {
        // A push holding the space's lock is waited for: versions keep moving one way.
        sqlx::query(
            "INSERT INTO replisync_spaces (id, version, compacted_version) VALUES ($1, $2, $2)
             ON CONFLICT (id) DO UPDATE
                 SET version = greatest(replisync_spaces.version, excluded.version),
                     compacted_version = greatest(replisync_spaces.compacted_version, excluded.version)",
        )
        .bind(space.as_str())
        .bind(to_i64(to)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn refresh_statistics(&self) -> Result<Option<Vec<String>>, StoreError> {
        PgStore::refresh_statistics(self).await
    }

    async fn read_entries(
        &self,
        space: &SpaceId,
        start: &str,
        limit: usize,
        max_bytes: usize,
    ) -> Result<EntryPage, StoreError> {
        let tx = self.pool.begin_with(BEGIN_SNAPSHOT).await?;
        transfer::read_entries(tx, space, start, limit, max_bytes).await
    }

    async fn space_ids(&self) -> Result<Vec<String>, StoreError> {
        transfer::space_ids::<Postgres>(&mut *self.pool.acquire().await?).await
    }

    async fn begin_import(&self) -> Result<Box<dyn SpaceImport>, StoreError> {
        let tx = self.pool.begin_with(BEGIN_READ_COMMITTED).await?;
        Ok(ImportTx::boxed(tx))
    }

    async fn check_health(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.kept.close_all().await;
        self.pool.close().await;
    }
}

/// The advisory lock of garbage collection: this key with the hash of the schema replisync's
/// tables are in, so deployments sharing one database in different schemas do not exclude each
/// other (`pg_try_advisory_lock(GC_LOCK_KEY, hashtext(current_schema()))`).
pub const GC_LOCK_KEY: i32 = 0x7267_6300; // "rgc"

/// The advisory lock of [`PgStore::refresh_statistics`], keyed like [`GC_LOCK_KEY`].
const STATISTICS_LOCK_KEY: i32 = 0x7273_7400; // "rst"

/// replisync's tables, whose statistics it keeps fresh.
const TABLES: [&str; 5] = [
    "replisync_spaces",
    "replisync_client_groups",
    "replisync_clients",
    "replisync_entries",
    "replisync_collected_client_groups",
];

/// A table is analyzed once more rows than this plus the scale factor times its rows have
/// changed since its last analyze: autovacuum's own default thresholds, so that with
/// autovacuum on, replisync rarely finds anything left to do.
const ANALYZE_THRESHOLD_ROWS: f32 = 50.0;
const ANALYZE_SCALE_FACTOR: f32 = 0.1;

/// Takes garbage collection's session lock on `conn`: one instance collects at a time, and a
/// crashed instance's lock goes with its session. `false` when another session holds it.
async fn try_gc_lock(conn: &mut PgConnection) -> Result<bool, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext(current_schema()))")
            .bind(GC_LOCK_KEY)
            .fetch_one(&mut *conn)
            .await?,
    )
}

/// Garbage collection's batches, on the connection that holds its session lock.
struct PgGcBatches {
    conn: PoolConnection<Postgres>,
    /// Forgotten once client groups are removed: a known group may be one of them.
    known: Arc<KnownSpaces>,
}

#[async_trait]
impl GcBatches for PgGcBatches {
    async fn remove_idle_client_groups(
        &mut self,
        now: i64,
        inactive_before: i64,
        limit: usize,
    ) -> Result<Collected, StoreError> {
        // Rows a push has locked (touching them) are skipped; the DELETE checks the idle
        // condition again against the newest row version. The statement commits on its own.
        let (groups, clients): (i64, i64) = sqlx::query_as(
            "WITH gone AS (
                 DELETE FROM replisync_client_groups
                 WHERE id IN (SELECT id FROM replisync_client_groups WHERE last_active < $1
                              LIMIT $2 FOR UPDATE SKIP LOCKED)
                   AND last_active < $1
                 RETURNING id
             ), gone_clients AS (
                 DELETE FROM replisync_clients WHERE client_group_id IN (SELECT id FROM gone)
                 RETURNING 1
             ), remembered AS (
                 INSERT INTO replisync_collected_client_groups (id, collected_at)
                 SELECT id, $3 FROM gone
                 ON CONFLICT (id) DO UPDATE SET collected_at = excluded.collected_at
             )
             SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM gone_clients)",
        )
        .bind(inactive_before)
        .bind(to_i64(limit as u64)?)
        .bind(now)
        .fetch_one(&mut *self.conn)
        .await?;
        if groups > 0 {
            self.known.forget_all();
        }
        Ok(Collected {
            client_groups: to_u64(groups, "collected groups")?,
            clients: to_u64(clients, "collected clients")?,
            ..Collected::default()
        })
    }

    async fn forget_collected_groups(
        &mut self,
        collected_before: i64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        shared::forget_collected_groups::<Postgres>(&mut self.conn, collected_before, limit).await
    }

    async fn compact_tombstones(
        &mut self,
        deleted_before: i64,
        limit: usize,
    ) -> Result<Option<u64>, StoreError> {
        compact_batch(&mut self.conn, deleted_before, limit).await
    }

    /// Releases garbage collection's lock; when that fails, closes the connection, which does.
    async fn unlock(self: Box<Self>) {
        let mut conn = self.conn;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1, hashtext(current_schema()))")
            .bind(GC_LOCK_KEY)
            .execute(&mut *conn)
            .await;
        if unlocked.is_err() {
            drop(conn.detach());
        }
    }
}

/// Removes at most `batch` tombstones written before `deleted_before` from one space, in a
/// transaction holding that space's write lock (taken first, as a push takes it), and raises
/// the space's compacted version. `None` when no such tombstone is left.
async fn compact_batch(
    conn: &mut PgConnection,
    deleted_before: i64,
    batch: usize,
) -> Result<Option<u64>, StoreError> {
    let mut tx = conn.begin_with(BEGIN_READ_COMMITTED).await?;
    let space = shared::space_with_old_tombstones::<Postgres>(&mut tx, deleted_before).await?;
    let Some(space) = space else {
        return Ok(None);
    };
    sqlx::query("SELECT 1 FROM replisync_spaces WHERE id = $1 FOR UPDATE")
        .bind(&space)
        .execute(&mut *tx)
        .await?;
    let removed: i64 = sqlx::query_scalar(
        "WITH gone AS (
             DELETE FROM replisync_entries
             WHERE space_id = $1 AND key IN (
                 SELECT key FROM replisync_entries
                 WHERE space_id = $1 AND deleted AND changed_at < $2 LIMIT $3)
               AND deleted AND changed_at < $2
             RETURNING version
         ), raised AS (
             UPDATE replisync_spaces
             SET compacted_version = greatest(compacted_version, (SELECT max(version) FROM gone))
             WHERE id = $1 AND EXISTS (SELECT 1 FROM gone)
         )
         SELECT count(*) FROM gone",
    )
    .bind(&space)
    .bind(deleted_before)
    .bind(to_i64(batch as u64)?)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(to_u64(removed, "removed tombstones")?))
}

/// A pull's one row: the space's version and compacted version, then groups, collected groups,
/// clients and entries as `json_agg`s.
type PullRow = (Option<i64>, Option<i64>, Value, Value, Value, Option<Value>);
