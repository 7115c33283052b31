//! Layer 1: the pure parsers of client input, called directly. None may panic, and each
//! accepts exactly what it documents.

use jsonwebtoken::DecodingKey;
use proptest::prelude::*;
use proptest::sample::select;
use replisync::auth::jwt::{ClaimRules, JwtAuthenticator, Keys};
use replisync::auth::{AuthError, Authenticator, Identity};
use replisync::poke::pusher::{
    PrivateChannels, PusherArgs, PusherConfig, channel_auth_signature, is_socket_id,
};
use replisync::protocol::{
    BodyError, Cookie, MAX_COOKIE_ORDER, MAX_COOKIE_RULES_BYTES, MAX_ID_BYTES, MAX_KEY_BYTES,
    MAX_SPACE_ID_LEN, PullRequest, PushRequest, SpaceId, check_identifier, check_key, parse_body,
    parse_cookie,
};
use serde_json::{Map, Value};

use crate::fuzz;
use crate::generate::{
    SECRET, any_bytes, any_json, authorization, claims_bytes, field_name, good_claims, matching,
    odd_number, odd_string, pull_body, push_body, token_of,
};

const ISSUER: &str = "https://issuer.fuzz/";
const AUDIENCE: &str = "replisync-fuzz";

/// Whether `id` is what `check_identifier` documents: 1 to 200 bytes, no NUL.
fn is_identifier(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && !id.contains('\0')
}

fn is_invalid_with_a_message<T>(result: &Result<T, BodyError>) -> bool {
    match result {
        Err(BodyError::Invalid(message)) => !message.is_empty(),
        _ => true,
    }
}

#[test]
fn push_bodies_parse_or_name_the_problem() {
    fuzz("parse push bodies", 2000, push_body, |body| {
        let parsed = parse_body::<PushRequest>(&body.0);
        prop_assert!(is_invalid_with_a_message(&parsed), "{parsed:?}");
        if let Ok(push) = parsed {
            prop_assert_eq!(push.push_version, 1);
            if push.validate().is_ok() {
                prop_assert!(is_identifier(&push.client_group_id));
                for mutation in &push.mutations {
                    prop_assert!(is_identifier(&mutation.client_id));
                    prop_assert!(mutation.id <= i64::MAX as u64);
                    // Arguments are kept raw, checked as serde_json skips a value: nesting
                    // deeper than it parses, lone surrogates (`"\ud800"`) and numbers out of
                    // range (`1e400`) get in, and fail their mutation (InvalidArgs) when a
                    // built-in mutator is given them.
                    if let Err(error) = serde_json::from_str::<Value>(mutation.args.get()) {
                        let message = error.to_string();
                        let skipped_only =
                            ["recursion limit", "surrogate", "hex escape", "out of range"]
                                .iter()
                                .any(|cause| message.contains(cause));
                        prop_assert!(skipped_only, "{message}");
                    }
                }
            }
        }
        // A push body sent to pull must not upset the pull parser either.
        let _ = parse_body::<PullRequest>(&body.0);
        Ok(())
    });
}

#[test]
fn pull_bodies_parse_or_name_the_problem() {
    fuzz("parse pull bodies", 2000, pull_body, |body| {
        let parsed = parse_body::<PullRequest>(&body.0);
        prop_assert!(is_invalid_with_a_message(&parsed), "{parsed:?}");
        if let Ok(pull) = parsed {
            prop_assert_eq!(pull.pull_version, 1);
            let _ = check_identifier(&pull.client_group_id, "clientGroupID");
            let _ = parse_cookie(&pull.cookie);
        }
        let _ = parse_body::<PushRequest>(&body.0);
        Ok(())
    });
}

#[test]
fn cookies_are_null_or_versions_that_fit_a_bigint() {
    // Objects shaped like replisync's own cookies, with odd orders and fingerprints.
    let cookies = || {
        let ordered =
            (odd_number(), odd_string(), any::<bool>()).prop_map(|(order, rules, extra)| {
                let mut cookie = serde_json::json!({ "order": order, "rules": rules });
                if extra {
                    cookie["x"] = Value::Null;
                }
                cookie
            });
        prop_oneof![any_json(), ordered]
    };
    fuzz("parse cookies", 2000, cookies, |cookie| {
        match parse_cookie(&cookie) {
            Ok(None) => prop_assert!(cookie.is_null()),
            Ok(Some(Cookie::Ordered { order, rules })) => {
                prop_assert!(
                    order <= MAX_COOKIE_ORDER,
                    "{order} is not exact in JavaScript"
                );
                prop_assert_eq!(cookie["order"].as_u64(), Some(order));
                prop_assert_eq!(cookie["rules"].as_str(), Some(rules.as_str()));
                prop_assert!(!rules.is_empty() && rules.bytes().all(|b| b.is_ascii_alphanumeric()));
            }
            Ok(Some(Cookie::Version(version))) => {
                prop_assert_eq!(cookie.as_u64(), Some(version));
                prop_assert!(
                    version <= i64::MAX as u64,
                    "{version} does not fit a BIGINT"
                );
            }
            Err(_) => {
                let version = cookie.as_u64().filter(|&v| v <= i64::MAX as u64);
                prop_assert!(!cookie.is_null() && version.is_none(), "{cookie} refused");
                if let Some(fields) = cookie.as_object() {
                    let order = fields.get("order").and_then(|o| o.as_u64());
                    let rules = fields.get("rules").and_then(|r| r.as_str());
                    let plausible = fields.len() == 2
                        && order.is_some_and(|o| o <= MAX_COOKIE_ORDER)
                        && rules.is_some_and(|r| {
                            !r.is_empty()
                                && r.len() <= MAX_COOKIE_RULES_BYTES
                                && r.bytes().all(|b| b.is_ascii_alphanumeric())
                        });
                    prop_assert!(!plausible, "{cookie} refused");
                }
            }
        }
        Ok(())
    });
}

#[test]
fn space_ids_are_exactly_the_channel_alphabet() {
    let candidates = || prop_oneof![matching("[a-zA-Z0-9_-]{0,102}"), odd_string()];
    fuzz("parse space ids", 2000, candidates, |raw| {
        let well_formed = (1..=MAX_SPACE_ID_LEN).contains(&raw.len())
            && raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        match SpaceId::parse(&raw) {
            Ok(space) => {
                prop_assert!(well_formed, "{raw:?} accepted");
                prop_assert_eq!(space.to_string(), raw);
            }
            Err(message) => prop_assert!(!well_formed && !message.is_empty(), "{raw:?}"),
        }
        Ok(())
    });
}

#[test]
fn identifiers_and_keys_are_checked_as_documented() {
    fuzz("check ids and keys", 2000, odd_string, |text| {
        prop_assert_eq!(check_identifier(&text, "id").is_ok(), is_identifier(&text));
        let key_ok = text.len() <= MAX_KEY_BYTES && !text.contains('\0');
        prop_assert_eq!(check_key(&text).is_ok(), key_ok);
        Ok(())
    });
}

/// Authenticators with the fuzzed secret: default rules, and rules naming issuer and audience.
fn authenticators() -> [(JwtAuthenticator, ClaimRules); 2] {
    let strict = ClaimRules {
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        ..ClaimRules::default()
    };
    [ClaimRules::default(), strict].map(|rules| {
        let keys = Keys::Secret(DecodingKey::from_secret(SECRET.as_bytes()));
        (JwtAuthenticator::new(keys, rules.clone()), rules)
    })
}

fn authenticate(
    authenticator: &JwtAuthenticator,
    authorization: &str,
) -> Result<Identity, AuthError> {
    // Verifying with a secret never waits on anything.
    futures::executor::block_on(authenticator.authenticate(Some(authorization)))
}

/// Refused as a client's mistake (401) with a message: never a 403 or 503 for a token alone.
fn is_unauthorized<T>(result: &Result<T, AuthError>) -> bool {
    match result {
        Ok(_) => true,
        Err(AuthError::Unauthorized(message)) => !message.is_empty(),
        Err(_) => false,
    }
}

#[test]
fn any_authorization_header_is_an_identity_or_a_401() {
    let authenticators = authenticators();
    fuzz(
        "verify Authorization headers",
        1000,
        authorization,
        |header| {
            for (authenticator, _) in &authenticators {
                let result = authenticate(authenticator, &header);
                prop_assert!(is_unauthorized(&result), "{result:?}");
                if let Ok(identity) = result {
                    // Stored as client groups' owner: the rules of client ids hold.
                    prop_assert!(is_identifier(&identity.user), "{:?}", identity.user);
                }
            }
            Ok(())
        },
    );
}

/// What a verified token's claims must hold for the identity to be granted: the user from the
/// user claim, an expiry, and the issuer and audience when the rules name them.
fn check_accepted_claims(
    claims: &[u8],
    identity: &Identity,
    rules: &ClaimRules,
) -> Result<(), TestCaseError> {
    let claims: Map<String, Value> = serde_json::from_slice(claims)
        .map_err(|e| TestCaseError::fail(format!("accepted claims that are not an object: {e}")))?;
    prop_assert_eq!(
        claims.get("sub").and_then(Value::as_str),
        Some(identity.user.as_str())
    );
    prop_assert!(
        claims.get("exp").is_some_and(Value::is_number),
        "no numeric exp"
    );
    prop_assert!(is_identifier(&identity.user), "{:?}", identity.user);
    if rules.issuer.is_some() {
        prop_assert_eq!(claims.get("iss").and_then(Value::as_str), Some(ISSUER));
    }
    if rules.audience.is_some() {
        let audience = claims.get("aud");
        let names_audience = audience.and_then(Value::as_str) == Some(AUDIENCE)
            || audience
                .and_then(Value::as_array)
                .is_some_and(|names| names.iter().any(|name| name == AUDIENCE));
        prop_assert!(
            names_audience,
            "accepted without the audience: {audience:?}"
        );
    }
    Ok(())
}

#[test]
fn signed_tokens_with_odd_claims_grant_only_what_they_say() {
    let authenticators = authenticators();
    let header = || {
        select(vec!["HS256", "HS384", "HS512"])
            .prop_map(|alg| format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#))
    };
    fuzz(
        "verify odd claims",
        500,
        || (header(), claims_bytes()),
        |(header, claims)| {
            let token = token_of(header.as_bytes(), &claims.0, SECRET);
            for (authenticator, rules) in &authenticators {
                let result = authenticate(authenticator, &format!("Bearer {token}"));
                prop_assert!(is_unauthorized(&result), "{result:?}");
                if let Ok(identity) = result {
                    check_accepted_claims(&claims.0, &identity, rules)?;
                }
            }
            Ok(())
        },
    );
}

#[test]
fn good_claims_with_unknown_extra_claims_are_accepted() {
    let (authenticator, _) = &authenticators()[0];
    let extras = || prop::collection::vec((field_name(), any_json()), 0..4);
    fuzz("extra claims", 500, extras, |extras| {
        let mut claims = good_claims();
        let reserved = [
            "sub",
            "exp",
            "nbf",
            "iat",
            "iss",
            "aud",
            "spaces",
            "spaces_read",
        ];
        for (name, value) in extras {
            if !reserved.contains(&name.as_str()) {
                claims[name] = value;
            }
        }
        let token = token_of(br#"{"alg":"HS256"}"#, claims.to_string().as_bytes(), SECRET);
        let identity = authenticate(authenticator, &token);
        prop_assert_eq!(identity.map(|i| i.user), Ok("fuzzer".to_owned()));
        Ok(())
    });
}

#[test]
fn tokens_signed_with_another_secret_are_refused() {
    let (authenticator, _) = &authenticators()[0];
    fuzz("wrong secret", 500, any_bytes, |extra| {
        let mut claims = good_claims();
        claims["extra"] = Value::from(String::from_utf8_lossy(&extra).into_owned());
        let token = token_of(
            br#"{"alg":"HS256"}"#,
            claims.to_string().as_bytes(),
            "not-the-secret",
        );
        let result = authenticate(authenticator, &token);
        prop_assert!(
            matches!(result, Err(AuthError::Unauthorized(_))),
            "{result:?}"
        );
        Ok(())
    });
}

fn private_channels() -> PrivateChannels {
    let args = PusherArgs {
        app_id: Some("12345".into()),
        key: Some("app-key-abc".into()),
        secret: Some("app-secret-xyz".into()),
        host: Some("127.0.0.1".into()),
        channel_prefix: Some("private-space-".into()),
        ..PusherArgs::default()
    };
    PrivateChannels::new(&PusherConfig::from_args(&args).unwrap().unwrap())
}

#[test]
fn private_channel_names_name_exactly_one_space() {
    let channels = private_channels();
    let names = || {
        prop_oneof![
            matching("private-space-[a-zA-Z0-9_-]{0,102}"),
            odd_string().prop_map(|s| format!("private-space-{s}")),
            odd_string(),
        ]
    };
    fuzz("parse private channel names", 2000, names, |name| {
        match channels.space_of(&name) {
            Some(space) => prop_assert_eq!(format!("private-space-{space}"), name),
            None => {
                let space = name.strip_prefix("private-space-").map(SpaceId::parse);
                prop_assert!(!matches!(space, Some(Ok(_))), "{name:?} refused");
            }
        }
        Ok(())
    });
}

#[test]
fn socket_ids_are_two_short_numbers_and_any_pair_signs() {
    let socket_ids = || {
        prop_oneof![
            matching("[0-9]{0,22}\\.[0-9]{0,22}"),
            matching("[0-9.]{0,8}"),
            odd_string()
        ]
    };
    fuzz(
        "check socket ids",
        2000,
        || (socket_ids(), odd_string()),
        |(socket_id, channel)| {
            let two_numbers = socket_id.split_once('.').is_some_and(|(left, right)| {
                [left, right].iter().all(|part| {
                    (1..=20).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit())
                })
            });
            prop_assert_eq!(is_socket_id(&socket_id), two_numbers, "{:?}", socket_id);
            let auth =
                channel_auth_signature("app-key-abc", "app-secret-xyz", &socket_id, &channel);
            let signature = auth.strip_prefix("app-key-abc:").unwrap_or_default();
            prop_assert!(signature.len() == 64 && signature.bytes().all(|b| b.is_ascii_hexdigit()));
            Ok(())
        },
    );
}
