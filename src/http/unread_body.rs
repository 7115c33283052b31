//! A request body its handler left unread (a 401, a 413, a route that ignores it) is read and
//! dropped before the answer goes out, so that the client, still sending it, reads the answer
//! on a connection that stays usable instead of finding it reset; past a bound, the answer
//! closes the connection instead (`Connection: close`).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// The request's body as its handler sees it, and the receiving end that gets it back if the
/// handler drops it before its end.
pub(super) fn kept(body: Body) -> (Body, oneshot::Receiver<Body>) {
    let (give_back, taken_back) = oneshot::channel();
    let kept = Kept {
        inner: Some(body),
        ended: false,
        give_back: Some(give_back),
    };
    (Body::new(kept), taken_back)
}

/// What to do with a body the handler left, at most `max_bytes` of it and within `time`: read
/// it to its end (counted in `replisync_request_bodies_drained_total`) or, when it is longer
/// or slower, mark `response` to close its connection (counted in
/// `replisync_request_bodies_left_unread_total`).
pub(super) async fn finish(
    mut taken_back: oneshot::Receiver<Body>,
    max_bytes: usize,
    time: Duration,
    metrics: &Metrics,
    mut response: Response,
) -> Response {
    // Nothing given back: the body was read to its end (or the handler's work still holds it).
    let Ok(left) = taken_back.try_recv() else {
        return response;
    };
    // A declared length tells what is left before anything is read.
    let drained = match left.size_hint().exact() {
        Some(remaining) if remaining > max_bytes as u64 => false,
        _ => tokio::time::timeout(time, drain(left, max_bytes))
            .await
            .unwrap_or(false),
    };
    if drained {
        metrics.request_bodies_drained.increment();
    } else {
        metrics.request_bodies_left_unread.increment();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads `body` to its end, dropping it; `false` when it runs past `max_bytes` or fails.
async fn drain(mut body: Body, max_bytes: usize) -> bool {
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return false };
        if let Ok(data) = frame.into_data() {
            read += data.len();
            if read > max_bytes {
                return false;
            }
        }
    }
    true
}

/// A body that gives itself back (through `give_back`) when dropped before its end.
struct Kept {
    inner: Option<Body>,
    ended: bool,
    give_back: Option<oneshot::Sender<Body>>,
}

impl HttpBody for Kept {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = frame {
            self.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        let (Some(inner), Some(give_back)) = (self.inner.take(), self.give_back.take()) else {
            return;
        };
        if !self.ended && !inner.is_end_stream() {
            let _ = give_back.send(inner);
        }
    }
}
