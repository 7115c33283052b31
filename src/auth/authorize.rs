//! Authorization, default deny: a request's space must be granted by the caller's token or,
//! failing that, by the app's webhook (REPLISYNC_AUTHZ_URL), whose decisions are cached.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use moka::future::Cache;
use serde_json::json;

use super::{Access, AuthError, Identity};
use crate::metrics::Metrics;
use crate::protocol::SpaceId;

/// Decides whether an identity may read or write a space.
#[derive(Debug)]
pub struct Authorizer {
    webhook: Option<Webhook>,
    metrics: Arc<Metrics>,
}

impl Authorizer {
    pub fn new(webhook: Option<Webhook>, metrics: Arc<Metrics>) -> Authorizer {
        Authorizer { webhook, metrics }
    }

    /// `Ok` when `identity` may have `access` to `space`: 403 when nothing grants it, 503 when
    /// the webhook cannot answer (never allowed on a failure).
    pub async fn authorize(
        &self,
        identity: &Identity,
        space: &SpaceId,
        access: Access,
        authorization: Option<&str>,
    ) -> Result<(), AuthError> {
        if identity.grants.allow(space, access) {
            return Ok(());
        }
        let denied = || {
            AuthError::Forbidden(format!(
                "user {} may not {} space {space}; ask the app for access",
                identity.user,
                access.as_str()
            ))
        };
        let Some(webhook) = &self.webhook else {
            return Err(denied());
        };
        match webhook
            .decide(&identity.user, space, access, authorization, &self.metrics)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(denied()),
            Err(cause) => Err(AuthError::Unavailable(format!(
                "authorization webhook failed: {cause}"
            ))),
        }
    }
}

type DecisionKey = (String, SpaceId, Access);

/// The app's authorization endpoint: POSTed `{"user", "space", "access"}` with the caller's
/// `Authorization` header; 2xx allows, 401/403/404 denies, anything else is a failure.
#[derive(Debug)]
pub struct Webhook {
    url: String,
    http: reqwest::Client,
    decisions: Cache<DecisionKey, bool>,
}

impl Webhook {
    /// `http` carries the call's timeout; decisions are kept `cache_for`, at most `capacity`.
    pub fn new(url: String, http: reqwest::Client, cache_for: Duration, capacity: u64) -> Webhook {
        Webhook {
            url,
            http,
            decisions: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(cache_for)
                .build(),
        }
    }

    /// The cached decision, or the webhook's; concurrent requests for one decision share one
    /// call. Failures are not cached.
    async fn decide(
        &self,
        user: &str,
        space: &SpaceId,
        access: Access,
        authorization: Option<&str>,
        metrics: &Metrics,
    ) -> Result<bool, Arc<String>> {
        let asked = AtomicBool::new(false);
        let key = (user.to_owned(), space.clone(), access);
        let decision = self
            .decisions
            .try_get_with(key, async {
                asked.store(true, Ordering::Relaxed);
                metrics.authz_webhook_calls.increment();
                let started = std::time::Instant::now();
                let decision = self.ask(user, space, access, authorization).await;
                metrics.authz_webhook_duration.observe_since(started);
                decision
            })
            .await;
        if !asked.load(Ordering::Relaxed) {
            metrics.authz_cache_hits.increment();
        }
        decision
    }

    async fn ask(
        &self,
        user: &str,
        space: &SpaceId,
        access: Access,
        authorization: Option<&str>,
    ) -> Result<bool, String> {
        let mut request = self.http.post(&self.url).json(&json!({
            "user": user,
            "space": space.as_str(),
            "access": access.as_str(),
        }));
        if let Some(authorization) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("REPLISYNC_AUTHZ_URL did not answer: {}", e.without_url()))?;
        decision_of(response.status())
    }
}

fn decision_of(status: StatusCode) -> Result<bool, String> {
    match status.as_u16() {
        200..=299 => Ok(true),
        401 | 403 | 404 => Ok(false),
        other => Err(format!(
            "REPLISYNC_AUTHZ_URL answered {other}; only 2xx (allow) and 401/403/404 (deny) decide"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_2xx_allows_and_only_401_403_404_deny() {
        assert_eq!(decision_of(StatusCode::OK), Ok(true));
        assert_eq!(decision_of(StatusCode::NO_CONTENT), Ok(true));
        for deny in [401, 403, 404] {
            assert_eq!(decision_of(StatusCode::from_u16(deny).unwrap()), Ok(false));
        }
        for failure in [302, 400, 429, 500, 503] {
            assert!(decision_of(StatusCode::from_u16(failure).unwrap()).is_err());
        }
    }
}
