//! A push's transaction on Postgres: its reads (one statement, locking the space when the push
//! is locked), and its commit: alone, or with other spaces' in a batch (`batch`) when unlocked.

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};

use super::batch::CommitBatcher;
use super::commit::commit_group;
use super::known::{HeldBase, KnownSpaces};
use super::reads::{EntryRead, SharedReads, StateRead, decode_rows};
use crate::protocol::SpaceId;
use crate::store::pg_functions::LOCK_SPACE_AND_READ_GROUPS;
use crate::store::shared::{self, client_group_record, to_space_version};
use crate::store::{ClientRecord, ClientState, MaybeNewGroup, PushChanges, PushTx, StoreError};

/// The statements calling the SQL functions, built once from their descriptions.
static LOCK_SPACE_AND_READ_GROUPS_SQL: LazyLock<String> =
    LazyLock::new(|| LOCK_SPACE_AND_READ_GROUPS.select_sql());

/// A push's connection: a transaction holding the space's lock, or none: each statement of an
/// unlocked push (its reads, its commit) takes a connection of its own, on which it may carry
/// other pushes' too (`reads`, `batch`, on the connections `kept`).
pub(super) enum PushConnection {
    Locked(Transaction<'static, Postgres>),
    Unlocked,
}

pub(super) struct PgPushTx {
    pub(super) conn: PushConnection,
    /// Where an unlocked push's statements that are not shared take their connection.
    pub(super) pool: PgPool,
    pub(super) space: SpaceId,
    pub(super) activity_granularity: i64,
    /// Where an unlocked push's commit goes, to share a transaction with other spaces'.
    pub(super) batcher: Arc<CommitBatcher>,
    /// Where an unlocked push's reads go, to share a statement with other pushes'.
    pub(super) reads: SharedReads,
    /// What the instance knows of spaces from its last reads and commits: an unlocked push's
    /// first read when it covers the read, and what its commit carries forward.
    pub(super) known: Arc<KnownSpaces>,
    /// What this push's first read was (when the instance keeps known states).
    pub(super) base: HeldBase,
}

/// `client_state`'s one row: the space's version, then groups, collected groups and clients as
/// `json_agg`s.
type ClientStateRow = (Option<i64>, Value, Value, Value);

impl PgPushTx {
    /// An unlocked push's first read: from what the instance knows of the space when that
    /// covers it, else one statement (maybe shared with other pushes'), added to what it knew.
    async fn unlocked_client_state(
        &mut self,
        client_group_ids: &[String],
        client_ids: &[String],
        read_ahead: &[String],
        maybe_new: &[MaybeNewGroup],
    ) -> Result<ClientState, StoreError> {
        let mut kept = self.known.take(&self.space);
        if let Some(known) = kept.take() {
            let asked = (client_group_ids, client_ids, read_ahead, maybe_new);
            match self.known.answer(known, asked) {
                Ok((state, base)) => {
                    self.base.hold(Some(base));
                    return Ok(state);
                }
                Err(known) => kept = Some(known),
            }
        }
        let read = StateRead {
            space: self.space.clone(),
            client_group_ids: client_group_ids.to_vec(),
            client_ids: client_ids.to_vec(),
            read_ahead: read_ahead.to_vec(),
        };
        let state = self.reads.states.read(read).await?;
        self.base.hold(self.known.learn(kept, &state, read_ahead));
        Ok(state)
    }
}

#[async_trait]
impl PushTx for PgPushTx {
    async fn client_state(
        &mut self,
        client_group_ids: &[String],
        client_ids: &[String],
        read_ahead: &[String],
    ) -> Result<ClientState, StoreError> {
        self.client_state_of(client_group_ids, client_ids, read_ahead, &[])
            .await
    }

    async fn client_state_of(
        &mut self,
        client_group_ids: &[String],
        client_ids: &[String],
        read_ahead: &[String],
        maybe_new: &[MaybeNewGroup],
    ) -> Result<ClientState, StoreError> {
        // One round trip either way (see the migrations that define the functions). Locked: lock,
        // then read (nothing read ahead: a statement's snapshot may predate its lock). Unlocked:
        // one snapshot with the keys read ahead, maybe shared with other pushes'; the commit
        // checks the version, so what was read ahead is what the push would have read. The
        // binds are LOCK_SPACE_AND_READ_GROUPS's arguments, in order.
        let tx = match &mut self.conn {
            PushConnection::Locked(tx) => {
                self.known.forget(&self.space);
                tx
            }
            PushConnection::Unlocked => {
                return self
                    .unlocked_client_state(client_group_ids, client_ids, read_ahead, maybe_new)
                    .await;
            }
        };
        let (version, groups, collected, clients): ClientStateRow =
            sqlx::query_as(LOCK_SPACE_AND_READ_GROUPS_SQL.as_str())
                .bind(self.space.as_str())
                .bind(client_group_ids)
                .bind(client_ids)
                .fetch_one(&mut **tx)
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
            entries: Vec::new(),
        })
    }

    async fn entry(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        match &mut self.conn {
            PushConnection::Locked(tx) => shared::entry::<Postgres>(tx, &self.space, key).await,
            PushConnection::Unlocked => {
                let read = EntryRead {
                    space: self.space.clone(),
                    key: key.to_owned(),
                };
                self.reads.entries.read(read).await
            }
        }
    }

    async fn scan_entries(
        &mut self,
        start: &str,
        exclusive: bool,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let space = &self.space;
        match &mut self.conn {
            PushConnection::Locked(tx) => {
                shared::scan_entries::<Postgres>(tx, space, start, exclusive, limit).await
            }
            PushConnection::Unlocked => {
                let mut conn = self.pool.acquire().await?;
                shared::scan_entries::<Postgres>(&mut conn, space, start, exclusive, limit).await
            }
        }
    }

    async fn commit(self: Box<Self>, changes: PushChanges) -> Result<(), StoreError> {
        let PgPushTx {
            conn,
            space,
            activity_granularity,
            batcher,
            known,
            mut base,
            pool: _,
            reads: _,
        } = *self;
        match conn {
            PushConnection::Unlocked => {
                let after = base.take().map(|base| KnownSpaces::after(base, &changes));
                let committed = batcher.commit(space.clone(), changes).await;
                match (&committed, after) {
                    (Ok(()), Some((state, _))) => known.keep(&space, state),
                    (Err(e), after) => {
                        let served = after.is_some_and(|(_, served)| served);
                        known.refused(&space, served, matches!(e, StoreError::Conflict(_)));
                    }
                    (Ok(()), None) => {}
                }
                committed
            }
            PushConnection::Locked(mut tx) => {
                commit_group(&mut tx, &space, changes, activity_granularity).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }
}
