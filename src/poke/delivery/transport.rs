//! The contract between the poker and one remote service: [`Transport`] sends a batch of spaces
//! in one call, and says with [`Sent`] whether it went, may be retried, or never will.

use std::future::Future;
use std::time::Duration;

use crate::protocol::SpaceId;

/// One remote service that pokes are sent to, a batch of spaces per call.
pub trait Transport: Send + Sync + 'static {
    /// What logs call the service ("Pusher", "socket.io").
    const NAME: &'static str;
    /// Most spaces one call may carry.
    const MAX_SPACES_PER_CALL: usize;

    /// Pokes every space in `spaces` (at most `MAX_SPACES_PER_CALL`) in one call.
    fn send(&self, spaces: &[SpaceId]) -> impl Future<Output = Sent> + Send;
}

/// What became of one call.
#[derive(Debug)]
pub enum Sent {
    Accepted,
    /// Worth retrying (timeout, connection error, overload), after `retry_after` if the service
    /// asked for a wait.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Refused for a reason retrying cannot fix (credentials, quota). `code` keys the error log
    /// (logged at most once a minute per code); `hint` says which settings to check.
    Rejected {
        code: u16,
        detail: String,
        hint: &'static str,
    },
    /// The call could not even be built (the batch cannot be expressed): given up, uncounted
    /// as a failed call.
    Unsendable {
        reason: String,
    },
}
