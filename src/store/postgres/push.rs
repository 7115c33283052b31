//! A push's transaction on Postgres: its reads (one statement, locking the space when the push
//! is locked), and its commit: alone, or with other spaces' in a batch (`batch`) when unlocked.

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres, Transaction};

use super::batch::CommitBatcher;
use super::commit::commit_group;
use crate::protocol::SpaceId;
use crate::store::pg_functions::{LOCK_SPACE_AND_READ_GROUPS, READ_GROUPS};
use crate::store::shared::{self, client_group_record, to_space_version};
use crate::store::{ClientRecord, ClientState, PushChanges, PushTx, StoreError};

/// The statements calling the SQL functions, built once from their descriptions.
static READ_GROUPS_SQL: LazyLock<String> = LazyLock::new(|| READ_GROUPS.select_sql());
static LOCK_SPACE_AND_READ_GROUPS_SQL: LazyLock<String> =
    LazyLock::new(|| LOCK_SPACE_AND_READ_GROUPS.select_sql());

/// A push's connection: a transaction holding the space's lock, or a plain connection whose
/// commit is one statement.
pub(super) enum PushConnection {
    Locked(Transaction<'static, Postgres>),
    Unlocked(PoolConnection<Postgres>),
}

impl PushConnection {
    fn get(&mut self) -> &mut PgConnection {
        match self {
            PushConnection::Locked(tx) => tx,
            PushConnection::Unlocked(conn) => conn,
        }
    }
}

pub(super) struct PgPushTx {
    pub(super) conn: PushConnection,
    pub(super) space: SpaceId,
    pub(super) activity_granularity: i64,
    /// Where an unlocked push's commit goes, to share a transaction with other spaces'.
    pub(super) batcher: Arc<CommitBatcher>,
}

/// `client_state`'s one row: the space's version, then groups, collected groups and clients as
/// `json_agg`s.
type ClientStateRow = (Option<i64>, Value, Value, Value);

#[async_trait]
impl PushTx for PgPushTx {
    async fn client_state(
        &mut self,
        client_group_ids: &[String],
        client_ids: &[String],
    ) -> Result<ClientState, StoreError> {
        // One round trip either way (see the migration that defines the functions). Locked: lock,
        // then read. Unlocked: one snapshot; the commit checks the version. The binds are
        // READ_GROUPS's arguments, in order.
        let sql = match self.conn {
            PushConnection::Locked(_) => LOCK_SPACE_AND_READ_GROUPS_SQL.as_str(),
            PushConnection::Unlocked(_) => READ_GROUPS_SQL.as_str(),
        };
        let (version, groups, collected, clients): ClientStateRow = sqlx::query_as(sql)
            .bind(self.space.as_str())
            .bind(client_group_ids)
            .bind(client_ids)
            .fetch_one(self.conn.get())
            .await?;
        Ok(ClientState {
            space_version: to_space_version(version)?,
            groups: decode_rows(groups, client_group_record)?,
            collected_groups: decode_rows(collected, |id: String| id)?,
            clients: decode_rows(clients, |(id, client_group_id, last_mutation_id)| {
                ClientRecord {
                    id,
                    client_group_id,
                    last_mutation_id,
                }
            })?,
        })
    }

    async fn entry(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        shared::entry::<Postgres>(self.conn.get(), &self.space, key).await
    }

    async fn scan_entries(
        &mut self,
        start: &str,
        exclusive: bool,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        shared::scan_entries::<Postgres>(self.conn.get(), &self.space, start, exclusive, limit)
            .await
    }

    async fn commit(self: Box<Self>, changes: PushChanges) -> Result<(), StoreError> {
        let PgPushTx {
            conn,
            space,
            activity_granularity,
            batcher,
        } = *self;
        match conn {
            PushConnection::Unlocked(conn) => batcher.commit(conn, space, changes).await,
            PushConnection::Locked(mut tx) => {
                commit_group(&mut tx, &space, changes, activity_granularity).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }
}

/// Decodes a `json_agg` of row arrays into typed rows.
pub(super) fn decode_rows<Row: serde::de::DeserializeOwned, T>(
    rows: Value,
    into: impl Fn(Row) -> T,
) -> Result<Vec<T>, StoreError> {
    let rows: Vec<Row> = serde_json::from_value(rows)
        .map_err(|e| StoreError::Corrupt(format!("unexpected pull row: {e}")))?;
    Ok(rows.into_iter().map(into).collect())
}
