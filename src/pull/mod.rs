//! Pull: answers what changed in a space since the client's cookie, from one snapshot.
//! A first pull is streamed as the database returns it, so a large space is never held whole;
//! incremental pulls share reads with identical concurrent pulls (see `coalesce`), unless their
//! delta is too large to hold: then each is streamed like a first pull.

pub mod coalesce;
mod cookie;
mod error;
mod guard;
mod patch;
pub mod settings;

use std::sync::Arc;
use std::time::Duration;

use async_stream::try_stream;
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, TryStreamExt};
use tokio::sync::Semaphore;

use self::coalesce::PullCoalescer;
use self::cookie::{AnswerCookie, Position, answer_cookie};
pub use self::error::PullError;
pub use self::guard::StreamLimits;
use self::patch::{response_head, write_patch_op};
use crate::auth::check_group_ownership;
use crate::metrics::{Metrics, PullKind, PullTimer};
use crate::protocol::{PullRequest, SpaceId, check_identifier, parse_cookie};
use crate::rules::{CallerKeys, KeySet};
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
    /// One permit per streamed pull in flight (first pulls and large deltas): fewer than the
    /// pool's connections, so pushes and health checks always find one.
    streamed_pulls: Arc<Semaphore>,
}

impl std::fmt::Debug for Pulls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pulls")
            .field("metrics", &self.metrics)
            .field("coalescer", &self.coalescer)
            .field("limits", &self.limits)
            .field("streamed_pulls", &self.streamed_pulls)
            .finish_non_exhaustive()
    }
}

/// What pulls may hold, and for how long.
#[derive(Clone, Copy)]
pub struct PullLimits {
    /// Streamed pulls in flight at once: first pulls, and incremental pulls of a large delta.
    pub max_first_pulls: usize,
    /// Largest delta built in memory and shared by identical concurrent pulls; beyond it each
    /// pull streams the delta from its own snapshot, as a first pull does.
    pub max_shared_delta_bytes: usize,
    /// How long a first pull waits for a permit before it is answered 503.
    pub queue_wait: Duration,
    pub stream: StreamLimits,
}

impl std::fmt::Debug for PullLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullLimits")
            .field("max_first_pulls", &self.max_first_pulls)
            .field("max_shared_delta_bytes", &self.max_shared_delta_bytes)
            .field("queue_wait", &self.queue_wait)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

/// Whether the caller of a pull may also write the space: asked only when answering the pull
/// would change the space (a cookie ahead of it), so a reader never moves a space.
#[async_trait]
pub trait WriteCheck: Send + Sync {
    async fn may_write(&self) -> bool;
}

/// A pull's response body: streamed (first pulls whatever the space's size, and large deltas)
/// or in parts.
pub enum PullBody {
    Streamed(BoxStream<'static, Result<Bytes, StoreError>>),
    /// A whole response in parts (small incremental pulls: their own head, then a patch shared
    /// with the other pulls of their batch, not copied).
    Parts(Vec<Bytes>),
}

impl std::fmt::Debug for PullBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PullBody::Streamed(_) => f.write_str("Streamed(..)"),
            PullBody::Parts(parts) => f.debug_tuple("Parts").field(&parts.len()).finish(),
        }
    }
}

impl Pulls {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>, limits: PullLimits) -> Pulls {
        Pulls {
            coalescer: Arc::new(PullCoalescer::new(
                store.clone(),
                metrics.clone(),
                limits.max_shared_delta_bytes,
            )),
            store,
            metrics,
            streamed_pulls: Arc::new(Semaphore::new(limits.max_first_pulls.max(1))),
            limits,
        }
    }

    /// Answers `request` for `caller` in `space`: every key it may read for a null cookie, what
    /// changed since the cookie otherwise (from scratch when what it may read changed since).
    pub async fn pull(
        &self,
        space: &SpaceId,
        caller: &Puller<'_>,
        request: &PullRequest,
    ) -> Result<PullBody, PullError> {
        check_identifier(&request.client_group_id, "clientGroupID")?;
        // A cookie replisync never issued (a string, an odd object, a fraction) cannot be
        // honoured.
        let cookie = parse_cookie(&request.cookie).map_err(|_| PullError::ClientStateNotFound)?;
        let timer = PullTimer::start();
        let client_group_id = &request.client_group_id;
        let body = match cookie.map(Position::of) {
            None => {
                let timer = timer.with_kind(PullKind::Streamed);
                let from = StreamFrom::scratch(None);
                self.streamed_pull(space, caller, client_group_id, from, timer)
                    .await?
            }
            Some(base) => {
                self.incremental_pull(space, caller, client_group_id, &base, timer)
                    .await?
            }
        };
        if let PullBody::Parts(_) = body {
            self.metrics.observe_pull(timer);
        }
        self.metrics.pulls.increment();
        Ok(body)
    }

    /// A pull streamed from one snapshot: `clear` and every key the caller may read for a null
    /// cookie, a cookie older than the space's compacted version or a change of what the caller
    /// may read, or what changed after the cookie when that is too large to share.
    async fn streamed_pull(
        &self,
        space: &SpaceId,
        caller: &Puller<'_>,
        client_group_id: &str,
        from: StreamFrom<'_>,
        timer: PullTimer,
    ) -> Result<PullBody, PullError> {
        let permit = tokio::time::timeout(
            self.limits.queue_wait,
            self.streamed_pulls.clone().acquire_owned(),
        )
        .await;
        let Ok(Ok(permit)) = permit else {
            self.metrics.first_pulls_refused.increment();
            return Err(PullError::TooManyStreamed {
                max_streamed: self.limits.max_first_pulls,
            });
        };
        self.metrics.pull_reads.increment();
        let since = from.since;
        let snapshot =
            reconnecting(|| self.store.streamed_pull(space, client_group_id, since)).await?;
        check_not_collected(snapshot.client_group_collected)?;
        if let Some(group) = &snapshot.client_group {
            check_group_ownership(group, space, caller.user)?;
        }
        if let Some(since) = since {
            check_cookie_not_ahead(since, snapshot.version)?;
            if snapshot.reset {
                self.metrics.pull_resets.increment();
            }
        }
        let timer = if snapshot.reset {
            timer.with_kind(PullKind::Reset)
        } else {
            timer
        };
        let from_scratch = since.is_none() || snapshot.reset;
        let cookie = answer_cookie(
            snapshot.version,
            from.base,
            from.visibility_reset,
            caller.keys,
        );
        let response = StreamedResponse {
            cookie,
            from_scratch,
            readable: caller.keys.read.clone(),
        };
        Ok(PullBody::Streamed(guard::guarded(
            response_chunks(snapshot, response),
            self.limits.stream,
            self.metrics.clone(),
            permit,
            timer,
        )))
    }

    /// A pull from a cookie: answered from a read shared with identical concurrent pulls, or
    /// streamed from a snapshot of its own when the delta is too large to share or the caller
    /// must start from scratch.
    async fn incremental_pull(
        &self,
        space: &SpaceId,
        caller: &Puller<'_>,
        client_group_id: &str,
        base: &Position,
        timer: PullTimer,
    ) -> Result<PullBody, PullError> {
        let from = base.version;
        let shared = self.coalescer.pull(space, client_group_id, from).await?;
        check_not_collected(shared.client_group_collected(client_group_id))?;
        if let Some(group) = shared.client_group(client_group_id) {
            check_group_ownership(group, space, caller.user)?;
        }
        if from > shared.version {
            return self
                .reset_cookie_ahead(space, caller, client_group_id, base, timer)
                .await;
        }
        if base.visibility_changed(caller.keys) {
            // The caller's claims or the rules changed since its cookie: it may hold keys it
            // may no longer read, and lack some it now may. Everything from scratch.
            self.metrics.pull_resets.increment();
            self.metrics.pull_visibility_resets.increment();
            let timer = timer.with_kind(PullKind::Reset);
            let from = StreamFrom {
                visibility_reset: true,
                ..StreamFrom::scratch(Some(base))
            };
            return self
                .streamed_pull(space, caller, client_group_id, from, timer)
                .await;
        }
        if from < shared.compacted_version {
            // Deletions after this cookie were compacted away: the whole space, from scratch.
            self.metrics.pull_resets.increment();
            let timer = timer.with_kind(PullKind::Reset);
            let from = StreamFrom::scratch(Some(base));
            return self
                .streamed_pull(space, caller, client_group_id, from, timer)
                .await;
        }
        let Some(patch) = shared.patch_for(&caller.keys.read) else {
            self.metrics.pull_deltas_streamed.increment();
            let timer = timer.with_kind(PullKind::Streamed);
            let from = StreamFrom {
                since: Some(from),
                base: Some(base),
                visibility_reset: false,
            };
            return self
                .streamed_pull(space, caller, client_group_id, from, timer)
                .await;
        };
        let cookie = answer_cookie(shared.version, Some(base), false, caller.keys);
        let head = response_head(&cookie, shared.changed_clients(client_group_id), false);
        // The patch is shared by every pull of the batch that may read the same keys: each
        // response points at it.
        Ok(PullBody::Parts(vec![
            Bytes::from(head),
            patch,
            Bytes::from_static(b"]}"),
        ]))
    }

    /// A cookie ahead of the space: the database was replaced (restored, wiped) since the
    /// client pulled. A lower cookie would wedge the client, and ClientStateNotFound would make
    /// Replicache fork a new group from the same local data and cookie, again and again. So the
    /// space's version and compaction horizon are raised past the cookie (every cookie up to it,
    /// which may come from the old database too, now gets a reset), and this pull gets the
    /// whole space. A caller who may only read the space changes nothing: it gets the whole space
    /// at its own cookie, and again at each pull until the space passes that cookie.
    async fn reset_cookie_ahead(
        &self,
        space: &SpaceId,
        caller: &Puller<'_>,
        client_group_id: &str,
        base: &Position,
        timer: PullTimer,
    ) -> Result<PullBody, PullError> {
        let timer = timer.with_kind(PullKind::Reset);
        let cookie = base.version;
        if cookie > MAX_ADOPTED_COOKIE {
            // No space gets near this; raising it there would leave too few versions.
            tracing::info!(cookie, "cookie far ahead of any space: ClientStateNotFound");
            return Err(PullError::ClientStateNotFound);
        }
        self.metrics.pull_resets.increment();
        let from = StreamFrom::scratch(Some(base));
        if !caller.writes.may_write().await {
            tracing::info!(
                cookie,
                "cookie ahead of the space, from a reader: the pull gets all of it at its own cookie, the space is unchanged"
            );
            return self
                .streamed_pull(space, caller, client_group_id, from, timer)
                .await;
        }
        tracing::info!(
            cookie,
            "cookie ahead of the space (its database was replaced): the space moves up to it, and the pull gets all of it"
        );
        reconnecting(|| self.store.raise_space_version(space, cookie + 1)).await?;
        self.streamed_pull(space, caller, client_group_id, from, timer)
            .await
    }
}

/// Who pulls: its user, the keys it may read, and whether it may write the space.
pub struct Puller<'a> {
    pub user: &'a str,
    pub keys: &'a CallerKeys,
    pub writes: &'a dyn WriteCheck,
}

impl std::fmt::Debug for Puller<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller")
            .field("keys", self.keys)
            .finish_non_exhaustive()
    }
}

/// Where a streamed pull starts: `since` a version (a delta) or from scratch (`None`), for a
/// client at `base` (`None`: a first pull), resetting for a change of what it may read or not.
#[derive(Clone, Copy)]
struct StreamFrom<'a> {
    since: Option<u64>,
    base: Option<&'a Position>,
    visibility_reset: bool,
}

impl<'a> StreamFrom<'a> {
    fn scratch(base: Option<&'a Position>) -> StreamFrom<'a> {
        StreamFrom {
            since: None,
            base,
            visibility_reset: false,
        }
    }
}

/// The highest cookie a space's version is raised to (2^50): far below 2^53, where JavaScript
/// numbers stop being exact, so 2^52 versions are left after it.
const MAX_ADOPTED_COOKIE: u64 = 1 << 50;

/// A client group that garbage collection removed starts over: Replicache disables it and
/// forks a new one from its local data (then pulls a delta from its cookie).
fn check_not_collected(collected: bool) -> Result<(), PullError> {
    if collected {
        tracing::info!("client group removed by garbage collection: ClientStateNotFound");
        return Err(PullError::ClientStateNotFound);
    }
    Ok(())
}

/// A cookie ahead of the space in a snapshot read after the shared read found it was not:
/// versions only grow, so this is a replaced database under a running server. Answering a lower
/// cookie would wedge the client; ClientStateNotFound makes it start over.
fn check_cookie_not_ahead(cookie: u64, version: u64) -> Result<(), PullError> {
    if cookie > version {
        tracing::info!(
            cookie,
            version,
            "cookie ahead of space: ClientStateNotFound"
        );
        return Err(PullError::ClientStateNotFound);
    }
    Ok(())
}

/// What a streamed answer writes around the snapshot's entries.
struct StreamedResponse {
    cookie: AnswerCookie,
    /// `clear` first: a first pull or a reset.
    from_scratch: bool,
    /// Entries on other keys are left out, puts and dels alike.
    readable: KeySet,
}

/// The response JSON as chunks: cookie and lastMutationIDChanges first, then the patch
/// (`clear` first from scratch) entry by entry, only on keys the caller may read.
fn response_chunks(
    snapshot: PullSnapshot,
    response: StreamedResponse,
) -> impl Stream<Item = Result<Bytes, StoreError>> + Send {
    let StreamedResponse {
        cookie,
        from_scratch,
        readable,
    } = response;
    let mut buffer = response_head(&cookie, &snapshot.changed_clients, from_scratch);
    let mut entries = snapshot.entries;
    try_stream! {
        let mut needs_comma = from_scratch;
        while let Some(entry) = entries.try_next().await? {
            if !readable.allows(&entry.key) {
                continue;
            }
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
