//! The HTTP edge: every route in one list, [`endpoints`], that builds the router and tells tests
//! what to cover; the layers around them (time bounds, authentication before any body is read,
//! CORS, request spans). The binary and the in-process tests serve this exact router.

mod access_log;
mod authenticate;
mod bounds;
mod conn;
mod extract;
mod handlers;
mod server_api;
pub mod settings;
mod state;
mod unread_body;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::handler::Handler;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{from_fn_with_state, map_response_with_state};
use axum::response::Response;
use axum::routing::{MethodFilter, MethodRouter, on};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

pub use self::access_log::REQUEST_ID_HEADER;
pub use self::conn::accept_loop;
pub use self::extract::InFlightBytes;
use self::settings::{CorsOrigins, HttpSettings};
pub use self::state::{AppState, Draining, Parts};
use crate::metrics::Metrics;

/// Where `/metrics` is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsEndpoint {
    /// Beside push and pull, on the main address.
    Here,
    /// On an address of its own (REPLISYNC_METRICS_LISTEN), served by [`metrics_router`].
    Elsewhere,
}

/// Who calls a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Replicache and pusher-js in a browser: cross-origin (CORS), and the caller's token is
    /// checked before the handler runs, so before any body is read.
    Browser,
    /// Load balancers and scrapers: same origin only, no token.
    Operator,
    /// The app's own backends (the server API): the service token, checked before the handler
    /// runs; no CORS, so no browser page may call it.
    Backend,
}

/// One route: its method, path and audience.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    pub audience: Audience,
}

/// Every route of replisync, `/metrics` included when it is served `Here`.
pub fn endpoints(metrics_endpoint: MetricsEndpoint) -> Vec<Endpoint> {
    routes(metrics_endpoint)
        .into_iter()
        .map(|(endpoint, _)| endpoint)
        .collect()
}

/// The routes with their handlers: the one list both the router and [`endpoints`] read.
fn routes(metrics_endpoint: MetricsEndpoint) -> Vec<(Endpoint, MethodRouter<AppState>)> {
    use Audience::{Backend, Browser, Operator};
    let mut routes = vec![
        route(
            Method::POST,
            "/spaces/{space}/push",
            Browser,
            handlers::push_handler,
        ),
        route(
            Method::POST,
            "/spaces/{space}/pull",
            Browser,
            handlers::pull_handler,
        ),
        route(
            Method::GET,
            "/spaces/{space}/poke",
            Browser,
            handlers::poke_handler,
        ),
        route(
            Method::GET,
            "/spaces/{space}/access",
            Browser,
            handlers::access_handler,
        ),
        route(
            Method::POST,
            "/pusher/auth",
            Browser,
            handlers::pusher_auth_handler,
        ),
        route(
            Method::GET,
            "/api/spaces/{space}/entries",
            Backend,
            server_api::read_page,
        ),
        route(
            Method::GET,
            "/api/spaces/{space}/entry",
            Backend,
            server_api::read_entry,
        ),
        route(
            Method::POST,
            "/api/spaces/{space}/mutations",
            Backend,
            server_api::apply_mutations,
        ),
        route(Method::GET, "/healthz", Operator, handlers::health_handler),
        route(Method::GET, "/readyz", Operator, handlers::ready_handler),
    ];
    if metrics_endpoint == MetricsEndpoint::Here {
        routes.push(metrics_route());
    }
    routes
}

fn metrics_route() -> (Endpoint, MethodRouter<AppState>) {
    route(
        Method::GET,
        "/metrics",
        Audience::Operator,
        handlers::metrics_handler,
    )
}

fn route<H, T>(
    method: Method,
    path: &'static str,
    audience: Audience,
    handler: H,
) -> (Endpoint, MethodRouter<AppState>)
where
    H: Handler<T, AppState>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("replisync routes standard methods");
    let endpoint = Endpoint {
        method,
        path,
        audience,
    };
    (endpoint, on(filter, handler))
}

/// Every route of replisync, `/metrics` included when it is served `Here`, inside the layers
/// every request goes through.
pub fn router(state: AppState, metrics_endpoint: MetricsEndpoint) -> Router {
    let (mut browser, mut operator, mut backend) = (Router::new(), Router::new(), Router::new());
    for (endpoint, handler) in routes(metrics_endpoint) {
        match endpoint.audience {
            Audience::Browser => browser = browser.route(endpoint.path, handler),
            Audience::Operator => operator = operator.route(endpoint.path, handler),
            Audience::Backend => backend = backend.route(endpoint.path, handler),
        }
    }
    // The 405 fallback is set before CORS wraps the routes: preflights (OPTIONS) reach it.
    let browser = browser
        .route_layer(from_fn_with_state(
            state.clone(),
            authenticate::authenticate,
        ))
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(cors(&state.http));
    let operator = operator.method_not_allowed_fallback(handlers::method_not_allowed);
    let backend = backend
        .route_layer(from_fn_with_state(
            state.clone(),
            server_api::check_service_token,
        ))
        .method_not_allowed_fallback(handlers::method_not_allowed);
    let routes = browser
        .merge(operator)
        .merge(backend)
        .fallback(handlers::not_found);
    with_common_layers(routes, state)
}

/// `/metrics` alone, for an address of its own that only the operator's scraper reaches.
pub fn metrics_router(state: AppState) -> Router {
    let (endpoint, handler) = metrics_route();
    let routes = Router::new()
        .route(endpoint.path, handler)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed);
    with_common_layers(routes, state)
}

/// What every request goes through, outermost last: its access log line (and request metrics),
/// its span, the default body limit, its time bounds, the drain's `Connection: close`, and the
/// count of refusals. (A panic is answered
/// 500 by the accept loop, `conn`, around them all.)
fn with_common_layers(routes: Router<AppState>, state: AppState) -> Router {
    routes
        .layer(map_response_with_state(
            state.metrics.clone(),
            count_refusals,
        ))
        .layer(map_response_with_state(
            state.draining.clone(),
            close_while_draining,
        ))
        .layer(from_fn_with_state(state.clone(), bounds::bounded))
        .layer(DefaultBodyLimit::max(state.http.max_body_bytes))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(())
                .on_failure(log_failure),
        )
        .layer(from_fn_with_state(state.clone(), access_log::access_log))
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

/// One span per request: the route (`/spaces/{space}/push`, never the raw path a client
/// chooses), the Replicache request id (bounded); the `Caller` extractor records the space.
fn request_span(request: &Request) -> tracing::Span {
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .map(|v| access_log::bounded_request_id(v.as_bytes()));
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(access_log::UNMATCHED, MatchedPath::as_str);
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        route,
        request_id,
        space = tracing::field::Empty,
    );
    crate::traces::continue_trace(&span, request.headers());
    span
}

/// A 5xx answer (or a failed stream), at `error`, its latency a number of milliseconds.
fn log_failure(
    failure: tower_http::classify::ServerErrorsFailureClass,
    latency: Duration,
    _span: &tracing::Span,
) {
    tracing::error!(
        classification = %failure,
        latency_ms = access_log::whole_micros_in_ms(latency),
        "response failed"
    );
}
