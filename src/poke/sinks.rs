//! The poke sinks of one server (Pusher, socket.io, SSE), as one part: started from their
//! settings, told of every committed change, counted for `/metrics`, and drained at shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::PokeSink;
use super::pusher::{PokerStats, PrivateChannels, PusherPoker};
use super::settings::PokeSettings;
use super::socketio::SocketIoPoker;
use super::sse::{SsePokes, SseStats};
use crate::metrics::timing::Timing;
use crate::protocol::SpaceId;

/// Every configured sink; `space_changed` fans out to each of them.
pub struct Pokes {
    sinks: Vec<Arc<dyn PokeSink>>,
    pusher: Option<Arc<PusherPoker>>,
    socketio: Option<Arc<SocketIoPoker>>,
    private_channels: Option<PrivateChannels>,
    sse: Option<Arc<SsePokes>>,
}

impl std::fmt::Debug for Pokes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pokes")
            .field("pusher", &self.pusher)
            .field("socketio", &self.socketio)
            .field("private_channels", &self.private_channels)
            .field("sse", &self.sse)
            .finish_non_exhaustive()
    }
}

/// What the sinks count, for `/metrics`: each part is `None` when its sink is off.
#[derive(Debug)]
pub struct PokeStats {
    pub pusher: Option<PokerStats>,
    pub socketio: Option<SocketIoStats>,
    pub sse: Option<SseStats>,
}

/// The socket.io sink's counters: the poker's, and the socket.io processes its publishes reached.
#[derive(Debug, Clone, Copy)]
pub struct SocketIoStats {
    pub poker: PokerStats,
    /// Redis subscribers (one per socket.io process) reached, summed over the spaces poked.
    pub receivers: u64,
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
        let socketio = settings.socketio.map(|socketio| {
            let poker = SocketIoPoker::start(socketio);
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
            socketio,
            private_channels: settings.private_channels,
            sse,
        }
    }

    pub fn space_changed(&self, space: &SpaceId, committed_at: Instant) {
        let _span = tracing::debug_span!("poke", space = space.as_str()).entered();
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

    /// Each sink's delay from commit to delivery, by service name (for `/metrics`).
    pub fn delays(&self) -> Vec<(&'static str, Timing)> {
        let mut delays = Vec::new();
        if let Some(poker) = &self.pusher {
            delays.push(("pusher", poker.delay().clone()));
        }
        if let Some(poker) = &self.socketio {
            delays.push(("socketio", poker.delay().clone()));
        }
        if let Some(sse) = &self.sse {
            delays.push(("sse", sse.delay().clone()));
        }
        delays
    }

    pub fn stats(&self) -> PokeStats {
        PokeStats {
            pusher: self.pusher.as_ref().map(|poker| poker.stats()),
            socketio: self.socketio.as_ref().map(|poker| SocketIoStats {
                poker: poker.stats(),
                receivers: poker
                    .transport()
                    .map_or(0, |publisher| publisher.receivers()),
            }),
            sse: self.sse.as_ref().map(|sse| sse.stats()),
        }
    }

    /// Delivers the pokes still pending (Pusher's and socket.io's at once), waiting at most
    /// `remaining`; logs what was not delivered. SSE streams have already ended with the
    /// server's shutdown token.
    pub async fn shutdown(&self, remaining: Duration) {
        let pusher = async {
            match &self.pusher {
                Some(poker) => poker.shutdown(remaining).await,
                None => 0,
            }
        };
        let socketio = async {
            match &self.socketio {
                Some(poker) => poker.shutdown(remaining).await,
                None => 0,
            }
        };
        let (pusher, socketio) = tokio::join!(pusher, socketio);
        for (service, undelivered) in [("Pusher", pusher), ("socket.io", socketio)] {
            if undelivered > 0 {
                tracing::warn!(
                    undelivered,
                    "{service} pokes pending at shutdown that were not delivered (rejected, failed or cut off by the deadline)"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::poke::pusher::PokerOptions;
    use crate::poke::pusher::test_support::{MockPusher, PATIENCE};
    use crate::poke::socketio::test_support::{Listener, PrivateRedis};
    use crate::poke::socketio::{EmitterTarget, SocketIoSettings};
    use crate::poke::sse::settings::SseSettings;
    use crate::poke::sse::{StreamOwner, poke_events};

    #[tokio::test]
    async fn one_change_pokes_pusher_socketio_and_sse_together_and_shutdown_flushes_both() {
        let pusher = MockPusher::start(vec![]).await;
        let redis = PrivateRedis::start(&[]).await;
        let key = format!("replisync-sinks-{:016x}", rand::random::<u64>());
        let listener = Listener::start(&redis.url(), &key).await;
        let settings = PokeSettings {
            pusher: Some((pusher.config(), PokerOptions::default())),
            socketio: Some(SocketIoSettings {
                redis_url: redis.url().into(),
                target: EmitterTarget {
                    key: key.clone(),
                    ..EmitterTarget::default()
                },
                timeout: Duration::from_secs(2),
                options: PokerOptions::default(),
            }),
            private_channels: None,
            sse: Some(SseSettings::default()),
        };
        let pokes = Pokes::start(settings, Vec::new(), &CancellationToken::new());
        let space = SpaceId::parse("together").unwrap();
        let sse = Arc::clone(pokes.sse().expect("SSE on"));
        let mut stream = Box::pin(poke_events(sse, space.clone(), StreamOwner::default()).unwrap());
        stream.next().await; // the `connected` comment

        pokes.space_changed(&space, Instant::now());
        pokes.shutdown(PATIENCE).await;

        let sse_poke = tokio::time::timeout(PATIENCE, stream.next()).await;
        assert!(
            matches!(sse_poke, Ok(Some(Ok(_)))),
            "the SSE stream got the poke"
        );
        let requests = pusher.requests().await;
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(requests[0].channels, ["space-together"]);
        assert_eq!(
            listener.wait_for(1).await,
            [format!("{key}#/#space-together#")]
        );
        let stats = pokes.stats();
        let socketio = stats.socketio.expect("socket.io counted");
        assert_eq!(stats.pusher.map(|s| s.spaces_poked), Some(1));
        assert_eq!((socketio.poker.spaces_poked, socketio.receivers), (1, 1));
    }
}
