//! Pusher configuration: the `PUSHER_*` variables (clap flags and env), parsed and validated
//! into a [`PusherConfig`] with errors that name the variable to fix.

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};

use crate::protocol::{MAX_SPACE_ID_LEN, SpaceId};

const MAX_CHANNEL_NAME_LEN: usize = 164;
const MAX_CHANNEL_PREFIX_LEN: usize = MAX_CHANNEL_NAME_LEN - MAX_SPACE_ID_LEN;
const MAX_EVENT_NAME_LEN: usize = 200;
const DEFAULT_CHANNEL_PREFIX: &str = "space-";
const DEFAULT_EVENT_NAME: &str = "poke";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    fn parse(raw: &str) -> Option<Scheme> {
        match raw.to_ascii_lowercase().as_str() {
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            _ => None,
        }
    }
}

/// The `PUSHER_*` settings as given, unparsed: [`PusherConfig::from_args`] checks them.
/// Setting any of them turns Pusher pokes on; blank values count as unset.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Pokes through Pusher")]
pub struct PusherArgs {
    /// Pusher app id (Pusher pokes are off while every PUSHER_* variable is unset).
    #[arg(long = "pusher-app-id", env = "PUSHER_APP_ID")]
    pub app_id: Option<String>,

    /// Pusher app key.
    #[arg(long = "pusher-key", env = "PUSHER_KEY")]
    pub key: Option<String>,

    /// Pusher app secret, which signs every call.
    #[arg(long = "pusher-secret", env = "PUSHER_SECRET", hide_env_values = true)]
    pub secret: Option<SecretString>,

    /// Pusher itself: the cluster of your app (host api-<cluster>.pusher.com, https).
    #[arg(long = "pusher-cluster", env = "PUSHER_CLUSTER")]
    pub cluster: Option<String>,

    /// Self-hosted compatibles: host of the HTTP API (overrides the cluster's host).
    #[arg(long = "pusher-host", env = "PUSHER_HOST")]
    pub host: Option<String>,

    /// Port of the HTTP API [default: 443 for https, 80 for http].
    #[arg(long = "pusher-port", env = "PUSHER_PORT")]
    pub port: Option<String>,

    /// `http` or `https` [default: https].
    #[arg(long = "pusher-scheme", env = "PUSHER_SCHEME")]
    pub scheme: Option<String>,

    /// Space `abc` is poked on channel `<prefix>abc` [default: space-].
    #[arg(long = "pusher-channel-prefix", env = "PUSHER_CHANNEL_PREFIX")]
    pub channel_prefix: Option<String>,

    /// The event clients bind to [default: poke].
    #[arg(long = "pusher-event-name", env = "PUSHER_EVENT_NAME")]
    pub event_name: Option<String>,
}

impl PusherArgs {
    /// The same settings, trimmed, with blank values unset.
    fn without_blanks(&self) -> PusherArgs {
        PusherArgs {
            app_id: non_blank(&self.app_id),
            key: non_blank(&self.key),
            secret: non_blank_secret(&self.secret),
            cluster: non_blank(&self.cluster),
            host: non_blank(&self.host),
            port: non_blank(&self.port),
            scheme: non_blank(&self.scheme),
            channel_prefix: non_blank(&self.channel_prefix),
            event_name: non_blank(&self.event_name),
        }
    }

    fn is_unset(&self) -> bool {
        let plain = [
            &self.app_id,
            &self.key,
            &self.cluster,
            &self.host,
            &self.port,
            &self.scheme,
            &self.channel_prefix,
            &self.event_name,
        ];
        plain.iter().all(|value| value.is_none()) && self.secret.is_none()
    }
}

fn non_blank(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .map(str::to_owned)
}

fn non_blank_secret(value: &Option<SecretString>) -> Option<SecretString> {
    value
        .as_ref()
        .map(|secret| secret.expose_secret().trim())
        .filter(|secret| !secret.is_empty())
        .map(SecretString::from)
}

/// Where and how to publish pokes. Build it with [`PusherConfig::from_args`], which validates it.
/// Its `Debug` shows the secret as `[REDACTED]`.
#[derive(Clone, Debug)]
pub struct PusherConfig {
    pub app_id: String,
    pub key: String,
    pub secret: SecretString,
    pub host: String,
    pub port: u16,
    pub scheme: Scheme,
    /// Channel of space `abc` is `{channel_prefix}abc`.
    pub channel_prefix: String,
    pub event_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PusherConfigError {
    #[error(
        "incomplete Pusher configuration: set {} (or unset every PUSHER_* variable to turn pokes off)",
        .missing.join(", ")
    )]
    Missing { missing: Vec<&'static str> },
    #[error("PUSHER_PORT must be a port number from 1 to 65535, got {0:?}")]
    InvalidPort(String),
    #[error("PUSHER_SCHEME must be http or https, got {0:?}")]
    InvalidScheme(String),
    #[error("PUSHER_CLUSTER must be a cluster name such as mt1 or eu (a-z, 0-9, -), got {0:?}")]
    InvalidCluster(String),
    #[error(
        "PUSHER_HOST must be a bare host name such as api-eu.pusher.com or 127.0.0.1 \
         (scheme and port go in PUSHER_SCHEME and PUSHER_PORT), got {0:?}"
    )]
    InvalidHost(String),
    #[error("PUSHER_APP_ID may hold only A-Z a-z 0-9 - _ ., got {0:?}")]
    InvalidAppId(String),
    #[error("PUSHER_CHANNEL_PREFIX {prefix:?} is invalid: {reason}")]
    InvalidChannelPrefix { prefix: String, reason: String },
    #[error("PUSHER_EVENT_NAME {name:?} is invalid: {reason}")]
    InvalidEventName { name: String, reason: &'static str },
}

impl PusherConfig {
    /// Parses and validates the `PUSHER_*` settings (blank values count as unset).
    /// `Ok(None)` when none is set: pokes are off.
    pub fn from_args(args: &PusherArgs) -> Result<Option<PusherConfig>, PusherConfigError> {
        let args = args.without_blanks();
        if args.is_unset() {
            return Ok(None);
        }

        let mut missing = Vec::new();
        let app_id = required(&mut missing, "PUSHER_APP_ID", args.app_id);
        let key = required(&mut missing, "PUSHER_KEY", args.key);
        let secret = required(&mut missing, "PUSHER_SECRET", args.secret);
        let cluster = args.cluster;
        let host = required(
            &mut missing,
            "PUSHER_CLUSTER or PUSHER_HOST",
            args.host
                .or_else(|| cluster.as_deref().map(pusher_cluster_host)),
        );
        if !missing.is_empty() {
            return Err(PusherConfigError::Missing { missing });
        }
        if let Some(cluster) = cluster {
            validate_cluster(&cluster)?;
        }

        let scheme = match args.scheme {
            Some(raw) => Scheme::parse(&raw).ok_or(PusherConfigError::InvalidScheme(raw))?,
            None => Scheme::Https,
        };
        let port = match args.port {
            Some(raw) => parse_port(&raw)?,
            None => scheme.default_port(),
        };
        let config = PusherConfig {
            app_id,
            key,
            secret,
            host,
            port,
            scheme,
            channel_prefix: args
                .channel_prefix
                .unwrap_or_else(|| DEFAULT_CHANNEL_PREFIX.to_owned()),
            event_name: args
                .event_name
                .unwrap_or_else(|| DEFAULT_EVENT_NAME.to_owned()),
        };
        config.validate()?;
        Ok(Some(config))
    }

    /// [`PusherConfig::from_args`] on `PUSHER_*` variables read through `lookup` (tests write
    /// configurations as variable lists; start-up reads them through clap).
    #[cfg(test)]
    pub fn from_env(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<PusherConfig>, PusherConfigError> {
        PusherConfig::from_args(&PusherArgs {
            app_id: lookup("PUSHER_APP_ID"),
            key: lookup("PUSHER_KEY"),
            secret: lookup("PUSHER_SECRET").map(SecretString::from),
            cluster: lookup("PUSHER_CLUSTER"),
            host: lookup("PUSHER_HOST"),
            port: lookup("PUSHER_PORT"),
            scheme: lookup("PUSHER_SCHEME"),
            channel_prefix: lookup("PUSHER_CHANNEL_PREFIX"),
            event_name: lookup("PUSHER_EVENT_NAME"),
        })
    }

    /// Checks what `from_args` checks, for configurations built by hand.
    pub fn validate(&self) -> Result<(), PusherConfigError> {
        validate_app_id(&self.app_id)?;
        validate_host(&self.host)?;
        if self.port == 0 {
            return Err(PusherConfigError::InvalidPort(self.port.to_string()));
        }
        validate_channel_prefix(&self.channel_prefix)?;
        validate_event_name(&self.event_name)?;
        self.events_url()
            .map(|_| ())
            .map_err(|_| PusherConfigError::InvalidHost(self.host.clone()))
    }

    pub fn channel_for(&self, space: &SpaceId) -> String {
        format!("{}{}", self.channel_prefix, space.as_str())
    }

    /// The path that is signed: `/apps/{app_id}/events`.
    pub fn events_path(&self) -> String {
        format!("/apps/{}/events", self.app_id)
    }

    pub fn events_url(&self) -> Result<Url, UrlParseError> {
        Url::parse(&format!(
            "{}://{}:{}{}",
            self.scheme.as_str(),
            self.host,
            self.port,
            self.events_path()
        ))
    }
}

/// `reqwest` re-exports `Url` but not its parse error; this names it.
pub type UrlParseError = <Url as std::str::FromStr>::Err;

fn pusher_cluster_host(cluster: &str) -> String {
    format!("api-{cluster}.pusher.com")
}

/// `value`, or `T::default()` after noting `name` as missing.
fn required<T: Default>(
    missing: &mut Vec<&'static str>,
    name: &'static str,
    value: Option<T>,
) -> T {
    value.unwrap_or_else(|| {
        missing.push(name);
        T::default()
    })
}

fn parse_port(raw: &str) -> Result<u16, PusherConfigError> {
    match raw.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(PusherConfigError::InvalidPort(raw.to_owned())),
    }
}

fn validate_cluster(cluster: &str) -> Result<(), PusherConfigError> {
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if cluster.chars().all(valid) {
        Ok(())
    } else {
        Err(PusherConfigError::InvalidCluster(cluster.to_owned()))
    }
}

fn validate_host(host: &str) -> Result<(), PusherConfigError> {
    let is_ipv6_literal = host.starts_with('[') && host.ends_with(']');
    let forbidden = |c: char| c.is_whitespace() || "/?#@".contains(c) || c == ':';
    let bare = !host.is_empty() && (is_ipv6_literal || !host.contains(forbidden));
    if bare {
        Ok(())
    } else {
        Err(PusherConfigError::InvalidHost(host.to_owned()))
    }
}

fn validate_app_id(app_id: &str) -> Result<(), PusherConfigError> {
    let valid = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if !app_id.is_empty() && app_id.chars().all(valid) {
        Ok(())
    } else {
        Err(PusherConfigError::InvalidAppId(app_id.to_owned()))
    }
}

fn is_channel_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_-=@,.;".contains(c)
}

fn validate_channel_prefix(prefix: &str) -> Result<(), PusherConfigError> {
    let invalid = |reason: String| PusherConfigError::InvalidChannelPrefix {
        prefix: prefix.to_owned(),
        reason,
    };
    if prefix.len() > MAX_CHANNEL_PREFIX_LEN {
        return Err(invalid(format!(
            "at most {MAX_CHANNEL_PREFIX_LEN} characters, so that it plus a \
             {MAX_SPACE_ID_LEN}-character space id fits Pusher's {MAX_CHANNEL_NAME_LEN}-character \
             channel names"
        )));
    }
    if let Some(bad) = prefix.chars().find(|&c| !is_channel_name_char(c)) {
        return Err(invalid(format!(
            "channel names allow only A-Z a-z 0-9 _ - = @ , . ; (found {bad:?})"
        )));
    }
    if prefix.starts_with("private-encrypted-") {
        return Err(invalid(
            "end-to-end encrypted channels need encrypted event data, and pokes carry none".into(),
        ));
    }
    Ok(())
}

fn validate_event_name(name: &str) -> Result<(), PusherConfigError> {
    let invalid = |reason| PusherConfigError::InvalidEventName {
        name: name.to_owned(),
        reason,
    };
    if name.trim().is_empty() {
        return Err(invalid("it must not be empty"));
    }
    if name.len() > MAX_EVENT_NAME_LEN {
        return Err(invalid("Pusher allows at most 200 characters"));
    }
    if name.starts_with("pusher:") || name.starts_with("pusher_internal:") {
        return Err(invalid(
            "the pusher: prefixes are reserved for Pusher's own events",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::poke::pusher::test_support::{APP_ID, KEY, SECRET, space};

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let vars: HashMap<String, String> = pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        move |name: &str| vars.get(name).cloned()
    }

    fn credentials() -> Vec<(&'static str, &'static str)> {
        vec![
            ("PUSHER_APP_ID", APP_ID),
            ("PUSHER_KEY", KEY),
            ("PUSHER_SECRET", SECRET),
        ]
    }

    fn config_from(extra: &[(&str, &str)]) -> Result<Option<PusherConfig>, PusherConfigError> {
        let mut pairs = credentials();
        pairs.extend_from_slice(extra);
        PusherConfig::from_env(env(&pairs))
    }

    fn valid_config_from(extra: &[(&str, &str)]) -> PusherConfig {
        config_from(extra)
            .expect("valid configuration")
            .expect("pokes on")
    }

    fn pokes_are_off(result: Result<Option<PusherConfig>, PusherConfigError>) -> bool {
        matches!(result, Ok(None))
    }

    #[test]
    fn no_pusher_variables_means_pokes_off() {
        assert!(pokes_are_off(PusherConfig::from_env(env(&[]))));
        assert!(pokes_are_off(PusherConfig::from_env(env(&[
            ("HOME", "/root"),
            ("PUSHER", "x")
        ]))));
        assert!(pokes_are_off(PusherConfig::from_args(
            &PusherArgs::default()
        )));
    }

    #[test]
    fn empty_values_count_as_unset() {
        let names = clap_env_names();
        let all_empty: Vec<(&str, &str)> = names.iter().map(|name| (name.as_str(), "")).collect();
        assert!(pokes_are_off(PusherConfig::from_env(env(&all_empty))));
        let error = config_from(&[("PUSHER_CLUSTER", "eu"), ("PUSHER_SECRET", "  ")]);
        // The later, blank PUSHER_SECRET replaces the real one in the lookup table.
        assert_eq!(
            error.err(),
            Some(PusherConfigError::Missing {
                missing: vec!["PUSHER_SECRET"]
            })
        );
    }

    #[test]
    fn full_cluster_config() {
        let config = valid_config_from(&[("PUSHER_CLUSTER", "eu")]);
        assert_eq!(config.app_id, APP_ID);
        assert_eq!(config.key, KEY);
        assert_eq!(config.secret.expose_secret(), SECRET);
        assert_eq!(config.host, "api-eu.pusher.com");
        assert_eq!(config.scheme, Scheme::Https);
        assert_eq!(config.port, 443);
        assert_eq!(config.channel_prefix, "space-");
        assert_eq!(config.event_name, "poke");
        assert_eq!(config.channel_for(&space("abc")), "space-abc");
        assert_eq!(
            config.events_url().expect("url").as_str(),
            "https://api-eu.pusher.com/apps/12345/events"
        );
    }

    #[test]
    fn host_port_and_scheme_override_for_self_hosted_servers() {
        let config = valid_config_from(&[
            ("PUSHER_HOST", "127.0.0.1"),
            ("PUSHER_PORT", "6001"),
            ("PUSHER_SCHEME", "http"),
            ("PUSHER_CHANNEL_PREFIX", "private-replisync-"),
            ("PUSHER_EVENT_NAME", "pull-now"),
        ]);
        assert_eq!(config.host, "127.0.0.1");
        assert_eq!(config.port, 6001);
        assert_eq!(config.scheme, Scheme::Http);
        assert_eq!(config.event_name, "pull-now");
        assert_eq!(config.channel_for(&space("s1")), "private-replisync-s1");
        assert_eq!(
            config.events_url().expect("url").as_str(),
            "http://127.0.0.1:6001/apps/12345/events"
        );
    }

    #[test]
    fn port_defaults_from_scheme_and_host_wins_over_cluster() {
        let https = valid_config_from(&[("PUSHER_HOST", "ws.example.com")]);
        assert_eq!((https.scheme, https.port), (Scheme::Https, 443));
        let http =
            valid_config_from(&[("PUSHER_HOST", "ws.example.com"), ("PUSHER_SCHEME", "HTTP")]);
        assert_eq!((http.scheme, http.port), (Scheme::Http, 80));
        let both =
            valid_config_from(&[("PUSHER_HOST", "ws.example.com"), ("PUSHER_CLUSTER", "eu")]);
        assert_eq!(both.host, "ws.example.com");
    }

    fn missing_in(pairs: &[(&str, &str)]) -> Vec<&'static str> {
        match PusherConfig::from_env(env(pairs)) {
            Err(PusherConfigError::Missing { missing }) => missing,
            other => panic!("expected a missing-variables error, got {other:?}"),
        }
    }

    #[test]
    fn half_configurations_name_every_missing_variable() {
        assert_eq!(
            missing_in(&[("PUSHER_KEY", KEY)]),
            [
                "PUSHER_APP_ID",
                "PUSHER_SECRET",
                "PUSHER_CLUSTER or PUSHER_HOST"
            ]
        );
        assert_eq!(
            missing_in(&[
                ("PUSHER_APP_ID", APP_ID),
                ("PUSHER_KEY", KEY),
                ("PUSHER_SECRET", SECRET)
            ]),
            ["PUSHER_CLUSTER or PUSHER_HOST"]
        );
        assert_eq!(
            missing_in(&[
                ("PUSHER_KEY", KEY),
                ("PUSHER_CLUSTER", "eu"),
                ("PUSHER_APP_ID", APP_ID)
            ]),
            ["PUSHER_SECRET"]
        );
        assert_eq!(
            missing_in(&[("PUSHER_SECRET", SECRET), ("PUSHER_HOST", "localhost")]),
            ["PUSHER_APP_ID", "PUSHER_KEY"]
        );
        assert_eq!(
            missing_in(&[("PUSHER_PORT", "6001")]),
            [
                "PUSHER_APP_ID",
                "PUSHER_KEY",
                "PUSHER_SECRET",
                "PUSHER_CLUSTER or PUSHER_HOST"
            ]
        );
        let message = PusherConfig::from_env(env(&[("PUSHER_EVENT_NAME", "poke")]))
            .expect_err("incomplete")
            .to_string();
        for name in [
            "PUSHER_APP_ID",
            "PUSHER_KEY",
            "PUSHER_SECRET",
            "PUSHER_CLUSTER",
            "PUSHER_HOST",
        ] {
            assert!(message.contains(name), "{message:?} should name {name}");
        }
    }

    #[test]
    fn bad_port_and_scheme_are_rejected() {
        for port in ["abc", "0", "70000", "-1", "6001x"] {
            assert_eq!(
                config_from(&[("PUSHER_HOST", "localhost"), ("PUSHER_PORT", port)]).err(),
                Some(PusherConfigError::InvalidPort(port.to_owned())),
            );
        }
        for scheme in ["ftp", "ws", "https://"] {
            assert_eq!(
                config_from(&[("PUSHER_HOST", "localhost"), ("PUSHER_SCHEME", scheme)]).err(),
                Some(PusherConfigError::InvalidScheme(scheme.to_owned())),
            );
        }
        let message = config_from(&[("PUSHER_CLUSTER", "eu"), ("PUSHER_PORT", "x")])
            .expect_err("bad port")
            .to_string();
        assert!(message.contains("PUSHER_PORT"), "{message}");
    }

    #[test]
    fn bad_channel_prefixes_are_rejected() {
        let too_long = "p".repeat(65);
        let just_fits = "p".repeat(64);
        for prefix in [
            "space:",
            "space/",
            "space -",
            "private-encrypted-space-",
            &too_long,
        ] {
            let result =
                config_from(&[("PUSHER_CLUSTER", "eu"), ("PUSHER_CHANNEL_PREFIX", prefix)]);
            assert!(
                matches!(result, Err(PusherConfigError::InvalidChannelPrefix { .. })),
                "{prefix:?} gave {result:?}"
            );
        }
        let message = config_from(&[("PUSHER_CLUSTER", "eu"), ("PUSHER_CHANNEL_PREFIX", "a:b-")])
            .expect_err("colon")
            .to_string();
        assert!(
            message.contains("PUSHER_CHANNEL_PREFIX") && message.contains("':'"),
            "{message}"
        );
        let config = valid_config_from(&[
            ("PUSHER_CLUSTER", "eu"),
            ("PUSHER_CHANNEL_PREFIX", &just_fits),
        ]);
        let longest_space = space(&"s".repeat(100));
        assert_eq!(config.channel_for(&longest_space).len(), 164);
        valid_config_from(&[
            ("PUSHER_CLUSTER", "eu"),
            ("PUSHER_CHANNEL_PREFIX", "a_b=c@d,e.f;g-"),
        ]);
    }

    #[test]
    fn bad_host_cluster_app_id_and_event_name_are_rejected() {
        for host in [
            "https://api.example.com",
            "localhost:6001",
            "example.com/pusher",
        ] {
            assert_eq!(
                config_from(&[("PUSHER_HOST", host)]).err(),
                Some(PusherConfigError::InvalidHost(host.to_owned()))
            );
        }
        assert_eq!(
            config_from(&[("PUSHER_CLUSTER", "eu/x")]).err(),
            Some(PusherConfigError::InvalidCluster("eu/x".to_owned()))
        );
        let pairs = [
            ("PUSHER_APP_ID", "12/3"),
            ("PUSHER_KEY", KEY),
            ("PUSHER_SECRET", SECRET),
            ("PUSHER_CLUSTER", "eu"),
        ];
        assert_eq!(
            PusherConfig::from_env(env(&pairs)).err(),
            Some(PusherConfigError::InvalidAppId("12/3".to_owned()))
        );
        let reserved = config_from(&[
            ("PUSHER_CLUSTER", "eu"),
            ("PUSHER_EVENT_NAME", "pusher:poke"),
        ]);
        assert!(matches!(
            reserved,
            Err(PusherConfigError::InvalidEventName { .. })
        ));
        let mut config = valid_config_from(&[("PUSHER_CLUSTER", "eu")]);
        config.event_name = String::new();
        assert!(matches!(
            config.validate(),
            Err(PusherConfigError::InvalidEventName { .. })
        ));
    }

    #[test]
    fn debug_output_redacts_the_secret() {
        let config = valid_config_from(&[("PUSHER_CLUSTER", "eu")]);
        let debug = format!("{config:?}");
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(
            debug.contains("[REDACTED]") && debug.contains(KEY),
            "{debug}"
        );
    }

    // --- clap ----------------------------------------------------------------------------------

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        pusher: PusherArgs,
    }

    fn clap_env_names() -> Vec<String> {
        Cli::command()
            .get_arguments()
            .filter_map(|arg| arg.get_env())
            .map(|name| name.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn clap_knows_every_pusher_variable_and_from_env_reads_each() {
        let names = clap_env_names();
        assert_eq!(names.len(), 9, "{names:?}");
        for name in &names {
            assert!(name.starts_with("PUSHER_"), "{name}");
            let only_this = PusherConfig::from_env(env(&[(name.as_str(), "x")]));
            assert!(
                !pokes_are_off(only_this),
                "from_env does not read {name}, which clap documents"
            );
        }
    }

    #[test]
    fn help_describes_every_variable_and_hides_the_secret_value() {
        let help = Cli::command().render_help().to_string();
        for name in clap_env_names() {
            assert!(help.contains(&name), "--help should mention {name}: {help}");
        }
        assert!(help.contains("--pusher-secret"), "{help}");
        assert!(help.contains("cluster of your app"), "{help}");
    }

    #[test]
    fn flags_parse_into_a_config_like_the_variables() {
        let cli = Cli::try_parse_from([
            "replisync",
            "--pusher-app-id",
            APP_ID,
            "--pusher-key",
            KEY,
            "--pusher-secret",
            &format!(" {SECRET} "),
            "--pusher-host",
            "127.0.0.1",
            "--pusher-port",
            "6001",
            "--pusher-scheme",
            "http",
        ])
        .expect("valid flags");
        assert!(!format!("{:?}", cli.pusher).contains(SECRET));
        let config = PusherConfig::from_args(&cli.pusher)
            .expect("valid configuration")
            .expect("pokes on");
        assert_eq!(config.secret.expose_secret(), SECRET);
        assert_eq!((config.scheme, config.port), (Scheme::Http, 6001));
        assert_eq!(config.app_id, APP_ID);
        let error = PusherConfig::from_args(&PusherArgs {
            port: Some("x".to_owned()),
            ..cli.pusher
        });
        assert_eq!(
            error.err(),
            Some(PusherConfigError::InvalidPort("x".to_owned()))
        );
    }
}
