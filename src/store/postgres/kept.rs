//! The connections that the batchers (shared reads, commits) keep between their statements,
//! outside the pool: sqlx pings a pooled connection each time it goes back, a round trip more.
//!
//! The last connection kept is the next one taken, so that an idle server's push runs its reads and
//! its commit on one warm backend, as it would on one pooled connection. Past `MAX_KEPT`
//! statements at once (batching turned off, groups committed alone beside a batch), a statement
//! takes a pooled connection as before. A kept connection whose statement was cut short (its push
//! was cancelled) is drained with a ping in a task of its own and kept again, as the pool does: a
//! client that aborts requests cannot make the server open connections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection, Postgres};

use crate::store::{PoolStats, StoreError};

/// At most `MAX_KEPT` connections, each taken from the pool (and detached from it) when a
/// statement finds none kept.
#[derive(Debug)]
pub(super) struct KeptConnections {
    pool: PgPool,
    kept: Mutex<Vec<PgConnection>>,
    /// Kept connections open: idle in `kept`, or running a statement.
    open: AtomicUsize,
}

/// Enough for the two read lanes and a commit at once.
const MAX_KEPT: usize = 4;

/// How long a cut-short statement's connection may take to answer its ping before it is closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

impl KeptConnections {
    pub(super) fn new(pool: PgPool) -> Self {
        KeptConnections {
            pool,
            kept: Mutex::new(Vec::with_capacity(MAX_KEPT)),
            open: AtomicUsize::new(0),
        }
    }

    /// The connection kept last; else a new kept one while fewer than `MAX_KEPT` are open; else
    /// a pooled one.
    pub(super) async fn take(self: &Arc<Self>) -> Result<Taken, StoreError> {
        let kept = self.kept().pop();
        if let Some(conn) = kept {
            return Ok(self.taken(Held::Kept(conn)));
        }
        let room = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (open < MAX_KEPT).then_some(open + 1)
            })
            .is_ok();
        let acquired = self.pool.acquire().await;
        if !room {
            return Ok(self.taken(Held::Pooled(acquired?)));
        }
        match acquired {
            Ok(conn) => Ok(self.taken(Held::Kept(conn.detach()))),
            Err(error) => {
                self.open.fetch_sub(1, Ordering::Relaxed);
                Err(error.into())
            }
        }
    }

    fn taken(self: &Arc<Self>, held: Held) -> Taken {
        Taken {
            held: Some(held),
            home: Arc::clone(self),
        }
    }

    /// Gives `taken` back after its statement: kept for the next one, unless the statement
    /// ended with an `error` that may have broken the connection (it is closed). A pooled
    /// connection goes back to the pool.
    pub(super) fn keep(&self, mut taken: Taken, error: Option<&StoreError>) {
        match taken.held.take() {
            Some(Held::Kept(conn)) if error.is_some_and(may_break_the_connection) => {
                self.close(conn);
            }
            Some(Held::Kept(conn)) => self.kept().push(conn),
            Some(Held::Pooled(conn)) => drop(conn),
            None => {}
        }
    }

    /// Closes a kept connection (dropping it closes its socket).
    fn close(&self, conn: PgConnection) {
        drop(conn);
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Drains a kept connection whose statement was cut short, and keeps it if it answers in
    /// time.
    fn recover(self: Arc<Self>, mut conn: PgConnection) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.close(conn); // the process is stopping
            return;
        };
        runtime.spawn(async move {
            match tokio::time::timeout(DRAIN_TIMEOUT, conn.ping()).await {
                Ok(Ok(())) => self.kept().push(conn),
                _ => self.close(conn),
            }
        });
    }

    /// Closes the kept connections, each with the protocol's goodbye (at shutdown, before the
    /// pool closes its own).
    pub(super) async fn close_all(&self) {
        let kept: Vec<PgConnection> = self.kept().drain(..).collect();
        for conn in kept {
            let _ = conn.close().await;
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<PgConnection>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The batchers' kept connections, as a pool of their own (`batching`) in `/metrics`.
    pub(super) fn stats(&self) -> PoolStats {
        let idle = self.kept().len();
        PoolStats {
            name: "batching",
            size: u32::try_from(self.open.load(Ordering::Relaxed)).unwrap_or(u32::MAX),
            idle,
            max: MAX_KEPT as u32,
        }
    }
}

/// Whether a statement that failed with `error` may have left its connection unusable (lost, or
/// cut short by a timeout). A refused or conflicting statement leaves it ready for the next.
fn may_break_the_connection(error: &StoreError) -> bool {
    !(error.may_be_one_callers_fault() || matches!(error, StoreError::Conflict(_)))
}

/// A connection taken for a statement: one of the kept, or a pooled one.
enum Held {
    Kept(PgConnection),
    Pooled(PoolConnection<Postgres>),
}

/// A connection taken for a statement, given back with `keep`. Dropped instead (its statement
/// was cut short), a kept one is drained and kept again, a pooled one goes back to the pool
/// (which drains it).
pub(super) struct Taken {
    held: Option<Held>,
    home: Arc<KeptConnections>,
}

impl std::ops::Deref for Taken {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match self
            .held
            .as_ref()
            .expect("a taken connection until it is given back")
        {
            Held::Kept(conn) => conn,
            Held::Pooled(conn) => conn,
        }
    }
}

impl std::ops::DerefMut for Taken {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self
            .held
            .as_mut()
            .expect("a taken connection until it is given back")
        {
            Held::Kept(conn) => conn,
            Held::Pooled(conn) => conn,
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(Held::Kept(conn)) = self.held.take() {
            Arc::clone(&self.home).recover(conn);
        }
    }
}
