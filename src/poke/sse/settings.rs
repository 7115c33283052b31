//! The SSE poke stream's settings: whether it is on, its keep-alive, and how many streams may
//! be open, from the `REPLISYNC_SSE*` variables.

use std::time::Duration;

use super::StreamLimits;

/// The SSE variables as given; [`SseArgs::settings`] checks them.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Pokes through SSE")]
pub struct SseArgs {
    /// The built-in SSE poke stream: on by default when neither Pusher nor socket.io pokes are on.
    #[arg(long, env = "REPLISYNC_SSE", action = clap::ArgAction::Set)]
    pub sse: Option<bool>,

    /// Seconds between keep-alive comments on SSE poke streams.
    #[arg(long, env = "REPLISYNC_SSE_KEEPALIVE_SECS", default_value_t = 15)]
    pub sse_keepalive_secs: u64,

    /// Most SSE poke streams open at once; beyond it, `GET /spaces/{space}/poke` is answered 503
    /// with Retry-After.
    #[arg(long, env = "REPLISYNC_SSE_MAX_STREAMS", default_value_t = 1000)]
    pub sse_max_streams: usize,

    /// Most SSE poke streams open at once on one space; beyond it, 503 with Retry-After.
    #[arg(
        long,
        env = "REPLISYNC_SSE_MAX_STREAMS_PER_SPACE",
        default_value_t = 100
    )]
    pub sse_max_streams_per_space: usize,

    /// Most SSE poke streams one user may have open at once (across spaces and tabs), so that
    /// no user can fill the per-space or total caps for others; beyond it, 503 with Retry-After.
    /// Not applied without authentication, where every caller is the same anonymous user.
    #[arg(long, env = "REPLISYNC_SSE_MAX_STREAMS_PER_USER", default_value_t = 20)]
    pub sse_max_streams_per_user: usize,
}

/// How the SSE poke stream runs: its keep-alive interval and its caps.
#[derive(Clone, Copy, Debug)]
pub struct SseSettings {
    /// Time between keep-alive comments.
    pub keep_alive: Duration,
    pub limits: StreamLimits,
}

impl Default for SseSettings {
    fn default() -> Self {
        SseSettings {
            keep_alive: Duration::from_secs(15),
            limits: StreamLimits {
                total: 1000,
                per_space: 100,
                per_user: 20,
            },
        }
    }
}

impl SseArgs {
    /// The stream's settings, checked; `None` when it is off (by default, when another poke
    /// sink is on).
    pub fn settings(&self, other_sink_on: bool) -> Result<Option<SseSettings>, String> {
        for (value, name) in [
            (self.sse_max_streams, "REPLISYNC_SSE_MAX_STREAMS"),
            (
                self.sse_max_streams_per_space,
                "REPLISYNC_SSE_MAX_STREAMS_PER_SPACE",
            ),
            (
                self.sse_max_streams_per_user,
                "REPLISYNC_SSE_MAX_STREAMS_PER_USER",
            ),
        ] {
            if value == 0 {
                return Err(format!("{name} must be above 0"));
            }
        }
        if !self.sse.unwrap_or(!other_sink_on) {
            return Ok(None);
        }
        Ok(Some(SseSettings {
            keep_alive: Duration::from_secs(self.sse_keepalive_secs.max(1)),
            limits: StreamLimits {
                total: self.sse_max_streams,
                per_space: self.sse_max_streams_per_space,
                per_user: self.sse_max_streams_per_user,
            },
        }))
    }
}
