//! The Replicache wire format (pushVersion 1, pullVersion 1) as serde types, field for field,
//! plus the validated `SpaceId` that names a space in URLs, storage and poke channels.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// The only push and pull protocol version replisync speaks.
pub const PROTOCOL_VERSION: u64 = 1;

/// A space: this server's unit of partitioning, authorization and poking.
/// 1 to 100 characters of `A-Z a-z 0-9 _ -`, so it can also name a Pusher channel.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpaceId(String);

pub const MAX_SPACE_ID_LEN: usize = 100;

impl SpaceId {
    pub fn parse(raw: &str) -> Result<SpaceId, String> {
        let well_formed = !raw.is_empty()
            && raw.len() <= MAX_SPACE_ID_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if well_formed {
            Ok(SpaceId(raw.to_owned()))
        } else {
            Err(format!(
                "space id must be 1 to {MAX_SPACE_ID_LEN} characters of A-Z a-z 0-9 _ -"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SpaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The longest client or client group id, in bytes (Replicache's are about 20).
pub const MAX_ID_BYTES: usize = 200;

/// The longest key, in bytes (an index entry must fit a database page).
pub const MAX_KEY_BYTES: usize = 1000;

/// Client and client group ids are stored and indexed: non-empty, bounded, and free of NUL
/// characters. `field` names the id in the error.
pub fn check_identifier(id: &str, field: &str) -> Result<(), BodyError> {
    let problem = if id.is_empty() {
        "is empty".to_owned()
    } else if id.len() > MAX_ID_BYTES {
        format!("is longer than {MAX_ID_BYTES} bytes")
    } else if id.contains('\0') {
        "contains a NUL character".to_owned()
    } else {
        return Ok(());
    };
    Err(BodyError::Invalid(format!("{field} {problem}")))
}

/// Keys are stored and indexed: bounded and free of NUL characters.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "key is {} bytes long; the limit is {MAX_KEY_BYTES}",
            key.len()
        ));
    }
    if key.contains('\0') {
        return Err("key contains a NUL character".into());
    }
    Ok(())
}

/// `POST /spaces/{space}/push` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushRequest {
    pub push_version: u64,
    #[serde(default)]
    pub schema_version: String,
    #[serde(default, rename = "profileID")]
    pub profile_id: String,
    #[serde(rename = "clientGroupID")]
    pub client_group_id: String,
    pub mutations: Vec<Mutation>,
}

impl PushRequest {
    /// Checks what serde cannot: ids that fit the database and non-empty identifiers.
    pub fn validate(&self) -> Result<(), BodyError> {
        check_identifier(&self.client_group_id, "clientGroupID")?;
        for (index, mutation) in self.mutations.iter().enumerate() {
            check_identifier(&mutation.client_id, &format!("mutations[{index}].clientID"))?;
            if mutation.id > i64::MAX as u64 {
                return Err(BodyError::Invalid(format!(
                    "mutations[{index}].id is larger than {}",
                    i64::MAX
                )));
            }
        }
        Ok(())
    }
}

/// One pending mutation of one client, as the client recorded it.
#[derive(Debug, Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
pub struct Mutation {
    pub id: u64,
    pub name: String,
    /// The arguments as they arrived (checked to be JSON), parsed only when the mutation is
    /// applied: a push of 40,000 mutations holds 40,000 strings, not 40,000 JSON trees.
    #[serde(default = "null_args")]
    pub args: Box<RawValue>,
    /// The client's `performance.now()`; not used by the protocol.
    #[serde(default)]
    pub timestamp: f64,
    #[serde(rename = "clientID")]
    pub client_id: String,
}

fn null_args() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
}

/// `POST /spaces/{space}/pull` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PullRequest {
    pub pull_version: u64,
    #[serde(default)]
    pub schema_version: String,
    #[serde(default, rename = "profileID")]
    pub profile_id: String,
    #[serde(rename = "clientGroupID")]
    pub client_group_id: String,
    /// `null` on a first pull; otherwise whatever this server last answered.
    pub cookie: Value,
}

/// Just enough of any body to tell which protocol version it speaks; used to answer
/// `VersionNotSupported` to legacy (version 0) bodies that fail to parse as version 1.
#[derive(Debug, Deserialize)]
pub struct VersionProbe {
    #[serde(rename = "pushVersion")]
    pub push_version: Option<Value>,
    #[serde(rename = "pullVersion")]
    pub pull_version: Option<Value>,
}

/// The error bodies Replicache understands; sent with status 200.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "error")]
pub enum ProtocolError {
    ClientStateNotFound,
    VersionNotSupported {
        #[serde(rename = "versionType")]
        version_type: VersionType,
    },
}

#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum VersionType {
    Push,
    Pull,
    Schema,
}

/// The client `schemaVersion`s a server accepts (REPLISYNC_SCHEMA_VERSIONS): any (the default),
/// or only those listed. A push or pull with another one is answered `VersionNotSupported`
/// with `versionType: "schema"`, on which Replicache calls `onUpdateNeeded` (by default, the
/// page reloads and gets the new client).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaVersions(Option<Vec<String>>);

impl SchemaVersions {
    /// Every schemaVersion.
    pub fn any() -> SchemaVersions {
        SchemaVersions(None)
    }

    /// Only these.
    pub fn only(versions: impl IntoIterator<Item = impl Into<String>>) -> SchemaVersions {
        SchemaVersions(Some(versions.into_iter().map(Into::into).collect()))
    }

    /// A comma-separated list (`2,3`); blank accepts every schemaVersion, and `""` stands for
    /// the empty one (a client that sets none).
    pub fn parse(list: &str) -> SchemaVersions {
        if list.trim().is_empty() {
            return SchemaVersions::any();
        }
        SchemaVersions::only(list.split(',').map(|item| match item.trim() {
            "\"\"" => "",
            version => version,
        }))
    }

    /// Whether a request of `schema_version` may be served.
    pub fn check(&self, schema_version: &str) -> Result<(), ProtocolError> {
        match &self.0 {
            Some(accepted) if !accepted.iter().any(|v| v == schema_version) => {
                Err(ProtocolError::VersionNotSupported {
                    version_type: VersionType::Schema,
                })
            }
            _ => Ok(()),
        }
    }

    /// The accepted versions, for the start-up log (`None`: any).
    pub fn listed(&self) -> Option<&[String]> {
        self.0.as_deref()
    }
}

/// A request body that names its protocol version.
pub trait Versioned: serde::de::DeserializeOwned {
    const VERSION_TYPE: VersionType;
    fn version(&self) -> u64;
}

impl Versioned for PushRequest {
    const VERSION_TYPE: VersionType = VersionType::Push;
    fn version(&self) -> u64 {
        self.push_version
    }
}

impl Versioned for PullRequest {
    const VERSION_TYPE: VersionType = VersionType::Pull;
    fn version(&self) -> u64 {
        self.pull_version
    }
}

/// Why a body could not be taken as a version-1 request.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// A well-formed request of another protocol version (legacy clients send version 0).
    UnsupportedVersion(VersionType),
    /// Not JSON, or not the shape of a request; the message names the field at fault.
    Invalid(String),
}

/// Parses a push or pull body, answering `UnsupportedVersion` for any version but 1, even
/// when the rest of the body has an older shape.
pub fn parse_body<T: Versioned>(body: &[u8]) -> Result<T, BodyError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = serde_path_to_error::deserialize::<_, T>(&mut deserializer)
        .map_err(|e| e.to_string())
        .and_then(|request| {
            deserializer
                .end()
                .map(|()| request)
                .map_err(|e| e.to_string())
        });
    match parsed {
        Ok(request) if request.version() == PROTOCOL_VERSION => Ok(request),
        Ok(_) => Err(BodyError::UnsupportedVersion(T::VERSION_TYPE)),
        Err(message) => match claimed_version(body, T::VERSION_TYPE) {
            Some(Value::Number(version)) if version.as_u64() != Some(PROTOCOL_VERSION) => {
                Err(BodyError::UnsupportedVersion(T::VERSION_TYPE))
            }
            _ => Err(BodyError::Invalid(message)),
        },
    }
}

fn claimed_version(body: &[u8], version_type: VersionType) -> Option<Value> {
    let probe: VersionProbe = serde_json::from_slice(body).ok()?;
    match version_type {
        VersionType::Push => probe.push_version,
        VersionType::Pull => probe.pull_version,
        VersionType::Schema => None,
    }
}

/// A pull cookie replisync issued: the space's version (a space without rules), or an object
/// whose `order` the client compares and whose `rules` is the fingerprint of what the caller
/// could read (`{"order": 12289, "rules": "3f9a…"}`, see `pull::cookie`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cookie {
    Version(u64),
    Ordered { order: u64, rules: String },
}

/// Highest `order` an object cookie may carry: JavaScript numbers are exact below 2^53.
pub const MAX_COOKIE_ORDER: u64 = (1 << 53) - 1;

/// Longest `rules` fingerprint an object cookie may carry.
pub const MAX_COOKIE_RULES_BYTES: usize = 64;

/// Parses a pull cookie this server can honour: null (a first pull), a space version (a
/// non-negative integer that fits the database's BIGINT: a larger one would fail the query), or
/// `{"order": n, "rules": "…"}` with an integer order below 2^53 and a fingerprint of ASCII
/// letters and digits. Anything else was not issued by replisync.
pub fn parse_cookie(cookie: &Value) -> Result<Option<Cookie>, ForeignCookie> {
    match cookie {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_i64()
            .and_then(|version| u64::try_from(version).ok())
            .map(|version| Some(Cookie::Version(version)))
            .ok_or(ForeignCookie),
        Value::Object(fields) if fields.len() == 2 => {
            let order = fields.get("order").and_then(Value::as_u64);
            let rules = fields.get("rules").and_then(Value::as_str);
            match (order, rules) {
                (Some(order), Some(rules))
                    if order <= MAX_COOKIE_ORDER
                        && !rules.is_empty()
                        && rules.len() <= MAX_COOKIE_RULES_BYTES
                        && rules.bytes().all(|b| b.is_ascii_alphanumeric()) =>
                {
                    Ok(Some(Cookie::Ordered {
                        order,
                        rules: rules.to_owned(),
                    }))
                }
                _ => Err(ForeignCookie),
            }
        }
        _ => Err(ForeignCookie),
    }
}

/// A cookie this server did not issue.
#[derive(Debug, PartialEq, Eq)]
pub struct ForeignCookie;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schema_versions_accept_what_they_list() {
        assert_eq!(SchemaVersions::parse(" "), SchemaVersions::any());
        assert!(SchemaVersions::any().check("anything").is_ok());
        let two_three = SchemaVersions::parse("2, 3");
        assert!(two_three.check("2").is_ok() && two_three.check("3").is_ok());
        let refused = ProtocolError::VersionNotSupported {
            version_type: VersionType::Schema,
        };
        assert_eq!(two_three.check("1"), Err(refused));
        assert!(two_three.check("").is_err());
        let with_empty = SchemaVersions::parse("\"\",2");
        assert!(with_empty.check("").is_ok() && with_empty.check("2").is_ok());
    }

    #[test]
    fn space_ids_follow_the_channel_alphabet() {
        assert!(SpaceId::parse("doc-1_A").is_ok());
        assert!(SpaceId::parse(&"a".repeat(100)).is_ok());
        for bad in ["", "a b", "a:b", "é", "a/b", &"a".repeat(101)] {
            assert!(SpaceId::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn bodies_of_other_versions_are_unsupported_not_invalid() {
        let legacy = br#"{"pushVersion":0,"clientID":"c","mutations":[]}"#;
        assert_eq!(
            parse_body::<PushRequest>(legacy).unwrap_err(),
            BodyError::UnsupportedVersion(VersionType::Push)
        );
        let future = br#"{"pullVersion":2,"clientGroupID":"g","cookie":null}"#;
        assert_eq!(
            parse_body::<PullRequest>(future).unwrap_err(),
            BodyError::UnsupportedVersion(VersionType::Pull)
        );
    }

    #[test]
    fn invalid_bodies_name_the_field_at_fault() {
        let body = br#"{"pushVersion":1,"clientGroupID":"g","mutations":[{"id":"x","name":"set","clientID":"c"}]}"#;
        match parse_body::<PushRequest>(body).unwrap_err() {
            BodyError::Invalid(message) => {
                assert!(message.contains("mutations[0].id"), "{message}")
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        let trailing = br#"{"pullVersion":1,"clientGroupID":"g","cookie":null} x"#;
        assert!(matches!(
            parse_body::<PullRequest>(trailing),
            Err(BodyError::Invalid(_))
        ));
    }

    #[test]
    fn cookies_are_null_or_versions() {
        assert_eq!(parse_cookie(&json!(null)), Ok(None));
        assert_eq!(parse_cookie(&json!(7)), Ok(Some(Cookie::Version(7))));
        assert_eq!(
            parse_cookie(&json!(i64::MAX)),
            Ok(Some(Cookie::Version(i64::MAX as u64)))
        );
        assert_eq!(
            parse_cookie(&json!({"order": 7169, "rules": "ab12"})),
            Ok(Some(Cookie::Ordered {
                order: 7169,
                rules: "ab12".into()
            }))
        );
        let beyond_bigint = [json!(i64::MAX as u64 + 1), json!(u64::MAX)];
        let odd_objects = [
            json!({"order": 3}),
            json!({"order": 3, "rules": "ab", "x": 1}),
            json!({"order": -3, "rules": "ab"}),
            json!({"order": 1u64 << 53, "rules": "ab"}),
            json!({"order": 3, "rules": ""}),
            json!({"order": 3, "rules": "a/b"}),
            json!({"order": 3, "rules": "a".repeat(65)}),
            json!({"order": 3.5, "rules": "ab"}),
        ];
        for bad in [json!(-1), json!(1.5), json!("3"), json!([3])]
            .into_iter()
            .chain(beyond_bigint)
            .chain(odd_objects)
        {
            assert!(parse_cookie(&bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn protocol_errors_serialize_as_replicache_expects() {
        assert_eq!(
            serde_json::to_value(ProtocolError::ClientStateNotFound).unwrap(),
            json!({"error": "ClientStateNotFound"})
        );
        assert_eq!(
            serde_json::to_value(ProtocolError::VersionNotSupported {
                version_type: VersionType::Pull
            })
            .unwrap(),
            json!({"error": "VersionNotSupported", "versionType": "pull"})
        );
    }
}
