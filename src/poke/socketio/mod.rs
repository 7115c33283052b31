//! socket.io poke sink (in progress): pokes published into a socket.io 4 cluster through its
//! Redis adapter, in the protocol of `@socket.io/redis-emitter` (the packet, the publisher).

pub mod packet;
pub mod publisher;

pub use packet::{DEFAULT_KEY, DEFAULT_NAMESPACE, emitter_channel, emitter_message};
pub use publisher::{
    DEFAULT_EVENT, DEFAULT_ROOM_PREFIX, EmitterTarget, PublishError, SocketIoPublisher,
};
