//! A push's place in the single writer's transaction (`batch`: every space's lock, shared with
//! pushes to other spaces), its reads, and its writes (`writes`), activity only when stale.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Sqlite;
use sqlx::sqlite::SqliteConnection;

use super::batch::{Member, WriterBatches};
use super::writes::write_changes;

use crate::protocol::SpaceId;
use crate::store::shared::{self, client_group_record, to_lmid, to_space_version};
use crate::store::{ClientRecord, ClientState, PushChanges, PushTx, StoreError};

/// One push's place in the writer's transaction, until it commits or is dropped.
pub(super) struct SqlitePushTx {
    member: Member,
    space: SpaceId,
    activity_granularity: i64,
    /// The stored groups' last activity, read with them: the commit writes it only when stale.
    groups_last_active: HashMap<String, i64>,
}

impl SqlitePushTx {
    /// Joins the writer's transaction.
    pub(super) async fn begin(
        batches: &Arc<WriterBatches>,
        space: &SpaceId,
        activity_granularity: i64,
    ) -> Result<SqlitePushTx, StoreError> {
        Ok(SqlitePushTx {
            member: batches.join().await?,
            space: space.clone(),
            activity_granularity,
            groups_last_active: HashMap::new(),
        })
    }
}

/// The space's version, the stored client groups and the stored clients asked for, in one
/// statement (one call to the writer's thread): rows of `(kind, id, a, b, number)`, kind 0 the
/// version, 1 a group (space, user, last activity), 2 a client (group, last mutation id). The
/// ids travel as JSON arrays.
const CLIENT_STATE: &str = "
    SELECT 0, NULL, NULL, NULL, (SELECT version FROM replisync_spaces WHERE id = ?1)
    UNION ALL
    SELECT 1, id, space_id, user_id, last_active FROM replisync_client_groups
    WHERE id IN (SELECT value FROM json_each(?2))
    UNION ALL
    SELECT 2, id, client_group_id, NULL, last_mutation_id FROM replisync_clients
    WHERE id IN (SELECT value FROM json_each(?3))";

type StateRow = (
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
);

#[async_trait]
impl PushTx for SqlitePushTx {
    async fn client_state(
        &mut self,
        client_group_ids: &[String],
        client_ids: &[String],
    ) -> Result<ClientState, StoreError> {
        let mut conn = self.member.conn().await?;
        let rows: Vec<StateRow> = sqlx::query_as(CLIENT_STATE)
            .bind(self.space.as_str())
            .bind(json_list(client_group_ids)?)
            .bind(json_list(client_ids)?)
            .fetch_all(&mut *conn)
            .await?;
        let mut state = ClientState::default();
        let mut groups = HashMap::new();
        let mut clients = HashMap::new();
        for (kind, id, a, b, number) in rows {
            match (kind, id, a, b, number) {
                (0, _, _, _, version) => state.space_version = to_space_version(version)?,
                (1, Some(id), Some(space_id), Some(user_id), Some(last_active)) => {
                    groups.insert(id, (space_id, user_id, last_active));
                }
                (2, Some(id), Some(group), _, Some(lmid)) => {
                    clients.insert(id, (group, to_lmid(lmid)?));
                }
                _ => return Err(StoreError::Database("unexpected client state row".into())),
            }
        }
        for id in client_group_ids {
            if let Some((space_id, user_id, last_active)) = groups.get(id) {
                self.groups_last_active.insert(id.clone(), *last_active);
                let stored = (id.clone(), space_id.clone(), user_id.clone());
                state.groups.push(client_group_record(stored));
            } else if shared::client_group_collected::<Sqlite>(&mut conn, id).await? {
                state.collected_groups.push(id.clone());
            }
        }
        for id in client_ids {
            if let Some((client_group_id, last_mutation_id)) = clients.get(id) {
                state.clients.push(ClientRecord {
                    id: id.clone(),
                    client_group_id: client_group_id.clone(),
                    last_mutation_id: *last_mutation_id,
                });
            }
        }
        Ok(state)
    }

    async fn entry(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        shared::entry::<Sqlite>(&mut *self.member.conn().await?, &self.space, key).await
    }

    async fn scan_entries(
        &mut self,
        start: &str,
        exclusive: bool,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.member.conn().await?;
        shared::scan_entries::<Sqlite>(&mut conn, &self.space, start, exclusive, limit).await
    }

    async fn commit(self: Box<Self>, changes: PushChanges) -> Result<(), StoreError> {
        let SqlitePushTx {
            member,
            space,
            activity_granularity,
            groups_last_active,
        } = *self;
        let stale = stale_groups(&changes, &groups_last_active, activity_granularity);
        member
            .commit(move |conn, wrap| {
                Box::pin(async move {
                    let space = space.as_str();
                    write_changes(conn, space, &changes, &stale, activity_granularity, wrap).await
                })
            })
            .await
    }
}

/// `ids` as a JSON array, for `json_each`.
fn json_list(ids: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(ids).map_err(|error| StoreError::Database(error.to_string()))
}

/// The groups that pushed whose stored activity is older than the granularity: only those are
/// written (a busy group costs no statement per push).
fn stale_groups(
    changes: &PushChanges,
    last_active: &HashMap<String, i64>,
    granularity: i64,
) -> Vec<String> {
    changes
        .active_client_groups
        .iter()
        .filter(|id| {
            last_active
                .get(*id)
                .is_some_and(|at| *at < changes.active_at - granularity)
        })
        .cloned()
        .collect()
}

/// Sets the last activity of `group_ids` to `now` where it is older than `granularity`.
pub(super) async fn touch_groups(
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
