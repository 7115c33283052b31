//! The access log: one `info` line per request (target `replisync::access`) with its method,
//! matched route, status, duration, space, request id and the bytes of both bodies, written when
//! the response body ends or is dropped, so that a streamed answer is measured whole.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::settings::HttpSettings;
use crate::metrics::Metrics;
use crate::protocol::SpaceId;

/// The header Replicache sends with every push and pull; logged on each request's line and span.
pub const REQUEST_ID_HEADER: &str = "x-replicache-requestid";

/// The route of a request no route matched: never its raw path, which a client chooses.
pub(super) const UNMATCHED: &str = "unmatched";

/// The longest request id logged, in characters; a longer one is cut and marked with `…`.
const MAX_REQUEST_ID_CHARS: usize = 64;

/// One request, as it completes.
#[derive(Debug, Clone)]
pub(super) struct Completed {
    pub(super) method: Method,
    /// The matched route pattern (`/spaces/{space}/push`); `None` when no route matched.
    pub(super) matched: Option<MatchedPath>,
    pub(super) status: StatusCode,
    /// From the request's arrival to the end (or drop) of its response body.
    pub(super) elapsed: Duration,
    pub(super) space: Option<SpaceId>,
    /// X-Replicache-RequestID, bounded and with anything but visible ASCII replaced.
    pub(super) request_id: Option<String>,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
}

impl Completed {
    /// The matched route pattern, or [`UNMATCHED`].
    pub(super) fn route(&self) -> &str {
        self.matched.as_ref().map_or(UNMATCHED, MatchedPath::as_str)
    }
}

/// Where the `Caller` extractor leaves the space a request addresses, for its access log line.
#[derive(Clone, Debug, Default)]
pub(super) struct SpaceNote(Arc<OnceLock<SpaceId>>);

impl SpaceNote {
    /// Notes `space` in the request's slot, when the access log put one there.
    pub(super) fn note(extensions: &axum::http::Extensions, space: &SpaceId) {
        if let Some(SpaceNote(slot)) = extensions.get::<SpaceNote>() {
            let _ = slot.set(space.clone());
        }
    }
}

/// Counts both bodies of each request and calls [`completed`] once its response body is done.
pub(super) async fn access_log(
    State(http): State<Arc<HttpSettings>>,
    State(metrics): State<Arc<Metrics>>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let space = SpaceNote::default();
    request.extensions_mut().insert(space.clone());
    let bytes_in = Arc::new(AtomicU64::new(0));
    let pending = Pending {
        log: http.access_log,
        metrics,
        method: request.method().clone(),
        matched: request.extensions().get::<MatchedPath>().cloned(),
        request_id: request
            .headers()
            .get(REQUEST_ID_HEADER)
            .map(|value| bounded_request_id(value.as_bytes())),
        started,
        space,
        bytes_in: bytes_in.clone(),
    };
    let request = request.map(|body| {
        Body::new(Counted {
            inner: body,
            bytes: bytes_in,
            on_end: None,
        })
    });
    let mut unanswered = Unanswered(Some(pending));
    let response = next.run(request).await;
    let pending = unanswered.0.take().expect("taken once");
    let status = response.status();
    response.map(|body| {
        Body::new(Counted {
            inner: body,
            bytes: Arc::new(AtomicU64::new(0)),
            on_end: Some((pending, status)),
        })
    })
}

/// A request still without its response when dropped is reported all the same: as a 500 when
/// its handler panicked (the accept loop answers 500), as 499 when it was dropped unanswered.
struct Unanswered(Option<Pending>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(pending) = self.0.take() {
            let status = if std::thread::panicking() {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::from_u16(499).expect("a valid status code")
            };
            let (log, metrics) = (pending.log, pending.metrics.clone());
            completed(&pending.complete(status, 0), log, &metrics);
        }
    }
}

/// What is known of a request before its response body ends.
struct Pending {
    log: bool,
    metrics: Arc<Metrics>,
    method: Method,
    matched: Option<MatchedPath>,
    request_id: Option<String>,
    started: Instant,
    space: SpaceNote,
    bytes_in: Arc<AtomicU64>,
}

impl Pending {
    fn complete(self, status: StatusCode, bytes_out: u64) -> Completed {
        Completed {
            method: self.method,
            matched: self.matched,
            status,
            elapsed: self.started.elapsed(),
            space: self.space.0.get().cloned(),
            request_id: self.request_id,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out,
        }
    }
}

/// The one place a completed request is reported: its request metrics, and its access log line
/// (unless REPLISYNC_ACCESS_LOG=false).
fn completed(request: &Completed, log: bool, metrics: &Metrics) {
    metrics.observe_request(
        &request.method,
        request.route(),
        request.status,
        request.elapsed,
    );
    if log {
        write_line(request);
    }
}

fn write_line(request: &Completed) {
    tracing::info!(
        target: "replisync::access",
        parent: None,
        method = request.method.as_str(),
        route = request.route(),
        status = u64::from(request.status.as_u16()),
        duration_ms = whole_micros_in_ms(request.elapsed),
        space = request.space.as_ref().map(SpaceId::as_str),
        request_id = request.request_id.as_deref(),
        bytes_in = request.bytes_in,
        bytes_out = request.bytes_out,
        "request"
    );
}

/// `elapsed` in milliseconds, to the microsecond (`4.200852`, not `4.200851999999999`).
pub(super) fn whole_micros_in_ms(elapsed: Duration) -> f64 {
    elapsed.as_micros() as f64 / 1000.0
}

/// A client's request id as logged: at most [`MAX_REQUEST_ID_CHARS`] characters of visible
/// ASCII, anything else (spaces, control or non-ASCII bytes) written `?`.
pub(super) fn bounded_request_id(raw: &[u8]) -> String {
    let mut id: String = raw
        .iter()
        .take(MAX_REQUEST_ID_CHARS)
        .map(|&byte| {
            if byte.is_ascii_graphic() {
                char::from(byte)
            } else {
                '?'
            }
        })
        .collect();
    if raw.len() > MAX_REQUEST_ID_CHARS {
        id.push('…');
    }
    id
}

/// A body whose bytes are counted as they pass; a response body's also reports the request
/// when it ends or is dropped.
struct Counted {
    inner: Body,
    bytes: Arc<AtomicU64>,
    on_end: Option<(Pending, StatusCode)>,
}

impl Counted {
    fn finish(&mut self) {
        if let Some((pending, status)) = self.on_end.take() {
            let (log, metrics) = (pending.log, pending.metrics.clone());
            let request = pending.complete(status, self.bytes.load(Ordering::Relaxed));
            completed(&request, log, &metrics);
        }
    }
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::Router;
    use axum::body::Body;
    use axum::extract::FromRef;
    use axum::http::Request;
    use axum::middleware::from_fn_with_state;
    use axum::routing::get;
    use futures::FutureExt;
    use tower::ServiceExt;

    use super::{HttpSettings, Metrics, access_log, bounded_request_id};

    #[derive(Clone)]
    struct TestState {
        http: Arc<HttpSettings>,
        metrics: Arc<Metrics>,
    }

    impl FromRef<TestState> for Arc<HttpSettings> {
        fn from_ref(state: &TestState) -> Self {
            state.http.clone()
        }
    }

    impl FromRef<TestState> for Arc<Metrics> {
        fn from_ref(state: &TestState) -> Self {
            state.metrics.clone()
        }
    }

    async fn boom() -> &'static str {
        panic!("a bug")
    }

    #[tokio::test]
    async fn a_request_whose_handler_panics_is_counted_as_a_500() {
        let metrics = Arc::new(Metrics::default());
        let state = TestState {
            http: Arc::default(),
            metrics: metrics.clone(),
        };
        let app = Router::new()
            .route("/boom", get(boom))
            .layer(from_fn_with_state(state.clone(), access_log))
            .with_state(state);
        let request = Request::get("/boom").body(Body::empty()).unwrap();
        let answered = std::panic::AssertUnwindSafe(app.oneshot(request))
            .catch_unwind()
            .await;
        assert!(answered.is_err(), "the panic reaches the accept loop");
        let rendered = metrics.render();
        let counted = rendered.lines().find(|line| {
            line.starts_with("replisync_http_requests_total{")
                && line.contains("route=\"/boom\"")
                && line.contains("status=\"500\"")
        });
        assert!(
            counted.is_some_and(|line| line.ends_with(" 1")),
            "{rendered}"
        );
    }

    #[test]
    fn durations_are_logged_in_milliseconds_to_the_microsecond() {
        let elapsed = std::time::Duration::from_nanos(4_200_851_999);
        assert_eq!(super::whole_micros_in_ms(elapsed), 4200.851);
        let elapsed = std::time::Duration::from_nanos(4_200_852);
        assert_eq!(super::whole_micros_in_ms(elapsed), 4.2);
    }

    #[test]
    fn a_request_id_is_bounded_and_only_visible_ascii() {
        assert_eq!(bounded_request_id(b"abc-123-4"), "abc-123-4");
        assert_eq!(bounded_request_id(b"a\r\nb c\xff"), "a??b?c?");
        let long = bounded_request_id(&[b'x'; 10_000]);
        assert_eq!(long.chars().count(), 65);
        assert!(long.ends_with('…'));
    }
}
