//! A pass's loops over the store's garbage collection batches, under its lock, paced so that
//! pushes and pulls beside a background pass barely notice it.

use std::time::Instant;

use crate::store::{Collected, GcBatches, Store, StoreError};

/// How a garbage collection pass paces itself: `batch` rows per transaction, and after each
/// batch a pause `pause_factor` times as long as the batch took, so that a background pass
/// keeps at most 1/(1 + factor) of one database connection busy and pushes beside it barely
/// notice (0: no pauses, for `replisync gc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcPace {
    pub batch: usize,
    pub pause_factor: u32,
}

impl GcPace {
    /// Rows per batch, at least 1.
    pub fn batch(&self) -> usize {
        self.batch.max(1)
    }

    /// Waits after a batch that started at `batch_started`.
    pub async fn rest_after(&self, batch_started: Instant) {
        if self.pause_factor > 0 {
            tokio::time::sleep(batch_started.elapsed() * self.pause_factor).await;
        }
    }
}

/// Deletes the client groups (and their clients) last active before `inactive_before`
/// (seconds since the Unix epoch), a batch of groups at a time, until none is left,
/// remembering each as collected at `now`; then forgets the groups collected before
/// `inactive_before`. `None` when another instance sharing the database is collecting.
pub(super) async fn collect_client_groups(
    store: &dyn Store,
    now: i64,
    inactive_before: i64,
    pace: GcPace,
) -> Result<Option<Collected>, StoreError> {
    let Some(mut batches) = store.lock_gc().await? else {
        return Ok(None);
    };
    let collected = remove_and_forget_groups(&mut *batches, now, inactive_before, pace).await;
    batches.unlock().await;
    collected.map(Some)
}

/// Removes the tombstones written before `deleted_before` (seconds since the Unix epoch), a
/// batch at a time, each under its space's write lock. `None` when another instance sharing
/// the database is collecting.
pub(super) async fn compact_tombstones(
    store: &dyn Store,
    deleted_before: i64,
    pace: GcPace,
) -> Result<Option<u64>, StoreError> {
    let Some(mut batches) = store.lock_gc().await? else {
        return Ok(None);
    };
    let removed = compact(&mut *batches, deleted_before, pace).await;
    batches.unlock().await;
    removed.map(Some)
}

/// Removes idle groups until a batch comes back short, then forgets old collected ones likewise.
async fn remove_and_forget_groups(
    batches: &mut dyn GcBatches,
    now: i64,
    inactive_before: i64,
    pace: GcPace,
) -> Result<Collected, StoreError> {
    let batch = pace.batch();
    let mut collected = Collected::default();
    loop {
        let started = Instant::now();
        let gone = batches
            .remove_idle_client_groups(now, inactive_before, batch)
            .await?;
        pace.rest_after(started).await;
        collected.client_groups += gone.client_groups;
        collected.clients += gone.clients;
        if gone.client_groups < batch as u64 {
            break;
        }
    }
    loop {
        let started = Instant::now();
        let forgotten = batches
            .forget_collected_groups(inactive_before, batch)
            .await?;
        pace.rest_after(started).await;
        collected.forgotten_groups += forgotten as u64;
        if forgotten < batch {
            return Ok(collected);
        }
    }
}

/// Compacts batch after batch until no old tombstone is left.
async fn compact(
    batches: &mut dyn GcBatches,
    deleted_before: i64,
    pace: GcPace,
) -> Result<u64, StoreError> {
    let mut removed = 0;
    loop {
        let started = Instant::now();
        let Some(count) = batches
            .compact_tombstones(deleted_before, pace.batch())
            .await?
        else {
            return Ok(removed);
        };
        pace.rest_after(started).await;
        removed += count;
    }
}
