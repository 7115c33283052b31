//! The poke sinks of one server, as one part: started from their settings, told of every
//! committed change, counted for `/metrics`, and drained at shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::PokeSink;
use super::pusher::{PokerStats, PrivateChannels, PusherPoker};
use super::settings::PokeSettings;
use super::sse::{SsePokes, SseStats};
use crate::protocol::SpaceId;

/// Every configured sink; `space_changed` fans out to each of them.
pub struct Pokes {
    sinks: Vec<Arc<dyn PokeSink>>,
    pusher: Option<Arc<PusherPoker>>,
    private_channels: Option<PrivateChannels>,
    sse: Option<Arc<SsePokes>>,
}

impl std::fmt::Debug for Pokes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pokes")
            .field("pusher", &self.pusher)
            .field("private_channels", &self.private_channels)
            .field("sse", &self.sse)
            .finish_non_exhaustive()
    }
}

/// What the sinks count, for `/metrics`: each part is `None` when its sink is off.
#[derive(Debug)]
pub struct PokeStats {
    pub pusher: Option<PokerStats>,
    pub sse: Option<SseStats>,
}

impl Pokes {
    /// Starts the sinks `settings` name (Pusher's worker task: call it inside a Tokio runtime),
    /// and `extra` sinks beside them. SSE streams end when `shutdown` is cancelled.
    pub fn start(
        settings: PokeSettings,
        extra: Vec<Arc<dyn PokeSink>>,
        shutdown: &CancellationToken,
    ) -> Pokes {
        let mut sinks = extra;
        let pusher = settings.pusher.map(|(config, options)| {
            let poker = PusherPoker::start(config, options);
            sinks.push(poker.clone());
            poker
        });
        let sse = settings.sse.map(|sse| {
            let sse = Arc::new(SsePokes::new(sse.keep_alive, sse.limits, shutdown.clone()));
            sinks.push(sse.clone());
            sse
        });
        Pokes {
            sinks,
            pusher,
            private_channels: settings.private_channels,
            sse,
        }
    }

    pub fn space_changed(&self, space: &SpaceId, committed_at: Instant) {
        for sink in &self.sinks {
            sink.space_changed(space, committed_at);
        }
    }

    /// The built-in SSE stream, when it is on.
    pub fn sse(&self) -> Option<&Arc<SsePokes>> {
        self.sse.as_ref()
    }

    /// Signs private poke channel subscriptions, when Pusher's channels are private.
    pub fn private_channels(&self) -> Option<&PrivateChannels> {
        self.private_channels.as_ref()
    }

    pub fn stats(&self) -> PokeStats {
        PokeStats {
            pusher: self.pusher.as_ref().map(|poker| poker.stats()),
            sse: self.sse.as_ref().map(|sse| sse.stats()),
        }
    }

    /// Delivers the pokes still pending, waiting at most `remaining`; logs what was not
    /// delivered. SSE streams have already ended with the server's shutdown token.
    pub async fn shutdown(&self, remaining: Duration) {
        let Some(poker) = &self.pusher else {
            return;
        };
        let undelivered = poker.shutdown(remaining).await;
        if undelivered > 0 {
            tracing::warn!(
                undelivered,
                "pokes pending at shutdown that were not delivered (rejected, failed or cut off by the deadline)"
            );
        }
    }
}
