//! What can go wrong with a pull, named in the pull's own terms; the HTTP edge alone decides the
//! status and body each one is answered with.

use crate::auth::AuthError;
use crate::protocol::BodyError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Not a valid pull: a client group id that is empty or too long.
    #[error("the pull is not valid: {0:?}")]
    Invalid(BodyError),
    /// The server cannot answer from the client's state (a cookie it never issued or far ahead,
    /// a client group garbage collection removed): Replicache must start over.
    #[error("the server has no state for this client group or cookie")]
    ClientStateNotFound,
    /// The client group belongs to another space or user.
    #[error("{0}")]
    Forbidden(#[from] AuthError),
    /// As many streamed pulls as allowed are in flight; the client retries shortly.
    #[error(
        "{max_streamed} streamed pulls (first pulls and large deltas) are in flight (REPLISYNC_MAX_FIRST_PULLS); retry shortly"
    )]
    TooManyStreamed { max_streamed: usize },
    /// The database failed (unavailable, timed out): the space is unchanged.
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
}

impl From<BodyError> for PullError {
    fn from(error: BodyError) -> Self {
        PullError::Invalid(error)
    }
}
