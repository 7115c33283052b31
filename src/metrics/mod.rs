//! `/metrics`: what the server counts and times, kept with the `prometheus-client` crate and
//! served as OpenMetrics text. Parts record into the fields here; what other parts own (pokes,
//! mutators, the pool, the process) is read at scrape time (`parts`, `process`).

mod families;
mod kinds;
mod mutations;
mod parts;
mod process;
pub mod timing;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::poke::sinks::Pokes;
use crate::store::Store;

pub use self::families::{Counter, Gauge, SecondsGauge};
use self::families::{counter, gauge, sizes, timing, timing_family};
use self::kinds::{OutcomeLabels, PullKindLabels};
pub use self::kinds::{PullKind, PullTimer, PushAnswer};
pub use self::mutations::MutationMetrics;
pub use self::process::set_dropped_log_lines;
pub use self::timing::{Sizes, Timing};

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What an app's parts own and `/metrics` reads: the pokes' counters and delays, the store's
/// pools, the mutators' failures and times, and the JWKS fetches.
pub struct AppSources {
    pub pokes: Arc<Pokes>,
    pub store: Arc<dyn Store>,
    pub mutations: MutationMetrics,
    pub jwks_fetch: Option<Timing>,
}

impl std::fmt::Debug for AppSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppSources")
            .field("pokes", &self.pokes)
            .field("store", &self.store.kind())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
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
    /// Pushes and pulls refused for a client schemaVersion REPLISYNC_SCHEMA_VERSIONS does not
    /// list (old tabs still open after a rollout).
    pub schema_refused: Counter,
    /// Server API calls whose mutations committed, and calls answered as applied before.
    pub server_api_commits: Counter,
    pub server_api_replays: Counter,
    /// Pulls answered from scratch because what the caller may read changed since its cookie
    /// (its claims, or the rules).
    pub pull_visibility_resets: Counter,
    /// When this instance's last garbage collection pass ended (seconds since the Unix epoch;
    /// 0 before the first), and how long it took in seconds.
    pub gc_last_run: Gauge,
    pub gc_last_run_duration: SecondsGauge,
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
    /// Request bodies a handler left unread (an early answer such as 401 or 413) that were read
    /// and dropped before the answer, so the connection stays usable.
    pub request_bodies_drained: Counter,
    /// Request bodies left unread past REPLISYNC_MAX_BODY_BYTES or REPLISYNC_UNREAD_BODY_LINGER_MS:
    /// answered with `Connection: close`.
    pub request_bodies_left_unread: Counter,
    /// SSE poke streams refused 503 over REPLISYNC_SSE_MAX_STREAMS,
    /// REPLISYNC_SSE_MAX_STREAMS_PER_SPACE or REPLISYNC_SSE_MAX_STREAMS_PER_USER.
    pub sse_streams_refused: Counter,
    /// Of those, refused over REPLISYNC_SSE_MAX_STREAMS_PER_USER (one user's share).
    pub sse_streams_refused_per_user: Counter,
    /// Requests answered, by method, route and status; their durations by status class.
    requests: Family<RequestLabels, PromCounter>,
    request_durations: Family<RequestClassLabels, Histogram, fn() -> Histogram>,
    /// Push requests from arrival in the service to their answer, by outcome.
    push_durations: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    /// Time a push waited for its space's group to start (0 for a push that found it idle).
    pub push_group_wait: Timing,
    /// Time a group's transaction took to commit.
    pub push_commit: Timing,
    /// Mutations per push request, and pushes per group transaction.
    pub push_mutations: Sizes,
    pub push_group_pushes: Sizes,
    /// Pull requests from arrival in the service to the end of their answer, by kind.
    pull_durations: Family<PullKindLabels, Histogram, fn() -> Histogram>,
    /// Calls to the authorization webhook.
    pub authz_webhook_duration: Timing,
}

/// The labels of `replisync_http_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

/// The labels of `replisync_http_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestClassLabels {
    method: &'static str,
    route: String,
    status_class: &'static str,
}

impl Default for Metrics {
    /// The server's own metrics, without those read from an app's parts.
    fn default() -> Self {
        Metrics::new(None)
    }
}

impl Metrics {
    /// Every metric, with what `app`'s parts own (pokes, mutators, the pool) when given.
    pub fn new(app: Option<AppSources>) -> Metrics {
        let mut registry = Registry::default();
        let r = &mut registry;
        r.register(
            "replisync_build",
            "The replisync version that runs (value 1)",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let mut metrics = Metrics {
            pushes: counter(r, "replisync_pushes", "Push requests answered 200."),
            push_commits: counter(
                r,
                "replisync_push_commits",
                "Pushes that committed a change.",
            ),
            pulls: counter(r, "replisync_pulls", "Pull requests answered with a patch."),
            pull_reads: counter(
                r,
                "replisync_pull_reads",
                "Database snapshots read for pulls.",
            ),
            pull_streams_cut: counter(
                r,
                "replisync_pull_streams_cut",
                "Streamed pulls cut off (client stopped reading, or too slow).",
            ),
            first_pulls_refused: counter(
                r,
                "replisync_first_pulls_refused",
                "Streamed pulls (first pulls, large deltas) answered 503 because too many were in flight.",
            ),
            pull_deltas_streamed: counter(
                r,
                "replisync_pull_deltas_streamed",
                "Incremental pulls whose delta exceeded REPLISYNC_MAX_SHARED_DELTA_BYTES, streamed from a snapshot of their own.",
            ),
            unauthorized: counter(
                r,
                "replisync_unauthorized",
                "Requests refused 401 (no valid token).",
            ),
            forbidden: counter(
                r,
                "replisync_forbidden",
                "Requests refused 403 (no access to the space or client group).",
            ),
            push_refused_too_large: counter(
                r,
                "replisync_push_refused_too_large",
                "Pushes refused 413 (over REPLISYNC_MAX_PUSH_BODY_BYTES).",
            ),
            push_refused_busy: counter(
                r,
                "replisync_push_refused_busy",
                "Pushes refused 503 (REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT taken).",
            ),
            push_refused_too_many_clients: counter(
                r,
                "replisync_push_refused_too_many_clients",
                "Pushes refused 400 (over REPLISYNC_MAX_CLIENTS_PER_PUSH).",
            ),
            push_partial: counter(
                r,
                "replisync_push_partial",
                "Pushes that applied a prefix of their mutations and left the rest for the next push.",
            ),
            push_groups: counter(
                r,
                "replisync_push_groups",
                "Transactions that applied pushes (group commit: pushes to one space share one).",
            ),
            pushes_grouped: counter(
                r,
                "replisync_pushes_grouped",
                "Pushes applied in a transaction shared with other pushes to their space.",
            ),
            push_conflicts: counter(
                r,
                "replisync_push_conflicts",
                "Push groups run again after a concurrent writer got in the way.",
            ),
            authz_webhook_calls: counter(
                r,
                "replisync_authz_webhook_calls",
                "Calls to the authorization webhook.",
            ),
            authz_cache_hits: counter(
                r,
                "replisync_authz_cache_hits",
                "Authorization decisions answered from the cache.",
            ),
            connections_refused: counter(
                r,
                "replisync_connections_refused",
                "Connections refused over REPLISYNC_MAX_CONNECTIONS.",
            ),
            header_read_timeouts: counter(
                r,
                "replisync_header_read_timeouts",
                "Connections closed for not sending request headers in time.",
            ),
            idle_closes: counter(
                r,
                "replisync_idle_closes",
                "Keep-alive connections closed after the idle timeout.",
            ),
            requests_timed_out: counter(
                r,
                "replisync_requests_timed_out",
                "Requests cut after REPLISYNC_REQUEST_TIMEOUT_SECS (503, connection closed).",
            ),
            request_bodies_stalled: counter(
                r,
                "replisync_request_bodies_stalled",
                "Requests cut because their body paused longer than REPLISYNC_BODY_READ_TIMEOUT_SECS (408, connection closed).",
            ),
            request_bodies_drained: counter(
                r,
                "replisync_request_bodies_drained",
                "Request bodies answered early (401, 413, ...) and read to their end before the answer, so the connection stays usable.",
            ),
            request_bodies_left_unread: counter(
                r,
                "replisync_request_bodies_left_unread",
                "Request bodies answered early with more left than REPLISYNC_MAX_BODY_BYTES (or not over within REPLISYNC_UNREAD_BODY_LINGER_MS): answered with Connection: close.",
            ),
            sse_streams_refused: counter(
                r,
                "replisync_sse_streams_refused",
                "SSE poke streams refused 503 over the stream caps.",
            ),
            sse_streams_refused_per_user: counter(
                r,
                "replisync_sse_streams_refused_per_user",
                "SSE poke streams refused 503 because their user had REPLISYNC_SSE_MAX_STREAMS_PER_USER open.",
            ),
            gc_client_groups_removed: counter(
                r,
                "replisync_gc_client_groups_removed",
                "Client groups removed by garbage collection, idle past REPLISYNC_CLIENT_TTL.",
            ),
            gc_clients_removed: counter(
                r,
                "replisync_gc_clients_removed",
                "Clients removed with their client groups by garbage collection.",
            ),
            gc_client_groups_forgotten: counter(
                r,
                "replisync_gc_client_groups_forgotten",
                "Removed client groups forgotten one REPLISYNC_CLIENT_TTL after their removal (until then they are answered ClientStateNotFound).",
            ),
            gc_tombstones_removed: counter(
                r,
                "replisync_gc_tombstones_removed",
                "Deleted entries (tombstones) removed by compaction, past REPLISYNC_TOMBSTONE_TTL.",
            ),
            pull_resets: counter(
                r,
                "replisync_pull_resets",
                "Pulls answered with the whole space: their cookie was older than the space's compaction, or ahead of the space (a replaced database).",
            ),
            schema_refused: counter(
                r,
                "replisync_schema_version_refused",
                "Pushes and pulls answered VersionNotSupported (versionType schema): their client's schemaVersion is not in REPLISYNC_SCHEMA_VERSIONS (clients of an old release, which onUpdateNeeded reloads).",
            ),
            server_api_commits: counter(
                r,
                "replisync_server_api_commits",
                "Server API calls (POST /api/spaces/{space}/mutations) whose mutations committed.",
            ),
            server_api_replays: counter(
                r,
                "replisync_server_api_replays",
                "Server API calls answered alreadyApplied: their idempotency key's mutations had committed before (a retry), nothing written.",
            ),
            pull_visibility_resets: counter(
                r,
                "replisync_pull_visibility_resets",
                "Pulls answered from scratch (clear, then every key the caller may read) because what the caller may read changed since its cookie: its token's claims, or REPLISYNC_RULES.",
            ),
            open_connections: gauge(r, "replisync_open_connections", "Open client connections."),
            push_bytes_in_flight: {
                let gauge = Gauge::default();
                r.register_with_unit(
                    "replisync_push_in_flight",
                    "Bytes of REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT held by pushes being read or applied",
                    Unit::Bytes,
                    gauge.0.clone(),
                );
                gauge
            },
            pushes_waiting: gauge(
                r,
                "replisync_pushes_waiting",
                "Pushes waiting for their space's transaction (applied together in its next group).",
            ),
            pulls_waiting: gauge(
                r,
                "replisync_pulls_waiting",
                "Incremental pulls waiting for the next read of their space and cookie (one read answers them all).",
            ),
            gc_last_run: {
                let gauge = Gauge::default();
                r.register_with_unit(
                    "replisync_gc_last_run_timestamp",
                    "When this instance's last garbage collection pass ended, in seconds since the Unix epoch (0: none yet)",
                    Unit::Seconds,
                    gauge.0.clone(),
                );
                gauge
            },
            gc_last_run_duration: {
                let gauge = SecondsGauge::default();
                r.register_with_unit(
                    "replisync_gc_last_run_duration",
                    "How long this instance's last garbage collection pass took",
                    Unit::Seconds,
                    gauge.clone(),
                );
                gauge
            },
            requests: {
                let family = Family::default();
                r.register(
                    "replisync_http_requests",
                    "Requests answered, by method, route (the matched route; unmatched for any other path) and status",
                    family.clone(),
                );
                family
            },
            request_durations: timing_family(
                r,
                "replisync_http_request_duration",
                "Time from a request's arrival to the end of its answer's body, by method, route and status class.",
            ),
            push_durations: timing_family(
                r,
                "replisync_push_duration",
                "Time a push took in the push service (checks, group wait, mutations, commit), by outcome: committed, unchanged, refused (4xx), failed (5xx).",
            ),
            push_group_wait: timing(
                r,
                "replisync_push_group_wait",
                "Time a push waited for its space's group to start (0 when the space was idle).",
            ),
            push_commit: timing(
                r,
                "replisync_push_commit_duration",
                "Time a push group's transaction took to commit.",
            ),
            push_mutations: sizes(r, "replisync_push_mutations", "Mutations per push request."),
            push_group_pushes: sizes(
                r,
                "replisync_push_group_pushes",
                "Pushes applied per group transaction (group commit).",
            ),
            pull_durations: timing_family(
                r,
                "replisync_pull_duration",
                "Time a pull took, to the end of its answer, by kind: shared (an incremental pull from a shared read), streamed (a first pull or large delta from its own snapshot), reset (the whole space).",
            ),
            authz_webhook_duration: timing(
                r,
                "replisync_authz_webhook_duration",
                "Time a call to the authorization webhook took.",
            ),
            registry: Registry::default(),
        };
        if let Some(app) = app {
            app.mutations.register(&mut registry);
            if let Some(jwks_fetch) = app.jwks_fetch {
                registry.register_with_unit(
                    "replisync_jwks_fetch_duration",
                    "Time a fetch of the JSON Web Key Set (REPLISYNC_JWT_JWKS_URL) took",
                    Unit::Seconds,
                    jwks_fetch.histogram().clone(),
                );
            }
            registry.register_collector(Box::new(parts::PartsCollector::new(app.pokes, app.store)));
        }
        process::register(&mut registry);
        metrics.show_every_outcome_and_kind();
        metrics.registry = registry;
        metrics
    }

    /// Creates the push and pull series at 0, so that rates over them start at once.
    fn show_every_outcome_and_kind(&self) {
        for answer in [
            PushAnswer::Committed,
            PushAnswer::Unchanged,
            PushAnswer::Refused,
            PushAnswer::Failed,
        ] {
            let outcome = answer.as_str();
            drop(
                self.push_durations
                    .get_or_create(&OutcomeLabels { outcome }),
            );
        }
        for kind in [PullKind::Shared, PullKind::Streamed, PullKind::Reset] {
            let kind = kind.as_str();
            drop(self.pull_durations.get_or_create(&PullKindLabels { kind }));
        }
    }

    /// Counts a request answered with `status` after `elapsed`, under its matched `route`
    /// (`"unmatched"` when no route matched: never the raw path).
    pub fn observe_request(
        &self,
        method: &Method,
        route: &str,
        status: StatusCode,
        elapsed: Duration,
    ) {
        let method = known_method(method);
        self.requests
            .get_or_create(&RequestLabels {
                method,
                route: route.to_owned(),
                status: status.as_u16(),
            })
            .inc();
        self.request_durations
            .get_or_create(&RequestClassLabels {
                method,
                route: route.to_owned(),
                status_class: status_class(status),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_push(&self, answer: PushAnswer, elapsed: Duration) {
        self.push_durations
            .get_or_create(&OutcomeLabels {
                outcome: answer.as_str(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Records a pull whose answer ended now.
    pub fn observe_pull(&self, timer: PullTimer) {
        self.pull_durations
            .get_or_create(&PullKindLabels {
                kind: timer.kind.as_str(),
            })
            .observe(timer.started.elapsed().as_secs_f64());
    }

    /// Every metric in OpenMetrics text ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a collector's error would end the text early.
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(%error, "metrics could not be rendered in full");
        }
        out
    }
}

/// A method as a label: the standard ones by name, any other as `other` (a client may send any
/// token as a method, and each would be a new series).
fn known_method(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client chooses the method and the path: neither may mint new series.
    #[test]
    fn requests_are_labelled_by_known_method_route_pattern_and_status() {
        let metrics = Metrics::default();
        let odd = Method::from_bytes(b"BREW").unwrap();
        for method in [&odd, &Method::from_bytes(b"X-ANYTHING").unwrap()] {
            metrics.observe_request(
                method,
                "unmatched",
                StatusCode::METHOD_NOT_ALLOWED,
                Duration::from_micros(70),
            );
        }
        metrics.observe_request(
            &Method::POST,
            "/spaces/{space}/push",
            StatusCode::OK,
            Duration::from_millis(3),
        );
        let text = metrics.render();
        assert!(
            text.contains(
                "replisync_http_requests_total{method=\"other\",route=\"unmatched\",status=\"405\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("replisync_http_request_duration_seconds_count{method=\"POST\",route=\"/spaces/{space}/push\",status_class=\"2xx\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("BREW"), "{text}");
    }
}
