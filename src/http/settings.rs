//! The HTTP edge's settings: where to listen, the body limit, the timeouts, the connection cap,
//! CORS, and the drain and shutdown times, checked at start-up with messages naming the variable.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::HeaderValue;

use crate::protocol::SchemaVersions;

/// The edge's variables as given; [`HttpArgs::settings`] checks them.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "HTTP server")]
pub struct HttpArgs {
    /// Address and port to listen on.
    #[arg(long, env = "REPLISYNC_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address and port for `/metrics` alone (e.g. 127.0.0.1:9090, for a scraper on a private
    /// network). Unset: `/metrics` is served on REPLISYNC_LISTEN, beside push and pull.
    #[arg(long, env = "REPLISYNC_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Largest accepted request body but a push's, in bytes (larger ones get 413); also the most
    /// of a body answered before it was read (see REPLISYNC_UNREAD_BODY_LINGER_MS) that is read
    /// and dropped.
    #[arg(long, env = "REPLISYNC_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Seconds any request may take, its body included, before it is answered 503 (a push is
    /// rolled back) and its connection closed. Streamed responses (pull streams, SSE) are
    /// bounded by their own limits once they have started.
    #[arg(long, env = "REPLISYNC_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,

    /// Seconds to finish in-flight requests and pending pokes after SIGTERM or Ctrl-C; then what
    /// still runs is dropped and the process exits with status 1.
    #[arg(long, env = "REPLISYNC_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
    pub shutdown_timeout_secs: u64,

    /// Seconds to keep serving after SIGTERM, with `GET /readyz` answering 503, before the
    /// server stops accepting connections: time for a load balancer to take it out of rotation.
    /// 0 stops accepting at once. The shutdown timeout counts from the end of this delay.
    #[arg(long, env = "REPLISYNC_DRAIN_DELAY_SECS", default_value_t = 5)]
    pub drain_delay_secs: u64,

    /// Seconds a connection may take to send complete request headers (counted from accept, or
    /// from the first byte of a later request); then it is closed.
    #[arg(long, env = "REPLISYNC_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,

    /// Seconds a request body may pause between two of its bytes; a body that stalls longer is
    /// cut (408) and its connection closed. Every request, body included, must also be answered
    /// within REPLISYNC_REQUEST_TIMEOUT_SECS.
    #[arg(long, env = "REPLISYNC_BODY_READ_TIMEOUT_SECS", default_value_t = 30)]
    pub body_read_timeout_secs: u64,

    /// Milliseconds the server keeps reading, and dropping, a request body it answered before
    /// reading it (a 401, a 413), at most REPLISYNC_MAX_BODY_BYTES of it: a client still sending
    /// then reads the answer and keeps its connection. A body not over by then has its
    /// connection closed (`Connection: close`). 0 reads only what has already arrived.
    #[arg(long, env = "REPLISYNC_UNREAD_BODY_LINGER_MS", default_value_t = 1000)]
    pub unread_body_linger_ms: u64,

    /// Seconds a keep-alive connection may stay open with no request in flight; then it is
    /// closed.
    #[arg(long, env = "REPLISYNC_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,

    /// Most client connections open at once; beyond it, new connections are answered 503 with
    /// Retry-After and closed.
    #[arg(long, env = "REPLISYNC_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Origins allowed to call push, pull and pokes from a browser: a comma-separated list, or
    /// `*` for every origin. Unset: loopback origins only (http://localhost:PORT, 127.0.0.1).
    #[arg(long, env = "REPLISYNC_CORS_ORIGINS", default_value = "")]
    pub cors_origins: String,

    /// The client `schemaVersion`s served, comma-separated (`2,3`; `""` for clients that set
    /// none). A push or pull with another is answered VersionNotSupported (versionType
    /// `schema`), on which Replicache calls `onUpdateNeeded`. Unset: every schemaVersion.
    #[arg(long, env = "REPLISYNC_SCHEMA_VERSIONS", default_value = "")]
    pub schema_versions: String,

    /// One `info` line per request (target `replisync::access`): method, route, status,
    /// duration_ms, space, request id, bytes in and out. `false` writes none.
    #[arg(
        long,
        env = "REPLISYNC_ACCESS_LOG",
        default_value_t = true,
        action = clap::ArgAction::Set,
        help_heading = "Logging"
    )]
    pub access_log: bool,
}

impl HttpArgs {
    /// The edge's settings, checked: limits above 0 and origins that parse.
    pub fn settings(&self) -> Result<HttpSettings, String> {
        for (value, name) in [
            (self.max_body_bytes, "REPLISYNC_MAX_BODY_BYTES"),
            (self.max_connections, "REPLISYNC_MAX_CONNECTIONS"),
        ] {
            if value == 0 {
                return Err(format!("{name} must be above 0"));
            }
        }
        Ok(HttpSettings {
            max_body_bytes: self.max_body_bytes,
            request_timeout: Duration::from_secs(self.request_timeout_secs.max(1)),
            cors_origins: self.cors_origins()?,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            drain_delay: Duration::from_secs(self.drain_delay_secs),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs.max(1)),
            body_read_timeout: Duration::from_secs(self.body_read_timeout_secs.max(1)),
            unread_body_linger: Duration::from_millis(self.unread_body_linger_ms),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs.max(1)),
            max_connections: self.max_connections,
            access_log: self.access_log,
            schema_versions: SchemaVersions::parse(&self.schema_versions),
        })
    }

    fn cors_origins(&self) -> Result<CorsOrigins, String> {
        Ok(match self.cors_origins.trim() {
            "" => CorsOrigins::Loopback,
            "*" => CorsOrigins::Any,
            list => CorsOrigins::List(
                list.split(',')
                    .map(|origin| {
                        check_origin(origin.trim()).map_err(|problem| {
                            format!(
                                "REPLISYNC_CORS_ORIGINS has an invalid origin {origin:?}: {problem}"
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        })
    }
}

/// An origin exactly as a browser sends it (`scheme://host[:port]`, lowercase, nothing after
/// the port), so that it can match: anything else would be accepted and never match.
fn check_origin(origin: &str) -> Result<HeaderValue, String> {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return Err(format!(
            "it has no scheme; write it as the browser sends it, e.g. https://{origin}"
        ));
    };
    if scheme.is_empty() || authority.is_empty() {
        return Err("an origin is scheme://host[:port], e.g. https://app.example.com".into());
    }
    if let Some(at) = authority.find(['/', '?', '#']) {
        return Err(format!(
            "an origin has no path; write {scheme}://{} without what follows",
            &authority[..at]
        ));
    }
    if origin.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!(
            "browsers send origins in lowercase; write {}",
            origin.to_ascii_lowercase()
        ));
    }
    origin
        .parse()
        .map_err(|_| "it is not a valid header value".to_string())
}

/// Limits and switches of the HTTP edge, validated from [`HttpArgs`].
#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// Which browser origins may call push, pull and pokes.
    pub cors_origins: CorsOrigins,
    /// How long shutdown waits for in-flight requests and pending pokes.
    pub shutdown_timeout: Duration,
    /// How long the server keeps serving after SIGTERM (`/readyz` answering 503) before it
    /// stops accepting connections.
    pub drain_delay: Duration,
    /// How long a connection may take to send complete request headers.
    pub header_read_timeout: Duration,
    /// How long a request body may pause between two of its bytes before it is cut.
    pub body_read_timeout: Duration,
    /// How long the server reads and drops a body it answered before reading it.
    pub unread_body_linger: Duration,
    /// How long a keep-alive connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Most client connections open at once.
    pub max_connections: usize,
    /// Whether each request writes its access log line.
    pub access_log: bool,
    /// The client schemaVersions pushes and pulls may carry.
    pub schema_versions: SchemaVersions,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            cors_origins: CorsOrigins::Loopback,
            shutdown_timeout: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            unread_body_linger: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            access_log: true,
            schema_versions: SchemaVersions::any(),
        }
    }
}

/// Browser origins allowed to call replisync cross-origin. `/metrics` and `/healthz` are never
/// served cross-origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CorsOrigins {
    /// Pages served from this machine only (`http://localhost:3000`, `http://127.0.0.1:5173`):
    /// no web page on the internet can reach a local replisync through a visitor's browser.
    Loopback,
    /// Every origin (`REPLISYNC_CORS_ORIGINS=*`).
    Any,
    /// These origins exactly.
    List(Vec<HeaderValue>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(args: &[&str]) -> HttpArgs {
        crate::config::parse_feature_args(args)
    }

    #[test]
    fn cors_origins_parse_as_a_list() {
        let mut c = args(&[]);
        c.cors_origins = "https://a.example, https://b.example".into();
        assert!(
            matches!(c.settings().unwrap().cors_origins, CorsOrigins::List(list) if list.len() == 2)
        );
        c.cors_origins = "*".into();
        assert_eq!(c.settings().unwrap().cors_origins, CorsOrigins::Any);
        c.cors_origins = String::new();
        assert_eq!(c.settings().unwrap().cors_origins, CorsOrigins::Loopback);
        c.cors_origins = "capacitor://localhost, http://127.0.0.1:3000".into();
        assert!(c.settings().is_ok(), "any scheme, with a port");
    }

    #[test]
    fn cors_origins_that_could_never_match_are_refused_with_the_fix() {
        let refused = |list: &str| {
            let mut c = args(&[]);
            c.cors_origins = list.into();
            c.settings().unwrap_err()
        };
        let error = refused("https://a.example, example.com");
        assert!(error.contains("REPLISYNC_CORS_ORIGINS"), "{error}");
        assert!(error.contains("no scheme"), "{error}");
        assert!(error.contains("https://example.com"), "{error}");
        let error = refused("https://example.com/");
        assert!(error.contains("no path"), "{error}");
        assert!(error.contains("write https://example.com "), "{error}");
        assert!(refused("https://example.com/app?x").contains("no path"));
        assert!(refused("https://Example.com").contains("lowercase"));
        assert!(refused("://example.com").contains("scheme://host"));
    }
}
