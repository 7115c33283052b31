//! Traces over OTLP, received by an in-process collector (an axum server taking POST /v1/traces):
//! one push under a client's `traceparent` is one trace with the request, caller check, group
//! wait, mutation, commit and poke spans; hostile `traceparent` values start a fresh trace.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{Value, json};

use crate::harness::{Server, poll_for, start_with};

/// What the collector received: each POST's content type (and `x-api-key`, when sent) and body.
type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

/// A collector on a free port; its base URL and what it receives.
async fn collector() -> (String, Received) {
    let received: Received = Arc::default();
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), received)
}

async fn receive(State(received): State<Received>, headers: HeaderMap, body: Bytes) {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let content_type = match key {
        Some(key) => format!("{content_type}; x-api-key={key}"),
        None => content_type,
    };
    received.lock().unwrap().push((content_type, body));
}

/// The replisync binary exporting to `endpoint` in `protocol` (`None`: the default).
fn traced_server(dir: &std::path::Path, endpoint: &str, protocol: Option<&str>) -> Server {
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=hunter2-secret"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("REPLISYNC_LOG_FORMAT", "json"),
    ];
    if let Some(protocol) = protocol {
        env.push(("OTEL_EXPORTER_OTLP_PROTOCOL", protocol));
    }
    start_with(dir, &env)
}

async fn push_with_traceparent(server: &Server, traceparent: &str, group: &str) {
    let push = json!({"pushVersion": 1, "schemaVersion": "", "profileID": "p", "clientGroupID": group,
        "mutations": [{"id": 1, "name": "increment", "args": {"key": "n", "delta": 1},
        "timestamp": 1.0, "clientID": format!("{group}-c")}]});
    let answer = reqwest::Client::new()
        .post(format!("{}/spaces/demo/push", server.base))
        .header("traceparent", traceparent)
        .body(push.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "traceparent {traceparent:?}");
}

/// Every span received as OTLP JSON so far.
fn spans(received: &Received) -> Vec<Value> {
    let received = received.lock().unwrap();
    let mut spans = Vec::new();
    for (_, body) in received.iter() {
        let export: Value = serde_json::from_slice(body).expect("OTLP JSON");
        for resource in export["resourceSpans"].as_array().into_iter().flatten() {
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                spans.extend(scope["spans"].as_array().into_iter().flatten().cloned());
            }
        }
    }
    spans
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// The span names one push yields.
const PUSH_SPANS: [&str; 7] = [
    "request",
    "caller.authenticate",
    "caller.authorize",
    "push.group_wait",
    "push.mutation",
    "push.commit",
    "poke",
];

#[tokio::test]
async fn one_push_is_one_trace_under_the_clients_traceparent() {
    let (endpoint, received) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let server = traced_server(dir.path(), &endpoint, Some("http/json"));
    assert!(
        server
            .log_lines()
            .iter()
            .any(|line| line.contains("traces are exported over OTLP")
                && line.contains(&endpoint["http://".len()..])),
        "start-up says where traces go"
    );
    push_with_traceparent(&server, &format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"), "g1").await;
    let all_there = |spans: &[Value]| {
        PUSH_SPANS
            .iter()
            .all(|name| spans.iter().any(|span| span["name"] == *name))
    };
    let spans = poll_for(Duration::from_secs(10), || {
        let spans = spans(&received);
        all_there(&spans).then_some(spans)
    })
    .await
    .unwrap_or_else(|| panic!("the push's spans: {:?}", spans(&received)));
    for span in &spans {
        assert_eq!(span["traceId"], TRACE_ID, "{span}");
    }
    let request = spans.iter().find(|span| span["name"] == "request").unwrap();
    assert_eq!(request["parentSpanId"], CLIENT_SPAN, "{request}");
    let ids: Vec<&Value> = spans.iter().map(|span| &span["spanId"]).collect();
    for span in spans.iter().filter(|span| span["name"] != "request") {
        assert!(ids.contains(&&span["parentSpanId"]), "parented: {span}");
    }
    server.stop();
}

#[tokio::test]
async fn the_default_protocol_sends_protobuf_to_the_same_path() {
    let (endpoint, received) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let server = traced_server(dir.path(), &endpoint, None);
    push_with_traceparent(&server, &format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"), "g1").await;
    let content_type = poll_for(Duration::from_secs(10), || {
        received
            .lock()
            .unwrap()
            .first()
            .map(|(kind, _)| kind.clone())
    })
    .await
    .expect("an export arrives");
    assert_eq!(
        content_type,
        "application/x-protobuf; x-api-key=hunter2-secret"
    );
    let lines = server.log_lines();
    assert!(
        !lines.iter().any(|line| line.contains("hunter2")),
        "{lines:?}"
    );
    server.stop();
}

#[tokio::test]
async fn a_hostile_traceparent_is_ignored_and_a_fresh_trace_starts() {
    let (endpoint, received) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let server = traced_server(dir.path(), &endpoint, Some("http/json"));
    let long = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01{}", "-0".repeat(5000));
    let hostile = [
        long.as_str(),
        "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "garbage",
    ];
    for (n, traceparent) in hostile.iter().enumerate() {
        push_with_traceparent(&server, traceparent, &format!("h{n}")).await;
    }
    // A CR or LF cannot be sent in a header: the server's HTTP parser refuses the request.
    let requests = poll_for(Duration::from_secs(10), || {
        let requests: Vec<Value> = spans(&received)
            .into_iter()
            .filter(|span| span["name"] == "request")
            .collect();
        (requests.len() >= hostile.len()).then_some(requests)
    })
    .await
    .expect("a request span per push");
    let mut trace_ids: Vec<&str> = Vec::new();
    for request in &requests {
        assert_ne!(request["traceId"], TRACE_ID, "{request}");
        assert_eq!(request["parentSpanId"], "", "a root: {request}");
        trace_ids.push(request["traceId"].as_str().unwrap());
    }
    trace_ids.sort_unstable();
    trace_ids.dedup();
    assert_eq!(trace_ids.len(), requests.len(), "one fresh trace each");
    server.stop();
}

#[tokio::test]
async fn grpc_or_an_endpoint_that_is_no_url_is_refused_at_start_up_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let output = crate::harness::run_until_exit(
        dir.path(),
        &["--listen", "127.0.0.1:0"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc"),
        "{stderr}"
    );
    assert!(stderr.contains("http/protobuf"), "{stderr}");
    let output = crate::harness::run_until_exit(
        dir.path(),
        &["--listen", "127.0.0.1:0"],
        &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector:4318")],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=\"collector:4318\" is not a URL"),
        "{stderr}"
    );
}

/// A trace id of its own for push `n`.
fn trace_id(n: usize) -> String {
    format!("{:032x}", 0xabc0_0000_u64 + n as u64)
}

#[tokio::test]
async fn a_group_is_traced_under_its_first_push_and_linked_to_the_others() {
    let (endpoint, received) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let server = traced_server(dir.path(), &endpoint, Some("http/json"));
    // Pushes that arrive together to one space wait for a group: rounds until one did.
    let group_spans = |spans: &[Value]| -> Vec<Value> {
        spans
            .iter()
            .filter(|span| span["name"] == "push.group")
            .cloned()
            .collect()
    };
    let mut pushed = 0;
    for _round in 0..5 {
        let pushes = (pushed..pushed + 24).map(|n| {
            let traceparent = format!("00-{}-{CLIENT_SPAN}-01", trace_id(n));
            let server = &server;
            async move { push_with_traceparent(server, &traceparent, &format!("grp{n}")).await }
        });
        futures::future::join_all(pushes).await;
        pushed += 24;
        let seen = poll_for(Duration::from_secs(3), || {
            let spans = spans(&received);
            let requests = spans.iter().filter(|s| s["name"] == "request").count();
            (requests >= pushed).then_some(spans)
        })
        .await
        .expect("a request span per push");
        if !group_spans(&seen).is_empty() {
            break;
        }
    }
    let spans = spans(&received);
    let groups = group_spans(&spans);
    assert!(!groups.is_empty(), "no push waited for a group in 5 rounds");
    let ours: Vec<String> = (0..pushed).map(trace_id).collect();
    let by_id = |id: &Value| spans.iter().find(|span| span["spanId"] == *id);
    for group in &groups {
        let parent = by_id(&group["parentSpanId"]).expect("the group's parent is exported");
        assert_eq!(parent["name"], "request", "{group}");
        assert_eq!(parent["traceId"], group["traceId"], "{group}");
        assert!(ours.contains(&group["traceId"].as_str().unwrap().to_owned()));
        let pushes = group["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|attribute| attribute["key"] == "pushes")
            .and_then(|attribute| {
                let value = &attribute["value"];
                value["intValue"].as_str() // an integer (OTLP JSON writes int64 as a string)
            })
            .and_then(|pushes| pushes.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("pushes attribute: {group}"));
        let links = group["links"].as_array().unwrap();
        assert_eq!(links.len(), pushes - 1, "{group}");
        for link in links {
            assert!(ours.contains(&link["traceId"].as_str().unwrap().to_owned()));
            assert_ne!(link["traceId"], group["traceId"], "{group}");
        }
        let under = spans
            .iter()
            .filter(|span| span["parentSpanId"] == group["spanId"])
            .filter(|span| span["name"] == "push.mutation" || span["name"] == "push.commit");
        assert!(
            under.count() >= 2,
            "the group's mutations and commit: {group}"
        );
    }
    server.stop();
}

#[tokio::test]
async fn a_collector_that_never_answers_slows_no_request_and_shutdown_is_bounded() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = listener.accept().await {
            connections.push(connection); // accepted, never answered
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let server = traced_server(dir.path(), &endpoint, None);
    for n in 0..5 {
        let started = std::time::Instant::now();
        push_with_traceparent(
            &server,
            &format!("00-{}-{CLIENT_SPAN}-01", trace_id(n)),
            &format!("b{n}"),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(150)).await; // an export is under way
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "push {n} took {:?}",
            started.elapsed()
        );
    }
    let stopping = std::time::Instant::now();
    server.stop(); // panics unless it exits cleanly within 15 s
    assert!(
        stopping.elapsed() < Duration::from_secs(9),
        "stopped in {:?}",
        stopping.elapsed()
    );
    held.abort();
}

#[tokio::test]
async fn the_call_to_pusher_is_a_span_of_its_own() {
    let (endpoint, received) = collector().await;
    let pusher = crate::pusher_double::SlowPusher::start().await;
    pusher.release();
    let dir = tempfile::tempdir().unwrap();
    let mut env = pusher.env();
    env.extend([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let server = start_with(dir.path(), &env);
    push_with_traceparent(&server, &format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"), "p1").await;
    let delivered = poll_for(Duration::from_secs(10), || {
        spans(&received)
            .into_iter()
            .find(|span| span["name"] == "poke.deliver")
    })
    .await
    .unwrap_or_else(|| panic!("a poke.deliver span: {:?}", spans(&received)));
    let service = delivered["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|attribute| attribute["key"] == "service")
        .map(|attribute| attribute["value"]["stringValue"].clone());
    assert_eq!(service, Some(Value::from("Pusher")), "{delivered}");
    assert!(!pusher.received().is_empty());
    server.stop();
}
