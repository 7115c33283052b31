//! Who may read and write a space: identity (a verified token, or the anonymous default),
//! the grants it carries, and the client-group ownership rule that push and pull enforce.

pub mod authorize;
pub mod endpoint;
pub mod jwks;
pub mod jwt;
pub mod settings;

use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::metrics::Timing;
use crate::protocol::{MAX_ID_BYTES, SpaceId};
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
pub fn space_matches(pattern: &str, space: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => space.starts_with(prefix),
        None => pattern == space,
    }
}

/// A verified caller: the user id, what its credentials grant by themselves, and when they
/// stop being valid (a token's `exp`): an SSE stream opened with them ends then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub grants: Grants,
    /// `None`: the credentials do not expire.
    pub expires_at: Option<SystemTime>,
    /// The token's claims, which visibility rules may use (`{claims.team}`); empty without a
    /// token.
    pub claims: Arc<Map<String, Value>>,
}

impl Identity {
    /// A user who may use every space (authorization is left to the authenticator), with
    /// credentials that do not expire.
    pub fn with_full_access(user: impl Into<String>) -> Identity {
        Identity {
            user: user.into(),
            grants: Grants::Everything,
            expires_at: None,
            claims: no_claims(),
        }
    }
}

/// The claims of an identity without a token: one empty map shared by all, so that an
/// anonymous request allocates none.
fn no_claims() -> Arc<Map<String, Value>> {
    static EMPTY: LazyLock<Arc<Map<String, Value>>> = LazyLock::new(Arc::default);
    EMPTY.clone()
}

/// The user id of the server API's calls (the owner of their client groups). No end user's id
/// starts with [`RESERVED_USER_PREFIX`].
pub const SERVER_USER: &str = "replisync:server";
pub const RESERVED_USER_PREFIX: &str = "replisync:";

/// Every user id an authenticator yields is checked here before it is used: it is stored with
/// each client group and compared on every push and pull, so it must be 1 to
/// [`MAX_ID_BYTES`] bytes without control characters (Postgres refuses NUL outright), and not
/// start with `replisync:`, which names the server itself.
pub fn check_user_id(user: &str) -> Result<(), AuthError> {
    let problem = if user.starts_with(RESERVED_USER_PREFIX) {
        format!("starts with {RESERVED_USER_PREFIX:?}, which is the server's own")
    } else if user.is_empty() {
        "is empty".to_owned()
    } else if user.len() > MAX_ID_BYTES {
        format!("is longer than {MAX_ID_BYTES} bytes")
    } else if user.contains('\0') {
        "contains a NUL character".to_owned()
    } else if user.chars().any(char::is_control) {
        "contains a control character".to_owned()
    } else {
        return Ok(());
    };
    Err(AuthError::Unauthorized(format!(
        "the user id of these credentials {problem}; a user id must be 1 to {MAX_ID_BYTES} \
         bytes without control characters, not starting with {RESERVED_USER_PREFIX:?}: have the \
         app issue a token with a valid user id"
    )))
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

    /// Why this authenticator cannot check tokens yet (its keys are not fetched): `/readyz`
    /// answers 503 with it. `None` when ready.
    fn not_ready(&self) -> Option<String> {
        None
    }

    /// Whether its users are people, each held to their own share of the SSE stream caps
    /// (REPLISYNC_SSE_MAX_STREAMS_PER_USER). Not so for the anonymous default, where every
    /// caller is the same user.
    fn users_are_distinct(&self) -> bool {
        true
    }

    /// How long fetches of its provider's keys take, when it fetches any (JWKS).
    fn key_fetch_time(&self) -> Option<Timing> {
        None
    }
}

/// The default: every request is the same anonymous user, whatever its header says, with
/// access to every space. Allowed on loopback addresses only, unless REPLISYNC_ALLOW_ANONYMOUS.
#[derive(Debug)]
pub struct Anonymous;

pub const ANONYMOUS_USER: &str = "anonymous";

#[async_trait]
impl Authenticator for Anonymous {
    async fn authenticate(&self, _authorization: Option<&str>) -> Result<Identity, AuthError> {
        Ok(Identity::with_full_access(ANONYMOUS_USER))
    }

    fn users_are_distinct(&self) -> bool {
        false
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

    #[test]
    fn user_ids_are_bounded_and_free_of_control_characters() {
        assert!(check_user_id("alice@example.com").is_ok());
        assert!(check_user_id("zoë 🙂").is_ok());
        for bad in ["", "al\0ice", "bob\n", "tab\there", "del\u{7f}", "c1\u{85}"] {
            let error = check_user_id(bad).unwrap_err();
            assert!(matches!(error, AuthError::Unauthorized(_)), "{bad:?}");
        }
        let long = "u".repeat(MAX_ID_BYTES + 1);
        assert!(
            check_user_id(&long)
                .unwrap_err()
                .to_string()
                .contains("longer")
        );
        assert!(check_user_id(&long[1..]).is_ok());
    }
}
