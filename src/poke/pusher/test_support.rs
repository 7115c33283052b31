//! Test support: the credentials the tests sign with, and a mock Pusher HTTP API (wiremock)
//! that checks every call like Pusher does and answers scripted replies.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use reqwest::header::USER_AGENT;
use wiremock::matchers::{any, method};
use wiremock::{Match, Mock, MockBuilder, MockServer, Request, ResponseTemplate};

use super::config::{PusherConfig, Scheme};
use super::signing::{body_md5, sign, unix_timestamp};
use crate::protocol::SpaceId;

pub(crate) const APP_ID: &str = "12345";
pub(crate) const KEY: &str = "app-key-abc";
pub(crate) const SECRET: &str = "app-secret-xyz";
/// How long a test waits for something that should happen at once.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

pub(crate) fn space(id: &str) -> SpaceId {
    SpaceId::parse(id).expect("valid space id")
}

pub(crate) fn query_value<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// The test credentials, over plain HTTP to 127.0.0.1:`port`.
pub(crate) fn config_for_port(port: u16) -> PusherConfig {
    PusherConfig {
        app_id: APP_ID.to_owned(),
        key: KEY.to_owned(),
        secret: SECRET.into(),
        host: "127.0.0.1".to_owned(),
        port,
        scheme: Scheme::Http,
        channel_prefix: "space-".to_owned(),
        event_name: "poke".to_owned(),
    }
}

/// A Pusher answer: `status` with body `{}` (add `.set_delay`, `.insert_header` as needed).
pub(crate) fn reply(status: u16) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_string("{}")
}

/// A test double for the faults a real Pusher-compatible server cannot produce on demand (5xx,
/// 429 with retry-after, slow answers). It still checks every request like Pusher does:
/// signature (with this module's `sign`), body_md5, key, auth_version and timestamp, answering
/// 401 to a wrongly signed request.
pub(crate) struct MockPusher {
    server: MockServer,
}

impl MockPusher {
    /// Answers correctly signed calls with `replies` in order, then 200 `{}` to every one.
    pub(crate) async fn start(replies: Vec<ResponseTemplate>) -> MockPusher {
        let server = MockServer::start().await;
        for scripted in replies {
            signed_trigger()
                .respond_with(scripted)
                .up_to_n_times(1)
                .with_priority(1)
                .mount(&server)
                .await;
        }
        signed_trigger()
            .respond_with(reply(200))
            .with_priority(2)
            .mount(&server)
            .await;
        Mock::given(any())
            .respond_with(ResponseTemplate::new(401).set_body_string("bad signature"))
            .with_priority(3)
            .mount(&server)
            .await;
        MockPusher { server }
    }

    pub(crate) fn config(&self) -> PusherConfig {
        config_for_port(self.server.address().port())
    }

    /// Every request received so far, in order.
    pub(crate) async fn requests(&self) -> Vec<Received> {
        let requests = self.server.received_requests().await;
        let requests = requests.expect("request recording is on by default");
        requests.iter().map(Received::from).collect()
    }

    /// Waits until `count` requests arrived; returns when that was seen (within 5 ms).
    pub(crate) async fn wait_for_requests(&self, count: usize) -> Instant {
        let waited = tokio::time::timeout(PATIENCE, async {
            while self.requests().await.len() < count {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "mock never received {count} request(s)");
        Instant::now()
    }
}

fn signed_trigger() -> MockBuilder {
    Mock::given(method("POST")).and(SignedLikePusher)
}

/// Matches the trigger calls Pusher would accept.
struct SignedLikePusher;

impl Match for SignedLikePusher {
    fn matches(&self, request: &Request) -> bool {
        is_signed_correctly(request)
    }
}

fn is_signed_correctly(request: &Request) -> bool {
    let path = request.url.path();
    let params: Vec<(String, String)> = request
        .url
        .query_pairs()
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect();
    let Some(signature) = query_value(&params, "auth_signature") else {
        return false;
    };
    let unsigned: Vec<(&str, &str)> = params
        .iter()
        .filter(|(name, _)| name != "auth_signature")
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let fresh = query_value(&params, "auth_timestamp")
        .and_then(|ts| ts.parse::<u64>().ok())
        .is_some_and(|ts| ts.abs_diff(unix_timestamp()) <= 600);
    path == format!("/apps/{APP_ID}/events")
        && signature == sign(SECRET, "POST", path, &unsigned)
        && query_value(&params, "body_md5") == Some(body_md5(&request.body).as_str())
        && query_value(&params, "auth_key") == Some(KEY)
        && query_value(&params, "auth_version") == Some("1.0")
        && fresh
}

/// What a test asserts about one request the mock received.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub event: String,
    pub data: String,
    pub channels: Vec<String>,
    pub signed_correctly: bool,
    pub user_agent: String,
}

impl From<&Request> for Received {
    fn from(request: &Request) -> Received {
        let trigger: serde_json::Value = request.body_json().unwrap_or_default();
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
        let user_agent = request
            .headers
            .get(USER_AGENT)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Received {
            event: text("name"),
            data: text("data"),
            channels,
            signed_correctly: is_signed_correctly(request),
            user_agent,
        }
    }
}

/// How many calls named each channel.
pub(crate) fn channel_counts(requests: &[Received]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for channel in requests.iter().flat_map(|request| &request.channels) {
        *counts.entry(channel.clone()).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::poke::pusher::signing::signed_query;

    #[tokio::test]
    async fn the_mock_answers_401_to_a_wrong_signature_and_200_to_a_right_one() {
        let mock = MockPusher::start(vec![]).await;
        let config = mock.config();
        let body = br#"{"name":"poke","data":"","channels":["space-a"]}"#;
        let send = |secret: &str| {
            let path = config.events_path();
            let query = signed_query(KEY, secret, "POST", &path, &[], body, unix_timestamp());
            let mut url = config.events_url().expect("url");
            url.query_pairs_mut().extend_pairs(&query);
            reqwest::Client::new().post(url).body(body.to_vec()).send()
        };
        let wrong = send("not-the-secret").await.expect("mock answers");
        assert_eq!(wrong.status().as_u16(), 401);
        let right = send(SECRET).await.expect("mock answers");
        assert_eq!(right.status().as_u16(), 200);
        let signed: Vec<bool> = mock
            .requests()
            .await
            .iter()
            .map(|request| request.signed_correctly)
            .collect();
        assert_eq!(signed, [false, true]);
    }
}
