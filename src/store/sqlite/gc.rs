//! Garbage collection's batches on SQLite: idle client groups removed (and remembered as
//! collected), forgotten once old, and old tombstones compacted, each in a short transaction.

use async_trait::async_trait;
use sqlx::Sqlite;
use sqlx::sqlite::{SqliteConnection, SqlitePool};

use crate::store::shared;
use crate::store::{Collected, GcBatches, StoreError, to_i64};

/// Garbage collection's batches. Each takes the writer, which is every space's write lock, for
/// one short transaction, never across the caller's pauses: pushes wait on it.
pub(super) struct SqliteGcBatches {
    writer: SqlitePool,
}

impl SqliteGcBatches {
    pub(super) fn new(writer: SqlitePool) -> SqliteGcBatches {
        SqliteGcBatches { writer }
    }
}

#[async_trait]
impl GcBatches for SqliteGcBatches {
    async fn remove_idle_client_groups(
        &mut self,
        now: i64,
        inactive_before: i64,
        limit: usize,
    ) -> Result<Collected, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let gone = collect_batch(&mut tx, now, inactive_before, limit).await?;
        tx.commit().await?;
        Ok(gone)
    }

    async fn forget_collected_groups(
        &mut self,
        collected_before: i64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let mut writer = self.writer.acquire().await?;
        shared::forget_collected_groups::<Sqlite>(&mut writer, collected_before, limit).await
    }

    async fn compact_tombstones(
        &mut self,
        deleted_before: i64,
        limit: usize,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let removed = compact_batch(&mut tx, deleted_before, limit).await?;
        tx.commit().await?;
        Ok(removed)
    }

    async fn unlock(self: Box<Self>) {}
}

/// Deletes at most `batch` client groups last active before `inactive_before`, and their
/// clients, and remembers the groups as collected at `now`.
async fn collect_batch(
    conn: &mut SqliteConnection,
    now: i64,
    inactive_before: i64,
    batch: usize,
) -> Result<Collected, StoreError> {
    let gone: Vec<String> = sqlx::query_scalar(
        "DELETE FROM replisync_client_groups WHERE id IN
             (SELECT id FROM replisync_client_groups WHERE last_active < ?1 LIMIT ?2)
         RETURNING id",
    )
    .bind(inactive_before)
    .bind(to_i64(batch as u64)?)
    .fetch_all(&mut *conn)
    .await?;
    let gone_json =
        serde_json::to_string(&gone).map_err(|e| StoreError::Database(e.to_string()))?;
    let clients = sqlx::query(
        "DELETE FROM replisync_clients WHERE client_group_id IN (SELECT value FROM json_each(?1))",
    )
    .bind(&gone_json)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    sqlx::query(
        "INSERT INTO replisync_collected_client_groups (id, collected_at)
         SELECT value, ?2 FROM json_each(?1) WHERE true
         ON CONFLICT (id) DO UPDATE SET collected_at = excluded.collected_at",
    )
    .bind(&gone_json)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(Collected {
        client_groups: gone.len() as u64,
        clients,
        ..Collected::default()
    })
}

/// Removes at most `batch` tombstones written before `deleted_before` from one space and raises
/// its compacted version. `None` when no such tombstone is left.
async fn compact_batch(
    conn: &mut SqliteConnection,
    deleted_before: i64,
    batch: usize,
) -> Result<Option<u64>, StoreError> {
    let space = shared::space_with_old_tombstones::<Sqlite>(conn, deleted_before).await?;
    let Some(space) = space else {
        return Ok(None);
    };
    let versions: Vec<i64> = sqlx::query_scalar(
        "DELETE FROM replisync_entries
         WHERE space_id = ?1 AND key IN (
             SELECT key FROM replisync_entries
             WHERE space_id = ?1 AND deleted AND changed_at < ?2 LIMIT ?3)
         RETURNING version",
    )
    .bind(&space)
    .bind(deleted_before)
    .bind(to_i64(batch as u64)?)
    .fetch_all(&mut *conn)
    .await?;
    let highest = versions.iter().copied().max().unwrap_or(0);
    sqlx::query(
        "UPDATE replisync_spaces SET compacted_version = max(compacted_version, ?2) WHERE id = ?1",
    )
    .bind(&space)
    .bind(highest)
    .execute(&mut *conn)
    .await?;
    Ok(Some(versions.len() as u64))
}
