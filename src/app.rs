//! The HTTP application: shared state, every route in one `router`, and the layers around them
//! (CORS, body limit, timeouts, request spans). Tests build this exact router.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::auth::Authenticator;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::mutators::Mutators;
use crate::poke::Pokes;
use crate::poke::pusher::PusherPoker;
use crate::poke::sse::SsePokes;
use crate::pull::coalesce::PullCoalescer;
use crate::store::Store;
use crate::{pull, push};

/// The header Replicache sends with every push and pull; logged on each request span.
pub const REQUEST_ID_HEADER: &str = "x-replicache-requestid";

/// Limits and switches of the HTTP edge.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// `None` allows every origin.
    pub cors_origins: Option<Vec<HeaderValue>>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            cors_origins: None,
        }
    }
}

/// Everything a handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub mutators: Arc<Mutators>,
    pub auth: Arc<dyn Authenticator>,
    pub pokes: Pokes,
    /// The built-in SSE poke stream, when enabled.
    pub sse: Option<Arc<SsePokes>>,
    pub http: HttpSettings,
    pub metrics: Arc<Metrics>,
    pub pulls: Arc<PullCoalescer>,
    /// The Pusher poker, when configured (its counters go to `/metrics`).
    pub pusher: Option<Arc<PusherPoker>>,
}

impl AppState {
    /// A server over `store` with the built-in mutators, anonymous users, no pokes and default
    /// limits; set the public fields to change those.
    pub fn new(store: Arc<dyn Store>) -> AppState {
        let metrics = Arc::new(Metrics::default());
        AppState {
            pulls: Arc::new(PullCoalescer::new(store.clone(), metrics.clone())),
            store,
            mutators: Arc::new(Mutators::builtin()),
            auth: Arc::new(crate::auth::Anonymous),
            pokes: Pokes::default(),
            sse: None,
            http: HttpSettings::default(),
            metrics,
            pusher: None,
        }
    }
}

/// Every route of replisync.
pub fn router(state: AppState) -> Router {
    let timeout =
        TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, state.http.request_timeout);
    let sync_routes = Router::new()
        .route("/spaces/{space}/push", post(push::handle))
        .route("/spaces/{space}/pull", post(pull::handle))
        .route_layer(timeout);
    Router::new()
        .merge(sync_routes)
        .route("/spaces/{space}/poke", get(crate::poke::sse::handle))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.http.max_body_bytes))
        .layer(cors(&state.http))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// CORS for browser clients on other origins: Replicache sends `Authorization`,
/// `Content-Type` and `X-Replicache-RequestID`, so every push and pull is preflighted.
fn cors(http: &HttpSettings) -> CorsLayer {
    let origins = match &http.cors_origins {
        None => AllowOrigin::any(),
        Some(list) => AllowOrigin::list(list.clone()),
    };
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static(REQUEST_ID_HEADER),
        ])
        .max_age(Duration::from_secs(24 * 60 * 60))
}

/// One span per request, with the Replicache request id; handlers record the space.
fn request_span(request: &Request) -> tracing::Span {
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id,
        space = tracing::field::Empty,
    )
}

/// `GET /healthz`: 200 when the database answers, 503 otherwise.
async fn health(State(state): State<AppState>) -> Response {
    match crate::store::reconnecting(|| state.store.check_health()).await {
        Ok(()) => Json(json!({"status": "ok", "store": state.store.kind()})).into_response(),
        Err(error) => {
            tracing::warn!(%error, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "store": state.store.kind(),
                            "message": "the database does not answer"})),
            )
                .into_response()
        }
    }
}

/// `GET /metrics`: counters in Prometheus text format.
async fn metrics(State(state): State<AppState>) -> String {
    state
        .metrics
        .render(state.pusher.as_ref().map(|poker| poker.stats()))
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// A request body read whole, within the configured limit (413 beyond it).
pub struct RequestBody(pub Bytes);

impl FromRequest<AppState> for RequestBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        Bytes::from_request(request, state)
            .await
            .map(RequestBody)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge {
                        limit: state.http.max_body_bytes,
                    }
                } else {
                    ApiError::bad_request("InvalidBody", rejection.body_text())
                }
            })
    }
}

/// The space a request addresses (recorded on its span) and the user making it.
pub(crate) async fn space_and_user(
    state: &AppState,
    raw_space: &str,
    headers: &axum::http::HeaderMap,
) -> Result<(crate::protocol::SpaceId, String), ApiError> {
    let space = crate::protocol::SpaceId::parse(raw_space)
        .map_err(|message| ApiError::bad_request("InvalidSpaceId", message))?;
    tracing::Span::current().record("space", space.as_str());
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let user = state
        .auth
        .authenticate(authorization)
        .await
        .map_err(ApiError::Unauthorized)?;
    Ok((space, user))
}
