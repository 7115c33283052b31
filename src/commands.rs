//! The command line's commands: `serve` (the default), `migrate`, `gc`, `export`, `import` and
//! `healthcheck`, each
//! run from the configuration; building the server is `startup`'s job.

use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::{Command, Config};
use crate::gc::{self, GcSettings};
use crate::metrics::Metrics;
use crate::startup::{
    App, open_store, open_store_for_transfer, serve_with_metrics, shutdown_signal,
};
use crate::store::unix_now;
use crate::transfer;

/// Runs the command line: serve (the default), migrate, gc or healthcheck.
pub async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let store = open_store(&config, true).await?;
            tracing::info!("migrations applied");
            store.close().await;
            Ok(())
        }
        Command::Healthcheck => healthcheck(&config).await,
        Command::Gc => collect_once(&config).await,
        Command::Export(args) => {
            let store = open_store_for_transfer(&config).await?;
            let exported = transfer::export(&*store, &args).await;
            store.close().await;
            let exported = exported?;
            eprintln!(
                "exported {} spaces, {} entries",
                exported.spaces, exported.entries
            );
            Ok(())
        }
        Command::Import(args) => {
            let store = open_store_for_transfer(&config).await?;
            let imported = transfer::import(&*store, &args).await;
            store.close().await;
            let imported = imported?;
            for (space, version) in &imported.spaces {
                eprintln!("imported space {space} at version {version}");
            }
            eprintln!(
                "imported {} spaces, {} entries",
                imported.spaces.len(),
                imported.entries
            );
            Ok(())
        }
        Command::Serve => {
            let shutdown = shutdown_signal();
            let app = App::from_config(&config).await?;
            let listen = config.http.listen;
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen} (REPLISYNC_LISTEN)"))?;
            let metrics_listener = match config.http.metrics_listen {
                Some(address) => Some(TcpListener::bind(address).await.with_context(|| {
                    format!("cannot listen on {address} (REPLISYNC_METRICS_LISTEN)")
                })?),
                None => None,
            };
            serve_with_metrics(listener, metrics_listener, app, shutdown).await
        }
    }
}

/// `replisync gc`: one garbage collection pass, reported on standard output.
async fn collect_once(config: &Config) -> anyhow::Result<()> {
    // Asked for by an operator: at full speed, without the background passes' pauses.
    let settings = GcSettings {
        pause_factor: 0,
        ..config.gc.settings().map_err(anyhow::Error::msg)?
    };
    let store = open_store(config, config.store.auto_migrate).await?;
    let result = gc::collect(&*store, &Metrics::default(), unix_now(), &settings).await;
    store.close().await;
    match result? {
        Some(collected) => println!(
            "removed {} client groups and {} clients idle for more than {} s, and {} deletions older than {} s",
            collected.client_groups,
            collected.clients,
            settings.client_ttl.as_secs(),
            collected.tombstones,
            settings.tombstone_ttl.as_secs()
        ),
        None => println!("another instance is collecting; nothing done"),
    }
    Ok(())
}

/// `replisync healthcheck`: GET /healthz on this machine at REPLISYNC_LISTEN's port; an error
/// (so exit status 1) unless it answers 200.
async fn healthcheck(config: &Config) -> anyhow::Result<()> {
    let mut address = config.http.listen;
    if address.ip().is_unspecified() {
        address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{address}/healthz");
    let response = reqwest::Client::builder()
        .timeout(HEALTHCHECK_TIMEOUT)
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("{url} does not answer"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "{url} answered {}",
        response.status()
    );
    Ok(())
}

const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(5);
