//! Storage behind push and pull: the `Store` trait that Postgres and SQLite implement. Push and
//! pull logic never sees SQL; a store never sees protocol rules. The records it moves are in
//! `records`, its errors in `error`, the reconnecting retry in `retry`.

mod error;
pub mod migrations;
pub mod pg_connect;
pub mod pg_functions;
pub mod pg_session;
pub mod postgres;
mod records;
mod retry;
pub mod settings;
mod shared;
pub mod sqlite;
mod transfer;

use async_trait::async_trait;

pub use error::{ConnectionLoss, StoreError};
pub use records::{
    ACTIVITY_GRANULARITY_SECS, BatchLimits, ClientGroupRecord, ClientRecord, ClientState,
    ClientWrite, Collected, CommitBatchCounts, DELTA_BYTES_PER_ENTRY, EntryChange, EntryWrite,
    KnownCounts, MaybeNewGroup, PullChanges, PullSnapshot, PushChanges, activity_granularity,
    delta_bytes, unix_now,
};
pub(crate) use records::{to_i64, to_u64};
pub use retry::{RECONNECT_ATTEMPTS, reconnecting};
pub use transfer::{EntryPage, SpaceImport};

use crate::protocol::SpaceId;

/// The level of sqlx's line for every statement: `trace`, so that `RUST_LOG=debug` stays
/// readable; `RUST_LOG=sqlx::query=trace` asks for them. Slow statements still warn.
pub(crate) const STATEMENT_LOG_LEVEL: log::LevelFilter = log::LevelFilter::Trace;

/// A sqlx pool's figures under `name`.
pub(crate) fn pool_stats<DB: sqlx::Database>(
    name: &'static str,
    pool: &sqlx::Pool<DB>,
) -> PoolStats {
    PoolStats {
        name,
        size: pool.size(),
        idle: pool.num_idle(),
        max: pool.options().get_max_connections(),
    }
}

/// One connection pool: connections open (`size`), of which `idle`, and the most it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub name: &'static str,
    pub size: u32,
    pub idle: usize,
    pub max: u32,
}

/// A database that holds spaces. Implementations: `PgStore` (postgres.rs), `SqliteStore`
/// (sqlite.rs).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// "postgres" or "sqlite", for logs.
    fn kind(&self) -> &'static str;

    /// Its connection pools' figures, for `/metrics` (none for a store without a pool).
    fn pools(&self) -> Vec<PoolStats> {
        Vec::new()
    }

    /// How many commits carried the push groups of several spaces, and how many groups, for
    /// `/metrics` (none for a store that never batches).
    fn commit_batches(&self) -> CommitBatchCounts {
        CommitBatchCounts::default()
    }

    /// Starts a push (or a group of pushes) to `space` that holds no lock while it runs (a store
    /// may lock anyway): its commit writes only if the space's version is still the one
    /// [`PushTx::client_state`] read, and answers `StoreError::Conflict` otherwise. Dropping the
    /// result writes nothing.
    async fn begin_push(&self, space: &SpaceId) -> Result<Box<dyn PushTx>, StoreError>;

    /// Starts a push to `space` holding the space's write lock, which makes pushes to one space
    /// apply one after another, from here or at the latest from [`PushTx::client_state`] until
    /// the end: it cannot lose a race on the space. Dropping the result writes nothing.
    async fn begin_locked_push(&self, space: &SpaceId) -> Result<Box<dyn PushTx>, StoreError>;

    /// Reads a pull to be streamed, in one snapshot held until the stream ends: the whole space
    /// for `since: None` (a first pull), what changed after the cookie otherwise.
    async fn streamed_pull(
        &self,
        space: &SpaceId,
        client_group_id: &str,
        since: Option<u64>,
    ) -> Result<PullSnapshot, StoreError>;

    /// Reads what incremental pulls from `from > 0` by each of `client_group_ids` need, in one
    /// consistent snapshot. The entries are left out (`None`) when they would take more than
    /// `max_delta_bytes` (counted by [`delta_bytes`]).
    async fn pull_changes(
        &self,
        space: &SpaceId,
        client_group_ids: &[String],
        from: u64,
        max_delta_bytes: usize,
    ) -> Result<PullChanges, StoreError>;

    /// Takes garbage collection's lock, under which a pass runs its batches: one instance
    /// collects at a time. `None` when another instance sharing the database holds it.
    async fn lock_gc(&self) -> Result<Option<Box<dyn GcBatches>>, StoreError>;

    /// Raises the space's version and its compacted version to at least `to`, creating the
    /// space if needed: cookies below `to` the server may never have issued (its database was
    /// replaced) get a full reset, and later versions are above them.
    async fn raise_space_version(&self, space: &SpaceId, to: u64) -> Result<(), StoreError>;

    /// Gathers fresh planner statistics of the store's tables that changed much since their
    /// last ones, so that no plan depends on the database's autovacuum; answers the tables
    /// analyzed, or `None` when another instance is at it. Nothing to do by default.
    async fn refresh_statistics(&self) -> Result<Option<Vec<String>>, StoreError> {
        Ok(Some(Vec::new()))
    }

    /// Reads `space`'s version and at most `limit` of its live entries from key `start` on, in
    /// key order, from one snapshot; none after the first past which the entries hold
    /// `max_bytes` of keys and values.
    async fn read_entries(
        &self,
        space: &SpaceId,
        start: &str,
        limit: usize,
        max_bytes: usize,
    ) -> Result<EntryPage, StoreError>;

    /// Every space's id (every space ever written), in order.
    async fn space_ids(&self) -> Result<Vec<String>, StoreError>;

    /// Starts an import of spaces, in one transaction: pushes to a space it created wait for
    /// its commit.
    async fn begin_import(&self) -> Result<Box<dyn SpaceImport>, StoreError>;

    /// Answers whether the database is reachable and answering.
    async fn check_health(&self) -> Result<(), StoreError>;

    /// Closes connections; waits for the ones in use.
    async fn close(&self);
}

/// A push in progress: reads, then one `commit` of all writes.
#[async_trait]
pub trait PushTx: Send {
    /// Reads the space's version, the stored client groups among `client_group_ids` (and which
    /// of them garbage collection removed) and the stored clients among `client_ids`, together
    /// (taking the space's write lock first when the push is locked). Called once, first. A
    /// store may read `read_ahead`'s entries with them, in the same snapshot (the push's
    /// mutations are likely to read them); one that does not answers no entries.
    async fn client_state(
        &mut self,
        client_group_ids: &[String],
        client_ids: &[String],
        read_ahead: &[String],
    ) -> Result<ClientState, StoreError>;

    /// `client_state`, told which of the groups `maybe_new` names may be new. A store whose
    /// commit refuses to create a group that exists (or was collected), or to move a client of
    /// another group, may answer without reading, taking such a group and its clients as new
    /// when it knows nothing of them: their pushes commit, and the commit checks it.
    async fn client_state_of(
        &mut self,
        client_group_ids: &[String],
        client_ids: &[String],
        read_ahead: &[String],
        maybe_new: &[MaybeNewGroup],
    ) -> Result<ClientState, StoreError> {
        let _ = maybe_new;
        self.client_state(client_group_ids, client_ids, read_ahead)
            .await
    }

    /// The live value (json text) of `key` in this space, `None` if absent or deleted.
    async fn entry(&mut self, key: &str) -> Result<Option<String>, StoreError>;

    /// At most `limit` live entries `(key, json text)` of this space whose keys come after
    /// `start` (or are equal to it, unless `exclusive`), in the order of their UTF-8 bytes (the
    /// order of Unicode code points, which is Replicache's key order).
    async fn scan_entries(
        &mut self,
        start: &str,
        exclusive: bool,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError>;

    /// Writes `changes`, sets the space version to `changes.version` and commits, all or
    /// nothing. Returns `StoreError::Conflict`, writing nothing, when a concurrent writer got in
    /// the way: the space's version is no longer `changes.read_version`, a concurrent push
    /// claimed the same new client group or client first, or garbage collection removed a
    /// client group meanwhile. The caller runs the whole group again.
    async fn commit(self: Box<Self>, changes: PushChanges) -> Result<(), StoreError>;
}

/// Garbage collection's work, one batch at a time, under its lock (see [`Store::lock_gc`]). Each
/// batch is a short transaction of its own, so pushes and pulls never wait long behind one; the
/// caller decides how many batches to run and how to pace them.
#[async_trait]
pub trait GcBatches: Send {
    /// Deletes at most `limit` client groups last active before `inactive_before` (seconds since
    /// the Unix epoch), with their clients, remembering each group as collected at `now`.
    /// Answers the groups and clients removed (`client_groups` and `clients`).
    async fn remove_idle_client_groups(
        &mut self,
        now: i64,
        inactive_before: i64,
        limit: usize,
    ) -> Result<Collected, StoreError>;

    /// Forgets at most `limit` of the removed client groups collected before
    /// `collected_before`; answers how many it forgot.
    async fn forget_collected_groups(
        &mut self,
        collected_before: i64,
        limit: usize,
    ) -> Result<usize, StoreError>;

    /// Removes at most `limit` deletions (tombstones) written before `deleted_before` from one
    /// space, under that space's write lock, raising its compacted version to the highest
    /// version removed. `None` when no such deletion is left.
    async fn compact_tombstones(
        &mut self,
        deleted_before: i64,
        limit: usize,
    ) -> Result<Option<u64>, StoreError>;

    /// Releases the lock.
    async fn unlock(self: Box<Self>);
}
