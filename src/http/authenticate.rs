//! The caller's token, checked before anything else of a browser request: every browser route
//! gets the caller's `Identity` (or answers 401) before its handler runs, so before any body is
//! read. Which spaces the identity may use is the `Caller` extractor's question.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use serde::Deserialize;
use tracing::Instrument;

use crate::auth::{Authenticator, Identity, check_user_id};
use crate::error::ApiError;

/// Authenticates the request's `Authorization` header (for a GET, `?auth=` when it has none)
/// and hands the identity to the handler as a request extension.
pub(super) async fn authenticate(
    State(authenticator): State<Arc<dyn Authenticator>>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if request.method() == Method::GET {
        token_from_query(&mut request);
    }
    let identity = identify(&authenticator, request.headers())
        .instrument(tracing::debug_span!("caller.authenticate"))
        .await?;
    request.extensions_mut().insert(identity);
    Ok(next.run(request).await)
}

/// The identity the `Authorization` header proves (401 or 503 otherwise). Every identity comes
/// through here, so the user id of every authenticator (JWT, JWKS, an app's own) is checked
/// here: 401 when it is not one replisync can store.
pub(super) async fn identify(
    authenticator: &Arc<dyn Authenticator>,
    headers: &HeaderMap,
) -> Result<Identity, ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let identity = authenticator.authenticate(authorization).await?;
    check_user_id(&identity.user)?;
    Ok(identity)
}

#[derive(Deserialize)]
struct AuthQuery {
    auth: Option<String>,
}

/// EventSource cannot send headers, so the SSE stream (a GET) also takes its token as `?auth=`:
/// it becomes the `Authorization` header when the request has none.
fn token_from_query(request: &mut Request) {
    let token = Query::<AuthQuery>::try_from_uri(request.uri())
        .ok()
        .and_then(|Query(query)| query.auth)
        .and_then(|token| token.parse().ok());
    if let Some(token) = token {
        request
            .headers_mut()
            .entry(header::AUTHORIZATION)
            .or_insert(token);
    }
}
