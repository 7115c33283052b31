//! The records a store moves: what push and pull read and write, what garbage collection
//! removed, and the conversions and clock they share. Plain data; no SQL and no protocol rules.

use std::time::Duration;

use futures::stream::BoxStream;

use super::error::StoreError;

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
/// mutations, read together (under the space's lock when the push is locked).
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
    /// Keys read ahead with the rest (those asked for, when the store reads ahead in this
    /// snapshot), each with its stored value (json text; `None`: absent or deleted).
    pub entries: Vec<(String, Option<String>)>,
}

/// A client group a push group names that may be new: each of its clients' first mutation there
/// is id 1 and no other group's push names them, so were it new, its pushes would apply a
/// mutation and commit (see `PushTx::client_state_of`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaybeNewGroup {
    pub id: String,
    pub client_ids: Vec<String>,
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

impl std::fmt::Debug for PullSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullSnapshot")
            .field("version", &self.version)
            .field("reset", &self.reset)
            .field("client_group", &self.client_group)
            .field("client_group_collected", &self.client_group_collected)
            .field("changed_clients", &self.changed_clients)
            .finish_non_exhaustive()
    }
}

/// What incremental pulls of several client groups of one space need, read in one snapshot
/// (identical concurrent pulls share it).
#[derive(Debug, Default)]
pub struct PullChanges {
    pub version: u64,
    /// The highest version of a deletion removed by compaction: a cookie below it cannot get a
    /// delta (see `GcBatches::compact_tombstones`).
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

/// Converts a stored BIGINT to the protocol's unsigned integers.
pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative {what}: {value}")))
}

/// Converts the protocol's unsigned integers to a BIGINT.
pub(crate) fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{value} does not fit a BIGINT")))
}

/// How large a commit batch may grow, and how long it may wait (see `postgres::batch` and
/// `sqlite::batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most push groups in one commit; 1 commits each alone.
    pub max_pushes: usize,
    /// How long a batch waits before it commits: for the commit ahead of it (Postgres), or for
    /// more pushes to join the open transaction (SQLite).
    pub max_age: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_pushes: 64,
            max_age: Duration::from_millis(5),
        }
    }
}

/// Commits that carried the push groups of several spaces (`batches`), and the groups they
/// carried (`batched_groups`), since the store opened; the groups that wait for a batch's commit
/// now (`waiting`); and on Postgres, the statements that carried the reads of several pushes
/// (`read_batches`), the reads they carried (`batched_reads`), and the reads waiting for the next
/// such statement now (`reads_waiting`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitBatchCounts {
    pub batches: u64,
    pub batched_groups: u64,
    pub waiting: u64,
    pub read_batches: u64,
    pub batched_reads: u64,
    pub reads_waiting: u64,
    /// Pushes' first reads answered from what the instance knew (Postgres).
    pub known: KnownCounts,
}

/// Pushes' first reads answered from what a Postgres store knew of their space (no statement),
/// those of them whose commit found the space moved by another writer, and the bytes kept.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KnownCounts {
    pub served: u64,
    pub stale: u64,
    pub bytes: u64,
}
