//! `/metrics` as a scraper reads it: every family has the type, unit and HELP line the docs
//! promise, in OpenMetrics text, with every poke sink, the JWKS and the pools configured.

use std::collections::BTreeMap;

use serde_json::json;

use crate::harness::start_with;
use crate::start_up::serve_jwks;

/// Every family `/metrics` shows with Pusher, socket.io, SSE and a JWKS on: its name as in
/// `# TYPE`, its type, and its unit (which the name must end with).
const FAMILIES: &[(&str, &str, Option<&str>)] = &[
    ("replisync_build", "info", None),
    ("replisync_pushes", "counter", None),
    ("replisync_push_commits", "counter", None),
    ("replisync_pulls", "counter", None),
    ("replisync_pull_reads", "counter", None),
    ("replisync_pull_streams_cut", "counter", None),
    ("replisync_first_pulls_refused", "counter", None),
    ("replisync_pull_deltas_streamed", "counter", None),
    ("replisync_unauthorized", "counter", None),
    ("replisync_forbidden", "counter", None),
    ("replisync_push_refused_too_large", "counter", None),
    ("replisync_push_refused_busy", "counter", None),
    ("replisync_push_refused_too_many_clients", "counter", None),
    ("replisync_push_partial", "counter", None),
    ("replisync_push_groups", "counter", None),
    ("replisync_pushes_grouped", "counter", None),
    ("replisync_push_conflicts", "counter", None),
    ("replisync_authz_webhook_calls", "counter", None),
    ("replisync_authz_cache_hits", "counter", None),
    ("replisync_connections_refused", "counter", None),
    ("replisync_header_read_timeouts", "counter", None),
    ("replisync_idle_closes", "counter", None),
    ("replisync_requests_timed_out", "counter", None),
    ("replisync_request_bodies_stalled", "counter", None),
    ("replisync_request_bodies_drained", "counter", None),
    ("replisync_request_bodies_left_unread", "counter", None),
    ("replisync_sse_streams_refused", "counter", None),
    ("replisync_sse_streams_refused_per_user", "counter", None),
    ("replisync_gc_client_groups_removed", "counter", None),
    ("replisync_gc_clients_removed", "counter", None),
    ("replisync_gc_client_groups_forgotten", "counter", None),
    ("replisync_gc_tombstones_removed", "counter", None),
    ("replisync_pull_resets", "counter", None),
    ("replisync_pull_visibility_resets", "counter", None),
    ("replisync_schema_version_refused", "counter", None),
    ("replisync_server_api_commits", "counter", None),
    ("replisync_server_api_replays", "counter", None),
    ("replisync_open_connections", "gauge", None),
    ("replisync_push_in_flight_bytes", "gauge", Some("bytes")),
    ("replisync_pushes_waiting", "gauge", None),
    ("replisync_commit_batches", "counter", None),
    ("replisync_commit_batched_groups", "counter", None),
    ("replisync_commit_batch_waiting", "gauge", None),
    ("replisync_read_batches", "counter", None),
    ("replisync_batched_reads", "counter", None),
    ("replisync_read_batch_waiting", "gauge", None),
    ("replisync_push_reads_known", "counter", None),
    ("replisync_push_reads_known_stale", "counter", None),
    ("replisync_known_state_bytes", "gauge", Some("bytes")),
    ("replisync_pulls_waiting", "gauge", None),
    (
        "replisync_gc_last_run_timestamp_seconds",
        "gauge",
        Some("seconds"),
    ),
    (
        "replisync_gc_last_run_duration_seconds",
        "gauge",
        Some("seconds"),
    ),
    ("replisync_http_requests", "counter", None),
    (
        "replisync_http_request_duration_seconds",
        "histogram",
        Some("seconds"),
    ),
    (
        "replisync_push_duration_seconds",
        "histogram",
        Some("seconds"),
    ),
    (
        "replisync_push_group_wait_seconds",
        "histogram",
        Some("seconds"),
    ),
    (
        "replisync_push_commit_duration_seconds",
        "histogram",
        Some("seconds"),
    ),
    ("replisync_push_mutations", "histogram", None),
    ("replisync_push_group_pushes", "histogram", None),
    (
        "replisync_pull_duration_seconds",
        "histogram",
        Some("seconds"),
    ),
    (
        "replisync_authz_webhook_duration_seconds",
        "histogram",
        Some("seconds"),
    ),
    ("replisync_mutations_failed", "counter", None),
    ("replisync_mutation_keys_read_ahead", "counter", None),
    (
        "replisync_js_mutation_duration_seconds",
        "histogram",
        Some("seconds"),
    ),
    (
        "replisync_jwks_fetch_duration_seconds",
        "histogram",
        Some("seconds"),
    ),
    ("replisync_mutator_contexts", "gauge", None),
    ("replisync_sse_watched_spaces", "gauge", None),
    ("replisync_sse_open_streams", "gauge", None),
    ("replisync_pusher_calls_ok", "counter", None),
    ("replisync_pusher_spaces_poked", "counter", None),
    ("replisync_pusher_failed_calls", "counter", None),
    ("replisync_pusher_retries", "counter", None),
    ("replisync_pusher_given_up_spaces", "counter", None),
    ("replisync_pusher_dropped_spaces", "counter", None),
    ("replisync_socketio_calls_ok", "counter", None),
    ("replisync_socketio_spaces_poked", "counter", None),
    ("replisync_socketio_failed_calls", "counter", None),
    ("replisync_socketio_retries", "counter", None),
    ("replisync_socketio_given_up_spaces", "counter", None),
    ("replisync_socketio_dropped_spaces", "counter", None),
    ("replisync_socketio_receivers", "counter", None),
    ("replisync_poke_delay_seconds", "histogram", Some("seconds")),
    ("replisync_db_pool_connections", "gauge", None),
    ("replisync_db_pool_max_connections", "gauge", None),
    ("replisync_log_lines_dropped", "counter", None),
    ("process_cpu_seconds", "counter", Some("seconds")),
    ("process_resident_memory_bytes", "gauge", Some("bytes")),
    ("process_virtual_memory_bytes", "gauge", Some("bytes")),
    ("process_start_time_seconds", "gauge", Some("seconds")),
    ("process_open_fds", "gauge", None),
    ("process_max_fds", "gauge", None),
];

/// One family as the text declares it.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: String,
    unit: Option<String>,
    samples: Vec<String>,
}

/// The families of an OpenMetrics text by name, with their sample lines.
fn families(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let mut words = line.splitn(4, ' ');
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("#"), Some("HELP"), Some(name), help) => {
                current = name.to_owned();
                families.entry(current.clone()).or_default().help =
                    help.unwrap_or_default().to_owned();
            }
            (Some("#"), Some("TYPE"), Some(name), Some(kind)) => {
                families.entry(name.to_owned()).or_default().kind = kind.to_owned();
            }
            (Some("#"), Some("UNIT"), Some(name), Some(unit)) => {
                families.entry(name.to_owned()).or_default().unit = Some(unit.to_owned());
            }
            (Some("#"), Some("EOF"), ..) => current.clear(),
            _ => families
                .entry(current.clone())
                .or_default()
                .samples
                .push(line.to_owned()),
        }
    }
    families
}

/// The sample names a family of `kind` may use.
fn sample_suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total"],
        "histogram" => &["_bucket", "_sum", "_count"],
        "info" => &["_info"],
        _ => &[""],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_has_its_type_unit_and_help_and_the_docs_list_it() {
    let jwks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_url = format!("http://{}/jwks.json", jwks.local_addr().unwrap());
    serve_jwks(jwks, 200, crate::start_up::JWKS);
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(
        dir.path(),
        &[
            ("REPLISYNC_JWT_JWKS_URL", jwks_url.as_str()),
            ("PUSHER_APP_ID", "1"),
            ("PUSHER_KEY", "key"),
            ("PUSHER_SECRET", "secret"),
            ("PUSHER_HOST", "127.0.0.1"),
            ("PUSHER_PORT", "9"),
            ("REPLISYNC_SOCKETIO_REDIS_URL", "redis://127.0.0.1:6379"),
            ("REPLISYNC_SOCKETIO_KEY", "metrics-families-test"),
            ("REPLISYNC_SSE", "true"),
        ],
    );
    // A request, so that the request families have a series: a push refused for want of a
    // token still goes through the request middleware. (The push and pull histograms show
    // every outcome and kind at 0 from the start.)
    let client = reqwest::Client::new();
    let refused = client
        .post(format!("{}/spaces/s/push", server.base))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let response = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    let found = families(&text);
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/observability.md"
    ))
    .unwrap();
    let mut problems = Vec::new();
    for (name, kind, unit) in FAMILIES {
        check_family(name, kind, *unit, found.get(*name), &docs, &mut problems);
    }
    for name in found.keys() {
        if !FAMILIES.iter().any(|(known, ..)| known == name) {
            problems.push(format!(
                "{name}: not in this test's list (add it, and to the docs)"
            ));
        }
    }
    assert!(problems.is_empty(), "{}\n\n{text}", problems.join("\n"));
}

fn check_family(
    name: &str,
    kind: &str,
    unit: Option<&str>,
    family: Option<&Family>,
    docs: &str,
    problems: &mut Vec<String>,
) {
    let Some(family) = family else {
        problems.push(format!("{name}: missing"));
        return;
    };
    if family.kind != kind {
        problems.push(format!("{name}: type {} instead of {kind}", family.kind));
    }
    if family.help.len() < 10 || !family.help.ends_with('.') || family.help.ends_with("..") {
        problems.push(format!(
            "{name}: HELP {:?} is not one sentence",
            family.help
        ));
    }
    if family.unit.as_deref() != unit {
        problems.push(format!(
            "{name}: unit {:?} instead of {unit:?}",
            family.unit
        ));
    }
    let named_unit = ["_seconds", "_bytes"]
        .into_iter()
        .find(|suffix| name.ends_with(suffix));
    if named_unit.map(|suffix| &suffix[1..]) != unit {
        problems.push(format!("{name}: its name and its unit {unit:?} disagree"));
    }
    if ["milli", "_ms", "kib"]
        .iter()
        .any(|part| name.contains(part))
    {
        problems.push(format!("{name}: not in base units"));
    }
    if family.samples.is_empty() {
        problems.push(format!("{name}: no sample"));
    }
    let suffixes = sample_suffixes(kind);
    for sample in &family.samples {
        let series = sample.split([' ', '{']).next().unwrap_or_default();
        if !suffixes
            .iter()
            .any(|suffix| series == format!("{name}{suffix}"))
        {
            problems.push(format!(
                "{name}: sample {sample:?} is not named for a {kind}"
            ));
        }
    }
    let sample_name = format!("{name}{}", suffixes[0]);
    let listed = if kind == "histogram" {
        name
    } else {
        &sample_name
    };
    if !docs.contains(&format!("`{listed}")) {
        problems.push(format!("{listed}: not listed in docs/observability.md"));
    }
}
