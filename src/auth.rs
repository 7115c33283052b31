//! Identity: turns a request's `Authorization` header into a user id. Client groups belong to
//! the user who created them; push and pull check that ownership with the id found here.

use async_trait::async_trait;

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
