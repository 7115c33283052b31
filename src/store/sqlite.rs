//! The embedded SQLite store: the zero-configuration default, one file, one instance only.
//! Pushes serialize on a single writer connection (`BEGIN IMMEDIATE`); pulls read WAL snapshots.

mod batch;
mod gc;
mod push;
mod reads;
mod writes;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Sqlite};

use self::batch::WriterBatches;
use self::gc::SqliteGcBatches;
use self::push::{SqlitePushTx, touch_groups};
use super::migrations;
use super::shared::{self, client_group_record, to_lmid, to_space_version};
use super::transfer::{self, ImportTx};
use super::{
    ACTIVITY_GRANULARITY_SECS, ClientGroupRecord, EntryChange, GcBatches, PullChanges,
    PullSnapshot, PushTx, Store, StoreError, delta_bytes, to_i64, unix_now,
};
use super::{BatchLimits, CommitBatchCounts, EntryPage, PoolStats, SpaceImport, pool_stats};
use crate::protocol::SpaceId;

/// replisync's migrations, recorded in its own table (see [`migrations`]).
static MIGRATOR: LazyLock<sqlx::migrate::Migrator> =
    LazyLock::new(|| migrations::in_own_table(sqlx::migrate!("./migrations/sqlite")));

#[derive(Debug)]
pub struct SqliteStore {
    /// One connection: SQLite has one writer at a time, so pushes queue here, in process,
    /// instead of failing with SQLITE_BUSY.
    writer: SqlitePool,
    readers: SqlitePool,
    /// Client groups whose pull activity is being written (see `record_pull_activity`).
    touching: Arc<Mutex<HashSet<String>>>,
    /// See [`activity_granularity`](super::activity_granularity).
    activity_granularity: i64,
    /// The writer's transactions, shared by the pushes that want it at the same time.
    batches: Arc<WriterBatches>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path`, in WAL mode.
    pub async fn open(path: &Path, max_readers: u32) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an acknowledged push survives a power cut, not only a process crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .log_statements(super::STATEMENT_LOG_LEVEL);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(max_readers.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteStore {
            batches: Arc::new(WriterBatches::new(writer.clone(), BatchLimits::default())),
            writer,
            readers,
            touching: Arc::default(),
            activity_granularity: ACTIVITY_GRANULARITY_SECS,
        })
    }

    /// Records a client group's activity at most once per `secs` (the default is an hour).
    pub fn with_activity_granularity(mut self, secs: i64) -> SqliteStore {
        self.activity_granularity = secs.max(1);
        self
    }

    /// Bounds the transactions that pushes to several spaces share.
    pub fn with_batch_limits(mut self, limits: BatchLimits) -> SqliteStore {
        self.batches = Arc::new(WriterBatches::new(self.writer.clone(), limits));
        self
    }

    /// Applies the migrations in `migrations/sqlite` that have not run yet.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.writer.acquire().await?;
        migrations::adopt_old_records_sqlite(&mut conn, &MIGRATOR)
            .await
            .map_err(|e| {
                let old = migrations::OLD_TABLE;
                StoreError::Database(format!(
                    "migration failed: cannot move the records of {old}: {e}"
                ))
            })?;
        MIGRATOR
            .run(&mut *conn)
            .await
            .map_err(|e| StoreError::Database(format!("migration failed: {e}")))
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn pools(&self) -> Vec<PoolStats> {
        vec![
            pool_stats("writer", &self.writer),
            pool_stats("readers", &self.readers),
        ]
    }

    fn commit_batches(&self) -> CommitBatchCounts {
        self.batches.counts()
    }

    async fn begin_push(&self, space: &SpaceId) -> Result<Box<dyn PushTx>, StoreError> {
        // Always locked: the single writer is every space's lock, and costs no round trips.
        self.begin_locked_push(space).await
    }

    async fn begin_locked_push(&self, space: &SpaceId) -> Result<Box<dyn PushTx>, StoreError> {
        let tx = SqlitePushTx::begin(&self.batches, space, self.activity_granularity).await?;
        Ok(Box::new(tx))
    }

    async fn streamed_pull(
        &self,
        space: &SpaceId,
        client_group_id: &str,
        since: Option<u64>,
    ) -> Result<PullSnapshot, StoreError> {
        // In WAL mode a read transaction sees one snapshot from its first read to its end.
        let tx = self.readers.begin().await?;
        shared::streamed_pull(tx, space, client_group_id, since).await
    }

    async fn pull_changes(
        &self,
        space: &SpaceId,
        client_group_ids: &[String],
        from: u64,
        max_delta_bytes: usize,
    ) -> Result<PullChanges, StoreError> {
        // Several statements in one read transaction (a WAL snapshot), where Postgres runs one
        // `json_agg` statement. SQLite has no array parameters; the ids travel as a JSON array.
        let mut tx = self.readers.begin().await?;
        let from = to_i64(from)?;
        let group_ids = serde_json::to_string(client_group_ids)
            .map_err(|e| StoreError::Database(e.to_string()))?;
        let (version, compacted_version) = space_versions(&mut tx, space).await?;
        let now = unix_now();
        let (client_groups, idle) =
            pulled_groups(&mut tx, &group_ids, now - self.activity_granularity).await?;
        let collected_client_groups = sqlx::query_scalar(
            "SELECT id FROM replisync_collected_client_groups
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(&group_ids)
        .fetch_all(&mut *tx)
        .await?;
        let changed_clients = sqlx::query_as::<_, (String, String, i64)>(
            "SELECT client_group_id, id, last_mutation_id FROM replisync_clients
             WHERE client_group_id IN (SELECT value FROM json_each(?1))
               AND last_modified_version > ?2",
        )
        .bind(&group_ids)
        .bind(from)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|(group, id, lmid)| Ok((group, id, to_lmid(lmid)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
        let entries = delta_within(&mut tx, space, from, max_delta_bytes).await?;
        tx.commit().await?;
        self.record_pull_activity(idle, now);
        Ok(PullChanges {
            version,
            compacted_version,
            client_groups,
            collected_client_groups,
            changed_clients,
            entries,
        })
    }

    async fn lock_gc(&self) -> Result<Option<Box<dyn GcBatches>>, StoreError> {
        // One instance only: nothing to lock against.
        Ok(Some(Box::new(SqliteGcBatches::new(self.writer.clone()))))
    }

    async fn raise_space_version(&self, space: &SpaceId, to: u64) -> Result<(), StoreError> {
        // On the writer: pushes are waited for, so versions keep moving one way.
        sqlx::query(
            "INSERT INTO replisync_spaces (id, version, compacted_version) VALUES (?1, ?2, ?2)
             ON CONFLICT (id) DO UPDATE
                 SET version = max(version, excluded.version),
                     compacted_version = max(compacted_version, excluded.version)",
        )
        .bind(space.as_str())
        .bind(to_i64(to)?)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn read_entries(
        &self,
        space: &SpaceId,
        start: &str,
        limit: usize,
        max_bytes: usize,
    ) -> Result<EntryPage, StoreError> {
        let tx = self.readers.begin().await?;
        transfer::read_entries(tx, space, start, limit, max_bytes).await
    }

    async fn space_ids(&self) -> Result<Vec<String>, StoreError> {
        transfer::space_ids::<Sqlite>(&mut *self.readers.acquire().await?).await
    }

    async fn begin_import(&self) -> Result<Box<dyn SpaceImport>, StoreError> {
        // On the writer, which pushes wait for; the first write takes SQLite's write lock.
        let tx = self.writer.begin().await?;
        Ok(ImportTx::boxed(tx))
    }

    async fn check_health(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }

    async fn close(&self) {
        self.writer.close().await;
        self.readers.close().await;
    }
}

impl SqliteStore {
    /// Moves the last activity of pulled groups whose stored value is older than the
    /// granularity, in a task of its own: the pull never waits for the writer (a push may hold
    /// it). A group already being written is skipped. Failing is harmless: a later pull retries.
    fn record_pull_activity(&self, idle: Vec<String>, now: i64) {
        let fresh: Vec<String> = {
            let mut touching = self.touching.lock().unwrap_or_else(|e| e.into_inner());
            idle.into_iter()
                .filter(|id| touching.insert(id.clone()))
                .collect()
        };
        if fresh.is_empty() {
            return;
        }
        let (writer, touching) = (self.writer.clone(), self.touching.clone());
        let granularity = self.activity_granularity;
        tokio::spawn(async move {
            let written = async {
                let mut tx = writer.begin().await?;
                touch_groups(&mut tx, &fresh, now, granularity).await?;
                tx.commit().await.map_err(StoreError::from)
            };
            if let Err(error) = written.await {
                tracing::debug!(%error, "could not record pull activity; a later pull retries");
            }
            let mut touching = touching.lock().unwrap_or_else(|e| e.into_inner());
            for id in &fresh {
                touching.remove(id);
            }
        });
    }
}

/// The entries of `space` changed after version `from`, read until they add up to more than
/// `max_bytes` (then `None`: the rest is never read).
async fn delta_within(
    conn: &mut SqliteConnection,
    space: &SpaceId,
    from: i64,
    max_bytes: usize,
) -> Result<Option<Vec<EntryChange>>, StoreError> {
    let mut rows = sqlx::query_as::<_, (String, Option<String>)>(
        "SELECT key, CASE WHEN deleted THEN NULL ELSE value END FROM replisync_entries
         WHERE space_id = ?1 AND version > ?2",
    )
    .bind(space.as_str())
    .bind(from)
    .fetch(conn);
    let mut entries = Vec::new();
    let mut bytes = 0;
    while let Some((key, value)) = rows.try_next().await? {
        bytes += delta_bytes(&key, value.as_deref());
        if bytes > max_bytes {
            return Ok(None);
        }
        entries.push(EntryChange { key, value });
    }
    Ok(Some(entries))
}

/// The stored groups among `group_ids` (a JSON array), and the ids of those whose last activity
/// is older than `stale_before`.
async fn pulled_groups(
    conn: &mut SqliteConnection,
    group_ids: &str,
    stale_before: i64,
) -> Result<(Vec<ClientGroupRecord>, Vec<String>), StoreError> {
    let rows = sqlx::query_as::<_, (String, String, String, i64)>(
        "SELECT id, space_id, user_id, last_active FROM replisync_client_groups
         WHERE id IN (SELECT value FROM json_each(?1))",
    )
    .bind(group_ids)
    .fetch_all(conn)
    .await?;
    let idle = rows
        .iter()
        .filter(|row| row.3 < stale_before)
        .map(|row| row.0.clone())
        .collect();
    let groups = rows
        .into_iter()
        .map(|(id, space_id, user_id, _)| client_group_record((id, space_id, user_id)))
        .collect();
    Ok((groups, idle))
}

/// The version and the compacted version of `space` (0 and 0 for a space never written).
async fn space_versions(
    conn: &mut SqliteConnection,
    space: &SpaceId,
) -> Result<(u64, u64), StoreError> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT version, compacted_version FROM replisync_spaces WHERE id = ?1")
            .bind(space.as_str())
            .fetch_optional(conn)
            .await?;
    let (version, compacted) = row.unwrap_or((0, 0));
    Ok((
        to_space_version(Some(version))?,
        to_space_version(Some(compacted))?,
    ))
}
