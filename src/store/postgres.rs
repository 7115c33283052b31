//! The Postgres store, for production and any number of instances behind a load balancer. A push
//! locks its space and reads clients in one function call; pulls read REPEATABLE READ snapshots.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres, Transaction};

use super::shared::{self, client_group_record, stored_client_group, to_space_version};
use super::{
    ClientRecord, ClientState, DELTA_BYTES_PER_ENTRY, EntryChange, PullChanges, PullSnapshot,
    PushChanges, PushTx, Store, StoreError, to_i64, to_u64,
};
use crate::protocol::SpaceId;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// A pooled connection idle for longer than this is pinged before use; one used more recently
/// is handed out as it is (a ping is a full round trip, on every push and pull).
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects lazily-checked: fails now if the first connection cannot be made.
    pub async fn connect(
        options: PgConnectOptions,
        max_connections: u32,
    ) -> Result<PgStore, StoreError> {
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
        Ok(PgStore { pool })
    }

    /// Applies the migrations in `migrations/postgres` that have not run yet. Safe to run from
    /// several instances at once (the migrator takes an advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Database(format!("migration failed: {e}")))
    }
}

#[async_trait]
impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn begin_push(&self, space: &SpaceId) -> Result<Box<dyn PushTx>, StoreError> {
        // The space's lock is taken by `client_state`, together with its reads, so that it is
        // held for one round trip fewer.
        let tx = self.pool.begin().await?;
        Ok(Box::new(PgPushTx {
            tx,
            space: space.clone(),
        }))
    }

    async fn streamed_pull(
        &self,
        space: &SpaceId,
        client_group_id: &str,
        since: Option<u64>,
    ) -> Result<PullSnapshot, StoreError> {
        let tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
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
        // every pull in the batch. The entries are aggregated only up to `$4` bytes (a running
        // sum over the delta, which reads value sizes without reading large values), so no
        // delta is built whole past the limit, nor meets the 1 GB limit of one `json_agg`.
        let (version, groups, clients, entries): (Option<i64>, Value, Value, Option<Value>) =
            sqlx::query_as(
                "SELECT
                   (SELECT version FROM replisync_spaces WHERE id = $1),
                   (SELECT coalesce(json_agg(json_build_array(id, space_id, user_id)), '[]')
                      FROM replisync_client_groups WHERE id = ANY($2)),
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
            .fetch_one(&self.pool)
            .await?;
        Ok(PullChanges {
            version: to_space_version(version)?,
            client_groups: decode_rows(groups, client_group_record)?,
            changed_clients: decode_rows(clients, |row: (String, String, u64)| row)?,
            entries: entries
                .map(|rows| decode_rows(rows, |(key, value)| EntryChange { key, value }))
                .transpose()?,
        })
    }

    async fn check_health(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

struct PgPushTx {
    tx: Transaction<'static, Postgres>,
    space: SpaceId,
}

#[async_trait]
impl PushTx for PgPushTx {
    async fn client_state(
        &mut self,
        client_group_id: &str,
        client_ids: &[String],
    ) -> Result<ClientState, StoreError> {
        // Lock, then read, in one round trip (see the migration that defines the function).
        let (version, space_id, user_id, clients): (i64, Option<String>, Option<String>, Value) =
            sqlx::query_as("SELECT * FROM replisync_lock_space_and_read($1, $2, $3)")
                .bind(self.space.as_str())
                .bind(client_group_id)
                .bind(client_ids)
                .fetch_one(&mut *self.tx)
                .await?;
        let group = stored_client_group(client_group_id, space_id.zip(user_id));
        let clients = decode_rows(clients, |(id, client_group_id, last_mutation_id)| {
            ClientRecord {
                id,
                client_group_id,
                last_mutation_id,
            }
        })?;
        Ok(ClientState {
            space_version: to_u64(version, "space version")?,
            group,
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
        let (client_ids, client_groups, client_lmids) = client_columns(&changes.clients)?;
        let (keys, values): (Vec<String>, Vec<Option<String>>) = changes
            .entries
            .into_iter()
            .map(|entry| (entry.key, entry.value))
            .unzip();
        let group = changes.new_client_group;
        // One round trip for every write. The counts tell whether a concurrent push claimed
        // the new group or a client id first (then ON CONFLICT skipped our row).
        let (groups_created, clients_written): (i64, i64) = sqlx::query_as(
            "WITH new_group AS (
                 INSERT INTO replisync_client_groups (id, space_id, user_id)
                 SELECT $3, $1, $4 WHERE $3 IS NOT NULL
                 ON CONFLICT (id) DO NOTHING
                 RETURNING 1
             ), written_clients AS (
                 INSERT INTO replisync_clients
                     (id, client_group_id, last_mutation_id, last_modified_version)
                 SELECT c.id, c.grp, c.lmid, $2
                 FROM UNNEST($5::text[], $6::text[], $7::int8[]) AS c(id, grp, lmid)
                 ON CONFLICT (id) DO UPDATE
                     SET last_mutation_id = excluded.last_mutation_id,
                         last_modified_version = excluded.last_modified_version
                     WHERE replisync_clients.client_group_id = excluded.client_group_id
                 RETURNING 1
             ), written_entries AS (
                 INSERT INTO replisync_entries (space_id, key, value, deleted, version)
                 SELECT $1, e.key, e.value, e.value IS NULL, $2
                 FROM UNNEST($8::text[], $9::text[]) AS e(key, value)
                 ON CONFLICT (space_id, key) DO UPDATE
                     SET value = excluded.value,
                         deleted = excluded.deleted,
                         version = excluded.version
             ), bumped AS (
                 UPDATE replisync_spaces SET version = $2 WHERE id = $1
             )
             SELECT (SELECT count(*) FROM new_group), (SELECT count(*) FROM written_clients)",
        )
        .bind(self.space.as_str())
        .bind(to_i64(changes.version)?)
        .bind(group.as_ref().map(|g| g.id.as_str()))
        .bind(group.as_ref().map(|g| g.user_id.as_str()))
        .bind(&client_ids)
        .bind(&client_groups)
        .bind(&client_lmids)
        .bind(&keys)
        .bind(&values)
        .fetch_one(&mut *self.tx)
        .await?;

        if group.is_some() && groups_created != 1 {
            return Err(StoreError::Conflict(
                "client group was created concurrently".into(),
            ));
        }
        if clients_written != client_ids.len() as i64 {
            return Err(StoreError::Conflict(
                "a client id was claimed by another client group".into(),
            ));
        }
        self.tx.commit().await?;
        Ok(())
    }
}

/// Decodes a `json_agg` of row arrays into typed rows.
fn decode_rows<Row: serde::de::DeserializeOwned, T>(
    rows: Value,
    into: impl Fn(Row) -> T,
) -> Result<Vec<T>, StoreError> {
    let rows: Vec<Row> = serde_json::from_value(rows)
        .map_err(|e| StoreError::Corrupt(format!("unexpected pull row: {e}")))?;
    Ok(rows.into_iter().map(into).collect())
}

type ClientColumns = (Vec<String>, Vec<String>, Vec<i64>);

/// Splits client records into the column arrays that UNNEST takes.
pub(crate) fn client_columns(clients: &[ClientRecord]) -> Result<ClientColumns, StoreError> {
    let mut columns: ClientColumns = Default::default();
    for client in clients {
        columns.0.push(client.id.clone());
        columns.1.push(client.client_group_id.clone());
        columns.2.push(to_i64(client.last_mutation_id)?);
    }
    Ok(columns)
}
