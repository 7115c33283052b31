//! The socket.io publisher as the poker sees it: which publishes count as delivered (every
//! poke heard, and after an outage by as many processes as before) and which are retried.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::publisher::{EmitterTarget, PublishError, SocketIoPublisher};
use crate::poke::delivery::{Sent, Transport};
use crate::protocol::SpaceId;

/// Most spaces published in one pipelined round trip.
pub const MAX_SPACES_PER_PIPELINE: usize = 100;

/// A [`SocketIoPublisher`] with what the poker needs between calls: the cluster's health and
/// the subscribers reached.
#[derive(Debug)]
pub struct SocketIoTransport {
    publisher: SocketIoPublisher,
    /// Subscribers reached by publishes, summed (for /metrics).
    receivers: AtomicU64,
    /// Whether Redis and the cluster's processes are all back after an outage.
    health: Mutex<Health>,
}

impl SocketIoTransport {
    pub fn new(publisher: SocketIoPublisher) -> SocketIoTransport {
        SocketIoTransport {
            publisher,
            receivers: AtomicU64::new(0),
            health: Mutex::new(Health::Healthy { processes: 0 }),
        }
    }

    /// Subscribers (socket.io processes) the pokes reached, summed over every space.
    pub fn receivers(&self) -> u64 {
        self.receivers.load(Ordering::Relaxed)
    }
}

/// How long after Redis answers again a publish must reach as many socket.io processes as
/// before the outage; after it, fewer count as the cluster's new size.
const RESUBSCRIBE_GRACE: Duration = Duration::from_secs(5);

/// What the publisher knows of the cluster between calls, to tell all of it from part of it.
#[derive(Debug, Clone, Copy)]
enum Health {
    /// Publishing works; `processes` is how many processes the last publish reached (each
    /// space's poke, at the fewest).
    Healthy { processes: u64 },
    /// The last publish failed (Redis away) or reached nobody; `processes` listened before.
    Failing { processes: u64 },
    /// Redis answers again; until `until`, a publish that reaches fewer than `processes` is
    /// retried, because the other processes' adapters have not subscribed again yet.
    Recovering { processes: u64, until: Instant },
}

impl Health {
    fn processes(self) -> u64 {
        match self {
            Health::Healthy { processes }
            | Health::Failing { processes }
            | Health::Recovering { processes, .. } => processes,
        }
    }

    /// After a publish failed.
    fn failed(self) -> Health {
        Health::Failing {
            processes: self.processes(),
        }
    }

    /// After a publish that Redis answered: whether its reach counts as the whole cluster, and
    /// the state after it.
    fn answered(self, fewest: u64, now: Instant) -> (bool, Health) {
        let (processes, until) = match self {
            Health::Healthy { .. } => return (true, Health::Healthy { processes: fewest }),
            Health::Failing { processes } => (processes, now + RESUBSCRIBE_GRACE),
            Health::Recovering { processes, until } => (processes, until),
        };
        if fewest >= processes || now >= until {
            (true, Health::Healthy { processes: fewest })
        } else {
            (false, Health::Recovering { processes, until })
        }
    }
}

impl Transport for SocketIoTransport {
    const NAME: &'static str = "socket.io";
    const MAX_SPACES_PER_CALL: usize = MAX_SPACES_PER_PIPELINE;

    /// Publishes the batch. A poke that reached no subscriber counts as failed and is retried
    /// (with the rest of its batch: a second poke is harmless), and so does one that, right
    /// after Redis came back, reached fewer socket.io processes than listened before: the
    /// others' adapters have not subscribed again yet.
    async fn send(&self, spaces: &[SpaceId]) -> Sent {
        let published = match self.publisher.publish(spaces).await {
            Ok(published) => published,
            Err(error) => {
                self.update_health(Health::failed);
                return failure(error);
            }
        };
        self.receivers
            .fetch_add(published.receivers, Ordering::Relaxed);
        if published.unheard > 0 {
            // Nobody listening tells nothing of the cluster's size: it counts as an outage.
            self.update_health(Health::failed);
            return Sent::Transient {
                reason: self.nobody_listens(published.unheard, spaces.len()),
                retry_after: None,
            };
        }
        let now = Instant::now();
        let mut whole = false;
        let before = self.update_health(|health| {
            let (reached_all, next) = health.answered(published.fewest, now);
            whole = reached_all;
            next
        });
        if whole {
            return Sent::Accepted;
        }
        Sent::Transient {
            reason: format!(
                "a publish to Redis at {} reached {} socket.io process(es), fewer than the {} \
                 that listened before publishing failed: the others have not subscribed again \
                 yet (retried for up to {} s)",
                self.publisher.redis(),
                published.fewest,
                before.processes(),
                RESUBSCRIBE_GRACE.as_secs()
            ),
            retry_after: None,
        }
    }
}

/// A failed publish as the poker sees it: a refusal is not retried.
fn failure(error: PublishError) -> Sent {
    match error {
        PublishError::Refused { redis, reason } => Sent::Rejected {
            code: 401,
            detail: format!("Redis at {redis}: {reason}"),
            hint: "check the user and password in REPLISYNC_SOCKETIO_REDIS_URL, and that the \
                   user may PUBLISH",
        },
        error => Sent::Transient {
            reason: error.to_string(),
            retry_after: None,
        },
    }
}

impl SocketIoTransport {
    /// Moves the cluster's health on with `next`; answers what it was before.
    fn update_health(&self, next: impl FnOnce(Health) -> Health) -> Health {
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        let before = *health;
        *health = next(before);
        before
    }

    fn nobody_listens(&self, unheard: usize, of: usize) -> String {
        let EmitterTarget { key, namespace, .. } = self.publisher.target();
        format!(
            "{unheard} of {of} pokes published to Redis at {} reached no subscriber: no \
             socket.io server listens there under adapter key `{key}` and namespace \
             `{namespace}` (is the cluster up, and do REPLISYNC_SOCKETIO_KEY and \
             REPLISYNC_SOCKETIO_NAMESPACE match its adapter?)",
            self.publisher.redis()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_an_outage_fewer_processes_than_before_count_only_once_the_grace_is_over() {
        let start = Instant::now();
        let healthy = Health::Healthy { processes: 3 };
        assert!(
            matches!(
                healthy.answered(2, start),
                (true, Health::Healthy { processes: 2 })
            ),
            "a healthy cluster that shrank is simply smaller"
        );

        let failing = healthy.failed();
        let (whole, recovering) = failing.answered(1, start);
        assert!(!whole, "one of three back is not the cluster");
        let (whole, _) = recovering.answered(2, start + Duration::from_secs(1));
        assert!(!whole, "two of three back is not the cluster");
        let (whole, back) = recovering.answered(3, start + Duration::from_secs(2));
        assert!(whole && matches!(back, Health::Healthy { processes: 3 }));

        let (whole, shrunk) = recovering.answered(2, start + RESUBSCRIBE_GRACE);
        assert!(
            whole,
            "past the grace, fewer processes are the cluster's new size"
        );
        assert!(matches!(shrunk, Health::Healthy { processes: 2 }));
    }
}
