//! Garbage collection: forgets client groups idle past REPLISYNC_CLIENT_TTL and removes deletions
//! older than REPLISYNC_TOMBSTONE_TTL, in the background on a schedule and on demand (`replisync gc`).
//! Beside it, the store's planner statistics are kept fresh, whatever the database's autovacuum.

mod batches;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub mod settings;

use crate::metrics::Metrics;
use crate::store::{Collected, Store, StoreError, unix_now};

pub use batches::GcPace;

/// Client groups deleted per transaction: short enough that pushes and pulls never wait long
/// behind one, large enough that a backlog of millions drains in minutes.
pub const BATCH: usize = 1000;

/// When and what garbage collection forgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcSettings {
    /// Client groups idle for longer than this are deleted, with their clients.
    pub client_ttl: Duration,
    /// Deleted entries older than this are removed; a pull from a cookie older than a removed
    /// deletion gets the whole space.
    pub tombstone_ttl: Duration,
    /// Time between background passes; `None`: no background passes.
    pub interval: Option<Duration>,
    /// After each batch, a pause this many times as long as the batch took (see [`GcPace`]).
    pub pause_factor: u32,
}

/// One pass as of `now` (seconds since the Unix epoch): deletes the client groups idle for
/// longer than the client TTL, then the tombstones older than the tombstone TTL, and counts
/// them in `metrics`. `None` when another instance sharing the database is collecting.
pub async fn collect(
    store: &dyn Store,
    metrics: &Metrics,
    now: i64,
    settings: &GcSettings,
) -> Result<Option<Collected>, StoreError> {
    let started = Instant::now();
    let pace = GcPace {
        batch: BATCH,
        pause_factor: settings.pause_factor,
    };
    let Some(mut collected) =
        batches::collect_client_groups(store, now, before(now, settings.client_ttl), pace).await?
    else {
        return Ok(None);
    };
    metrics
        .gc_client_groups_removed
        .add(collected.client_groups);
    metrics.gc_clients_removed.add(collected.clients);
    metrics
        .gc_client_groups_forgotten
        .add(collected.forgotten_groups);
    // Another instance may take the lock between the two steps: its pass compacts instead.
    let tombstones = batches::compact_tombstones(store, before(now, settings.tombstone_ttl), pace)
        .await?
        .unwrap_or(0);
    collected.tombstones = tombstones;
    metrics.gc_tombstones_removed.add(tombstones);
    metrics
        .gc_last_run
        .set(u64::try_from(unix_now()).unwrap_or(0));
    metrics
        .gc_last_run_duration
        .set(started.elapsed().as_secs_f64());
    Ok(Some(collected))
}

/// `now` minus `ttl`, in seconds since the Unix epoch.
fn before(now: i64, ttl: Duration) -> i64 {
    now.saturating_sub(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX))
}

/// How often the store's tables are checked for stale planner statistics (a cheap read of the
/// database's counters; an ANALYZE only for tables that changed by a tenth since their last).
pub const STATISTICS_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Refreshes the store's planner statistics every [`STATISTICS_CHECK_INTERVAL`] until `stop`.
pub fn spawn_statistics_refresh(store: Arc<dyn Store>, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(STATISTICS_CHECK_INTERVAL) => {}
            }
            match store.refresh_statistics().await {
                Ok(Some(tables)) if !tables.is_empty() => {
                    tracing::info!(
                        ?tables,
                        "analyzed tables that changed much since their last statistics"
                    );
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "refreshing planner statistics failed; the next check retries")
                }
            }
        }
    });
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
            log_pass(collect(&*store, &metrics, unix_now(), &settings).await);
        }
    });
}

/// One log line per pass: what it removed, or why it did nothing.
pub fn log_pass(result: Result<Option<Collected>, StoreError>) {
    match result {
        Ok(Some(collected)) => tracing::info!(
            client_groups = collected.client_groups,
            clients = collected.clients,
            forgotten_groups = collected.forgotten_groups,
            tombstones = collected.tombstones,
            "garbage collection: removed idle client groups and old deletions"
        ),
        Ok(None) => {
            tracing::info!("garbage collection: another instance is collecting; skipped")
        }
        Err(error) => tracing::warn!(%error, "garbage collection failed; next pass retries"),
    }
}
