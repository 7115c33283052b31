//! An identity provider's signing keys (its JWKS): fetched at start-up (an answer that is not a
//! JWKS stops start-up; an unreachable provider is retried in the background, `/readyz`
//! answering 503 meanwhile), cached by key id, fetched again when a token names a key we do not
//! know, at most once per refetch interval. Every message about it names its URL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::RwLock;

use super::AuthError;
use crate::metrics::Timing;

/// Keys older than this are fetched again at the next token (keys a provider revoked go away).
const MAX_KEY_AGE: Duration = Duration::from_secs(60 * 60);

/// The first background retry after a failed fetch at start-up; each next one waits twice as
/// long, up to [`MAX_RETRY_WAIT`].
const FIRST_RETRY_WAIT: Duration = Duration::from_millis(500);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);

/// A verification key and the one algorithm it verifies.
#[derive(Debug, Clone)]
pub struct VerifyingKey {
    pub key: DecodingKey,
    pub algorithm: Algorithm,
}

/// Why the keys could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// No answer, or a server error: it may work later.
    #[error("{0}")]
    Unreachable(String),
    /// An answer that is not a usable JWKS (404, not JSON, no key replisync can use): the URL or
    /// the provider is misconfigured, retrying will not help.
    #[error("{0}")]
    NotAJwks(String),
}

/// The keys of one JWKS URL; clones share them.
#[derive(Clone)]
pub struct Jwks {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks").finish_non_exhaustive()
    }
}

struct Shared {
    url: String,
    http: reqwest::Client,
    /// At most one fetch per this interval, so a flood of bogus `kid`s cannot make replisync
    /// hammer the provider.
    min_refetch: Duration,
    cache: RwLock<KeyCache>,
    /// Whether a fetch ever succeeded (read by `/readyz` without waiting for the lock).
    fetched: AtomicBool,
    /// How long fetches take, for `/metrics`.
    fetch_time: Timing,
}

#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, VerifyingKey>,
    /// The key used by tokens without a `kid`: set when the set holds exactly one key.
    only_key: Option<VerifyingKey>,
    fetched_at: Option<Instant>,
    /// The last fetch, failed or not: tokens cause at most one per refetch interval, so a flood
    /// of requests while the provider is down does not become a flood of fetches.
    attempted_at: Option<Instant>,
}

impl Jwks {
    pub fn new(url: String, http: reqwest::Client, min_refetch: Duration) -> Jwks {
        Jwks {
            shared: Arc::new(Shared {
                url,
                http,
                min_refetch,
                cache: RwLock::new(KeyCache::default()),
                fetched: AtomicBool::new(false),
                fetch_time: Timing::default(),
            }),
        }
    }

    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// How long its fetches took (`replisync_jwks_fetch_duration_seconds`).
    pub fn fetch_time(&self) -> &Timing {
        &self.shared.fetch_time
    }

    /// Whether the keys were fetched at least once (tokens can be checked).
    pub fn is_fetched(&self) -> bool {
        self.shared.fetched.load(Ordering::Acquire)
    }

    /// Fetches the keys now; answers how many are usable.
    pub async fn fetch_now(&self) -> Result<usize, JwksError> {
        let mut cache = self.shared.cache.write().await;
        cache.attempted_at = Some(Instant::now());
        let fresh = self.shared.fetch().await?;
        let keys = fresh.len();
        self.shared.keep(&mut cache, fresh);
        Ok(keys)
    }

    /// Fetches the keys in the background until a fetch succeeds (by this task or a token's),
    /// waiting longer after each failure; stops when every clone of this `Jwks` is gone.
    pub fn keep_fetching(&self) {
        let shared = Arc::downgrade(&self.shared);
        tokio::spawn(retry_until_fetched(shared));
    }

    /// The key a token with header `kid` was signed with.
    pub async fn key_for(&self, kid: Option<&str>) -> Result<VerifyingKey, AuthError> {
        let shared = &self.shared;
        {
            // The common case, shared by concurrent requests: a known key, fetched recently.
            let cache = shared.cache.read().await;
            if let Some(key) = cache.find(kid).filter(|_| !cache.is_stale()) {
                return Ok(key.clone());
            }
        }
        // One request at a time decides whether to fetch; the others wait for its answer.
        let mut cache = shared.cache.write().await;
        let unknown = cache.find(kid).is_none();
        let may_fetch = cache
            .attempted_at
            .is_none_or(|at| at.elapsed() >= shared.min_refetch);
        if (cache.is_stale() || unknown) && may_fetch {
            cache.attempted_at = Some(Instant::now());
            match shared.fetch().await {
                Ok(fresh) => shared.keep(&mut cache, fresh),
                // Keys we have may still verify this token; none at all means we cannot check.
                Err(error) if cache.is_empty() || unknown => {
                    return Err(AuthError::Unavailable(error.to_string()));
                }
                Err(error) => {
                    tracing::warn!(url = %shared.url, %error, "keeping the cached JWKS keys");
                }
            }
        }
        if cache.fetched_at.is_none() {
            return Err(AuthError::Unavailable(format!(
                "the JWKS at {} (REPLISYNC_JWT_JWKS_URL) is not fetched yet; retrying",
                shared.url
            )));
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
}

/// The background fetches of [`Jwks::keep_fetching`].
async fn retry_until_fetched(shared: Weak<Shared>) {
    let mut wait = FIRST_RETRY_WAIT;
    loop {
        tokio::time::sleep(wait).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.fetched.load(Ordering::Acquire) {
            return;
        }
        let mut cache = shared.cache.write().await;
        cache.attempted_at = Some(Instant::now());
        match shared.fetch().await {
            Ok(fresh) => {
                tracing::info!(url = %shared.url, keys = fresh.len(), "the JWKS is fetched: tokens can be checked, /readyz answers 200");
                shared.keep(&mut cache, fresh);
                return;
            }
            Err(error) => {
                wait = (wait * 2).min(MAX_RETRY_WAIT);
                tracing::warn!(url = %shared.url, %error, retry_in_ms = wait.as_millis() as u64, "the JWKS is not fetched yet: tokens get 503 and /readyz 503 until it is");
            }
        }
    }
}

impl Shared {
    fn keep(&self, cache: &mut KeyCache, fresh: KeyCache) {
        *cache = fresh;
        self.fetched.store(true, Ordering::Release);
    }

    async fn fetch(&self) -> Result<KeyCache, JwksError> {
        let started = Instant::now();
        let fetched = self.fetch_keys().await;
        self.fetch_time.observe_since(started);
        fetched
    }

    async fn fetch_keys(&self) -> Result<KeyCache, JwksError> {
        let url = &self.url;
        let unreachable = |e: reqwest::Error| {
            JwksError::Unreachable(format!(
                "cannot fetch the JWKS at {url} (REPLISYNC_JWT_JWKS_URL): {}",
                e.without_url()
            ))
        };
        let response = self.http.get(url).send().await.map_err(unreachable)?;
        let status = response.status();
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(JwksError::Unreachable(format!(
                "the JWKS at {url} (REPLISYNC_JWT_JWKS_URL) answered {status}"
            )));
        }
        if !status.is_success() {
            return Err(JwksError::NotAJwks(format!(
                "the JWKS at {url} (REPLISYNC_JWT_JWKS_URL) answered {status}: set the identity \
                 provider's JWKS URL (often https://<issuer>/.well-known/jwks.json)"
            )));
        }
        let body = response.bytes().await.map_err(unreachable)?;
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| {
            JwksError::NotAJwks(format!(
                "the answer of {url} (REPLISYNC_JWT_JWKS_URL) is not a JWKS ({e}): it must be \
                 JSON like {{\"keys\": [{{\"kty\": \"RSA\", ...}}]}}"
            ))
        })?;
        let cache = KeyCache::of(&set);
        if cache.is_empty() {
            return Err(JwksError::NotAJwks(format!(
                "the JWKS at {url} (REPLISYNC_JWT_JWKS_URL) holds no key replisync can verify \
                 tokens with (RSA, EC P-256/P-384 or Ed25519 signing keys)"
            )));
        }
        tracing::info!(url = %url, keys = cache.len(), "fetched the identity provider's JWKS");
        Ok(cache)
    }
}

impl KeyCache {
    /// The usable keys of `set`, fetched now.
    fn of(set: &JwkSet) -> KeyCache {
        let usable: Vec<(Option<String>, VerifyingKey)> = set
            .keys
            .iter()
            .filter_map(|jwk| verifying_key(jwk).map(|key| (jwk.common.key_id.clone(), key)))
            .collect();
        let only_key = match usable.as_slice() {
            [(_, key)] => Some(key.clone()),
            _ => None,
        };
        KeyCache {
            keys: usable
                .into_iter()
                .filter_map(|(kid, key)| Some((kid?, key)))
                .collect(),
            only_key,
            fetched_at: Some(Instant::now()),
            attempted_at: Some(Instant::now()),
        }
    }

    /// Keys a token can name: by `kid`, or the only one.
    fn len(&self) -> usize {
        self.keys.len().max(usize::from(self.only_key.is_some()))
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

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
