//! Commit batching on Postgres: the unlocked pushes of different spaces that are ready to commit
//! while another commit is in flight share the next one (one transaction, one statement).
//!
//! A push that finds no commit in flight commits at once, alone (no added latency when idle).
//! Otherwise it joins the forming batch, which goes when the commit ahead of it is done, when it
//! holds `max_pushes` groups, or when its first group has waited `max_age`, whichever comes first.
//! A space whose version moved is answered a conflict alone; any other failure of the batch
//! commits each group alone, so that only the group at fault fails.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use sqlx::PgConnection;
use tokio::sync::oneshot;

use super::commit::{client_columns, commit_group, entry_columns};
use super::kept::KeptConnections;
use crate::protocol::SpaceId;
use crate::store::pg_functions::COMMIT_PUSH_BATCH;
use crate::store::{BatchLimits, CommitBatchCounts, PushChanges, StoreError, to_i64};

static COMMIT_PUSH_BATCH_SQL: LazyLock<String> = LazyLock::new(|| COMMIT_PUSH_BATCH.select_sql());

/// A group whose entries weigh more than this commits alone, beside any batch: a batch's
/// statement stays small.
const ALONE_FROM_BYTES: usize = 1024 * 1024;

/// The commits of one Postgres store.
#[derive(Debug)]
pub(crate) struct CommitBatcher {
    conns: Arc<KeptConnections>,
    limits: BatchLimits,
    activity_granularity: i64,
    queue: Mutex<Queue>,
    counts: Counts,
}

#[derive(Default)]
struct Queue {
    /// Commits running now (alone or batched).
    in_flight: usize,
    forming: Option<Forming>,
    next_batch: u64,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("in_flight", &self.in_flight)
            .field("forming", &self.forming.as_ref().map(|b| b.groups.len()))
            .finish()
    }
}

/// The batch that waits for the commit ahead of it.
struct Forming {
    id: u64,
    opened: Instant,
    groups: Vec<Waiting>,
}

/// One space's group in a forming batch, and where its outcome goes.
struct Waiting {
    space: SpaceId,
    changes: PushChanges,
    answer: oneshot::Sender<Result<(), StoreError>>,
}

#[derive(Debug, Default)]
struct Counts {
    batches: AtomicU64,
    batched_groups: AtomicU64,
}

/// How a group's commit goes.
enum Turn {
    /// At once, alone.
    Alone(SpaceId, PushChanges),
    /// In a batch, whose outcome comes on `answer`.
    Wait {
        batch: u64,
        opened: Instant,
        answer: oneshot::Receiver<Result<(), StoreError>>,
    },
}

impl CommitBatcher {
    pub(super) fn new(
        conns: Arc<KeptConnections>,
        limits: BatchLimits,
        activity_granularity: i64,
    ) -> Self {
        CommitBatcher {
            conns,
            limits,
            activity_granularity,
            queue: Mutex::default(),
            counts: Counts::default(),
        }
    }

    /// Commits and the groups they carried, for `/metrics`.
    pub(crate) fn counts(&self) -> CommitBatchCounts {
        let waiting = self.queue().forming.as_ref().map_or(0, |b| b.groups.len());
        CommitBatchCounts {
            batches: self.counts.batches.load(Ordering::Relaxed),
            batched_groups: self.counts.batched_groups.load(Ordering::Relaxed),
            waiting: waiting as u64,
            ..CommitBatchCounts::default()
        }
    }

    /// Commits an unlocked push group to `space`, alone when no commit is in flight, else in
    /// the next batch, on a connection the batchers keep (`kept`): nothing waits for a batch
    /// while it holds a connection.
    pub(super) async fn commit(
        self: &Arc<Self>,
        space: SpaceId,
        changes: PushChanges,
    ) -> Result<(), StoreError> {
        match self.take_turn(space, changes) {
            Turn::Alone(space, changes) => {
                let _slot = InFlight(Arc::clone(self));
                let mut conn = self.conns.take().await?;
                let committed =
                    commit_group(&mut conn, &space, changes, self.activity_granularity).await;
                self.conns.keep(conn, committed.as_ref().err());
                committed
            }
            Turn::Wait {
                batch,
                opened,
                answer,
            } => self.await_batch(batch, opened, answer).await,
        }
    }

    /// Joins the forming batch, or commits alone (counted in flight): when nothing is in
    /// flight, the group is large, or its space is in the batch already.
    fn take_turn(self: &Arc<Self>, space: SpaceId, changes: PushChanges) -> Turn {
        let large = entry_bytes(&changes) > ALONE_FROM_BYTES; // outside the lock
        let mut queue = self.queue();
        let idle = queue.in_flight == 0 && queue.forming.is_none();
        let repeated = queue
            .forming
            .as_ref()
            .is_some_and(|batch| batch.groups.iter().any(|g| g.space == space));
        if idle || large || repeated || self.limits.max_pushes <= 1 {
            queue.in_flight += 1;
            return Turn::Alone(space, changes);
        }
        let (sender, answer) = oneshot::channel();
        if queue.forming.is_none() {
            let id = queue.next_batch;
            queue.next_batch += 1;
            queue.forming = Some(Forming {
                id,
                opened: Instant::now(),
                groups: Vec::new(),
            });
        }
        let batch = queue.forming.as_mut().expect("a batch forms");
        batch.groups.push(Waiting {
            space,
            changes,
            answer: sender,
        });
        let (id, opened, full) = (
            batch.id,
            batch.opened,
            batch.groups.len() >= self.limits.max_pushes,
        );
        if full {
            self.launch(&mut queue);
        }
        Turn::Wait {
            batch: id,
            opened,
            answer,
        }
    }

    /// Waits for the batch's outcome; past its age limit, sends the batch if it still waits.
    async fn await_batch(
        self: &Arc<Self>,
        batch: u64,
        opened: Instant,
        mut answer: oneshot::Receiver<Result<(), StoreError>>,
    ) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::from_std(opened + self.limits.max_age);
        if let Ok(outcome) = tokio::time::timeout_at(deadline, &mut answer).await {
            return outcome.unwrap_or_else(|_| Err(dropped_batch()));
        }
        {
            let mut queue = self.queue();
            if queue.forming.as_ref().is_some_and(|b| b.id == batch) {
                self.launch(&mut queue);
            }
        }
        answer.await.unwrap_or_else(|_| Err(dropped_batch()))
    }

    /// Sends the forming batch, in a task of its own: a push that stops waiting cannot cut a
    /// commit short.
    fn launch(self: &Arc<Self>, queue: &mut Queue) {
        let Some(batch) = queue.forming.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // the process is stopping: the groups are answered with an error
        };
        queue.in_flight += 1;
        let batcher = Arc::clone(self);
        runtime.spawn(async move {
            let _slot = InFlight(Arc::clone(&batcher));
            batcher.run(batch.groups).await;
        });
    }

    /// Commits a batch's groups and answers each.
    async fn run(&self, groups: Vec<Waiting>) {
        let (answers, groups): (Vec<_>, Vec<_>) = groups
            .into_iter()
            .map(|g| (g.answer, (g.space, g.changes)))
            .unzip();
        let outcomes = self.commit_all(groups).await;
        for (answer, outcome) in answers.into_iter().zip(outcomes) {
            let _ = answer.send(outcome); // the push may have stopped waiting
        }
    }

    /// One outcome per group, in order.
    async fn commit_all(&self, groups: Vec<(SpaceId, PushChanges)>) -> Vec<Result<(), StoreError>> {
        let mut conn = match self.conns.take().await {
            Ok(conn) => conn,
            Err(error) => return vec![Err(error); groups.len()],
        };
        let outcomes = self.commit_all_on(&mut conn, groups).await;
        // The last statement's outcome tells whether the connection is still sound.
        let failed = outcomes.iter().filter_map(|o| o.as_ref().err()).next_back();
        self.conns.keep(conn, failed);
        outcomes
    }

    /// `commit_all` on `conn`: one statement, else each group alone.
    async fn commit_all_on(
        &self,
        conn: &mut PgConnection,
        groups: Vec<(SpaceId, PushChanges)>,
    ) -> Vec<Result<(), StoreError>> {
        if groups.len() > 1 {
            self.counts.batches.fetch_add(1, Ordering::Relaxed);
            let carried = groups.len() as u64;
            self.counts
                .batched_groups
                .fetch_add(carried, Ordering::Relaxed);
            match commit_batch(conn, &groups, self.activity_granularity).await {
                Ok(moved) => return outcomes_of(&groups, &moved),
                Err(error) if fails_every_group(&error) => {
                    return vec![Err(error); groups.len()];
                }
                Err(error) => {
                    tracing::info!(%error, groups = groups.len(), "commit batch failed; committing its groups one by one");
                }
            }
        }
        let mut outcomes = Vec::with_capacity(groups.len());
        for (space, changes) in groups {
            let alone = commit_group(conn, &space, changes, self.activity_granularity);
            outcomes.push(alone.await);
        }
        outcomes
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A commit in flight; when it ends (or is dropped), a batch that waits for it goes.
struct InFlight(Arc<CommitBatcher>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut queue = self.0.queue();
        queue.in_flight -= 1;
        if queue.in_flight == 0 {
            self.0.launch(&mut queue);
        }
    }
}

fn dropped_batch() -> StoreError {
    StoreError::Unavailable("the commit batch was dropped (the server is stopping)".into())
}

/// An error the batch's groups share whoever caused it: the connection or the database is gone,
/// or did not answer in time. Anything else may be one group's fault.
fn fails_every_group(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Unavailable(_) | StoreError::Disconnected(_) | StoreError::TimedOut(_)
    )
}

/// Each group's outcome, once the batch committed every space but `moved`.
fn outcomes_of(
    groups: &[(SpaceId, PushChanges)],
    moved: &HashSet<String>,
) -> Vec<Result<(), StoreError>> {
    groups
        .iter()
        .map(|(space, _)| {
            if moved.contains(space.as_str()) {
                Err(StoreError::Conflict(
                    "the space changed after the push read it".into(),
                ))
            } else {
                Ok(())
            }
        })
        .collect()
}

fn entry_bytes(changes: &PushChanges) -> usize {
    changes
        .entries
        .iter()
        .map(|e| e.key.len() + e.value.as_ref().map_or(0, String::len))
        .sum()
}

/// Every group's writes as the column arrays of `replisync_commit_push_batch`, each row with its
/// space.
#[derive(Default)]
struct BatchColumns {
    spaces: Vec<String>,
    new_versions: Vec<i64>,
    read_versions: Vec<i64>,
    new_group_spaces: Vec<String>,
    new_group_ids: Vec<String>,
    new_group_users: Vec<String>,
    active_group_spaces: Vec<String>,
    active_groups: Vec<String>,
    client_spaces: Vec<String>,
    entry_spaces: Vec<String>,
}

/// Commits `groups` in one statement (its own transaction); answers the spaces that moved since
/// their group read them, which it did not write.
async fn commit_batch(
    conn: &mut PgConnection,
    groups: &[(SpaceId, PushChanges)],
    activity_granularity: i64,
) -> Result<HashSet<String>, StoreError> {
    let mut columns = BatchColumns::default();
    for (space, changes) in groups {
        let space = space.as_str();
        columns.spaces.push(space.to_owned());
        columns.new_versions.push(to_i64(changes.version)?);
        columns.read_versions.push(to_i64(changes.read_version)?);
        for group in &changes.new_client_groups {
            columns.new_group_spaces.push(space.to_owned());
            columns.new_group_ids.push(group.id.clone());
            columns.new_group_users.push(group.user_id.clone());
        }
        for group in &changes.active_client_groups {
            columns.active_group_spaces.push(space.to_owned());
            columns.active_groups.push(group.clone());
        }
        let clients = changes.clients.len();
        columns
            .client_spaces
            .extend(std::iter::repeat_n(space.to_owned(), clients));
        let entries = changes.entries.len();
        columns
            .entry_spaces
            .extend(std::iter::repeat_n(space.to_owned(), entries));
    }
    let clients = client_columns(groups.iter().flat_map(|(_, c)| &c.clients))?;
    let entries = entry_columns(groups.iter().flat_map(|(_, c)| c.entries.iter().cloned()))?;
    let active_at = groups.iter().map(|(_, c)| c.active_at).max().unwrap_or(0);
    // The binds are COMMIT_PUSH_BATCH's arguments, in order.
    let moved: Vec<(String, String)> = sqlx::query_as(COMMIT_PUSH_BATCH_SQL.as_str())
        .bind(&columns.spaces)
        .bind(&columns.new_versions)
        .bind(&columns.read_versions)
        .bind(active_at)
        .bind(&columns.new_group_spaces)
        .bind(&columns.new_group_ids)
        .bind(&columns.new_group_users)
        .bind(&columns.active_group_spaces)
        .bind(&columns.active_groups)
        .bind(activity_granularity)
        .bind(&columns.client_spaces)
        .bind(&clients.ids)
        .bind(&clients.groups)
        .bind(&clients.last_mutation_ids)
        .bind(&clients.versions)
        .bind(&columns.entry_spaces)
        .bind(&entries.keys)
        .bind(&entries.values)
        .bind(&entries.versions)
        .fetch_all(conn)
        .await?;
    Ok(moved.into_iter().map(|(space, _)| space).collect())
}
