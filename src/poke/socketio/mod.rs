//! socket.io poke sink: after a push commits, publish a zero-payload event to the space's room
//! of a socket.io 4 cluster through its Redis adapter, in `@socket.io/redis-emitter`'s protocol.

pub mod packet;
pub mod publisher;
pub mod settings;

use std::sync::Arc;

pub use packet::{DEFAULT_KEY, DEFAULT_NAMESPACE, emitter_channel, emitter_message};
pub use publisher::{
    DEFAULT_EVENT, DEFAULT_ROOM_PREFIX, EmitterTarget, PublishError, Published, SocketIoPublisher,
};
pub use settings::{SocketIoArgs, SocketIoSettings};

use crate::poke::delivery::Poker;
use secrecy::ExposeSecret;

/// Pokes through socket.io: a [`Poker`] over pipelined Redis publishes.
pub type SocketIoPoker = Poker<SocketIoPublisher>;

impl SocketIoPoker {
    /// Spawns the worker (inside a Tokio runtime); the Redis connection opens on the first poke,
    /// so a Redis that is down at start is retried like one that goes down later.
    pub fn start(settings: SocketIoSettings) -> Arc<SocketIoPoker> {
        let publisher = SocketIoPublisher::new(
            settings.redis_url.expose_secret(),
            settings.target,
            settings.timeout,
        )
        .map_err(|error| error.to_string());
        Poker::spawn(publisher, settings.options)
    }
}

#[cfg(test)]
mod tests {
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
