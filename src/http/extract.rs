//! Extractors: the request body within its size limit, and the caller (the space a request
//! addresses and the user its `Authorization` header names), each failing with an `ApiError`.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::BytesMut;
use http_body_util::BodyExt;
use serde_json::{Map, Value};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::auth::authorize::Authorizer;
use crate::auth::{Access, Authenticator, Identity};

use super::access_log::SpaceNote;
use super::authenticate::identify;
use super::settings::HttpSettings;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::protocol::SpaceId;
use crate::push::settings::PushLimits;
use crate::rules::{CallerKeys, MAX_PATTERNS_PER_CALLER, RuleInputs, Rules, TooManyPatterns};

/// A request body read whole, within the configured limit (413 beyond it).
pub(super) struct RequestBody(pub Bytes);

impl<S> FromRequest<S> for RequestBody
where
    S: Send + Sync,
    Arc<HttpSettings>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(request, state)
            .await
            .map(RequestBody)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge {
                        limit: Arc::<HttpSettings>::from_ref(state).max_body_bytes,
                        variable: "REPLISYNC_MAX_BODY_BYTES",
                    }
                } else {
                    ApiError::bad_request("InvalidBody", rejection.body_text())
                }
            })
    }
}

/// The bytes of push bodies being read or worked on, across requests: a semaphore counted in
/// KiB, so that 30 concurrent 4 MB pushes cannot take gigabytes. Bytes are reserved as they
/// arrive, never on a length a client only declares: an upload that trickles holds what it sent.
#[derive(Debug, Clone)]
pub struct InFlightBytes {
    free: Arc<Semaphore>,
    total_kib: usize,
}

impl InFlightBytes {
    pub fn new(max_bytes: usize) -> Self {
        let total_kib = kib(max_bytes).clamp(1, u32::MAX as usize);
        InFlightBytes {
            free: Arc::new(Semaphore::new(total_kib)),
            total_kib,
        }
    }

    /// An empty reservation, grown as a body arrives.
    fn reservation(&self, metrics: Arc<Metrics>) -> Reservation {
        Reservation {
            budget: self.clone(),
            permit: None,
            kib: 0,
            metrics,
        }
    }
}

/// Bytes of the in-flight budget held by one push until it is answered, counted in
/// `replisync_push_bytes_in_flight`.
struct Reservation {
    budget: InFlightBytes,
    permit: Option<OwnedSemaphorePermit>,
    kib: usize,
    metrics: Arc<Metrics>,
}

impl Reservation {
    /// Holds at least `bytes` (at most the whole budget, so that any body within the body limit
    /// can get in); `false` when they are not free.
    fn grow_to(&mut self, bytes: usize) -> bool {
        let wanted = kib(bytes).clamp(1, self.budget.total_kib);
        if wanted <= self.kib {
            return true;
        }
        let more = (wanted - self.kib) as u32;
        let Ok(permit) = self.budget.free.clone().try_acquire_many_owned(more) else {
            return false;
        };
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
        self.kib = wanted;
        self.metrics
            .push_bytes_in_flight
            .add(u64::from(more) * 1024);
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.metrics
            .push_bytes_in_flight
            .sub(self.kib as u64 * 1024);
    }
}

fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024)
}

/// A push body, read whole within REPLISYNC_MAX_PUSH_BODY_BYTES (413 beyond it) while its bytes
/// fit the in-flight budget (503 with `Retry-After` once they do not). The bytes are reserved as
/// they arrive and held until the push is answered.
pub(super) struct PushBody {
    pub bytes: Bytes,
    _reserved: Reservation,
}

impl<S> FromRequest<S> for PushBody
where
    S: Send + Sync,
    Arc<PushLimits>: FromRef<S>,
    InFlightBytes: FromRef<S>,
    Arc<Metrics>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let limit = Arc::<PushLimits>::from_ref(state).max_body_bytes;
        let metrics = Arc::<Metrics>::from_ref(state);
        let too_large = || {
            metrics.push_refused_too_large.increment();
            ApiError::PayloadTooLarge {
                limit,
                variable: "REPLISYNC_MAX_PUSH_BODY_BYTES",
            }
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|length| length > limit) {
            return Err(too_large());
        }
        let mut reserved = InFlightBytes::from_ref(state).reservation(metrics.clone());
        let mut body = request.into_body();
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut length = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| {
                ApiError::bad_request(
                    "InvalidBody",
                    format!("the request body could not be read: {error}"),
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            length += data.len();
            if length > limit {
                return Err(too_large());
            }
            if !reserved.grow_to(length) {
                metrics.push_refused_busy.increment();
                return Err(ApiError::Busy);
            }
            chunks.push(data);
        }
        Ok(PushBody {
            bytes: concatenated(chunks, length),
            _reserved: reserved,
        })
    }
}

/// The chunks of a body as one buffer (without a copy when it came in one chunk).
fn concatenated(mut chunks: Vec<Bytes>, length: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks.pop().expect("one chunk");
    }
    let mut whole = BytesMut::with_capacity(length);
    for chunk in chunks {
        whole.extend_from_slice(&chunk);
    }
    whole.freeze()
}

/// The caller's identity: the one the `authenticate` layer found, or (on a route outside it)
/// the one the `Authorization` header proves; 401 or 503 otherwise, before the body is read.
pub(super) struct Authenticated(pub Identity);

impl<S> FromRequestParts<S> for Authenticated
where
    S: Send + Sync,
    Arc<dyn Authenticator>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if let Some(identity) = parts.extensions.get::<Identity>() {
            return Ok(Authenticated(identity.clone()));
        }
        let authenticator = Arc::<dyn Authenticator>::from_ref(state);
        identify(&authenticator, &parts.headers)
            .await
            .map(Authenticated)
    }
}

/// Who asks about which space: the `{space}` of the path (recorded on the request's span) and
/// the caller's user, once that user is allowed `A`'s access to the space (401, 403 or 503
/// otherwise, before the body is read).
pub(super) struct Caller<A> {
    pub space: SpaceId,
    pub user: String,
    /// When the caller's credentials expire (an SSE stream ends then).
    pub expires_at: Option<SystemTime>,
    /// Its token's claims, which visibility rules may use.
    claims: Arc<Map<String, Value>>,
    access: PhantomData<A>,
}

impl<A> Caller<A> {
    /// The keys this caller may read and write in its space (REPLISYNC_RULES): 403 when its
    /// claims fill the rules' placeholders with more patterns than the server allows.
    pub(super) fn keys(&self, rules: &Rules) -> Result<CallerKeys, ApiError> {
        let inputs = RuleInputs {
            user: &self.user,
            claims: &self.claims,
        };
        rules.for_caller(&self.space, inputs).map_err(|TooManyPatterns| {
            ApiError::Forbidden(format!(
                "this token's claims give more than {MAX_PATTERNS_PER_CALLER} key patterns in this \
                 space's rules (REPLISYNC_RULES); issue a token with fewer values in the claims \
                 the rules use"
            ))
        })
    }
}

/// The access a route needs: [`Reads`] or [`Writes`].
pub(super) trait NeedsAccess: Send + Sync {
    const ACCESS: Access;
}

/// Pull, the SSE stream.
pub(super) struct Reads;
/// Push.
pub(super) struct Writes;

impl NeedsAccess for Reads {
    const ACCESS: Access = Access::Read;
}

impl NeedsAccess for Writes {
    const ACCESS: Access = Access::Write;
}

/// The `{space}` of the path (400 `InvalidSpaceId` when it is not one), recorded on the
/// request's span and in its access log line.
pub(super) async fn path_space<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
) -> Result<SpaceId, ApiError> {
    let Path(raw_space) = Path::<String>::from_request_parts(parts, state)
        .await
        .map_err(|rejection| ApiError::bad_request("InvalidSpaceId", rejection.body_text()))?;
    let space = SpaceId::parse(&raw_space)
        .map_err(|message| ApiError::bad_request("InvalidSpaceId", message))?;
    tracing::Span::current().record("space", space.as_str());
    SpaceNote::note(&parts.extensions, &space);
    Ok(space)
}

impl<S, A> FromRequestParts<S> for Caller<A>
where
    S: Send + Sync,
    A: NeedsAccess,
    Arc<dyn Authenticator>: FromRef<S>,
    Arc<Authorizer>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let space = path_space(parts, state).await?;
        let Authenticated(identity) = Authenticated::from_request_parts(parts, state).await?;
        let authorizer = Arc::<Authorizer>::from_ref(state);
        authorize(&authorizer, &identity, &parts.headers, &space, A::ACCESS)
            .instrument(tracing::debug_span!("caller.authorize"))
            .await?;
        Ok(Caller {
            space,
            user: identity.user,
            expires_at: identity.expires_at,
            claims: identity.claims,
            access: PhantomData,
        })
    }
}

/// Whether `identity` may have `access` to `space` (403 or 503 otherwise). The webhook, when
/// asked, gets the request's `Authorization` header.
pub(super) async fn authorize(
    authorizer: &Authorizer,
    identity: &Identity,
    headers: &HeaderMap,
    space: &SpaceId,
    access: Access,
) -> Result<(), ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    authorizer
        .authorize(identity, space, access, authorization)
        .await?;
    Ok(())
}
