//! The embedded SQLite store: the zero-configuration default, one file, one instance only.
//! Pushes serialize on a single writer connection (`BEGIN IMMEDIATE`); pulls read WAL snapshots.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use super::shared::{self, client_group_record, stored_client_group, to_lmid, to_space_version};
use super::{
    ClientRecord, ClientState, EntryChange, PullChanges, PullSnapshot, PushChanges, PushTx, Store,
    StoreError, delta_bytes, to_i64,
};
use crate::protocol::SpaceId;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

pub struct SqliteStore {
    /// One connection: SQLite has one writer at a time, so pushes queue here, in process,
    /// instead of failing with SQLITE_BUSY.
    writer: SqlitePool,
    readers: SqlitePool,
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
            .busy_timeout(Duration::from_secs(5));
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
        Ok(SqliteStore { writer, readers })
    }

    /// Applies the migrations in `migrations/sqlite` that have not run yet.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.writer)
            .await
            .map_err(|e| StoreError::Database(format!("migration failed: {e}")))
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn begin_push(&self, space: &SpaceId) -> Result<Box<dyn PushTx>, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let version = space_version(&mut tx, space).await?;
        Ok(Box::new(SqlitePushTx {
            tx,
            space: space.clone(),
            version,
        }))
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
        let version = space_version(&mut tx, space).await?;
        let client_groups = sqlx::query_as::<_, (String, String, String)>(
            "SELECT id, space_id, user_id FROM replisync_client_groups
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(&group_ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(client_group_record)
        .collect();
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
        Ok(PullChanges {
            version,
            client_groups,
            changed_clients,
            entries,
        })
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

struct SqlitePushTx {
    tx: Transaction<'static, Sqlite>,
    space: SpaceId,
    version: u64,
}

#[async_trait]
impl PushTx for SqlitePushTx {
    async fn client_state(
        &mut self,
        client_group_id: &str,
        client_ids: &[String],
    ) -> Result<ClientState, StoreError> {
        // Unlike Postgres's one function call, plain reads one by one: `begin_push` already
        // holds the lock and the embedded database costs no round trips.
        let group = sqlx::query_as::<_, (String, String)>(
            "SELECT space_id, user_id FROM replisync_client_groups WHERE id = ?1",
        )
        .bind(client_group_id)
        .fetch_optional(&mut *self.tx)
        .await?;
        let mut clients = Vec::with_capacity(client_ids.len());
        for id in client_ids {
            clients.extend(stored_client(&mut self.tx, id).await?);
        }
        Ok(ClientState {
            space_version: self.version,
            group: stored_client_group(client_group_id, group),
            clients,
        })
    }

    async fn entry(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        shared::entry(&mut self.tx, &self.space, key).await
    }

    async fn scan_entries(
        &mut self,
        start: &str,
        exclusive: bool,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        shared::scan_entries(&mut self.tx, &self.space, start, exclusive, limit).await
    }

    async fn commit(mut self: Box<Self>, changes: PushChanges) -> Result<(), StoreError> {
        let space = self.space.as_str().to_owned();
        let version = to_i64(changes.version)?;
        // The single writer connection means nobody else can claim these rows meanwhile.
        if let Some(group) = &changes.new_client_group {
            sqlx::query(
                "INSERT INTO replisync_client_groups (id, space_id, user_id) VALUES (?1, ?2, ?3)",
            )
            .bind(&group.id)
            .bind(&space)
            .bind(&group.user_id)
            .execute(&mut *self.tx)
            .await?;
        }
        for client in &changes.clients {
            sqlx::query(
                "INSERT INTO replisync_clients
                     (id, client_group_id, last_mutation_id, last_modified_version)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE
                     SET last_mutation_id = excluded.last_mutation_id,
                         last_modified_version = excluded.last_modified_version",
            )
            .bind(&client.id)
            .bind(&client.client_group_id)
            .bind(to_i64(client.last_mutation_id)?)
            .bind(version)
            .execute(&mut *self.tx)
            .await?;
        }
        for entry in &changes.entries {
            sqlx::query(
                "INSERT INTO replisync_entries (space_id, key, value, deleted, version)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (space_id, key) DO UPDATE
                     SET value = excluded.value,
                         deleted = excluded.deleted,
                         version = excluded.version",
            )
            .bind(&space)
            .bind(&entry.key)
            .bind(&entry.value)
            .bind(entry.value.is_none())
            .bind(version)
            .execute(&mut *self.tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO replisync_spaces (id, version) VALUES (?1, ?2)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version",
        )
        .bind(&space)
        .bind(version)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
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

/// The version of `space` (0 for a space never written).
async fn space_version(conn: &mut SqliteConnection, space: &SpaceId) -> Result<u64, StoreError> {
    let version: Option<i64> =
        sqlx::query_scalar("SELECT version FROM replisync_spaces WHERE id = ?1")
            .bind(space.as_str())
            .fetch_optional(conn)
            .await?;
    to_space_version(version)
}

/// The stored client `id`, if any.
async fn stored_client(
    conn: &mut SqliteConnection,
    id: &str,
) -> Result<Option<ClientRecord>, StoreError> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT client_group_id, last_mutation_id FROM replisync_clients WHERE id = ?1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?;
    row.map(|(client_group_id, lmid)| {
        Ok(ClientRecord {
            id: id.to_owned(),
            client_group_id,
            last_mutation_id: to_lmid(lmid)?,
        })
    })
    .transpose()
}
