//! Pull: answers what changed in a space since the client's cookie, from one snapshot.
//! A first pull is streamed as the database returns it, so a large space is never held whole;
//! incremental pulls share reads with identical concurrent pulls (see `coalesce`).

pub mod coalesce;

use async_stream::try_stream;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::{Stream, TryStreamExt};

use crate::app::{AppState, RequestBody, space_and_user};
use crate::error::ApiError;
use crate::protocol::{ProtocolError, PullRequest, SpaceId, parse_body, parse_cookie};
use crate::push::{check_group_ownership, check_identifier};
use crate::store::{EntryChange, PullSnapshot, StoreError, reconnecting};

/// Patch bytes gathered before a chunk is handed to the connection.
const CHUNK_BYTES: usize = 64 * 1024;

/// `POST /spaces/{space}/pull`
pub async fn handle(
    State(state): State<AppState>,
    Path(raw_space): Path<String>,
    headers: HeaderMap,
    RequestBody(body): RequestBody,
) -> Result<Response, ApiError> {
    let (space, user) = space_and_user(&state, &raw_space, &headers).await?;
    let request: PullRequest = parse_body(&body)?;
    check_identifier(&request.client_group_id, "clientGroupID")?;
    // A cookie replisync never issued (a string, an object, a fraction) cannot be honoured.
    let cookie = parse_cookie(&request.cookie).map_err(|_| ProtocolError::ClientStateNotFound)?;
    let body = match cookie {
        None => first_pull(&state, &space, &user, &request.client_group_id).await?,
        Some(from) => {
            incremental_pull(&state, &space, &user, &request.client_group_id, from).await?
        }
    };
    state.metrics.pulls.increment();
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    Ok((headers, body).into_response())
}

/// A pull with a null cookie: `clear` and the whole space, streamed from one snapshot.
async fn first_pull(
    state: &AppState,
    space: &SpaceId,
    user: &str,
    client_group_id: &str,
) -> Result<Body, ApiError> {
    state.metrics.pull_reads.increment();
    let snapshot = reconnecting(|| state.store.first_pull(space, client_group_id)).await?;
    if let Some(group) = &snapshot.client_group {
        check_group_ownership(group, space, user)?;
    }
    Ok(Body::from_stream(response_chunks(snapshot, true)))
}

/// A pull from a cookie: answered from a read shared with identical concurrent pulls.
async fn incremental_pull(
    state: &AppState,
    space: &SpaceId,
    user: &str,
    client_group_id: &str,
    from: u64,
) -> Result<Body, ApiError> {
    let shared = state.pulls.pull(space, client_group_id, from).await?;
    if let Some(group) = shared.client_group(client_group_id) {
        check_group_ownership(group, space, user)?;
    }
    check_cookie_not_ahead(from, shared.version)?;
    let mut body = response_head(
        shared.version,
        shared.changed_clients(client_group_id),
        false,
    );
    body.extend_from_slice(&shared.patch);
    body.extend_from_slice(b"]}");
    Ok(Body::from(body))
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

fn response_head(version: u64, changed_clients: &[(String, u64)], first_pull: bool) -> Vec<u8> {
    let mut head = format!("{{\"cookie\":{version},\"lastMutationIDChanges\":{{");
    for (index, (client, last_mutation_id)) in changed_clients.iter().enumerate() {
        if index > 0 {
            head.push(',');
        }
        push_json_string(&mut head, client);
        head.push(':');
        head.push_str(&last_mutation_id.to_string());
    }
    head.push_str("},\"patch\":[");
    if first_pull {
        head.push_str(r#"{"op":"clear"}"#);
    }
    head.into_bytes()
}

/// `{"op":"put","key":..,"value":..}` or `{"op":"del","key":..}`; stored values are JSON text
/// already, so they are copied, not parsed.
pub(crate) fn write_patch_op(out: &mut Vec<u8>, entry: &EntryChange) {
    let mut key = String::with_capacity(entry.key.len() + 2);
    push_json_string(&mut key, &entry.key);
    match &entry.value {
        Some(value) => {
            out.extend_from_slice(br#"{"op":"put","key":"#);
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(br#","value":"#);
            out.extend_from_slice(value.as_bytes());
            out.push(b'}');
        }
        None => {
            out.extend_from_slice(br#"{"op":"del","key":"#);
            out.extend_from_slice(key.as_bytes());
            out.push(b'}');
        }
    }
}

fn push_json_string(out: &mut String, text: &str) {
    // Serializing a &str cannot fail.
    out.push_str(&serde_json::to_string(text).unwrap_or_default());
}
