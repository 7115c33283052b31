//! The built-in poke stream: `GET /spaces/{space}/poke` as Server-Sent Events, one `poke` per
//! committed change. A single-instance convenience; production deployments use Pusher.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_stream::stream;
use axum::response::sse::{Event, KeepAlive};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::PokeSink;
use crate::protocol::SpaceId;

/// Pokes queued per watcher before older ones collapse into one (a poke carries no data,
/// so a watcher that lags loses nothing).
const WATCHER_QUEUE: usize = 16;

/// The event name browsers listen for: `source.addEventListener("poke", () => rep.pull())`.
pub const EVENT_NAME: &str = "poke";

pub struct SsePokes {
    watched: Mutex<HashMap<SpaceId, broadcast::Sender<()>>>,
    keep_alive: Duration,
    /// Cancelled at shutdown so open streams end and the server can stop.
    shutdown: CancellationToken,
}

impl SsePokes {
    pub fn new(keep_alive: Duration, shutdown: CancellationToken) -> Self {
        SsePokes {
            watched: Mutex::new(HashMap::new()),
            keep_alive,
            shutdown,
        }
    }

    /// The keep-alive comments of an open stream (they keep proxies from closing it).
    pub fn keep_alive(&self) -> KeepAlive {
        KeepAlive::new()
            .interval(self.keep_alive)
            .text("keep-alive")
    }

    fn subscribe(&self, space: &SpaceId) -> broadcast::Receiver<()> {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        watched
            .entry(space.clone())
            .or_insert_with(|| broadcast::channel(WATCHER_QUEUE).0)
            .subscribe()
    }
}

impl PokeSink for SsePokes {
    fn space_changed(&self, space: &SpaceId, _committed_at: Instant) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let nobody_listens = watched
            .get(space)
            .is_some_and(|sender| sender.send(()).is_err());
        if nobody_listens {
            // Every watcher of this space has gone: forget it.
            watched.remove(space);
        }
    }
}

/// A `connected` comment, then a `poke` event per change until the server shuts down.
pub fn poke_events(
    sse: Arc<SsePokes>,
    space: SpaceId,
) -> impl futures::Stream<Item = Result<Event, Infallible>> {
    let mut pokes = sse.subscribe(&space);
    stream! {
        yield Ok(Event::default().comment("connected"));
        loop {
            tokio::select! {
                received = pokes.recv() => match received {
                    Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        yield Ok(Event::default().event(EVENT_NAME).data("{}"));
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                () = sse.shutdown.cancelled() => break,
            }
        }
    }
}
