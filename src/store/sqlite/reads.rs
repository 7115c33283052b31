//! The reads of the pushes that share the writer's transaction, combined: whoever takes the
//! connection runs every read of its kind that waits for it in one statement (one call to the
//! writer's thread), and the others find their answers ready when their turn comes.
//!
//! The ids travel as JSON arrays (SQLite has no array parameters). Reads see the transaction as
//! it is when their statement runs, as they would one by one at that moment: pushes to one space
//! never meet in a transaction, and a push writes only when it is done reading.

use std::collections::HashMap;
use std::future::Future;
use std::ops::DerefMut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use serde::Serialize;
use sqlx::sqlite::SqliteConnection;
use tokio::sync::oneshot;
use tokio::sync::oneshot::error::TryRecvError;

use crate::store::shared::{client_group_record, to_lmid, to_space_version};
use crate::store::{ClientRecord, ClientState, StoreError};

/// A read that the members of a transaction can share one statement for.
#[async_trait]
pub(super) trait CombinedRead: Clone + Send + Sync + Sized + 'static {
    type Answer: Send + 'static;

    /// Runs `reads` in one statement: one answer per read, in order.
    async fn run(
        conn: &mut SqliteConnection,
        reads: &[Self],
    ) -> Result<Vec<Self::Answer>, StoreError>;
}

/// Statements that carried several members' reads, and the reads they carried (for `/metrics`).
#[derive(Debug, Default)]
pub(super) struct ReadCounts {
    pub statements: AtomicU64,
    pub reads: AtomicU64,
}

/// The reads of one kind waiting for the transaction's connection.
pub(super) struct Combined<R: CombinedRead> {
    waiting: Mutex<Vec<Waiting<R>>>,
}

type Waiting<R> = (
    R,
    oneshot::Sender<Result<<R as CombinedRead>::Answer, StoreError>>,
);

impl<R: CombinedRead> Default for Combined<R> {
    fn default() -> Self {
        Combined {
            waiting: Mutex::new(Vec::new()),
        }
    }
}

impl<R: CombinedRead> Combined<R> {
    /// Reads `read` on the transaction's connection, which `take_conn` waits for: with every
    /// read of its kind waiting when it has it, unless another member read it first.
    pub(super) async fn read<C, F>(
        &self,
        take_conn: F,
        read: R,
        counts: &ReadCounts,
    ) -> Result<R::Answer, StoreError>
    where
        C: DerefMut<Target = SqliteConnection>,
        F: Future<Output = Result<C, StoreError>>,
    {
        let (sender, mut answer) = oneshot::channel();
        self.waiting().push((read.clone(), sender));
        let mut conn = take_conn.await?;
        match answer.try_recv() {
            Ok(answered) => return answered,
            // The member that took it went away before answering: read it alone.
            Err(TryRecvError::Closed) => return run_alone(&mut conn, &read).await,
            Err(TryRecvError::Empty) => {} // still waiting here: this member reads for all
        }
        let (reads, senders): (Vec<R>, Vec<_>) =
            std::mem::take(&mut *self.waiting()).into_iter().unzip();
        if reads.len() > 1 {
            counts.statements.fetch_add(1, Ordering::Relaxed);
            counts
                .reads
                .fetch_add(reads.len() as u64, Ordering::Relaxed);
        }
        let answers = match R::run(&mut conn, &reads).await {
            Ok(answers) if answers.len() == reads.len() => answers.into_iter().map(Ok).collect(),
            Ok(_) => failed_all(&missing_answer(), reads.len()),
            // A row of one read that does not decode fails only that read.
            Err(error) if reads.len() > 1 && error.may_be_one_callers_fault() => {
                let mut each = Vec::with_capacity(reads.len());
                for read in &reads {
                    each.push(run_alone(&mut conn, read).await);
                }
                each
            }
            Err(error) => failed_all(&error, reads.len()),
        };
        for (sender, answer) in senders.into_iter().zip(answers) {
            let _ = sender.send(answer); // its push may have gone away
        }
        drop(conn);
        answer.try_recv().unwrap_or_else(|_| Err(missing_answer()))
    }

    /// Reads waiting for the connection now.
    pub(super) fn waiting_now(&self) -> usize {
        self.waiting().len()
    }

    fn waiting(&self) -> MutexGuard<'_, Vec<Waiting<R>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `count` answers, each `error`.
fn failed_all<A>(error: &StoreError, count: usize) -> Vec<Result<A, StoreError>> {
    (0..count).map(|_| Err(error.clone())).collect()
}

/// `read` in a statement of its own.
async fn run_alone<R: CombinedRead>(
    conn: &mut SqliteConnection,
    read: &R,
) -> Result<R::Answer, StoreError> {
    let mut alone = R::run(conn, std::slice::from_ref(read)).await?;
    alone.pop().ok_or_else(missing_answer)
}

fn missing_answer() -> StoreError {
    StoreError::Database("a combined read returned no answer for a push".into())
}

/// A push's first read: its space's version, and the client groups and clients it names.
#[derive(Debug, Clone, Serialize)]
pub(super) struct StateRead {
    #[serde(rename = "s")]
    pub space: String,
    #[serde(rename = "g")]
    pub groups: Vec<String>,
    #[serde(rename = "c")]
    pub clients: Vec<String>,
    /// Keys its mutators are likely to read, read with the rest.
    #[serde(rename = "k")]
    pub read_ahead: Vec<String>,
}

/// Rows of `(read, kind, id, a, b, number)`: kind 0 the version, 1 a stored group (space, user,
/// last activity), 2 a stored client (group, last mutation id), 3 a group garbage collection
/// removed, 4 a live entry read ahead (key, value).
const STATE_READS: &str = "
    SELECT r.key, 0, NULL, NULL, NULL,
           (SELECT version FROM replisync_spaces WHERE id = json_extract(r.value, '$.s'))
    FROM json_each(?1) r
    UNION ALL
    SELECT r.key, 1, g.id, g.space_id, g.user_id, g.last_active
    FROM json_each(?1) r, json_each(r.value, '$.g') x
    JOIN replisync_client_groups g ON g.id = x.value
    UNION ALL
    SELECT r.key, 2, c.id, c.client_group_id, NULL, c.last_mutation_id
    FROM json_each(?1) r, json_each(r.value, '$.c') x
    JOIN replisync_clients c ON c.id = x.value
    UNION ALL
    SELECT r.key, 3, k.id, NULL, NULL, NULL
    FROM json_each(?1) r, json_each(r.value, '$.g') x
    JOIN replisync_collected_client_groups k ON k.id = x.value
    UNION ALL
    SELECT r.key, 4, e.key, e.value, NULL, NULL
    FROM json_each(?1) r, json_each(r.value, '$.k') x
    JOIN replisync_entries e ON e.space_id = json_extract(r.value, '$.s') AND e.key = x.value
    WHERE NOT e.deleted";

type StateRow = (
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
);

/// A push's client state, and its stored groups' last activity.
pub(super) type StateAnswer = (ClientState, HashMap<String, i64>);

#[async_trait]
impl CombinedRead for StateRead {
    type Answer = StateAnswer;

    async fn run(
        conn: &mut SqliteConnection,
        reads: &[StateRead],
    ) -> Result<Vec<StateAnswer>, StoreError> {
        let rows: Vec<StateRow> = sqlx::query_as(STATE_READS)
            .bind(json(reads)?)
            .fetch_all(&mut *conn)
            .await?;
        let mut found: Vec<Found> = (0..reads.len()).map(|_| Found::default()).collect();
        for (read, kind, id, a, b, number) in rows {
            let found = usize::try_from(read)
                .ok()
                .and_then(|read| found.get_mut(read))
                .ok_or_else(|| unexpected_row("client state"))?;
            found.add(kind, id, a, b, number)?;
        }
        Ok(reads
            .iter()
            .zip(found)
            .map(|(read, found)| found.answer(read))
            .collect())
    }
}

/// What the statement found for one read.
#[derive(Default)]
struct Found {
    version: u64,
    groups: HashMap<String, (String, String, i64)>,
    clients: HashMap<String, (String, u64)>,
    collected: Vec<String>,
    entries: HashMap<String, String>,
}

impl Found {
    fn add(
        &mut self,
        kind: i64,
        id: Option<String>,
        a: Option<String>,
        b: Option<String>,
        number: Option<i64>,
    ) -> Result<(), StoreError> {
        match (kind, id, a, b, number) {
            (0, _, _, _, version) => self.version = to_space_version(version)?,
            (1, Some(id), Some(space_id), Some(user_id), Some(last_active)) => {
                self.groups.insert(id, (space_id, user_id, last_active));
            }
            (2, Some(id), Some(group), _, Some(lmid)) => {
                self.clients.insert(id, (group, to_lmid(lmid)?));
            }
            (3, Some(id), _, _, _) => self.collected.push(id),
            (4, Some(key), Some(value), _, _) => {
                self.entries.insert(key, value);
            }
            _ => return Err(unexpected_row("client state")),
        }
        Ok(())
    }

    /// The client state, in the order the read named its groups and clients.
    fn answer(mut self, read: &StateRead) -> StateAnswer {
        let mut state = ClientState {
            space_version: self.version,
            ..ClientState::default()
        };
        let mut last_active = HashMap::new();
        for id in &read.groups {
            if let Some((space_id, user_id, active)) = self.groups.get(id) {
                last_active.insert(id.clone(), *active);
                let stored = (id.clone(), space_id.clone(), user_id.clone());
                state.groups.push(client_group_record(stored));
            } else if self.collected.contains(id) {
                state.collected_groups.push(id.clone());
            }
        }
        for id in &read.clients {
            if let Some((client_group_id, last_mutation_id)) = self.clients.get(id) {
                state.clients.push(ClientRecord {
                    id: id.clone(),
                    client_group_id: client_group_id.clone(),
                    last_mutation_id: *last_mutation_id,
                });
            }
        }
        state.entries = (read.read_ahead.iter())
            .map(|key| (key.clone(), self.entries.remove(key)))
            .collect();
        (state, last_active)
    }
}

/// A mutator's read of one key: `(space, key)`.
#[derive(Debug, Clone, Serialize)]
pub(super) struct EntryRead(pub String, pub String);

/// Rows of `(read, value)` for the reads whose key holds a live value.
const ENTRY_READS: &str = "
    SELECT r.key, e.value FROM json_each(?1) r
    JOIN replisync_entries e
      ON e.space_id = json_extract(r.value, '$[0]') AND e.key = json_extract(r.value, '$[1]')
    WHERE NOT e.deleted";

#[async_trait]
impl CombinedRead for EntryRead {
    type Answer = Option<String>;

    async fn run(
        conn: &mut SqliteConnection,
        reads: &[EntryRead],
    ) -> Result<Vec<Option<String>>, StoreError> {
        let rows: Vec<(i64, String)> = sqlx::query_as(ENTRY_READS)
            .bind(json(reads)?)
            .fetch_all(&mut *conn)
            .await?;
        let mut values = vec![None; reads.len()];
        for (read, value) in rows {
            let slot = usize::try_from(read)
                .ok()
                .and_then(|read| values.get_mut(read))
                .ok_or_else(|| unexpected_row("entry"))?;
            *slot = Some(value);
        }
        Ok(values)
    }
}

fn json<T: Serialize>(reads: &[T]) -> Result<String, StoreError> {
    serde_json::to_string(reads).map_err(|error| StoreError::Database(error.to_string()))
}

fn unexpected_row(read: &str) -> StoreError {
    StoreError::Database(format!("unexpected row in a combined {read} read"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use sqlx::Connection;

    use super::*;

    /// Statements run, whether the next one hangs (until its caller goes away), and the task
    /// that ran the last.
    #[derive(Default)]
    struct Probe {
        statements: AtomicUsize,
        hang_next: AtomicBool,
        last_reader: std::sync::Mutex<Option<tokio::task::Id>>,
    }

    /// A read answered with its own number.
    #[derive(Clone)]
    struct Echo(u32, Arc<Probe>);

    #[async_trait]
    impl CombinedRead for Echo {
        type Answer = u32;

        async fn run(_: &mut SqliteConnection, reads: &[Echo]) -> Result<Vec<u32>, StoreError> {
            let probe = &reads[0].1;
            *probe.last_reader.lock().unwrap() = tokio::task::try_id();
            probe.statements.fetch_add(1, Ordering::SeqCst);
            if probe.hang_next.swap(false, Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if reads.iter().any(|read| read.0 == 0) {
                return Err(StoreError::Corrupt("read 0's row does not decode".into()));
            }
            Ok(reads.iter().map(|read| read.0).collect())
        }
    }

    type Conn = Arc<tokio::sync::Mutex<SqliteConnection>>;

    async fn conn() -> Conn {
        let conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        Arc::new(tokio::sync::Mutex::new(conn))
    }

    /// Reads `n` through `reads`, taking `conn` when its turn comes.
    fn spawn_read(
        reads: &Arc<Combined<Echo>>,
        conn: &Conn,
        n: u32,
        probe: &Arc<Probe>,
    ) -> tokio::task::JoinHandle<Result<u32, StoreError>> {
        let (reads, conn, probe) = (reads.clone(), conn.clone(), probe.clone());
        tokio::spawn(async move {
            let take = async { Ok::<_, StoreError>(conn.lock().await) };
            reads
                .read(take, Echo(n, probe), &ReadCounts::default())
                .await
        })
    }

    /// Three reads waiting for the connection, which the test holds.
    struct ThreeWaiting {
        reads: Arc<Combined<Echo>>,
        probe: Arc<Probe>,
        held: tokio::sync::OwnedMutexGuard<SqliteConnection>,
        tasks: Vec<tokio::task::JoinHandle<Result<u32, StoreError>>>,
    }

    async fn three_waiting() -> ThreeWaiting {
        waiting_reads([1, 2, 3]).await
    }

    /// Reads of `numbers` waiting for the connection, which the test holds.
    async fn waiting_reads(numbers: [u32; 3]) -> ThreeWaiting {
        let (reads, conn, probe) = (Arc::default(), conn().await, Arc::<Probe>::default());
        let held = conn.clone().lock_owned().await;
        let tasks = numbers
            .into_iter()
            .map(|n| spawn_read(&reads, &conn, n, &probe))
            .collect();
        while reads.waiting().len() < 3 {
            tokio::task::yield_now().await;
        }
        ThreeWaiting {
            reads,
            probe,
            held,
            tasks,
        }
    }

    #[tokio::test]
    async fn reads_that_wait_together_go_in_one_statement_each_with_its_answer() {
        let ThreeWaiting {
            probe, held, tasks, ..
        } = three_waiting().await;
        drop(held);
        for (n, task) in (1..=3).zip(tasks) {
            assert_eq!(task.await.unwrap().unwrap(), n);
        }
        assert_eq!(probe.statements.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn reads_whose_reader_went_away_midway_are_read_again() {
        let ThreeWaiting {
            reads: _reads,
            probe,
            held,
            tasks,
        } = three_waiting().await;
        probe.hang_next.store(true, Ordering::SeqCst);
        drop(held);
        while probe.statements.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // The reader running the shared statement goes away (its push was dropped).
        let reader = probe.last_reader.lock().unwrap().expect("run in a task");
        let (cut, others): (Vec<_>, Vec<_>) =
            (1..=3).zip(tasks).partition(|(_, t)| t.id() == reader);
        cut[0].1.abort();
        for (n, task) in others {
            assert_eq!(
                task.await.unwrap().unwrap(),
                n,
                "read {n} answered after all"
            );
        }
        assert_eq!(
            probe.statements.load(Ordering::SeqCst),
            3,
            "the shared statement, then each of the two others alone"
        );
    }

    #[tokio::test]
    async fn a_read_whose_row_does_not_decode_fails_alone() {
        let ThreeWaiting {
            probe, held, tasks, ..
        } = waiting_reads([1, 0, 3]).await;
        drop(held);
        let answers: Vec<_> = futures::future::join_all(tasks).await;
        let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
        assert!(matches!(answers[0], Ok(1)), "{:?}", answers[0]);
        assert!(
            matches!(answers[1], Err(StoreError::Corrupt(_))),
            "{:?}",
            answers[1]
        );
        assert!(matches!(answers[2], Ok(3)), "{:?}", answers[2]);
        assert_eq!(
            probe.statements.load(Ordering::SeqCst),
            4,
            "the shared statement, then each read alone"
        );
    }
}
