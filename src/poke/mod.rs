//! Pokes: after a push commits, tell every client watching the space to pull again.
//! A poke carries no data; sinks (Pusher-compatible HTTP API, built-in SSE) deliver the hint.

pub mod pusher;
pub mod sse;

use std::sync::Arc;
use std::time::Instant;

use crate::protocol::SpaceId;

/// A destination for "this space changed" hints. Implementations must never block or fail the
/// caller: they are called on the push path, right after the transaction committed.
pub trait PokeSink: Send + Sync + 'static {
    /// `committed_at` is when the push's transaction committed (for latency logs).
    fn space_changed(&self, space: &SpaceId, committed_at: Instant);
}

/// Every configured sink; `space_changed` fans out to each of them.
#[derive(Clone, Default)]
pub struct Pokes {
    sinks: Vec<Arc<dyn PokeSink>>,
}

impl Pokes {
    pub fn new(sinks: Vec<Arc<dyn PokeSink>>) -> Self {
        Self { sinks }
    }

    pub fn space_changed(&self, space: &SpaceId, committed_at: Instant) {
        for sink in &self.sinks {
            sink.space_changed(space, committed_at);
        }
    }
}
