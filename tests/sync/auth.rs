//! Who may read and write a space: every kind of bad token is a 401, a space the token does not
//! grant is a 403, a webhook that cannot answer is a 503, and none of them reads or writes.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, encode};
use replisync::auth::authorize::Webhook;
use replisync::auth::jwks::Jwks;
use replisync::auth::jwt::{ClaimRules, JwtAuthenticator, Keys};
use replisync::auth::{AuthError, Authenticator, Identity};
use replisync::poke::pusher::{PrivateChannels, PusherArgs, PusherConfig, channel_auth_signature};
use replisync::startup::{App, AppBuilder};
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::harness::{Backend, TestServer, inc, push_body};

pub(crate) const SECRET: &str = "a-test-secret-of-some-length";
const ISSUER: &str = "https://issuer.test/";
const AUDIENCE: &str = "replisync-test";

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims of a good token for `user` granting `spaces` (read and write).
pub(crate) fn claims(user: &str, spaces: &[&str]) -> Value {
    json!({"sub": user, "exp": now() + 300, "iss": ISSUER, "aud": AUDIENCE, "spaces": spaces})
}

pub(crate) fn sign(claims: &Value, algorithm: Algorithm, secret: &[u8]) -> String {
    encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

pub(crate) fn token(claims: &Value) -> String {
    format!(
        "Bearer {}",
        sign(claims, Algorithm::HS256, SECRET.as_bytes())
    )
}

fn rules() -> ClaimRules {
    ClaimRules {
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        ..ClaimRules::default()
    }
}

pub(crate) fn hmac_options() -> AppBuilder {
    App::builder().authenticator(Arc::new(JwtAuthenticator::new(
        Keys::Secret(DecodingKey::from_secret(SECRET.as_bytes())),
        rules(),
    )))
}

fn webhook_at(url: String, timeout: Duration) -> Webhook {
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Webhook::new(url, http, Duration::from_secs(30), 1000)
}

/// A first push of a new client of `group` (client ids are unique across groups).
fn one_increment(group: &str) -> Value {
    push_body(
        group,
        &[(&format!("{group}-c"), 1, "increment", inc("n", 1))],
    )
}

/// Asserts a refusal with `status` and the JSON error `error`.
fn assert_refused(answer: (u16, Value), status: u16, error: &str, case: &str) {
    assert_eq!(answer.0, status, "{case}: {}", answer.1);
    assert_eq!(answer.1["error"], error, "{case}: {}", answer.1);
    assert!(answer.1["message"].is_string(), "{case}: {}", answer.1);
}

fn unsigned_token(header: &Value, claims: &Value) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.", part(header), part(claims))
}

async fn every_kind_of_bad_token_is_401_and_writes_nothing(backend: Backend) {
    let server = TestServer::start_with(backend, hmac_options()).await;
    let good = claims("alice", &["doc"]);
    assert_eq!(
        server
            .push_as("doc", &one_increment("g0"), &token(&good))
            .await,
        (200, json!({}))
    );
    let before = server.db.fingerprint().await;
    let with = |change: Value| {
        let mut claims = good.clone();
        for (name, value) in change.as_object().unwrap() {
            if value.is_null() {
                claims.as_object_mut().unwrap().remove(name);
            } else {
                claims[name] = value.clone();
            }
        }
        claims
    };
    let cases: Vec<(&str, String)> = vec![
        ("no token", String::new()),
        ("Bearer and nothing", "Bearer ".into()),
        ("not a JWT", "Bearer not-a-jwt".into()),
        ("garbage segments", "Bearer a.b.c".into()),
        (
            "alg none",
            format!(
                "Bearer {}",
                unsigned_token(&json!({"alg": "none", "typ": "JWT"}), &good)
            ),
        ),
        (
            "signed with another secret",
            format!(
                "Bearer {}",
                sign(&good, Algorithm::HS256, b"another secret")
            ),
        ),
        ("expired", token(&with(json!({"exp": now() - 120})))),
        ("no exp", token(&with(json!({"exp": null})))),
        ("not valid yet", token(&with(json!({"nbf": now() + 600})))),
        (
            "wrong issuer",
            token(&with(json!({"iss": "https://evil.test/"}))),
        ),
        (
            "wrong audience",
            token(&with(json!({"aud": "someone-else"}))),
        ),
        // Found by tests/fuzz: jsonwebtoken checks iss and aud only when they are present.
        ("no issuer", token(&with(json!({"iss": null})))),
        ("issuer not a string", token(&with(json!({"iss": 42})))),
        ("no audience", token(&with(json!({"aud": null})))),
        ("audience not a string", token(&with(json!({"aud": 7})))),
        ("no user", token(&with(json!({"sub": null})))),
        ("user not a string", token(&with(json!({"sub": 42})))),
        // A user id is stored: Postgres refuses NUL in text (found by tests/fuzz).
        (
            "user with a NUL",
            token(&with(json!({"sub": "al\u{0}ice"}))),
        ),
        ("spaces not a list", token(&with(json!({"spaces": "doc"})))),
    ];
    for (case, authorization) in &cases {
        let push = server
            .push_as("doc", &one_increment(&format!("g-{case}")), authorization)
            .await;
        assert_refused(push, 401, "Unauthorized", case);
        let pull = server
            .pull_as("doc", "g0", Value::Null, authorization)
            .await;
        assert_refused(pull, 401, "Unauthorized", case);
    }
    assert_eq!(
        server.db.fingerprint().await,
        before,
        "a refused request wrote"
    );
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(&format!("replisync_unauthorized_total {}", cases.len() * 2)),
        "{metrics}"
    );
}

/// An app's own authenticator, whose users are named by the token through this table.
struct NamedUsers;

#[async_trait]
impl Authenticator for NamedUsers {
    async fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, AuthError> {
        let user = match authorization.unwrap_or_default() {
            "nul" => "eve\0",
            "bell" => "eve\u{7}",
            "long" => &"e".repeat(201),
            other => other,
        };
        Ok(Identity::with_full_access(user))
    }
}

/// A user id Postgres cannot store (NUL), or that logs and compares badly (control
/// characters), or too long, is a 401 from every authenticator, before anything is written.
async fn a_user_id_with_control_characters_is_401_and_writes_nothing(backend: Backend) {
    let jwt = TestServer::start_with(backend, hmac_options()).await;
    let custom =
        TestServer::start_with(backend, App::builder().authenticator(Arc::new(NamedUsers))).await;
    let good = token(&claims("alice", &["doc"]));
    assert_eq!(jwt.push_as("doc", &one_increment("g0"), &good).await.0, 200);
    assert_eq!(
        custom.push_as("doc", &one_increment("g0"), "alice").await.0,
        200
    );
    let jwt_before = jwt.db.fingerprint().await;
    let custom_before = custom.db.fingerprint().await;
    let cases = [
        (
            &jwt,
            token(&claims("al\0ice", &["doc"])),
            "JWT sub with NUL",
        ),
        (
            &jwt,
            token(&claims("bob\n", &["doc"])),
            "JWT sub with a newline",
        ),
        (
            &jwt,
            token(&claims("\u{1b}[31mred", &["doc"])),
            "JWT sub with ESC",
        ),
        (&custom, "nul".to_owned(), "custom user with NUL"),
        (&custom, "bell".to_owned(), "custom user with BEL"),
        (&custom, "long".to_owned(), "custom user of 201 bytes"),
    ];
    for (server, authorization, case) in &cases {
        for attempt in 0..2 {
            let group = format!("g-{case}-{attempt}");
            let push = server
                .push_as("doc", &one_increment(&group), authorization)
                .await;
            assert_refused(push, 401, "Unauthorized", case);
        }
        let pull = server
            .pull_as("doc", "g-pull", Value::Null, authorization)
            .await;
        assert_refused(pull, 401, "Unauthorized", case);
    }
    let push = jwt.push_as("doc", &one_increment("g1"), &cases[0].1).await;
    let message = push.1["message"].as_str().unwrap_or_default().to_owned();
    assert!(
        message.contains("user id") && message.contains("NUL"),
        "{message}"
    );
    assert_eq!(
        jwt.db.fingerprint().await,
        jwt_before,
        "a refused request wrote"
    );
    assert_eq!(
        custom.db.fingerprint().await,
        custom_before,
        "a refused request wrote"
    );
    // A good user is still served.
    assert_eq!(jwt.push_as("doc", &one_increment("g2"), &good).await.0, 200);
}

async fn a_bare_token_works_like_a_bearer_token(backend: Backend) {
    let server = TestServer::start_with(backend, hmac_options()).await;
    let bare = sign(
        &claims("alice", &["doc"]),
        Algorithm::HS256,
        SECRET.as_bytes(),
    );
    assert_eq!(
        server.push_as("doc", &one_increment("g"), &bare).await.0,
        200
    );
    assert_eq!(server.state_as("doc", "g", &bare).await.entries["n"], 1);
}

async fn spaces_are_granted_by_the_token_and_denied_by_default(backend: Backend) {
    let server = TestServer::start_with(backend, hmac_options()).await;
    let alice = token(&claims("alice", &["doc-1", "team-7-*"]));
    for space in ["doc-1", "team-7-a", "team-7-"] {
        let group = format!("alice-{space}");
        assert_eq!(
            server
                .push_as(space, &one_increment(&group), &alice)
                .await
                .0,
            200,
            "{space} is granted"
        );
    }
    let before = server.db.fingerprint().await;
    for space in ["doc-10", "doc", "team-8-a", "team-7"] {
        let group = format!("alice-{space}");
        let push = server.push_as(space, &one_increment(&group), &alice).await;
        assert_refused(push, 403, "Forbidden", space);
        let pull = server.pull_as(space, &group, Value::Null, &alice).await;
        assert_refused(pull, 403, "Forbidden", space);
    }
    // Another user cannot read alice's space, even knowing its id and her client group's.
    let mallory = token(&claims("mallory", &["mallory-*"]));
    let pull = server
        .pull_as("doc-1", "alice-doc-1", Value::Null, &mallory)
        .await;
    assert_refused(pull, 403, "Forbidden", "another user's space");
    assert_eq!(
        server.db.fingerprint().await,
        before,
        "a refused request wrote"
    );
}

async fn a_read_only_grant_pulls_but_cannot_push(backend: Backend) {
    let server = TestServer::start_with(backend, hmac_options()).await;
    let writer = token(&claims("writer", &["doc"]));
    assert_eq!(
        server.push_as("doc", &one_increment("w"), &writer).await.0,
        200
    );
    let mut reader_claims = claims("reader", &[]);
    reader_claims["spaces_read"] = json!(["doc"]);
    let reader = token(&reader_claims);
    let before = server.db.fingerprint().await;
    let push = server.push_as("doc", &one_increment("r"), &reader).await;
    assert_refused(push, 403, "Forbidden", "read-only push");
    assert_eq!(server.db.fingerprint().await, before);
    assert_eq!(server.state_as("doc", "r", &reader).await.entries["n"], 1);
}

/// A reader's cookie ahead of the space (a wiped database, or a forged cookie) gets the whole
/// space at its own cookie and changes nothing: no version raise, no compaction horizon moved,
/// no space created. The writer's next pull is still a small delta.
async fn a_reader_ahead_of_the_space_changes_nothing(backend: Backend) {
    let server = TestServer::start_with(backend, hmac_options()).await;
    let writer = token(&claims("writer", &["doc"]));
    assert_eq!(
        server.push_as("doc", &one_increment("w"), &writer).await.0,
        200
    );
    let first = server.pull_ok_as("doc", "w", Value::Null, &writer).await;
    let writer_cookie = first["cookie"].clone();

    let mut reader_claims = claims("reader", &[]);
    reader_claims["spaces_read"] = json!(["doc", "empty-*"]);
    let reader = token(&reader_claims);
    let before = server.db.fingerprint().await;
    for cookie in [1000u64, 1 << 50] {
        let (status, pulled) = server.pull_as("doc", "r", json!(cookie), &reader).await;
        assert_eq!(status, 200, "{pulled}");
        assert_eq!(pulled["cookie"], json!(cookie), "cookies never go down");
        assert_eq!(
            pulled["patch"][0]["op"], "clear",
            "the whole space: {pulled}"
        );
        assert!(pulled["patch"].to_string().contains("\"n\""), "{pulled}");
    }
    let (status, pulled) = server.pull_as("empty-1", "r2", json!(7), &reader).await;
    assert_eq!(status, 200, "{pulled}");
    assert_eq!(
        server.db.fingerprint().await,
        before,
        "the reader changed nothing"
    );

    let delta = server.pull_ok_as("doc", "w", writer_cookie, &writer).await;
    assert_ne!(
        delta["patch"].get(0).map(|op| &op["op"]),
        Some(&json!("clear")),
        "the writer's pull is not a reset: {delta}"
    );
}

/// A webhook answering `status` for every question, after `delay`.
async fn webhook_answering(status: u16, delay: Duration) -> MockServer {
    let webhook = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/authz"))
        .respond_with(ResponseTemplate::new(status).set_delay(delay))
        .mount(&webhook)
        .await;
    webhook
}

fn webhook_options(url: String) -> AppBuilder {
    hmac_options().authz_webhook(webhook_at(url, Duration::from_millis(500)))
}

async fn the_webhook_grants_what_the_token_does_not_and_its_answers_are_cached(backend: Backend) {
    let webhook = webhook_answering(204, Duration::ZERO).await;
    let server =
        TestServer::start_with(backend, webhook_options(format!("{}/authz", webhook.uri()))).await;
    let alice = token(&claims("alice", &[]));
    for id in 1..=3 {
        let body = push_body("g", &[("g-c", id, "increment", inc("n", 1))]);
        assert_eq!(server.push_as("doc", &body, &alice).await.0, 200);
    }
    assert_eq!(server.state_as("doc", "g", &alice).await.entries["n"], 3);
    let asked = webhook.received_requests().await.unwrap();
    // One question per (user, space, access): write once, read once; the rest were cached.
    assert_eq!(
        asked.len(),
        2,
        "the webhook was asked {} times",
        asked.len()
    );
    let question: Value = serde_json::from_slice(&asked[0].body).unwrap();
    assert_eq!(
        question,
        json!({"user": "alice", "space": "doc", "access": "write"})
    );
    assert_eq!(asked[0].headers["authorization"], alice.as_str());
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("replisync_authz_webhook_calls_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("replisync_authz_cache_hits_total 2"),
        "{metrics}"
    );
}

async fn a_webhook_that_denies_hangs_fails_or_is_down_never_allows(backend: Backend) {
    let denying = webhook_answering(403, Duration::ZERO).await;
    let missing = webhook_answering(404, Duration::ZERO).await;
    let hanging = webhook_answering(200, Duration::from_secs(5)).await;
    let failing = webhook_answering(500, Duration::ZERO).await;
    let redirecting = webhook_answering(302, Duration::ZERO).await;
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{address}")
    };
    let cases = [
        ("denies", denying.uri(), 403),
        ("does not know the space", missing.uri(), 403),
        ("hangs", hanging.uri(), 503),
        ("fails", failing.uri(), 503),
        ("answers a redirect", redirecting.uri(), 503),
        ("is down", down, 503),
    ];
    for (case, base, status) in cases {
        let server =
            TestServer::start_with(backend, webhook_options(format!("{base}/authz"))).await;
        let alice = token(&claims("alice", &[]));
        let before = server.db.fingerprint().await;
        let error = if status == 403 {
            "Forbidden"
        } else {
            "Unavailable"
        };
        let push = server.push_as("doc", &one_increment("g"), &alice).await;
        assert_refused(push, status, error, case);
        let pull = server.pull_as("doc", "g", Value::Null, &alice).await;
        assert_refused(pull, status, error, case);
        assert_eq!(server.db.fingerprint().await, before, "{case}: wrote");
    }
}

/// An Ed25519 key pair (PKCS#8 DER, and the public key as a JWK `x`), made for these tests.
const ED25519_PKCS8_HEX: &str = "302e020100300506032b657004220420dc628c1c8e51b3ce74db9f36c24f07812597bc22ff5a4e0f5df15b0e042b8360";
const ED25519_PUBLIC_X: &str = "9M4Die81kgeJIb8OIpnT00l979ONNSwhfppI-YV3Wlc";

fn eddsa_token(claims: &Value, kid: &str) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.into());
    let key = EncodingKey::from_ed_der(&hex::decode(ED25519_PKCS8_HEX).unwrap());
    format!("Bearer {}", encode(&header, claims, &key).unwrap())
}

async fn jwks_provider() -> MockServer {
    let provider = MockServer::start().await;
    let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": ED25519_PUBLIC_X,
                                "kid": "key-1", "use": "sig", "alg": "EdDSA"}]});
    Mock::given(method("GET"))
        .and(path("/.well-known/jwks.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(jwks))
        .mount(&provider)
        .await;
    provider
}

fn jwks_options(url: String) -> AppBuilder {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    App::builder().authenticator(Arc::new(JwtAuthenticator::new(
        Keys::Jwks(Jwks::new(url, http, Duration::from_secs(60))),
        rules(),
    )))
}

async fn jwks_tokens_verify_and_bogus_key_ids_cannot_make_us_hammer_the_provider(backend: Backend) {
    let provider = jwks_provider().await;
    let url = format!("{}/.well-known/jwks.json", provider.uri());
    let server = TestServer::start_with(backend, jwks_options(url)).await;
    let good = claims("alice", &["doc"]);
    let alice = eddsa_token(&good, "key-1");
    assert_eq!(
        server.push_as("doc", &one_increment("g"), &alice).await,
        (200, json!({}))
    );
    let before = server.db.fingerprint().await;
    for attempt in 0..20 {
        let bogus = eddsa_token(&good, &format!("bogus-{attempt}"));
        let push = server.push_as("doc", &one_increment("g2"), &bogus).await;
        assert_refused(push, 401, "Unauthorized", "unknown kid");
    }
    // An HMAC token keyed with the public key (algorithm confusion) is refused.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("key-1".into());
    let confused = encode(
        &header,
        &good,
        &EncodingKey::from_secret(ED25519_PUBLIC_X.as_bytes()),
    );
    let push = server
        .push_as(
            "doc",
            &one_increment("g3"),
            &format!("Bearer {}", confused.unwrap()),
        )
        .await;
    assert_refused(push, 401, "Unauthorized", "HS256 with the public key");
    assert_eq!(server.db.fingerprint().await, before);
    let fetches = provider.received_requests().await.unwrap().len();
    assert!(
        fetches <= 2,
        "the JWKS was fetched {fetches} times for 20 unknown key ids"
    );
}

/// A provider that fails: 503 for every token, never an allow, and one fetch per refetch
/// interval however many tokens come.
async fn an_unreachable_jwks_is_503_never_an_allow(backend: Backend) {
    let provider = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&provider)
        .await;
    let server = TestServer::start_with(backend, jwks_options(provider.uri())).await;
    let before = server.db.fingerprint().await;
    let alice = eddsa_token(&claims("alice", &["doc"]), "key-1");
    for _ in 0..10 {
        let push = server.push_as("doc", &one_increment("g"), &alice).await;
        assert_refused(push, 503, "Unavailable", "JWKS down");
    }
    assert_eq!(server.db.fingerprint().await, before);
    // Failed fetches count against the refetch interval too: a flood of requests while the
    // provider is down is not a flood of fetches.
    let fetches = provider.received_requests().await.unwrap().len();
    assert_eq!(
        fetches, 1,
        "the failing JWKS was fetched {fetches} times for 10 tokens"
    );
}

fn private_channel_options() -> AppBuilder {
    let args = PusherArgs {
        app_id: Some("12345".into()),
        key: Some("app-key-abc".into()),
        secret: Some("app-secret-xyz".into()),
        host: Some("127.0.0.1".into()),
        channel_prefix: Some("private-space-".into()),
        ..PusherArgs::default()
    };
    let config = PusherConfig::from_args(&args).unwrap().unwrap();
    hmac_options().private_channels(PrivateChannels::new(&config))
}

async fn pusher_auth_signs_private_channels_for_readers_only(backend: Backend) {
    let server = TestServer::start_with(backend, private_channel_options()).await;
    let ask = |form: &'static str, authorization: String| {
        let server = &server;
        async move {
            let response = server
                .http
                .post(server.url("/pusher/auth"))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("authorization", authorization)
                .body(form)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let form = "socket_id=123.456&channel_name=private-space-0f3c2a";
    let reader = token(&claims("alice", &["0f3c2a"]));
    let (status, body) = ask(form, reader.clone()).await;
    assert_eq!(status, 200, "{body}");
    // The official vector for this key, secret, socket and channel.
    assert_eq!(
        body["auth"],
        "app-key-abc:60e3c477313d84247eb82c9405b703f045cd38b6cbbed774aa8f4cd06d2149ef"
    );
    assert_eq!(
        body["auth"],
        channel_auth_signature(
            "app-key-abc",
            "app-secret-xyz",
            "123.456",
            "private-space-0f3c2a"
        )
    );
    let stranger = token(&claims("mallory", &["other"]));
    assert_refused(ask(form, stranger).await, 403, "Forbidden", "no access");
    assert_refused(
        ask(form, String::new()).await,
        401,
        "Unauthorized",
        "no token",
    );
    let public = "socket_id=123.456&channel_name=space-0f3c2a";
    assert_refused(
        ask(public, reader.clone()).await,
        403,
        "Forbidden",
        "not ours",
    );
    let bad_socket = "socket_id=abc&channel_name=private-space-0f3c2a";
    assert_refused(
        ask(bad_socket, reader).await,
        400,
        "InvalidRequest",
        "socket id",
    );
}

async fn the_sse_stream_needs_read_access_and_takes_its_token_from_the_query(backend: Backend) {
    let options = hmac_options().sse(crate::harness::sse_every(Duration::from_secs(15)));
    let server = TestServer::start_with(backend, options).await;
    let status = |path: String| {
        let server = &server;
        async move { server.get(&path).await.status().as_u16() }
    };
    assert_eq!(status("/spaces/doc/poke".into()).await, 401);
    let stranger = sign(
        &claims("mallory", &["x"]),
        Algorithm::HS256,
        SECRET.as_bytes(),
    );
    assert_eq!(
        status(format!("/spaces/doc/poke?auth={stranger}")).await,
        403
    );
    let reader = sign(
        &claims("alice", &["doc"]),
        Algorithm::HS256,
        SECRET.as_bytes(),
    );
    assert_eq!(status(format!("/spaces/doc/poke?auth={reader}")).await, 200);
}

/// `GET /spaces/{space}/access` answers what a pull's grant check decides: read and write for a
/// writer, read only for a reader, 403 for anyone else and 401 without a token; it creates no
/// space and changes nothing.
async fn the_access_route_answers_the_pull_grant_check_and_changes_nothing(backend: Backend) {
    let server = TestServer::start_with(backend, hmac_options()).await;
    let ask = |authorization: Option<String>, space: &str| {
        let request = server
            .http
            .get(server.url(&format!("/spaces/{space}/access")));
        let request = match authorization {
            Some(value) => request.header("authorization", value),
            None => request,
        };
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let mut reader_claims = claims("reader", &[]);
    reader_claims["spaces_read"] = json!(["doc"]);
    let before = server.db.fingerprint().await;

    let writer = ask(Some(token(&claims("writer", &["doc"]))), "doc").await;
    assert_eq!(
        writer,
        (
            200,
            json!({"space": "doc", "user": "writer", "read": true, "write": true})
        )
    );
    let reader = ask(Some(token(&reader_claims)), "doc").await;
    assert_eq!(
        reader,
        (
            200,
            json!({"space": "doc", "user": "reader", "read": true, "write": false})
        )
    );
    let other = ask(Some(token(&claims("other", &["elsewhere"]))), "doc").await;
    assert_refused(other, 403, "Forbidden", "no grant");
    assert_refused(ask(None, "doc").await, 401, "Unauthorized", "no token");
    let expired = json!({"sub": "writer", "spaces": ["doc"], "exp": now() - 3600,
                         "iss": ISSUER, "aud": AUDIENCE});
    assert_refused(
        ask(Some(token(&expired)), "doc").await,
        401,
        "Unauthorized",
        "expired",
    );
    let bad_space = ask(Some(token(&claims("writer", &["*"]))), "no%20spaces").await;
    assert_refused(bad_space, 400, "InvalidSpaceId", "bad space id");
    assert_eq!(server.db.fingerprint().await, before, "nothing created");
}

crate::on_both_stores!(
    the_access_route_answers_the_pull_grant_check_and_changes_nothing,
    a_reader_ahead_of_the_space_changes_nothing,
    every_kind_of_bad_token_is_401_and_writes_nothing,
    a_user_id_with_control_characters_is_401_and_writes_nothing,
    a_bare_token_works_like_a_bearer_token,
    spaces_are_granted_by_the_token_and_denied_by_default,
    a_read_only_grant_pulls_but_cannot_push,
    the_webhook_grants_what_the_token_does_not_and_its_answers_are_cached,
    a_webhook_that_denies_hangs_fails_or_is_down_never_allows,
    jwks_tokens_verify_and_bogus_key_ids_cannot_make_us_hammer_the_provider,
    an_unreachable_jwks_is_503_never_an_allow,
    pusher_auth_signs_private_channels_for_readers_only,
    the_sse_stream_needs_read_access_and_takes_its_token_from_the_query,
);
