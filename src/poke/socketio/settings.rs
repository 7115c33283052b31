//! The socket.io sink's settings, from the `REPLISYNC_SOCKETIO_*` variables: which Redis, and
//! where in the cluster pokes go (adapter key, namespace, room prefix, event), checked at start.

use std::time::Duration;

use redis::IntoConnectionInfo;
use secrecy::{ExposeSecret, SecretString};

use super::packet::{DEFAULT_KEY, DEFAULT_NAMESPACE};
use super::publisher::{DEFAULT_EVENT, DEFAULT_ROOM_PREFIX, EmitterTarget};
use crate::poke::delivery::PokerOptions;

/// Longest key, namespace, room prefix or event name accepted.
const MAX_NAME_LEN: usize = 200;
/// Events socket.io reserves: a client cannot listen to them as ordinary events.
const RESERVED_EVENTS: [&str; 6] = [
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
];

/// The socket.io variables as given; [`SocketIoArgs::settings`] checks them.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Pokes through socket.io")]
pub struct SocketIoArgs {
    /// The Redis that joins a socket.io cluster (its `@socket.io/redis-adapter`):
    /// `redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS (verified against the
    /// system's CAs, or those of the PEM file SSL_CERT_FILE names). Pokes are published there for
    /// the cluster to deliver; unset, socket.io pokes are off.
    #[arg(long, env = "REPLISYNC_SOCKETIO_REDIS_URL", hide_env_values = true)]
    pub socketio_redis_url: Option<SecretString>,

    /// The adapter's key (`createAdapter(pub, sub, { key })`).
    #[arg(long, env = "REPLISYNC_SOCKETIO_KEY", default_value = DEFAULT_KEY)]
    pub socketio_key: String,

    /// The socket.io namespace the clients connect to.
    #[arg(long, env = "REPLISYNC_SOCKETIO_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub socketio_namespace: String,

    /// Space `abc` is poked in room `<prefix>abc`.
    #[arg(long, env = "REPLISYNC_SOCKETIO_ROOM_PREFIX", default_value = DEFAULT_ROOM_PREFIX)]
    pub socketio_room_prefix: String,

    /// The event clients listen to (`socket.on('poke', ...)`).
    #[arg(long, env = "REPLISYNC_SOCKETIO_EVENT", default_value = DEFAULT_EVENT)]
    pub socketio_event: String,

    /// Milliseconds one publish to Redis may take, connecting included, before it counts as
    /// failed and is retried.
    #[arg(long, env = "REPLISYNC_SOCKETIO_TIMEOUT_MS", default_value_t = 2000)]
    pub socketio_timeout_ms: u64,

    /// Publishes of one batch of pokes, the first included, before it is given up. Retries
    /// back off from 100 ms, doubling to 5 s: the default 8 keep retrying about 11 s, which is
    /// how long Redis may be away without losing a poke.
    #[arg(long, env = "REPLISYNC_SOCKETIO_MAX_ATTEMPTS", default_value_t = 8)]
    pub socketio_max_attempts: u32,

    /// Most spaces waiting for their poke while Redis is slow or down; past it the oldest is
    /// dropped (its clients catch up at their next pull).
    #[arg(
        long,
        env = "REPLISYNC_SOCKETIO_MAX_PENDING_SPACES",
        default_value_t = PokerOptions::default().max_pending_spaces
    )]
    pub socketio_max_pending_spaces: usize,
}

/// The socket.io sink's settings, checked.
#[derive(Clone, Debug)]
pub struct SocketIoSettings {
    pub redis_url: SecretString,
    pub target: EmitterTarget,
    pub timeout: Duration,
    pub options: PokerOptions,
}

impl SocketIoArgs {
    /// The sink's settings, `None` when REPLISYNC_SOCKETIO_REDIS_URL is unset or blank. Errors
    /// name the variable to fix and never echo the URL (it may hold a password).
    pub fn settings(&self) -> Result<Option<SocketIoSettings>, String> {
        let Some(url) = self
            .socketio_redis_url
            .as_ref()
            .map(|url| url.expose_secret().trim())
            .filter(|url| !url.is_empty())
        else {
            return Ok(None);
        };
        check_redis_url(url)?;
        let target = EmitterTarget {
            key: checked_name("REPLISYNC_SOCKETIO_KEY", &self.socketio_key, false)?,
            namespace: checked_namespace(&self.socketio_namespace)?,
            room_prefix: checked_name(
                "REPLISYNC_SOCKETIO_ROOM_PREFIX",
                &self.socketio_room_prefix,
                true,
            )?,
            event: checked_event(&self.socketio_event)?,
        };
        Ok(Some(SocketIoSettings {
            redis_url: url.into(),
            target,
            timeout: self.timeout()?,
            options: self.poker_options()?,
        }))
    }

    fn timeout(&self) -> Result<Duration, String> {
        match self.socketio_timeout_ms {
            1..=60_000 => Ok(Duration::from_millis(self.socketio_timeout_ms)),
            _ => Err("REPLISYNC_SOCKETIO_TIMEOUT_MS must be from 1 to 60000".to_owned()),
        }
    }

    fn poker_options(&self) -> Result<PokerOptions, String> {
        if !(1..=100).contains(&self.socketio_max_attempts) {
            return Err("REPLISYNC_SOCKETIO_MAX_ATTEMPTS must be from 1 to 100".to_owned());
        }
        if self.socketio_max_pending_spaces == 0 {
            return Err("REPLISYNC_SOCKETIO_MAX_PENDING_SPACES must be above 0".to_owned());
        }
        let timeout = self.timeout()?;
        Ok(PokerOptions {
            max_pending_spaces: self.socketio_max_pending_spaces,
            max_attempts: self.socketio_max_attempts,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            connect_timeout: timeout,
            request_timeout: timeout,
            ..PokerOptions::default()
        })
    }
}

/// A `redis://` or `rediss://` URL the Redis client accepts; the error never quotes it.
fn check_redis_url(url: &str) -> Result<(), String> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    if !matches!(scheme, Some("redis" | "rediss")) {
        return Err(
            "REPLISYNC_SOCKETIO_REDIS_URL must start with redis:// (or rediss:// for TLS), as in \
             redis://:password@host:6379/0"
                .to_owned(),
        );
    }
    url.into_connection_info()
        .map(|_| ())
        .map_err(|error| format!("REPLISYNC_SOCKETIO_REDIS_URL is not a valid Redis URL: {error}"))
}

/// `value` unless it is too long, holds whitespace or control characters, or (unless
/// `may_be_empty`) is empty.
fn checked_name(variable: &str, value: &str, may_be_empty: bool) -> Result<String, String> {
    if value.is_empty() && !may_be_empty {
        return Err(format!("{variable} must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(format!("{variable} must be at most {MAX_NAME_LEN} bytes"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{variable} must not contain spaces or control characters"
        ));
    }
    Ok(value.to_owned())
}

/// The namespace with its leading `/` (socket.io's own spelling), checked as a name.
fn checked_namespace(value: &str) -> Result<String, String> {
    let namespace = checked_name("REPLISYNC_SOCKETIO_NAMESPACE", value, false)?;
    if namespace.starts_with('/') {
        Ok(namespace)
    } else {
        Ok(format!("/{namespace}"))
    }
}

fn checked_event(value: &str) -> Result<String, String> {
    let event = checked_name("REPLISYNC_SOCKETIO_EVENT", value, false)?;
    if RESERVED_EVENTS.contains(&event.as_str()) {
        return Err(format!(
            "REPLISYNC_SOCKETIO_EVENT cannot be `{event}`: socket.io reserves it, so clients \
             could not listen to it; the default is `{DEFAULT_EVENT}`"
        ));
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_feature_args;

    fn settings(args: &[&str]) -> Result<Option<SocketIoSettings>, String> {
        parse_feature_args::<SocketIoArgs>(args).settings()
    }

    #[test]
    fn without_a_redis_url_socketio_pokes_are_off() {
        assert!(settings(&[]).unwrap().is_none());
        assert!(
            settings(&["--socketio-redis-url= "]).unwrap().is_none(),
            "blank counts as unset"
        );
    }

    #[test]
    fn defaults_match_the_node_emitter_and_adapter() {
        let on = settings(&["--socketio-redis-url=redis://127.0.0.1:6379"])
            .unwrap()
            .expect("on");
        assert_eq!(on.target, EmitterTarget::default());
        assert_eq!(on.target.key, "socket.io");
        assert_eq!(on.target.namespace, "/");
        assert_eq!(on.timeout, Duration::from_secs(2));
        assert_eq!(on.options.max_attempts, 8);
        assert_eq!(on.options.max_backoff, Duration::from_secs(5));
    }

    #[test]
    fn a_namespace_without_its_slash_gets_one() {
        let on = settings(&[
            "--socketio-redis-url=redis://127.0.0.1",
            "--socketio-namespace=pokes",
        ])
        .unwrap()
        .expect("on");
        assert_eq!(on.target.namespace, "/pokes");
    }

    #[test]
    fn bad_values_are_refused_by_variable_name_without_echoing_the_url() {
        let url = "--socketio-redis-url=redis://:pw-123@127.0.0.1:6379";
        let cases: [(&[&str], &str); 10] = [
            (
                &["--socketio-redis-url=http://:pw-123@host"],
                "REPLISYNC_SOCKETIO_REDIS_URL",
            ),
            (
                &["--socketio-redis-url=redis://:pw-123@host:99999"],
                "REPLISYNC_SOCKETIO_REDIS_URL",
            ),
            (&[url, "--socketio-key="], "REPLISYNC_SOCKETIO_KEY"),
            (
                &[url, "--socketio-namespace=a b"],
                "REPLISYNC_SOCKETIO_NAMESPACE",
            ),
            (
                &[url, "--socketio-room-prefix=x\ty"],
                "REPLISYNC_SOCKETIO_ROOM_PREFIX",
            ),
            (
                &[url, "--socketio-event=disconnect"],
                "REPLISYNC_SOCKETIO_EVENT",
            ),
            (
                &[url, "--socketio-timeout-ms=0"],
                "REPLISYNC_SOCKETIO_TIMEOUT_MS",
            ),
            (
                &[url, "--socketio-max-attempts=0"],
                "REPLISYNC_SOCKETIO_MAX_ATTEMPTS",
            ),
            (
                &[url, "--socketio-max-pending-spaces=0"],
                "REPLISYNC_SOCKETIO_MAX_PENDING_SPACES",
            ),
            (
                &[url, &format!("--socketio-event={}", "e".repeat(201))],
                "REPLISYNC_SOCKETIO_EVENT",
            ),
        ];
        for (args, variable) in cases {
            let error = settings(args).expect_err(variable);
            assert!(error.contains(variable), "{args:?}: {error}");
            assert!(!error.contains("pw-123"), "{args:?}: {error}");
        }
    }

    #[test]
    fn an_empty_room_prefix_pokes_the_room_named_after_the_space() {
        let on = settings(&["--socketio-redis-url=redis://h", "--socketio-room-prefix="])
            .unwrap()
            .expect("on");
        assert_eq!(on.target.room_prefix, "");
    }
}
