//! Pokes: after a push commits, tell every client watching the space to pull again. A poke
//! carries no data; `Pokes` (sinks.rs) owns the sinks that deliver the hint (Pusher, SSE), their
//! counters and their shutdown.

pub mod delivery;
pub mod pusher;
pub mod settings;
pub mod sinks;
pub mod socketio;
pub mod sse;

use std::time::Instant;

use crate::protocol::SpaceId;

/// A destination for "this space changed" hints. Implementations must never block or fail the
/// caller: they are called on the push path, right after the transaction committed.
pub trait PokeSink: Send + Sync + 'static {
    /// `committed_at` is when the push's transaction committed (for latency logs).
    fn space_changed(&self, space: &SpaceId, committed_at: Instant);
}
