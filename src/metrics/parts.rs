//! What other parts own, read when `/metrics` is scraped: the poke services' counters and their
//! delays from commit to delivery, SSE's streams, and the database pools' connections.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use crate::poke::delivery::PokerStats;
use crate::poke::sinks::Pokes;
use crate::store::{KnownCounts, Store};

/// Reads the pokes' and the store's figures at each scrape.
pub(super) struct PartsCollector {
    pokes: Arc<Pokes>,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for PartsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartsCollector")
            .field("pokes", &self.pokes)
            .field("store", &self.store.kind())
            .finish()
    }
}

impl PartsCollector {
    pub(super) fn new(pokes: Arc<Pokes>, store: Arc<dyn Store>) -> Self {
        PartsCollector { pokes, store }
    }
}

impl Collector for PartsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_pokes(&mut encoder)?;
        self.encode_pools(&mut encoder)?;
        self.encode_commit_batches(&mut encoder)
    }
}

impl PartsCollector {
    fn encode_pokes(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.pokes.stats();
        if let Some(sse) = &stats.sse {
            let spaces = sse.watched_spaces as i64;
            let streams = sse.open_streams as i64;
            gauge(
                encoder,
                "replisync_sse_watched_spaces",
                "Spaces with at least one open SSE poke stream.",
                spaces,
            )?;
            gauge(
                encoder,
                "replisync_sse_open_streams",
                "Open SSE poke streams.",
                streams,
            )?;
        }
        if let Some(pusher) = &stats.pusher {
            poker_counters(encoder, "pusher", "Pusher", pusher)?;
        }
        if let Some(socketio) = &stats.socketio {
            poker_counters(encoder, "socketio", "socket.io (Redis)", &socketio.poker)?;
            counter(
                encoder,
                "replisync_socketio_receivers",
                "Redis subscribers (socket.io processes) that received a poke, summed over spaces.",
                socketio.receivers,
            )?;
        }
        let delays = self.pokes.delays();
        if delays.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "replisync_poke_delay",
            "Time from a commit to its poke's delivery, by service: pusher and socketio (the service accepted the call), sse (the event was handed to the stream).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (service, timing) in delays {
            let labels = [("service", service)];
            timing.histogram().encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn encode_pools(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pools = self.store.pools();
        if pools.is_empty() {
            return Ok(());
        }
        let mut connections = encoder.encode_descriptor(
            "replisync_db_pool_connections",
            "Database connections open, by pool (postgres; sqlite: writer, readers) and state (in_use, idle).",
            None,
            MetricType::Gauge,
        )?;
        for pool in &pools {
            let idle = pool.idle as i64;
            let in_use = i64::from(pool.size).saturating_sub(idle).max(0);
            for (state, value) in [("in_use", in_use), ("idle", idle)] {
                let labels = [("pool", pool.name), ("state", state)];
                ConstGauge::new(value).encode(connections.encode_family(&labels)?)?;
            }
        }
        let mut max = encoder.encode_descriptor(
            "replisync_db_pool_max_connections",
            "The most connections each pool opens (REPLISYNC_DATABASE_MAX_CONNECTIONS for postgres).",
            None,
            MetricType::Gauge,
        )?;
        for pool in &pools {
            let labels = [("pool", pool.name)];
            ConstGauge::new(i64::from(pool.max)).encode(max.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl PartsCollector {
    fn encode_commit_batches(
        &self,
        encoder: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let counts = self.store.commit_batches();
        counter(
            encoder,
            "replisync_commit_batches",
            "Commits that carried the push groups of several spaces (commit batching).",
            counts.batches,
        )?;
        counter(
            encoder,
            "replisync_commit_batched_groups",
            "Push groups (each the pushes to one space) committed in those batches.",
            counts.batched_groups,
        )?;
        gauge(
            encoder,
            "replisync_commit_batch_waiting",
            "Push groups waiting for a batch's commit now.",
            counts.waiting as i64,
        )?;
        counter(
            encoder,
            "replisync_read_batches",
            "Statements that carried the reads of several pushes (read batching).",
            counts.read_batches,
        )?;
        counter(
            encoder,
            "replisync_batched_reads",
            "Reads of pushes (client state, mutations' gets) carried by those statements.",
            counts.batched_reads,
        )?;
        gauge(
            encoder,
            "replisync_read_batch_waiting",
            "Reads of pushes waiting for the next shared statement now.",
            counts.reads_waiting as i64,
        )?;
        self.encode_known_states(encoder, counts.known)
    }

    /// What the store knew of spaces (REPLISYNC_KNOWN_STATE_MB): reads it spared, and its size.
    fn encode_known_states(
        &self,
        encoder: &mut DescriptorEncoder,
        known: KnownCounts,
    ) -> Result<(), std::fmt::Error> {
        counter(
            encoder,
            "replisync_push_reads_known",
            "Pushes' first reads answered from what the instance knew of the space, with no statement.",
            known.served,
        )?;
        counter(
            encoder,
            "replisync_push_reads_known_stale",
            "Of those, pushes whose commit found the space moved by another writer (run again from a fresh read).",
            known.stale,
        )?;
        let bytes = i64::try_from(known.bytes).unwrap_or(i64::MAX);
        ConstGauge::new(bytes).encode(encoder.encode_descriptor(
            "replisync_known_state",
            "Bytes kept of what the instance knows of the spaces it pushed to lately.",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?)
    }
}

/// The counters of one remote poke service (`replisync_{prefix}_*`), which logs call `service`.
fn poker_counters(
    encoder: &mut DescriptorEncoder,
    prefix: &str,
    service: &str,
    stats: &PokerStats,
) -> Result<(), std::fmt::Error> {
    for (name, help, value) in [
        (
            "calls_ok",
            format!("Calls {service} accepted."),
            stats.calls_ok,
        ),
        (
            "spaces_poked",
            "Spaces in accepted calls.".to_owned(),
            stats.spaces_poked,
        ),
        (
            "failed_calls",
            "Calls that failed, retried or not.".to_owned(),
            stats.failed_calls,
        ),
        (
            "retries",
            "Calls repeated after a transient failure.".to_owned(),
            stats.retries,
        ),
        (
            "given_up_spaces",
            "Pokes abandoned (rejected, out of attempts, shutdown).".to_owned(),
            stats.given_up_spaces,
        ),
        (
            "dropped_spaces",
            "Pokes dropped from a full queue.".to_owned(),
            stats.dropped_spaces,
        ),
    ] {
        counter(encoder, &format!("replisync_{prefix}_{name}"), &help, value)?;
    }
    Ok(())
}

/// A counter family of one sample (`name` without `_total`, which the text adds).
fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}
