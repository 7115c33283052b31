//! replisync: a sync server for Replicache apps. Push and pull (protocol version 1) on
//! Postgres or embedded SQLite, with per-space versions and pokes through Pusher or SSE.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod config;
pub mod error;
pub mod metrics;
pub mod mutators;
pub mod poke;
pub mod protocol;
pub mod pull;
pub mod push;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::config::{Command, Config, StoreChoice};
use crate::poke::pusher::{PokerOptions, PusherConfig, PusherPoker};
use crate::poke::sse::SsePokes;
use crate::poke::{PokeSink, Pokes};
use crate::store::Store;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;

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

/// Runs the command line: serve (the default) or migrate.
pub async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let store = open_store(&config, true).await?;
            tracing::info!("migrations applied");
            store.close().await;
            Ok(())
        }
        Command::Serve => serve(config).await,
    }
}

/// Serves until SIGTERM or Ctrl-C, then drains requests and pokes within the shutdown timeout.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let http = config.http_settings().map_err(anyhow::Error::msg)?;
    let pusher_config = PusherConfig::from_env(|name| std::env::var(name).ok())
        .context("invalid Pusher configuration")?;
    let store = open_store(&config, config.auto_migrate).await?;

    let shutdown = CancellationToken::new();
    let mut sinks: Vec<Arc<dyn PokeSink>> = Vec::new();
    let pusher = pusher_config.map(|c| PusherPoker::start(c, PokerOptions::default()));
    match &pusher {
        Some(poker) => sinks.push(poker.clone()),
        None => tracing::info!("pokes through Pusher are off: no PUSHER_* variables are set"),
    }
    let sse = config.sse.unwrap_or(pusher.is_none()).then(|| {
        Arc::new(SsePokes::new(
            Duration::from_secs(config.sse_keepalive_secs.max(1)),
            shutdown.clone(),
        ))
    });
    if let Some(sse) = &sse {
        sinks.push(sse.clone());
        tracing::info!("SSE pokes on at GET /spaces/{{space}}/poke (single instance only)");
    }

    let mut state = AppState::new(store.clone());
    state.pokes = Pokes::new(sinks);
    state.sse = sse;
    state.http = http;
    state.pusher = pusher.clone();
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (REPLISYNC_LISTEN)", config.listen))?;
    tracing::info!(address = %listener.local_addr()?, "replisync listening");

    // Small request/response exchanges: send each write at once (no Nagle delay).
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, app::router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let mut server = tokio::spawn(server.into_future());
    // One deadline for everything shutdown waits for: requests, then pending pokes.
    let shutdown_budget = Duration::from_secs(config.shutdown_timeout_secs);
    let mut shutdown_deadline = tokio::time::Instant::now() + shutdown_budget;
    tokio::select! {
        result = &mut server => result.context("server task failed")??,
        () = shutdown_signal() => {
            tracing::info!("shutting down: finishing requests and pokes");
            shutdown.cancel();
            shutdown_deadline = tokio::time::Instant::now() + shutdown_budget;
            if tokio::time::timeout_at(shutdown_deadline, server).await.is_err() {
                tracing::warn!("requests still running at the shutdown deadline were cut off");
            }
        }
    }
    if let Some(poker) = pusher {
        let remaining = shutdown_deadline.saturating_duration_since(tokio::time::Instant::now());
        let undelivered = poker.shutdown(remaining).await;
        if undelivered > 0 {
            tracing::warn!(
                undelivered,
                "pokes pending at shutdown that were not delivered (rejected, failed or cut off by the deadline)"
            );
        }
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
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
