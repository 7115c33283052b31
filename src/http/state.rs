//! What the handlers share, built once by `startup` and cloned per request (every part is an
//! `Arc`). Handlers and extractors take only the parts they need (`FromRef`).

use std::sync::Arc;

use axum::extract::FromRef;

use crate::auth::Authenticator;
use crate::auth::authorize::Authorizer;
use crate::config::HttpSettings;
use crate::metrics::Metrics;
use crate::mutators::Mutators;
use crate::poke::Pokes;
use crate::poke::pusher::{PrivateChannels, PusherPoker};
use crate::poke::sse::SsePokes;
use crate::pull::Pulls;
use crate::store::Store;

#[derive(Clone, FromRef)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub mutators: Arc<Mutators>,
    pub auth: Arc<dyn Authenticator>,
    pub authorizer: Arc<Authorizer>,
    pub pokes: Pokes,
    /// The built-in SSE poke stream, when enabled.
    pub sse: Option<Arc<SsePokes>>,
    pub http: HttpSettings,
    pub metrics: Arc<Metrics>,
    pub pulls: Arc<Pulls>,
    /// The Pusher poker, when configured (its counters go to `/metrics`).
    pub pusher: Option<Arc<PusherPoker>>,
    /// Signs private poke channel subscriptions (Pusher with authentication on).
    pub private_channels: Option<Arc<PrivateChannels>>,
}
