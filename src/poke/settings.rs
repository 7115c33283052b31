//! Which poke sinks run and how, from the PUSHER_*, REPLISYNC_SOCKETIO_* and REPLISYNC_SSE*
//! variables: Pusher (private channels when tokens are on), socket.io, the SSE stream, or several.

use anyhow::Context;

use super::pusher::{PRIVATE_PREFIX, PokerOptions, PrivateChannels, PusherArgs, PusherConfig};
use super::socketio::{SocketIoArgs, SocketIoSettings};
use super::sse::settings::{SseArgs, SseSettings};
use super::{pusher, socketio};

/// The pokes' variables as given; [`PokeSettings::from_args`] checks them.
#[derive(clap::Args, Debug, Clone)]
pub struct PokeArgs {
    #[command(flatten)]
    pub pusher: PusherArgs,

    #[command(flatten)]
    pub socketio: SocketIoArgs,

    #[command(flatten)]
    pub sse: SseArgs,

    /// Most spaces waiting for their Pusher poke while Pusher is slow or down; past it the
    /// oldest is dropped (its clients catch up at their next pull).
    #[arg(
        long,
        env = "REPLISYNC_PUSHER_MAX_PENDING_SPACES",
        help_heading = "Pokes through Pusher",
        default_value_t = PokerOptions::default().max_pending_spaces
    )]
    pub pusher_max_pending_spaces: usize,
}

/// The pokes' settings, checked; `Pokes::start` (sinks.rs) starts what they name.
#[derive(Debug, Default)]
pub struct PokeSettings {
    /// Publishes pokes through a Pusher-compatible HTTP API.
    pub pusher: Option<(PusherConfig, PokerOptions)>,
    /// Publishes pokes into a socket.io cluster through its Redis adapter.
    pub socketio: Option<SocketIoSettings>,
    /// Signs subscriptions to private poke channels (`POST /pusher/auth`).
    pub private_channels: Option<PrivateChannels>,
    /// Serves the built-in SSE poke stream.
    pub sse: Option<SseSettings>,
}

impl PokeSettings {
    /// The sinks the variables ask for. With tokens on (`tokens_on`), Pusher pokes go to private
    /// channels (`private-space-abc`) that only users who may read the space can subscribe to.
    pub fn from_args(args: &PokeArgs, tokens_on: bool) -> anyhow::Result<PokeSettings> {
        if args.pusher_max_pending_spaces == 0 {
            anyhow::bail!("REPLISYNC_PUSHER_MAX_PENDING_SPACES must be above 0");
        }
        let pusher = pusher_config(&args.pusher, tokens_on)?;
        let socketio = args.socketio.settings().map_err(anyhow::Error::msg)?;
        let sse = args.sse.settings(pusher.is_some() || socketio.is_some());
        let sse = sse.map_err(anyhow::Error::msg)?;
        match &pusher {
            Some(config) => tracing::info!(
                channels = %format!("{}<space>", config.channel_prefix),
                "pokes through Pusher"
            ),
            None => tracing::info!("pokes through Pusher are off: no PUSHER_* variables are set"),
        }
        if let Some(socketio) = &socketio {
            tracing::info!(
                rooms = %format!("{}<space>", socketio.target.room_prefix),
                key = %socketio.target.key,
                namespace = %socketio.target.namespace,
                event = %socketio.target.event,
                "pokes through socket.io (its Redis adapter)"
            );
        }
        if sse.is_some() {
            tracing::info!("SSE pokes on at GET /spaces/{{space}}/poke (single instance only)");
        }
        Ok(PokeSettings {
            private_channels: pusher
                .as_ref()
                .filter(|_| tokens_on)
                .map(PrivateChannels::new),
            pusher: pusher.map(|config| {
                let options = PokerOptions {
                    max_pending_spaces: args.pusher_max_pending_spaces,
                    ..PokerOptions::default()
                };
                (config, options)
            }),
            socketio,
            sse,
        })
    }
}

impl PokeSettings {
    /// Checks, in the background, that Pusher's server and socket.io's Redis answer, and logs
    /// what it finds (call it inside a Tokio runtime).
    pub fn spawn_reachability_checks(&self) {
        if let Some((config, options)) = &self.pusher {
            tokio::spawn(pusher::log_reachability(config.clone(), options.clone()));
        }
        if let Some(settings) = &self.socketio {
            tokio::spawn(socketio::log_reachability(
                settings.redis_url.clone(),
                settings.target.clone(),
                settings.timeout,
            ));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_feature_args;

    const PUSHER: [&str; 6] = [
        "--pusher-app-id=1",
        "--pusher-key=key",
        "--pusher-secret=secret",
        "--pusher-host=127.0.0.1",
        "--pusher-port=6001",
        "--pusher-scheme=http",
    ];

    fn settings(extra: &[&str]) -> anyhow::Result<PokeSettings> {
        let args: Vec<&str> = PUSHER.iter().chain(extra).copied().collect();
        PokeSettings::from_args(&parse_feature_args::<PokeArgs>(&args), false)
    }

    #[test]
    fn the_pusher_queue_holds_ten_thousand_spaces_unless_told_otherwise() {
        let (_, options) = settings(&[]).unwrap().pusher.expect("Pusher on");
        assert_eq!(options.max_pending_spaces, 10_000);
        let told = settings(&["--pusher-max-pending-spaces=50"]).unwrap();
        assert_eq!(told.pusher.expect("Pusher on").1.max_pending_spaces, 50);
    }

    #[test]
    fn an_empty_pusher_queue_is_refused_by_name() {
        let error = settings(&["--pusher-max-pending-spaces=0"]).expect_err("refused");
        assert!(
            error
                .to_string()
                .contains("REPLISYNC_PUSHER_MAX_PENDING_SPACES"),
            "{error}"
        );
    }

    #[test]
    fn sse_is_on_by_default_only_without_another_sink() {
        let only = |args: &[&str]| {
            PokeSettings::from_args(&parse_feature_args::<PokeArgs>(args), false).unwrap()
        };
        assert!(only(&[]).sse.is_some(), "no other sink: SSE on");
        let socketio = only(&["--socketio-redis-url=redis://127.0.0.1:6379"]);
        assert!(socketio.socketio.is_some());
        assert!(socketio.sse.is_none(), "socket.io on: SSE off");
        assert!(settings(&[]).unwrap().sse.is_none(), "Pusher on: SSE off");
        let asked = only(&["--socketio-redis-url=redis://h", "--sse=true"]);
        assert!(
            asked.sse.is_some() && asked.socketio.is_some(),
            "both when asked"
        );
    }

    #[test]
    fn tokens_make_pusher_channels_private_and_signable() {
        let args = parse_feature_args::<PokeArgs>(&PUSHER);
        let open = PokeSettings::from_args(&args, false).unwrap();
        assert!(open.private_channels.is_none());
        assert_eq!(open.pusher.expect("Pusher on").0.channel_prefix, "space-");
        let private = PokeSettings::from_args(&args, true).unwrap();
        assert!(private.private_channels.is_some());
        assert_eq!(
            private.pusher.expect("Pusher on").0.channel_prefix,
            "private-space-"
        );
    }
}
