//! Read batching on Postgres: the reads of unlocked pushes (their client state, the entries their
//! mutators get) that come while the same kind of read is in flight share the next statement.
//!
//! A read that finds none of its kind in flight runs at once, alone (no added latency when idle).
//! Otherwise it waits, and when the read ahead of it is done, everything that waits (up to
//! `max_reads`) goes in one statement. A lane runs one statement at a time, on a connection the
//! store keeps for its batchers (`kept`): nothing waits for a shared read while it holds a
//! connection. Unlocked reads never ran in one snapshot with the rest of their push (the commit
//! checks the space's version), so a batch's snapshot is as good as each push's own. A shared read
//! that fails for one read's data is run again one read at a time, so only that read fails.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use serde_json::Value;
use sqlx::PgConnection;
use tokio::sync::oneshot;

use super::kept::KeptConnections;
use crate::protocol::SpaceId;
use crate::store::pg_functions::{READ_GROUPS_AND_ENTRIES_OF_SPACES, READ_GROUPS_OF_SPACES};
use crate::store::shared::{client_group_record, to_space_version};
use crate::store::{ClientGroupRecord, ClientRecord, ClientState, StoreError};

static READ_GROUPS_OF_SPACES_SQL: LazyLock<String> =
    LazyLock::new(|| READ_GROUPS_OF_SPACES.select_sql());

/// A read that the pushes of several spaces can share one statement for.
#[async_trait]
pub(super) trait SharedRead: Send + Sync + Sized + 'static {
    type Answer: Send + 'static;

    /// Runs `reads` in one statement on `conn`: one answer per read, in order.
    async fn run(conn: &mut PgConnection, reads: &[Self]) -> Result<Vec<Self::Answer>, StoreError>;
}

/// The reads of one kind: whether one is in flight, and those waiting for the next statement.
pub(super) struct Lane<R: SharedRead> {
    conns: Arc<KeptConnections>,
    max_reads: usize,
    queue: Mutex<LaneQueue<R>>,
    statements: AtomicU64,
    batched: AtomicU64,
}

struct LaneQueue<R: SharedRead> {
    busy: bool,
    waiting: Vec<Waiting<R>>,
}

/// A read waiting for the next statement, and where its answer goes.
type Waiting<R> = (
    R,
    oneshot::Sender<Result<<R as SharedRead>::Answer, StoreError>>,
);

impl<R: SharedRead> std::fmt::Debug for Lane<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("max_reads", &self.max_reads)
            .finish_non_exhaustive()
    }
}

impl<R: SharedRead> Lane<R> {
    /// A lane whose statements carry at most `max_reads` reads (1: every read runs alone).
    pub(super) fn new(conns: Arc<KeptConnections>, max_reads: usize) -> Arc<Self> {
        Arc::new(Lane {
            conns,
            max_reads,
            queue: Mutex::new(LaneQueue {
                busy: false,
                waiting: Vec::new(),
            }),
            statements: AtomicU64::default(),
            batched: AtomicU64::default(),
        })
    }

    /// Statements that carried several reads, the reads they carried, and the reads waiting
    /// now.
    pub(super) fn counts(&self) -> (u64, u64, u64) {
        let waiting = self.queue().waiting.len() as u64;
        (
            self.statements.load(Ordering::Relaxed),
            self.batched.load(Ordering::Relaxed),
            waiting,
        )
    }

    /// Reads `read`: at once when no read of this kind is in flight, else in the next shared
    /// statement.
    pub(super) async fn read(self: &Arc<Self>, read: R) -> Result<R::Answer, StoreError> {
        if self.max_reads <= 1 {
            return self.run_one(&read).await; // sharing is off
        }
        let answer = {
            let mut queue = self.queue();
            if queue.busy {
                let (sender, answer) = oneshot::channel();
                queue.waiting.push((read, sender));
                Err(answer)
            } else {
                queue.busy = true;
                Ok(read)
            }
        };
        match answer {
            Ok(read) => {
                let _turn = Turn(Arc::clone(self));
                self.run_one(&read).await
            }
            Err(answer) => answer.await.unwrap_or_else(|_| Err(dropped_read())),
        }
    }

    /// Ends a read in flight: the lane is idle again, or a task runs what waits.
    fn hand_on(self: &Arc<Self>) {
        let mut queue = self.queue();
        if queue.waiting.is_empty() {
            queue.busy = false;
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // The process is stopping: the waiting reads are answered with an error.
            queue.waiting.clear();
            queue.busy = false;
            return;
        };
        drop(queue);
        let runner = Arc::clone(self);
        runtime.spawn(async move {
            let _turn = Turn(Arc::clone(&runner));
            runner.run_waiting().await;
        });
    }

    /// Runs one statement for the reads waiting now (the lane stays busy until it is done).
    async fn run_waiting(&self) {
        let waiting: Vec<_> = {
            let mut queue = self.queue();
            let take = queue.waiting.len().min(self.max_reads);
            queue.waiting.drain(..take).collect()
        };
        let (reads, senders): (Vec<R>, Vec<_>) = waiting.into_iter().unzip();
        if reads.len() > 1 {
            self.statements.fetch_add(1, Ordering::Relaxed);
            self.batched
                .fetch_add(reads.len() as u64, Ordering::Relaxed);
        }
        let answers = match self.run(&reads).await {
            Err(error) if reads.len() > 1 && error.may_be_one_callers_fault() => {
                tracing::info!(%error, reads = reads.len(), "shared read failed; reading each alone");
                Ok(self.run_each_alone(&reads).await)
            }
            shared => shared.map(|answers| answers.into_iter().map(Ok).collect()),
        };
        match answers {
            Ok(answers) if answers.len() == senders.len() => {
                for (sender, answer) in senders.into_iter().zip(answers) {
                    let _ = sender.send(answer); // the push may have stopped waiting
                }
            }
            Ok(_) => answer_all(senders, &missing_answer()),
            Err(error) => answer_all(senders, &error),
        }
    }

    /// Each of `reads` in a statement of its own, so that only a read at fault fails.
    async fn run_each_alone(&self, reads: &[R]) -> Vec<Result<R::Answer, StoreError>> {
        let mut answers = Vec::with_capacity(reads.len());
        for read in reads {
            answers.push(self.run_one(read).await);
        }
        answers
    }

    /// Runs `read` in a statement of its own.
    async fn run_one(&self, read: &R) -> Result<R::Answer, StoreError> {
        let mut answers = self.run(std::slice::from_ref(read)).await?;
        answers.pop().ok_or_else(missing_answer)
    }

    /// Runs `reads` in one statement on the lane's connection.
    async fn run(&self, reads: &[R]) -> Result<Vec<R::Answer>, StoreError> {
        let mut conn = self.conns.take().await?;
        let answers = R::run(&mut conn, reads).await;
        self.conns.keep(conn, answers.as_ref().err());
        answers
    }

    fn queue(&self) -> MutexGuard<'_, LaneQueue<R>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn answer_all<A>(senders: Vec<oneshot::Sender<Result<A, StoreError>>>, error: &StoreError) {
    for sender in senders {
        let _ = sender.send(Err(error.clone()));
    }
}

/// A read in flight; when it ends (or is dropped), what waits goes next.
struct Turn<R: SharedRead>(Arc<Lane<R>>);

impl<R: SharedRead> Drop for Turn<R> {
    fn drop(&mut self) {
        self.0.hand_on();
    }
}

fn missing_answer() -> StoreError {
    StoreError::Corrupt("a shared read answered fewer reads than it carried".into())
}

fn dropped_read() -> StoreError {
    StoreError::Unavailable("the shared read was dropped (the server is stopping)".into())
}

/// A push's first read: its space's version, the client groups and clients it names, and the
/// entries its mutations are likely to read.
pub(super) struct StateRead {
    pub space: SpaceId,
    pub client_group_ids: Vec<String>,
    pub client_ids: Vec<String>,
    pub read_ahead: Vec<String>,
}

/// `READ_GROUPS_OF_SPACES`'s one row: each space with its version, then the groups, collected
/// groups and clients of every read, as `json_agg`s.
type StatesRow = (Value, Value, Value, Value);

/// [`StatesRow`] and the entries read ahead, each `[ordinal, value]` (only those present).
type StatesAndEntriesRow = (Value, Value, Value, Value, Value);

static READ_GROUPS_AND_ENTRIES_SQL: LazyLock<String> =
    LazyLock::new(|| READ_GROUPS_AND_ENTRIES_OF_SPACES.select_sql());

/// Runs the first reads of `reads` in one statement, with the entries they read ahead.
async fn read_states(
    conn: &mut PgConnection,
    reads: &[StateRead],
) -> Result<(StatesRow, Vec<Vec<(String, Option<String>)>>), StoreError> {
    let spaces: Vec<&str> = reads.iter().map(|r| r.space.as_str()).collect();
    let groups: Vec<&str> = reads
        .iter()
        .flat_map(|r| &r.client_group_ids)
        .map(String::as_str)
        .collect();
    let clients: Vec<&str> = reads
        .iter()
        .flat_map(|r| &r.client_ids)
        .map(String::as_str)
        .collect();
    if reads.iter().all(|r| r.read_ahead.is_empty()) {
        // The binds are READ_GROUPS_OF_SPACES's arguments, in order.
        let row: StatesRow = sqlx::query_as(READ_GROUPS_OF_SPACES_SQL.as_str())
            .bind(&spaces)
            .bind(&groups)
            .bind(&clients)
            .fetch_one(conn)
            .await?;
        return Ok((row, reads.iter().map(|_| Vec::new()).collect()));
    }
    let (entry_spaces, keys): (Vec<&str>, Vec<&str>) = reads
        .iter()
        .flat_map(|r| {
            r.read_ahead
                .iter()
                .map(|key| (r.space.as_str(), key.as_str()))
        })
        .unzip();
    // The binds are READ_GROUPS_AND_ENTRIES_OF_SPACES's arguments, in order.
    let (versions, stored_groups, collected, stored_clients, found): StatesAndEntriesRow =
        sqlx::query_as(READ_GROUPS_AND_ENTRIES_SQL.as_str())
            .bind(&spaces)
            .bind(&groups)
            .bind(&clients)
            .bind(&entry_spaces)
            .bind(&keys)
            .fetch_one(conn)
            .await?;
    let mut values: Vec<Option<String>> = vec![None; keys.len()];
    for (ordinal, value) in decode_rows(found, |row: (i64, Option<String>)| row)? {
        let index = usize::try_from(ordinal - 1).ok();
        if let Some(slot) = index.and_then(|i| values.get_mut(i)) {
            *slot = value;
        }
    }
    let mut values = values.into_iter();
    let entries = reads
        .iter()
        .map(|r| {
            r.read_ahead
                .iter()
                .map(|key| (key.clone(), values.next().flatten()))
                .collect()
        })
        .collect();
    Ok((
        (versions, stored_groups, collected, stored_clients),
        entries,
    ))
}

#[async_trait]
impl SharedRead for StateRead {
    type Answer = ClientState;

    async fn run(conn: &mut PgConnection, reads: &[Self]) -> Result<Vec<ClientState>, StoreError> {
        let ((versions, stored_groups, collected, stored_clients), entries) =
            read_states(conn, reads).await?;
        let versions: HashMap<String, i64> =
            decode_rows(versions, |(space, version): (String, i64)| (space, version))?
                .into_iter()
                .collect();
        let stored_groups: HashMap<String, ClientGroupRecord> =
            decode_rows(stored_groups, client_group_record)?
                .into_iter()
                .map(|g| (g.id.clone(), g))
                .collect();
        let collected: HashSet<String> = decode_rows(collected, |id: String| id)?
            .into_iter()
            .collect();
        let stored_clients: HashMap<String, ClientRecord> =
            decode_rows(stored_clients, |(id, group, last_mutation_id)| {
                ClientRecord {
                    id,
                    client_group_id: group,
                    last_mutation_id,
                }
            })?
            .into_iter()
            .map(|c| (c.id.clone(), c))
            .collect();
        // Each read gets the rows of the ids it asked for: lookups, whatever the batch holds.
        reads
            .iter()
            .zip(entries)
            .map(|(read, entries)| {
                let groups = &read.client_group_ids;
                Ok(ClientState {
                    space_version: to_space_version(versions.get(read.space.as_str()).copied())?,
                    groups: groups
                        .iter()
                        .filter_map(|id| stored_groups.get(id))
                        .cloned()
                        .collect(),
                    collected_groups: groups
                        .iter()
                        .filter(|id| collected.contains(*id))
                        .cloned()
                        .collect(),
                    clients: read
                        .client_ids
                        .iter()
                        .filter_map(|id| stored_clients.get(id))
                        .cloned()
                        .collect(),
                    entries,
                })
            })
            .collect()
    }
}

/// A mutation's `get`: one live entry of a space.
pub(super) struct EntryRead {
    pub space: SpaceId,
    pub key: String,
}

#[async_trait]
impl SharedRead for EntryRead {
    type Answer = Option<String>;

    async fn run(
        conn: &mut PgConnection,
        reads: &[Self],
    ) -> Result<Vec<Option<String>>, StoreError> {
        if let [read] = reads {
            let value = crate::store::shared::entry::<sqlx::Postgres>(conn, &read.space, &read.key);
            return Ok(vec![value.await?]);
        }
        let spaces: Vec<&str> = reads.iter().map(|r| r.space.as_str()).collect();
        let keys: Vec<&str> = reads.iter().map(|r| r.key.as_str()).collect();
        let found: Vec<(i64, Option<String>)> = sqlx::query_as(
            "SELECT r.i, e.value
             FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS r(space_id, key, i)
             JOIN replisync_entries e ON e.space_id = r.space_id AND e.key = r.key
             WHERE NOT e.deleted",
        )
        .bind(&spaces)
        .bind(&keys)
        .fetch_all(conn)
        .await?;
        let mut answers = vec![None; reads.len()];
        for (ordinal, value) in found {
            let index = usize::try_from(ordinal - 1).ok();
            if let Some(answer) = index.and_then(|i| answers.get_mut(i)) {
                *answer = value;
            }
        }
        Ok(answers)
    }
}

/// The lanes of one Postgres store's shared reads.
#[derive(Debug, Clone)]
pub(super) struct SharedReads {
    pub states: Arc<Lane<StateRead>>,
    pub entries: Arc<Lane<EntryRead>>,
}

impl SharedReads {
    /// Statements that carried several reads, the reads they carried, and the reads waiting
    /// now, of both lanes.
    pub(super) fn counts(&self) -> (u64, u64, u64) {
        let (states, state_reads, states_waiting) = self.states.counts();
        let (entries, entry_reads, entries_waiting) = self.entries.counts();
        (
            states + entries,
            state_reads + entry_reads,
            states_waiting + entries_waiting,
        )
    }

    /// Lanes whose statements carry at most `max_reads` reads each (1: no read is shared).
    pub(super) fn new(conns: &Arc<KeptConnections>, max_reads: usize) -> Self {
        SharedReads {
            states: Lane::new(Arc::clone(conns), max_reads),
            entries: Lane::new(Arc::clone(conns), max_reads),
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
