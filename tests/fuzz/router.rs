//! Layer 2: the real router in-process (built as the binary builds it, called through tower's
//! `oneshot`), with tokens verified against a secret, private channels and SSE pokes on.
//!
//! No input may get a 5xx. A 503 is how replisync refuses for load (Busy, Overloaded,
//! PartiallyApplied), and each target sends one request at a time, far below every limit, so
//! a 503 here would mean input alone used up capacity (a leaked stream slot, a push
//! reservation never returned): it fails the target like a 500 does. Every 4xx is a JSON
//! `{"error", "message"}`, and a refused push leaves its space's version as it was.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes, to_bytes};
use axum::extract::Query;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use jsonwebtoken::DecodingKey;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseResult;
use replisync::auth::jwt::{ClaimRules, JwtAuthenticator, Keys};
use replisync::auth::{Access, Authenticator};
use replisync::http::MetricsEndpoint;
use replisync::poke::pusher::{PrivateChannels, PusherArgs, PusherConfig};
use replisync::poke::sse::settings::SseSettings;
use replisync::protocol::SpaceId;
use replisync::startup::App;
use replisync::store::Store;
use replisync::store::postgres::PgStore;
use replisync::store::sqlite::SqliteStore;
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::PgConnectOptions;
use tokio::runtime::Runtime;
use tower::ServiceExt;

use crate::fuzz;
use crate::generate::{
    SECRET, authorization, good_authorization, now, pull_body, pull_template, push_body,
    push_template, pusher_form, space_segment, sse_query, token_of,
};

/// The space every target addresses (each target has a server of its own).
const SPACE: &str = "fuzz";
const JSON: &str = "application/json";
const FORM: &str = "application/x-www-form-urlencoded";
const PUSHER_KEY: &str = "app-key-abc";

/// Where a fuzzed server keeps its data: a SQLite file (the default) or, with
/// FUZZ_STORE=postgres, a fresh schema in TEST_DATABASE_URL.
enum Db {
    Sqlite { _dir: tempfile::TempDir },
    Postgres { url: String, schema: String },
}

/// A server under fuzzing: its router, its store, and the answers it gave, by status and error.
struct Fuzzed {
    runtime: Runtime,
    router: Router,
    store: Arc<dyn Store>,
    db: Db,
    answers: Mutex<BTreeMap<String, usize>>,
}

/// One response: status, headers, and the body read whole (empty for an SSE stream, which is
/// dropped unread).
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    fn error(&self) -> Option<String> {
        self.json()?.get("error")?.as_str().map(str::to_owned)
    }

    fn describe(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let shown: String = text.chars().take(400).collect();
        format!("{} {shown}", self.status)
    }

    /// Refused: anything but a 200 without an `error`.
    fn refused(&self) -> bool {
        self.status != StatusCode::OK || self.error().is_some()
    }
}

fn private_channels() -> PrivateChannels {
    let args = PusherArgs {
        app_id: Some("12345".into()),
        key: Some(PUSHER_KEY.into()),
        secret: Some("app-secret-xyz".into()),
        host: Some("127.0.0.1".into()),
        channel_prefix: Some("private-space-".into()),
        ..PusherArgs::default()
    };
    PrivateChannels::new(&PusherConfig::from_args(&args).unwrap().unwrap())
}

async fn open_store() -> (Arc<dyn Store>, Db) {
    if std::env::var("FUZZ_STORE").as_deref() == Ok("postgres") {
        let url = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let schema = format!(
            "replisync_fuzz_{}_{}",
            std::process::id(),
            nanos % 1_000_000_000
        );
        let admin: PgConnectOptions = url.parse().expect("TEST_DATABASE_URL is a Postgres URL");
        let mut conn = sqlx::PgConnection::connect_with(&admin).await.unwrap();
        let create = format!("CREATE SCHEMA {schema}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(create))
            .execute(&mut conn)
            .await
            .unwrap();
        let options = admin.options([("search_path", schema.as_str())]);
        let store = PgStore::connect(options, 8).await.unwrap();
        store.migrate().await.unwrap();
        (Arc::new(store), Db::Postgres { url, schema })
    } else {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("fuzz.db"), 8)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        (Arc::new(store), Db::Sqlite { _dir: dir })
    }
}

impl Fuzzed {
    /// A server as the binary builds it with REPLISYNC_JWT_SECRET, Pusher (private channels)
    /// and REPLISYNC_SSE set.
    fn start() -> Fuzzed {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (store, db) = runtime.block_on(open_store());
        let keys = Keys::Secret(DecodingKey::from_secret(SECRET.as_bytes()));
        let router = runtime.block_on(async {
            App::builder()
                .authenticator(Arc::new(JwtAuthenticator::new(keys, ClaimRules::default())))
                .private_channels(private_channels())
                .sse(SseSettings {
                    keep_alive: Duration::from_secs(15),
                    ..SseSettings::default()
                })
                .build(store.clone())
                .router(MetricsEndpoint::Here)
        });
        Fuzzed {
            runtime,
            router,
            store,
            db,
            answers: Mutex::new(BTreeMap::new()),
        }
    }

    /// Sends `request` and reads the answer (an SSE stream is dropped unread).
    fn send(&self, request: Request<Body>) -> Result<Answer, TestCaseError> {
        self.runtime.block_on(async {
            let answered = tokio::time::timeout(
                Duration::from_secs(60),
                self.router.clone().oneshot(request),
            );
            let response = answered
                .await
                .map_err(|_| TestCaseError::fail("no answer within a minute"))?
                .expect("the router is infallible");
            let (parts, body) = response.into_parts();
            let is_stream = parts
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            let body = if is_stream {
                Bytes::new()
            } else {
                tokio::time::timeout(Duration::from_secs(60), to_bytes(body, usize::MAX))
                    .await
                    .map_err(|_| TestCaseError::fail("body not sent within a minute"))?
                    .map_err(|e| TestCaseError::fail(format!("body failed midway: {e}")))?
            };
            let answer = Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            };
            self.count(format!(
                "{} {}",
                answer.status.as_u16(),
                answer.error().unwrap_or_default()
            ));
            Ok(answer)
        })
    }

    fn count(&self, what: String) {
        *self.answers.lock().unwrap().entry(what).or_default() += 1;
    }

    /// The space's version, read from the store.
    fn version(&self, space: &str) -> u64 {
        let space = SpaceId::parse(space).unwrap();
        self.runtime.block_on(async {
            let snapshot = self
                .store
                .streamed_pull(&space, "version-probe", None)
                .await;
            snapshot.expect("the store answers").version
        })
    }

    fn print_answers(&self, target: &str) {
        let answers = self.answers.lock().unwrap();
        let listed: Vec<String> = answers
            .iter()
            .map(|(what, n)| format!("{what}: {n}"))
            .collect();
        eprintln!("fuzz {target}: answers {}", listed.join(", "));
    }
}

impl Drop for Fuzzed {
    fn drop(&mut self) {
        if let Db::Postgres { url, schema } = &self.db {
            let drop_schema = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
            self.runtime.block_on(async {
                self.store.close().await;
                let admin: PgConnectOptions = url.parse().unwrap();
                if let Ok(mut conn) = sqlx::PgConnection::connect_with(&admin).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop_schema))
                        .execute(&mut conn)
                        .await;
                }
            });
        }
    }
}

/// The `Authorization` the server reads from a header sent as `text`: none unless it is text.
fn as_received(text: &str) -> Option<String> {
    sendable_header(text).to_str().ok().map(str::to_owned)
}

/// What a header value can carry at all: the bytes HTTP forbids (controls but tab) left out.
fn sendable_header(text: &str) -> HeaderValue {
    let bytes: Vec<u8> = text
        .bytes()
        .filter(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
        .collect();
    HeaderValue::from_bytes(&bytes).expect("no forbidden bytes left")
}

fn request(
    method: Method,
    uri: Uri,
    content_type: Option<&str>,
    authorization: Option<&str>,
    body: Vec<u8>,
) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_LENGTH, body.len());
    if let Some(content_type) = content_type {
        builder = builder.header(header::CONTENT_TYPE, sendable_header(content_type));
    }
    if let Some(authorization) = authorization {
        builder = builder.header(header::AUTHORIZATION, sendable_header(authorization));
    }
    builder
        .body(Body::from(body))
        .expect("a well-formed request")
}

fn post(
    path: &str,
    content_type: &str,
    authorization: Option<&str>,
    body: Vec<u8>,
) -> Request<Body> {
    let uri = Uri::try_from(path).expect("a valid path");
    request(Method::POST, uri, Some(content_type), authorization, body)
}

/// Whether `authorization` verifies and grants `access` to the fuzzed space: what a request
/// must carry to be answered 200.
fn grants(authorization: Option<&str>, access: Access) -> bool {
    let keys = Keys::Secret(DecodingKey::from_secret(SECRET.as_bytes()));
    let authenticator = JwtAuthenticator::new(keys, ClaimRules::default());
    let space = SpaceId::parse(SPACE).unwrap();
    // Verifying with a secret never waits on anything.
    futures::executor::block_on(authenticator.authenticate(authorization))
        .is_ok_and(|identity| identity.grants.allow(&space, access))
}

/// No 5xx, and every 4xx a JSON `{"error", "message"}`.
fn check_no_server_error(answer: &Answer) -> TestCaseResult {
    prop_assert!(!answer.status.is_server_error(), "{}", answer.describe());
    if answer.status.is_client_error() {
        let well_formed = answer
            .json()
            .is_some_and(|body| body["error"].is_string() && body["message"].is_string());
        prop_assert!(
            well_formed,
            "a 4xx without a JSON error and message: {}",
            answer.describe()
        );
    }
    Ok(())
}

/// A push or pull answer: no 5xx, and a 200 is JSON whose `error`, if any, is one Replicache
/// knows.
fn check_sync_answer(answer: &Answer) -> TestCaseResult {
    check_no_server_error(answer)?;
    if answer.status == StatusCode::OK {
        prop_assert!(
            answer.json().is_some(),
            "a 200 that is not JSON: {}",
            answer.describe()
        );
        if let Some(error) = answer.error() {
            let known = ["ClientStateNotFound", "VersionNotSupported"];
            prop_assert!(known.contains(&error.as_str()), "{}", answer.describe());
        }
    }
    Ok(())
}

#[test]
fn push_bodies_get_no_5xx_and_refused_ones_change_nothing() {
    let server = Fuzzed::start();
    let authorization = good_authorization();
    let path = format!("/spaces/{SPACE}/push");
    fuzz("router push bodies", 150, push_body, |body| {
        let before = server.version(SPACE);
        let answer = server.send(post(&path, JSON, Some(&authorization), body.0))?;
        check_sync_answer(&answer)?;
        if answer.refused() {
            prop_assert_eq!(
                server.version(SPACE),
                before,
                "refused, yet written: {}",
                answer.describe()
            );
        }
        Ok(())
    });
    server.print_answers("router push bodies");
}

#[test]
fn pull_bodies_get_no_5xx() {
    let server = Fuzzed::start();
    let authorization = good_authorization();
    let path = format!("/spaces/{SPACE}/pull");
    fuzz("router pull bodies", 250, pull_body, |body| {
        let answer = server.send(post(&path, JSON, Some(&authorization), body.0))?;
        check_sync_answer(&answer)?;
        if !answer.refused() {
            let body = answer.json().unwrap_or_default();
            prop_assert!(
                body["cookie"].is_u64() && body["patch"].is_array(),
                "{}",
                answer.describe()
            );
        }
        Ok(())
    });
    server.print_answers("router pull bodies");
}

/// The routes that read `Authorization`, each with a request that would succeed with a good
/// token.
#[derive(Debug, Clone, Copy)]
enum Route {
    Push,
    Pull,
    Poke,
    PusherAuth,
}

impl Route {
    fn access(self) -> Access {
        match self {
            Route::Push => Access::Write,
            Route::Pull | Route::Poke | Route::PusherAuth => Access::Read,
        }
    }
}

fn route_request(route: Route, authorization: &str, push: &Value) -> Request<Body> {
    let space_path = |action: &str| format!("/spaces/{SPACE}/{action}");
    match route {
        Route::Push => post(
            &space_path("push"),
            JSON,
            Some(authorization),
            push.to_string().into_bytes(),
        ),
        Route::Pull => {
            let pull = json!({"pullVersion": 1, "clientGroupID": "g-auth", "cookie": null});
            post(
                &space_path("pull"),
                JSON,
                Some(authorization),
                pull.to_string().into_bytes(),
            )
        }
        Route::Poke => {
            let uri = Uri::try_from(space_path("poke")).unwrap();
            request(Method::GET, uri, None, Some(authorization), Vec::new())
        }
        Route::PusherAuth => {
            let form = format!("socket_id=1234.5678&channel_name=private-space-{SPACE}");
            post("/pusher/auth", FORM, Some(authorization), form.into_bytes())
        }
    }
}

#[test]
fn authorization_headers_get_a_401_403_or_access_and_never_a_5xx() {
    let server = Fuzzed::start();
    let routes = select(vec![
        Route::Push,
        Route::Pull,
        Route::Poke,
        Route::PusherAuth,
    ]);
    let cases = move || (authorization(), routes, push_template());
    fuzz(
        "router Authorization headers",
        250,
        cases,
        |(authorization, route, push)| {
            let before = server.version(SPACE);
            let answer = server.send(route_request(route, &authorization, &push))?;
            check_no_server_error(&answer)?;
            if answer.refused() {
                prop_assert_eq!(
                    server.version(SPACE),
                    before,
                    "refused, yet written: {}",
                    answer.describe()
                );
            } else {
                let received = as_received(&authorization);
                prop_assert!(
                    grants(received.as_deref(), route.access()),
                    "{route:?} served"
                );
            }
            Ok(())
        },
    );
    server.print_answers("router Authorization headers");
}

/// Who asks for a channel signature: a reader of every space, a user granted another space
/// only, someone with a bad token, or no one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asker {
    Reader,
    Stranger,
    BadToken,
    Nobody,
}

fn authorization_of(asker: Asker) -> Option<String> {
    let stranger = json!({"sub": "stranger", "exp": now() + 3600, "spaces": ["elsewhere"]});
    match asker {
        Asker::Reader => Some(good_authorization()),
        Asker::Stranger => Some(format!(
            "Bearer {}",
            token_of(
                br#"{"alg":"HS256"}"#,
                stranger.to_string().as_bytes(),
                SECRET
            )
        )),
        Asker::BadToken => Some("Bearer not.a.token".into()),
        Asker::Nobody => None,
    }
}

#[test]
fn pusher_auth_forms_get_no_5xx_and_only_readers_get_signatures() {
    let server = Fuzzed::start();
    let content_types = select(vec![
        FORM,
        FORM,
        "application/x-www-form-urlencoded; charset=utf-8",
        JSON,
        "text/plain",
        "",
    ]);
    let askers = select(vec![
        Asker::Reader,
        Asker::Reader,
        Asker::Stranger,
        Asker::BadToken,
        Asker::Nobody,
    ]);
    let cases = move || (pusher_form(SPACE), content_types, askers);
    fuzz(
        "router /pusher/auth forms",
        400,
        cases,
        |(form, content_type, asker)| {
            let uri = Uri::from_static("/pusher/auth");
            let content_type = Some(content_type).filter(|c| !c.is_empty());
            let authorization = authorization_of(asker);
            let answer = server.send(request(
                Method::POST,
                uri,
                content_type,
                authorization.as_deref(),
                form.0,
            ))?;
            check_no_server_error(&answer)?;
            if answer.status == StatusCode::OK {
                prop_assert_eq!(asker, Asker::Reader, "signed for {:?}", asker);
                let auth = answer
                    .json()
                    .and_then(|body| body["auth"].as_str().map(str::to_owned));
                let signature = auth
                    .as_deref()
                    .and_then(|auth| auth.strip_prefix("app-key-abc:"));
                let hex = signature
                    .is_some_and(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()));
                prop_assert!(hex, "{}", answer.describe());
            }
            Ok(())
        },
    );
    server.print_answers("router /pusher/auth forms");
}

#[test]
fn sse_query_strings_get_no_5xx_and_streams_only_for_readers() {
    let server = Fuzzed::start();
    let good = good_authorization();
    let bare_token = good.strip_prefix("Bearer ").unwrap().to_owned();
    let headers = select(vec![
        None,
        None,
        None,
        Some(good.clone()),
        Some("Bearer x.y.z".to_owned()),
    ]);
    let token = bare_token.clone();
    let cases = move || (sse_query(token), headers);
    fuzz(
        "router SSE query strings",
        400,
        cases,
        |(query, authorization)| {
            let Ok(uri) = Uri::try_from(format!("/spaces/{SPACE}/poke?{query}")) else {
                server.count("unsendable URI".into());
                return Ok(());
            };
            let answer = server.send(request(
                Method::GET,
                uri.clone(),
                None,
                authorization.as_deref(),
                Vec::new(),
            ))?;
            check_no_server_error(&answer)?;
            if answer.status == StatusCode::OK {
                let stream = answer
                    .headers
                    .get(header::CONTENT_TYPE)
                    .is_some_and(|v| v == "text/event-stream");
                prop_assert!(stream, "a 200 that is not a stream: {:?}", answer.headers);
                // The header, or else the query's `auth`, must grant reading the space.
                let from_query = || {
                    Query::<HashMap<String, String>>::try_from_uri(&uri)
                        .ok()
                        .and_then(|Query(mut fields)| fields.remove("auth"))
                };
                let used = match &authorization {
                    Some(header) => as_received(header),
                    None => from_query(),
                };
                prop_assert!(
                    grants(used.as_deref(), Access::Read),
                    "a stream for {query:?} and {authorization:?}"
                );
            }
            Ok(())
        },
    );
    server.print_answers("router SSE query strings");
}

#[test]
fn odd_paths_and_methods_get_no_5xx() {
    let server = Fuzzed::start();
    let authorization = good_authorization();
    let actions = select(vec![
        "push", "pull", "poke", "access", "", "push/", "PUSH", "pull/x",
    ]);
    let methods = select(vec![
        Method::POST,
        Method::POST,
        Method::GET,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::PATCH,
        Method::OPTIONS,
    ]);
    let cases = move || {
        (
            space_segment(),
            actions,
            methods,
            pull_template(),
            push_template(),
        )
    };
    fuzz(
        "router paths and methods",
        300,
        cases,
        |(space, action, method, pull, push)| {
            let Ok(uri) = Uri::try_from(format!("/spaces/{space}/{action}")) else {
                server.count("unsendable URI".into());
                return Ok(());
            };
            let body = if action.starts_with("pull") {
                pull
            } else {
                push
            };
            let head = method == Method::HEAD;
            let answer = server.send(request(
                method,
                uri,
                Some(JSON),
                Some(&authorization),
                body.to_string().into_bytes(),
            ))?;
            if head {
                // A HEAD answer has no body to hold a JSON error.
                prop_assert!(!answer.status.is_server_error(), "{}", answer.describe());
                return Ok(());
            }
            check_no_server_error(&answer)
        },
    );
    server.print_answers("router paths and methods");
}
