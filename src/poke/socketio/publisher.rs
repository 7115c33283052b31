//! Publishes pokes into a socket.io cluster through Redis: one `PUBLISH` per space in the
//! emitter's protocol (packet.rs), pipelined over one reused connection, each call bounded.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};

use super::packet::{DEFAULT_KEY, DEFAULT_NAMESPACE, emitter_channel, emitter_message};
use crate::protocol::SpaceId;

/// The room of space `abc` is `space-abc` unless configured otherwise (as Pusher's channels).
pub const DEFAULT_ROOM_PREFIX: &str = "space-";
/// The event socket.io clients listen to.
pub const DEFAULT_EVENT: &str = "poke";

/// Where pokes go in the cluster: the Redis adapter's key, the namespace, the room of a space
/// (`{room_prefix}{space}`) and the event name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmitterTarget {
    pub key: String,
    pub namespace: String,
    pub room_prefix: String,
    pub event: String,
}

impl Default for EmitterTarget {
    fn default() -> Self {
        EmitterTarget {
            key: DEFAULT_KEY.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            room_prefix: DEFAULT_ROOM_PREFIX.to_owned(),
            event: DEFAULT_EVENT.to_owned(),
        }
    }
}

impl EmitterTarget {
    pub fn room(&self, space: &SpaceId) -> String {
        format!("{}{space}", self.room_prefix)
    }

    /// The channel and the body that poke the room of `space`.
    pub fn poke(&self, space: &SpaceId) -> (String, Vec<u8>) {
        let room = self.room(space);
        let channel = emitter_channel(&self.key, &self.namespace, &room);
        (
            channel,
            emitter_message(&self.namespace, &room, &self.event),
        )
    }
}

/// Why a publish failed. The text names the Redis host, never the URL's password.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "the Redis URL for socket.io pokes is invalid ({reason}): expected \
         redis://[[user]:password@]host[:port][/db]"
    )]
    InvalidUrl { reason: String },
    #[error(
        "Redis at {redis} did not answer within {timeout:?}: check that it runs and is \
         reachable from replisync"
    )]
    Timeout { redis: String, timeout: Duration },
    #[error(
        "publishing pokes to Redis at {redis} failed: {reason} (check that Redis runs there and \
         that the URL's user and password are right)"
    )]
    Failed { redis: String, reason: String },
    /// Redis refused the credentials or the command: retrying cannot help.
    #[error(
        "Redis at {redis} refused to publish pokes: {reason} (check the user and password in \
         REPLISYNC_SOCKETIO_REDIS_URL, and that the user may PUBLISH)"
    )]
    Refused { redis: String, reason: String },
}

/// What one `publish` reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// Subscribers that received a poke, summed over the spaces.
    pub receivers: u64,
    /// Spaces whose poke no subscriber received: no socket.io server listens on that channel.
    pub unheard: usize,
    /// The fewest subscribers one space's poke reached.
    pub fewest: u64,
}

impl Published {
    fn from_replies(receivers: &[u64]) -> Published {
        Published {
            receivers: receivers.iter().sum(),
            unheard: receivers.iter().filter(|&&count| count == 0).count(),
            fewest: receivers.iter().copied().min().unwrap_or(0),
        }
    }
}

/// Makes aws-lc-rs the process's TLS provider unless one is set: the redis crate's `rediss://`
/// asks rustls for the process default, and this build links two providers (aws-lc-rs and
/// ring, through its other clients), between which rustls will not choose (it panics).
fn install_tls_provider() {
    // An error means a provider is installed already: that one serves.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A refusal retrying cannot fix: wrong password or user, or an ACL that forbids PUBLISH.
fn is_refusal(error: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match error.kind() {
        ErrorKind::AuthenticationFailed => true,
        ErrorKind::Server(kind) => matches!(kind, ServerErrorKind::NoPerm),
        _ => false,
    }
}

/// Publishes pokes to Redis over one connection, reused and reconnected by the redis crate's
/// `ConnectionManager`; connects on first use, so a Redis that is down at start is no error.
pub struct SocketIoPublisher {
    connection: ConnectionManager,
    /// `host:port` (and `/db` when not 0): what errors and logs name.
    redis: String,
    /// Scrubbed from error texts, should a server or the crate ever echo it.
    password: Option<SecretString>,
    target: EmitterTarget,
    timeout: Duration,
}

impl std::fmt::Debug for SocketIoPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketIoPublisher")
            .field("redis", &self.redis)
            .field("target", &self.target)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SocketIoPublisher {
    /// Call inside a Tokio runtime. Fails only on a URL that does not parse; `timeout` bounds
    /// each `publish` call, connecting included.
    pub fn new(
        redis_url: &str,
        target: EmitterTarget,
        timeout: Duration,
    ) -> Result<SocketIoPublisher, PublishError> {
        install_tls_provider();
        let client = redis::Client::open(redis_url).map_err(|error| PublishError::InvalidUrl {
            reason: error.to_string(),
        })?;
        let info = client.get_connection_info();
        let redis = match info.redis_settings().db() {
            0 => info.addr().to_string(),
            db => format!("{}/{db}", info.addr()),
        };
        let password = info.redis_settings().password().map(SecretString::from);
        // No retries inside the crate: the caller's backoff decides when to try again, and
        // each failed call starts a fresh connection attempt in the background.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let connection =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|error| {
                PublishError::Failed {
                    redis: redis.clone(),
                    reason: error.to_string(),
                }
            })?;
        Ok(SocketIoPublisher {
            connection,
            redis,
            password,
            target,
            timeout,
        })
    }

    /// `host:port` of the Redis server, for logs.
    pub fn redis(&self) -> &str {
        &self.redis
    }

    pub fn target(&self) -> &EmitterTarget {
        &self.target
    }

    /// Pokes the room of every space in one pipelined round trip; answers how many Redis
    /// subscribers (socket.io servers, one per process) received them.
    pub async fn publish(&self, spaces: &[SpaceId]) -> Result<Published, PublishError> {
        if spaces.is_empty() {
            return Ok(Published::default());
        }
        let mut pipe = redis::pipe();
        for space in spaces {
            let (channel, message) = self.target.poke(space);
            pipe.cmd("PUBLISH").arg(channel).arg(message);
        }
        let mut connection = self.connection.clone();
        let call = pipe.query_async::<Vec<u64>>(&mut connection);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(receivers)) => Ok(Published::from_replies(&receivers)),
            Ok(Err(error)) => Err(self.describe(&error)),
            Err(_elapsed) => Err(self.timed_out()),
        }
    }

    fn describe(&self, error: &redis::RedisError) -> PublishError {
        let reason = self.scrub(error.to_string());
        let redis = self.redis.clone();
        if error.is_timeout() {
            self.timed_out()
        } else if is_refusal(error) {
            PublishError::Refused { redis, reason }
        } else {
            PublishError::Failed { redis, reason }
        }
    }

    fn timed_out(&self) -> PublishError {
        PublishError::Timeout {
            redis: self.redis.clone(),
            timeout: self.timeout,
        }
    }

    fn scrub(&self, text: String) -> String {
        match &self.password {
            Some(password) if !password.expose_secret().is_empty() => {
                text.replace(password.expose_secret(), "***")
            }
            _ => text,
        }
    }
}

impl SocketIoPublisher {
    /// How many socket.io processes listen under the key and namespace: the subscribers of
    /// the Redis adapter's request channel (`{key}-request#{nsp}#`, one per process), the
    /// count the adapter itself uses for `serverCount()`.
    pub async fn listening_servers(&self) -> Result<u64, PublishError> {
        let channel = format!("{}-request#{}#", self.target.key, self.target.namespace);
        let mut connection = self.connection.clone();
        let mut numsub = redis::cmd("PUBSUB");
        numsub.arg("NUMSUB").arg(&channel);
        let call = numsub.query_async::<(String, u64)>(&mut connection);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok((_, subscribers))) => Ok(subscribers),
            Ok(Err(error)) => Err(self.describe(&error)),
            Err(_elapsed) => Err(self.timed_out()),
        }
    }
}

/// Logs, once at start-up, whether Redis answers and how many socket.io processes listen there
/// under the configured key and namespace: a wrong host, password or key shows at start, not
/// at the first poke.
pub async fn log_reachability(redis_url: SecretString, target: EmitterTarget, timeout: Duration) {
    let Ok(publisher) = SocketIoPublisher::new(redis_url.expose_secret(), target, timeout) else {
        return; // The poker logs a URL that does not parse.
    };
    let EmitterTarget { key, namespace, .. } = publisher.target();
    let redis = publisher.redis();
    match publisher.listening_servers().await {
        Ok(0) => tracing::warn!(
            redis,
            key,
            namespace,
            "socket.io: Redis answers, but no socket.io server listens there under this key and \
             namespace yet; pokes reach no one until one does (check REPLISYNC_SOCKETIO_KEY and \
             REPLISYNC_SOCKETIO_NAMESPACE against the adapter's)"
        ),
        Ok(servers) => tracing::info!(
            redis,
            key,
            namespace,
            servers,
            "socket.io: Redis answers and {servers} socket.io server(s) listen"
        ),
        Err(error) => tracing::warn!(
            %error,
            "socket.io: Redis cannot be reached at start; pokes will be retried as they come"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::StreamExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// The Redis the tests publish to; each test uses its own key, so runs do not collide.
    fn redis_url() -> String {
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    fn unique_target() -> EmitterTarget {
        EmitterTarget {
            key: format!("replisync-test-{:016x}", rand::random::<u64>()),
            ..EmitterTarget::default()
        }
    }

    fn space(raw: &str) -> SpaceId {
        SpaceId::parse(raw).unwrap()
    }

    const BOUND: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_subscriber_receives_exactly_the_emitters_packet_for_each_space() {
        let target = unique_target();
        let spaces = [space("abc"), space("other_space-2")];
        let subscriber = redis::Client::open(redis_url()).unwrap();
        let mut pubsub = subscriber
            .get_async_pubsub()
            .await
            .expect("Redis runs at TEST_REDIS_URL (default redis://127.0.0.1:6379)");
        for space in &spaces {
            pubsub.subscribe(target.poke(space).0).await.unwrap();
        }
        let publisher = SocketIoPublisher::new(&redis_url(), target.clone(), BOUND).unwrap();

        let published = publisher.publish(&spaces).await.unwrap();

        assert_eq!(
            published,
            Published {
                receivers: 2,
                unheard: 0,
                fewest: 1
            },
            "our subscriber got one message per space"
        );
        let mut messages = pubsub.on_message();
        for space in &spaces {
            let message = tokio::time::timeout(BOUND, messages.next())
                .await
                .expect("the poke arrives")
                .expect("the subscription is open");
            let room = format!("space-{space}");
            let channel = format!("{}#/#{room}#", target.key);
            assert_eq!(message.get_channel_name(), channel);
            assert_eq!(
                message.get_payload_bytes(),
                emitter_message("/", &room, "poke")
            );
        }
    }

    /// What the Node emitter publishes for `of("/").to("space-abc").emit("poke")`, from
    /// tests/e2e/socketio-emitter-fixtures.mjs (as in packet.rs's tests).
    const NODE_EMITTER_SPACE_ABC: &str = "93a7656d697474657283a47479706502a46461746191a4706f6b65a36e7370a12f83a5726f6f6d7391a973706163652d616263a5666c61677380a665786365707490";

    #[tokio::test]
    async fn redis_carries_the_node_emitters_bytes_for_a_space() {
        let target = EmitterTarget {
            key: DEFAULT_KEY.to_owned(),
            ..unique_target()
        };
        let subscriber = redis::Client::open(redis_url()).unwrap();
        let mut pubsub = subscriber.get_async_pubsub().await.unwrap();
        pubsub.subscribe("socket.io#/#space-abc#").await.unwrap();
        let publisher = SocketIoPublisher::new(&redis_url(), target, BOUND).unwrap();

        publisher.publish(&[space("abc")]).await.unwrap();

        let mut messages = pubsub.on_message();
        let message = tokio::time::timeout(BOUND, messages.next())
            .await
            .expect("the poke arrives")
            .expect("the subscription is open");
        assert_eq!(
            hex::encode(message.get_payload_bytes()),
            NODE_EMITTER_SPACE_ABC
        );
    }

    /// A loopback proxy to the test Redis that counts the connections it accepts; answers its
    /// `redis://` URL. It stops with the test's runtime.
    async fn counting_proxy(accepted: Arc<AtomicUsize>) -> String {
        let upstream = redis::Client::open(redis_url()).unwrap();
        let upstream = upstream.get_connection_info().addr().to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let mut server = TcpStream::connect(&upstream).await.unwrap();
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn the_connection_is_reused_across_publishes() {
        let accepted = Arc::new(AtomicUsize::new(0));
        let url = counting_proxy(Arc::clone(&accepted)).await;
        let publisher = SocketIoPublisher::new(&url, unique_target(), BOUND).unwrap();

        for round in 0..6 {
            publisher
                .publish(&[space(&format!("s{round}"))])
                .await
                .unwrap();
        }

        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for six publishes"
        );
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_named_without_the_urls_password() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let url = format!("redis://poker:s3cret-word@127.0.0.1:{port}/2");
        let publisher = SocketIoPublisher::new(&url, unique_target(), BOUND).unwrap();

        let error = publisher.publish(&[space("abc")]).await.unwrap_err();

        let text = error.to_string();
        assert!(matches!(error, PublishError::Failed { .. }), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{port}/2")), "{text}");
        assert!(!text.contains("s3cret-word"), "{text}");
        assert!(!format!("{publisher:?}").contains("s3cret-word"));
    }

    #[tokio::test]
    async fn a_refused_password_is_reported_without_it() {
        // The test Redis has no password: AUTH is refused, as a wrong password would be.
        let url = redis_url().replacen("redis://", "redis://:not-the-password@", 1);
        let publisher = SocketIoPublisher::new(&url, unique_target(), BOUND).unwrap();

        let error = publisher.publish(&[space("abc")]).await.unwrap_err();

        let text = error.to_string();
        assert!(text.contains(publisher.redis()), "{text}");
        assert!(!text.contains("not-the-password"), "{text}");
    }

    #[tokio::test]
    async fn a_redis_that_never_answers_is_a_timeout() {
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let url = format!("redis://127.0.0.1:{port}");
        let publisher =
            SocketIoPublisher::new(&url, unique_target(), Duration::from_millis(300)).unwrap();

        let outcome = tokio::time::timeout(BOUND, publisher.publish(&[space("abc")])).await;

        holder.abort();
        let error = outcome
            .expect("publish is bounded by its timeout")
            .unwrap_err();
        assert!(
            matches!(&error, PublishError::Timeout { redis, .. } if *redis == format!("127.0.0.1:{port}")),
            "{error}"
        );
    }

    #[test]
    fn an_invalid_url_is_refused_without_echoing_it() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _inside = runtime.enter();
        for url in [
            "redis://:pw-123@127.0.0.1:6379/notadb",
            "http://:pw-123@127.0.0.1",
        ] {
            let error = SocketIoPublisher::new(url, unique_target(), BOUND).unwrap_err();
            let text = error.to_string();
            assert!(matches!(error, PublishError::InvalidUrl { .. }), "{text}");
            assert!(!text.contains("pw-123"), "{text}");
        }
    }

    #[tokio::test]
    async fn a_password_echoed_in_an_error_is_blanked() {
        let url = "redis://:s3cret-word@127.0.0.1:6379";
        let publisher = SocketIoPublisher::new(url, unique_target(), BOUND).unwrap();

        let text = publisher.scrub("AUTH s3cret-word refused".to_owned());

        assert_eq!(text, "AUTH *** refused");
    }

    #[test]
    fn rooms_are_the_prefix_and_the_space() {
        let target = EmitterTarget {
            room_prefix: "todo:".to_owned(),
            namespace: "/pokes".to_owned(),
            ..EmitterTarget::default()
        };
        let (channel, message) = target.poke(&space("abc"));
        assert_eq!(channel, "socket.io#/pokes#todo:abc#");
        assert_eq!(message, emitter_message("/pokes", "todo:abc", "poke"));
    }
}
