//! Pull: answers what changed in a space since the client's cookie, from one snapshot.
//! A first pull is streamed as the database returns it, so a large space is never held whole;
//! incremental pulls share reads with identical concurrent pulls (see `coalesce`).

pub mod coalesce;
mod guard;
mod patch;

use std::sync::Arc;
use std::time::Duration;

use async_stream::try_stream;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, TryStreamExt};
use tokio::sync::Semaphore;

use self::coalesce::PullCoalescer;
pub use self::guard::StreamLimits;
use self::patch::{response_head, write_patch_op};
use crate::auth::check_group_ownership;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::protocol::{ProtocolError, PullRequest, SpaceId, check_identifier, parse_cookie};
use crate::store::{PullSnapshot, Store, StoreError, reconnecting};

/// Patch bytes gathered before a chunk is handed to the connection.
const CHUNK_BYTES: usize = 64 * 1024;

/// Answers pulls from one store: first pulls streamed from a snapshot, incremental pulls from
/// reads shared with identical concurrent pulls. Built once, with the server.
pub struct Pulls {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    coalescer: Arc<PullCoalescer>,
    limits: PullLimits,
    /// One permit per first pull in flight: fewer than the pool's connections, so pushes and
    /// health checks always find one.
    first_pulls: Arc<Semaphore>,
}

/// What first pulls may hold, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct PullLimits {
    pub max_first_pulls: usize,
    /// How long a first pull waits for a permit before it is answered 503.
    pub queue_wait: Duration,
    pub stream: StreamLimits,
}

/// A pull's response body: streamed (first pulls, whatever the space's size) or in parts.
pub enum PullBody {
    Streamed(BoxStream<'static, Result<Bytes, StoreError>>),
    /// A whole response in parts (incremental pulls: their own head, then a patch shared with
    /// the other pulls of their batch, not copied).
    Parts(Vec<Bytes>),
}

impl Pulls {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>, limits: PullLimits) -> Pulls {
        Pulls {
            coalescer: Arc::new(PullCoalescer::new(store.clone(), metrics.clone())),
            store,
            metrics,
            first_pulls: Arc::new(Semaphore::new(limits.max_first_pulls.max(1))),
            limits,
        }
    }

    /// Answers `request` for `user` in `space`: a whole space for a null cookie, what changed
    /// since the cookie otherwise.
    pub async fn pull(
        &self,
        space: &SpaceId,
        user: &str,
        request: &PullRequest,
    ) -> Result<PullBody, ApiError> {
        check_identifier(&request.client_group_id, "clientGroupID")?;
        // A cookie replisync never issued (a string, an object, a fraction) cannot be honoured.
        let cookie =
            parse_cookie(&request.cookie).map_err(|_| ProtocolError::ClientStateNotFound)?;
        let body = match cookie {
            None => {
                self.first_pull(space, user, &request.client_group_id)
                    .await?
            }
            Some(from) => {
                self.incremental_pull(space, user, &request.client_group_id, from)
                    .await?
            }
        };
        self.metrics.pulls.increment();
        Ok(body)
    }

    /// A pull with a null cookie: `clear` and the whole space, streamed from one snapshot.
    async fn first_pull(
        &self,
        space: &SpaceId,
        user: &str,
        client_group_id: &str,
    ) -> Result<PullBody, ApiError> {
        let permit = tokio::time::timeout(
            self.limits.queue_wait,
            self.first_pulls.clone().acquire_owned(),
        )
        .await;
        let Ok(Ok(permit)) = permit else {
            self.metrics.first_pulls_refused.increment();
            return Err(ApiError::Overloaded(format!(
                "{} first pulls are in flight (REPLISYNC_MAX_FIRST_PULLS); retry shortly",
                self.limits.max_first_pulls
            )));
        };
        self.metrics.pull_reads.increment();
        let snapshot = reconnecting(|| self.store.first_pull(space, client_group_id)).await?;
        if let Some(group) = &snapshot.client_group {
            check_group_ownership(group, space, user)?;
        }
        Ok(PullBody::Streamed(guard::guarded(
            response_chunks(snapshot, true),
            self.limits.stream,
            self.metrics.clone(),
            permit,
        )))
    }

    /// A pull from a cookie: answered from a read shared with identical concurrent pulls.
    async fn incremental_pull(
        &self,
        space: &SpaceId,
        user: &str,
        client_group_id: &str,
        from: u64,
    ) -> Result<PullBody, ApiError> {
        let shared = self.coalescer.pull(space, client_group_id, from).await?;
        if let Some(group) = shared.client_group(client_group_id) {
            check_group_ownership(group, space, user)?;
        }
        check_cookie_not_ahead(from, shared.version)?;
        let head = response_head(
            shared.version,
            shared.changed_clients(client_group_id),
            false,
        );
        // The patch is shared by every pull of the batch: each response points at it.
        Ok(PullBody::Parts(vec![
            Bytes::from(head),
            shared.patch.clone(),
            Bytes::from_static(b"]}"),
        ]))
    }
}

/// A cookie ahead of the space means the database was reset or replaced. Answering a lower
/// cookie would wedge the client; ClientStateNotFound makes it start over.
fn check_cookie_not_ahead(cookie: u64, version: u64) -> Result<(), ApiError> {
    if cookie > version {
        tracing::info!(
            cookie,
            version,
            "cookie ahead of space: ClientStateNotFound"
        );
        return Err(ProtocolError::ClientStateNotFound.into());
    }
    Ok(())
}

/// The response JSON as chunks: cookie and lastMutationIDChanges first, then the patch
/// (`clear` first on a first pull) entry by entry.
fn response_chunks(
    snapshot: PullSnapshot,
    first_pull: bool,
) -> impl Stream<Item = Result<Bytes, StoreError>> + Send {
    let mut buffer = response_head(snapshot.version, &snapshot.changed_clients, first_pull);
    let mut entries = snapshot.entries;
    try_stream! {
        let mut needs_comma = first_pull;
        while let Some(entry) = entries.try_next().await? {
            if needs_comma {
                buffer.push(b',');
            }
            needs_comma = true;
            write_patch_op(&mut buffer, &entry);
            if buffer.len() >= CHUNK_BYTES {
                yield Bytes::from(std::mem::take(&mut buffer));
            }
        }
        buffer.extend_from_slice(b"]}");
        yield Bytes::from(buffer);
    }
}
