//! Requests that never finish cannot hold the server: every route of the router (the list comes
//! from the router's own table, so a new route is covered by default) cuts a body that stalls
//! and closes its connection, and a browser route checks the token before reading any body.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::DecodingKey;
use replisync::auth::jwt::{ClaimRules, JwtAuthenticator, Keys};
use replisync::http::settings::HttpSettings;
use replisync::http::{Audience, Endpoint, MetricsEndpoint, endpoints};
use replisync::startup::App;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::{Backend, TestServer};
use crate::limits::read_until_closed;

/// Longer than any bound under test: a connection still open then is held.
const HELD: Duration = Duration::from_secs(15);

/// The route's path with a space filled in.
fn path_of(endpoint: &Endpoint) -> String {
    endpoint.path.replace("{space}", "s")
}

/// Sends `endpoint`'s request head declaring a 100-byte body, and 11 bytes of it.
async fn partial_request(server: &TestServer, endpoint: &Endpoint) -> TcpStream {
    let address = server.base.trim_start_matches("http://");
    let mut tcp = TcpStream::connect(address).await.unwrap();
    let head = format!(
        "{} {} HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 100\r\n\r\nsocket_id=1",
        endpoint.method,
        path_of(endpoint)
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partial_body_on_any_route_is_cut_and_its_connection_closed() {
    let http = HttpSettings {
        body_read_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(3),
        // Longer than the test: only the request's own bounds may close it.
        header_read_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        ..HttpSettings::default()
    };
    let options = App::builder()
        .http(http)
        .sse(crate::harness::sse_every(Duration::from_secs(1)));
    let server = TestServer::start_with(Backend::Sqlite, options).await;
    let routes = endpoints(MetricsEndpoint::Here);
    assert!(routes.len() >= 7, "every route is listed: {routes:?}");
    let mut held = Vec::new();
    for endpoint in &routes {
        held.push((endpoint, partial_request(&server, endpoint).await));
    }
    for (endpoint, tcp) in &mut held {
        let answer = read_until_closed(tcp, HELD).await;
        let answer = answer.unwrap_or_else(|| {
            panic!(
                "{} {} held its connection open",
                endpoint.method, endpoint.path
            )
        });
        let status = answer.lines().next().unwrap_or_default();
        assert!(
            ["HTTP/1.1 4", "HTTP/1.1 503"]
                .iter()
                .any(|refusal| status.starts_with(refusal)),
            "{} {} answered {answer:?}",
            endpoint.method,
            endpoint.path
        );
        assert!(answer.contains("\"error\""), "a JSON error body: {answer}");
    }
    assert!(
        server.metrics.request_bodies_stalled.get() >= 2,
        "push, pull and /pusher/auth read their bodies and saw them stall"
    );
    let health = server.get("/healthz").await;
    assert_eq!(health.status(), 200, "the server still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_browser_route_refuses_a_missing_token_before_reading_the_body() {
    let http = HttpSettings {
        // Longer than the test: an answer can only come before the body arrives.
        body_read_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_secs(60),
        ..HttpSettings::default()
    };
    let options = App::builder()
        .http(http)
        .authenticator(Arc::new(JwtAuthenticator::new(
            Keys::Secret(DecodingKey::from_secret(b"a-test-secret-of-some-length")),
            ClaimRules::default(),
        )))
        .sse(crate::harness::sse_every(Duration::from_secs(1)));
    let server = TestServer::start_with(Backend::Sqlite, options).await;
    let browser_routes: Vec<Endpoint> = endpoints(MetricsEndpoint::Here)
        .into_iter()
        .filter(|endpoint| endpoint.audience == Audience::Browser)
        .collect();
    assert!(browser_routes.iter().any(|e| e.path == "/pusher/auth"));
    for endpoint in &browser_routes {
        if endpoint.method == "GET" {
            continue; // a GET carries no body (refused 400 before anything else)
        }
        let mut tcp = partial_request(&server, endpoint).await;
        let answer = read_until_closed(&mut tcp, HELD).await;
        let answer = answer.unwrap_or_else(|| {
            panic!(
                "{} {} waited for the body of an unauthenticated request",
                endpoint.method, endpoint.path
            )
        });
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "{} {}: {answer}",
            endpoint.method,
            endpoint.path
        );
        // The rest of the body did not come within REPLISYNC_UNREAD_BODY_LINGER_MS.
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{} {}: {answer}",
            endpoint.method,
            endpoint.path
        );
    }
    assert_eq!(server.metrics.request_bodies_stalled.get(), 0);
    assert!(server.metrics.request_bodies_left_unread.get() >= 1);
}
