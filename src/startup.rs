//! Start-up and shutdown: open the store, build the `App` once (from `Config` in the binary,
//! part by part in tests), serve it on a listener until a shutdown future resolves, then drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{Anonymous, Authenticator};
use crate::config::{Command, Config, HttpSettings, StoreChoice};
use crate::http::{AppState, router};
use crate::metrics::Metrics;
use crate::mutators::Mutators;
use crate::poke::pusher::{PokerOptions, PusherConfig, PusherPoker};
use crate::poke::sse::SsePokes;
use crate::poke::{PokeSink, Pokes};
use crate::pull::Pulls;
use crate::store::Store;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;

/// Runs the command line: serve (the default) or migrate.
pub async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let store = open_store(&config, true).await?;
            tracing::info!("migrations applied");
            store.close().await;
            Ok(())
        }
        Command::Serve => {
            let app = App::from_config(&config).await?;
            let listener = TcpListener::bind(config.listen).await.with_context(|| {
                format!("cannot listen on {} (REPLISYNC_LISTEN)", config.listen)
            })?;
            serve(listener, app, shutdown_signal()).await
        }
    }
}

/// Opens the configured store and, when asked, applies its migrations.
pub async fn open_store(config: &Config, migrate: bool) -> anyhow::Result<Arc<dyn Store>> {
    let choice = config.store_choice().map_err(anyhow::Error::msg)?;
    let store: Arc<dyn Store> = match choice {
        StoreChoice::Postgres(options) => {
            let store = PgStore::connect(*options, config.db_max_connections)
                .await
                .context("cannot connect to Postgres at DATABASE_URL")?;
            if migrate {
                store.migrate().await?;
            }
            tracing::info!("store: postgres");
            Arc::new(store)
        }
        StoreChoice::Sqlite(path) => {
            let store = SqliteStore::open(&path, config.db_max_connections)
                .await
                .with_context(|| format!("cannot open the SQLite file {}", path.display()))?;
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
            sinks: Vec::new(),
            pusher: None,
            sse_keep_alive: None,
        }
    }

    /// The server the configuration describes: its store (migrated when REPLISYNC_AUTO_MIGRATE),
    /// Pusher pokes when PUSHER_* is set, SSE pokes when REPLISYNC_SSE says so.
    pub async fn from_config(config: &Config) -> anyhow::Result<App> {
        let http = config.http_settings().map_err(anyhow::Error::msg)?;
        let pusher_config = PusherConfig::from_env(|name| std::env::var(name).ok())
            .context("invalid Pusher configuration")?;
        let store = open_store(config, config.auto_migrate).await?;
        let mut builder = App::builder(store).http(http);
        match pusher_config {
            Some(pusher_config) => {
                builder =
                    builder.pusher(PusherPoker::start(pusher_config, PokerOptions::default()));
            }
            None => tracing::info!("pokes through Pusher are off: no PUSHER_* variables are set"),
        }
        if config.sse.unwrap_or(builder.pusher.is_none()) {
            builder = builder.sse(Duration::from_secs(config.sse_keepalive_secs.max(1)));
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

    pub fn router(&self) -> Router {
        router(self.state.clone())
    }
}

/// The parts of an [`App`]; `build` puts them together once.
pub struct AppBuilder {
    store: Arc<dyn Store>,
    mutators: Mutators,
    auth: Arc<dyn Authenticator>,
    http: HttpSettings,
    sinks: Vec<Arc<dyn PokeSink>>,
    pusher: Option<Arc<PusherPoker>>,
    sse_keep_alive: Option<Duration>,
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

    pub fn http(mut self, http: HttpSettings) -> Self {
        self.http = http;
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

    /// Serves the built-in SSE poke stream, with a keep-alive comment every `keep_alive`.
    pub fn sse(mut self, keep_alive: Duration) -> Self {
        self.sse_keep_alive = Some(keep_alive);
        self
    }

    pub fn build(self) -> App {
        let shutdown = CancellationToken::new();
        let mut sinks = self.sinks;
        let sse = self.sse_keep_alive.map(|keep_alive| {
            let sse = Arc::new(SsePokes::new(keep_alive, shutdown.clone()));
            sinks.push(sse.clone());
            sse
        });
        let metrics = Arc::new(Metrics::default());
        let state = AppState {
            pulls: Arc::new(Pulls::new(self.store.clone(), metrics.clone())),
            store: self.store,
            mutators: Arc::new(self.mutators),
            auth: self.auth,
            pokes: Pokes::new(sinks),
            sse,
            http: self.http,
            metrics,
            pusher: self.pusher,
        };
        App { state, shutdown }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then gives requests and pending
/// pokes one shutdown timeout to finish, and closes the store.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "replisync listening");
    // Small request/response exchanges: send each write at once (no Nagle delay).
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    let stop = app.shutdown.clone();
    let server =
        axum::serve(listener, app.router()).with_graceful_shutdown(stop.clone().cancelled_owned());
    let mut server = tokio::spawn(server.into_future());
    // One deadline for everything shutdown waits for: requests, then pending pokes.
    let budget = app.state.http.shutdown_timeout;
    let mut deadline = tokio::time::Instant::now() + budget;
    tokio::select! {
        result = &mut server => result.context("server task failed")??,
        () = shutdown => {
            tracing::info!("shutting down: finishing requests and pokes");
            stop.cancel();
            deadline = tokio::time::Instant::now() + budget;
            if tokio::time::timeout_at(deadline, server).await.is_err() {
                tracing::warn!("requests still running at the shutdown deadline were cut off");
            }
        }
    }
    if let Some(poker) = &app.state.pusher {
        drain_pokes(poker, deadline).await;
    }
    app.state.store.close().await;
    tracing::info!("stopped");
    Ok(())
}

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
