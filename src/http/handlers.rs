//! The route handlers: each takes the parts of the state it needs, parses the request, hands the
//! work to `push`, `pull` or `poke`, and turns the outcome or error into a response.

mod domain_errors;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use axum::Json;
use axum::body::Body;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, FromRef, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::Sse;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::{Authenticated, Caller, PushBody, Reads, RequestBody, Writes, authorize};
use super::settings::HttpSettings;
use super::state::{AppState, Draining};
use crate::auth::authorize::Authorizer;
use crate::auth::{Access, Authenticator, Identity};
use crate::error::ApiError;
use crate::metrics::{self, Metrics};
use crate::poke::pusher::is_socket_id;
use crate::poke::sinks::Pokes;
use crate::poke::sse::{StreamOwner, StreamsFull, poke_events};
use crate::protocol::{PullRequest, PushRequest, SpaceId, parse_body};
use crate::pull::{PullBody, Puller, Pulls, WriteCheck};
use crate::push::PushGroups;
use crate::rules::Rules;
use crate::store::{Store, reconnecting};

/// `POST /spaces/{space}/push`: parsed here, applied by the push service, answered `{}`.
pub(super) async fn push_handler(
    State(pushes): State<Arc<PushGroups>>,
    State(served): State<Served>,
    caller: Caller<Writes>,
    body: PushBody,
) -> Result<Json<Value>, ApiError> {
    let request: PushRequest = parse_body(&body.bytes)?;
    served.check_schema(&request.schema_version)?;
    let writable = caller.keys(&served.rules)?.write;
    let Caller { space, user, .. } = caller;
    pushes.push(&space, user, request, writable).await?;
    Ok(Json(json!({})))
}

/// `POST /spaces/{space}/pull`
pub(super) async fn pull_handler(
    State(pulls): State<Arc<Pulls>>,
    State(authorizer): State<Arc<Authorizer>>,
    State(served): State<Served>,
    caller: Caller<Reads>,
    Authenticated(identity): Authenticated,
    headers: HeaderMap,
    RequestBody(body): RequestBody,
) -> Result<Response, ApiError> {
    let request: PullRequest = parse_body(&body)?;
    served.check_schema(&request.schema_version)?;
    let keys = caller.keys(&served.rules)?;
    let space = &caller.space;
    let writes = CallerWrites {
        authorizer: &authorizer,
        identity: &identity,
        headers: &headers,
        space,
    };
    let puller = Puller {
        user: &caller.user,
        keys: &keys,
        writes: &writes,
    };
    let body = match pulls.pull(space, &puller, &request).await? {
        PullBody::Streamed(chunks) => Body::from_stream(chunks),
        PullBody::Parts(parts) => Body::from_stream(futures::stream::iter(
            parts.into_iter().map(Ok::<_, Infallible>),
        )),
    };
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    Ok((headers, body).into_response())
}

/// What the server serves, which every push and pull is checked against first: the client
/// schemaVersions it accepts (refusals counted), and the visibility rules.
#[derive(Clone)]
pub(super) struct Served {
    http: Arc<HttpSettings>,
    metrics: Arc<Metrics>,
    rules: Arc<Rules>,
}

impl FromRef<AppState> for Served {
    fn from_ref(state: &AppState) -> Served {
        Served {
            http: Arc::<HttpSettings>::from_ref(state),
            metrics: Arc::<Metrics>::from_ref(state),
            rules: Arc::<Rules>::from_ref(state),
        }
    }
}

impl Served {
    /// VersionNotSupported (`schema`) for a schemaVersion REPLISYNC_SCHEMA_VERSIONS does not list.
    fn check_schema(&self, schema_version: &str) -> Result<(), ApiError> {
        self.http
            .schema_versions
            .check(schema_version)
            .map_err(|refused| {
                self.metrics.schema_refused.increment();
                ApiError::Protocol(refused)
            })
    }
}

/// Whether a pull's caller may write its space, asked of the authorizer when the pull needs it.
struct CallerWrites<'a> {
    authorizer: &'a Authorizer,
    identity: &'a Identity,
    headers: &'a HeaderMap,
    space: &'a SpaceId,
}

#[async_trait]
impl WriteCheck for CallerWrites<'_> {
    async fn may_write(&self) -> bool {
        let (authorizer, identity) = (self.authorizer, self.identity);
        authorize(
            authorizer,
            identity,
            self.headers,
            self.space,
            Access::Write,
        )
        .await
        .is_ok()
    }
}

/// `GET /spaces/{space}/poke`: the built-in SSE poke stream, open until the caller's token
/// expires. A token already past its `exp` is refused 401 here, without the leeway push and
/// pull allow, so that a page reconnecting with a stale token learns at once to fetch a new one.
pub(super) async fn poke_handler(
    State(pokes): State<Arc<Pokes>>,
    State(metrics): State<Arc<Metrics>>,
    State(authenticator): State<Arc<dyn Authenticator>>,
    Caller {
        space,
        user,
        expires_at,
        ..
    }: Caller<Reads>,
) -> Result<Response, ApiError> {
    let Some(sse) = pokes.sse() else {
        return Err(ApiError::SseDisabled);
    };
    if expires_at.is_some_and(|expiry| expiry <= SystemTime::now()) {
        return Err(ApiError::Unauthorized(
            "the token has expired; open the stream again with a fresh token".into(),
        ));
    }
    let owner = StreamOwner {
        user: authenticator.users_are_distinct().then_some(user),
        expires_at,
    };
    let keep_alive = sse.keep_alive();
    let events = poke_events(sse.clone(), space, owner).map_err(|full| {
        metrics.sse_streams_refused.increment();
        if let StreamsFull::User(_) = full {
            metrics.sse_streams_refused_per_user.increment();
        }
        ApiError::Overloaded(streams_full_message(full))
    })?;
    Ok(Sse::new(events).keep_alive(keep_alive).into_response())
}

/// `GET /spaces/{space}/access`: 200 with `{"space", "user", "read": true, "write"}` when the
/// caller may read the space, 403 when not (401 without a valid token), with the same grant
/// check as a pull. For a realtime server deciding whether a socket may join the space's room,
/// asking with the socket's own token; it changes nothing and creates no space.
pub(super) async fn access_handler(
    State(authorizer): State<Arc<Authorizer>>,
    Caller { space, user, .. }: Caller<Reads>,
    Authenticated(identity): Authenticated,
    headers: HeaderMap,
) -> Json<Value> {
    let writes = CallerWrites {
        authorizer: &authorizer,
        identity: &identity,
        headers: &headers,
        space: &space,
    };
    let write = writes.may_write().await;
    Json(json!({ "space": space.as_str(), "user": user, "read": true, "write": write }))
}

/// Why a stream was refused, naming the variable that sets the cap.
fn streams_full_message(full: StreamsFull) -> String {
    match full {
        StreamsFull::Total(cap) => format!(
            "{cap} SSE poke streams are open, as many as the server allows (REPLISYNC_SSE_MAX_STREAMS); retry later"
        ),
        StreamsFull::Space(cap) => format!(
            "{cap} SSE poke streams watch this space, as many as the server allows (REPLISYNC_SSE_MAX_STREAMS_PER_SPACE); retry later"
        ),
        StreamsFull::User(cap) => format!(
            "this user has {cap} SSE poke streams open, as many as one user may (REPLISYNC_SSE_MAX_STREAMS_PER_USER); close one (one stream per space a page shows) or retry later"
        ),
    }
}

#[derive(Deserialize)]
pub(super) struct ChannelAuthRequest {
    socket_id: String,
    channel_name: String,
}

/// `POST /pusher/auth`: pusher-js's `channelAuthorization` endpoint. Signs a subscription to a
/// space's private poke channel for a user who may read that space.
pub(super) async fn pusher_auth_handler(
    State(pokes): State<Arc<Pokes>>,
    State(authorizer): State<Arc<Authorizer>>,
    Authenticated(identity): Authenticated,
    headers: HeaderMap,
    form: Result<Form<ChannelAuthRequest>, FormRejection>,
) -> Result<Json<Value>, ApiError> {
    let Some(channels) = pokes.private_channels() else {
        return Err(ApiError::PrivateChannelsOff);
    };
    let Form(request) =
        form.map_err(|rejection| ApiError::bad_request("InvalidRequest", rejection.body_text()))?;
    if !is_socket_id(&request.socket_id) {
        return Err(ApiError::bad_request(
            "InvalidRequest",
            "socket_id must look like 1234.5678",
        ));
    }
    let space = channels.space_of(&request.channel_name).ok_or_else(|| {
        ApiError::Forbidden(format!(
            "{:?} is not the private poke channel of a space",
            request.channel_name
        ))
    })?;
    tracing::Span::current().record("space", space.as_str());
    authorize(&authorizer, &identity, &headers, &space, Access::Read).await?;
    let auth = channels.sign(&request.socket_id, &request.channel_name);
    Ok(Json(json!({ "auth": auth })))
}

/// `GET /healthz`: 200 when the database answers, 503 otherwise.
pub(super) async fn health_handler(State(store): State<Arc<dyn Store>>) -> Response {
    match reconnecting(|| store.check_health()).await {
        Ok(()) => Json(json!({"status": "ok", "store": store.kind()})).into_response(),
        Err(error) => {
            tracing::warn!(%error, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "store": store.kind(),
                            "message": "the database does not answer"})),
            )
                .into_response()
        }
    }
}

/// `GET /readyz`: whether a load balancer should send requests here. 503 from SIGTERM on (the
/// server still serves while it drains), while the authenticator cannot check tokens yet (the
/// JWKS not fetched) and while the database does not answer; 200 otherwise.
pub(super) async fn ready_handler(
    State(draining): State<Draining>,
    State(store): State<Arc<dyn Store>>,
    State(authenticator): State<Arc<dyn Authenticator>>,
) -> Response {
    if draining.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining",
                        "message": "shutting down: finishing requests, send new ones elsewhere"})),
        )
            .into_response();
    }
    if let Some(message) = authenticator.not_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "starting", "message": message})),
        )
            .into_response();
    }
    health_handler(State(store)).await
}

/// `GET /metrics`: every metric in OpenMetrics text, which Prometheus reads.
pub(super) async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> Response {
    let text = metrics.render();
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

pub(super) async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// A known route asked with a method it does not take (axum keeps the `Allow` header).
pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
