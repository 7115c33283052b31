//! Bounded work per push, and no client wedged by it: a push over the mutation cap or the time
//! budget commits a prefix and answers 503 `PartiallyApplied` (Replicache pushes again only
//! after a failure or a new mutation), and the client's next pushes finish it, exactly once; a
//! push naming
//! too many clients is refused whole; push bodies in flight share a byte budget (503 beyond it).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use replisync::http::settings::HttpSettings;
use replisync::mutators::{MutationError, Mutator, Mutators, WriteTx};
use replisync::push::settings::PushLimits;
use replisync::startup::{App, AppBuilder};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::harness::{Backend, TestServer, inc, push_body};

/// The answer to a push that committed a prefix and left the rest for the next push.
fn assert_partial(status: u16, body: &Value) {
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "PartiallyApplied", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("REPLISYNC_MAX_MUTATIONS_PER_PUSH"),
        "{message}"
    );
}

fn limits(push: PushLimits) -> AppBuilder {
    App::builder().push(push)
}

async fn a_push_over_the_mutation_cap_applies_a_prefix_and_resends_finish_it(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        limits(PushLimits {
            max_mutations: 3,
            ..PushLimits::default()
        }),
    )
    .await;
    // Two clients of one group, interleaved as Replicache sends them (oldest first).
    let body = push_body(
        "g",
        &[
            ("a", 1, "increment", inc("a", 1)),
            ("b", 1, "increment", inc("b", 1)),
            ("a", 2, "increment", inc("a", 1)),
            ("b", 2, "increment", inc("b", 1)),
            ("a", 3, "increment", inc("a", 1)),
            ("b", 3, "increment", inc("b", 1)),
            ("a", 4, "increment", inc("a", 1)),
        ],
    );
    let (status, response) = server.push("s", &body).await;
    assert_partial(status, &response);
    let state = server.state("s", "g").await;
    assert_eq!((state.lmid("a"), state.lmid("b")), (2, 1), "a prefix of 3");
    assert_eq!(state.entries["a"], json!(2));
    assert_eq!(state.entries["b"], json!(1));

    // The client re-sends everything still pending (here: the same push).
    let (status, response) = server.push("s", &body).await;
    assert_partial(status, &response);
    let state = server.state("s", "g").await;
    assert_eq!((state.lmid("a"), state.lmid("b")), (3, 3));
    let (status, response) = server.push("s", &body).await;
    assert_eq!((status, &response), (200, &json!({})), "the rest fits");
    let state = server.state("s", "g").await;
    assert_eq!((state.lmid("a"), state.lmid("b")), (4, 3));
    assert_eq!(state.entries["a"], json!(4), "each mutation applied once");
    assert_eq!(state.entries["b"], json!(3), "each mutation applied once");

    let before = server.db.fingerprint().await;
    let (status, _) = server.push("s", &body).await;
    assert_eq!(status, 200);
    assert_eq!(server.db.fingerprint().await, before, "all applied already");
    assert_eq!(server.metrics.push_partial.get(), 2);
}

/// Sleeps, then increments `slow`.
struct Slow;

#[async_trait]
impl Mutator for Slow {
    async fn apply(&self, tx: &mut WriteTx<'_>, _args: &Value) -> Result<(), MutationError> {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let n = tx.get("slow").await?.and_then(|v| v.as_i64()).unwrap_or(0);
        tx.put("slow", json!(n + 1))
    }
}

async fn a_push_slower_than_its_budget_commits_a_prefix_and_later_pushes_finish_it(
    backend: Backend,
) {
    let options = App::builder()
        .mutators(Mutators::builtin().register("slow", Slow))
        .http(HttpSettings {
            request_timeout: Duration::from_millis(1500),
            ..HttpSettings::default()
        });
    let server = TestServer::start_with(backend, options).await;
    // 8 × 250 ms of work: more than the whole request timeout in one transaction.
    let mutations: Vec<_> = (1..=8).map(|id| ("c", id, "slow", json!({}))).collect();
    let body = push_body("g", &mutations);
    let (status, response) = server.push("s", &body).await;
    assert_partial(status, &response);
    let first = server.state("s", "g").await.lmid("c");
    assert!((1..8).contains(&first), "a prefix was applied: {first}");

    let mut pushes = 1;
    while server.state("s", "g").await.lmid("c") < 8 {
        assert!(pushes < 10, "later pushes never finished the work");
        let (status, response) = server.push("s", &body).await;
        if status != 200 {
            assert_partial(status, &response);
        }
        pushes += 1;
    }
    let state = server.state("s", "g").await;
    assert_eq!(
        state.entries["slow"],
        json!(8),
        "each mutation applied once"
    );
    assert!(server.metrics.push_partial.get() >= 1);
}

async fn a_push_naming_too_many_clients_is_refused_and_changes_nothing(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        limits(PushLimits {
            max_clients: 3,
            ..PushLimits::default()
        }),
    )
    .await;
    server
        .push_ok("s", &push_body("g", &[("a", 1, "increment", inc("n", 1))]))
        .await;
    let before = server.db.fingerprint().await;
    let clients = ["a", "b", "c", "d"];
    let too_many: Vec<_> = clients
        .iter()
        .map(|c| (*c, if *c == "a" { 2 } else { 1 }, "increment", inc("n", 1)))
        .collect();
    let (status, body) = server.push("s", &push_body("g", &too_many)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "TooManyClients", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("REPLISYNC_MAX_CLIENTS_PER_PUSH"),
        "{body}"
    );
    assert_eq!(server.db.fingerprint().await, before, "changed nothing");
    assert_eq!(server.metrics.push_refused_too_many_clients.get(), 1);
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("replisync_push_refused_too_many_clients_total 1"));

    let (status, body) = server.push("s", &push_body("g", &too_many[..3])).await;
    assert_eq!(status, 200, "three clients fit: {body}");
}

async fn push_bodies_in_flight_share_a_byte_budget(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        limits(PushLimits {
            max_body_bytes: 64 * 1024,
            max_bytes_in_flight: 64 * 1024,
            ..PushLimits::default()
        }),
    )
    .await;
    // A push that has sent all but the last KiB of a 64 KiB body, which is still arriving: its
    // bytes hold the whole budget.
    let address = server.base.trim_start_matches("http://");
    let mut slow = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /spaces/s/push HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{{\"pushVersion\":1,{}",
        64 * 1024,
        " ".repeat(63 * 1024 + 512)
    );
    slow.write_all(head.as_bytes()).await.unwrap();

    let body = push_body("g", &[("c", 1, "increment", inc("n", 1))]).to_string();
    let send = || {
        server
            .http
            .post(server.url("/spaces/s/push"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
    };
    // Wait until the slow push holds the whole budget. Sending a push before that could make
    // the slow push the one refused (the two would race for the budget).
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metrics.push_bytes_in_flight.get() < 64 * 1024 {
        assert!(
            Instant::now() < deadline,
            "the slow push never held the budget: {} bytes held",
            server.metrics.push_bytes_in_flight.get()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = server.db.fingerprint().await;
    let refused = send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused.headers()["retry-after"],
        "1",
        "Replicache retries; Retry-After says when"
    );
    let refusal: Value = refused.json().await.unwrap();
    assert_eq!(refusal["error"], "Busy", "{refusal}");
    assert!(
        refusal["message"]
            .as_str()
            .unwrap()
            .contains("REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT")
    );
    assert_eq!(server.db.fingerprint().await, before, "changed nothing");
    assert_eq!(server.metrics.push_refused_busy.get(), 1);

    // The slow push gives up: its bytes are free again.
    drop(slow);
    loop {
        let response = send().await.unwrap();
        if response.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never accepted again: {}",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.state("s", "g").await.lmid("c"), 1);
    assert_eq!(
        server.metrics.push_bytes_in_flight.get(),
        0,
        "every byte given back"
    );
}

/// Opens a push whose body is chunked (no `Content-Length`) and sends one byte of it.
async fn trickling_push(server: &TestServer) -> tokio::net::TcpStream {
    let address = server.base.trim_start_matches("http://");
    let mut slow = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /spaces/other/push HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n1\r\n{{\r\n"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow
}

/// Slow uploads hold the bytes they sent, not the body limit: two chunked pushes that trickle
/// (as many as the in-flight budget holds whole bodies) leave room for everyone else's pushes.
async fn trickling_uploads_do_not_starve_other_pushes(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        limits(PushLimits {
            max_body_bytes: 64 * 1024,
            max_bytes_in_flight: 128 * 1024,
            ..PushLimits::default()
        }),
    )
    .await;
    let _slow = [trickling_push(&server).await, trickling_push(&server).await];
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metrics.push_bytes_in_flight.get() < 2 * 1024 {
        assert!(Instant::now() < deadline, "the slow pushes never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for id in 1..=5 {
        let body = push_body("g", &[("c", id, "increment", inc("n", 1))]);
        let (status, answer) = server.push("s", &body).await;
        assert_eq!(status, 200, "push {id} beside two slow uploads: {answer}");
    }
    assert_eq!(server.state("s", "g").await.lmid("c"), 5);
    assert_eq!(
        server.metrics.push_bytes_in_flight.get(),
        2 * 1024,
        "the slow uploads hold a KiB each"
    );
}

crate::on_both_stores!(
    trickling_uploads_do_not_starve_other_pushes,
    a_push_over_the_mutation_cap_applies_a_prefix_and_resends_finish_it,
    a_push_slower_than_its_budget_commits_a_prefix_and_later_pushes_finish_it,
    a_push_naming_too_many_clients_is_refused_and_changes_nothing,
    push_bodies_in_flight_share_a_byte_budget,
);
