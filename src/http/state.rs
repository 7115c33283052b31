//! What the handlers share, built once by `startup` and cloned per request and per layer (one
//! `Arc`). Handlers and extractors take only the parts they need (`FromRef`).

use std::sync::Arc;

use axum::extract::FromRef;
use tokio_util::sync::CancellationToken;

use super::extract::InFlightBytes;
use super::settings::HttpSettings;
use crate::auth::Authenticator;
use crate::auth::authorize::Authorizer;
use crate::metrics::Metrics;
use crate::mutators::Mutators;
use crate::poke::sinks::Pokes;
use crate::pull::Pulls;
use crate::push::PushGroups;
use crate::push::settings::PushLimits;
use crate::rules::Rules;
use crate::server_api::ServerApi;
use crate::store::Store;

/// The shared parts behind one `Arc`: axum clones the state for every layer and handler a
/// request passes, so a clone is one reference count, whatever the number of parts.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Parts>);

impl AppState {
    pub fn new(parts: Parts) -> AppState {
        AppState(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = Parts;

    fn deref(&self) -> &Parts {
        &self.0
    }
}

/// Each part a handler or extractor may take alone (`State<Arc<Metrics>>`, ...).
macro_rules! parts_from_state {
    ($($field:ident: $part:ty),* $(,)?) => {
        $(impl FromRef<AppState> for $part {
            fn from_ref(state: &AppState) -> $part {
                state.0.$field.clone()
            }
        })*
    };
}

parts_from_state! {
    store: Arc<dyn Store>,
    pushes: Arc<PushGroups>,
    auth: Arc<dyn Authenticator>,
    authorizer: Arc<Authorizer>,
    pokes: Arc<Pokes>,
    mutators: Arc<Mutators>,
    http: Arc<HttpSettings>,
    push: Arc<PushLimits>,
    push_bytes: InFlightBytes,
    metrics: Arc<Metrics>,
    pulls: Arc<Pulls>,
    rules: Arc<Rules>,
    server_api: Arc<ServerApi>,
    draining: Draining,
}

/// What the handlers share: built once by `startup`, then read-only.
pub struct Parts {
    pub(crate) store: Arc<dyn Store>,
    /// Applies pushes, grouping those to one space that arrive while it is busy.
    pub(crate) pushes: Arc<PushGroups>,
    pub(crate) auth: Arc<dyn Authenticator>,
    pub(crate) authorizer: Arc<Authorizer>,
    /// The poke sinks: the SSE stream and private channel signing are served from here.
    pub(crate) pokes: Arc<Pokes>,
    /// The mutators pushes run (their failure counters go to `/metrics`).
    pub(crate) mutators: Arc<Mutators>,
    pub(crate) http: Arc<HttpSettings>,
    /// What one push may carry and do.
    pub(crate) push: Arc<PushLimits>,
    /// The bytes of push bodies being worked on (REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT).
    pub(crate) push_bytes: InFlightBytes,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) pulls: Arc<Pulls>,
    /// Which keys of a space each caller may read and write (REPLISYNC_RULES).
    pub(crate) rules: Arc<Rules>,
    /// The server API for trusted backends: on with REPLISYNC_SERVICE_TOKEN.
    pub(crate) server_api: Arc<ServerApi>,
    /// Cancelled on SIGTERM: `/readyz` answers 503 and responses close their connections.
    pub(crate) draining: Draining,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("pushes", &self.pushes)
            .field("authorizer", &self.authorizer)
            .field("pokes", &self.pokes)
            .field("mutators", &self.mutators)
            .field("http", &self.http)
            .field("push", &self.push)
            .field("push_bytes", &self.push_bytes)
            .field("metrics", &self.metrics)
            .field("pulls", &self.pulls)
            .field("rules", &self.rules)
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

/// Whether shutdown has begun; the server still serves while it drains.
#[derive(Debug, Clone, Default)]
pub struct Draining(CancellationToken);

impl Draining {
    pub fn start(&self) {
        self.0.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.0.is_cancelled()
    }
}
