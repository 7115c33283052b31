//! A store that forwards everything to the real one, with the faults a test asks for: a test
//! double for what a real database cannot be made to do on demand (slow reads, an operation that
//! fails N times with a chosen error, a commit whose answer is lost, a change made just before a
//! commit).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use replisync::protocol::SpaceId;
use replisync::store::{
    ClientState, EntryPage, GcBatches, PullChanges, PullSnapshot, PushChanges, PushTx, SpaceImport,
    Store, StoreError,
};

/// A push-side store operation a fault can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    BeginPush,
    BeginLockedPush,
    ClientState,
    Entry,
    ScanEntries,
    /// The commit, failed before it reaches the database (nothing written).
    Commit,
    /// The commit's answer, failed after the commit succeeded (its acknowledgement lost).
    CommitAnswer,
}

/// What a test changes in the store it wraps; by default, nothing.
#[async_trait]
pub(crate) trait Fault: Send + Sync + 'static {
    /// Runs before each incremental-pull read.
    async fn before_pull_changes(&self) {}

    /// An error to fail an incremental-pull read of `groups` with, the database not asked;
    /// `None` reads.
    fn refuse_pull_changes(&self, _groups: &[String]) -> Option<StoreError> {
        None
    }

    /// Runs before each streamed-pull read (first pulls, large deltas); an error fails the read,
    /// the database not asked.
    fn before_streamed_pull(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// An error to fail a push group's commit with, writing nothing; `None` commits.
    fn refuse_commit(&self, _changes: &PushChanges) -> Option<StoreError> {
        None
    }

    /// An error to fail `op` with (`Op::CommitAnswer`: after the commit ran); `None` runs it.
    fn fail(&self, _op: Op) -> Option<StoreError> {
        None
    }

    /// Runs just before a push group's commit of `space` reaches the database (after
    /// [`Fault::fail`] let it through).
    async fn before_commit(&self, _space: &SpaceId) {}

    /// Sees what the database answered a push group's commit of `space`.
    fn after_commit(&self, _space: &SpaceId, _committed: &Result<(), StoreError>) {}
}

/// Fails `op` with `error` `times` times, after letting the first `after` calls of it through;
/// then runs it. Neither store can be made to fail one chosen operation on demand (SQLite has
/// no connection to kill; killing Postgres sessions fails whatever runs next, not a chosen step).
pub(crate) struct FailTimes {
    op: Op,
    after: AtomicU32,
    left: AtomicU32,
    error: StoreError,
}

impl FailTimes {
    pub(crate) fn new(op: Op, times: u32, error: StoreError) -> FailTimes {
        FailTimes {
            op,
            after: AtomicU32::new(0),
            left: AtomicU32::new(times),
            error,
        }
    }

    /// Fails `op` every time it runs.
    pub(crate) fn always(op: Op, error: StoreError) -> FailTimes {
        FailTimes::new(op, u32::MAX, error)
    }

    /// Lets the first `calls` of `op` through before failing it.
    pub(crate) fn after(self, calls: u32) -> FailTimes {
        self.after.store(calls, Ordering::SeqCst);
        self
    }
}

/// Takes one from `counter` unless it is 0; whether it did.
fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl Fault for FailTimes {
    fn fail(&self, op: Op) -> Option<StoreError> {
        if op != self.op || take_one(&self.after) {
            return None;
        }
        take_one(&self.left).then(|| self.error.clone())
    }
}

/// Fails nothing; adds a permit to `reached` each time a push reaches `op`: how a test sees from
/// outside that a push is running (it began, or its mutator read a key).
pub(crate) struct Signal {
    pub op: Op,
    pub reached: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl Fault for Signal {
    fn fail(&self, op: Op) -> Option<StoreError> {
        if op == self.op {
            self.reached.add_permits(1);
        }
        None
    }
}

/// Two faults at once: `fail` asks the first, then the second.
#[async_trait]
impl<A: Fault, B: Fault> Fault for (A, B) {
    fn fail(&self, op: Op) -> Option<StoreError> {
        self.0.fail(op).or_else(|| self.1.fail(op))
    }
}

/// A change a test makes to the database just before a commit reaches it.
pub(crate) type CommitHook = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where the hook is: set, running (its commit under way), or done with its commit's result.
enum Hooked {
    Waiting(CommitHook),
    Running,
    Done(Result<(), StoreError>),
}

/// Runs the hook a test set with [`CommitHooks::before_next_commit`], and keeps the result of
/// the commit it ran before. The hook makes a real change through its own database connection
/// between the push's read and its commit, a window no client can hit on demand; the database
/// then judges the commit as it would any concurrent writer's. The test keeps a clone.
#[derive(Clone, Default)]
pub(crate) struct CommitHooks(Arc<Mutex<Option<Hooked>>>);

#[async_trait]
impl Fault for CommitHooks {
    async fn before_commit(&self, _space: &SpaceId) {
        let hook = {
            let mut hooked = self.0.lock().unwrap();
            match &mut *hooked {
                Some(state @ Hooked::Waiting(_)) => std::mem::replace(state, Hooked::Running),
                _ => return,
            }
        };
        if let Hooked::Waiting(hook) = hook {
            hook.await;
        }
    }

    fn after_commit(&self, _space: &SpaceId, committed: &Result<(), StoreError>) {
        let mut hooked = self.0.lock().unwrap();
        if let Some(state @ Hooked::Running) = &mut *hooked {
            *state = Hooked::Done(committed.clone());
        }
    }
}

impl CommitHooks {
    /// Runs `hook` just before the store's next commit, once.
    pub(crate) fn before_next_commit(&self, hook: impl Future<Output = ()> + Send + 'static) {
        let previous = self
            .0
            .lock()
            .unwrap()
            .replace(Hooked::Waiting(Box::pin(hook)));
        assert!(previous.is_none(), "one hook at a time");
    }

    /// What the database answered the commit the hook ran before; panics unless that commit
    /// is done.
    pub(crate) fn hooked_commit(&self) -> Result<(), StoreError> {
        match self.0.lock().unwrap().take() {
            Some(Hooked::Done(committed)) => committed,
            Some(Hooked::Waiting(_)) => panic!("no commit ran the hook"),
            Some(Hooked::Running) => panic!("the hooked commit is not done"),
            None => panic!("no hook was set"),
        }
    }
}

/// `inner` with `fault` applied.
pub(crate) struct Faulty<F> {
    inner: Arc<dyn Store>,
    fault: Arc<F>,
}

impl<F: Fault> Faulty<F> {
    pub(crate) fn wrap(inner: Arc<dyn Store>, fault: F) -> Arc<dyn Store> {
        Arc::new(Faulty {
            inner,
            fault: Arc::new(fault),
        })
    }
}

impl<F: Fault> Faulty<F> {
    /// `inner` with this store's fault applied.
    fn faulty(&self, inner: Box<dyn PushTx>, space: &SpaceId) -> Box<dyn PushTx> {
        Box::new(FaultyTx {
            inner,
            fault: self.fault.clone(),
            space: space.clone(),
        })
    }

    /// Fails `op` if the fault says so.
    fn check(&self, op: Op) -> Result<(), StoreError> {
        self.fault.fail(op).map_or(Ok(()), Err)
    }
}

struct FaultyTx<F> {
    inner: Box<dyn PushTx>,
    fault: Arc<F>,
    space: SpaceId,
}

impl<F: Fault> FaultyTx<F> {
    /// Fails `op` if the fault says so.
    fn check(&self, op: Op) -> Result<(), StoreError> {
        self.fault.fail(op).map_or(Ok(()), Err)
    }
}

#[async_trait]
impl<F: Fault> PushTx for FaultyTx<F> {
    async fn client_state(
        &mut self,
        groups: &[String],
        clients: &[String],
        read_ahead: &[String],
    ) -> Result<ClientState, StoreError> {
        self.check(Op::ClientState)?;
        self.inner.client_state(groups, clients, read_ahead).await
    }
    async fn entry(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        self.check(Op::Entry)?;
        self.inner.entry(key).await
    }
    async fn scan_entries(
        &mut self,
        start: &str,
        exclusive: bool,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.check(Op::ScanEntries)?;
        self.inner.scan_entries(start, exclusive, limit).await
    }
    async fn commit(self: Box<Self>, changes: PushChanges) -> Result<(), StoreError> {
        if let Some(error) = self.fault.refuse_commit(&changes) {
            return Err(error);
        }
        self.check(Op::Commit)?;
        self.fault.before_commit(&self.space).await;
        let (fault, space) = (self.fault.clone(), self.space.clone());
        let committed = self.inner.commit(changes).await;
        fault.after_commit(&space, &committed);
        committed?;
        fault.fail(Op::CommitAnswer).map_or(Ok(()), Err)
    }
}

#[async_trait]
impl<F: Fault> Store for Faulty<F> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn begin_push(&self, space: &SpaceId) -> Result<Box<dyn PushTx>, StoreError> {
        self.check(Op::BeginPush)?;
        Ok(self.faulty(self.inner.begin_push(space).await?, space))
    }
    async fn begin_locked_push(&self, space: &SpaceId) -> Result<Box<dyn PushTx>, StoreError> {
        self.check(Op::BeginLockedPush)?;
        Ok(self.faulty(self.inner.begin_locked_push(space).await?, space))
    }
    async fn streamed_pull(
        &self,
        space: &SpaceId,
        group: &str,
        since: Option<u64>,
    ) -> Result<PullSnapshot, StoreError> {
        self.fault.before_streamed_pull()?;
        self.inner.streamed_pull(space, group, since).await
    }
    async fn pull_changes(
        &self,
        space: &SpaceId,
        groups: &[String],
        from: u64,
        max_delta_bytes: usize,
    ) -> Result<PullChanges, StoreError> {
        self.fault.before_pull_changes().await;
        if let Some(error) = self.fault.refuse_pull_changes(groups) {
            return Err(error);
        }
        self.inner
            .pull_changes(space, groups, from, max_delta_bytes)
            .await
    }
    async fn lock_gc(&self) -> Result<Option<Box<dyn GcBatches>>, StoreError> {
        self.inner.lock_gc().await
    }
    async fn raise_space_version(&self, space: &SpaceId, to: u64) -> Result<(), StoreError> {
        self.inner.raise_space_version(space, to).await
    }
    async fn read_entries(
        &self,
        space: &SpaceId,
        start: &str,
        limit: usize,
        max_bytes: usize,
    ) -> Result<EntryPage, StoreError> {
        self.inner
            .read_entries(space, start, limit, max_bytes)
            .await
    }
    async fn space_ids(&self) -> Result<Vec<String>, StoreError> {
        self.inner.space_ids().await
    }
    async fn begin_import(&self) -> Result<Box<dyn SpaceImport>, StoreError> {
        self.inner.begin_import().await
    }
    async fn check_health(&self) -> Result<(), StoreError> {
        self.inner.check_health().await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}
