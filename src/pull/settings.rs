//! Pull's settings: how many pulls may stream at once, which deltas are shared, and how long a
//! streamed pull may take, from the `REPLISYNC_*PULL*` variables.

use std::time::Duration;

use super::{PullLimits, StreamLimits};

/// How long a streamed pull waits for a turn before it is answered 503.
const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// The pull variables as given; [`PullArgs::limits`] turns them into [`PullLimits`].
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Pull")]
pub struct PullArgs {
    /// Streamed pulls (first pulls, and deltas over REPLISYNC_MAX_SHARED_DELTA_BYTES) in flight
    /// at once; others wait up to 5 s for a turn,
    /// then get 503. Unset: half of REPLISYNC_DB_MAX_CONNECTIONS, so pushes and health checks
    /// always find a connection.
    #[arg(long, env = "REPLISYNC_MAX_FIRST_PULLS")]
    pub max_first_pulls: Option<usize>,

    /// Largest delta, in bytes, that an incremental pull builds in memory and shares with
    /// identical concurrent pulls. A larger delta is streamed to each pull from a snapshot of its
    /// own, like a first pull, and counts against REPLISYNC_MAX_FIRST_PULLS.
    #[arg(long, env = "REPLISYNC_MAX_SHARED_DELTA_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_shared_delta_bytes: usize,

    /// Seconds a client may leave a streamed pull unread before it is cut off (its database
    /// snapshot and connection released).
    #[arg(long, env = "REPLISYNC_PULL_STALL_TIMEOUT_SECS", default_value_t = 15)]
    pub pull_stall_timeout_secs: u64,

    /// Seconds a streamed pull may take in all before it is cut off.
    #[arg(
        long,
        env = "REPLISYNC_PULL_STREAM_TIMEOUT_SECS",
        default_value_t = 120
    )]
    pub pull_stream_timeout_secs: u64,
}

impl PullArgs {
    /// The limits; streamed pulls in flight default to half the database's connections.
    pub fn limits(&self, db_max_connections: u32) -> PullLimits {
        PullLimits {
            max_first_pulls: self
                .max_first_pulls
                .unwrap_or(db_max_connections as usize / 2)
                .max(1),
            max_shared_delta_bytes: self.max_shared_delta_bytes,
            queue_wait: QUEUE_WAIT,
            stream: StreamLimits {
                stall: Duration::from_secs(self.pull_stall_timeout_secs.max(1)),
                deadline: Duration::from_secs(self.pull_stream_timeout_secs.max(1)),
            },
        }
    }
}

impl Default for PullLimits {
    fn default() -> Self {
        PullLimits {
            max_first_pulls: 4,
            max_shared_delta_bytes: 4 * 1024 * 1024,
            queue_wait: QUEUE_WAIT,
            stream: StreamLimits {
                stall: Duration::from_secs(15),
                deadline: Duration::from_secs(120),
            },
        }
    }
}
