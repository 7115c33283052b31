//! Why a mutation failed: the errors a mutator returns or its writes are refused with, and how
//! `/metrics` names each.

use crate::store::StoreError;

/// Why a mutation was not applied.
#[derive(Debug, thiserror::Error)]
pub enum MutationError {
    /// The arguments do not have the shape the mutator needs.
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    /// A business rule refused the mutation.
    #[error("rejected: {0}")]
    Rejected(String),
    /// A JavaScript mutator threw, ran out of time or memory, or wrote a value that is not JSON.
    #[error("{0}")]
    Script(#[from] ScriptError),
    /// The mutation wrote a key the caller may not write (REPLISYNC_RULES).
    #[error(
        "the caller may not write {key:?} in this space (REPLISYNC_RULES): this mutation's writes are discarded"
    )]
    ForbiddenKey { key: String },
    /// The push's mutators put more bytes (keys and values) than the push may write.
    #[error(
        "the push's mutators put more than {limit} bytes of keys and values (REPLISYNC_MAX_PUSH_WRITE_BYTES): this mutation's writes are discarded; write less per push, or raise the limit"
    )]
    TooMuchWritten { limit: usize },
    /// The database failed: the whole push is rolled back and answered 5xx.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a JavaScript mutator failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptFailure {
    /// It threw, or its promise was rejected (or never settled).
    Threw,
    /// It ran past REPLISYNC_MUTATOR_TIMEOUT_MS.
    Timeout,
    /// It allocated past REPLISYNC_MUTATOR_MEMORY_MB.
    Memory,
}

impl MutationError {
    /// Why the mutation failed, as `/metrics` counts it.
    pub fn reason(&self) -> &'static str {
        match self {
            MutationError::InvalidArgs(_) => "invalid_args",
            MutationError::Rejected(_) => "rejected",
            MutationError::Script(error) => error.reason.as_str(),
            MutationError::TooMuchWritten { .. } => "write_limit",
            MutationError::ForbiddenKey { .. } => "forbidden_key",
            MutationError::Store(_) => "database",
        }
    }
}

impl ScriptFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            ScriptFailure::Threw => "threw",
            ScriptFailure::Timeout => "timeout",
            ScriptFailure::Memory => "memory",
        }
    }
}

/// A JavaScript mutator's failure: why, and what the engine said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JavaScript mutator failed ({}): {message}", reason.as_str())]
pub struct ScriptError {
    pub reason: ScriptFailure,
    pub message: String,
}
