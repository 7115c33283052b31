//! Storage behind push and pull: the `Store` trait that Postgres and SQLite implement, and the
//! records it moves. Push and pull logic never sees SQL; a store never sees protocol rules.

pub mod pg_session;
pub mod postgres;
pub mod settings;
mod shared;
pub mod sqlite;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::protocol::SpaceId;

/// A client group as stored: it belongs to the space and the user that created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientGroupRecord {
    pub id: String,
    pub space_id: String,
    pub user_id: String,
}

/// A client as stored: its group and the last mutation id the server applied for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    pub id: String,
    pub client_group_id: String,
    pub last_mutation_id: u64,
}

/// What a push group needs to know about its space, client groups and clients before applying
/// mutations, read together (under the space's lock when the push is [`Locking::Pessimistic`]).
#[derive(Debug, Default)]
pub struct ClientState {
    /// The space's version (0 for a new space); the group writes at the next one.
    pub space_version: u64,
    /// The stored groups among those asked for (unknown ids are absent).
    pub groups: Vec<ClientGroupRecord>,
    /// The groups among those asked for that garbage collection removed.
    pub collected_groups: Vec<String>,
    /// The stored clients among those asked for (unknown ids are absent).
    pub clients: Vec<ClientRecord>,
}

/// How a push keeps concurrent pushes to its space out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locking {
    /// No lock while mutators run: the commit writes only if the space's version is still the
    /// one read, in one statement that is its own transaction (fewest round trips). A push that
    /// lost the race gets `StoreError::Conflict` and runs again, pessimistically.
    Optimistic,
    /// The space's write lock from the first read to the commit: concurrent pushes wait, so the
    /// push cannot lose a race on the space.
    Pessimistic,
}

/// One key's new state: `Some(json text)` to put, `None` to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryChange {
    pub key: String,
    pub value: Option<String>,
}

/// One key's new state, written by the push that moved the space to `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryWrite {
    pub key: String,
    /// `Some(json text)` to put, `None` to delete.
    pub value: Option<String>,
    pub version: u64,
}

/// A client's new last mutation id, set by the push that moved the space to `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientWrite {
    pub client: ClientRecord,
    pub version: u64,
}

/// Everything one push group writes. Each push that changed something moves the space one
/// version on, so the group moves it from `read_version` to `version` in one commit.
#[derive(Debug, Default)]
pub struct PushChanges {
    /// The space's version once the group is committed.
    pub version: u64,
    /// The space's version `client_state` read: nothing is written if it moved since.
    pub read_version: u64,
    /// When the group was applied, in seconds since the Unix epoch: the last activity of its
    /// client groups (see [`ACTIVITY_GRANULARITY_SECS`]) and the time of its deletions.
    pub active_at: i64,
    /// Client groups created by the group's pushes.
    pub new_client_groups: Vec<ClientGroupRecord>,
    /// Stored client groups that pushed: their last activity moves.
    pub active_client_groups: Vec<String>,
    /// Clients whose lastMutationID moved (created ones included).
    pub clients: Vec<ClientWrite>,
    pub entries: Vec<EntryWrite>,
}

/// What a streamed pull (a first pull, or a delta too large to share) needs, read from one
/// consistent snapshot.
pub struct PullSnapshot {
    /// The space's version: the pull's new cookie (0 for a space never written).
    pub version: u64,
    /// Set when the cookie asked for is older than the space's compacted version: the snapshot
    /// holds the whole space (every live entry, every client of the group), as for a first pull.
    pub reset: bool,
    pub client_group: Option<ClientGroupRecord>,
    /// Set when garbage collection removed the client group: the pull is ClientStateNotFound.
    pub client_group_collected: bool,
    /// `(clientID, lastMutationID)` of the group's clients (changed after the cookie, if any).
    pub changed_clients: Vec<(String, u64)>,
    /// Every live entry (or every change after the cookie), streamed from the same snapshot so
    /// that a large space or delta is never held whole in memory.
    pub entries: BoxStream<'static, Result<EntryChange, StoreError>>,
}

/// What incremental pulls of several client groups of one space need, read in one snapshot
/// (identical concurrent pulls share it).
#[derive(Debug, Default)]
pub struct PullChanges {
    pub version: u64,
    /// The highest version of a deletion removed by compaction: a cookie below it cannot get a
    /// delta (see [`Store::compact_tombstones`]).
    pub compacted_version: u64,
    /// The stored groups among those asked for.
    pub client_groups: Vec<ClientGroupRecord>,
    /// The groups among those asked for that garbage collection removed.
    pub collected_client_groups: Vec<String>,
    /// `(client group, client, lastMutationID)` of clients changed after the cookie.
    pub changed_clients: Vec<(String, String, u64)>,
    /// Entries changed after the cookie (deletes included); `None` when they add up to more
    /// than the read's byte limit (see [`delta_bytes`]): each pull then streams its own.
    pub entries: Option<Vec<EntryChange>>,
}

/// How coarsely a client group's last activity is kept, at most: a push or pull writes it only
/// when the stored value is older than the granularity, so a busy group costs one write an hour,
/// not one a pull. A shorter REPLISYNC_CLIENT_TTL gets a finer one (see [`activity_granularity`]).
pub const ACTIVITY_GRANULARITY_SECS: i64 = 3600;

/// The activity granularity for a client TTL: a 24th of it, from 1 s up to an hour. Garbage
/// collection takes only groups idle past the whole TTL, so a group that synced within the
/// granularity is never collected.
pub fn activity_granularity(client_ttl: std::time::Duration) -> i64 {
    let secs = i64::try_from(client_ttl.as_secs() / 24).unwrap_or(i64::MAX);
    secs.clamp(1, ACTIVITY_GRANULARITY_SECS)
}

/// Now, in seconds since the Unix epoch: the unit of a client group's last activity.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}

/// How a garbage collection pass paces itself: `batch` rows per transaction, and after each
/// batch a pause `pause_factor` times as long as the batch took, so that a background pass
/// keeps at most 1/(1 + factor) of one database connection busy and pushes beside it barely
/// notice (0: no pauses, for `replisync gc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcPace {
    pub batch: usize,
    pub pause_factor: u32,
}

impl GcPace {
    /// Rows per batch, at least 1.
    pub fn batch(&self) -> usize {
        self.batch.max(1)
    }

    /// Waits after a batch that started at `batch_started`.
    pub async fn rest_after(&self, batch_started: std::time::Instant) {
        if self.pause_factor > 0 {
            tokio::time::sleep(batch_started.elapsed() * self.pause_factor).await;
        }
    }
}

/// What a store's garbage collection pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    /// Client groups removed, with their clients. Each is remembered for one more TTL, so that
    /// its next push or pull is answered ClientStateNotFound.
    pub client_groups: u64,
    /// Clients removed.
    pub clients: u64,
    /// Removed groups remembered for a whole TTL, now forgotten.
    pub forgotten_groups: u64,
    /// Deleted entries (tombstones) removed.
    pub tombstones: u64,
}

/// What a change counts against a shared delta's byte limit: its key and value, and a little for
/// the JSON around them.
pub fn delta_bytes(key: &str, value: Option<&str>) -> usize {
    key.len() + value.map_or(0, str::len) + DELTA_BYTES_PER_ENTRY
}

/// The JSON around one patch operation, roughly; the stores count it the same way.
pub const DELTA_BYTES_PER_ENTRY: usize = 32;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or has no free connection: worth retrying later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A pooled connection turned out dead (the database restarted, failed over, or ended the
    /// session). Run again at once: every attempt retires one dead connection.
    #[error("database connection lost: {0}")]
    Disconnected(String),
    /// A concurrent writer got in the way (serialization failure, deadlock, lost race on a
    /// new row). The whole push is retried inside the server; clients never see this.
    #[error("conflict with a concurrent transaction: {0}")]
    Conflict(String),
    /// A lock was not granted, or a statement did not finish, within the session's bounds
    /// (REPLISYNC_DB_LOCK_TIMEOUT_MS, REPLISYNC_DB_STATEMENT_TIMEOUT_MS): the transaction is
    /// rolled back, nothing written; the client retries later. Not retried inside the server,
    /// which would hold a connection for another whole wait.
    #[error("database wait timed out: {0}")]
    TimedOut(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Not the database: a JavaScript engine could not run the push's mutators (no context or
    /// runtime could be made). Nothing is written; worth retrying later.
    #[error("JavaScript engine unavailable: {0}")]
    EngineUnavailable(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                StoreError::Unavailable(error.to_string())
            }
            sqlx::Error::Io(_) => StoreError::Disconnected(error.to_string()),
            sqlx::Error::Database(db) if is_disconnect_code(db.code().as_deref()) => {
                StoreError::Disconnected(error.to_string())
            }
            sqlx::Error::Database(db) if is_conflict_code(db.code().as_deref()) => {
                StoreError::Conflict(error.to_string())
            }
            sqlx::Error::Database(db) if is_timeout_code(db.code().as_deref()) => {
                StoreError::TimedOut(error.to_string())
            }
            _ => StoreError::Database(error.to_string()),
        }
    }
}

/// Postgres: serialization failure, deadlock, unique violation. SQLite: busy, locked.
fn is_conflict_code(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("40001" | "40P01" | "23505" | "5" | "6" | "517" | "262")
    )
}

/// Postgres: lock timeout (55P03 lock_not_available) and statement timeout (57014
/// query_canceled).
fn is_timeout_code(code: Option<&str>) -> bool {
    matches!(code, Some("55P03" | "57014"))
}

/// Postgres: connection exceptions (class 08), the server shutting the session down (57P01
/// admin, 57P02 crash, 57P03 cannot connect now, 57P05 idle session timeout) and a session
/// ended for idling in a transaction (25P03).
fn is_disconnect_code(code: Option<&str>) -> bool {
    code.is_some_and(|code| code.starts_with("08") || code.starts_with("57P0") || code == "25P03")
}

/// How many times an operation that met a dead pooled connection is run again. Each failed
/// attempt retires one dead connection, so this covers a restart under the default pool size.
pub const RECONNECT_ATTEMPTS: u32 = 20;

/// An error that may say the operation met a dead pooled connection.
pub trait ConnectionLoss {
    /// The cause, when the operation failed only because its connection was dead.
    fn connection_lost(&self) -> Option<&str>;
}

impl ConnectionLoss for StoreError {
    fn connection_lost(&self) -> Option<&str> {
        match self {
            StoreError::Disconnected(cause) => Some(cause),
            _ => None,
        }
    }
}

/// Runs `operation`, again at once each time it meets a dead connection (up to
/// [`RECONNECT_ATTEMPTS`] times): a database restart costs no request an error. The operation
/// must be safe to run again (a read, or a whole push).
pub async fn reconnecting<T, E, F, Fut>(mut operation: F) -> Result<T, E>
where
    E: ConnectionLoss,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        let result = operation().await;
        match result
            .as_ref()
            .err()
            .and_then(ConnectionLoss::connection_lost)
        {
            Some(cause) if attempt < RECONNECT_ATTEMPTS => {
                attempt += 1;
                tracing::info!(attempt, %cause, "database connection lost; running again on another");
            }
            _ => return result,
        }
    }
}

/// A database that holds spaces. Implementations: [`postgres::PgStore`], [`sqlite::SqliteStore`].
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// "postgres" or "sqlite", for logs.
    fn kind(&self) -> &'static str;

    /// Starts a push (or a group of pushes) to `space`. With [`Locking::Pessimistic`] the
    /// space's write lock, which makes pushes to one space apply one after another, is held from
    /// here or at the latest from [`PushTx::client_state`] until the end. Dropping the result
    /// writes nothing.
    async fn begin_push(
        &self,
        space: &SpaceId,
        locking: Locking,
    ) -> Result<Box<dyn PushTx>, StoreError>;

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

    /// Deletes the client groups (and their clients) last active before `inactive_before`
    /// (seconds since the Unix epoch), a batch of groups per transaction, until none is left,
    /// remembering each as collected at `now`; then forgets the groups collected before
    /// `inactive_before`. `None` when another instance sharing the database is collecting.
    async fn collect_client_groups(
        &self,
        now: i64,
        inactive_before: i64,
        pace: GcPace,
    ) -> Result<Option<Collected>, StoreError>;

    /// Removes the deletions (tombstones) written before `deleted_before` (seconds since the
    /// Unix epoch), a batch per transaction under their space's write lock, raising each space's
    /// compacted version to the highest version removed. `None` when another instance sharing
    /// the database is collecting already.
    async fn compact_tombstones(
        &self,
        deleted_before: i64,
        pace: GcPace,
    ) -> Result<Option<u64>, StoreError>;

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
    /// (taking the space's write lock first when pessimistic). Called once, first.
    async fn client_state(
        &mut self,
        client_group_ids: &[String],
        client_ids: &[String],
    ) -> Result<ClientState, StoreError>;

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

/// Converts a stored BIGINT to the protocol's unsigned integers.
pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative {what}: {value}")))
}

/// Converts the protocol's unsigned integers to a BIGINT.
pub(crate) fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{value} does not fit a BIGINT")))
}
