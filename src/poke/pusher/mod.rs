//! Pusher poke sink: after a push commits, publish a zero-payload event on the space's channel of
//! a Pusher-compatible Channels HTTP API (Pusher, soketi, sockudo, Reverb) so its clients pull.

mod client;
mod config;
mod private;
mod signing;
#[cfg(test)]
pub(crate) mod test_support;

pub use crate::poke::delivery::{PokerOptions, PokerStats};
pub use client::{MAX_CHANNELS_PER_CALL, PusherPoker, PusherPublisher, log_reachability};
pub use config::{PusherArgs, PusherConfig, PusherConfigError, Scheme, UrlParseError};
pub use private::{PRIVATE_PREFIX, PrivateChannels, is_socket_id};
pub use signing::{
    AUTH_VERSION, body_md5, channel_auth_signature, sign, signed_query, string_to_sign,
};
