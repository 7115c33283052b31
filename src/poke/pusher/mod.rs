//! Pusher poke sink: after a push commits, publish a zero-payload event on the space's channel of
//! a Pusher-compatible Channels HTTP API (Pusher, soketi, sockudo, Reverb) so its clients pull.

mod client;
mod config;
mod private;
mod queue;
mod signing;
mod stats;
#[cfg(test)]
mod test_support;
mod worker;

pub use client::{MAX_CHANNELS_PER_CALL, log_reachability};
pub use config::{PusherArgs, PusherConfig, PusherConfigError, Scheme, UrlParseError};
pub use private::{PRIVATE_PREFIX, PrivateChannels, is_socket_id};
pub use signing::{
    AUTH_VERSION, body_md5, channel_auth_signature, sign, signed_query, string_to_sign,
};
pub use stats::{PokerOptions, PokerStats};
pub use worker::PusherPoker;
