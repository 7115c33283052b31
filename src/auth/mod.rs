//! Who may read and write a space: identity (a verified token, or the anonymous default),
//! the grants it carries, and the client-group ownership rule that push and pull enforce.

pub mod authorize;
pub mod jwks;
pub mod jwt;

use async_trait::async_trait;

use crate::protocol::SpaceId;
use crate::store::ClientGroupRecord;

/// Reading (pull, the SSE stream, private poke channels) or writing (push) a space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// The spaces an identity may use without asking anyone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grants {
    /// Every space, read and write (anonymous mode and custom authenticators).
    Everything,
    /// Space patterns from the token: `doc-42`, or `team-7-*` for every space with that prefix.
    Listed {
        read_write: Vec<String>,
        read_only: Vec<String>,
    },
}

impl Grants {
    /// Whether these grants allow `access` to `space`.
    pub fn allow(&self, space: &SpaceId, access: Access) -> bool {
        match self {
            Grants::Everything => true,
            Grants::Listed {
                read_write,
                read_only,
            } => {
                let matches = |patterns: &[String]| {
                    patterns
                        .iter()
                        .any(|pattern| space_matches(pattern, space.as_str()))
                };
                matches(read_write) || (access == Access::Read && matches(read_only))
            }
        }
    }
}

/// `pattern` names `space` exactly, or ends in `*` and is a prefix of it.
fn space_matches(pattern: &str, space: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => space.starts_with(prefix),
        None => pattern == space,
    }
}

/// A verified caller: the user id and what its credentials grant by themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub grants: Grants,
}

impl Identity {
    /// A user who may use every space (authorization is left to the authenticator).
    pub fn with_full_access(user: impl Into<String>) -> Identity {
        Identity {
            user: user.into(),
            grants: Grants::Everything,
        }
    }
}

/// Why a request was refused: not authenticated, not allowed, or not checkable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, or one that is malformed, expired or badly signed: answered 401, after which
    /// Replicache calls `getAuth` and retries with a fresh token.
    #[error("{0}")]
    Unauthorized(String),
    /// The user may not use this space (or client group): answered 403.
    #[error("{0}")]
    Forbidden(String),
    /// The check could not be made (the identity provider's keys cannot be fetched):
    /// answered 503, never allowed.
    #[error("{0}")]
    Unavailable(String),
}

/// Turns a request's `Authorization` header into an identity.
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, AuthError>;
}

/// The default: every request is the same anonymous user, whatever its header says, with
/// access to every space. Allowed on loopback addresses only, unless REPLISYNC_ALLOW_ANONYMOUS.
pub struct Anonymous;

pub const ANONYMOUS_USER: &str = "anonymous";

#[async_trait]
impl Authenticator for Anonymous {
    async fn authenticate(&self, _authorization: Option<&str>) -> Result<Identity, AuthError> {
        Ok(Identity::with_full_access(ANONYMOUS_USER))
    }
}

/// Rejects a client group used from another space or by another user: a client group belongs
/// to the space and user that created it (push and pull both check).
pub fn check_group_ownership(
    group: &ClientGroupRecord,
    space: &SpaceId,
    user: &str,
) -> Result<(), AuthError> {
    if group.space_id != space.as_str() {
        return Err(AuthError::Forbidden(format!(
            "client group {} belongs to another space ({}); a Replicache client serves one \
             space: give each space its own Replicache `name` (for example `${{userID}}/${{space}}`)",
            group.id, group.space_id
        )));
    }
    if group.user_id != user {
        return Err(AuthError::Forbidden(format!(
            "client group {} belongs to another user; give each user their own Replicache \
             `name` (for example `${{userID}}/${{space}}`)",
            group.id
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(id: &str) -> SpaceId {
        SpaceId::parse(id).unwrap()
    }

    #[test]
    fn listed_grants_match_exact_ids_and_prefixes() {
        let grants = Grants::Listed {
            read_write: vec!["doc-42".into(), "team-7-*".into()],
            read_only: vec!["public-*".into()],
        };
        assert!(grants.allow(&space("doc-42"), Access::Write));
        assert!(!grants.allow(&space("doc-421"), Access::Read));
        assert!(grants.allow(&space("team-7-x"), Access::Write));
        assert!(!grants.allow(&space("team-8-x"), Access::Read));
        assert!(grants.allow(&space("public-a"), Access::Read));
        assert!(!grants.allow(&space("public-a"), Access::Write));
    }
}
