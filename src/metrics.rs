//! Counters an operator (and the benchmark) reads at `GET /metrics`, in Prometheus text format:
//! requests served, the database reads they cost, and how pokes fare (Pusher, socket.io, SSE).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::poke::delivery::PokerStats;
use crate::poke::sinks::PokeStats;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn increment(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (open connections).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(&self, n: u64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// Push requests answered 200.
    pub pushes: Counter,
    /// Pushes that committed a change (and poked).
    pub push_commits: Counter,
    /// Pull requests answered with a patch.
    pub pulls: Counter,
    /// Database snapshots read for pulls (coalesced pulls share one).
    pub pull_reads: Counter,
    /// Streamed pulls cut off because the client stopped reading or took too long.
    pub pull_streams_cut: Counter,
    /// Streamed pulls (first pulls, large deltas) refused because too many were in flight.
    pub first_pulls_refused: Counter,
    /// Incremental pulls whose delta was too large to share, streamed on their own.
    pub pull_deltas_streamed: Counter,
    /// Requests refused 401: no token, or a malformed, expired or badly signed one.
    pub unauthorized: Counter,
    /// Requests refused 403: the user may not use the space (or the client group).
    pub forbidden: Counter,
    /// Pushes refused 413: a body over REPLISYNC_MAX_PUSH_BODY_BYTES.
    pub push_refused_too_large: Counter,
    /// Pushes refused 503: REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT was taken by other pushes.
    pub push_refused_busy: Counter,
    /// Pushes refused 400: more client ids than REPLISYNC_MAX_CLIENTS_PER_PUSH.
    pub push_refused_too_many_clients: Counter,
    /// Pushes that applied part of their mutations (REPLISYNC_MAX_MUTATIONS_PER_PUSH or the
    /// time budget) and left the rest for the client's next push.
    pub push_partial: Counter,
    /// Transactions that applied pushes (a group of pushes to one space shares one).
    pub push_groups: Counter,
    /// Pushes applied in a transaction shared with others to their space (group commit).
    pub pushes_grouped: Counter,
    /// Push groups run again because a concurrent writer got in the way (another instance
    /// committed to the space after the group read it, most often).
    pub push_conflicts: Counter,
    /// Calls made to the authorization webhook.
    pub authz_webhook_calls: Counter,
    /// Authorization decisions answered from the cache.
    pub authz_cache_hits: Counter,
    /// Open client connections.
    pub open_connections: Gauge,
    /// Bytes of the push body budget (REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT) held by pushes being
    /// read or applied, counted in whole KiB.
    pub push_bytes_in_flight: Gauge,
    /// Pushes waiting for their space's transaction, to be applied in its next group.
    pub pushes_waiting: Gauge,
    /// Incremental pulls waiting for the next read of their (space, cookie), which they share.
    pub pulls_waiting: Gauge,
    /// Client groups removed by garbage collection (idle past REPLISYNC_CLIENT_TTL).
    pub gc_client_groups_removed: Counter,
    /// Clients removed with their groups.
    pub gc_clients_removed: Counter,
    /// Removed client groups forgotten a TTL after their removal.
    pub gc_client_groups_forgotten: Counter,
    /// Deletions (tombstones) removed by compaction.
    pub gc_tombstones_removed: Counter,
    /// Pulls answered with the whole space because their cookie was older than the space's
    /// compacted version.
    pub pull_resets: Counter,
    /// When this instance's last garbage collection pass ended (seconds since the Unix epoch;
    /// 0 before the first), and how long it took in milliseconds.
    pub gc_last_run: Gauge,
    pub gc_last_run_duration_ms: Gauge,
    /// Connections refused (503, or closed at once) because REPLISYNC_MAX_CONNECTIONS were open.
    pub connections_refused: Counter,
    /// Connections closed because request headers did not arrive within
    /// REPLISYNC_HEADER_READ_TIMEOUT_SECS.
    pub header_read_timeouts: Counter,
    /// Keep-alive connections closed after REPLISYNC_IDLE_TIMEOUT_SECS without a request.
    pub idle_closes: Counter,
    /// Requests cut (503, connection closed) after REPLISYNC_REQUEST_TIMEOUT_SECS.
    pub requests_timed_out: Counter,
    /// Requests cut (408, connection closed) because their body paused longer than
    /// REPLISYNC_BODY_READ_TIMEOUT_SECS.
    pub request_bodies_stalled: Counter,
    /// SSE poke streams refused 503 over REPLISYNC_SSE_MAX_STREAMS,
    /// REPLISYNC_SSE_MAX_STREAMS_PER_SPACE or REPLISYNC_SSE_MAX_STREAMS_PER_USER.
    pub sse_streams_refused: Counter,
    /// Of those, refused over REPLISYNC_SSE_MAX_STREAMS_PER_USER (one user's share).
    pub sse_streams_refused_per_user: Counter,
}

/// What the app's `Mutators` count (they own these counters; `/metrics` reads them).
#[derive(Debug)]
pub struct MutatorCounts<'a> {
    /// JavaScript mutations that failed, by reason.
    pub script_failures: &'a ScriptFailures,
    /// Mutations (built-in or JavaScript) failed because their push's mutators had put more
    /// than REPLISYNC_MAX_PUSH_WRITE_BYTES.
    pub failed_write_limit: u64,
}

/// JavaScript mutations that failed, by reason. The mutation's writes were discarded; it still
/// counts as processed.
#[derive(Debug, Default)]
pub struct ScriptFailures {
    /// It threw, or its promise was rejected or never settled.
    pub threw: Counter,
    /// It ran past REPLISYNC_MUTATOR_TIMEOUT_MS.
    pub timeout: Counter,
    /// It allocated past REPLISYNC_MUTATOR_MEMORY_MB.
    pub memory: Counter,
}

impl ScriptFailures {
    fn render(&self, out: &mut String) {
        let name = "replisync_js_mutator_failures_total";
        let _ = writeln!(
            out,
            "# HELP {name} JavaScript mutations that failed, by reason (threw, timeout, memory).\n# TYPE {name} counter"
        );
        for (reason, counter) in [
            ("threw", &self.threw),
            ("timeout", &self.timeout),
            ("memory", &self.memory),
        ] {
            let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {}", counter.get());
        }
    }
}

impl Metrics {
    /// The counters, the mutators', the Pusher poker's when pokes go through Pusher, and the
    /// number of spaces with open SSE streams and the open streams when SSE is on.
    pub fn render(&self, mutators: &MutatorCounts<'_>, pokes: &PokeStats) -> String {
        let mut out = String::new();
        for (name, help, value) in [
            (
                "replisync_pushes_total",
                "Push requests answered 200.",
                self.pushes.get(),
            ),
            (
                "replisync_push_commits_total",
                "Pushes that committed a change.",
                self.push_commits.get(),
            ),
            (
                "replisync_pulls_total",
                "Pull requests answered with a patch.",
                self.pulls.get(),
            ),
            (
                "replisync_pull_reads_total",
                "Database snapshots read for pulls.",
                self.pull_reads.get(),
            ),
            (
                "replisync_pull_streams_cut_total",
                "Streamed pulls cut off (client stopped reading, or too slow).",
                self.pull_streams_cut.get(),
            ),
            (
                "replisync_first_pulls_refused_total",
                "Streamed pulls (first pulls, large deltas) answered 503 because too many were in flight.",
                self.first_pulls_refused.get(),
            ),
            (
                "replisync_pull_deltas_streamed_total",
                "Incremental pulls whose delta exceeded REPLISYNC_MAX_SHARED_DELTA_BYTES, streamed from a snapshot of their own.",
                self.pull_deltas_streamed.get(),
            ),
            (
                "replisync_unauthorized_total",
                "Requests refused 401 (no valid token).",
                self.unauthorized.get(),
            ),
            (
                "replisync_forbidden_total",
                "Requests refused 403 (no access to the space or client group).",
                self.forbidden.get(),
            ),
            (
                "replisync_push_refused_too_large_total",
                "Pushes refused 413 (over REPLISYNC_MAX_PUSH_BODY_BYTES).",
                self.push_refused_too_large.get(),
            ),
            (
                "replisync_push_refused_busy_total",
                "Pushes refused 503 (REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT taken).",
                self.push_refused_busy.get(),
            ),
            (
                "replisync_push_refused_too_many_clients_total",
                "Pushes refused 400 (over REPLISYNC_MAX_CLIENTS_PER_PUSH).",
                self.push_refused_too_many_clients.get(),
            ),
            (
                "replisync_push_partial_total",
                "Pushes that applied a prefix of their mutations and left the rest for the next push.",
                self.push_partial.get(),
            ),
            (
                "replisync_push_groups_total",
                "Transactions that applied pushes (group commit: pushes to one space share one).",
                self.push_groups.get(),
            ),
            (
                "replisync_pushes_grouped_total",
                "Pushes applied in a transaction shared with other pushes to their space.",
                self.pushes_grouped.get(),
            ),
            (
                "replisync_push_conflicts_total",
                "Push groups run again after a concurrent writer got in the way.",
                self.push_conflicts.get(),
            ),
            (
                "replisync_authz_webhook_calls_total",
                "Calls to the authorization webhook.",
                self.authz_webhook_calls.get(),
            ),
            (
                "replisync_authz_cache_hits_total",
                "Authorization decisions answered from the cache.",
                self.authz_cache_hits.get(),
            ),
            (
                "replisync_connections_refused_total",
                "Connections refused over REPLISYNC_MAX_CONNECTIONS.",
                self.connections_refused.get(),
            ),
            (
                "replisync_header_read_timeouts_total",
                "Connections closed for not sending request headers in time.",
                self.header_read_timeouts.get(),
            ),
            (
                "replisync_idle_closes_total",
                "Keep-alive connections closed after the idle timeout.",
                self.idle_closes.get(),
            ),
            (
                "replisync_requests_timed_out_total",
                "Requests cut after REPLISYNC_REQUEST_TIMEOUT_SECS (503, connection closed).",
                self.requests_timed_out.get(),
            ),
            (
                "replisync_request_bodies_stalled_total",
                "Requests cut because their body paused longer than REPLISYNC_BODY_READ_TIMEOUT_SECS (408, connection closed).",
                self.request_bodies_stalled.get(),
            ),
            (
                "replisync_sse_streams_refused_total",
                "SSE poke streams refused 503 over the stream caps.",
                self.sse_streams_refused.get(),
            ),
            (
                "replisync_sse_streams_refused_per_user_total",
                "SSE poke streams refused 503 because their user had REPLISYNC_SSE_MAX_STREAMS_PER_USER open.",
                self.sse_streams_refused_per_user.get(),
            ),
            (
                "replisync_gc_client_groups_removed_total",
                "Client groups removed by garbage collection, idle past REPLISYNC_CLIENT_TTL.",
                self.gc_client_groups_removed.get(),
            ),
            (
                "replisync_gc_clients_removed_total",
                "Clients removed with their client groups by garbage collection.",
                self.gc_clients_removed.get(),
            ),
            (
                "replisync_gc_client_groups_forgotten_total",
                "Removed client groups forgotten one REPLISYNC_CLIENT_TTL after their removal (until then they are answered ClientStateNotFound).",
                self.gc_client_groups_forgotten.get(),
            ),
            (
                "replisync_gc_tombstones_removed_total",
                "Deleted entries (tombstones) removed by compaction, past REPLISYNC_TOMBSTONE_TTL.",
                self.gc_tombstones_removed.get(),
            ),
            (
                "replisync_mutations_failed_write_limit_total",
                "Mutations failed (writes discarded) because their push's mutators put more than REPLISYNC_MAX_PUSH_WRITE_BYTES.",
                mutators.failed_write_limit,
            ),
            (
                "replisync_pull_resets_total",
                "Pulls answered with the whole space: their cookie was older than the space's compaction, or ahead of the space (a replaced database).",
                self.pull_resets.get(),
            ),
        ] {
            write_counter(&mut out, name, help, value);
        }
        write_gauge(
            &mut out,
            "replisync_open_connections",
            "Open client connections.",
            self.open_connections.get(),
        );
        write_gauge(
            &mut out,
            "replisync_push_bytes_in_flight",
            "Bytes of REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT held by pushes being read or applied.",
            self.push_bytes_in_flight.get(),
        );
        write_gauge(
            &mut out,
            "replisync_pushes_waiting",
            "Pushes waiting for their space's transaction (applied together in its next group).",
            self.pushes_waiting.get(),
        );
        write_gauge(
            &mut out,
            "replisync_pulls_waiting",
            "Incremental pulls waiting for the next read of their space and cookie (one read answers them all).",
            self.pulls_waiting.get(),
        );
        write_gauge(
            &mut out,
            "replisync_gc_last_run_timestamp_seconds",
            "When this instance's last garbage collection pass ended (0: none yet).",
            self.gc_last_run.get(),
        );
        write_gauge(
            &mut out,
            "replisync_gc_last_run_duration_milliseconds",
            "How long this instance's last garbage collection pass took.",
            self.gc_last_run_duration_ms.get(),
        );
        mutators.script_failures.render(&mut out);
        if let Some(sse) = &pokes.sse {
            write_gauge(
                &mut out,
                "replisync_sse_watched_spaces",
                "Spaces with at least one open SSE poke stream.",
                sse.watched_spaces as u64,
            );
            write_gauge(
                &mut out,
                "replisync_sse_open_streams",
                "Open SSE poke streams.",
                sse.open_streams as u64,
            );
        }
        if let Some(stats) = &pokes.pusher {
            write_poker_counters(&mut out, "pusher", "Pusher", stats);
        }
        if let Some(socketio) = &pokes.socketio {
            write_poker_counters(&mut out, "socketio", "socket.io (Redis)", &socketio.poker);
            write_counter(
                &mut out,
                "replisync_socketio_receivers_total",
                "Redis subscribers (socket.io processes) that received a poke, summed over spaces.",
                socketio.receivers,
            );
        }
        out
    }
}

/// The counters of one remote poke service (`replisync_{prefix}_*`), which logs call `service`.
fn write_poker_counters(out: &mut String, prefix: &str, service: &str, stats: &PokerStats) {
    for (name, help, value) in [
        (
            "calls_ok_total",
            format!("Calls {service} accepted."),
            stats.calls_ok,
        ),
        (
            "spaces_poked_total",
            "Spaces in accepted calls.".to_owned(),
            stats.spaces_poked,
        ),
        (
            "failed_calls_total",
            "Calls that failed, retried or not.".to_owned(),
            stats.failed_calls,
        ),
        (
            "retries_total",
            "Calls repeated after a transient failure.".to_owned(),
            stats.retries,
        ),
        (
            "given_up_spaces_total",
            "Pokes abandoned (rejected, out of attempts, shutdown).".to_owned(),
            stats.given_up_spaces,
        ),
        (
            "dropped_spaces_total",
            "Pokes dropped from a full queue.".to_owned(),
            stats.dropped_spaces,
        ),
    ] {
        write_counter(out, &format!("replisync_{prefix}_{name}"), &help, value);
    }
}

fn write_gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn write_counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}
