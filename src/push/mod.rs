//! Push: applies a client group's pending mutations to a space, in order, exactly once. Pushes
//! to one space that arrive while its transaction is busy commit together, in arrival order;
//! `service` is the one way in, from a parsed request to its outcome.

mod apply;
mod error;
mod group;
mod locking;
mod service;
pub mod settings;

use std::time::Instant;

pub use self::error::PushError;
pub use self::group::PushGroups;
use crate::protocol::PushRequest;
use crate::rules::KeySet;

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
    /// The keys its mutations may write (REPLISYNC_RULES; every key in a space without rules).
    pub writable: KeySet,
    /// How its mutations are applied: one by one (a client's push), or all or nothing.
    pub mode: ApplyMode,
}

/// How a push's mutations are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyMode {
    /// Replicache's rules: in order, a failed mutation counts as processed with its writes
    /// discarded, and a push past its budget commits a prefix.
    EachMutation,
    /// The server API's: the mutations of one client, numbered from 1, all applied together or
    /// none (the first failure, or the budget running out, is the push's answer), exactly once.
    AllOrNothing,
}
