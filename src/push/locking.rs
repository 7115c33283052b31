//! How a push keeps concurrent pushes to its space out: the protocol's choice between an
//! optimistic push and a locked one, made by the group runner, carried out by the store.

use crate::protocol::SpaceId;
use crate::store::{PushTx, Store, StoreError};

/// How a push keeps concurrent pushes to its space out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Locking {
    /// No lock while mutators run: the commit writes only if the space's version is still the
    /// one read, in one statement that is its own transaction (fewest round trips). A push that
    /// lost the race gets `StoreError::Conflict` and runs again, pessimistically.
    Optimistic,
    /// The space's write lock from the first read to the commit: concurrent pushes wait, so the
    /// push cannot lose a race on the space.
    Pessimistic,
}

impl Locking {
    /// Starts a push to `space` in `store` that keeps others out this way.
    pub(super) async fn begin(
        self,
        store: &dyn Store,
        space: &SpaceId,
    ) -> Result<Box<dyn PushTx>, StoreError> {
        match self {
            Locking::Optimistic => store.begin_push(space).await,
            Locking::Pessimistic => store.begin_locked_push(space).await,
        }
    }
}
