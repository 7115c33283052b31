//! The connections that the batchers (shared reads, commits) keep between their statements,
//! outside the pool: sqlx pings a pooled connection each time it goes back, a round trip more.
//!
//! The last connection kept is the next one taken, so that an idle server's push runs its reads and
//! its commit on one warm backend, as it would on one pooled connection. A connection whose
//! statement was cut short (its push was cancelled) is drained with a ping in a task of its own
//! and kept again, as the pool does: a client that aborts requests cannot make the server open
//! connections.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection};

use crate::store::{PoolStats, StoreError};

/// At most as many connections as the batchers run statements at once (`MAX_KEPT`), each taken
/// from the pool (and detached from it) when none is kept.
#[derive(Debug)]
pub(super) struct KeptConnections {
    pool: PgPool,
    kept: Mutex<Vec<PgConnection>>,
    /// Connections taken from the pool and not closed yet: kept, or running a statement.
    open: AtomicU32,
}

/// Enough for the two read lanes and a commit at once; a connection beyond that is closed.
const MAX_KEPT: usize = 4;

/// How long a cut-short statement's connection may take to answer its ping before it is closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

impl KeptConnections {
    pub(super) fn new(pool: PgPool) -> Self {
        KeptConnections {
            pool,
            kept: Mutex::new(Vec::with_capacity(MAX_KEPT)),
            open: AtomicU32::new(0),
        }
    }

    /// The connection kept last, or a new one from the pool when none is kept.
    pub(super) async fn take(self: &Arc<Self>) -> Result<Taken, StoreError> {
        let kept = self
            .kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match kept {
            Some(conn) => conn,
            None => {
                let conn = self.pool.acquire().await?.detach();
                self.open.fetch_add(1, Ordering::Relaxed);
                conn
            }
        };
        Ok(Taken {
            conn: Some(conn),
            home: Arc::clone(self),
        })
    }

    /// Keeps `taken` for a next statement, unless the last one on it ended with an `error` that
    /// may have broken it, or enough are kept: then it is dropped, closing it.
    pub(super) fn keep(&self, mut taken: Taken, error: Option<&StoreError>) {
        let Some(conn) = taken.conn.take() else {
            return;
        };
        if error.is_some_and(may_break_the_connection) {
            self.close(conn);
        } else {
            self.keep_conn(conn);
        }
    }

    fn keep_conn(&self, conn: PgConnection) {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() < MAX_KEPT {
            kept.push(conn);
        } else {
            drop(kept);
            self.close(conn);
        }
    }

    /// Closes `conn` (dropping it: its socket closes), counted.
    fn close(&self, conn: PgConnection) {
        drop(conn);
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Drains a connection whose statement was cut short, and keeps it if it answers in time.
    fn recover(self: Arc<Self>, mut conn: PgConnection) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.close(conn); // the process is stopping
            return;
        };
        runtime.spawn(async move {
            match tokio::time::timeout(DRAIN_TIMEOUT, conn.ping()).await {
                Ok(Ok(())) => self.keep_conn(conn),
                _ => self.close(conn),
            }
        });
    }

    /// The batchers' connections, as a pool of their own (`batching`) in `/metrics`.
    pub(super) fn stats(&self) -> PoolStats {
        let idle = self
            .kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        PoolStats {
            name: "batching",
            size: self.open.load(Ordering::Relaxed),
            idle,
            max: MAX_KEPT as u32,
        }
    }
}

/// A connection taken for a statement. Given back with `keep`; dropped without (its statement was
/// cut short), it is drained and kept again.
pub(super) struct Taken {
    conn: Option<PgConnection>,
    home: Arc<KeptConnections>,
}

impl std::ops::Deref for Taken {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn
            .as_ref()
            .expect("a taken connection until it is kept")
    }
}

impl std::ops::DerefMut for Taken {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("a taken connection until it is kept")
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            Arc::clone(&self.home).recover(conn);
        }
    }
}

/// Whether a statement that failed with `error` may have left its connection unusable (lost, or
/// cut short by a timeout). A refused or conflicting statement leaves it ready for the next.
fn may_break_the_connection(error: &StoreError) -> bool {
    !matches!(
        error,
        StoreError::Conflict(_) | StoreError::Database(_) | StoreError::Corrupt(_)
    )
}
