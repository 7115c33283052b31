//! A push's place in the single writer's transaction (`batch`: every space's lock, shared with
//! pushes to other spaces), its reads, and its writes (`writes`), activity only when stale.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Sqlite;
use sqlx::sqlite::SqliteConnection;

use super::batch::{Member, WriterBatches};
use super::reads::{EntryRead, StateRead};
use super::writes::write_changes;

use crate::protocol::SpaceId;
use crate::store::shared;
use crate::store::{ClientState, PushChanges, PushTx, StoreError};

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

#[async_trait]
impl PushTx for SqlitePushTx {
    async fn client_state(
        &mut self,
        client_group_ids: &[String],
        client_ids: &[String],
        read_ahead: &[String],
    ) -> Result<ClientState, StoreError> {
        let read = StateRead {
            space: self.space.as_str().to_owned(),
            groups: client_group_ids.to_vec(),
            clients: client_ids.to_vec(),
            read_ahead: read_ahead.to_vec(),
        };
        let (state, last_active) = self.member.client_state(read).await?;
        self.groups_last_active.extend(last_active);
        Ok(state)
    }

    async fn entry(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        let read = EntryRead(self.space.as_str().to_owned(), key.to_owned());
        self.member.entry(read).await
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
