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
use crate::metrics::Metrics;
use crate::mutators::Mutators;
use crate::poke::pusher::{
    PRIVATE_PREFIX, PokerOptions, PrivateChannels, PusherConfig, PusherPoker,
};
use crate::poke::sse::SsePokes;
use crate::poke::sse::settings::SseSettings;
use crate::poke::{PokeSink, Pokes};
use crate::pull::{PullLimits, Pulls};
use crate::push::PushGroups;
use crate::push::settings::PushLimits;
use crate::store::postgres::PgStore;
use crate::store::settings::StoreChoice;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, activity_granularity};

/// Opens the configured store and, when asked, applies its migrations.
pub async fn open_store(config: &Config, migrate: bool) -> anyhow::Result<Arc<dyn Store>> {
    let settings = &config.store;
    let granularity = activity_granularity(config.gc.client_ttl);
    let store: Arc<dyn Store> = match settings.choice().map_err(anyhow::Error::msg)? {
        StoreChoice::Postgres(options) => {
            let request = config.http.settings().map_err(anyhow::Error::msg)?;
            let stream = config.pull.limits(settings.db_max_connections).stream;
            let limits = settings
                .session_limits(request.request_timeout, stream.deadline)
                .map_err(anyhow::Error::msg)?;
            let store = PgStore::connect_with_limits(*options, settings.db_max_connections, limits)
                .await
                .context("cannot connect to Postgres at DATABASE_URL")?
                .with_activity_granularity(granularity);
            if migrate {
                store.migrate().await?;
            }
            tracing::info!("store: postgres");
            Arc::new(store)
        }
        StoreChoice::Sqlite(path) => {
            let store = SqliteStore::open(&path, settings.db_max_connections)
                .await
                .with_context(|| format!("cannot open the SQLite file {}", path.display()))?
                .with_activity_granularity(granularity);
            if migrate {
                store.migrate().await?;
            }
            tracing::info!(
                path = %path.display(),
                "store: sqlite (one instance only; several instances behind a load balancer need DATABASE_URL=postgres://...)"
            );
            Arc::new(store)
        }
    };
    Ok(store)
}

/// A server, built once: its state, and what shutdown must stop (SSE streams, the Pusher
/// queue, the store).
pub struct App {
    state: AppState,
    /// Cancelled when shutdown begins: open SSE streams end so requests can drain.
    shutdown: CancellationToken,
    /// Background garbage collection, when on.
    gc: Option<GcSettings>,
}

impl App {
    /// Starts building a server over `store`: built-in mutators, anonymous users, no pokes and
    /// default limits until set otherwise.
    pub fn builder(store: Arc<dyn Store>) -> AppBuilder {
        AppBuilder {
            store,
            mutators: Mutators::builtin(),
            auth: Arc::new(Anonymous),
            http: HttpSettings::default(),
            push: PushLimits::default(),
            pulls: PullLimits::default(),
            webhook: None,
            private_channels: None,
            sinks: Vec::new(),
            pusher: None,
            sse: None,
            gc: None,
        }
    }

    /// The server the configuration describes: its store (migrated when REPLISYNC_AUTO_MIGRATE),
    /// Pusher pokes when PUSHER_* is set, SSE pokes when REPLISYNC_SSE says so.
    pub async fn from_config(config: &Config) -> anyhow::Result<App> {
        let http = config.http.settings().map_err(anyhow::Error::msg)?;
        let push = config.push.limits(http.request_timeout);
        let push = push.map_err(anyhow::Error::msg)?;
        let pulls = config.pull.limits(config.store.db_max_connections);
        let gc = config.gc.settings().map_err(anyhow::Error::msg)?;
        let (authenticator, webhook) =
            auth::settings::build(&config.auth, config.http.listen).await?;
        let pusher_config = pusher_from_config(config)?;
        let sse = config.sse.settings(pusher_config.is_some());
        let sse = sse.map_err(anyhow::Error::msg)?;
        let mutators = config.js.load()?;
        let store = open_store(config, config.store.auto_migrate).await?;
        let mut builder = App::builder(store)
            .gc(gc)
            .http(http)
            .push(push)
            .pulls(pulls)
            .authenticator(authenticator)
            .mutators(mutators);
        if let Some(webhook) = webhook {
            builder = builder.authz_webhook(webhook);
        }
        match pusher_config {
            Some(pusher_config) => {
                if config.auth.tokens_on() {
                    builder = builder.private_channels(PrivateChannels::new(&pusher_config));
                }
                builder =
                    builder.pusher(PusherPoker::start(pusher_config, PokerOptions::default()));
            }
            None => tracing::info!("pokes through Pusher are off: no PUSHER_* variables are set"),
        }
        if let Some(sse) = sse {
            builder = builder.sse(sse);
            tracing::info!("SSE pokes on at GET /spaces/{{space}}/poke (single instance only)");
        }
        Ok(builder.build())
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

/// The parts of an [`App`]; `build` puts them together once.
pub struct AppBuilder {
    store: Arc<dyn Store>,
    mutators: Mutators,
    auth: Arc<dyn Authenticator>,
    webhook: Option<Webhook>,
    private_channels: Option<Arc<PrivateChannels>>,
    http: HttpSettings,
    push: PushLimits,
    pulls: PullLimits,
    sinks: Vec<Arc<dyn PokeSink>>,
    pusher: Option<Arc<PusherPoker>>,
    sse: Option<SseSettings>,
    gc: Option<GcSettings>,
}

impl AppBuilder {
    pub fn mutators(mut self, mutators: Mutators) -> Self {
        self.mutators = mutators;
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

    /// Adds a destination for pokes.
    pub fn poke_sink(mut self, sink: Arc<dyn PokeSink>) -> Self {
        self.sinks.push(sink);
        self
    }

    /// Pokes through Pusher: a sink whose counters go to `/metrics` and whose queue shutdown
    /// drains.
    pub fn pusher(mut self, poker: Arc<PusherPoker>) -> Self {
        self.sinks.push(poker.clone());
        self.pusher = Some(poker);
        self
    }

    /// Serves `POST /pusher/auth`, which signs subscriptions to private poke channels.
    pub fn private_channels(mut self, channels: PrivateChannels) -> Self {
        self.private_channels = Some(Arc::new(channels));
        self
    }

    /// Serves the built-in SSE poke stream, with its keep-alive and caps.
    pub fn sse(mut self, settings: SseSettings) -> Self {
        self.sse = Some(settings);
        self
    }

    /// Collects idle client groups in the background while the server runs.
    pub fn gc(mut self, settings: GcSettings) -> Self {
        self.gc = Some(settings);
        self
    }

    pub fn build(self) -> App {
        let shutdown = CancellationToken::new();
        let mut sinks = self.sinks;
        let sse = self.sse.map(|settings| {
            let sse = Arc::new(SsePokes::new(
                settings.keep_alive,
                settings.limits,
                shutdown.clone(),
            ));
            sinks.push(sse.clone());
            sse
        });
        let metrics = Arc::new(Metrics {
            script_failures: self.mutators.script_failures().clone(),
            mutations_failed_write_limit: self.mutators.write_limit_failures().clone(),
            ..Metrics::default()
        });
        let mutators = Arc::new(self.mutators);
        let pokes = Pokes::new(sinks);
        let state = AppState::new(Parts {
            pulls: Arc::new(Pulls::new(self.store.clone(), metrics.clone(), self.pulls)),
            pushes: PushGroups::new(
                self.store.clone(),
                mutators.clone(),
                pokes,
                self.push.clone(),
                self.push.work_budget(self.http.request_timeout),
                metrics.clone(),
            ),
            store: self.store,
            auth: self.auth,
            authorizer: Arc::new(Authorizer::new(self.webhook, metrics.clone())),
            sse,
            push_bytes: InFlightBytes::new(self.push.max_bytes_in_flight),
            http: Arc::new(self.http),
            push: Arc::new(self.push),
            metrics,
            pusher: self.pusher,
            private_channels: self.private_channels,
            draining: Draining::default(),
        });
        App {
            state,
            shutdown,
            gc: self.gc,
        }
    }
}

/// Pusher's settings; with tokens on, spaces are poked on private channels (`private-space-abc`)
/// that only users who may read the space can subscribe to.
fn pusher_from_config(config: &Config) -> anyhow::Result<Option<PusherConfig>> {
    let Some(mut pusher) =
        PusherConfig::from_args(&config.pusher).context("invalid Pusher configuration")?
    else {
        return Ok(None);
    };
    if config.auth.tokens_on() && !pusher.channel_prefix.starts_with(PRIVATE_PREFIX) {
        pusher.channel_prefix = format!("{PRIVATE_PREFIX}{}", pusher.channel_prefix);
        pusher.validate().context("invalid Pusher configuration")?;
    }
    tracing::info!(channels = %format!("{}<space>", pusher.channel_prefix), "pokes through Pusher");
    Ok(Some(pusher))
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
    if let Some(poker) = &app.state.pusher {
        drain_pokes(poker, deadline).await;
    }
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

async fn drain_pokes(poker: &PusherPoker, deadline: tokio::time::Instant) {
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let undelivered = poker.shutdown(remaining).await;
    if undelivered > 0 {
        tracing::warn!(
            undelivered,
            "pokes pending at shutdown that were not delivered (rejected, failed or cut off by the deadline)"
        );
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
