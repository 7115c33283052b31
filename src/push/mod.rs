//! Push: applies a client group's pending mutations to a space, in order, exactly once. Pushes
//! to one space that arrive while its transaction is busy commit together, in arrival order.

mod apply;
mod group;
pub mod settings;

use std::collections::HashSet;
use std::time::Instant;

pub use self::group::PushGroups;
use crate::error::ApiError;
use crate::protocol::PushRequest;

/// What a push did.
#[derive(Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// No mutation could be applied (each was blocked by a gap): nothing written.
    Unchanged,
    /// Every mutation had been applied before: nothing written. The push is a resend after an
    /// answer was lost, so watchers are poked again (the commit's own poke may be lost too).
    Replayed,
    /// The space moved to `version`. `partial` (how many mutations were applied) when the
    /// push's budget ran out before its last mutation: the client keeps the rest pending and
    /// sends them again.
    Committed {
        version: u64,
        committed_at: Instant,
        partial: Option<usize>,
    },
}

/// How much one push may do. Past either bound the push commits what it applied and leaves the
/// rest (a prefix of each client's mutations is applied, never a later mutation without the
/// earlier ones); the client's next push continues from its last mutation id. At least one
/// mutation is always applied, so every push makes progress.
#[derive(Clone, Copy, Debug)]
pub struct PushBudget {
    /// Most mutations applied (already applied ones, skipped, do not count).
    pub max_mutations: usize,
    /// No mutator is started after this instant.
    pub deadline: Instant,
    /// Most bytes of keys and values its mutators may put (REPLISYNC_MAX_PUSH_WRITE_BYTES): the
    /// mutation that goes past it fails, its writes discarded.
    pub max_write_bytes: usize,
}

/// One push request to apply: who sent it, what it holds, and how much it may do.
#[derive(Debug)]
pub struct Push {
    pub user: String,
    pub request: PushRequest,
    pub budget: PushBudget,
}

/// Refuses a push naming more clients than `max` (a client group has a handful): each would
/// be a row to read and create.
pub fn check_client_count(request: &PushRequest, max: usize) -> Result<(), ApiError> {
    let mut seen = HashSet::new();
    for mutation in &request.mutations {
        if seen.insert(mutation.client_id.as_str()) && seen.len() > max {
            return Err(ApiError::bad_request(
                "TooManyClients",
                format!(
                    "the push names more than {max} client ids; the limit is REPLISYNC_MAX_CLIENTS_PER_PUSH"
                ),
            ));
        }
    }
    Ok(())
}
