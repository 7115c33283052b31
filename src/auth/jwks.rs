//! An identity provider's signing keys (its JWKS): fetched once, cached by key id, fetched
//! again when a token names a key we do not know, at most once per refetch interval.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::RwLock;

use super::AuthError;

/// Keys older than this are fetched again at the next token (keys a provider revoked go away).
const MAX_KEY_AGE: Duration = Duration::from_secs(60 * 60);

/// A verification key and the one algorithm it verifies.
#[derive(Clone)]
pub struct VerifyingKey {
    pub key: DecodingKey,
    pub algorithm: Algorithm,
}

pub struct Jwks {
    url: String,
    http: reqwest::Client,
    /// At most one fetch per this interval, so a flood of bogus `kid`s cannot make replisync
    /// hammer the provider.
    min_refetch: Duration,
    cache: RwLock<KeyCache>,
}

#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, VerifyingKey>,
    /// The key used by tokens without a `kid`: set when the set holds exactly one key.
    only_key: Option<VerifyingKey>,
    fetched_at: Option<Instant>,
}

impl Jwks {
    pub fn new(url: String, http: reqwest::Client, min_refetch: Duration) -> Jwks {
        Jwks {
            url,
            http,
            min_refetch,
            cache: RwLock::new(KeyCache::default()),
        }
    }

    /// The key a token with header `kid` was signed with.
    pub async fn key_for(&self, kid: Option<&str>) -> Result<VerifyingKey, AuthError> {
        {
            // The common case, shared by concurrent requests: a known key, fetched recently.
            let cache = self.cache.read().await;
            if let Some(key) = cache.find(kid).filter(|_| !cache.is_stale()) {
                return Ok(key.clone());
            }
        }
        // One request at a time decides whether to fetch; the others wait for its answer.
        let mut cache = self.cache.write().await;
        let stale = cache.fetched_at.is_none_or(|at| at.elapsed() > MAX_KEY_AGE);
        let unknown = cache.find(kid).is_none();
        let may_fetch = cache
            .fetched_at
            .is_none_or(|at| at.elapsed() >= self.min_refetch);
        if (stale || unknown) && may_fetch {
            match self.fetch().await {
                Ok(fresh) => *cache = fresh,
                // Keys we have may still verify this token; none at all means we cannot check.
                Err(error) if cache.keys.is_empty() && cache.only_key.is_none() => {
                    return Err(AuthError::Unavailable(error));
                }
                Err(error) if unknown => return Err(AuthError::Unavailable(error)),
                Err(error) => tracing::warn!(%error, "keeping the cached JWKS keys"),
            }
        }
        cache.find(kid).cloned().ok_or_else(|| {
            AuthError::Unauthorized(match kid {
                Some(kid) => {
                    format!("the token's key id {kid:?} is not in the identity provider's JWKS")
                }
                None => "the token has no key id (kid) and the JWKS holds several keys".into(),
            })
        })
    }

    async fn fetch(&self) -> Result<KeyCache, String> {
        let failed = |e: reqwest::Error| {
            format!(
                "cannot fetch the JWKS (REPLISYNC_JWT_JWKS_URL): {}",
                e.without_url()
            )
        };
        let set: JwkSet = self
            .http
            .get(&self.url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(failed)?
            .json()
            .await
            .map_err(failed)?;
        let usable: Vec<(Option<String>, VerifyingKey)> = set
            .keys
            .iter()
            .filter_map(|jwk| verifying_key(jwk).map(|key| (jwk.common.key_id.clone(), key)))
            .collect();
        tracing::info!(keys = usable.len(), "fetched the identity provider's JWKS");
        let only_key = match usable.as_slice() {
            [(_, key)] => Some(key.clone()),
            _ => None,
        };
        Ok(KeyCache {
            keys: usable
                .into_iter()
                .filter_map(|(kid, key)| Some((kid?, key)))
                .collect(),
            only_key,
            fetched_at: Some(Instant::now()),
        })
    }
}

impl KeyCache {
    /// Never fetched, or fetched longer than [`MAX_KEY_AGE`] ago.
    fn is_stale(&self) -> bool {
        self.fetched_at.is_none_or(|at| at.elapsed() > MAX_KEY_AGE)
    }

    fn find(&self, kid: Option<&str>) -> Option<&VerifyingKey> {
        match kid {
            Some(kid) => self.keys.get(kid),
            None => self.only_key.as_ref(),
        }
    }
}

/// The key and its algorithm, for the asymmetric keys replisync accepts from a provider
/// (RSA, EC P-256/P-384, Ed25519); `None` for any other key (HMAC secrets never come from a JWKS).
fn verifying_key(jwk: &Jwk) -> Option<VerifyingKey> {
    let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::OctetKey(_) | AlgorithmParameters::Other(_), _) => return None,
        (_, Some(declared)) => asymmetric(declared)?,
        (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
        (AlgorithmParameters::EllipticCurve(ec), None) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        (AlgorithmParameters::OctetKeyPair(_), None) => Algorithm::EdDSA,
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyingKey { key, algorithm })
}

fn asymmetric(declared: KeyAlgorithm) -> Option<Algorithm> {
    let algorithm = Algorithm::try_from(declared).ok()?;
    let symmetric = matches!(
        algorithm,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    );
    (!symmetric).then_some(algorithm)
}
