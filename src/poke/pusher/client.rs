//! The HTTP publisher: signed `POST /apps/{app_id}/events` calls over one keep-alive reqwest
//! client, each answer classified as accepted, transient (retry) or rejected (give up).

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use secrecy::ExposeSecret;

use super::config::PusherConfig;
use super::signing::trigger_body;
use super::signing::{signed_query, unix_timestamp};
use crate::poke::delivery::{Poker, PokerOptions, Sent, Transport};
use crate::protocol::SpaceId;

/// Pusher accepts at most this many channels in one `POST /apps/{app_id}/events` call.
pub const MAX_CHANNELS_PER_CALL: usize = 100;

const MAX_LOGGED_RESPONSE_CHARS: usize = 500;
const USER_AGENT: &str = concat!("replisync/", env!("CARGO_PKG_VERSION"));

pub(super) enum PublishOutcome {
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
#[derive(Debug)]
pub struct PusherPublisher {
    client: reqwest::Client,
    events_url: Url,
    events_path: String,
    config: PusherConfig,
}

impl PusherPublisher {
    /// Fails, with the reason, on a configuration that fails `validate`.
    pub(super) fn new(
        config: &PusherConfig,
        options: &PokerOptions,
    ) -> Result<PusherPublisher, String> {
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
        Ok(PusherPublisher {
            client,
            events_url,
            events_path: config.events_path(),
            config: config.clone(),
        })
    }

    /// One signed call (a fresh `auth_timestamp` each time).
    pub(super) async fn publish(&self, body: &[u8]) -> PublishOutcome {
        let query = signed_query(
            &self.config.key,
            self.config.secret.expose_secret(),
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

    /// A signed `GET /apps/{app_id}/channels`, which publishes nothing: whether the server
    /// answers, and accepts the app id, key and secret.
    pub(super) async fn check(&self) -> PublishOutcome {
        let path = format!("/apps/{}/channels", self.config.app_id);
        let query = signed_query(
            &self.config.key,
            self.config.secret.expose_secret(),
            "GET",
            &path,
            &[],
            &[],
            unix_timestamp(),
        );
        let mut url = self.events_url.clone();
        url.set_path(&path);
        url.query_pairs_mut().extend_pairs(&query);
        match self.client.get(url).send().await {
            Ok(response) => classify_response(response).await,
            Err(error) => PublishOutcome::Transient {
                reason: describe_request_error(error),
                retry_after: None,
            },
        }
    }
}

/// Pokes through Pusher: a [`Poker`] over signed HTTP calls.
pub type PusherPoker = Poker<PusherPublisher>;

impl PusherPoker {
    /// Spawns the worker (inside a Tokio runtime). A configuration that fails `validate` is
    /// logged at error level and every poke is given up.
    pub fn start(config: PusherConfig, options: PokerOptions) -> Arc<PusherPoker> {
        let publisher = PusherPublisher::new(&config, &options);
        Poker::spawn(publisher, options)
    }
}

impl Transport for PusherPublisher {
    const NAME: &'static str = "Pusher";
    const MAX_SPACES_PER_CALL: usize = MAX_CHANNELS_PER_CALL;

    /// One `POST /apps/{app_id}/events` with the spaces' channels.
    async fn send(&self, spaces: &[SpaceId]) -> Sent {
        let channels: Vec<String> = spaces
            .iter()
            .map(|space| self.config.channel_for(space))
            .collect();
        let body = match trigger_body(&self.config.event_name, &channels) {
            Ok(body) => body,
            Err(error) => {
                return Sent::Unsendable {
                    reason: error.to_string(),
                };
            }
        };
        match self.publish(&body).await {
            PublishOutcome::Accepted => Sent::Accepted,
            PublishOutcome::Transient {
                reason,
                retry_after,
            } => Sent::Transient {
                reason,
                retry_after,
            },
            PublishOutcome::Rejected { status, detail } => Sent::Rejected {
                code: status.as_u16(),
                detail,
                hint: rejection_hint(status),
            },
        }
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

/// Logs, once at start-up, whether the Pusher server `config` names can be reached and accepts
/// the credentials: a wrong host or secret shows at start, not at the first poke.
pub async fn log_reachability(config: PusherConfig, options: PokerOptions) {
    let Ok(publisher) = PusherPublisher::new(&config, &options) else {
        return; // The worker logs an invalid configuration.
    };
    let server = format!(
        "{}://{}:{}",
        config.scheme.as_str(),
        config.host,
        config.port
    );
    match publisher.check().await {
        PublishOutcome::Accepted => {
            tracing::info!(%server, "pusher: the server answers and accepts the credentials");
        }
        PublishOutcome::Transient { reason, .. } => tracing::warn!(
            %server,
            %reason,
            "pusher: the server cannot be reached; pokes will be retried as they come (check PUSHER_HOST, PUSHER_PORT and PUSHER_SCHEME, or PUSHER_CLUSTER)"
        ),
        PublishOutcome::Rejected { status, detail } => tracing::warn!(
            %server,
            status = status.as_u16(),
            %detail,
            "pusher: the server refused a signed request (check PUSHER_APP_ID, PUSHER_KEY and PUSHER_SECRET)"
        ),
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
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_ignores_dates() {
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
}
