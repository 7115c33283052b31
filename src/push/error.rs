//! What can go wrong with a push, named in the push's own terms; the HTTP edge alone decides the
//! status and body each one is answered with.

use crate::auth::AuthError;
use crate::protocol::BodyError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// Not a valid push: an id that is empty or too long, or a protocol version not spoken.
    #[error("the push is not valid: {0:?}")]
    Invalid(BodyError),
    /// The push names more distinct client ids than one push may.
    #[error(
        "the push names more than {max} client ids; the limit is REPLISYNC_MAX_CLIENTS_PER_PUSH"
    )]
    TooManyClients { max: usize },
    /// The server has no state for the client group or client (garbage collection removed it,
    /// or the server lost it): Replicache must start over.
    #[error("the server has no state for this client group or client")]
    ClientStateNotFound,
    /// The client group or a client belongs to another space, user or client group.
    #[error("{0}")]
    Forbidden(#[from] AuthError),
    /// Committed, but only the first `applied` mutations: the push's budget ran out, and the
    /// client must push again for the rest.
    #[error("applied {applied} mutations of this push; push again to apply the rest")]
    Partial { applied: usize },
    /// A mutation of an all-or-nothing push (the server API's) failed, so nothing of the push
    /// was written: the `index`-th mutation, named `name`, for `reason` (as `/metrics` counts
    /// failed mutations).
    #[error(
        "mutation {index} ({name:?}) failed, so none of the call's mutations was applied: {message}"
    )]
    MutationFailed {
        index: usize,
        name: String,
        reason: &'static str,
        message: String,
    },
    /// An all-or-nothing push's mutations ran past the push's time budget: `ran` of them had run
    /// when the next would have started; nothing was written.
    #[error(
        "the call's mutations ran past REPLISYNC_PUSH_TIME_BUDGET_MS after {ran} of {mutations}, so none was applied: send fewer (or quicker) mutations per call"
    )]
    TookTooLong { ran: usize, mutations: usize },
    /// An all-or-nothing push holds more mutations than one push may apply.
    #[error(
        "the call holds {mutations} mutations; at most {max} are applied together (REPLISYNC_MAX_MUTATIONS_PER_PUSH): split it"
    )]
    TooManyMutations { mutations: usize, max: usize },
    /// The database failed (unavailable, timed out, refused a statement): nothing was written.
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    /// The push's group ended without answering it (its runner panicked, logged there): the
    /// push may or may not have been applied.
    #[error(
        "the server failed while applying this push's group; push again (a resend is applied at most once)"
    )]
    GroupFailed,
}

impl From<BodyError> for PushError {
    fn from(error: BodyError) -> Self {
        PushError::Invalid(error)
    }
}
