//! Pusher poke sink: after a push commits, publish a zero-payload event on the space's channel of
//! a Pusher-compatible Channels HTTP API (Pusher, soketi, sockudo, Reverb) so its clients pull.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest, Md5};
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::PokeSink;
use crate::protocol::{MAX_SPACE_ID_LEN, SpaceId};

/// Pusher accepts at most this many channels in one `POST /apps/{app_id}/events` call.
pub const MAX_CHANNELS_PER_CALL: usize = 100;
/// The only signing scheme Pusher's HTTP API knows.
pub const AUTH_VERSION: &str = "1.0";

const MAX_CHANNEL_NAME_LEN: usize = 164;
const MAX_CHANNEL_PREFIX_LEN: usize = MAX_CHANNEL_NAME_LEN - MAX_SPACE_ID_LEN;
const MAX_EVENT_NAME_LEN: usize = 200;
const DEFAULT_CHANNEL_PREFIX: &str = "space-";
const DEFAULT_EVENT_NAME: &str = "poke";
const MAX_LOGGED_RESPONSE_CHARS: usize = 500;
const USER_AGENT: &str = concat!("replisync/", env!("CARGO_PKG_VERSION"));

/// Every variable `PusherConfig::from_env` reads; setting any of them turns pokes on.
const ENV_VARS: [&str; 9] = [
    "PUSHER_APP_ID",
    "PUSHER_KEY",
    "PUSHER_SECRET",
    "PUSHER_CLUSTER",
    "PUSHER_HOST",
    "PUSHER_PORT",
    "PUSHER_SCHEME",
    "PUSHER_CHANNEL_PREFIX",
    "PUSHER_EVENT_NAME",
];

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

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

/// Where and how to publish pokes. Build it with [`PusherConfig::from_env`], which validates it.
#[derive(Clone, PartialEq, Eq)]
pub struct PusherConfig {
    pub app_id: String,
    pub key: String,
    pub secret: String,
    pub host: String,
    pub port: u16,
    pub scheme: Scheme,
    /// Channel of space `abc` is `{channel_prefix}abc`.
    pub channel_prefix: String,
    pub event_name: String,
}

impl fmt::Debug for PusherConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PusherConfig")
            .field("app_id", &self.app_id)
            .field("key", &self.key)
            .field("secret", &"<redacted>")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("scheme", &self.scheme)
            .field("channel_prefix", &self.channel_prefix)
            .field("event_name", &self.event_name)
            .finish()
    }
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
    /// Reads the `PUSHER_*` variables through `lookup` (empty values count as unset).
    /// `Ok(None)` when none is set: pokes are off.
    pub fn from_env(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<PusherConfig>, PusherConfigError> {
        let var = |name: &str| {
            lookup(name)
                .map(|value| value.trim().to_owned())
                .filter(|value| !value.is_empty())
        };
        if ENV_VARS.iter().all(|name| var(name).is_none()) {
            return Ok(None);
        }

        let mut missing = Vec::new();
        let mut required = |name: &'static str, value: Option<String>| {
            value.unwrap_or_else(|| {
                missing.push(name);
                String::new()
            })
        };
        let app_id = required("PUSHER_APP_ID", var("PUSHER_APP_ID"));
        let key = required("PUSHER_KEY", var("PUSHER_KEY"));
        let secret = required("PUSHER_SECRET", var("PUSHER_SECRET"));
        let cluster = var("PUSHER_CLUSTER");
        let host = required(
            "PUSHER_CLUSTER or PUSHER_HOST",
            var("PUSHER_HOST").or_else(|| cluster.as_deref().map(pusher_cluster_host)),
        );
        if !missing.is_empty() {
            return Err(PusherConfigError::Missing { missing });
        }
        if let Some(cluster) = cluster {
            validate_cluster(&cluster)?;
        }

        let scheme = match var("PUSHER_SCHEME") {
            Some(raw) => Scheme::parse(&raw).ok_or(PusherConfigError::InvalidScheme(raw))?,
            None => Scheme::Https,
        };
        let port = match var("PUSHER_PORT") {
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
            channel_prefix: var("PUSHER_CHANNEL_PREFIX")
                .unwrap_or_else(|| DEFAULT_CHANNEL_PREFIX.to_owned()),
            event_name: var("PUSHER_EVENT_NAME").unwrap_or_else(|| DEFAULT_EVENT_NAME.to_owned()),
        };
        config.validate()?;
        Ok(Some(config))
    }

    /// Checks what `from_env` checks, for configurations built by hand.
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

// ---------------------------------------------------------------------------------------------
// Signing (auth_version 1.0)
// ---------------------------------------------------------------------------------------------

/// Lowercase hex MD5 of the exact body bytes.
pub fn body_md5(body: &[u8]) -> String {
    hex::encode(Md5::digest(body))
}

/// `METHOD\npath\nquery`: every parameter but `auth_signature`, keys lowercased, sorted by key,
/// joined `k=v&k=v`, not URL-escaped.
pub fn string_to_sign(method: &str, path: &str, params: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(String, &str)> = params
        .iter()
        .filter(|(key, _)| !key.eq_ignore_ascii_case("auth_signature"))
        .map(|(key, value)| (key.to_ascii_lowercase(), *value))
        .collect();
    pairs.sort();
    let query: Vec<String> = pairs
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    format!(
        "{}\n{path}\n{}",
        method.to_ascii_uppercase(),
        query.join("&")
    )
}

/// The `auth_signature` of a request: hex HMAC-SHA256 of [`string_to_sign`] keyed with `secret`.
pub fn sign(secret: &str, method: &str, path: &str, params: &[(&str, &str)]) -> String {
    hmac_sha256_hex(secret, &string_to_sign(method, path, params))
}

/// The full query string of a signed request: `params`, then `auth_key`, `auth_timestamp`,
/// `auth_version`, `body_md5` (only when `body` is non-empty) and `auth_signature`.
pub fn signed_query(
    key: &str,
    secret: &str,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: &[u8],
    auth_timestamp: u64,
) -> Vec<(String, String)> {
    let mut query: Vec<(String, String)> = params
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    query.push(("auth_key".into(), key.into()));
    query.push(("auth_timestamp".into(), auth_timestamp.to_string()));
    query.push(("auth_version".into(), AUTH_VERSION.into()));
    if !body.is_empty() {
        query.push(("body_md5".into(), body_md5(body)));
    }
    let unsigned: Vec<(&str, &str)> = query
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let signature = sign(secret, method, path, &unsigned);
    query.push(("auth_signature".into(), signature));
    query
}

/// The `auth` answer to a private-channel subscription: `<key>:<hex HMAC(secret, socket:channel)>`.
pub fn channel_auth_signature(key: &str, secret: &str, socket_id: &str, channel: &str) -> String {
    let signature = hmac_sha256_hex(secret, &format!("{socket_id}:{channel}"));
    format!("{key}:{signature}")
}

fn hmac_sha256_hex(secret: &str, message: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn unix_timestamp() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since_epoch| since_epoch.as_secs())
        .unwrap_or(0)
}

/// The body of one poke call: `{"name":<event>,"data":"","channels":[...]}`.
#[derive(Serialize)]
struct TriggerBody<'a> {
    name: &'a str,
    data: &'a str,
    channels: &'a [String],
}

fn trigger_body(event_name: &str, channels: &[String]) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&TriggerBody {
        name: event_name,
        data: "",
        channels,
    })
}

// ---------------------------------------------------------------------------------------------
// Options and counters
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct PokerOptions {
    /// After the first change, wait this long for more before sending (pokes coalesce).
    pub coalesce_window: Duration,
    /// When this many spaces wait, the oldest is dropped (a lost hint, covered by pullInterval).
    pub max_pending_spaces: usize,
    /// Calls per batch, the first one included, before giving up on it.
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles each retry up to `max_backoff`, plus jitter.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Cap on a 429's `retry-after`.
    pub max_retry_after: Duration,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// The same rejection (4xx) is logged at error level at most once per this interval.
    pub rejection_log_interval: Duration,
}

impl Default for PokerOptions {
    fn default() -> Self {
        PokerOptions {
            coalesce_window: Duration::from_millis(5),
            max_pending_spaces: 10_000,
            max_attempts: 4,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            rejection_log_interval: Duration::from_secs(60),
        }
    }
}

/// A snapshot of the poker's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PokerStats {
    /// Calls Pusher accepted.
    pub calls_ok: u64,
    /// Spaces in accepted calls.
    pub spaces_poked: u64,
    /// Spaces dropped before any call: pending set full, or changed after shutdown began.
    pub dropped_spaces: u64,
    /// Calls that failed (error status, timeout, connection error), retried or not.
    pub failed_calls: u64,
    /// Spaces whose poke was abandoned: rejected, out of attempts, or cut by shutdown's deadline.
    pub given_up_spaces: u64,
    /// Calls repeated after a transient failure.
    pub retries: u64,
}

#[derive(Default)]
struct Counters {
    calls_ok: AtomicU64,
    spaces_poked: AtomicU64,
    dropped_spaces: AtomicU64,
    failed_calls: AtomicU64,
    given_up_spaces: AtomicU64,
    retries: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> PokerStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PokerStats {
            calls_ok: read(&self.calls_ok),
            spaces_poked: read(&self.spaces_poked),
            dropped_spaces: read(&self.dropped_spaces),
            failed_calls: read(&self.failed_calls),
            given_up_spaces: read(&self.given_up_spaces),
            retries: read(&self.retries),
        }
    }
}

fn add(counter: &AtomicU64, amount: usize) {
    counter.fetch_add(amount as u64, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------
// Pending spaces
// ---------------------------------------------------------------------------------------------

struct PendingPoke {
    space: SpaceId,
    /// The earliest commit this poke announces (for the latency log).
    committed_at: Instant,
}

/// Spaces waiting for a poke, oldest first, each at most once; plus what the worker holds.
struct PokeQueue {
    order: VecDeque<SpaceId>,
    committed_at: HashMap<SpaceId, Instant>,
    capacity: usize,
    accepting: bool,
    in_flight: usize,
}

enum Insert {
    Queued,
    AlreadyPending,
    QueuedDroppingOldest(SpaceId),
    Refused,
}

impl PokeQueue {
    fn new(capacity: usize) -> Self {
        PokeQueue {
            order: VecDeque::new(),
            committed_at: HashMap::new(),
            capacity: capacity.max(1),
            accepting: true,
            in_flight: 0,
        }
    }

    fn insert(&mut self, space: &SpaceId, committed_at: Instant) -> Insert {
        if !self.accepting {
            return Insert::Refused;
        }
        if let Some(earliest) = self.committed_at.get_mut(space) {
            *earliest = (*earliest).min(committed_at);
            return Insert::AlreadyPending;
        }
        let dropped = if self.order.len() >= self.capacity {
            self.pop_oldest().map(|poke| poke.space)
        } else {
            None
        };
        self.order.push_back(space.clone());
        self.committed_at.insert(space.clone(), committed_at);
        match dropped {
            Some(space) => Insert::QueuedDroppingOldest(space),
            None => Insert::Queued,
        }
    }

    fn pop_oldest(&mut self) -> Option<PendingPoke> {
        let space = self.order.pop_front()?;
        let committed_at = self
            .committed_at
            .remove(&space)
            .unwrap_or_else(Instant::now);
        Some(PendingPoke {
            space,
            committed_at,
        })
    }

    /// Takes up to `max` of the oldest spaces; they count as in flight until `finish_batch`.
    fn take_batch(&mut self, max: usize) -> Vec<PendingPoke> {
        let batch: Vec<PendingPoke> = std::iter::from_fn(|| self.pop_oldest()).take(max).collect();
        self.in_flight = batch.len();
        batch
    }

    fn finish_batch(&mut self) {
        self.in_flight = 0;
    }

    /// Everything pending or in flight, forgotten; returns how many spaces that was.
    fn abandon_all(&mut self) -> usize {
        let abandoned = self.order.len() + self.in_flight;
        self.order.clear();
        self.committed_at.clear();
        self.in_flight = 0;
        abandoned
    }
}

/// State shared by the handle (`PusherPoker`) and its worker task.
struct Shared {
    queue: Mutex<PokeQueue>,
    wake: Notify,
    counters: Counters,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, PokeQueue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stop_accepting(&self) {
        self.queue().accepting = false;
        self.wake.notify_one();
    }
}

// ---------------------------------------------------------------------------------------------
// The poker: handle and worker
// ---------------------------------------------------------------------------------------------

/// Publishes pokes to a Pusher-compatible API from one background task; see [`PokeSink`].
pub struct PusherPoker {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl PusherPoker {
    /// Spawns the worker task (call it inside a Tokio runtime: `tokio::spawn` panics outside).
    /// A configuration that fails `validate` is logged at error level and every poke is dropped.
    pub fn start(config: PusherConfig, options: PokerOptions) -> Arc<PusherPoker> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(PokeQueue::new(options.max_pending_spaces)),
            wake: Notify::new(),
            counters: Counters::default(),
        });
        let publisher = Publisher::new(&config, &options)
            .inspect_err(|reason| tracing::error!(%reason, "Pusher pokes cannot be sent"))
            .ok();
        let worker = Worker {
            shared: Arc::clone(&shared),
            rejections: RejectionLog::new(options.rejection_log_interval),
            publisher,
            options,
        };
        let handle = tokio::spawn(worker.run());
        Arc::new(PusherPoker {
            shared,
            worker: Mutex::new(Some(handle)),
        })
    }

    pub fn stats(&self) -> PokerStats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting changes, flushes every pending poke (still coalesced and batched) and
    /// waits for that until `deadline`, then abandons the rest. Returns how many of the spaces
    /// pending or in flight when shutdown began were not delivered.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        let given_up_before = self.stats().given_up_spaces;
        self.shared.stop_accepting();
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut worker) = worker
            && tokio::time::timeout(deadline, &mut worker).await.is_err()
        {
            worker.abort();
            let _ = worker.await;
        }
        let abandoned = self.shared.queue().abandon_all();
        if abandoned > 0 {
            add(&self.shared.counters.given_up_spaces, abandoned);
            tracing::warn!(
                spaces = abandoned,
                "shutdown deadline reached before every poke was delivered"
            );
        }
        let given_up = self.stats().given_up_spaces.saturating_sub(given_up_before);
        usize::try_from(given_up).unwrap_or(usize::MAX)
    }
}

impl PokeSink for PusherPoker {
    fn space_changed(&self, space: &SpaceId, committed_at: Instant) {
        let outcome = self.shared.queue().insert(space, committed_at);
        match outcome {
            Insert::Queued | Insert::AlreadyPending => {}
            Insert::QueuedDroppingOldest(dropped) => {
                add(&self.shared.counters.dropped_spaces, 1);
                tracing::debug!(space = dropped.as_str(), "poke queue full: dropped oldest");
            }
            Insert::Refused => {
                add(&self.shared.counters.dropped_spaces, 1);
                tracing::debug!(space = space.as_str(), "poke after shutdown began: dropped");
            }
        }
        self.shared.wake.notify_one();
    }
}

impl Drop for PusherPoker {
    /// Without `shutdown`, the worker still flushes what is pending, then ends.
    fn drop(&mut self) {
        self.shared.stop_accepting();
    }
}

struct Worker {
    shared: Arc<Shared>,
    publisher: Option<Publisher>,
    options: PokerOptions,
    rejections: RejectionLog,
}

impl Worker {
    async fn run(mut self) {
        while let Some(batch) = self.next_batch().await {
            self.deliver(&batch).await;
            self.shared.queue().finish_batch();
        }
    }

    /// Waits for a change, lets more arrive for the coalescing window, then takes a batch.
    /// `None` once shutdown began and nothing is pending.
    async fn next_batch(&self) -> Option<Vec<PendingPoke>> {
        loop {
            let (pending, accepting) = {
                let queue = self.shared.queue();
                (queue.order.len(), queue.accepting)
            };
            match (pending, accepting) {
                (0, false) => return None,
                (0, true) => self.shared.wake.notified().await,
                (_, true) => {
                    tokio::time::sleep(self.options.coalesce_window).await;
                    break;
                }
                (_, false) => break,
            }
        }
        Some(self.shared.queue().take_batch(MAX_CHANNELS_PER_CALL))
    }

    async fn deliver(&mut self, batch: &[PendingPoke]) {
        let Some(publisher) = &self.publisher else {
            give_up(
                &self.shared.counters,
                batch,
                "the Pusher client is not set up",
            );
            return;
        };
        let channels: Vec<String> = batch
            .iter()
            .map(|poke| publisher.config.channel_for(&poke.space))
            .collect();
        let body = match trigger_body(&publisher.config.event_name, &channels) {
            Ok(body) => body,
            Err(error) => {
                give_up(&self.shared.counters, batch, &error.to_string());
                return;
            }
        };
        let counters = &self.shared.counters;
        for attempt in 1..=self.options.max_attempts.max(1) {
            match publisher.publish(&body).await {
                PublishOutcome::Accepted => {
                    record_delivery(counters, batch);
                    return;
                }
                PublishOutcome::Rejected { status, detail } => {
                    add(&counters.failed_calls, 1);
                    add(&counters.given_up_spaces, batch.len());
                    let log_as_error = self.rejections.should_log(status, Instant::now());
                    log_rejection(status, &detail, batch, log_as_error);
                    return;
                }
                PublishOutcome::Transient {
                    reason,
                    retry_after,
                } => {
                    add(&counters.failed_calls, 1);
                    if attempt >= self.options.max_attempts {
                        give_up(counters, batch, &reason);
                        return;
                    }
                    add(&counters.retries, 1);
                    let delay = retry_delay(&self.options, attempt, retry_after);
                    tracing::debug!(%reason, attempt, ?delay, "poke failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

fn record_delivery(counters: &Counters, batch: &[PendingPoke]) {
    add(&counters.calls_ok, 1);
    add(&counters.spaces_poked, batch.len());
    let accepted_at = Instant::now();
    tracing::debug!(channels = batch.len(), "Pusher accepted the poke");
    for poke in batch {
        let latency = accepted_at.saturating_duration_since(poke.committed_at);
        tracing::debug!(
            space = poke.space.as_str(),
            poke_latency_ms = latency.as_secs_f64() * 1000.0,
            "space poked"
        );
    }
}

fn give_up(counters: &Counters, batch: &[PendingPoke], reason: &str) {
    add(&counters.given_up_spaces, batch.len());
    tracing::warn!(spaces = %space_list(batch), reason, "gave up poking {} space(s)", batch.len());
}

fn log_rejection(status: StatusCode, detail: &str, batch: &[PendingPoke], log_as_error: bool) {
    let hint = rejection_hint(status);
    let spaces = space_list(batch);
    if log_as_error {
        tracing::error!(
            status = status.as_u16(),
            response = detail,
            %spaces,
            "Pusher rejected the poke with {}: {hint} (not retried; logged at most once a minute)",
            status.as_u16()
        );
    } else {
        tracing::debug!(status = status.as_u16(), response = detail, %spaces, "Pusher rejected the poke again");
    }
}

fn rejection_hint(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "check PUSHER_KEY/PUSHER_SECRET/PUSHER_APP_ID and the server clock",
        403 => "the app is disabled or over its quota",
        404 => "check PUSHER_APP_ID and PUSHER_HOST/PUSHER_PORT",
        413 => "the request is too large",
        300..=399 => "check PUSHER_SCHEME/PUSHER_HOST/PUSHER_PORT (redirects are not followed)",
        _ => "check the PUSHER_* settings",
    }
}

fn space_list(batch: &[PendingPoke]) -> String {
    let names: Vec<&str> = batch.iter().map(|poke| poke.space.as_str()).collect();
    names.join(",")
}

/// Rate-limits the error log of a rejection: the same status at most once per interval.
struct RejectionLog {
    interval: Duration,
    last_logged: Option<(StatusCode, Instant)>,
}

impl RejectionLog {
    fn new(interval: Duration) -> Self {
        RejectionLog {
            interval,
            last_logged: None,
        }
    }

    fn should_log(&mut self, status: StatusCode, now: Instant) -> bool {
        let recently_logged = matches!(
            self.last_logged,
            Some((last_status, at)) if last_status == status
                && now.saturating_duration_since(at) < self.interval
        );
        if !recently_logged {
            self.last_logged = Some((status, now));
        }
        !recently_logged
    }
}

/// Exponential backoff with up to 25% jitter; a 429's `retry-after` (capped) if longer.
fn retry_delay(options: &PokerOptions, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let backoff = with_jitter(exponential_backoff(options, attempt));
    match retry_after {
        Some(wait) => wait.min(options.max_retry_after).max(backoff),
        None => backoff,
    }
}

fn exponential_backoff(options: &PokerOptions, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
    options
        .first_backoff
        .saturating_mul(factor)
        .min(options.max_backoff)
}

fn with_jitter(delay: Duration) -> Duration {
    delay.saturating_add((delay / 4).mul_f64(rand::random::<f64>()))
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

enum PublishOutcome {
    Accepted,
    /// Worth retrying: timeout, connection error, 429, 5xx.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// A configuration problem retrying cannot fix: any other non-2xx answer.
    Rejected {
        status: StatusCode,
        detail: String,
    },
}

/// Sends signed poke calls over one shared, keep-alive `reqwest::Client`.
struct Publisher {
    client: reqwest::Client,
    events_url: Url,
    events_path: String,
    config: PusherConfig,
}

impl Publisher {
    fn new(config: &PusherConfig, options: &PokerOptions) -> Result<Publisher, String> {
        config.validate().map_err(|error| error.to_string())?;
        let events_url = config.events_url().map_err(|error| error.to_string())?;
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_keepalive(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| format!("cannot build the HTTP client: {}", error_chain(&error)))?;
        Ok(Publisher {
            client,
            events_url,
            events_path: config.events_path(),
            config: config.clone(),
        })
    }

    /// One signed call (a fresh `auth_timestamp` each time).
    async fn publish(&self, body: &[u8]) -> PublishOutcome {
        let query = signed_query(
            &self.config.key,
            &self.config.secret,
            "POST",
            &self.events_path,
            &[],
            body,
            unix_timestamp(),
        );
        let mut url = self.events_url.clone();
        url.query_pairs_mut().extend_pairs(&query);
        let sent = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await;
        match sent {
            Ok(response) => classify_response(response).await,
            Err(error) => PublishOutcome::Transient {
                reason: describe_request_error(error),
                retry_after: None,
            },
        }
    }
}

async fn classify_response(response: reqwest::Response) -> PublishOutcome {
    let status = response.status();
    if status.is_success() {
        // Read the body to the end so the connection can be reused; its content is irrelevant.
        let _ = response.bytes().await;
        return PublishOutcome::Accepted;
    }
    let retry_after = retry_after(response.headers());
    let detail = response_text(response).await;
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        PublishOutcome::Transient {
            reason: format!("Pusher answered {}: {detail}", status.as_u16()),
            retry_after,
        }
    } else {
        PublishOutcome::Rejected { status, detail }
    }
}

/// `retry-after` in seconds; an HTTP-date or garbage counts as absent.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

async fn response_text(response: reqwest::Response) -> String {
    match response.text().await {
        Ok(text) => text.chars().take(MAX_LOGGED_RESPONSE_CHARS).collect(),
        Err(error) => format!("<unreadable response body: {}>", error_chain(&error)),
    }
}

fn describe_request_error(error: reqwest::Error) -> String {
    let error = error.without_url();
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    format!("{kind}: {}", error_chain(&error))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener as StdTcpListener;

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::{Path, RawQuery, State};
    use axum::http::{HeaderValue, header::USER_AGENT as USER_AGENT_HEADER};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;

    use super::*;

    const APP_ID: &str = "12345";
    const KEY: &str = "app-key-abc";
    const SECRET: &str = "app-secret-xyz";
    const DOC_KEY: &str = "278d425bdf160c739803";
    const DOC_SECRET: &str = "7ad3773142a6692b25b8";
    const PATIENCE: Duration = Duration::from_secs(20);

    fn space(id: &str) -> SpaceId {
        SpaceId::parse(id).expect("valid space id")
    }

    fn query_value<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
        query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    // --- signing vectors (docs/pusher.md) ---------------------------------------------------

    #[test]
    fn pusher_documented_example_vector() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(body_md5(body), "ec365a775a4cd0599faeb73354201b6f");
        let params = [
            ("auth_key", DOC_KEY),
            ("auth_timestamp", "1353088179"),
            ("auth_version", "1.0"),
            ("body_md5", "ec365a775a4cd0599faeb73354201b6f"),
        ];
        assert_eq!(
            string_to_sign("POST", "/apps/3/events", &params),
            "POST\n/apps/3/events\nauth_key=278d425bdf160c739803&auth_timestamp=1353088179\
             &auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f"
        );
        let expected = "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c";
        assert_eq!(
            sign(DOC_SECRET, "POST", "/apps/3/events", &params),
            expected
        );
        let query = signed_query(
            DOC_KEY,
            DOC_SECRET,
            "POST",
            "/apps/3/events",
            &[],
            body,
            1353088179,
        );
        assert_eq!(query_value(&query, "auth_signature"), Some(expected));
    }

    fn assert_sdk_post_vector(ts: u64, path: &str, body: &str, md5: &str, signature: &str) {
        assert_eq!(body_md5(body.as_bytes()), md5);
        let query = signed_query(KEY, SECRET, "POST", path, &[], body.as_bytes(), ts);
        let expected_names = [
            "auth_key",
            "auth_timestamp",
            "auth_version",
            "body_md5",
            "auth_signature",
        ];
        let names: Vec<&str> = query.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, expected_names);
        assert_eq!(query_value(&query, "auth_key"), Some(KEY));
        assert_eq!(query_value(&query, "auth_version"), Some("1.0"));
        assert_eq!(query_value(&query, "body_md5"), Some(md5));
        assert_eq!(query_value(&query, "auth_signature"), Some(signature));
    }

    #[test]
    fn sdk_vector_poke_with_empty_data() {
        assert_sdk_post_vector(
            1700000000,
            "/apps/12345/events",
            r#"{"name":"poke","data":"","channels":["space-0f3c2a"]}"#,
            "64bbecb8ddb6866af416fc681aa8ab6e",
            "ffc4024238c5abd6fe93ef9e7fa4393b6c0303c5ff54763e2ff7567540fa23cc",
        );
    }

    #[test]
    fn sdk_vector_event_with_socket_id() {
        assert_sdk_post_vector(
            1700000001,
            "/apps/12345/events",
            r#"{"name":"poke","data":"{}","channels":["space-0f3c2a"],"socket_id":"123.456"}"#,
            "3247a604758ecdebed3e0656686fe918",
            "edb94d6e3f7399fc78b36c5c5cb5f246dcb2d0daf39a0771c31c3bd0d9386906",
        );
    }

    #[test]
    fn sdk_vector_batch_events() {
        assert_sdk_post_vector(
            1700000002,
            "/apps/12345/batch_events",
            r#"{"batch":[{"channel":"space-a","name":"poke","data":""},{"channel":"space-b","name":"poke","data":""}]}"#,
            "9abb83c2ddd5c3c58819abf8b4efbd0f",
            "3eb4e0cf1feb4ae664e4f41651a18d1c14fed0ffc23d898881c687d52b5c2718",
        );
    }

    #[test]
    fn sdk_vector_get_without_body_has_no_body_md5() {
        let params = [
            ("filter_by_prefix", "space-"),
            ("info", "subscription_count"),
        ];
        let path = "/apps/12345/channels";
        let query = signed_query(KEY, SECRET, "GET", path, &params, b"", 1700000003);
        assert_eq!(query_value(&query, "body_md5"), None);
        assert_eq!(query_value(&query, "filter_by_prefix"), Some("space-"));
        let unsigned: Vec<(&str, &str)> = query
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        assert_eq!(
            string_to_sign("GET", path, &unsigned),
            "GET\n/apps/12345/channels\nauth_key=app-key-abc&auth_timestamp=1700000003\
             &auth_version=1.0&filter_by_prefix=space-&info=subscription_count"
        );
        assert_eq!(
            query_value(&query, "auth_signature"),
            Some("8353155c7d1a06fa93a1f90093fb4a65d17049dc87770b7e4921c7bd49d19219")
        );
    }

    #[test]
    fn channel_auth_vectors() {
        assert_eq!(
            channel_auth_signature(DOC_KEY, DOC_SECRET, "1234.1234", "private-foobar"),
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        assert_eq!(
            channel_auth_signature(KEY, SECRET, "123.456", "private-space-0f3c2a"),
            "app-key-abc:60e3c477313d84247eb82c9405b703f045cd38b6cbbed774aa8f4cd06d2149ef"
        );
    }

    #[test]
    fn trigger_body_is_byte_for_byte_the_sdk_poke_vector() {
        let body = trigger_body("poke", &["space-0f3c2a".to_owned()]).expect("serializes");
        assert_eq!(
            body,
            br#"{"name":"poke","data":"","channels":["space-0f3c2a"]}"#
        );
        assert_eq!(body_md5(&body), "64bbecb8ddb6866af416fc681aa8ab6e");
    }

    #[test]
    fn string_to_sign_lowercases_sorts_and_leaves_out_the_signature() {
        let params = [
            ("b", "2"),
            ("auth_signature", "ignored"),
            ("A", "1"),
            ("c", "x y"),
        ];
        assert_eq!(
            string_to_sign("post", "/p", &params),
            "POST\n/p\na=1&b=2&c=x y"
        );
    }

    // --- configuration ----------------------------------------------------------------------

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

    #[test]
    fn no_pusher_variables_means_pokes_off() {
        assert_eq!(PusherConfig::from_env(env(&[])), Ok(None));
        assert_eq!(
            PusherConfig::from_env(env(&[("HOME", "/root"), ("PUSHER", "x")])),
            Ok(None)
        );
    }

    #[test]
    fn empty_values_count_as_unset() {
        let all_empty: Vec<(&str, &str)> = ENV_VARS.iter().map(|name| (*name, "")).collect();
        assert_eq!(PusherConfig::from_env(env(&all_empty)), Ok(None));
        let error = config_from(&[("PUSHER_CLUSTER", "eu"), ("PUSHER_SECRET", "  ")]);
        // The later, blank PUSHER_SECRET replaces the real one in the lookup table.
        assert_eq!(
            error,
            Err(PusherConfigError::Missing {
                missing: vec!["PUSHER_SECRET"]
            })
        );
    }

    #[test]
    fn full_cluster_config() {
        let config = valid_config_from(&[("PUSHER_CLUSTER", "eu")]);
        assert_eq!(config.app_id, APP_ID);
        assert_eq!(config.key, KEY);
        assert_eq!(config.secret, SECRET);
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
                config_from(&[("PUSHER_HOST", "localhost"), ("PUSHER_PORT", port)]),
                Err(PusherConfigError::InvalidPort(port.to_owned())),
            );
        }
        for scheme in ["ftp", "ws", "https://"] {
            assert_eq!(
                config_from(&[("PUSHER_HOST", "localhost"), ("PUSHER_SCHEME", scheme)]),
                Err(PusherConfigError::InvalidScheme(scheme.to_owned())),
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
                config_from(&[("PUSHER_HOST", host)]),
                Err(PusherConfigError::InvalidHost(host.to_owned()))
            );
        }
        assert_eq!(
            config_from(&[("PUSHER_CLUSTER", "eu/x")]),
            Err(PusherConfigError::InvalidCluster("eu/x".to_owned()))
        );
        let pairs = [
            ("PUSHER_APP_ID", "12/3"),
            ("PUSHER_KEY", KEY),
            ("PUSHER_SECRET", SECRET),
            ("PUSHER_CLUSTER", "eu"),
        ];
        assert_eq!(
            PusherConfig::from_env(env(&pairs)),
            Err(PusherConfigError::InvalidAppId("12/3".to_owned()))
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
            debug.contains("<redacted>") && debug.contains(KEY),
            "{debug}"
        );
    }

    // --- pure helpers -----------------------------------------------------------------------

    #[test]
    fn backoff_grows_exponentially_with_bounded_jitter() {
        let options = PokerOptions::default();
        for _ in 0..100 {
            let first = retry_delay(&options, 1, None);
            assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(125));
            let third = retry_delay(&options, 3, None);
            assert!(third >= Duration::from_millis(400) && third <= Duration::from_millis(500));
            let capped = retry_delay(&options, 30, None);
            assert!(capped >= Duration::from_secs(2) && capped <= Duration::from_millis(2500));
        }
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let options = PokerOptions::default();
        let one_second = retry_delay(&options, 1, Some(Duration::from_secs(1)));
        assert_eq!(one_second, Duration::from_secs(1));
        let hour = retry_delay(&options, 1, Some(Duration::from_secs(3600)));
        assert_eq!(hour, options.max_retry_after);

        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static(" 7 "));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn rejection_log_repeats_the_same_status_at_most_once_per_interval() {
        let mut log = RejectionLog::new(Duration::from_secs(60));
        let start = Instant::now();
        assert!(log.should_log(StatusCode::UNAUTHORIZED, start));
        assert!(!log.should_log(StatusCode::UNAUTHORIZED, start + Duration::from_secs(59)));
        assert!(log.should_log(StatusCode::FORBIDDEN, start + Duration::from_secs(59)));
        assert!(log.should_log(StatusCode::UNAUTHORIZED, start + Duration::from_secs(60)));
        assert!(!log.should_log(StatusCode::UNAUTHORIZED, start + Duration::from_secs(61)));
        assert!(log.should_log(StatusCode::UNAUTHORIZED, start + Duration::from_secs(121)));
    }

    #[test]
    fn queue_deduplicates_keeps_the_earliest_commit_and_drops_the_oldest_when_full() {
        let mut queue = PokeQueue::new(2);
        let early = Instant::now();
        let late = early + Duration::from_secs(1);
        assert!(matches!(queue.insert(&space("a"), late), Insert::Queued));
        assert!(matches!(
            queue.insert(&space("a"), early),
            Insert::AlreadyPending
        ));
        assert!(matches!(queue.insert(&space("b"), late), Insert::Queued));
        match queue.insert(&space("c"), late) {
            Insert::QueuedDroppingOldest(dropped) => assert_eq!(dropped, space("a")),
            _ => panic!("a full queue must drop its oldest space"),
        }
        let batch = queue.take_batch(10);
        let spaces: Vec<&str> = batch.iter().map(|poke| poke.space.as_str()).collect();
        assert_eq!(spaces, ["b", "c"]);
        assert_eq!(queue.in_flight, 2);

        let mut queue = PokeQueue::new(5);
        queue.insert(&space("a"), late);
        queue.insert(&space("a"), early);
        assert_eq!(queue.take_batch(10)[0].committed_at, early);
    }

    // --- the poker against a mock server -----------------------------------------------------
    //
    // The mock is a test double for the faults a real Pusher-compatible server cannot produce on
    // demand (5xx, 429 with retry-after, slow answers, refused connections). It still checks
    // every request like Pusher does: signature (with this module's `sign`), body_md5, key,
    // auth_version and timestamp, answering 401 to a wrongly signed request.

    #[derive(Clone)]
    struct Reply {
        status: u16,
        retry_after: Option<&'static str>,
        delay: Duration,
        body: &'static str,
    }

    impl Reply {
        fn status(status: u16) -> Reply {
            Reply {
                status,
                retry_after: None,
                delay: Duration::ZERO,
                body: "{}",
            }
        }

        fn ok() -> Reply {
            Reply::status(200)
        }

        fn after(self, delay: Duration) -> Reply {
            Reply { delay, ..self }
        }

        fn with_retry_after(self, seconds: &'static str) -> Reply {
            Reply {
                retry_after: Some(seconds),
                ..self
            }
        }

        fn with_body(self, body: &'static str) -> Reply {
            Reply { body, ..self }
        }
    }

    #[derive(Clone, Debug)]
    struct Received {
        at: Instant,
        event: String,
        data: String,
        channels: Vec<String>,
        signed_correctly: bool,
        user_agent: String,
    }

    #[derive(Default)]
    struct MockState {
        script: Mutex<VecDeque<Reply>>,
        received: Mutex<Vec<Received>>,
    }

    struct MockPusher {
        port: u16,
        state: Arc<MockState>,
    }

    impl MockPusher {
        /// Answers the scripted replies in order, then 200 `{}` to everything.
        async fn start(script: Vec<Reply>) -> MockPusher {
            let state = Arc::new(MockState {
                script: Mutex::new(script.into()),
                ..MockState::default()
            });
            let app = Router::new()
                .route("/apps/{app_id}/events", post(mock_trigger))
                .with_state(Arc::clone(&state));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind mock");
            let port = listener.local_addr().expect("mock address").port();
            tokio::spawn(async move { axum::serve(listener, app).await });
            MockPusher { port, state }
        }

        fn config(&self) -> PusherConfig {
            config_for_port(self.port)
        }

        fn requests(&self) -> Vec<Received> {
            self.state.received.lock().expect("mock lock").clone()
        }

        async fn wait_for_requests(&self, count: usize) {
            let waited = tokio::time::timeout(PATIENCE, async {
                while self.requests().len() < count {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            assert!(waited.is_ok(), "mock never received {count} request(s)");
        }
    }

    fn config_for_port(port: u16) -> PusherConfig {
        PusherConfig {
            app_id: APP_ID.to_owned(),
            key: KEY.to_owned(),
            secret: SECRET.to_owned(),
            host: "127.0.0.1".to_owned(),
            port,
            scheme: Scheme::Http,
            channel_prefix: "space-".to_owned(),
            event_name: "poke".to_owned(),
        }
    }

    async fn mock_trigger(
        State(state): State<Arc<MockState>>,
        Path(app_id): Path<String>,
        RawQuery(query): RawQuery,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let path = format!("/apps/{app_id}/events");
        let params = parse_query(query.as_deref().unwrap_or_default());
        let signed_correctly = app_id == APP_ID && is_signed_correctly(&params, &path, &body);
        let trigger: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let text = |field: &str| trigger[field].as_str().unwrap_or("<missing>").to_owned();
        let channels = trigger["channels"]
            .as_array()
            .map(|channels| {
                channels
                    .iter()
                    .filter_map(|channel| channel.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let user_agent = headers
            .get(USER_AGENT_HEADER)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        state.received.lock().expect("mock lock").push(Received {
            at: Instant::now(),
            event: text("name"),
            data: text("data"),
            channels,
            signed_correctly,
            user_agent,
        });

        let reply = state
            .script
            .lock()
            .expect("mock lock")
            .pop_front()
            .unwrap_or_else(Reply::ok);
        tokio::time::sleep(reply.delay).await;
        if !signed_correctly {
            return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
        }
        let status = StatusCode::from_u16(reply.status).expect("scripted status");
        let mut response = (status, reply.body).into_response();
        if let Some(seconds) = reply.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static(seconds));
        }
        response
    }

    fn parse_query(query: &str) -> Vec<(String, String)> {
        let url = Url::parse(&format!("http://mock/?{query}")).expect("query parses");
        url.query_pairs()
            .map(|(name, value)| (name.into_owned(), value.into_owned()))
            .collect()
    }

    fn is_signed_correctly(params: &[(String, String)], path: &str, body: &[u8]) -> bool {
        let Some(signature) = query_value(params, "auth_signature") else {
            return false;
        };
        let unsigned: Vec<(&str, &str)> = params
            .iter()
            .filter(|(name, _)| name != "auth_signature")
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        let fresh = query_value(params, "auth_timestamp")
            .and_then(|ts| ts.parse::<u64>().ok())
            .is_some_and(|ts| ts.abs_diff(unix_timestamp()) <= 600);
        signature == sign(SECRET, "POST", path, &unsigned)
            && query_value(params, "body_md5") == Some(body_md5(body).as_str())
            && query_value(params, "auth_key") == Some(KEY)
            && query_value(params, "auth_version") == Some("1.0")
            && fresh
    }

    fn fast_options() -> PokerOptions {
        PokerOptions {
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            ..PokerOptions::default()
        }
    }

    fn assert_all_well_formed(requests: &[Received]) {
        for request in requests {
            assert!(request.signed_correctly, "badly signed: {request:?}");
            assert_eq!(request.event, "poke");
            assert_eq!(request.data, "", "a poke carries no data");
            assert!(request.channels.len() <= MAX_CHANNELS_PER_CALL);
            assert!(request.user_agent.starts_with("replisync/"), "{request:?}");
        }
    }

    fn channel_counts(requests: &[Received]) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for channel in requests.iter().flat_map(|request| &request.channels) {
            *counts.entry(channel.clone()).or_insert(0) += 1;
        }
        counts
    }

    fn unused_port() -> u16 {
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    }

    #[tokio::test]
    async fn changes_within_the_coalescing_window_become_one_call() {
        let mock = MockPusher::start(vec![]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        let sink: Arc<dyn PokeSink> = poker.clone();
        for _ in 0..50 {
            sink.space_changed(&space("s1"), Instant::now());
        }
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests();
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(requests[0].channels, ["space-s1"]);
        assert_all_well_formed(&requests);
        let stats = poker.stats();
        assert_eq!((stats.calls_ok, stats.spaces_poked), (1, 1));
    }

    #[tokio::test]
    async fn changes_while_a_call_is_in_flight_coalesce_into_one_more_call() {
        let mock = MockPusher::start(vec![Reply::ok().after(Duration::from_millis(300))]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        poker.space_changed(&space("s1"), Instant::now());
        mock.wait_for_requests(1).await;
        for _ in 0..49 {
            poker.space_changed(&space("s1"), Instant::now());
        }
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests();
        assert_eq!(requests.len(), 2, "{requests:?}");
        for request in &requests {
            assert_eq!(request.channels, ["space-s1"]);
        }
        assert_all_well_formed(&requests);
        assert_eq!(poker.stats().spaces_poked, 2);
    }

    #[tokio::test]
    async fn many_spaces_are_batched_at_most_100_channels_per_call() {
        let mock = MockPusher::start(vec![]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        let spaces: Vec<SpaceId> = (0..250).map(|n| space(&format!("s{n}"))).collect();
        for space in &spaces {
            poker.space_changed(space, Instant::now());
        }
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests();
        assert_all_well_formed(&requests);
        let sizes: Vec<usize> = requests.iter().map(|r| r.channels.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
        let counts = channel_counts(&requests);
        assert_eq!(counts.len(), 250);
        for space in &spaces {
            assert_eq!(counts.get(&format!("space-{}", space.as_str())), Some(&1));
        }
        let stats = poker.stats();
        assert_eq!((stats.calls_ok, stats.spaces_poked), (3, 250));
    }

    #[tokio::test]
    async fn server_error_then_success_is_delivered_after_a_retry() {
        let mock = MockPusher::start(vec![Reply::status(500)]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        poker.space_changed(&space("a"), Instant::now());
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests();
        assert_eq!(requests.len(), 2);
        assert!(requests.iter().all(|r| r.channels == ["space-a"]));
        assert_all_well_formed(&requests);
        let stats = poker.stats();
        assert_eq!(stats.calls_ok, 1);
        assert_eq!(stats.spaces_poked, 1);
        assert_eq!(stats.failed_calls, 1);
        assert_eq!(stats.retries, 1);
        assert_eq!(stats.given_up_spaces, 0);
    }

    #[tokio::test]
    async fn persistent_server_errors_give_up_after_max_attempts() {
        let mock = MockPusher::start(vec![Reply::status(503); 10]).await;
        let options = PokerOptions {
            max_attempts: 3,
            ..fast_options()
        };
        let poker = PusherPoker::start(mock.config(), options);
        poker.space_changed(&space("a"), Instant::now());
        assert_eq!(poker.shutdown(PATIENCE).await, 1);

        assert_eq!(mock.requests().len(), 3);
        let stats = poker.stats();
        assert_eq!(stats.failed_calls, 3);
        assert_eq!(stats.retries, 2);
        assert_eq!(stats.given_up_spaces, 1);
        assert_eq!(stats.calls_ok, 0);
    }

    #[tokio::test]
    async fn rate_limited_call_waits_for_retry_after_then_delivers() {
        let mock = MockPusher::start(vec![Reply::status(429).with_retry_after("1")]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        poker.space_changed(&space("a"), Instant::now());
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests();
        assert_eq!(requests.len(), 2);
        assert_all_well_formed(&requests);
        let waited = requests[1].at.duration_since(requests[0].at);
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(8),
            "waited {waited:?}"
        );
        let stats = poker.stats();
        assert_eq!(
            (stats.calls_ok, stats.retries, stats.failed_calls),
            (1, 1, 1)
        );
    }

    #[tokio::test]
    async fn rejected_call_is_not_retried_and_later_pokes_still_work() {
        let unauthorized = Reply::status(401).with_body(r#"{"error":"Invalid signature"}"#);
        let mock = MockPusher::start(vec![unauthorized]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        poker.space_changed(&space("a"), Instant::now());
        mock.wait_for_requests(1).await;
        let given_up = tokio::time::timeout(PATIENCE, async {
            while poker.stats().given_up_spaces == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(given_up.is_ok(), "the rejected poke was never given up");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(mock.requests().len(), 1, "a 401 must not be retried");

        poker.space_changed(&space("b"), Instant::now());
        assert_eq!(poker.shutdown(PATIENCE).await, 0);
        let requests = mock.requests();
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[1].channels, ["space-b"]);
        assert_all_well_formed(&requests);
        let stats = poker.stats();
        assert_eq!(stats.failed_calls, 1);
        assert_eq!(stats.retries, 0);
        assert_eq!(stats.given_up_spaces, 1);
        assert_eq!((stats.calls_ok, stats.spaces_poked), (1, 1));
    }

    #[tokio::test]
    async fn refused_connection_gives_up_after_bounded_attempts() {
        let options = PokerOptions {
            max_attempts: 3,
            ..fast_options()
        };
        let poker = PusherPoker::start(config_for_port(unused_port()), options);
        poker.space_changed(&space("a"), Instant::now());
        poker.space_changed(&space("b"), Instant::now());
        assert_eq!(poker.shutdown(PATIENCE).await, 2);

        let stats = poker.stats();
        assert_eq!(
            stats.failed_calls, 3,
            "one call per attempt for the one batch"
        );
        assert_eq!(stats.retries, 2);
        assert_eq!(stats.given_up_spaces, 2);
        assert_eq!(stats.calls_ok, 0);
    }

    #[tokio::test]
    async fn full_queue_drops_the_oldest_space_and_counts_it() {
        let mock = MockPusher::start(vec![Reply::ok().after(Duration::from_millis(300))]).await;
        let options = PokerOptions {
            max_pending_spaces: 3,
            ..fast_options()
        };
        let poker = PusherPoker::start(mock.config(), options);
        poker.space_changed(&space("first"), Instant::now());
        mock.wait_for_requests(1).await;
        for id in ["a", "b", "c", "d", "e"] {
            poker.space_changed(&space(id), Instant::now());
        }
        assert_eq!(poker.stats().dropped_spaces, 2);
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests();
        assert_all_well_formed(&requests);
        let channels: Vec<Vec<String>> = requests.into_iter().map(|r| r.channels).collect();
        assert_eq!(
            channels,
            [vec!["space-first"], vec!["space-c", "space-d", "space-e"]]
        );
        assert_eq!(poker.stats().spaces_poked, 4);
    }

    #[tokio::test]
    async fn shutdown_drains_pending_pokes_and_then_refuses_new_ones() {
        let slow = Reply::ok().after(Duration::from_millis(50));
        let mock = MockPusher::start(vec![slow.clone(), slow]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        for n in 0..150 {
            poker.space_changed(&space(&format!("s{n}")), Instant::now());
        }
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests();
        assert_eq!(requests.len(), 2);
        assert_all_well_formed(&requests);
        let counts = channel_counts(&requests);
        assert_eq!(counts.len(), 150);
        assert!(counts.values().all(|&count| count == 1));

        poker.space_changed(&space("late"), Instant::now());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(mock.requests().len(), 2, "no poke after shutdown");
        let stats = poker.stats();
        assert_eq!((stats.spaces_poked, stats.dropped_spaces), (150, 1));
    }

    #[tokio::test]
    async fn shutdown_gives_up_at_the_deadline() {
        let mock = MockPusher::start(vec![Reply::ok().after(Duration::from_secs(5))]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        poker.space_changed(&space("in-flight"), Instant::now());
        mock.wait_for_requests(1).await;
        poker.space_changed(&space("p1"), Instant::now());
        poker.space_changed(&space("p2"), Instant::now());

        let started = Instant::now();
        assert_eq!(poker.shutdown(Duration::from_millis(200)).await, 3);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let stats = poker.stats();
        assert_eq!((stats.given_up_spaces, stats.calls_ok), (3, 0));
        assert_eq!(poker.shutdown(Duration::from_millis(200)).await, 0);
    }

    #[tokio::test]
    async fn an_invalid_configuration_drops_pokes_without_panicking() {
        let mut config = config_for_port(unused_port());
        config.channel_prefix = "bad:prefix".to_owned();
        let poker = PusherPoker::start(config, fast_options());
        poker.space_changed(&space("a"), Instant::now());
        assert_eq!(poker.shutdown(PATIENCE).await, 1);
        let stats = poker.stats();
        assert_eq!((stats.given_up_spaces, stats.failed_calls), (1, 0));
    }
}
