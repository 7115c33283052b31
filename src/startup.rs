//! Start-up and shutdown: open the store, assemble the `App` once from each feature's settings
//! (from `Config` in the binary, part by part in tests), serve it until a shutdown future
//! resolves, then drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::authorize::{Authorizer, Webhook};
use crate::auth::{self, Anonymous, Authenticator};
use crate::config::Config;
use crate::gc::{self, GcSettings};
use crate::http::settings::HttpSettings;
use crate::http::{
    AppState, Draining, InFlightBytes, MetricsEndpoint, Parts, accept_loop, metrics_router, router,
};
use crate::metrics::{AppSources, Metrics};
use crate::mutators::Mutators;
use crate::poke::PokeSink;
use crate::poke::pusher::PrivateChannels;
use crate::poke::settings::PokeSettings;
use crate::poke::sinks::Pokes;
use crate::poke::sse::settings::SseSettings;
use crate::pull::{PullLimits, Pulls};
use crate::push::PushGroups;
use crate::push::settings::PushLimits;
use crate::rules::Rules;
use crate::server_api::ServerApi;
use crate::store::settings::OpenOptions;
use crate::store::{Store, activity_granularity};

/// Opens the configured store and, when asked, applies its migrations.
pub async fn open_store(config: &Config, migrate: bool) -> anyhow::Result<Arc<dyn Store>> {
    let http = config.http.settings().map_err(anyhow::Error::msg)?;
    let pulls = config.pull.limits(config.store.db_max_connections);
    config
        .store
        .open(open_options(config, &http, &pulls, migrate))
        .await
}

/// The store for `export` and `import`, whose one statement (an export's read of a whole
/// space) may stream for longer than a pull may: Postgres statements are bounded by a day
/// unless REPLISYNC_DB_STATEMENT_TIMEOUT_MS says otherwise.
pub async fn open_store_for_transfer(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let http = config.http.settings().map_err(anyhow::Error::msg)?;
    let pulls = config.pull.limits(config.store.db_max_connections);
    let options = OpenOptions {
        stream_deadline: TRANSFER_STATEMENT_BOUND,
        ..open_options(config, &http, &pulls, config.store.auto_migrate)
    };
    config.store.open(options).await
}

const TRANSFER_STATEMENT_BOUND: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// What opening the store takes from the other features' settings: unset Postgres session
/// bounds follow the request and pull stream timeouts.
fn open_options(
    config: &Config,
    http: &HttpSettings,
    pulls: &PullLimits,
    migrate: bool,
) -> OpenOptions {
    OpenOptions {
        request_timeout: http.request_timeout,
        stream_deadline: pulls.stream.deadline,
        activity_granularity: activity_granularity(config.gc.client_ttl),
        migrate,
    }
}

/// A server, built once: its state, and what shutdown must stop (SSE streams, the Pusher
/// queue, the store).
#[derive(Debug)]
pub struct App {
    state: AppState,
    /// Cancelled when shutdown begins: open SSE streams end so requests can drain.
    shutdown: CancellationToken,
    /// Background garbage collection, when on.
    gc: Option<GcSettings>,
}

impl App {
    /// Starts building a server: built-in mutators, anonymous users, no pokes and default
    /// limits until set otherwise; [`AppBuilder::build`] puts it together over a store.
    pub fn builder() -> AppBuilder {
        AppBuilder {
            mutators: Mutators::builtin(),
            auth: Arc::new(Anonymous),
            http: HttpSettings::default(),
            push: PushLimits::default(),
            pulls: PullLimits::default(),
            webhook: None,
            pokes: PokeSettings::default(),
            extra_sinks: Vec::new(),
            gc: None,
            rules: Rules::none(),
            server_api: ServerApi::off(),
        }
    }

    /// The server the configuration describes: its store (migrated when REPLISYNC_AUTO_MIGRATE),
    /// Pusher pokes when PUSHER_* is set, SSE pokes when REPLISYNC_SSE says so.
    pub async fn from_config(config: &Config) -> anyhow::Result<App> {
        let http = config.http.settings().map_err(anyhow::Error::msg)?;
        if let Some(versions) = http.schema_versions.listed() {
            tracing::info!(?versions, "serving only these client schemaVersions");
        }
        let push = config.push.limits(http.request_timeout);
        let push = push.map_err(anyhow::Error::msg)?;
        let pulls = config.pull.limits(config.store.db_max_connections);
        let gc = config.gc.settings().map_err(anyhow::Error::msg)?;
        let (authenticator, webhook) =
            auth::settings::build(&config.auth, config.http.listen).await?;
        let pokes = PokeSettings::from_args(&config.pokes, config.auth.tokens_on())?;
        pokes.spawn_reachability_checks();
        let mutators = config.js.load()?;
        let rules = config.rules.load()?;
        let server_api = config.server_api.load().map_err(anyhow::Error::msg)?;
        let open = open_options(config, &http, &pulls, config.store.auto_migrate);
        let store = config.store.open(open).await?;
        let mut builder = App::builder()
            .gc(gc)
            .http(http)
            .push(push)
            .pulls(pulls)
            .authenticator(authenticator)
            .mutators(mutators)
            .rules(rules)
            .server_api(server_api)
            .pokes(pokes);
        if let Some(webhook) = webhook {
            builder = builder.authz_webhook(webhook);
        }
        Ok(builder.build(store))
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.state.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.state.metrics
    }

    pub fn router(&self, metrics_endpoint: MetricsEndpoint) -> Router {
        router(self.state.clone(), metrics_endpoint)
    }
}

/// The parts of an [`App`]; `build` puts them together once, over a store.
pub struct AppBuilder {
    mutators: Mutators,
    auth: Arc<dyn Authenticator>,
    webhook: Option<Webhook>,
    http: HttpSettings,
    push: PushLimits,
    pulls: PullLimits,
    pokes: PokeSettings,
    extra_sinks: Vec<Arc<dyn PokeSink>>,
    gc: Option<GcSettings>,
    rules: Rules,
    server_api: ServerApi,
}

impl std::fmt::Debug for AppBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppBuilder")
            .field("mutators", &self.mutators)
            .field("webhook", &self.webhook)
            .field("http", &self.http)
            .field("push", &self.push)
            .field("pulls", &self.pulls)
            .field("pokes", &self.pokes)
            .field("gc", &self.gc)
            .field("rules", &self.rules)
            .field("server_api", &self.server_api)
            .finish_non_exhaustive()
    }
}

impl AppBuilder {
    pub fn mutators(mut self, mutators: Mutators) -> Self {
        self.mutators = mutators;
        self
    }

    /// Which keys of a space each caller may read and write.
    pub fn rules(mut self, rules: Rules) -> Self {
        self.rules = rules;
        self
    }

    /// The server API for trusted backends (off by default).
    pub fn server_api(mut self, server_api: ServerApi) -> Self {
        self.server_api = server_api;
        self
    }

    pub fn authenticator(mut self, auth: Arc<dyn Authenticator>) -> Self {
        self.auth = auth;
        self
    }

    /// Asks the app's webhook about spaces the caller's token does not grant.
    pub fn authz_webhook(mut self, webhook: Webhook) -> Self {
        self.webhook = Some(webhook);
        self
    }

    pub fn http(mut self, http: HttpSettings) -> Self {
        self.http = http;
        self
    }

    /// What one push may carry and do, and how pushes to one space are grouped.
    pub fn push(mut self, push: PushLimits) -> Self {
        self.push = push;
        self
    }

    /// How many pulls may stream at once, and for how long.
    pub fn pulls(mut self, pulls: PullLimits) -> Self {
        self.pulls = pulls;
        self
    }

    /// Every poke sink at once (Pusher, private channels, SSE), as the configuration gives them.
    pub fn pokes(mut self, pokes: PokeSettings) -> Self {
        self.pokes = pokes;
        self
    }

    /// Serves `POST /pusher/auth`, which signs subscriptions to private poke channels.
    pub fn private_channels(mut self, channels: PrivateChannels) -> Self {
        self.pokes.private_channels = Some(channels);
        self
    }

    /// Serves the built-in SSE poke stream, with its keep-alive and caps.
    pub fn sse(mut self, settings: SseSettings) -> Self {
        self.pokes.sse = Some(settings);
        self
    }

    /// Adds a destination for pokes beside the configured ones.
    pub fn poke_sink(mut self, sink: Arc<dyn PokeSink>) -> Self {
        self.extra_sinks.push(sink);
        self
    }

    /// Collects idle client groups in the background while the server runs.
    pub fn gc(mut self, settings: GcSettings) -> Self {
        self.gc = Some(settings);
        self
    }

    /// The server over `store`, its poke sinks started (call it inside a Tokio runtime).
    pub fn build(self, store: Arc<dyn Store>) -> App {
        let shutdown = CancellationToken::new();
        let pokes = Arc::new(Pokes::start(self.pokes, self.extra_sinks, &shutdown));
        let metrics = Arc::new(Metrics::new(Some(AppSources {
            pokes: pokes.clone(),
            store: store.clone(),
            mutations: self.mutators.metrics().clone(),
            jwks_fetch: self.auth.key_fetch_time(),
        })));
        let mutators = Arc::new(self.mutators);
        let state = AppState::new(Parts {
            pulls: Arc::new(Pulls::new(store.clone(), metrics.clone(), self.pulls)),
            pushes: PushGroups::new(
                store.clone(),
                mutators.clone(),
                pokes.clone(),
                self.push.clone(),
                self.push.work_budget(self.http.request_timeout),
                metrics.clone(),
            ),
            store,
            auth: self.auth,
            authorizer: Arc::new(Authorizer::new(self.webhook, metrics.clone())),
            pokes,
            mutators,
            push_bytes: InFlightBytes::new(self.push.max_bytes_in_flight),
            http: Arc::new(self.http),
            push: Arc::new(self.push),
            metrics,
            rules: Arc::new(self.rules),
            server_api: Arc::new(self.server_api),
            draining: Draining::default(),
        });
        App {
            state,
            shutdown,
            gc: self.gc,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then gives requests and pending
/// pokes one shutdown timeout to finish, and closes the store.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_metrics(listener, None, app, shutdown).await
}

/// [`serve`], with `/metrics` on `metrics_listener` alone when one is given.
pub async fn serve_with_metrics(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "replisync listening");
    let stop = app.shutdown.clone();
    let metrics_endpoint = match metrics_listener {
        Some(metrics_listener) => {
            serve_metrics(metrics_listener, &app, stop.clone())?;
            MetricsEndpoint::Elsewhere
        }
        None => MetricsEndpoint::Here,
    };
    gc::spawn_statistics_refresh(app.state.store.clone(), stop.clone());
    if let Some(settings) = app.gc {
        gc::spawn_schedule(
            app.state.store.clone(),
            app.state.metrics.clone(),
            settings,
            stop.clone(),
        );
    }
    // Aborting this task drops every connection it serves.
    let mut server = tokio::spawn(accept_loop(
        listener,
        app.router(metrics_endpoint),
        (*app.state.http).clone(),
        app.state.metrics.clone(),
        stop.clone(),
    ));
    // One deadline for everything shutdown waits for: requests, then pending pokes, then the
    // database connections. Past it, what still runs is dropped and the process exits.
    let budget = app.state.http.shutdown_timeout;
    let mut deadline = tokio::time::Instant::now() + budget;
    let mut cut_short = false;
    tokio::select! {
        result = &mut server => result.context("server task failed")?,
        () = shutdown => {
            if let Some(ended) = drain(&app.state, &mut server).await {
                // The accept loop only ends on `stop`: this is a failure of the server task.
                ended.context("server task failed")?;
                return Ok(());
            }
            tracing::info!("shutting down: finishing requests and pokes");
            stop.cancel();
            deadline = tokio::time::Instant::now() + budget;
            if tokio::time::timeout_at(deadline, &mut server).await.is_err() {
                tracing::warn!("requests still running at the shutdown deadline were cut off");
                server.abort();
                cut_short = true;
            }
        }
    }
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    app.state.pokes.shutdown(remaining).await;
    // A connection still held by a cut-off response would make closing the pool wait forever.
    let close_by = deadline.max(tokio::time::Instant::now() + CLOSE_GRACE);
    if tokio::time::timeout_at(close_by, app.state.store.close())
        .await
        .is_err()
    {
        tracing::warn!("database connections still in use at the shutdown deadline were dropped");
        cut_short = true;
    }
    if cut_short {
        anyhow::bail!(
            "shutdown cut work short after REPLISYNC_SHUTDOWN_TIMEOUT_SECS ({} s); cut-off transactions were rolled back",
            budget.as_secs()
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// Turns `/readyz` to 503 and keeps serving for the drain delay, so a load balancer takes the
/// instance out before it stops accepting. `Some` when the server task ended meanwhile.
async fn drain(
    state: &AppState,
    server: &mut tokio::task::JoinHandle<()>,
) -> Option<Result<(), tokio::task::JoinError>> {
    state.draining.start();
    let delay = state.http.drain_delay;
    if delay.is_zero() {
        return None;
    }
    tracing::info!(
        seconds = delay.as_secs(),
        "draining: /readyz answers 503; still serving until the drain delay ends (REPLISYNC_DRAIN_DELAY_SECS)"
    );
    tokio::time::timeout(delay, server).await.ok()
}

/// Serves `/metrics` alone on `listener` until `stop`; scrapes are short, so it is not drained.
fn serve_metrics(listener: TcpListener, app: &App, stop: CancellationToken) -> anyhow::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "/metrics listening");
    let router = metrics_router(app.state.clone());
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the /metrics listener failed");
        }
    });
    Ok(())
}

/// Time given to closing the database's connections when the shutdown deadline has passed.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Listens for SIGTERM and Ctrl-C from this call on, so that a signal sent as soon as the
/// server says it listens is not lost (it would end the process at once); the future resolves
/// on the first. Call it before serving.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                },
                _ => std::future::pending::<()>().await,
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
