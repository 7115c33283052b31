//! Time bounds on every request, whatever its route: the whole request until its response
//! starts, and the arrival of its body. A request cut either way is answered with a JSON error
//! and its connection is closed, so no client can hold a connection with a request that never
//! ends. Streamed response bodies (pull streams, SSE) are bounded by their own limits.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Sleep;

use super::settings::HttpSettings;
use super::unread_body;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// Runs the request within REPLISYNC_REQUEST_TIMEOUT_SECS, with a body that may pause at most
/// REPLISYNC_BODY_READ_TIMEOUT_SECS between bytes.
pub(super) async fn bounded(
    State(http): State<Arc<HttpSettings>>,
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
    let (parts, body) = request.into_parts();
    let (body, taken_back) = unread_body::kept(stall_guarded(body, &http, stalled.clone()));
    let request = Request::from_parts(parts, body);
    let answered = tokio::time::timeout(http.request_timeout, next.run(request)).await;
    let cut = if stalled.load(Ordering::Relaxed) {
        metrics.request_bodies_stalled.increment();
        ApiError::BodyStalled {
            secs: http.body_read_timeout.as_secs(),
        }
    } else {
        match answered {
            Ok(response) => {
                let (max_bytes, time) = (http.max_body_bytes, http.unread_body_linger);
                return unread_body::finish(taken_back, max_bytes, time, &metrics, response).await;
            }
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
    Body::new(StallGuarded {
        inner: body,
        timeout: http.body_read_timeout,
        waiting: None,
        stalled,
    })
}

/// A request body that fails when no byte of it arrives for `timeout` while it is read. Data
/// that has arrived is taken before the clock is looked at: a server too busy to read for a
/// while (a long push on a small machine) never blames the client for its own delay.
struct StallGuarded {
    inner: Body,
    timeout: Duration,
    /// Running while the reader waits for the next frame.
    waiting: Option<Pin<Box<Sleep>>>,
    stalled: Arc<AtomicBool>,
}

impl HttpBody for StallGuarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            self.waiting = None;
            return Poll::Ready(frame);
        }
        let timeout = self.timeout;
        let waiting = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if waiting.as_mut().poll(cx).is_ready() {
            self.stalled.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new("the request body stalled"))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `response`, asking the client to close the connection after it (the request's body may be
/// unread: the connection cannot serve another request).
fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
