//! socket.io poke sink: after a push commits, publish a zero-payload event to the space's room
//! of a socket.io 4 cluster through its Redis adapter, in `@socket.io/redis-emitter`'s protocol.

pub mod packet;
pub mod publisher;
pub mod settings;
#[cfg(test)]
pub(crate) mod test_support;
pub mod transport;

use std::sync::Arc;

pub use packet::{DEFAULT_KEY, DEFAULT_NAMESPACE, emitter_channel, emitter_message};
pub use publisher::{
    DEFAULT_EVENT, DEFAULT_ROOM_PREFIX, EmitterTarget, PublishError, Published, SocketIoPublisher,
    log_reachability,
};
pub use settings::{SocketIoArgs, SocketIoSettings};
pub use transport::{MAX_SPACES_PER_PIPELINE, SocketIoTransport};

use crate::poke::delivery::Poker;
use secrecy::ExposeSecret;

/// Pokes through socket.io: a [`Poker`] over pipelined Redis publishes.
pub type SocketIoPoker = Poker<SocketIoTransport>;

impl SocketIoPoker {
    /// Spawns the worker (inside a Tokio runtime); the Redis connection opens on the first poke,
    /// so a Redis that is down at start is retried like one that goes down later.
    pub fn start(settings: SocketIoSettings) -> Arc<SocketIoPoker> {
        let publisher = SocketIoPublisher::new(
            settings.redis_url.expose_secret(),
            settings.target,
            settings.timeout,
        )
        .map(SocketIoTransport::new)
        .map_err(|error| error.to_string());
        Poker::spawn(publisher, settings.options)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::test_support::{Listener, PATIENCE, PrivateRedis};
    use super::*;
    use crate::poke::PokeSink;
    use crate::poke::delivery::PokerOptions;
    use crate::protocol::SpaceId;

    fn space(raw: &str) -> SpaceId {
        SpaceId::parse(raw).unwrap()
    }

    fn unique_key() -> String {
        format!("replisync-sink-{:016x}", rand::random::<u64>())
    }

    /// Quick retries (50 ms doubling to 500 ms): 8 attempts ride out about 2.5 s.
    fn fast_options(max_attempts: u32) -> PokerOptions {
        PokerOptions {
            max_attempts,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            ..PokerOptions::default()
        }
    }

    fn start(redis_url: &str, key: &str, options: PokerOptions) -> Arc<SocketIoPoker> {
        SocketIoPoker::start(SocketIoSettings {
            redis_url: redis_url.into(),
            target: EmitterTarget {
                key: key.to_owned(),
                ..EmitterTarget::default()
            },
            timeout: Duration::from_secs(2),
            options,
        })
    }

    fn room_channel(key: &str, space: &str) -> String {
        format!("{key}#/#space-{space}#")
    }

    #[tokio::test]
    async fn changes_made_together_become_one_publish_per_space_in_one_round_trip() {
        let redis = PrivateRedis::start(&[]).await;
        let key = unique_key();
        let listener = Listener::start(&redis.url(), &key).await;
        let poker = start(&redis.url(), &key, fast_options(8));
        for _ in 0..50 {
            poker.space_changed(&space("hot"), Instant::now());
        }
        for other in ["a", "b", "c"] {
            poker.space_changed(&space(other), Instant::now());
        }
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let mut channels = listener.wait_for(4).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(listener.channels().len(), 4, "one poke per space");
        channels.sort();
        let expected: Vec<String> = ["a", "b", "c", "hot"]
            .iter()
            .map(|space| room_channel(&key, space))
            .collect();
        assert_eq!(channels, expected);
        let stats = poker.stats();
        assert_eq!((stats.calls_ok, stats.spaces_poked), (1, 4));
        assert_eq!(poker.transport().map(|t| t.receivers()), Some(4));
    }

    #[tokio::test]
    async fn pokes_made_while_redis_restarts_are_delivered_once_it_is_back() {
        let mut redis = PrivateRedis::start(&[]).await;
        let key = unique_key();
        let before = Listener::start(&redis.url(), &key).await;
        let poker = start(&redis.url(), &key, fast_options(8));
        poker.space_changed(&space("before"), Instant::now());
        before.wait_for(1).await;

        redis.stop();
        poker.space_changed(&space("during-1"), Instant::now());
        poker.space_changed(&space("during-2"), Instant::now());
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.restart().await;
        // The adapters subscribe again some time after Redis is back: the poker's attempts in
        // that second reach nobody and must be retried (its later ones, about 1.75 s and 2.25 s
        // after the first, find the listener).
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let after = Listener::start(&redis.url(), &key).await;

        let mut channels = after.wait_for(2).await;
        channels.sort();
        assert_eq!(
            channels,
            [
                room_channel(&key, "during-1"),
                room_channel(&key, "during-2")
            ]
        );
        assert_eq!(poker.shutdown(PATIENCE).await, 0);
        let stats = poker.stats();
        assert!(stats.retries >= 1, "{stats:?}");
        assert_eq!(stats.given_up_spaces, 0, "{stats:?}");
        assert_eq!(stats.spaces_poked, 3, "{stats:?}");
    }

    /// Two listeners (socket.io processes) and a poker whose first poke both have received.
    async fn two_processes_poked_once(
        redis_url: &str,
        key: &str,
    ) -> (Listener, Listener, Arc<SocketIoPoker>) {
        let (first, second) = (
            Listener::start(redis_url, key).await,
            Listener::start(redis_url, key).await,
        );
        let poker = start(redis_url, key, fast_options(8));
        poker.space_changed(&space("before"), Instant::now());
        first.wait_for(1).await;
        second.wait_for(1).await;
        (first, second, poker)
    }

    /// Two processes subscribing again, one at once and the other a second later: the
    /// poker's attempts in between reach one of the two that listened before, and must go on.
    async fn back_one_second_apart(redis_url: &str, key: &str) -> (Listener, Listener) {
        let first = Listener::start(redis_url, key).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let second = Listener::start(redis_url, key).await;
        (first, second)
    }

    #[tokio::test]
    async fn after_a_restart_pokes_wait_for_every_process_that_listened_before() {
        let mut redis = PrivateRedis::start(&[]).await;
        let key = unique_key();
        let (_first, _second, poker) = two_processes_poked_once(&redis.url(), &key).await;

        redis.stop();
        poker.space_changed(&space("during"), Instant::now());
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.restart().await;
        let (first, second) = back_one_second_apart(&redis.url(), &key).await;

        let during = room_channel(&key, "during");
        assert!(second.wait_for(1).await.contains(&during));
        assert!(first.channels().contains(&during));
        assert_eq!(poker.shutdown(PATIENCE).await, 0);
        assert_eq!(poker.stats().given_up_spaces, 0);
    }

    #[tokio::test]
    async fn when_every_process_left_pokes_wait_for_as_many_as_listened_before() {
        // A rolling restart of the whole socket.io cluster, Redis staying up.
        let redis = PrivateRedis::start(&[]).await;
        let key = unique_key();
        let (first, second, poker) = two_processes_poked_once(&redis.url(), &key).await;
        first.stop().await;
        second.stop().await;

        poker.space_changed(&space("gap"), Instant::now());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (first, second) = back_one_second_apart(&redis.url(), &key).await;

        let gap = room_channel(&key, "gap");
        assert!(second.wait_for(1).await.contains(&gap));
        assert!(first.channels().contains(&gap));
        assert_eq!(poker.shutdown(PATIENCE).await, 0);
    }

    #[tokio::test]
    async fn a_poke_no_socketio_server_hears_is_retried_then_given_up() {
        let redis = PrivateRedis::start(&[]).await;
        let poker = start(&redis.url(), &unique_key(), fast_options(3));
        poker.space_changed(&space("alone"), Instant::now());

        assert_eq!(poker.shutdown(PATIENCE).await, 1);
        let stats = poker.stats();
        assert_eq!(
            (stats.failed_calls, stats.retries, stats.given_up_spaces),
            (3, 2, 1),
            "{stats:?}"
        );
        assert_eq!(stats.calls_ok, 0);
    }

    #[tokio::test]
    async fn a_wrong_password_is_given_up_without_retrying() {
        let redis = PrivateRedis::start(&["--requirepass", "the-right-one"]).await;
        let url = format!("redis://:a-wrong-one@127.0.0.1:{}", redis.port());
        let poker = start(&url, &unique_key(), fast_options(5));
        poker.space_changed(&space("a"), Instant::now());

        assert_eq!(poker.shutdown(PATIENCE).await, 1);
        let stats = poker.stats();
        assert_eq!(
            (stats.failed_calls, stats.retries, stats.given_up_spaces),
            (1, 0, 1),
            "{stats:?}"
        );
    }

    #[tokio::test]
    async fn listening_servers_counts_the_adapters_request_channel_subscribers() {
        let redis = PrivateRedis::start(&[]).await;
        let key = unique_key();
        let publisher = SocketIoPublisher::new(
            &redis.url(),
            EmitterTarget {
                key: key.clone(),
                ..EmitterTarget::default()
            },
            Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(publisher.listening_servers().await.unwrap(), 0);

        // What each socket.io process's adapter subscribes to, for namespace "/".
        let client = redis::Client::open(redis.url()).unwrap();
        let mut adapters = Vec::new();
        for _ in 0..2 {
            let mut adapter = client.get_async_pubsub().await.unwrap();
            adapter
                .subscribe(format!("{key}-request#/#"))
                .await
                .unwrap();
            adapters.push(adapter);
        }
        assert_eq!(publisher.listening_servers().await.unwrap(), 2);
    }

    #[test]
    fn the_documented_socketio_server_is_the_one_the_tests_run() {
        let server = include_str!("../../../tests/e2e/socketio-server.mjs");
        let docs = include_str!("../../../docs/realtime.md");
        let code = &server[server.find("import ").expect("the server imports")..];
        let block = format!("```js\n{code}```\n");
        assert!(
            docs.contains(&block),
            "docs/realtime.md must show tests/e2e/socketio-server.mjs from its first import, \
             verbatim, in a ```js block: copy the file's code there"
        );
    }
}
