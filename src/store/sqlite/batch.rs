//! Commit batching on SQLite: pushes to any spaces that want the single writer while its
//! transaction is open join that transaction, and all of them commit together, with one fsync.
//!
//! The first push opens the writer's transaction (`BEGIN IMMEDIATE`); pushes that come while it
//! is open join it, until it has `max_pushes` members or has been open for `max_age`. Members run
//! at once, sharing the connection statement by statement; each writes its push group inside a
//! savepoint of its own (a write the database refuses undoes that group alone), and the last
//! member to finish commits. A push still alone when it writes closes the transaction, writes
//! without a savepoint and commits at once: no added latency, and no added statement.
//! Pushes to one space never meet in a transaction (their groups run one after another).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use futures::future::BoxFuture;
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use sqlx::{Sqlite, Transaction};
use tokio::sync::{Notify, watch};

use super::reads::{Combined, EntryRead, ReadCounts, StateAnswer, StateRead};
use super::writes::{UNDO_SAVEPOINT, Wrap};
use crate::store::{BatchLimits, CommitBatchCounts, StoreError};

/// The writer's transactions, one open at a time.
#[derive(Debug)]
pub(super) struct WriterBatches {
    writer: SqlitePool,
    limits: BatchLimits,
    state: Mutex<WriterState>,
    /// Told when a transaction opens (or fails to): pushes waiting to join try again.
    opened: Notify,
    batches: AtomicU64,
    batched_groups: AtomicU64,
    /// Members written and waiting for their transaction's commit.
    waiting: AtomicU64,
    reads: ReadCounts,
}

#[derive(Debug, Default)]
struct WriterState {
    /// The transaction open now (it may take no more members).
    open: Option<Arc<SharedTx>>,
    /// A push is opening the next transaction: the others wait to join it.
    opening: bool,
}

/// The writer's open transaction, shared by its members.
pub(super) struct SharedTx {
    conn: tokio::sync::Mutex<TxConn>,
    opened_at: Instant,
    members: Mutex<Members>,
    /// The commit's outcome, once known.
    outcome: watch::Sender<Option<Result<(), StoreError>>>,
    /// The members' reads waiting for the connection, each kind run together.
    states: Combined<StateRead>,
    entries: Combined<EntryRead>,
}

impl std::fmt::Debug for SharedTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTx")
            .field("opened_at", &self.opened_at)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Members {
    /// Members not done yet.
    active: usize,
    joined: usize,
    /// Members whose group is written (inside the transaction, not yet committed).
    written: usize,
    /// A member's write stopped midway (a panic, or a savepoint that could not be undone): the
    /// whole transaction rolls back.
    broken: bool,
    /// No member may join: the transaction is full, too old, or committing.
    closed: bool,
}

impl WriterBatches {
    pub(super) fn new(writer: SqlitePool, limits: BatchLimits) -> Self {
        WriterBatches {
            writer,
            limits,
            state: Mutex::default(),
            opened: Notify::new(),
            batches: AtomicU64::new(0),
            batched_groups: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            reads: ReadCounts::default(),
        }
    }

    pub(super) fn counts(&self) -> CommitBatchCounts {
        CommitBatchCounts {
            batches: self.batches.load(Ordering::Relaxed),
            batched_groups: self.batched_groups.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            read_batches: self.reads.statements.load(Ordering::Relaxed),
            batched_reads: self.reads.reads.load(Ordering::Relaxed),
            reads_waiting: self.state().open.as_ref().map_or(0, |open| {
                (open.states.waiting_now() + open.entries.waiting_now()) as u64
            }),
            ..CommitBatchCounts::default()
        }
    }

    /// A place in the writer's transaction: the open one if it takes members, else the next.
    pub(super) async fn join(self: &Arc<Self>) -> Result<Member, StoreError> {
        loop {
            let next_opened = self.opened.notified();
            match self.place() {
                Place::Joined(member) => return Ok(member),
                Place::Open => return self.open_next().await,
                Place::Wait => next_opened.await,
            }
        }
    }

    /// The caller's place now: in the open transaction, opening the next, or waiting for it.
    fn place(self: &Arc<Self>) -> Place {
        let mut state = self.state();
        if let Some(open) = &state.open
            && open.admit(&self.limits)
        {
            return Place::Joined(Member::new(self, Arc::clone(open)));
        }
        if state.opening {
            return Place::Wait;
        }
        state.opening = true;
        Place::Open
    }

    /// Opens the writer's next transaction (once the one before has committed), with the caller
    /// as its first member. A caller that goes away while it waits for the writer (its client
    /// left) hands the opening on: the pushes waiting for it try again.
    async fn open_next(self: &Arc<Self>) -> Result<Member, StoreError> {
        let mut opener = Opener {
            batches: self,
            opened: None,
        };
        let tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let (outcome, _) = watch::channel(None);
        let shared = Arc::new(SharedTx {
            conn: tokio::sync::Mutex::new(TxConn {
                tx: Some(tx),
                savepoint_open: false,
                broken: false,
            }),
            opened_at: Instant::now(),
            members: Mutex::new(Members {
                active: 1,
                joined: 1,
                ..Members::default()
            }),
            outcome,
            states: Combined::default(),
            entries: Combined::default(),
        });
        opener.opened = Some(Arc::clone(&shared));
        drop(opener); // publishes it
        Ok(Member::new(self, shared))
    }

    fn state(&self) -> MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Commits `tx` (every member done) in a task of its own, so that no caller can cut it short
    /// while other members wait for the outcome.
    fn commit_in_task(self: &Arc<Self>, tx: Arc<SharedTx>, written: usize, broken: bool) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // the process is stopping: dropping the transaction rolls it back
        };
        let batches = Arc::clone(self);
        runtime.spawn(async move { batches.commit_now(&tx, written, broken).await });
    }

    /// Commits `tx` (rolls it back when nothing was written, or a write broke it) and publishes
    /// the outcome.
    async fn commit_now(&self, tx: &SharedTx, written: usize, broken: bool) {
        if written > 1 {
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.batched_groups
                .fetch_add(written as u64, Ordering::Relaxed);
        }
        self.waiting.fetch_sub(written as u64, Ordering::Relaxed);
        let mut conn = tx.conn.lock().await;
        let broken = broken || conn.settle().await.is_err();
        let taken = conn.tx.take();
        drop(conn);
        let outcome = match taken {
            Some(open) if broken => {
                let _ = open.rollback().await;
                Err(StoreError::Database(
                    "a push's write stopped midway; its batch was rolled back".into(),
                ))
            }
            Some(open) if written > 0 => open.commit().await.map_err(StoreError::from),
            Some(open) => open.rollback().await.map_err(StoreError::from),
            None => Err(StoreError::Database(
                "the transaction was already ended".into(),
            )),
        };
        tx.outcome.send_replace(Some(outcome));
    }
}

enum Place {
    Joined(Member),
    Open,
    Wait,
}

/// The push opening the writer's next transaction. Dropped, it publishes the transaction it
/// `opened` for the pushes waiting to join, or, when there is none (the begin failed, or the
/// push's caller went away while it waited for the writer), lets one of them open it.
struct Opener<'a> {
    batches: &'a WriterBatches,
    opened: Option<Arc<SharedTx>>,
}

impl Drop for Opener<'_> {
    fn drop(&mut self) {
        {
            let mut state = self.batches.state();
            state.opening = false;
            if let Some(opened) = self.opened.take() {
                state.open = Some(opened);
            }
        }
        self.batches.opened.notify_waiters();
    }
}

/// One push's place in a shared transaction. Dropping it without [`Member::commit`] leaves the
/// transaction to the others, having written nothing.
pub(super) struct Member {
    batches: Arc<WriterBatches>,
    tx: Arc<SharedTx>,
    done: bool,
}

impl SharedTx {
    /// Takes one more member, if the transaction is neither full nor too old.
    fn admit(&self, limits: &BatchLimits) -> bool {
        let mut members = self.members();
        if members.closed
            || members.joined >= limits.max_pushes
            || self.opened_at.elapsed() >= limits.max_age
        {
            members.closed = true;
            return false;
        }
        members.active += 1;
        members.joined += 1;
        true
    }

    /// Closes the transaction to new members if the caller is its only one so far.
    fn close_if_alone(&self) -> bool {
        let mut members = self.members();
        let alone = members.joined == 1 && members.active == 1;
        members.closed |= alone;
        alone
    }

    fn members(&self) -> MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Member {
    fn new(batches: &Arc<WriterBatches>, tx: Arc<SharedTx>) -> Member {
        Member {
            batches: Arc::clone(batches),
            tx,
            done: false,
        }
    }

    /// The transaction's connection, for one or more statements; the other members wait.
    pub(super) async fn conn(&self) -> Result<ConnGuard<'_>, StoreError> {
        let mut guard = self.tx.conn.lock().await;
        guard.settle().await?;
        if guard.tx.is_none() {
            return Err(StoreError::Database(
                "the shared transaction ended before the push was done".into(),
            ));
        }
        Ok(ConnGuard(guard))
    }

    /// The push's client state, read with those of the other members waiting to read theirs.
    pub(super) async fn client_state(&self, read: StateRead) -> Result<StateAnswer, StoreError> {
        let counts = &self.batches.reads;
        self.tx.states.read(self.conn(), read, counts).await
    }

    /// The live value of a key, read with the other members' waiting reads of keys.
    pub(super) async fn entry(&self, read: EntryRead) -> Result<Option<String>, StoreError> {
        let counts = &self.batches.reads;
        self.tx.entries.read(self.conn(), read, counts).await
    }

    /// Writes the member's group, then waits for the transaction's commit. With other members,
    /// inside a savepoint: a push cancelled midway leaves it open, and whoever takes the
    /// connection next undoes it first, so no group is ever half written. A member that is the
    /// transaction's only one closes it to others and writes directly (a failure rolls the
    /// whole transaction back), then commits in its own task.
    pub(super) async fn commit<W>(mut self, write: W) -> Result<(), StoreError>
    where
        W: for<'c> FnOnce(&'c mut SqliteConnection, Wrap) -> BoxFuture<'c, Result<(), StoreError>>,
    {
        let mut outcome = self.tx.outcome.subscribe();
        let alone = self.tx.close_if_alone();
        let written = if alone {
            write_alone(&self.tx, write).await
        } else {
            write_in_savepoint(&self.tx, write).await
        };
        let (wrote, broken) = match &written {
            Written::Yes => (true, false),
            Written::No(_) => (false, false),
            Written::Broken(_) => (false, true),
        };
        if let Some((written, broken)) = self.finish(wrote, broken) {
            if alone {
                self.batches.commit_now(&self.tx, written, broken).await;
            } else {
                self.batches
                    .commit_in_task(Arc::clone(&self.tx), written, broken);
            }
        }
        match written {
            Written::Yes => {}
            Written::No(error) | Written::Broken(error) => return Err(error),
        }
        let outcome = outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| StoreError::Database("the shared transaction was dropped".into()))?;
        outcome.clone().expect("waited for an outcome")
    }

    /// Leaves the transaction. The last member out closes it and answers what to commit: the
    /// groups written, and whether a write broke the transaction.
    fn finish(&mut self, wrote: bool, broken: bool) -> Option<(usize, bool)> {
        if self.done {
            return None;
        }
        self.done = true;
        let (written, broken) = {
            let mut members = self.tx.members();
            members.active -= 1;
            members.written += usize::from(wrote);
            if wrote {
                self.batches.waiting.fetch_add(1, Ordering::Relaxed);
            }
            members.broken |= broken;
            if members.active > 0 {
                return None;
            }
            members.closed = true;
            (members.written, members.broken)
        };
        let mut state = self.batches.state();
        if state
            .open
            .as_ref()
            .is_some_and(|open| Arc::ptr_eq(open, &self.tx))
        {
            state.open = None;
        }
        Some((written, broken))
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some((written, broken)) = self.finish(false, false) {
            self.batches
                .commit_in_task(Arc::clone(&self.tx), written, broken);
        }
    }
}

/// The shared transaction, and whether a member's write was cut off inside its savepoint.
struct TxConn {
    tx: Option<Transaction<'static, Sqlite>>,
    savepoint_open: bool,
    /// An interrupted write could not be undone: the transaction must roll back.
    broken: bool,
}

impl TxConn {
    /// Undoes the write of a member cancelled inside its savepoint, if any.
    async fn settle(&mut self) -> Result<(), StoreError> {
        if self.broken {
            return Err(StoreError::Database(
                "a push's write could not be undone; the transaction rolls back".into(),
            ));
        }
        if !self.savepoint_open {
            return Ok(());
        }
        let Some(tx) = self.tx.as_mut() else {
            return Ok(());
        };
        let undone = undo_savepoint(tx).await;
        self.savepoint_open = false;
        if let Err(error) = undone {
            self.broken = true;
            return Err(error);
        }
        Ok(())
    }
}

/// Undoes the savepoint of a member's write, if it is open: a write cut short before its first
/// statement, or after its last, left none (and nothing half written).
async fn undo_savepoint(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    match sqlx::raw_sql(UNDO_SAVEPOINT).execute(conn).await {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(error)) if error.message().starts_with("no such savepoint") => {
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

/// The shared transaction's connection, held.
pub(super) struct ConnGuard<'a>(tokio::sync::MutexGuard<'a, TxConn>);

impl std::ops::Deref for ConnGuard<'_> {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.0.tx.as_ref().expect("checked when taken")
    }
}

impl std::ops::DerefMut for ConnGuard<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.0.tx.as_mut().expect("checked when taken")
    }
}

/// How a member's write ended.
enum Written {
    Yes,
    /// Refused, and undone: the transaction goes on without it.
    No(StoreError),
    /// Stopped midway and could not be undone.
    Broken(StoreError),
}

/// The shared transaction's connection, ready for a member's write (an interrupted write undone),
/// or why the member cannot write.
async fn writable(tx: &SharedTx) -> Result<tokio::sync::MutexGuard<'_, TxConn>, Written> {
    let mut guard = tx.conn.lock().await;
    if let Err(error) = guard.settle().await {
        return Err(Written::Broken(error));
    }
    if guard.tx.is_none() {
        return Err(Written::No(StoreError::Database(
            "the shared transaction ended before the push was written".into(),
        )));
    }
    Ok(guard)
}

/// Runs `write` in a transaction that has no other member: a failure, or a cancellation midway,
/// rolls the whole transaction back.
async fn write_alone<W>(tx: &SharedTx, write: W) -> Written
where
    W: for<'c> FnOnce(&'c mut SqliteConnection, Wrap) -> BoxFuture<'c, Result<(), StoreError>>,
{
    let mut guard = match writable(tx).await {
        Ok(guard) => guard,
        Err(written) => return written,
    };
    let state = &mut *guard;
    let open = state.tx.as_mut().expect("checked by writable");
    match write(open, Wrap::Direct).await {
        Ok(()) => Written::Yes,
        Err(error) => {
            state.broken = true; // rolls back: nothing else is in the transaction
            Written::No(error)
        }
    }
}

/// Runs `write` inside a savepoint of the shared transaction (its statements open and release
/// it): all of it, or none of it.
async fn write_in_savepoint<W>(tx: &SharedTx, write: W) -> Written
where
    W: for<'c> FnOnce(&'c mut SqliteConnection, Wrap) -> BoxFuture<'c, Result<(), StoreError>>,
{
    let mut guard = match writable(tx).await {
        Ok(guard) => guard,
        Err(written) => return written,
    };
    let state = &mut *guard;
    let conn: &mut SqliteConnection = state.tx.as_mut().expect("checked by writable");
    // Set first: a write cut short anywhere is undone by whoever takes the connection next.
    state.savepoint_open = true;
    let written = write(&mut *conn, Wrap::Savepoint).await;
    let undone = match &written {
        Ok(()) => Ok(()), // released by the write's last statement
        Err(_) => undo_savepoint(conn).await,
    };
    state.savepoint_open = false;
    match (written, undone) {
        (_, Err(error)) => {
            state.broken = true;
            Written::Broken(error)
        }
        (Ok(()), Ok(())) => Written::Yes,
        (Err(error), Ok(())) => Written::No(error),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;
    use sqlx::Connection;
    use sqlx::sqlite::SqlitePoolOptions;

    use super::*;

    #[tokio::test]
    async fn undoing_a_savepoint_that_is_not_open_is_nothing_to_undo_and_keeps_what_was_written() {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        let setup = "CREATE TABLE t (n INTEGER); BEGIN; INSERT INTO t VALUES (1)";
        sqlx::raw_sql(setup).execute(&mut conn).await.unwrap();
        undo_savepoint(&mut conn)
            .await
            .expect("none open: nothing to undo");
        let open = "SAVEPOINT push_group; INSERT INTO t VALUES (2)";
        sqlx::raw_sql(open).execute(&mut conn).await.unwrap();
        undo_savepoint(&mut conn).await.expect("undone");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            rows, 1,
            "the savepoint's row is undone, the one before it kept"
        );
    }

    #[tokio::test]
    async fn a_push_that_goes_away_while_it_waits_for_the_writer_lets_the_next_open_it() {
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        // One push per transaction: every push opens the next.
        let limits = BatchLimits {
            max_pushes: 1,
            max_age: Duration::from_secs(60),
        };
        let batches = Arc::new(WriterBatches::new(writer, limits));
        let holding = batches.join().await.expect("the first push opens one");
        assert!(
            batches.join().now_or_never().is_none(),
            "a second push waits for the writer, then its caller goes away"
        );
        drop(holding); // rolls back, which frees the writer
        let next = tokio::time::timeout(Duration::from_secs(30), batches.join()).await;
        assert!(
            matches!(next, Ok(Ok(_))),
            "a third push opens the next transaction"
        );
    }
}
