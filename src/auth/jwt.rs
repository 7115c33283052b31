//! JSON Web Tokens: verifies the `Authorization` token (HS256/384/512 with a shared secret, or
//! RS/ES/EdDSA with an identity provider's JWKS) and reads the user and space grants from it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::{Map, Value};

use super::jwks::Jwks;
use super::{AuthError, Authenticator, Grants, Identity, check_user_id};
use crate::metrics::Timing;
use crate::protocol::MAX_ID_BYTES;

/// Seconds of clock difference tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

/// Where the verification keys come from.
pub enum Keys {
    /// REPLISYNC_JWT_SECRET: HMAC tokens.
    Secret(DecodingKey),
    /// REPLISYNC_JWT_JWKS_URL: an identity provider's public keys.
    Jwks(Jwks),
}

/// Never shows the secret (a `DecodingKey`'s own `Debug` prints its bytes).
impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keys::Secret(_) => f.write_str("Secret([REDACTED])"),
            Keys::Jwks(jwks) => f.debug_tuple("Jwks").field(jwks).finish(),
        }
    }
}

/// Which claims say what, and what the token must name.
#[derive(Debug, Clone)]
pub struct ClaimRules {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub user_claim: String,
    pub spaces_claim: String,
    pub spaces_read_claim: String,
}

impl Default for ClaimRules {
    /// `sub` names the user, `spaces` and `spaces_read` grant spaces; no issuer or audience.
    fn default() -> Self {
        ClaimRules {
            issuer: None,
            audience: None,
            user_claim: "sub".into(),
            spaces_claim: "spaces".into(),
            spaces_read_claim: "spaces_read".into(),
        }
    }
}

#[derive(Debug)]
pub struct JwtAuthenticator {
    keys: Keys,
    rules: ClaimRules,
    /// What every token must satisfy, built once: HMAC algorithms for a secret; for a JWKS,
    /// each key's own algorithm replaces them per token.
    validation: Validation,
}

impl JwtAuthenticator {
    pub fn new(keys: Keys, rules: ClaimRules) -> JwtAuthenticator {
        let validation = validation(&rules);
        JwtAuthenticator {
            keys,
            rules,
            validation,
        }
    }
}

fn validation(rules: &ClaimRules) -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.algorithms = vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
    validation.leeway = LEEWAY_SECS;
    validation.validate_nbf = true;
    // jsonwebtoken checks `iss` and `aud` only when a token has them (of the right type):
    // a configured issuer or audience must also be required, or leaving it out would pass.
    let mut required = vec!["exp"];
    required.extend(rules.issuer.as_ref().map(|_| "iss"));
    required.extend(rules.audience.as_ref().map(|_| "aud"));
    validation.set_required_spec_claims(&required);
    validation.validate_aud = rules.audience.is_some();
    if let Some(audience) = &rules.audience {
        validation.set_audience(&[audience]);
    }
    if let Some(issuer) = &rules.issuer {
        validation.set_issuer(&[issuer]);
    }
    validation
}

#[async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, AuthError> {
        let token = bearer_token(authorization)?;
        let header = decode_header(token).map_err(|e| unauthorized(e.kind()))?;
        let decoded = match &self.keys {
            Keys::Secret(secret) => decode::<Map<String, Value>>(token, secret, &self.validation),
            Keys::Jwks(jwks) => {
                let found = jwks.key_for(header.kid.as_deref()).await?;
                let mut validation = self.validation.clone();
                validation.algorithms = vec![found.algorithm];
                decode(token, &found.key, &validation)
            }
        };
        let claims = decoded.map_err(|e| unauthorized(e.kind()))?.claims;
        identity_from_claims(claims, &self.rules)
    }

    fn not_ready(&self) -> Option<String> {
        match &self.keys {
            Keys::Jwks(jwks) if !jwks.is_fetched() => Some(format!(
                "the identity provider's keys are not fetched yet from {} \
                 (REPLISYNC_JWT_JWKS_URL): retrying; tokens cannot be checked until then",
                jwks.url()
            )),
            _ => None,
        }
    }

    fn key_fetch_time(&self) -> Option<Timing> {
        match &self.keys {
            Keys::Jwks(jwks) => Some(jwks.fetch_time().clone()),
            Keys::Secret(_) => None,
        }
    }
}

/// `Bearer <token>` or the bare token, as Replicache's `auth` option sends whatever it is given.
fn bearer_token(authorization: Option<&str>) -> Result<&str, AuthError> {
    let value = authorization.map(str::trim).unwrap_or_default();
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ if value.eq_ignore_ascii_case("bearer") => "",
        _ => value,
    };
    if token.is_empty() {
        return Err(AuthError::Unauthorized(
            "send a token: Authorization: Bearer <token> (Replicache's `auth` option)".into(),
        ));
    }
    Ok(token)
}

/// What the client is told about a token that failed verification.
fn unauthorized(kind: &ErrorKind) -> AuthError {
    let problem = match kind {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
        ErrorKind::InvalidSignature => "the token's signature does not verify",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "the token is signed with an algorithm this server does not accept"
        }
        ErrorKind::InvalidIssuer => "the token's issuer (iss) is not REPLISYNC_JWT_ISSUER",
        ErrorKind::InvalidAudience => "the token's audience (aud) is not REPLISYNC_JWT_AUDIENCE",
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "iss" => "the token names no issuer (iss); REPLISYNC_JWT_ISSUER requires one",
            "aud" => "the token names no audience (aud); REPLISYNC_JWT_AUDIENCE requires one",
            _ => "the token has no expiry (exp)",
        },
        _ => "the token is malformed",
    };
    AuthError::Unauthorized(format!("{problem}; fetch a new token"))
}

fn identity_from_claims(
    claims: Map<String, Value>,
    rules: &ClaimRules,
) -> Result<Identity, AuthError> {
    // The user id is stored with the client groups it creates: one replisync can store.
    let user = match claims.get(&rules.user_claim) {
        Some(Value::String(user)) if !user.is_empty() => {
            check_user_id(user)?;
            user.clone()
        }
        _ => {
            return Err(AuthError::Unauthorized(format!(
                "the token's `{}` claim must name the user (a string of 1 to {MAX_ID_BYTES} bytes)",
                rules.user_claim
            )));
        }
    };
    Ok(Identity {
        user,
        grants: Grants::Listed {
            read_write: space_list(&claims, &rules.spaces_claim)?,
            read_only: space_list(&claims, &rules.spaces_read_claim)?,
        },
        expires_at: expiry(&claims),
        claims: Arc::new(claims),
    })
}

/// The instant of the `exp` claim (seconds since 1970, verified present by then).
fn expiry(claims: &Map<String, Value>) -> Option<SystemTime> {
    let seconds = claims.get("exp")?.as_f64()?;
    if !seconds.is_finite() || seconds < 0.0 {
        return Some(UNIX_EPOCH);
    }
    UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(seconds).ok()?)
}

/// A claim listing space patterns; absent means none.
fn space_list(claims: &Map<String, Value>, name: &str) -> Result<Vec<String>, AuthError> {
    let malformed = || {
        AuthError::Unauthorized(format!(
            "the token's `{name}` claim must be a list of space ids"
        ))
    };
    match claims.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned).ok_or_else(malformed))
            .collect(),
        Some(_) => Err(malformed()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_bare_or_after_bearer() {
        assert_eq!(bearer_token(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(Some("bearer  abc ")), Ok("abc"));
        assert_eq!(bearer_token(Some("abc")), Ok("abc"));
        assert!(bearer_token(Some("Bearer ")).is_err());
        assert!(bearer_token(None).is_err());
    }
}
