//! What can go wrong in a store: [`StoreError`], how sqlx's errors and the databases' error codes
//! map onto it, and [`ConnectionLoss`], the question retries ask of an error.

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or has no free connection: worth retrying later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A pooled connection turned out dead (the database restarted, failed over, or ended the
    /// session). Run again at once: every attempt retires one dead connection.
    #[error("database connection lost: {0}")]
    Disconnected(String),
    /// A concurrent writer got in the way (serialization failure, deadlock, lost race on a
    /// new row). The whole push is retried inside the server; clients never see this.
    #[error("conflict with a concurrent transaction: {0}")]
    Conflict(String),
    /// A lock was not granted, or a statement did not finish, within the session's bounds
    /// (REPLISYNC_DB_LOCK_TIMEOUT_MS, REPLISYNC_DB_STATEMENT_TIMEOUT_MS): the transaction is
    /// rolled back, nothing written; the client retries later. Not retried inside the server,
    /// which would hold a connection for another whole wait.
    #[error("database wait timed out: {0}")]
    TimedOut(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Not the database: a JavaScript engine could not run the push's mutators (no context or
    /// runtime could be made). Nothing is written; worth retrying later.
    #[error("JavaScript engine unavailable: {0}")]
    EngineUnavailable(String),
}

impl StoreError {
    /// Whether one caller's data may have caused this (a statement the database refused, a row
    /// that does not decode), rather than what every caller meets alike (the database
    /// unavailable, a lost connection, a conflict, a timeout): work shared by several callers
    /// that fails so is done again caller by caller, so that only the one at fault fails.
    pub fn may_be_one_callers_fault(&self) -> bool {
        matches!(self, StoreError::Database(_) | StoreError::Corrupt(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                StoreError::Unavailable(error.to_string())
            }
            sqlx::Error::Io(_) => StoreError::Disconnected(error.to_string()),
            sqlx::Error::Database(db) if is_disconnect_code(db.code().as_deref()) => {
                StoreError::Disconnected(error.to_string())
            }
            sqlx::Error::Database(db) if is_conflict_code(db.code().as_deref()) => {
                StoreError::Conflict(error.to_string())
            }
            sqlx::Error::Database(db) if is_timeout_code(db.code().as_deref()) => {
                StoreError::TimedOut(error.to_string())
            }
            _ => StoreError::Database(error.to_string()),
        }
    }
}

/// Postgres: serialization failure, deadlock, unique violation. SQLite: busy, locked, and a
/// unique or primary key violation (two pushes in one shared transaction claimed the same new
/// client group: the one that comes second runs again, and finds it taken).
fn is_conflict_code(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("40001" | "40P01" | "23505" | "5" | "6" | "517" | "262" | "1555" | "2067")
    )
}

/// Postgres: lock timeout (55P03 lock_not_available) and statement timeout (57014
/// query_canceled).
fn is_timeout_code(code: Option<&str>) -> bool {
    matches!(code, Some("55P03" | "57014"))
}

/// Postgres: connection exceptions (class 08), the server shutting the session down (57P01
/// admin, 57P02 crash, 57P03 cannot connect now, 57P05 idle session timeout) and a session
/// ended for idling in a transaction (25P03).
fn is_disconnect_code(code: Option<&str>) -> bool {
    code.is_some_and(|code| code.starts_with("08") || code.starts_with("57P0") || code == "25P03")
}

/// An error that may say the operation met a dead pooled connection.
pub trait ConnectionLoss {
    /// The cause, when the operation failed only because its connection was dead.
    fn connection_lost(&self) -> Option<&str>;
}

impl ConnectionLoss for StoreError {
    fn connection_lost(&self) -> Option<&str> {
        match self {
            StoreError::Disconnected(cause) => Some(cause),
            _ => None,
        }
    }
}
