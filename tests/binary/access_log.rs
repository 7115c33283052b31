//! The access log as an operator reads it: one JSON line per request with numbers as numbers,
//! the route pattern and never a token, a query string or a client's raw path; none when turned
//! off; a hostile request id that can neither forge nor bloat a line; sqlx's statements out of
//! `debug`.

use std::time::Duration;

use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};

use crate::harness::{Server, start_with};

const SECRET: &str = "an-access-log-test-secret-of-32-bytes-or-more";

fn token() -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let claims = json!({"sub": "alice", "exp": exp, "spaces": ["demo"]});
    let jwt = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    format!("Bearer {jwt}")
}

fn push_body(group: &str) -> String {
    json!({"pushVersion": 1, "schemaVersion": "", "profileID": "p", "clientGroupID": group,
        "mutations": [{"id": 1, "name": "increment", "args": {"key": "n", "delta": 1},
        "timestamp": 1.0, "clientID": format!("{group}-c")}]})
    .to_string()
}

/// The access log lines (JSON) the server wrote so far, waiting until there are `count`.
async fn access_lines(server: &Server, count: usize) -> Vec<Value> {
    let lines = crate::harness::poll_for(Duration::from_secs(10), || {
        let lines: Vec<Value> = server
            .log_lines()
            .iter()
            .filter(|line| line.contains("replisync::access"))
            .map(|line| serde_json::from_str(line).expect("each line is JSON"))
            .collect();
        (lines.len() >= count).then_some(lines)
    })
    .await;
    lines.unwrap_or_else(|| panic!("{count} access log lines: {:?}", server.log_lines()))
}

#[tokio::test]
async fn each_request_writes_one_json_line_with_numbers_the_route_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(
        dir.path(),
        &[
            ("REPLISYNC_LOG_FORMAT", "json"),
            ("REPLISYNC_JWT_SECRET", SECRET),
        ],
    );
    let client = reqwest::Client::new();
    let token = token();
    let body = push_body("g1");
    let pushed = client
        .post(format!("{}/spaces/demo/push?session=q-secret", server.base))
        .header("Authorization", &token)
        .header("X-Replicache-RequestID", "rq-1")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), 200);
    let refused = client
        .post(format!("{}/spaces/demo/push", server.base))
        .header("Authorization", "Bearer not-a-valid-token")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let missing = client
        .get(format!("{}/private/raw-path?auth=q-secret", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let lines = access_lines(&server, 3).await;
    let fields: Vec<&Value> = lines.iter().map(|line| &line["fields"]).collect();
    let [push, unauthorized, not_found] = fields[..] else {
        panic!("three lines: {lines:?}")
    };
    assert_eq!(push["method"], "POST");
    assert_eq!(push["route"], "/spaces/{space}/push");
    assert_eq!(push["status"], 200);
    assert_eq!(push["space"], "demo");
    assert_eq!(push["request_id"], "rq-1");
    assert_eq!(push["bytes_in"], body.len());
    assert!(push["bytes_out"].as_u64().unwrap() > 0, "{push}");
    assert!(push["duration_ms"].as_f64().unwrap() > 0.0, "{push}");
    assert_eq!(unauthorized["status"], 401);
    assert_eq!(unauthorized["route"], "/spaces/{space}/push");
    assert_eq!(not_found["status"], 404);
    assert_eq!(not_found["route"], "unmatched");
    for line in &lines {
        assert_eq!(line["level"], "INFO");
        assert!(line["fields"]["duration_ms"].is_f64(), "{line}");
        let text = line.to_string();
        for secret in [
            "q-secret",
            "raw-path",
            "Bearer",
            "not-a-valid-token",
            &token[7..],
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
    server.stop();
}

#[tokio::test]
async fn an_access_log_turned_off_writes_no_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), &[("REPLISYNC_ACCESS_LOG", "false")]);
    let health = reqwest::get(format!("{}/healthz", server.base))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let missing = reqwest::get(format!("{}/nothing", server.base))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = server.log_lines();
    assert!(
        !lines.iter().any(|line| line.contains("replisync::access")),
        "{lines:?}"
    );
    server.stop();
}

#[tokio::test]
async fn a_hostile_request_id_can_neither_forge_nor_bloat_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), &[]);
    let client = reqwest::Client::new();
    let forged = "x\" status=500 route=\"/admin";
    let huge = "y".repeat(10_000);
    let odd = reqwest::header::HeaderValue::from_bytes(b"id\t\xff\xfe-z").unwrap();
    for id in [
        reqwest::header::HeaderValue::from_str(forged).unwrap(),
        reqwest::header::HeaderValue::from_str(&huge).unwrap(),
        odd,
    ] {
        let answer = client
            .get(format!("{}/healthz", server.base))
            .header("X-Replicache-RequestID", id)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let lines = crate::harness::poll_for(Duration::from_secs(10), || {
        let lines: Vec<String> = server
            .log_lines()
            .into_iter()
            .filter(|line| line.contains("replisync::access"))
            .collect();
        (lines.len() >= 3).then_some(lines)
    })
    .await
    .expect("three access log lines");
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        assert!(line.len() < 600, "bounded: {} bytes", line.len());
        assert!(line.contains(" status=200 "), "{line}");
        assert_eq!(line.matches(" status=").count(), 1, "forged: {line}");
        assert_eq!(line.matches(" route=").count(), 1, "forged: {line}");
        assert!(line.contains(" route=\"/healthz\" "), "{line}");
    }
    assert!(lines[0].contains(r#"request_id="x\"?status=500?route=\"/admin""#));
    assert!(lines[1].contains(&format!("request_id=\"{}…\"", "y".repeat(64))));
    assert!(lines[2].contains("request_id=\"id???-z\""), "{}", lines[2]);
    server.stop();
}

/// Pushes and pulls once, then returns the server's log.
async fn log_of_a_push_and_pull(rust_log: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), &[("RUST_LOG", rust_log)]);
    crate::harness::push_increment(&server.base, "g1", 1).await;
    let pull = json!({"pullVersion": 1, "schemaVersion": "", "profileID": "p",
        "clientGroupID": "g1", "cookie": null});
    crate::harness::post(&server.base, "/spaces/demo/pull", pull).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = server.log_lines();
    server.stop();
    lines
}

#[tokio::test]
async fn sqlx_statements_stay_out_of_debug_unless_asked_for_by_target() {
    let statement = |line: &&String| line.contains("sqlx::query");
    let debug = log_of_a_push_and_pull("debug").await;
    assert!(
        debug.iter().any(|line| line.contains("DEBUG")),
        "debug lines are written"
    );
    let statements: Vec<&String> = debug.iter().filter(statement).collect();
    assert!(statements.is_empty(), "{statements:?}");
    let asked = log_of_a_push_and_pull("info,sqlx::query=trace").await;
    assert!(asked.iter().any(|line| statement(&line)), "{asked:?}");
}

/// The `/metrics` sample lines of `family` whose labels include each of `labels`.
fn samples<'t>(metrics: &'t str, family: &str, labels: &[&str]) -> Vec<&'t str> {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{family}{{")))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .collect()
}

#[tokio::test]
async fn requests_are_counted_by_route_and_status_even_with_the_access_log_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), &[("REPLISYNC_ACCESS_LOG", "false")]);
    crate::harness::push_increment(&server.base, "g1", 1).await;
    crate::harness::push_increment(&server.base, "g1", 2).await;
    let missing = reqwest::get(format!("{}/private/raw-path?x=1", server.base))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let metrics = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let pushes = samples(
        &metrics,
        "replisync_http_requests_total",
        &[
            "method=\"POST\"",
            "route=\"/spaces/{space}/push\"",
            "status=\"200\"",
        ],
    );
    assert_eq!(pushes.len(), 1, "{metrics}");
    assert!(pushes[0].ends_with(" 2"), "{}", pushes[0]);
    let unmatched = samples(
        &metrics,
        "replisync_http_requests_total",
        &["route=\"unmatched\"", "status=\"404\""],
    );
    assert_eq!(unmatched.len(), 1, "{metrics}");
    assert!(unmatched[0].ends_with(" 1"), "{}", unmatched[0]);
    assert!(!metrics.contains("raw-path"), "{metrics}");
    let timed = samples(
        &metrics,
        "replisync_http_request_duration_seconds_count",
        &["route=\"/spaces/{space}/push\"", "status_class=\"2xx\""],
    );
    assert_eq!(timed.len(), 1, "{metrics}");
    assert!(timed[0].ends_with(" 2"), "{}", timed[0]);
    server.stop();
}

/// Nobody reads the server's stdout (a stalled log shipper): the pipe fills after a few hundred
/// lines, yet every request is still answered, as lines wait for their writer thread instead
/// of the request waiting for the pipe. Every line is there once the pipe is read and the
/// server stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_never_wait_for_a_stdout_nobody_reads() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut child = crate::harness::replisync_command(
        dir.path(),
        &["--listen", &listen],
        &[
            ("REPLISYNC_LOG_FORMAT", "json"),
            ("REPLISYNC_DRAIN_DELAY_SECS", "0"),
        ],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let base = format!("http://{listen}");
    let client = reqwest::Client::new();
    let mut started = false;
    for _ in 0..300 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started, "the server did not start");
    // Each line is about 250 bytes: 2,000 of them are several times a pipe's 64 KiB.
    let requests = 2_000;
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..requests {
            let response = client.get(format!("{base}/healthz")).send().await.unwrap();
            assert_eq!(response.status(), 200);
        }
    })
    .await;
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    if answered.is_err() {
        let _ = child.kill();
    } else {
        let stopped = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(stopped.success());
    }
    let _ = child.wait();
    let log = reader.join().unwrap();
    assert!(
        answered.is_ok(),
        "requests stalled behind a stdout nobody read"
    );
    let access_lines = log
        .lines()
        .filter(|line| line.contains("\"replisync::access\""))
        .count();
    assert!(
        access_lines > requests,
        "{access_lines} access lines were written for {requests} requests and the first probe"
    );
}
