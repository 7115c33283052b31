//! Authentication's settings: JSON Web Tokens (a secret or a provider's JWKS), their claims,
//! and the authorization webhook, from the `REPLISYNC_JWT_*` and `REPLISYNC_AUTHZ_*` variables;
//! [`build`] turns them into the authenticator and the webhook.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use jsonwebtoken::DecodingKey;
use secrecy::{ExposeSecret, SecretString};

use super::authorize::Webhook;
use super::endpoint::check_endpoint_url;
use super::jwks::{Jwks, JwksError};
use super::jwt::{ClaimRules, JwtAuthenticator, Keys};
use super::{Anonymous, Authenticator};

/// The shortest `REPLISYNC_JWT_SECRET` accepted: the hash's output size, as RFC 7518 requires
/// of HS256 keys.
const MIN_JWT_SECRET_BYTES: usize = 32;

/// Who may read and write which space. With no JWT variable set, every caller is one
/// anonymous user with access to every space (allowed on loopback addresses only).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Tokens and grants")]
pub struct AuthArgs {
    /// Verify HS256/384/512 tokens signed with this secret (turns authentication on).
    #[arg(long, env = "REPLISYNC_JWT_SECRET", hide_env_values = true, value_parser = secret)]
    pub jwt_secret: Option<SecretString>,

    /// Verify RS256/ES256/EdDSA tokens with the keys of an identity provider's JWKS
    /// (turns authentication on). https, or http to a loopback host; fetched at start-up.
    #[arg(long, env = "REPLISYNC_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,

    /// Fetch the JWKS again for an unknown key id at most once per this many seconds.
    #[arg(long, env = "REPLISYNC_JWT_JWKS_REFETCH_SECS", default_value_t = 30)]
    pub jwt_jwks_refetch_secs: u64,

    /// Tokens must name this issuer (`iss`), when set.
    #[arg(long, env = "REPLISYNC_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Tokens must name this audience (`aud`), when set.
    #[arg(long, env = "REPLISYNC_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// The claim that holds the user id.
    #[arg(long, env = "REPLISYNC_JWT_USER_CLAIM", default_value = "sub")]
    pub jwt_user_claim: String,

    /// The claim listing spaces the user may read and write (`team-7-*` matches a prefix).
    #[arg(long, env = "REPLISYNC_JWT_SPACES_CLAIM", default_value = "spaces")]
    pub jwt_spaces_claim: String,

    /// The claim listing spaces the user may only read.
    #[arg(
        long,
        env = "REPLISYNC_JWT_SPACES_READ_CLAIM",
        default_value = "spaces_read"
    )]
    pub jwt_spaces_read_claim: String,

    /// The app's authorization webhook, asked about spaces the token does not grant (and sent
    /// the caller's token): https, or http to a loopback host.
    #[arg(long, env = "REPLISYNC_AUTHZ_URL")]
    pub authz_url: Option<String>,

    /// Seconds the webhook's decisions are cached.
    #[arg(long, env = "REPLISYNC_AUTHZ_CACHE_SECS", default_value_t = 30)]
    pub authz_cache_secs: u64,

    /// Most decisions kept in the cache.
    #[arg(long, env = "REPLISYNC_AUTHZ_CACHE_SIZE", default_value_t = 100_000)]
    pub authz_cache_size: u64,

    /// Milliseconds the webhook (and a JWKS fetch) may take before the request is answered 503.
    #[arg(long, env = "REPLISYNC_AUTHZ_TIMEOUT_MS", default_value_t = 3000)]
    pub authz_timeout_ms: u64,

    /// Serve without authentication on a non-loopback address (everyone may read and write
    /// every space).
    #[arg(long, env = "REPLISYNC_ALLOW_ANONYMOUS", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_anonymous: bool,
}

impl AuthArgs {
    /// Whether tokens are verified (either JWT variable is set).
    pub fn tokens_on(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_jwks_url.is_some()
    }
}

fn secret(raw: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(raw))
}

/// The authenticator and the authorization webhook the configuration asks for. Refuses an
/// anonymous server on a non-loopback address unless REPLISYNC_ALLOW_ANONYMOUS=true, and
/// webhook or JWKS URLs that are not https (but on loopback) or do not parse; fetches the JWKS.
pub async fn build(
    auth: &AuthArgs,
    listen: SocketAddr,
) -> anyhow::Result<(Arc<dyn Authenticator>, Option<Webhook>)> {
    let timeout = Duration::from_millis(auth.authz_timeout_ms.max(1));
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("replisync/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot build the HTTP client for JWKS and the authorization webhook")?;
    let webhook = match &auth.authz_url {
        Some(url) => {
            let url = check_endpoint_url(url, "REPLISYNC_AUTHZ_URL").map_err(anyhow::Error::msg)?;
            Some(Webhook::new(
                url.to_string(),
                http.clone(),
                Duration::from_secs(auth.authz_cache_secs),
                auth.authz_cache_size,
            ))
        }
        None => None,
    };
    let keys = match (&auth.jwt_secret, &auth.jwt_jwks_url) {
        (Some(_), Some(_)) => {
            anyhow::bail!("set REPLISYNC_JWT_SECRET or REPLISYNC_JWT_JWKS_URL, not both")
        }
        (Some(secret), None) if secret.expose_secret().len() < MIN_JWT_SECRET_BYTES => {
            anyhow::bail!(
                "REPLISYNC_JWT_SECRET is {} bytes; an HS256 secret must have at least {MIN_JWT_SECRET_BYTES} (RFC 7518, section 3.2), or tokens can be forged by guessing it: generate one with `openssl rand -base64 32`",
                secret.expose_secret().len()
            )
        }
        (Some(secret), None) => {
            Keys::Secret(DecodingKey::from_secret(secret.expose_secret().as_bytes()))
        }
        (None, Some(url)) => {
            let url =
                check_endpoint_url(url, "REPLISYNC_JWT_JWKS_URL").map_err(anyhow::Error::msg)?;
            let refetch = Duration::from_secs(auth.jwt_jwks_refetch_secs);
            Keys::Jwks(jwks_at_start(Jwks::new(url.to_string(), http, refetch)).await?)
        }
        (None, None) => {
            check_anonymous_allowed(auth, listen)?;
            if webhook.is_some() {
                anyhow::bail!(
                    "REPLISYNC_AUTHZ_URL needs authenticated users: set REPLISYNC_JWT_SECRET or REPLISYNC_JWT_JWKS_URL"
                );
            }
            return Ok((Arc::new(Anonymous), None));
        }
    };
    let rules = ClaimRules {
        issuer: auth.jwt_issuer.clone(),
        audience: auth.jwt_audience.clone(),
        user_claim: auth.jwt_user_claim.clone(),
        spaces_claim: auth.jwt_spaces_claim.clone(),
        spaces_read_claim: auth.jwt_spaces_read_claim.clone(),
    };
    tracing::info!(
        webhook = webhook.is_some(),
        "authentication: JSON Web Tokens"
    );
    Ok((Arc::new(JwtAuthenticator::new(keys, rules)), webhook))
}

/// The JWKS, fetched once: an answer that is not a JWKS stops start-up; an unreachable provider
/// is fetched again in the background, `/readyz` answering 503 until it is.
async fn jwks_at_start(jwks: Jwks) -> anyhow::Result<Jwks> {
    match jwks.fetch_now().await {
        Ok(_) => {}
        Err(JwksError::NotAJwks(message)) => anyhow::bail!(message),
        Err(JwksError::Unreachable(error)) => {
            tracing::warn!(
                url = jwks.url(),
                %error,
                "the JWKS cannot be fetched yet: retrying in the background; tokens get 503 and /readyz 503 until it is"
            );
            jwks.keep_fetching();
        }
    }
    Ok(jwks)
}

fn check_anonymous_allowed(auth: &AuthArgs, listen: SocketAddr) -> anyhow::Result<()> {
    if listen.ip().is_loopback() {
        tracing::info!(
            "authentication off: every caller may read and write every space (loopback only)"
        );
        return Ok(());
    }
    if auth.allow_anonymous {
        tracing::warn!(listen = %listen, "authentication off on a non-loopback address (REPLISYNC_ALLOW_ANONYMOUS): anyone who can reach it may read and write every space");
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve {} without authentication: anyone could read and write every space. \
         Set REPLISYNC_JWT_SECRET or REPLISYNC_JWT_JWKS_URL to verify tokens, or \
         REPLISYNC_ALLOW_ANONYMOUS=true if that is what you want",
        listen
    )
}
