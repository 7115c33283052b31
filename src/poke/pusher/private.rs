//! Private poke channels: with authentication on, space `abc` is poked on `private-space-abc`,
//! and pusher-js must get a signed `auth` from `POST /pusher/auth` before it may subscribe.

use secrecy::{ExposeSecret, SecretString};

use super::config::PusherConfig;
use super::signing::channel_auth_signature;
use crate::protocol::SpaceId;

/// Pusher's prefix for channels whose subscriptions the app must sign.
pub const PRIVATE_PREFIX: &str = "private-";

/// Signs subscriptions to the private channels of spaces.
#[derive(Debug)]
pub struct PrivateChannels {
    key: String,
    secret: SecretString,
    /// `private-<PUSHER_CHANNEL_PREFIX>`
    prefix: String,
}

impl PrivateChannels {
    /// For a configuration whose channel prefix already starts with `private-`.
    pub fn new(config: &PusherConfig) -> PrivateChannels {
        PrivateChannels {
            key: config.key.clone(),
            secret: config.secret.clone(),
            prefix: config.channel_prefix.clone(),
        }
    }

    /// The space a channel name pokes, if it is one of ours.
    pub fn space_of(&self, channel: &str) -> Option<SpaceId> {
        SpaceId::parse(channel.strip_prefix(&self.prefix)?).ok()
    }

    /// The `auth` value that lets socket `socket_id` subscribe to `channel`.
    pub fn sign(&self, socket_id: &str, channel: &str) -> String {
        channel_auth_signature(&self.key, self.secret.expose_secret(), socket_id, channel)
    }
}

/// Pusher socket ids look like `1234.5678`.
pub fn is_socket_id(socket_id: &str) -> bool {
    let Some((left, right)) = socket_id.split_once('.') else {
        return false;
    };
    let digits = |part: &str| {
        !part.is_empty() && part.len() <= 20 && part.bytes().all(|b| b.is_ascii_digit())
    };
    digits(left) && digits(right)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ids_are_two_numbers() {
        assert!(is_socket_id("1234.5678"));
        for bad in ["", "1234", "1234.", ".5", "12a.4", "1.2.3", "1:2"] {
            assert!(!is_socket_id(bad), "{bad:?}");
        }
    }
}
