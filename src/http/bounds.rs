//! Time bounds on every request, whatever its route: the whole request until its response
//! starts, and the arrival of its body. A request cut either way is answered with a JSON error
//! and its connection is closed, so no client can hold a connection with a request that never
//! ends. Streamed response bodies (pull streams, SSE) are bounded by their own limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use tower_http::timeout::{TimeoutBody, TimeoutError};

use crate::config::HttpSettings;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// Runs the request within REPLISYNC_REQUEST_TIMEOUT_SECS, with a body that may pause at most
/// REPLISYNC_BODY_READ_TIMEOUT_SECS between bytes.
pub(super) async fn bounded(
    State(http): State<HttpSettings>,
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    if carries_a_body_it_should_not(&request) {
        return closing(
            ApiError::bad_request(
                "InvalidRequest",
                format!("a {} request carries no body", request.method()),
            )
            .into_response(),
        );
    }
    let stalled = Arc::new(AtomicBool::new(false));
    let request = request.map(|body| stall_guarded(body, &http, stalled.clone()));
    let answered = tokio::time::timeout(http.request_timeout, next.run(request)).await;
    let cut = if stalled.load(Ordering::Relaxed) {
        metrics.request_bodies_stalled.increment();
        ApiError::BodyStalled {
            secs: http.body_read_timeout.as_secs(),
        }
    } else {
        match answered {
            Ok(response) => return response,
            Err(_elapsed) => {
                metrics.requests_timed_out.increment();
                ApiError::RequestTimeout {
                    secs: http.request_timeout.as_secs(),
                }
            }
        }
    };
    closing(cut.into_response())
}

/// A GET or HEAD with a body: nothing would read it, and an answer that streams (SSE) would
/// keep its connection open with the body unread.
fn carries_a_body_it_should_not(request: &Request) -> bool {
    let (method, headers) = (request.method(), request.headers());
    (method == Method::GET || method == Method::HEAD)
        && (headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|length| length.as_bytes() != b"0"))
}

/// `body`, failing once it pauses longer than the body read timeout; `stalled` records that it
/// did, whichever extractor was reading it.
fn stall_guarded(body: Body, http: &HttpSettings, stalled: Arc<AtomicBool>) -> Body {
    let timed = TimeoutBody::new(http.body_read_timeout, body).map_err(move |error| {
        if error.is::<TimeoutError>() {
            stalled.store(true, Ordering::Relaxed);
        }
        error
    });
    Body::new(timed)
}

/// `response`, asking the client to close the connection after it (the request's body may be
/// unread: the connection cannot serve another request).
fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
