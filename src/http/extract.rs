//! Extractors: the request body within its size limit, and the caller (the space a request
//! addresses and the user its `Authorization` header names), each failing with an `ApiError`.

use std::marker::PhantomData;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};

use crate::auth::authorize::Authorizer;
use crate::auth::{Access, Authenticator};
use crate::config::HttpSettings;
use crate::error::ApiError;
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
                    }
                } else {
                    ApiError::bad_request("InvalidBody", rejection.body_text())
                }
            })
    }
}

/// Who asks about which space: the `{space}` of the path (recorded on the request's span) and
/// the user the authenticator finds in the `Authorization` header, once that user is allowed
/// `A`'s access to the space (401, 403 or 503 otherwise, before the body is read).
pub struct Caller<A> {
    pub space: SpaceId,
    pub user: String,
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
        let authorization = authorization_header(parts);
        let identity = Arc::<dyn Authenticator>::from_ref(state)
            .authenticate(authorization)
            .await?;
        Arc::<Authorizer>::from_ref(state)
            .authorize(&identity, &space, A::ACCESS, authorization)
            .await?;
        Ok(Caller {
            space,
            user: identity.user,
            access: PhantomData,
        })
    }
}

pub fn authorization_header(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}
