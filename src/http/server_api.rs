//! The server API's HTTP edge: `/api/spaces/{space}/...` for trusted backends, behind the
//! service token (checked before any body is read), never an end user's token, and no CORS.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::header;
use axum::http::request::Parts as RequestParts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::extract::{PushBody, path_space};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::protocol::{PushRequest, SpaceId, check_key};
use crate::push::{PushError, PushGroups, PushOutcome};
use crate::server_api::{
    self, MAX_PAGE_BYTES, MutationCall, PageQuery, SERVER_USER, ServerApi, ServiceAuthError,
};
use crate::store::{Store, StoreError, reconnecting};

/// Lets a request on only with the service token: 404 while the API is off, 401 otherwise.
pub(super) async fn check_service_token(
    State(api): State<Arc<ServerApi>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let mut headers = request.headers().get_all(header::AUTHORIZATION).iter();
    // One Authorization header: of several, which one counts would be a proxy's guess.
    let authorization = match (headers.next(), headers.next()) {
        (Some(value), None) => value.to_str().ok(),
        _ => None,
    };
    api.check(authorization)?;
    Ok(next.run(request).await)
}

impl From<ServiceAuthError> for ApiError {
    fn from(error: ServiceAuthError) -> ApiError {
        match error {
            ServiceAuthError::Off => ApiError::Missing {
                error: "ServerApiOff",
                message: error.to_string(),
            },
            ServiceAuthError::NotTheServiceToken => ApiError::Unauthorized(error.to_string()),
        }
    }
}

/// The `{space}` of the path (400 when it is not a space id), recorded on the request's span
/// and in its access log line.
pub(super) struct ApiSpace(SpaceId);

impl<S: Send + Sync> FromRequestParts<S> for ApiSpace {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut RequestParts, state: &S) -> Result<Self, ApiError> {
        path_space(parts, state).await.map(ApiSpace)
    }
}

/// The query string parsed as `T`, refused (400 `InvalidQuery`) when a value is not UTF-8 once
/// percent-decoded: a lossy decoding would read another key than the one asked for.
pub(super) struct StrictQuery<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for StrictQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut RequestParts, state: &S) -> Result<Self, ApiError> {
        let raw = parts.uri.query().unwrap_or_default();
        // `+` (a space) is ASCII: it never changes whether a value decodes to UTF-8.
        let decodes = raw.split(['&', '=']).all(|part| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .is_ok()
        });
        if !decodes {
            return Err(ApiError::bad_request(
                "InvalidQuery",
                "the query holds a percent-encoded value that is not UTF-8",
            ));
        }
        let Query(query) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e: QueryRejection| ApiError::bad_request("InvalidQuery", e.body_text()))?;
        Ok(StrictQuery(query))
    }
}

/// One entry of a read: its key and its value as stored (JSON).
#[derive(Serialize)]
struct Entry {
    key: String,
    value: Box<RawValue>,
}

fn entry((key, value): (String, String)) -> Result<Entry, ApiError> {
    let value = RawValue::from_string(value)
        .map_err(|e| StoreError::Corrupt(format!("stored value of {key:?} is not JSON: {e}")))?;
    Ok(Entry { key, value })
}

/// A page of a read: the stored values pass through as they are, never parsed again.
#[derive(Serialize)]
struct Page<'a> {
    space: &'a str,
    version: u64,
    entries: Vec<Entry>,
    next: Option<String>,
}

/// One key of a read.
#[derive(Serialize)]
struct OneEntry<'a> {
    space: &'a str,
    version: u64,
    key: String,
    value: Box<RawValue>,
}

/// `GET /api/spaces/{space}/entries?prefix=&start=&limit=`: a page of the space's live entries
/// in key order, with the space's version, from one snapshot; `next` starts the next page.
pub(super) async fn read_page(
    State(store): State<Arc<dyn Store>>,
    ApiSpace(space): ApiSpace,
    StrictQuery(query): StrictQuery<PageQuery>,
) -> Result<Response, ApiError> {
    let limit = query
        .checked_limit()
        .map_err(|message| ApiError::bad_request("InvalidQuery", message))?;
    for (name, key) in [("prefix", &query.prefix), ("start", &query.start)] {
        check_key(key)
            .map_err(|e| ApiError::bad_request("InvalidQuery", format!("{name}: {e}")))?;
    }
    let first = query.first_key();
    let read =
        reconnecting(|| store.read_entries(&space, first, limit + 1, MAX_PAGE_BYTES)).await?;
    let (entries, next) = server_api::page(read.entries, &query.prefix, limit);
    let entries = entries
        .into_iter()
        .map(entry)
        .collect::<Result<Vec<_>, _>>()?;
    let page = Page {
        space: space.as_str(),
        version: read.version,
        entries,
        next,
    };
    Ok(Json(page).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyQuery {
    key: String,
}

/// `GET /api/spaces/{space}/entry?key=`: one key's value with the space's version; 404 when
/// the space does not hold it.
pub(super) async fn read_entry(
    State(store): State<Arc<dyn Store>>,
    ApiSpace(space): ApiSpace,
    StrictQuery(KeyQuery { key }): StrictQuery<KeyQuery>,
) -> Result<Response, ApiError> {
    check_key(&key).map_err(|message| ApiError::bad_request("InvalidKey", message))?;
    let read = reconnecting(|| store.read_entries(&space, &key, 1, MAX_PAGE_BYTES)).await?;
    let Some(found) = read.entries.into_iter().find(|(found, _)| *found == key) else {
        return Err(ApiError::Missing {
            error: "NoSuchKey",
            message: format!(
                "space {space} holds no key {key:?} (at version {})",
                read.version
            ),
        });
    };
    let Entry { key, value } = entry(found)?;
    let one = OneEntry {
        space: space.as_str(),
        version: read.version,
        key,
        value,
    };
    Ok(Json(one).into_response())
}

/// `POST /api/spaces/{space}/mutations`: the call's mutations applied as the server, all or
/// nothing, once per idempotency key, and poked; bounded as a push is (body, mutations, time).
pub(super) async fn apply_mutations(
    State(api): State<Arc<ServerApi>>,
    State(pushes): State<Arc<PushGroups>>,
    State(metrics): State<Arc<Metrics>>,
    ApiSpace(space): ApiSpace,
    body: PushBody,
) -> Result<Json<Value>, ApiError> {
    let call = MutationCall::parse(&body.bytes)
        .map_err(|message| ApiError::bad_request("InvalidRequest", message))?;
    let request: PushRequest = api.token()?.push_request(&space, call);
    let outcome = pushes
        .push_all_or_nothing(&space, SERVER_USER.to_owned(), request)
        .await;
    match outcome {
        Ok(PushOutcome::Committed { version, .. }) => {
            metrics.server_api_commits.increment();
            Ok(Json(json!({ "status": "committed", "version": version })))
        }
        Ok(PushOutcome::Replayed | PushOutcome::Unchanged) => {
            metrics.server_api_replays.increment();
            Ok(Json(json!({ "status": "alreadyApplied" })))
        }
        Err(PushError::ClientStateNotFound) => Err(ApiError::Conflict {
            error: "IdempotencyKeyExpired",
            message: "this idempotency key was used longer ago than REPLISYNC_CLIENT_TTL and the \
                      server no longer remembers it; nothing was applied: send the call with a new \
                      key if it must be applied again"
                .to_owned(),
        }),
        Err(error) => Err(error.into()),
    }
}
