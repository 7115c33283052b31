//! The accept loop: each TCP connection served by hyper's HTTP/1 server, with a cap on open
//! connections, a header read timeout and an idle keep-alive timeout.
//!
//! Both timeouts are kept by one watchdog per connection rather than by hyper's own
//! `header_read_timeout`: hyper starts that timer whenever it waits for a request head, idle
//! keep-alive periods included, so an idle timeout longer than the header timeout could never
//! take effect. The watchdog sees two things: requests in flight (counted by the service, from
//! the moment hyper has a complete head until the response body has been written or dropped),
//! and bytes read (through [`Watched`], a wrapper of the socket). With no request in flight:
//! - bytes of a request head have arrived, but no complete head: closed `header_read_timeout`
//!   after the first of them (also a new connection that sends nothing, counted from accept);
//! - nothing since the last response: closed `idle_timeout` after it.
//!
//! Closing drops the connection (the socket with it); responses in flight are never cut.

use std::any::Any;
use std::convert::Infallible;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Response;
use axum::response::IntoResponse;
use futures::FutureExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::settings::HttpSettings;
use crate::error::{ApiError, RETRY_AFTER_SECS};
use crate::metrics::Metrics;

/// Refused connections being answered at once; beyond this many, more are closed without an
/// answer (answering holds a socket for up to [`REFUSAL_TIME`]).
const MAX_ANSWERING_REFUSALS: usize = 64;

/// How long a refused connection is held to deliver its 503 before it is dropped.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// Accepts connections on `listener` and serves `router` on them until `stop` is cancelled;
/// then stops accepting, asks every connection to close after its current request, and
/// returns when all have. Dropping the future (aborting its task) drops every connection.
pub async fn accept_loop(
    listener: TcpListener,
    router: Router,
    settings: HttpSettings,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut connections = JoinSet::new();
    let mut refusals = JoinSet::new();
    let service = TowerToHyperService::new(router);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            Some(_) = refusals.join_next(), if !refusals.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tracing::error!(%error, "accept failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Small request/response exchanges: send each write at once (no Nagle delay).
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        if metrics.open_connections.get() >= settings.max_connections as u64 {
            metrics.connections_refused.increment();
            if refusals.len() < MAX_ANSWERING_REFUSALS {
                refusals.spawn(refuse(tcp));
            }
            continue;
        }
        let open = OpenConnection::count(metrics.clone());
        let (service, stop) = (service.clone(), stop.clone());
        let timeouts = (settings.header_read_timeout, settings.idle_timeout);
        connections.spawn(async move {
            serve_connection(tcp, service, timeouts, &open.0, stop).await;
        });
    }
    drop(listener);
    refusals.abort_all();
    while connections.join_next().await.is_some() {}
}

/// One open connection in the `/metrics` gauge, for as long as its task runs (or until the
/// task is dropped at the shutdown deadline).
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn count(metrics: Arc<Metrics>) -> OpenConnection {
        metrics.open_connections.add(1);
        OpenConnection(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.sub(1);
    }
}

/// Errors of one connection, not of the listener (axum's `serve` skips them the same way).
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Answers a connection over the cap `503` with `Retry-After` and closes it, within
/// [`REFUSAL_TIME`].
async fn refuse(mut tcp: TcpStream) {
    let body = serde_json::json!({
        "error": "Overloaded",
        "message": "the server has as many open connections as it allows; retry later",
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {RETRY_AFTER_SECS}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await?;
        // Read what the client sent until it closes, so closing does not reset the connection
        // (and destroy the answer) over unread bytes.
        let mut sink = [0u8; 4096];
        while tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

type Service = TowerToHyperService<Router>;

/// A request whose handler panicked (a bug) is answered 500 with a JSON body, not a dropped
/// connection; the panic's message is logged. Caught here, around every layer, because a layer
/// of the router would cost each request a clone of the boxed route.
fn answer_panic(panic: &(dyn Any + Send)) -> Response<Body> {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(
        panic = message,
        "a request's handler panicked; answered 500"
    );
    ApiError::Failed(
        "the server failed while handling this request; send it again (a push is applied at most once)"
            .into(),
    )
    .into_response()
}

async fn serve_connection(
    tcp: TcpStream,
    service: Service,
    (header_read_timeout, idle_timeout): (Duration, Duration),
    metrics: &Metrics,
    stop: CancellationToken,
) {
    let activity = Arc::new(Shared {
        activity: Mutex::new(Activity {
            in_flight: 0,
            idle_since: Instant::now(),
            head_started: None,
            served: false,
        }),
        changed: Notify::new(),
    });
    let io = TokioIo::new(Watched {
        inner: tcp,
        activity: activity.clone(),
    });
    let tracked = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let in_flight = InFlight::start(activity.clone());
            let call = hyper::service::Service::call(&service, request);
            async move {
                let response = match AssertUnwindSafe(call).catch_unwind().await {
                    Ok(response) => response?,
                    Err(panic) => answer_panic(&*panic),
                };
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(TrackedBody {
                        inner: body,
                        _in_flight: in_flight,
                    })
                }))
            }
        })
    };
    let connection = http1::Builder::new()
        // The watchdog keeps the header read timeout (see the module's comment).
        .header_read_timeout(None)
        .keep_alive(true)
        .serve_connection(io, tracked);
    tokio::pin!(connection);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
            closed = watchdog(&activity, header_read_timeout, idle_timeout) => {
                match closed {
                    Closed::HeaderTimeout => metrics.header_read_timeouts.increment(),
                    Closed::Idle => metrics.idle_closes.increment(),
                }
                return;
            }
        }
    }
}

/// What the watchdog knows of one connection.
struct Activity {
    /// Requests whose head has been read and whose response is not yet fully written.
    in_flight: usize,
    /// When the last request finished (or the connection was accepted).
    idle_since: Instant,
    /// When the first byte after the last complete request head arrived.
    head_started: Option<Instant>,
    /// Whether any request has been read on this connection.
    served: bool,
}

/// A connection's activity, and a wake-up for its watchdog when it changes.
struct Shared {
    activity: Mutex<Activity>,
    changed: Notify,
}

impl Shared {
    fn activity(&self) -> std::sync::MutexGuard<'_, Activity> {
        self.activity.lock().unwrap_or_else(|e| e.into_inner())
    }
}

enum Closed {
    HeaderTimeout,
    Idle,
}

/// Resolves when the connection should be closed for a timeout; never while a request is in
/// flight.
async fn watchdog(shared: &Shared, header: Duration, idle: Duration) -> Closed {
    loop {
        let (deadline, reason) = {
            let a = shared.activity();
            if a.in_flight > 0 {
                // Look again later; the state changes when the request ends.
                (Instant::now() + header.min(idle), None)
            } else if let Some(started) = a.head_started {
                (started + header, Some(Closed::HeaderTimeout))
            } else if !a.served {
                (a.idle_since + header, Some(Closed::HeaderTimeout))
            } else {
                (a.idle_since + idle, Some(Closed::Idle))
            }
        };
        match reason {
            Some(reason) if Instant::now() >= deadline => return reason,
            _ => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = shared.changed.notified() => {}
                }
            }
        }
    }
}

/// One request in flight, from its complete head to the end (or drop) of its response body.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn start(shared: Arc<Shared>) -> InFlight {
        {
            let mut a = shared.activity();
            a.in_flight += 1;
            a.served = true;
            a.head_started = None;
        }
        shared.changed.notify_one();
        InFlight(shared)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut a = self.0.activity();
            a.in_flight -= 1;
            a.idle_since = Instant::now();
        }
        self.0.changed.notify_one();
    }
}

/// A response body that keeps its request counted in flight until hyper drops it.
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting when bytes of a new request head start to arrive.
struct Watched {
    inner: TcpStream,
    activity: Arc<Shared>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let mut a = self.activity.activity();
            if a.in_flight == 0 && a.head_started.is_none() {
                a.head_started = Some(Instant::now());
                drop(a);
                self.activity.changed.notify_one();
            }
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
