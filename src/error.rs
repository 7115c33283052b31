//! The one error type of the HTTP edge: client mistakes become a 4xx with a JSON body naming
//! the problem, server faults an opaque 5xx (the cause goes to the log, never to the client).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::protocol::ProtocolError;
use crate::store::StoreError;

/// Seconds a client refused for load is told to wait (`Retry-After`).
pub const RETRY_AFTER_SECS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Replicache's own error bodies, answered with status 200 as the client expects.
    #[error("{0:?}")]
    Protocol(ProtocolError),
    #[error("{message}")]
    BadRequest {
        error: &'static str,
        message: String,
    },
    #[error("request body is larger than the {limit}-byte limit ({variable})")]
    PayloadTooLarge {
        limit: usize,
        variable: &'static str,
    },
    /// Too many push bodies are being read at once; the client retries.
    #[error(
        "the server is reading too many push bodies at once (REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT); retry later"
    )]
    Busy,
    /// The push applied a prefix of its mutations (committed) and left the rest: answered 503
    /// so that Replicache, whose push loop only pushes again on a failure or a new mutation,
    /// retries at once and sends the rest.
    #[error(
        "applied {applied} mutations of this push, the most one push may apply (REPLISYNC_MAX_MUTATIONS_PER_PUSH or REPLISYNC_PUSH_TIME_BUDGET_MS); push again to apply the rest"
    )]
    PartiallyApplied { applied: usize },
    /// The request was not answered within REPLISYNC_REQUEST_TIMEOUT_SECS (body included).
    #[error(
        "the request took longer than {secs} s (REPLISYNC_REQUEST_TIMEOUT_SECS) and changed nothing; retry"
    )]
    RequestTimeout { secs: u64 },
    /// The request body paused longer than REPLISYNC_BODY_READ_TIMEOUT_SECS between bytes.
    #[error(
        "the request body stopped arriving for {secs} s (REPLISYNC_BODY_READ_TIMEOUT_SECS); send the whole body at once"
    )]
    BodyStalled { secs: u64 },
    /// A server API call holds more mutations than one push may apply.
    #[error("{0}")]
    TooManyMutations(String),
    /// A server API call's mutations ran past the push time budget: none applied (422).
    #[error("{0}")]
    CallTookTooLong(String),
    /// A server API call's mutation failed: none of the call's mutations was applied (422,
    /// naming the mutation and why).
    #[error(
        "mutation {index} ({name:?}) failed, so none of the call's mutations was applied: {message}"
    )]
    MutationFailed {
        index: usize,
        name: String,
        reason: &'static str,
        message: String,
    },
    /// Nothing is at the path asked for (a key the space does not hold; the server API off).
    #[error("{message}")]
    Missing {
        error: &'static str,
        message: String,
    },
    /// The request conflicts with the server's state (a space that exists already, an
    /// idempotency key forgotten by garbage collection).
    #[error("{message}")]
    Conflict {
        error: &'static str,
        message: String,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// An authentication or authorization check that could not be made: refused, never allowed.
    #[error("the access check cannot be made right now; retry later")]
    AuthUnavailable,
    #[error("no such route; replisync serves POST /spaces/{{space}}/push and /pull")]
    NotFound,
    #[error(
        "this route does not take this method: push, pull and /pusher/auth take POST, the SSE poke stream GET"
    )]
    MethodNotAllowed,
    #[error(
        "the built-in SSE poke stream is off (Pusher is configured); set REPLISYNC_SSE=true to enable it, or subscribe to the space's Pusher channel"
    )]
    SseDisabled,
    #[error(
        "private poke channels are off: they are served when Pusher is configured and tokens are verified (REPLISYNC_JWT_SECRET or REPLISYNC_JWT_JWKS_URL)"
    )]
    PrivateChannelsOff,
    /// A limit on concurrent work (connections, streams, first pulls) is reached: 503 with
    /// `Retry-After`, and Replicache retries.
    #[error("{0}")]
    Overloaded(String),
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    /// A fault of the server's own (a panic), logged where it happened; whether the request's
    /// work was done is unknown, so the client is told to send it again.
    #[error("{0}")]
    Failed(String),
}

impl crate::store::ConnectionLoss for ApiError {
    fn connection_lost(&self) -> Option<&str> {
        match self {
            ApiError::Store(error) => error.connection_lost(),
            _ => None,
        }
    }
}

impl ApiError {
    pub fn bad_request(error: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            error,
            message: message.into(),
        }
    }
}

impl From<crate::protocol::BodyError> for ApiError {
    fn from(error: crate::protocol::BodyError) -> Self {
        use crate::protocol::BodyError;
        match error {
            BodyError::UnsupportedVersion(version_type) => {
                ApiError::Protocol(ProtocolError::VersionNotSupported { version_type })
            }
            BodyError::Invalid(message) => ApiError::bad_request("InvalidRequest", message),
        }
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(error: crate::auth::AuthError) -> Self {
        match error {
            crate::auth::AuthError::Unauthorized(message) => ApiError::Unauthorized(message),
            crate::auth::AuthError::Forbidden(message) => ApiError::Forbidden(message),
            crate::auth::AuthError::Unavailable(cause) => {
                tracing::warn!(%cause, "access check failed; refusing with 503");
                ApiError::AuthUnavailable
            }
        }
    }
}

impl From<ProtocolError> for ApiError {
    fn from(error: ProtocolError) -> Self {
        ApiError::Protocol(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error, message) = match self {
            ApiError::Protocol(body) => return (StatusCode::OK, Json(body)).into_response(),
            ApiError::BadRequest { error, message } => (StatusCode::BAD_REQUEST, error, message),
            ApiError::PayloadTooLarge { .. } => {
                let message = self.to_string();
                (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge", message)
            }
            ApiError::Busy => return retry_later("Busy", self.to_string(), 1),
            ApiError::TooManyMutations(message) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "TooManyMutations", message)
            }
            ApiError::MutationFailed {
                index,
                ref name,
                reason,
                ..
            } => {
                let body = json!({
                    "error": "MutationFailed",
                    "message": self.to_string(),
                    "index": index,
                    "name": name,
                    "reason": reason,
                });
                return (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response();
            }
            ApiError::CallTookTooLong(message) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "CallTookTooLong", message)
            }
            ApiError::Missing { error, message } => (StatusCode::NOT_FOUND, error, message),
            ApiError::Conflict { error, message } => (StatusCode::CONFLICT, error, message),
            ApiError::PartiallyApplied { .. } => {
                return retry_later("PartiallyApplied", self.to_string(), 0);
            }
            ApiError::RequestTimeout { .. } => {
                return retry_later("Timeout", self.to_string(), 1);
            }
            ApiError::BodyStalled { .. } => {
                let message = self.to_string();
                (StatusCode::REQUEST_TIMEOUT, "BodyTimeout", message)
            }
            ApiError::SseDisabled => (StatusCode::NOT_FOUND, "SseDisabled", self.to_string()),
            ApiError::PrivateChannelsOff => (
                StatusCode::NOT_FOUND,
                "PrivateChannelsOff",
                self.to_string(),
            ),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "NotFound", self.to_string()),
            ApiError::Failed(message) => (StatusCode::INTERNAL_SERVER_ERROR, "Internal", message),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                self.to_string(),
            ),
            ApiError::Unauthorized(message) => (StatusCode::UNAUTHORIZED, "Unauthorized", message),
            ApiError::Forbidden(message) => (StatusCode::FORBIDDEN, "Forbidden", message),
            ApiError::AuthUnavailable => {
                let message = self.to_string();
                (StatusCode::SERVICE_UNAVAILABLE, "Unavailable", message)
            }
            ApiError::Overloaded(message) => {
                return retry_later("Overloaded", message, RETRY_AFTER_SECS);
            }
            ApiError::Store(StoreError::TimedOut(cause)) => {
                tracing::warn!(%cause, "request timed out in storage; answered 503");
                let message = "the database did not answer in time (a lock or statement timeout); the request changed nothing, retry later";
                return retry_later("Unavailable", message.to_owned(), 1);
            }
            ApiError::Store(StoreError::Conflict(cause)) => {
                tracing::warn!(%cause, "lost every attempt to concurrent writers; answered 503");
                let message = "the database is too busy with concurrent writers: every attempt lost; the request changed nothing, retry later";
                return retry_later("Busy", message.to_owned(), 1);
            }
            ApiError::Store(cause) => {
                let (status, error, message) = match cause {
                    StoreError::Unavailable(_) | StoreError::Disconnected(_) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Unavailable",
                        "the database is unavailable; retry later",
                    ),
                    StoreError::EngineUnavailable(_) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Unavailable",
                        "the server could not run the push's JavaScript mutators; nothing was written, retry later",
                    ),
                    _ => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Internal",
                        "internal error; the request changed nothing, retry later",
                    ),
                };
                tracing::error!(error = %cause, "request failed in storage");
                (status, error, message.to_owned())
            }
        };
        (status, Json(json!({ "error": error, "message": message }))).into_response()
    }
}

/// A 503 that Replicache retries, with `Retry-After` and the JSON error body.
fn retry_later(error: &str, message: String, retry_after_secs: u64) -> Response {
    let body = Json(json!({ "error": error, "message": message }));
    let retry_after = [(
        axum::http::header::RETRY_AFTER,
        retry_after_secs.to_string(),
    )];
    (StatusCode::SERVICE_UNAVAILABLE, retry_after, body).into_response()
}
