//! Which poke sinks run and how, from the PUSHER_* and REPLISYNC_SSE* variables: Pusher (with
//! private channels when tokens are on), the built-in SSE stream, or both.

use anyhow::Context;

use super::pusher::{PRIVATE_PREFIX, PokerOptions, PrivateChannels, PusherArgs, PusherConfig};
use super::sse::settings::{SseArgs, SseSettings};

/// The pokes' variables as given; [`PokeSettings::from_args`] checks them.
#[derive(clap::Args, Debug, Clone)]
pub struct PokeArgs {
    #[command(flatten)]
    pub pusher: PusherArgs,

    #[command(flatten)]
    pub sse: SseArgs,
}

/// The pokes' settings, checked; [`super::Pokes::start`] starts what they name.
#[derive(Default)]
pub struct PokeSettings {
    /// Publishes pokes through a Pusher-compatible HTTP API.
    pub pusher: Option<(PusherConfig, PokerOptions)>,
    /// Signs subscriptions to private poke channels (`POST /pusher/auth`).
    pub private_channels: Option<PrivateChannels>,
    /// Serves the built-in SSE poke stream.
    pub sse: Option<SseSettings>,
}

impl PokeSettings {
    /// The sinks the variables ask for. With tokens on (`tokens_on`), Pusher pokes go to private
    /// channels (`private-space-abc`) that only users who may read the space can subscribe to.
    pub fn from_args(args: &PokeArgs, tokens_on: bool) -> anyhow::Result<PokeSettings> {
        let pusher = pusher_config(&args.pusher, tokens_on)?;
        let sse = args.sse.settings(pusher.is_some());
        let sse = sse.map_err(anyhow::Error::msg)?;
        match &pusher {
            Some(config) => tracing::info!(
                channels = %format!("{}<space>", config.channel_prefix),
                "pokes through Pusher"
            ),
            None => tracing::info!("pokes through Pusher are off: no PUSHER_* variables are set"),
        }
        if sse.is_some() {
            tracing::info!("SSE pokes on at GET /spaces/{{space}}/poke (single instance only)");
        }
        Ok(PokeSettings {
            private_channels: pusher
                .as_ref()
                .filter(|_| tokens_on)
                .map(PrivateChannels::new),
            pusher: pusher.map(|config| (config, PokerOptions::default())),
            sse,
        })
    }
}

/// Pusher's settings, `None` when no PUSHER_* variable is set; with tokens on, the channel
/// prefix gets `private-` in front when it lacks it.
fn pusher_config(args: &PusherArgs, tokens_on: bool) -> anyhow::Result<Option<PusherConfig>> {
    let Some(mut pusher) = PusherConfig::from_args(args).context("invalid Pusher configuration")?
    else {
        return Ok(None);
    };
    if tokens_on && !pusher.channel_prefix.starts_with(PRIVATE_PREFIX) {
        pusher.channel_prefix = format!("{PRIVATE_PREFIX}{}", pusher.channel_prefix);
        pusher.validate().context("invalid Pusher configuration")?;
    }
    Ok(Some(pusher))
}
