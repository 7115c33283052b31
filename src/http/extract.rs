//! Extractors: the request body within its size limit, and the caller (the space a request
//! addresses and the user its `Authorization` header names), each failing with an `ApiError`.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::authorize::Authorizer;
use crate::auth::{Access, Authenticator, Identity, check_user_id};

use crate::config::HttpSettings;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::protocol::SpaceId;

/// A request body read whole, within the configured limit (413 beyond it).
pub struct RequestBody(pub Bytes);

impl<S> FromRequest<S> for RequestBody
where
    S: Send + Sync,
    HttpSettings: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(request, state)
            .await
            .map(RequestBody)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge {
                        limit: HttpSettings::from_ref(state).max_body_bytes,
                        variable: "REPLISYNC_MAX_BODY_BYTES",
                    }
                } else {
                    ApiError::bad_request("InvalidBody", rejection.body_text())
                }
            })
    }
}

/// The bytes of push bodies being read or worked on, across requests: a semaphore counted in
/// KiB, so that 30 concurrent 4 MB pushes cannot take gigabytes.
#[derive(Clone)]
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

    /// Reserves `bytes` (at most the whole budget, so that any body within the body limit can
    /// get in), or nothing when they are not free. The reservation is counted in
    /// `replisync_push_bytes_in_flight` until it is dropped.
    fn try_reserve(&self, bytes: usize, metrics: Arc<Metrics>) -> Option<Reservation> {
        let wanted = kib(bytes).clamp(1, self.total_kib) as u32;
        let permit = self.free.clone().try_acquire_many_owned(wanted).ok()?;
        let bytes = u64::from(wanted) * 1024;
        metrics.push_bytes_in_flight.add(bytes);
        Some(Reservation {
            _permit: permit,
            bytes,
            metrics,
        })
    }
}

/// Bytes of the in-flight budget held by one push until it is answered.
struct Reservation {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    metrics: Arc<Metrics>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.metrics.push_bytes_in_flight.sub(self.bytes);
    }
}

fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024)
}

/// A push body, read whole within REPLISYNC_MAX_PUSH_BODY_BYTES (413 beyond it) once its bytes
/// fit the in-flight budget (503 with `Retry-After` otherwise). The reservation, by
/// `Content-Length` (or the whole body limit when the length is not declared), is held until the
/// push is answered.
pub struct PushBody {
    pub bytes: Bytes,
    _reserved: Reservation,
}

impl<S> FromRequest<S> for PushBody
where
    S: Send + Sync,
    HttpSettings: FromRef<S>,
    InFlightBytes: FromRef<S>,
    Arc<Metrics>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let limit = HttpSettings::from_ref(state).push.max_body_bytes;
        let metrics = Arc::<Metrics>::from_ref(state);
        let too_large = || ApiError::PayloadTooLarge {
            limit,
            variable: "REPLISYNC_MAX_PUSH_BODY_BYTES",
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|length| length > limit) {
            metrics.push_refused_too_large.increment();
            return Err(too_large());
        }
        let wanted = declared.unwrap_or(limit);
        let Some(reserved) = InFlightBytes::from_ref(state).try_reserve(wanted, metrics.clone())
        else {
            metrics.push_refused_busy.increment();
            return Err(ApiError::Busy);
        };
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    metrics.push_refused_too_large.increment();
                    too_large()
                } else {
                    ApiError::bad_request("InvalidBody", rejection.body_text())
                }
            })?;
        Ok(PushBody {
            bytes,
            _reserved: reserved,
        })
    }
}

/// Who asks about which space: the `{space}` of the path (recorded on the request's span) and
/// the user the authenticator finds in the `Authorization` header, once that user is allowed
/// `A`'s access to the space (401, 403 or 503 otherwise, before the body is read).
pub struct Caller<A> {
    pub space: SpaceId,
    pub user: String,
    /// When the caller's credentials expire (an SSE stream ends then).
    pub expires_at: Option<SystemTime>,
    access: PhantomData<A>,
}

/// The access a route needs: [`Reads`] or [`Writes`].
pub trait NeedsAccess: Send + Sync {
    const ACCESS: Access;
}

/// Pull, the SSE stream.
pub struct Reads;
/// Push.
pub struct Writes;

impl NeedsAccess for Reads {
    const ACCESS: Access = Access::Read;
}

impl NeedsAccess for Writes {
    const ACCESS: Access = Access::Write;
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
        let Path(raw_space) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request("InvalidSpaceId", rejection.body_text()))?;
        let space = SpaceId::parse(&raw_space)
            .map_err(|message| ApiError::bad_request("InvalidSpaceId", message))?;
        tracing::Span::current().record("space", space.as_str());
        let identity = allowed_identity(
            &Arc::<dyn Authenticator>::from_ref(state),
            &Arc::<Authorizer>::from_ref(state),
            &parts.headers,
            &space,
            A::ACCESS,
        )
        .await?;
        Ok(Caller {
            space,
            user: identity.user,
            expires_at: identity.expires_at,
            access: PhantomData,
        })
    }
}

/// The identity the request's `Authorization` header proves, once it may have `access` to
/// `space` (401, 403 or 503 otherwise). Every route that takes a caller comes here, so the user
/// id of every authenticator (JWT, JWKS, an app's own) is checked here: 401 when it is not one
/// replisync can store.
pub async fn allowed_identity(
    authenticator: &Arc<dyn Authenticator>,
    authorizer: &Authorizer,
    headers: &HeaderMap,
    space: &SpaceId,
    access: Access,
) -> Result<Identity, ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let identity = authenticator.authenticate(authorization).await?;
    check_user_id(&identity.user)?;
    authorizer
        .authorize(&identity, space, access, authorization)
        .await?;
    Ok(identity)
}
