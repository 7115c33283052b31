//! What every Postgres session of replisync is set up with at connect time (in the startup
//! packet: no extra round trip): bounds on how long it may wait for a lock, run a statement or
//! sit idle inside a transaction, TCP keepalives so that the server notices a peer that went
//! away, and READ COMMITTED as the isolation of the statements that run without an explicit
//! `BEGIN` (whatever the server's, database's or role's default).

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

/// The isolation replisync's statements are written for (see the push functions' migrations).
pub const ISOLATION: &str = "read committed";

/// Bounds on a database session. A zero duration leaves that bound off (Postgres's 0), or for
/// the keepalive, the operating system's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Longest wait for a lock (a space's, held by another instance or by a dead connection);
    /// past it the statement fails and the push is answered 503.
    pub lock_timeout: Duration,
    /// Longest time a session may sit idle inside a transaction before the server ends it,
    /// releasing its locks (a replisync that froze or lost its network mid-push).
    pub idle_in_transaction_timeout: Duration,
    /// Longest statement (a streamed pull's read runs as long as its stream).
    pub statement_timeout: Duration,
    /// Idle seconds before the server probes a quiet connection; it gives up after three
    /// unanswered probes a third of this apart, and drops a connection whose sent data stays
    /// unacknowledged twice this long.
    pub tcp_keepalive: Duration,
}

impl SessionLimits {
    /// The defaults for a request timeout and a streamed pull's deadline: a lock is waited for
    /// a third of the request timeout (what a push may spend on its mutators), a transaction
    /// may idle for twice the request timeout (replisync drops a request's transaction at the
    /// request timeout), a statement may run as long as a streamed pull plus a request, and
    /// keepalives start after 15 s of silence.
    pub fn for_timeouts(request_timeout: Duration, pull_stream_deadline: Duration) -> Self {
        SessionLimits {
            lock_timeout: request_timeout / 3,
            idle_in_transaction_timeout: request_timeout * 2,
            statement_timeout: pull_stream_deadline + request_timeout,
            tcp_keepalive: Duration::from_secs(15),
        }
    }

    /// `options` with these bounds and READ COMMITTED as the session's default isolation, set
    /// after any options the URL carries (so these win).
    pub fn apply(&self, options: PgConnectOptions) -> PgConnectOptions {
        options.options(self.settings())
    }

    /// The `-c name=value` settings of the startup packet.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        let mut settings = vec![
            ("default_transaction_isolation", ISOLATION.to_owned()),
            ("lock_timeout", millis(self.lock_timeout)),
            (
                "idle_in_transaction_session_timeout",
                millis(self.idle_in_transaction_timeout),
            ),
            ("statement_timeout", millis(self.statement_timeout)),
        ];
        let keepalive = self.tcp_keepalive.as_secs();
        if keepalive > 0 {
            settings.extend([
                ("tcp_keepalives_idle", keepalive.to_string()),
                (
                    "tcp_keepalives_interval",
                    (keepalive / 3).max(1).to_string(),
                ),
                ("tcp_keepalives_count", "3".to_owned()),
                ("tcp_user_timeout", (keepalive * 2 * 1000).to_string()),
            ]);
        }
        settings
    }
}

impl Default for SessionLimits {
    /// The defaults for replisync's default timeouts (30 s requests, 120 s streamed pulls).
    fn default() -> Self {
        SessionLimits::for_timeouts(Duration::from_secs(30), Duration::from_secs(120))
    }
}

/// A duration as Postgres takes it without a unit: whole milliseconds, at most `i32::MAX`.
fn millis(duration: Duration) -> String {
    duration.as_millis().min(i32::MAX as u128).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_follow_the_request_timeout() {
        let limits = SessionLimits::default();
        assert_eq!(limits.lock_timeout, Duration::from_secs(10));
        assert_eq!(limits.idle_in_transaction_timeout, Duration::from_secs(60));
        assert_eq!(limits.statement_timeout, Duration::from_secs(150));
    }

    #[test]
    fn every_bound_is_a_setting_and_zero_keepalive_leaves_the_system_defaults() {
        let limits = SessionLimits {
            tcp_keepalive: Duration::ZERO,
            ..SessionLimits::default()
        };
        let settings = limits.settings();
        assert!(settings.contains(&("lock_timeout", "10000".to_owned())));
        assert!(settings.contains(&("default_transaction_isolation", ISOLATION.to_owned())));
        assert!(!settings.iter().any(|(name, _)| name.starts_with("tcp_")));
        let with_keepalive = SessionLimits::default().settings();
        assert!(with_keepalive.contains(&("tcp_keepalives_interval", "5".to_owned())));
        assert!(with_keepalive.contains(&("tcp_user_timeout", "30000".to_owned())));
    }
}
