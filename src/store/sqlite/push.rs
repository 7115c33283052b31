//! A push's place in the single writer's transaction (`batch`: every space's lock, shared with
//! pushes to other spaces), its reads one by one, and its writes, activity only when stale.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Sqlite;
use sqlx::sqlite::SqliteConnection;

use super::batch::{Member, WriterBatches};

use crate::protocol::SpaceId;
use crate::store::shared::{self, client_group_record, to_lmid, to_space_version};
use crate::store::{
    ClientRecord, ClientState, ClientWrite, PushChanges, PushTx, StoreError, to_i64,
};

/// One push's place in the writer's transaction, until it commits or is dropped.
pub(super) struct SqlitePushTx {
    member: Member,
    space: SpaceId,
    version: u64,
    activity_granularity: i64,
    /// The stored groups' last activity, read with them: the commit writes it only when stale.
    groups_last_active: HashMap<String, i64>,
}

impl SqlitePushTx {
    /// Joins the writer's transaction and reads the space's version.
    pub(super) async fn begin(
        batches: &Arc<WriterBatches>,
        space: &SpaceId,
        activity_granularity: i64,
    ) -> Result<SqlitePushTx, StoreError> {
        let member = batches.join().await?;
        let version = space_version(&mut *member.conn().await?, space).await?;
        Ok(SqlitePushTx {
            member,
            space: space.clone(),
            version,
            activity_granularity,
            groups_last_active: HashMap::new(),
        })
    }
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
        let mut conn = self.member.conn().await?;
        for id in client_group_ids {
            let row = sqlx::query_as::<_, (String, String, i64)>(
                "SELECT space_id, user_id, last_active FROM replisync_client_groups WHERE id = ?1",
            )
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some((space_id, user_id, last_active)) = row {
                self.groups_last_active.insert(id.clone(), last_active);
                state
                    .groups
                    .push(client_group_record((id.clone(), space_id, user_id)));
            } else if shared::client_group_collected::<Sqlite>(&mut conn, id).await? {
                state.collected_groups.push(id.clone());
            }
        }
        for id in client_ids {
            state.clients.extend(stored_client(&mut conn, id).await?);
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
            ..
        } = *self;
        let stale = stale_groups(&changes, &groups_last_active, activity_granularity);
        member
            .commit(move |conn| {
                Box::pin(write_changes(
                    conn,
                    space,
                    changes,
                    stale,
                    activity_granularity,
                ))
            })
            .await
    }
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

/// Writes one push group's changes to `space` and moves its version.
async fn write_changes(
    conn: &mut SqliteConnection,
    space: SpaceId,
    changes: PushChanges,
    stale: Vec<String>,
    activity_granularity: i64,
) -> Result<(), StoreError> {
    let space = space.as_str();
    let version = to_i64(changes.version)?;
    for group in &changes.new_client_groups {
        sqlx::query(
            "INSERT INTO replisync_client_groups (id, space_id, user_id, last_active)
             VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(&group.id)
        .bind(space)
        .bind(&group.user_id)
        .bind(changes.active_at)
        .execute(&mut *conn)
        .await?;
    }
    if !stale.is_empty() {
        touch_groups(conn, &stale, changes.active_at, activity_granularity).await?;
    }
    for ClientWrite { client, version } in &changes.clients {
        // A client of another group is left alone: a push of another space in the same
        // transaction claimed the id after this push read it. This push runs again.
        let written = sqlx::query(
            "INSERT INTO replisync_clients
                 (id, client_group_id, last_mutation_id, last_modified_version)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO UPDATE
                 SET last_mutation_id = excluded.last_mutation_id,
                     last_modified_version = excluded.last_modified_version
                 WHERE replisync_clients.client_group_id = excluded.client_group_id",
        )
        .bind(&client.id)
        .bind(&client.client_group_id)
        .bind(to_i64(client.last_mutation_id)?)
        .bind(to_i64(*version)?)
        .execute(&mut *conn)
        .await?;
        if written.rows_affected() != 1 {
            return Err(StoreError::Conflict(
                "a client id was claimed by another client group".into(),
            ));
        }
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
        .bind(space)
        .bind(&entry.key)
        .bind(&entry.value)
        .bind(entry.value.is_none())
        .bind(to_i64(entry.version)?)
        .bind(changes.active_at)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "INSERT INTO replisync_spaces (id, version) VALUES (?1, ?2)
         ON CONFLICT (id) DO UPDATE SET version = excluded.version",
    )
    .bind(space)
    .bind(version)
    .execute(&mut *conn)
    .await?;
    Ok(())
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
