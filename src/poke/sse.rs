//! The built-in poke stream: `GET /spaces/{space}/poke` as Server-Sent Events, a `poke` at once
//! per committed change, or one for the changes made while the last was being sent. A
//! single-instance convenience; production deployments use Pusher. Streams are capped in all,
//! per space and per user (so no one user fills the others' share), and a stream ends when the
//! token that opened it expires.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_stream::stream;
use axum::response::sse::{Event, KeepAlive};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub mod settings;

use super::PokeSink;
use crate::metrics::timing::Timing;
use crate::protocol::SpaceId;

/// Pokes queued per watcher before older ones collapse into one (a poke carries no data,
/// so a watcher that lags loses nothing).
const WATCHER_QUEUE: usize = 16;

/// The event name browsers listen for: `source.addEventListener("poke", () => rep.pull())`.
pub const EVENT_NAME: &str = "poke";

pub struct SsePokes {
    watched: Mutex<Watched>,
    keep_alive: Duration,
    limits: StreamLimits,
    /// Cancelled at shutdown so open streams end and the server can stop.
    shutdown: CancellationToken,
    /// From a commit to its poke handed to the space's open streams.
    delay: Timing,
}

impl std::fmt::Debug for SsePokes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SsePokes")
            .field("keep_alive", &self.keep_alive)
            .field("limits", &self.limits)
            .field("shutdown", &self.shutdown)
            .finish_non_exhaustive()
    }
}

/// The SSE poke streams' numbers for `/metrics`.
#[derive(Clone, Copy, Debug)]
pub struct SseStats {
    pub watched_spaces: usize,
    pub open_streams: usize,
}

/// The most SSE streams open at once: in all, per space, and per user.
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    pub total: usize,
    pub per_space: usize,
    pub per_user: usize,
}

/// The watched spaces, the number of open streams and each user's, changed together under one
/// lock.
#[derive(Default)]
struct Watched {
    spaces: HashMap<SpaceId, broadcast::Sender<()>>,
    streams: usize,
    /// Open streams per user, for users who have any.
    users: HashMap<String, usize>,
}

/// A stream refused because a cap is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamsFull {
    /// REPLISYNC_SSE_MAX_STREAMS streams are open.
    Total(usize),
    /// REPLISYNC_SSE_MAX_STREAMS_PER_SPACE streams watch this space.
    Space(usize),
    /// REPLISYNC_SSE_MAX_STREAMS_PER_USER streams are open for this user.
    User(usize),
}

/// Who opens a stream, and until when.
#[derive(Debug, Clone, Default)]
pub struct StreamOwner {
    /// The user held to REPLISYNC_SSE_MAX_STREAMS_PER_USER; `None` for the anonymous default,
    /// where every caller is the same user.
    pub user: Option<String>,
    /// When the token that opened the stream expires: the stream ends then.
    pub expires_at: Option<SystemTime>,
}

impl SsePokes {
    pub fn new(keep_alive: Duration, limits: StreamLimits, shutdown: CancellationToken) -> Self {
        SsePokes {
            watched: Mutex::new(Watched::default()),
            keep_alive,
            limits,
            shutdown,
            delay: Timing::default(),
        }
    }

    /// From commit to the poke handed to the streams (`replisync_poke_delay_seconds`).
    pub fn delay(&self) -> &Timing {
        &self.delay
    }

    /// The keep-alive comments of an open stream (they keep proxies from closing it).
    pub fn keep_alive(&self) -> KeepAlive {
        KeepAlive::new()
            .interval(self.keep_alive)
            .text("keep-alive")
    }

    /// Spaces with at least one open stream.
    pub fn watched_spaces(&self) -> usize {
        self.watched().spaces.len()
    }

    /// Watched spaces and open streams, for `/metrics`.
    pub fn stats(&self) -> SseStats {
        let watched = self.watched();
        SseStats {
            watched_spaces: watched.spaces.len(),
            open_streams: watched.streams,
        }
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new watcher of `space` for `user`, unless a cap is reached.
    fn subscribe(
        self: &Arc<Self>,
        space: &SpaceId,
        user: Option<&str>,
    ) -> Result<Watcher, StreamsFull> {
        let mut watched = self.watched();
        // The user's own cap first: a user at it is told so, whatever the others do.
        let users_streams = user.map_or(0, |user| watched.users.get(user).copied().unwrap_or(0));
        if users_streams >= self.limits.per_user {
            return Err(StreamsFull::User(self.limits.per_user));
        }
        if watched.streams >= self.limits.total {
            return Err(StreamsFull::Total(self.limits.total));
        }
        let watching = watched
            .spaces
            .get(space)
            .map_or(0, broadcast::Sender::receiver_count);
        if watching >= self.limits.per_space {
            return Err(StreamsFull::Space(self.limits.per_space));
        }
        let pokes = watched
            .spaces
            .entry(space.clone())
            .or_insert_with(|| broadcast::channel(WATCHER_QUEUE).0)
            .subscribe();
        watched.streams += 1;
        if let Some(user) = user {
            *watched.users.entry(user.to_owned()).or_default() += 1;
        }
        Ok(Watcher {
            pokes: Some(pokes),
            sse: self.clone(),
            space: space.clone(),
            user: user.map(str::to_owned),
        })
    }
}

/// One open stream's subscription. When the last watcher of a space goes, the space's entry
/// goes with it, so the map holds only spaces someone watches.
struct Watcher {
    pokes: Option<broadcast::Receiver<()>>,
    sse: Arc<SsePokes>,
    space: SpaceId,
    user: Option<String>,
}

impl Watcher {
    /// Waits for a poke, at once when one is queued. The pokes queued behind it (they came while
    /// the stream was still sending the last one) are taken with it: one event for all of them.
    async fn next_poke(&mut self) -> Result<(), broadcast::error::RecvError> {
        let Some(pokes) = &mut self.pokes else {
            return Err(broadcast::error::RecvError::Closed);
        };
        match pokes.recv().await {
            Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => {
                while let Ok(()) | Err(broadcast::error::TryRecvError::Lagged(_)) = pokes.try_recv()
                {
                }
                Ok(())
            }
            Err(closed) => Err(closed),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut watched = self.sse.watched();
        drop(self.pokes.take());
        watched.streams -= 1;
        if let Some(user) = &self.user {
            forget_one_stream(&mut watched.users, user);
        }
        let unwatched = watched
            .spaces
            .get(&self.space)
            .is_some_and(|sender| sender.receiver_count() == 0);
        if unwatched {
            watched.spaces.remove(&self.space);
        }
    }
}

/// One stream of `user` fewer; a user with none is forgotten.
fn forget_one_stream(users: &mut HashMap<String, usize>, user: &str) {
    if let Some(open) = users.get_mut(user) {
        *open -= 1;
        if *open == 0 {
            users.remove(user);
        }
    }
}

impl PokeSink for SsePokes {
    fn space_changed(&self, space: &SpaceId, committed_at: Instant) {
        let mut watched = self.watched();
        let Some(sent) = watched.spaces.get(space).map(|sender| sender.send(())) else {
            return;
        };
        if sent.is_ok() {
            self.delay.observe(committed_at.elapsed());
        } else {
            // Every watcher of this space has gone: forget it.
            watched.spaces.remove(space);
        }
    }
}

/// A `connected` comment, then a `poke` event per change until the server shuts down or the
/// owner's token expires (then the stream ends: the browser's EventSource reconnects, and a
/// stale token in its URL gets 401); or `StreamsFull` when a cap on open streams is reached.
pub fn poke_events(
    sse: Arc<SsePokes>,
    space: SpaceId,
    owner: StreamOwner,
) -> Result<impl futures::Stream<Item = Result<Event, Infallible>>, StreamsFull> {
    let mut watcher = sse.subscribe(&space, owner.user.as_deref())?;
    let ends_at = owner.expires_at.map(instant_of);
    Ok(stream! {
        yield Ok(Event::default().comment("connected"));
        loop {
            tokio::select! {
                // Expiry first: no poke goes out once the token has expired.
                biased;
                () = until(ends_at) => break,
                () = sse.shutdown.cancelled() => break,
                received = watcher.next_poke() => match received {
                    Ok(()) => yield Ok(Event::default().event(EVENT_NAME).data("{}")),
                    Err(_) => break,
                },
            }
        }
    })
}

/// The runtime's instant for a wall-clock time (now, when it has passed).
fn instant_of(at: SystemTime) -> tokio::time::Instant {
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::Instant::now() + left
}

/// Resolves at `at`, or never.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    #[tokio::test]
    async fn a_poke_goes_at_once_and_those_queued_behind_it_go_with_it() {
        let limits = StreamLimits {
            total: 10,
            per_space: 10,
            per_user: 10,
        };
        let sse = Arc::new(SsePokes::new(
            Duration::from_secs(15),
            limits,
            CancellationToken::new(),
        ));
        let space = SpaceId::parse("s").unwrap();
        let mut watcher = sse.subscribe(&space, None).unwrap();
        assert!(
            watcher.next_poke().now_or_never().is_none(),
            "no change yet"
        );
        for _ in 0..5 {
            sse.space_changed(&space, Instant::now());
        }
        let first = watcher.next_poke().now_or_never();
        assert!(matches!(first, Some(Ok(()))), "{first:?}");
        assert!(
            watcher.next_poke().now_or_never().is_none(),
            "the four queued behind the first went with it"
        );
        sse.space_changed(&space, Instant::now());
        let later = watcher.next_poke().now_or_never();
        assert!(
            matches!(later, Some(Ok(()))),
            "a later change gets its own: {later:?}"
        );
    }

    #[test]
    fn one_user_cannot_take_the_others_share() {
        let limits = StreamLimits {
            total: 5,
            per_space: 4,
            per_user: 2,
        };
        let sse = Arc::new(SsePokes::new(
            Duration::from_secs(15),
            limits,
            CancellationToken::new(),
        ));
        let space = SpaceId::parse("s").unwrap();
        let mallory: Vec<Watcher> = (0..2)
            .map(|_| sse.subscribe(&space, Some("mallory")).unwrap())
            .collect();
        let refused = sse.subscribe(&space, Some("mallory")).err();
        assert_eq!(refused, Some(StreamsFull::User(2)));
        let alice = sse.subscribe(&space, Some("alice")).unwrap();
        drop(mallory);
        assert!(!sse.watched().users.contains_key("mallory"), "forgotten");
        assert!(sse.subscribe(&space, Some("mallory")).is_ok());
        drop(alice);
        // Without a user (the anonymous default) only the space and total caps apply.
        let anonymous: Vec<Watcher> = (0..4)
            .map(|_| sse.subscribe(&space, None).unwrap())
            .collect();
        assert_eq!(anonymous.len(), 4);
    }
}
