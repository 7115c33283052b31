//! The HTTP edge: every route in one `router`, and the layers around them (CORS, body limit,
//! timeouts, request spans). The binary and the in-process tests serve this exact router.

mod conn;
mod extract;
mod handlers;
mod state;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{map_request, map_response_with_state};
use axum::response::Response;
use axum::routing::{get, post};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use self::conn::accept_loop;
pub use self::extract::InFlightBytes;
pub use self::state::{AppState, Draining};
use crate::config::{CorsOrigins, HttpSettings};
use crate::metrics::Metrics;

/// The header Replicache sends with every push and pull; logged on each request span.
pub const REQUEST_ID_HEADER: &str = "x-replicache-requestid";

/// Where `/metrics` is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsEndpoint {
    /// Beside push and pull, on the main address.
    Here,
    /// On an address of its own (REPLISYNC_METRICS_LISTEN), served by [`metrics_router`].
    Elsewhere,
}

/// Every route of replisync, `/metrics` included when it is served `Here`.
pub fn router(state: AppState, metrics_endpoint: MetricsEndpoint) -> Router {
    let timeout =
        TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, state.http.request_timeout);
    let sync_routes = Router::new()
        .route(
            "/spaces/{space}/push",
            post(handlers::push_handler)
                .layer(DefaultBodyLimit::max(state.http.push.max_body_bytes)),
        )
        .route("/spaces/{space}/pull", post(handlers::pull_handler))
        .route_layer(timeout);
    let poke_routes = Router::new()
        .route("/spaces/{space}/poke", get(handlers::poke_handler))
        .route_layer(map_request(handlers::auth_query_as_header));
    // What browsers call cross-origin; `/healthz` and `/metrics` are never served to them.
    // The 405 fallback is set before CORS wraps the routes: preflights (OPTIONS) reach it.
    let browser_routes = Router::new()
        .merge(sync_routes)
        .merge(poke_routes)
        .route("/pusher/auth", post(handlers::pusher_auth_handler))
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(cors(&state.http));
    let mut operator_routes = Router::new()
        .route("/healthz", get(handlers::health_handler))
        .route("/readyz", get(handlers::ready_handler));
    if metrics_endpoint == MetricsEndpoint::Here {
        operator_routes = operator_routes.route("/metrics", get(handlers::metrics_handler));
    }
    Router::new()
        .merge(browser_routes)
        .merge(operator_routes.method_not_allowed_fallback(handlers::method_not_allowed))
        .fallback(handlers::not_found)
        .layer(map_response_with_state(
            state.metrics.clone(),
            count_refusals,
        ))
        .layer(map_response_with_state(
            state.draining.clone(),
            close_while_draining,
        ))
        .layer(DefaultBodyLimit::max(state.http.max_body_bytes))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// `/metrics` alone, for an address of its own that only the operator's scraper reaches.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(handlers::metrics_handler))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(state)
}

/// Counts requests refused 401 and 403 in `/metrics`, wherever the refusal came from.
async fn count_refusals(State(metrics): State<Arc<Metrics>>, response: Response) -> Response {
    match response.status() {
        StatusCode::UNAUTHORIZED => metrics.unauthorized.increment(),
        StatusCode::FORBIDDEN => metrics.forbidden.increment(),
        _ => {}
    }
    response
}

/// While the server drains, every response asks its client (or load balancer) to close the
/// connection, so the next request opens one to an instance that stays.
async fn close_while_draining(
    State(draining): State<Draining>,
    mut response: Response,
) -> Response {
    if draining.is_draining() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// CORS for browser clients on other origins: Replicache sends `Authorization`,
/// `Content-Type` and `X-Replicache-RequestID`, so every push and pull is preflighted.
fn cors(http: &HttpSettings) -> CorsLayer {
    let origins = match &http.cors_origins {
        CorsOrigins::Loopback => AllowOrigin::predicate(|origin, _| is_loopback_origin(origin)),
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => AllowOrigin::list(list.clone()),
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

/// `http(s)://localhost`, `127.0.0.0/8` or `[::1]`, any port: a page served from this machine.
fn is_loopback_origin(origin: &HeaderValue) -> bool {
    let Some(url) = origin
        .to_str()
        .ok()
        .and_then(|o| reqwest::Url::parse(o).ok())
    else {
        return false;
    };
    let host = url.host_str().unwrap_or_default();
    let ip = host.trim_start_matches('[').trim_end_matches(']');
    matches!(url.scheme(), "http" | "https")
        && (host.eq_ignore_ascii_case("localhost")
            || ip
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()))
}

/// One span per request: the route (`/spaces/{space}/push`, not the raw path), the path, the
/// Replicache request id; the `Caller` extractor records the space.
fn request_span(request: &Request) -> tracing::Span {
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str);
    tracing::info_span!(
        "request",
        method = %request.method(),
        route,
        path = %request.uri().path(),
        request_id,
        space = tracing::field::Empty,
    )
}
