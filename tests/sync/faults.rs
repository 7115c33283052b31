//! A store that forwards everything to the real one, with one fault a test asks for: a test
//! double for what a real database cannot be made to do on demand (slow reads, a refused commit,
//! a commit whose answer is lost).

use std::sync::Arc;

use async_trait::async_trait;
use replisync::protocol::SpaceId;
use replisync::store::{
    ClientState, GcBatches, PullChanges, PullSnapshot, PushChanges, PushTx, Store, StoreError,
};

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

    /// An error to answer a commit that succeeded with (its acknowledgement lost on the way);
    /// `None` answers it.
    fn lose_answer(&self) -> Option<StoreError> {
        None
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
    fn faulty(&self, inner: Box<dyn PushTx>) -> Box<dyn PushTx> {
        Box::new(FaultyTx {
            inner,
            fault: self.fault.clone(),
        })
    }
}

struct FaultyTx<F> {
    inner: Box<dyn PushTx>,
    fault: Arc<F>,
}

#[async_trait]
impl<F: Fault> PushTx for FaultyTx<F> {
    async fn client_state(
        &mut self,
        groups: &[String],
        clients: &[String],
    ) -> Result<ClientState, StoreError> {
        self.inner.client_state(groups, clients).await
    }
    async fn entry(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.entry(key).await
    }
    async fn scan_entries(
        &mut self,
        start: &str,
        exclusive: bool,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.inner.scan_entries(start, exclusive, limit).await
    }
    async fn commit(self: Box<Self>, changes: PushChanges) -> Result<(), StoreError> {
        if let Some(error) = self.fault.refuse_commit(&changes) {
            return Err(error);
        }
        self.inner.commit(changes).await?;
        match self.fault.lose_answer() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl<F: Fault> Store for Faulty<F> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn begin_push(&self, space: &SpaceId) -> Result<Box<dyn PushTx>, StoreError> {
        Ok(self.faulty(self.inner.begin_push(space).await?))
    }
    async fn begin_locked_push(&self, space: &SpaceId) -> Result<Box<dyn PushTx>, StoreError> {
        Ok(self.faulty(self.inner.begin_locked_push(space).await?))
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
    async fn check_health(&self) -> Result<(), StoreError> {
        self.inner.check_health().await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}
