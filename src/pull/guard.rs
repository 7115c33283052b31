//! A streamed pull that cannot hold the database hostage: its snapshot is read by a task of its
//! own, which gives up (rolling back and releasing the connection) when the client stops reading.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_stream::stream;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::{Instant, timeout_at};
use tracing::Instrument;

use crate::metrics::{Metrics, PullTimer};
use crate::store::StoreError;

/// How long a streamed response may take.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// The client must take each chunk within this long.
    pub stall: Duration,
    /// The whole body must be sent within this long.
    pub deadline: Duration,
}

/// Chunks the connection has not taken yet; the reader task waits beyond them.
const BUFFERED_CHUNKS: usize = 2;

/// Streams `chunks` to the client through a task that holds `permit` (and the snapshot inside
/// `chunks`) only while the client keeps reading, within `limits`; `timer` is recorded when the
/// last chunk is handed over (or the stream is cut). A response cut short ends
/// with an error, so the connection is dropped instead of ending a truncated JSON body cleanly.
pub(super) fn guarded(
    chunks: impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static,
    limits: StreamLimits,
    metrics: Arc<Metrics>,
    permit: OwnedSemaphorePermit,
    timer: PullTimer,
) -> BoxStream<'static, Result<Bytes, StoreError>> {
    let (sender, mut receiver) = mpsc::channel(BUFFERED_CHUNKS);
    let finished = Arc::new(AtomicBool::new(false));
    let reader = read_snapshot(chunks, sender, limits, metrics.clone(), finished.clone());
    tokio::spawn(
        async move {
            reader.await;
            drop(permit);
            metrics.observe_pull(timer);
        }
        .instrument(tracing::Span::current()),
    );
    Box::pin(stream! {
        while let Some(chunk) = receiver.recv().await {
            yield chunk;
        }
        if !finished.load(Ordering::Acquire) {
            yield Err(StoreError::Unavailable("the response was cut off".into()));
        }
    })
}

/// Moves chunks from the snapshot to the connection until the end, an error, the client
/// hanging up, or a limit; sets `finished` only when every chunk was handed over.
async fn read_snapshot(
    chunks: impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static,
    sender: mpsc::Sender<Result<Bytes, StoreError>>,
    limits: StreamLimits,
    metrics: Arc<Metrics>,
    finished: Arc<AtomicBool>,
) {
    let deadline = Instant::now() + limits.deadline;
    let mut chunks = std::pin::pin!(chunks);
    loop {
        let next = match timeout_at(deadline, chunks.next()).await {
            Ok(next) => next,
            Err(_) => return cut_off(&metrics, "the whole response took too long"),
        };
        let Some(chunk) = next else {
            finished.store(true, Ordering::Release);
            return;
        };
        let failed = chunk.is_err();
        let send_by = deadline.min(Instant::now() + limits.stall);
        match timeout_at(send_by, sender.send(chunk)).await {
            Ok(Ok(())) if !failed => {}
            Ok(_) => return, // the read failed (the client gets the error) or the client left
            Err(_) => return cut_off(&metrics, "the client stopped reading"),
        }
    }
}

fn cut_off(metrics: &Metrics, reason: &'static str) {
    metrics.pull_streams_cut.increment();
    tracing::warn!(
        reason,
        "a streamed pull was cut off; its snapshot and database connection were released"
    );
}
