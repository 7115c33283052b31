//! Extractors: the request body within its size limit, and the caller (the space a request
//! addresses and the user its `Authorization` header names), each failing with an `ApiError`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};

use crate::auth::Authenticator;
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
/// the user the authenticator finds in the `Authorization` header.
pub struct Caller {
    pub space: SpaceId,
    pub user: String,
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    Arc<dyn Authenticator>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw_space) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request("InvalidSpaceId", rejection.body_text()))?;
        let space = SpaceId::parse(&raw_space)
            .map_err(|message| ApiError::bad_request("InvalidSpaceId", message))?;
        tracing::Span::current().record("space", space.as_str());
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let user = Arc::<dyn Authenticator>::from_ref(state)
            .authenticate(authorization)
            .await
            .map_err(ApiError::Unauthorized)?;
        Ok(Caller { space, user })
    }
}
