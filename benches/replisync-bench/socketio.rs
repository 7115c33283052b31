//! For the socket.io part of the poke workload: the local Redis, a key of this run's own, and
//! a subscriber standing in for the socket.io cluster (PSUBSCRIBE on the adapter's channels), so
//! that replisync's PUBLISHes have a receiver; it counts the messages it receives.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::task::JoinHandle;

/// The Redis the socket.io sink publishes to (loopback only, shared: the key is unique).
pub(crate) const REDIS_URL: &str = "redis://127.0.0.1:6379";
/// How long connecting and subscribing may take before Redis counts as not reachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A Redis subscriber to every room of namespace `/` under this run's adapter key.
pub(crate) struct PokeSubscriber {
    key: String,
    received: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl PokeSubscriber {
    /// Subscribes under a fresh key; None, said on stderr, when Redis is not reachable.
    pub(crate) async fn start() -> Option<PokeSubscriber> {
        let key = unique_key();
        match tokio::time::timeout(CONNECT_TIMEOUT, subscribe(&key)).await {
            Ok(Ok(subscriber)) => Some(subscriber),
            Ok(Err(error)) => {
                eprintln!(
                    "Redis at {REDIS_URL} cannot take the subscriber ({error}; is it running?): \
                     skipping socket.io pokes"
                );
                None
            }
            Err(_) => {
                eprintln!(
                    "Redis at {REDIS_URL} did not answer within {CONNECT_TIMEOUT:?} (is it running?): \
                     skipping socket.io pokes"
                );
                None
            }
        }
    }

    /// The adapter key replisync must publish under (REPLISYNC_SOCKETIO_KEY).
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// Messages received so far.
    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// The variables that make a replisync publish its pokes where this subscriber listens.
    pub(crate) fn server_env(&self) -> [(&str, &str); 2] {
        [
            ("REPLISYNC_SOCKETIO_REDIS_URL", REDIS_URL),
            ("REPLISYNC_SOCKETIO_KEY", &self.key),
        ]
    }
}

impl Drop for PokeSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects, PSUBSCRIBEs `{key}#/#*` (the channels of every room of namespace `/`, as the
/// socket.io Redis adapter does) and counts what arrives, on a task of its own.
async fn subscribe(key: &str) -> redis::RedisResult<PokeSubscriber> {
    let client = redis::Client::open(REDIS_URL)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.psubscribe(format!("{key}#/#*")).await?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let task = tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while messages.next().await.is_some() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok(PokeSubscriber {
        key: key.to_owned(),
        received,
        task,
    })
}

/// `replisync-bench-<pid>-<ms since 1970>`: no other run shares it.
fn unique_key() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis());
    format!("replisync-bench-{}-{millis}", std::process::id())
}
