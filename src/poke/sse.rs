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

    /// Spaces with at least one open stream.
    pub fn watched_spaces(&self) -> usize {
        self.watched().len()
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, HashMap<SpaceId, broadcast::Sender<()>>> {
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn subscribe(self: &Arc<Self>, space: &SpaceId) -> Watcher {
        let pokes = self
            .watched()
            .entry(space.clone())
            .or_insert_with(|| broadcast::channel(WATCHER_QUEUE).0)
            .subscribe();
        Watcher {
            pokes: Some(pokes),
            sse: self.clone(),
            space: space.clone(),
        }
    }
}

/// One open stream's subscription. When the last watcher of a space goes, the space's entry
/// goes with it, so the map holds only spaces someone watches.
struct Watcher {
    pokes: Option<broadcast::Receiver<()>>,
    sse: Arc<SsePokes>,
    space: SpaceId,
}

impl Watcher {
    async fn next_poke(&mut self) -> Result<(), broadcast::error::RecvError> {
        match &mut self.pokes {
            Some(pokes) => pokes.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut watched = self.sse.watched();
        drop(self.pokes.take());
        let unwatched = watched
            .get(&self.space)
            .is_some_and(|sender| sender.receiver_count() == 0);
        if unwatched {
            watched.remove(&self.space);
        }
    }
}

impl PokeSink for SsePokes {
    fn space_changed(&self, space: &SpaceId, _committed_at: Instant) {
        let mut watched = self.watched();
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
    let mut watcher = sse.subscribe(&space);
    stream! {
        yield Ok(Event::default().comment("connected"));
        loop {
            tokio::select! {
                received = watcher.next_poke() => match received {
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
