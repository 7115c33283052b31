//! The poker's tuning knobs ([`PokerOptions`]) and its counters: atomic [`Counters`] that the
//! worker bumps, read as a [`PokerStats`] snapshot for /metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::timing::Timing;

#[derive(Debug, Clone)]
pub struct PokerOptions {
    /// The least time between the end of one call and the start of the next: changes meanwhile
    /// coalesce into that next call. A change when no call ended this recently goes out at once.
    pub coalesce_window: Duration,
    /// When this many spaces wait, the oldest is dropped (a lost hint, covered by pullInterval).
    pub max_pending_spaces: usize,
    /// Calls per batch, the first one included, before giving up on it.
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles each retry up to `max_backoff`, plus jitter.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Cap on a service's asked-for wait (a 429's `retry-after`).
    pub max_retry_after: Duration,
    /// Bounds connecting to the service (where the transport connects separately).
    pub connect_timeout: Duration,
    /// Bounds each call, connecting included.
    pub request_timeout: Duration,
    /// The same rejection (a 4xx from Pusher) is logged at error level at most once per this interval.
    pub rejection_log_interval: Duration,
}

impl Default for PokerOptions {
    fn default() -> Self {
        PokerOptions {
            coalesce_window: Duration::from_millis(5),
            max_pending_spaces: 10_000,
            max_attempts: 4,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            rejection_log_interval: Duration::from_secs(60),
        }
    }
}

/// A snapshot of the poker's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PokerStats {
    /// Calls the service accepted.
    pub calls_ok: u64,
    /// Spaces in accepted calls.
    pub spaces_poked: u64,
    /// Spaces dropped before any call: pending set full, or changed after shutdown began.
    pub dropped_spaces: u64,
    /// Calls that failed (error status, timeout, connection error), retried or not.
    pub failed_calls: u64,
    /// Spaces whose poke was abandoned: rejected, out of attempts, or cut by shutdown's deadline.
    pub given_up_spaces: u64,
    /// Calls repeated after a transient failure.
    pub retries: u64,
}

/// The live counters behind [`PokerStats`] (same meanings).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) calls_ok: AtomicU64,
    pub(super) spaces_poked: AtomicU64,
    pub(super) dropped_spaces: AtomicU64,
    pub(super) failed_calls: AtomicU64,
    pub(super) given_up_spaces: AtomicU64,
    pub(super) retries: AtomicU64,
    /// From each poked space's (earliest pending) commit to the service accepting the call.
    pub(super) delay: Timing,
}

impl Counters {
    pub(super) fn snapshot(&self) -> PokerStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PokerStats {
            calls_ok: read(&self.calls_ok),
            spaces_poked: read(&self.spaces_poked),
            dropped_spaces: read(&self.dropped_spaces),
            failed_calls: read(&self.failed_calls),
            given_up_spaces: read(&self.given_up_spaces),
            retries: read(&self.retries),
        }
    }
}

/// Adds `amount` to `counter` (relaxed: the counters are only read for metrics).
pub(super) fn add(counter: &AtomicU64, amount: usize) {
    counter.fetch_add(amount as u64, Ordering::Relaxed);
}
