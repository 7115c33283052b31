//! Garbage collection: forgets client groups that have neither pushed nor pulled for
//! REPLISYNC_CLIENT_TTL, in the background on a schedule and on demand (`replisync gc`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{Collected, Store, StoreError, unix_now};

/// Client groups deleted per transaction: short enough that pushes and pulls never wait long
/// behind one, large enough that a backlog of millions drains in minutes.
pub const BATCH: usize = 1000;

/// When and what garbage collection forgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcSettings {
    /// Client groups idle for longer than this are deleted, with their clients.
    pub client_ttl: Duration,
    /// Time between background passes; `None`: no background passes.
    pub interval: Option<Duration>,
}

/// One pass as of `now` (seconds since the Unix epoch): deletes the client groups idle for
/// longer than `client_ttl` and counts them in `metrics`. `None` when another instance sharing
/// the database is collecting.
pub async fn collect(
    store: &dyn Store,
    metrics: &Metrics,
    now: i64,
    client_ttl: Duration,
) -> Result<Option<Collected>, StoreError> {
    let started = Instant::now();
    let ttl = i64::try_from(client_ttl.as_secs()).unwrap_or(i64::MAX);
    let collected = store
        .collect_client_groups(now.saturating_sub(ttl), BATCH)
        .await?;
    if let Some(collected) = collected {
        metrics
            .gc_client_groups_removed
            .add(collected.client_groups);
        metrics.gc_clients_removed.add(collected.clients);
        metrics
            .gc_last_run
            .set(u64::try_from(unix_now()).unwrap_or(0));
        metrics
            .gc_last_run_duration_ms
            .set(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
    }
    Ok(collected)
}

/// Runs a pass every `settings.interval` (the first one interval after start) until `stop`.
/// A pass in progress is finished, not cut: each batch is short.
pub fn spawn_schedule(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    settings: GcSettings,
    stop: CancellationToken,
) {
    let Some(interval) = settings.interval else {
        tracing::info!("background garbage collection is off (REPLISYNC_GC_INTERVAL=0)");
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            log_pass(collect(&*store, &metrics, unix_now(), settings.client_ttl).await);
        }
    });
}

/// One log line per pass: what it removed, or why it did nothing.
pub fn log_pass(result: Result<Option<Collected>, StoreError>) {
    match result {
        Ok(Some(collected)) => tracing::info!(
            client_groups = collected.client_groups,
            clients = collected.clients,
            "garbage collection: removed idle client groups"
        ),
        Ok(None) => {
            tracing::info!("garbage collection: another instance is collecting; skipped")
        }
        Err(error) => tracing::warn!(%error, "garbage collection failed; next pass retries"),
    }
}
