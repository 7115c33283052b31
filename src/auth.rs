//! Identity and ownership: turns a request's `Authorization` header into a user id, and checks
//! that a client group is used only by the user and in the space that created it.

use async_trait::async_trait;

use crate::error::ApiError;
use crate::protocol::SpaceId;
use crate::store::ClientGroupRecord;

/// The seam for real token verification. Return `Err(message)` to answer 401 (Replicache then
/// calls `getAuth` and retries with a fresh token).
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, authorization: Option<&str>) -> Result<String, String>;
}

/// The default: every request is the same anonymous user, whatever its header says.
pub struct Anonymous;

pub const ANONYMOUS_USER: &str = "anonymous";

#[async_trait]
impl Authenticator for Anonymous {
    async fn authenticate(&self, _authorization: Option<&str>) -> Result<String, String> {
        Ok(ANONYMOUS_USER.to_owned())
    }
}

/// Rejects a client group used from another space or by another user: a client group belongs
/// to the space and user that created it (push and pull both check).
pub fn check_group_ownership(
    group: &ClientGroupRecord,
    space: &SpaceId,
    user: &str,
) -> Result<(), ApiError> {
    if group.space_id != space.as_str() {
        return Err(ApiError::Forbidden(format!(
            "client group {} belongs to another space",
            group.id
        )));
    }
    if group.user_id != user {
        return Err(ApiError::Forbidden(format!(
            "client group {} belongs to another user",
            group.id
        )));
    }
    Ok(())
}
