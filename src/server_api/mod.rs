//! The server API: what a trusted backend (a webhook handler, a nightly job) may do besides
//! push and pull: read a space, and apply named mutators as the server, exactly once per
//! idempotency key, poked like any push. Its HTTP edge is `http::server_api`.
//!
//! A call's mutations go through the push service as a push of the server's own client group,
//! applied all or nothing: that group (one per space and idempotency key, its id an HMAC of
//! both under the service token, so no end user can name it) remembers the call as a client
//! remembers its mutations, so a retried call is recognized and applied once.

pub mod settings;

use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;

use crate::protocol::{Mutation, PushRequest, SpaceId};

pub use crate::auth::SERVER_USER;

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// Most entries one page of a read answers, and the default.
pub const MAX_PAGE_ENTRIES: usize = 1000;
pub const DEFAULT_PAGE_ENTRIES: usize = 100;

/// A page stops after the entry that takes it past this many bytes of keys and values.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

type HmacSha256 = Hmac<Sha256>;

/// The service token: kept only as a key, never shown.
#[derive(Clone)]
pub struct ServiceToken {
    token: Vec<u8>,
    /// The token's own check tag, computed once: each request computes only its own.
    check_tag: Vec<u8>,
}

impl ServiceToken {
    pub fn new(token: &str) -> ServiceToken {
        let mut service = ServiceToken {
            token: token.as_bytes().to_vec(),
            check_tag: Vec::new(),
        };
        service.check_tag = service
            .check_mac(token.as_bytes())
            .finalize()
            .into_bytes()
            .to_vec();
        service
    }

    /// Whether `presented` is the token, compared in constant time (as HMAC tags under a key
    /// of the token's own, so that neither length nor content leaks through timing).
    fn matches(&self, presented: &str) -> bool {
        self.check_mac(presented.as_bytes())
            .verify_slice(&self.check_tag)
            .is_ok()
    }

    /// The check tag's HMAC, fed `bytes`.
    fn check_mac(&self, bytes: &[u8]) -> HmacSha256 {
        let mut mac = self.mac(b"replisync service token check");
        mac.update(bytes);
        mac
    }

    fn mac(&self, purpose: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.token).expect("HMAC takes any key");
        mac.update(purpose);
        mac
    }
}

impl std::fmt::Debug for ServiceToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceToken(<secret>)")
    }
}

/// The server API: on with a service token, off without.
#[derive(Debug, Clone)]
pub struct ServerApi {
    token: Option<ServiceToken>,
}

/// Why a call to the server API is refused before it does anything.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServiceAuthError {
    #[error(
        "the server API is off; set REPLISYNC_SERVICE_TOKEN to turn it on (docs/server-api.md)"
    )]
    Off,
    #[error(
        "the server API takes `Authorization: Bearer <REPLISYNC_SERVICE_TOKEN>`; this request has no such token (an end user's token is never accepted)"
    )]
    NotTheServiceToken,
}

impl ServerApi {
    pub fn off() -> ServerApi {
        ServerApi { token: None }
    }

    pub fn with_token(token: ServiceToken) -> ServerApi {
        ServerApi { token: Some(token) }
    }

    pub fn is_on(&self) -> bool {
        self.token.is_some()
    }

    /// The token of an API that is on (its routes are only reached then).
    pub fn token(&self) -> Result<&ServiceToken, ServiceAuthError> {
        self.token.as_ref().ok_or(ServiceAuthError::Off)
    }

    /// Checks the request's `Authorization` header; the token it proved.
    pub fn check(&self, authorization: Option<&str>) -> Result<&ServiceToken, ServiceAuthError> {
        let token = self.token.as_ref().ok_or(ServiceAuthError::Off)?;
        let presented = authorization
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .ok_or(ServiceAuthError::NotTheServiceToken)?;
        if token.matches(presented.trim()) {
            Ok(token)
        } else {
            Err(ServiceAuthError::NotTheServiceToken)
        }
    }
}

impl ServiceToken {
    /// The push that applies `call` to `space`: one client of a group of its own, named by an
    /// HMAC of the space and the idempotency key under the service token.
    pub fn push_request(&self, space: &SpaceId, call: MutationCall) -> PushRequest {
        let mut mac = self.mac(b"replisync idempotency key");
        mac.update(space.as_str().as_bytes());
        mac.update(&[0]);
        mac.update(call.idempotency_key.as_bytes());
        let digest = mac.finalize().into_bytes();
        let client = format!("replisync-server-{}", hex(&digest[..16]));
        let mutations = call
            .mutations
            .into_iter()
            .zip(1..)
            .map(|(mutation, id)| Mutation {
                id,
                name: mutation.name,
                args: mutation.args,
                timestamp: 0.0,
                client_id: client.clone(),
            })
            .collect();
        PushRequest {
            push_version: 1,
            schema_version: String::new(),
            profile_id: SERVER_USER.to_owned(),
            client_group_id: client,
            mutations,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /api/spaces/{space}/mutations`: named mutators with their arguments, applied in order
/// in one transaction, once per idempotency key.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutationCall {
    pub idempotency_key: String,
    pub mutations: Vec<CalledMutation>,
}

/// One mutation of a call: a mutator's name and its arguments (any JSON; `null` when absent).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalledMutation {
    pub name: String,
    #[serde(default = "null_args")]
    pub args: Box<RawValue>,
}

fn null_args() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
}

impl MutationCall {
    /// The call in `body`, checked; the error names the field at fault.
    pub fn parse(body: &[u8]) -> Result<MutationCall, String> {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let call: MutationCall =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|e| e.to_string())?;
        deserializer.end().map_err(|e| e.to_string())?;
        call.validate()?;
        Ok(call)
    }

    /// Checks what serde cannot: an idempotency key of 1 to 256 bytes without NUL, and at
    /// least one mutation.
    pub fn validate(&self) -> Result<(), String> {
        let key = &self.idempotency_key;
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES || key.contains('\0') {
            return Err(format!(
                "idempotencyKey must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes without NUL: one \
                 key per change your backend makes (an event id, a job run id)"
            ));
        }
        if self.mutations.is_empty() {
            return Err("mutations is empty: a call applies at least one mutation".to_owned());
        }
        Ok(())
    }
}

/// What a page read asks for: keys starting with `prefix`, from `start` on, at most `limit`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub start: String,
    pub limit: Option<usize>,
}

impl PageQuery {
    /// The entries to ask the store for (one more than the page, to know whether another
    /// follows), or why the query is refused.
    pub fn checked_limit(&self) -> Result<usize, String> {
        match self.limit {
            None => Ok(DEFAULT_PAGE_ENTRIES),
            Some(limit) if (1..=MAX_PAGE_ENTRIES).contains(&limit) => Ok(limit),
            Some(_) => Err(format!("limit must be 1 to {MAX_PAGE_ENTRIES}")),
        }
    }

    /// The first key the page may hold: `start`, or `prefix` when `start` sorts before it.
    pub fn first_key(&self) -> &str {
        if self.start.as_str() < self.prefix.as_str() {
            &self.prefix
        } else {
            &self.start
        }
    }
}

/// A page of entries: those of `entries` (read from the page's first key on, one more than
/// `limit` if there are) that start with `prefix`, at most `limit` of them and about
/// [`MAX_PAGE_BYTES`]; `next` is the key the next page starts from, `None` after the last.
pub fn page(
    entries: Vec<(String, String)>,
    prefix: &str,
    limit: usize,
) -> (Vec<(String, String)>, Option<String>) {
    let mut page = Vec::new();
    let mut bytes = 0;
    for (key, value) in entries {
        if !key.starts_with(prefix) {
            return (page, None);
        }
        if page.len() == limit || bytes >= MAX_PAGE_BYTES {
            return (page, Some(key));
        }
        bytes += key.len() + value.len();
        page.push((key, value));
    }
    (page, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> ServerApi {
        ServerApi::with_token(ServiceToken::new("0123456789abcdef0123456789abcdef"))
    }

    fn token() -> ServiceToken {
        ServiceToken::new("0123456789abcdef0123456789abcdef")
    }

    #[test]
    fn only_the_service_token_passes() {
        let api = api();
        for scheme in ["Bearer", "bearer", "BEARER"] {
            let header = format!("{scheme} 0123456789abcdef0123456789abcdef");
            assert!(api.check(Some(&header)).is_ok(), "{header}");
        }
        for wrong in [
            None,
            Some(""),
            Some("Bearer "),
            Some("0123456789abcdef0123456789abcdef"),
            Some("Bearer 0123456789abcdef0123456789abcde"),
            Some("Bearer 0123456789abcdef0123456789abcdef0"),
            Some("Basic 0123456789abcdef0123456789abcdef"),
            Some("Bearer0123456789abcdef0123456789abcdef"),
        ] {
            assert_eq!(
                api.check(wrong).unwrap_err(),
                ServiceAuthError::NotTheServiceToken,
                "{wrong:?}"
            );
        }
        assert_eq!(
            ServerApi::off().check(None).unwrap_err(),
            ServiceAuthError::Off
        );
    }

    fn call(key: &str) -> MutationCall {
        serde_json::from_str(&format!(
            r#"{{"idempotencyKey":"{key}","mutations":[{{"name":"set","args":{{"key":"a","value":1}}}},{{"name":"delete"}}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_call_is_one_new_client_numbered_from_one() {
        let space = SpaceId::parse("doc").unwrap();
        let request = token().push_request(&space, call("evt-1"));
        assert_eq!(
            request.client_group_id.len(),
            "replisync-server-".len() + 32
        );
        let ids: Vec<(u64, &str)> = request
            .mutations
            .iter()
            .map(|m| (m.id, m.client_id.as_str()))
            .collect();
        let client = request.client_group_id.as_str();
        assert_eq!(ids, vec![(1, client), (2, client)]);
        assert_eq!(request.mutations[1].args.get(), "null");
    }

    #[test]
    fn the_client_depends_on_space_key_and_token() {
        let doc = SpaceId::parse("doc").unwrap();
        let other = SpaceId::parse("other").unwrap();
        let id = |token: &ServiceToken, space: &SpaceId, key: &str| {
            token.push_request(space, call(key)).client_group_id
        };
        let token = token();
        assert_eq!(id(&token, &doc, "evt-1"), id(&token, &doc, "evt-1"));
        assert_ne!(id(&token, &doc, "evt-1"), id(&token, &doc, "evt-2"));
        assert_ne!(id(&token, &doc, "evt-1"), id(&token, &other, "evt-1"));
        let rotated = ServiceToken::new("fedcba9876543210fedcba9876543210");
        assert_ne!(id(&token, &doc, "evt-1"), id(&rotated, &doc, "evt-1"));
    }

    #[test]
    fn calls_are_checked() {
        assert!(call("evt").validate().is_ok());
        assert!(call("").validate().unwrap_err().contains("idempotencyKey"));
        let long = "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1);
        assert!(call(&long).validate().is_err());
        let empty: MutationCall =
            serde_json::from_str(r#"{"idempotencyKey":"k","mutations":[]}"#).unwrap();
        assert!(empty.validate().unwrap_err().contains("empty"));
        let unknown = serde_json::from_str::<MutationCall>(
            r#"{"idempotencyKey":"k","mutations":[],"extra":1}"#,
        );
        assert!(unknown.is_err());
    }

    #[test]
    fn pages_stop_at_the_limit_and_at_the_prefix() {
        let entries = |keys: &[&str]| -> Vec<(String, String)> {
            keys.iter()
                .map(|k| ((*k).to_owned(), "1".to_owned()))
                .collect()
        };
        let (page1, next) = page(entries(&["a/1", "a/2", "a/3"]), "a/", 2);
        assert_eq!(page1.len(), 2);
        assert_eq!(next.as_deref(), Some("a/3"));
        let (last, next) = page(entries(&["a/3", "b/1"]), "a/", 2);
        assert_eq!(last, entries(&["a/3"]));
        assert_eq!(next, None);
        let query = PageQuery {
            prefix: "m".into(),
            start: "a".into(),
            limit: Some(0),
        };
        assert_eq!(query.first_key(), "m");
        assert!(query.checked_limit().is_err());
    }
}
