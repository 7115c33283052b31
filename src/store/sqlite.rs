//! The embedded SQLite store: the zero-configuration default, one file, one instance only.
//! Pushes serialize on a single writer connection (`BEGIN IMMEDIATE`); pulls read WAL snapshots.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use super::shared::{self, client_group_record, to_lmid, to_space_version};
use super::{
    ACTIVITY_GRANULARITY_SECS, ClientGroupRecord, ClientRecord, ClientState, ClientWrite,
    Collected, EntryChange, GcBatches, PullChanges, PullSnapshot, PushChanges, PushTx, Store,
    StoreError, delta_bytes, to_i64, unix_now,
};
use crate::protocol::SpaceId;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

pub struct SqliteStore {
    /// One connection: SQLite has one writer at a time, so pushes queue here, in process,
    /// instead of failing with SQLITE_BUSY.
    writer: SqlitePool,
    readers: SqlitePool,
    /// Client groups whose pull activity is being written (see `record_pull_activity`).
    touching: Arc<Mutex<HashSet<String>>>,
    /// See [`activity_granularity`](super::activity_granularity).
    activity_granularity: i64,
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
        Ok(SqliteStore {
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
        // Always locked: the single writer is every space's lock, and costs no round trips.
        self.begin_locked_push(space).await
    }

    async fn begin_locked_push(&self, space: &SpaceId) -> Result<Box<dyn PushTx>, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let version = space_version(&mut tx, space).await?;
        Ok(Box::new(SqlitePushTx {
            tx,
            space: space.clone(),
            version,
            activity_granularity: self.activity_granularity,
            groups_last_active: HashMap::new(),
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
        Ok(Some(Box::new(SqliteGcBatches {
            writer: self.writer.clone(),
        })))
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

/// Garbage collection's batches. Each takes the writer, which is every space's write lock, for
/// one short transaction, never across the caller's pauses: pushes wait on it.
struct SqliteGcBatches {
    writer: SqlitePool,
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

struct SqlitePushTx {
    tx: Transaction<'static, Sqlite>,
    space: SpaceId,
    version: u64,
    activity_granularity: i64,
    /// The stored groups' last activity, read with them: the commit writes it only when stale.
    groups_last_active: HashMap<String, i64>,
}

#[async_trait]
impl PushTx for SqlitePushTx {
    async fn client_state(
        &mut self,
        client_group_ids: &[String],
        client_ids: &[String],
    ) -> Result<ClientState, StoreError> {
        // Unlike Postgres's one statement, plain reads one by one: the push's begin already holds
        // the lock and the embedded database costs no round trips.
        let mut state = ClientState {
            space_version: self.version,
            ..ClientState::default()
        };
        for id in client_group_ids {
            let row = sqlx::query_as::<_, (String, String, i64)>(
                "SELECT space_id, user_id, last_active FROM replisync_client_groups WHERE id = ?1",
            )
            .bind(id)
            .fetch_optional(&mut *self.tx)
            .await?;
            if let Some((space_id, user_id, last_active)) = row {
                self.groups_last_active.insert(id.clone(), last_active);
                state
                    .groups
                    .push(client_group_record((id.clone(), space_id, user_id)));
            } else if shared::client_group_collected::<Sqlite>(&mut self.tx, id).await? {
                state.collected_groups.push(id.clone());
            }
        }
        for id in client_ids {
            state.clients.extend(stored_client(&mut self.tx, id).await?);
        }
        Ok(state)
    }

    async fn entry(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        shared::entry::<Sqlite>(&mut self.tx, &self.space, key).await
    }

    async fn scan_entries(
        &mut self,
        start: &str,
        exclusive: bool,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        shared::scan_entries::<Sqlite>(&mut self.tx, &self.space, start, exclusive, limit).await
    }

    async fn commit(mut self: Box<Self>, changes: PushChanges) -> Result<(), StoreError> {
        let space = self.space.as_str().to_owned();
        let version = to_i64(changes.version)?;
        // The single writer connection means nobody else can claim these rows meanwhile.
        for group in &changes.new_client_groups {
            sqlx::query(
                "INSERT INTO replisync_client_groups (id, space_id, user_id, last_active)
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(&group.id)
            .bind(&space)
            .bind(&group.user_id)
            .bind(changes.active_at)
            .execute(&mut *self.tx)
            .await?;
        }
        // Only a stale activity is written: a busy group costs no statement per push.
        let stale: Vec<String> = changes
            .active_client_groups
            .iter()
            .filter(|id| {
                self.groups_last_active
                    .get(*id)
                    .is_some_and(|at| *at < changes.active_at - self.activity_granularity)
            })
            .cloned()
            .collect();
        if !stale.is_empty() {
            touch_groups(
                &mut self.tx,
                &stale,
                changes.active_at,
                self.activity_granularity,
            )
            .await?;
        }
        for ClientWrite { client, version } in &changes.clients {
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
            .bind(to_i64(*version)?)
            .execute(&mut *self.tx)
            .await?;
        }
        for entry in &changes.entries {
            sqlx::query(
                "INSERT INTO replisync_entries (space_id, key, value, deleted, version, changed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (space_id, key) DO UPDATE
                     SET value = excluded.value,
                         deleted = excluded.deleted,
                         version = excluded.version,
                         changed_at = excluded.changed_at",
            )
            .bind(&space)
            .bind(&entry.key)
            .bind(&entry.value)
            .bind(entry.value.is_none())
            .bind(to_i64(entry.version)?)
            .bind(changes.active_at)
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

/// Sets the last activity of `group_ids` to `now` where it is older than `granularity`.
async fn touch_groups(
    conn: &mut SqliteConnection,
    group_ids: &[String],
    now: i64,
    granularity: i64,
) -> Result<(), StoreError> {
    for id in group_ids {
        sqlx::query(
            "UPDATE replisync_client_groups SET last_active = ?1
             WHERE id = ?2 AND last_active < ?1 - ?3",
        )
        .bind(now)
        .bind(id)
        .bind(granularity)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
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

/// The version of `space` (0 for a space never written).
async fn space_version(conn: &mut SqliteConnection, space: &SpaceId) -> Result<u64, StoreError> {
    let version: Option<i64> =
        sqlx::query_scalar("SELECT version FROM replisync_spaces WHERE id = ?1")
            .bind(space.as_str())
            .fetch_optional(conn)
            .await?;
    to_space_version(version)
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
