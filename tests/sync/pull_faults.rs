//! Pull when reads fail or grow large (issue 23): a shared read's error reaches every waiter,
//! batches past 1,000 client groups, and streamed pulls cut at their deadline or stall.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::response::IntoResponse;
use futures::StreamExt;
use replisync::error::ApiError;
use replisync::metrics::Metrics;
use replisync::protocol::{PullRequest, SpaceId};
use replisync::pull::{PullBody, PullError, PullLimits, Puller, Pulls, StreamLimits, WriteCheck};
use replisync::rules::CallerKeys;
use replisync::startup::App;
use replisync::store::StoreError;
use serde_json::{Value, json};

use crate::faults::{Fault, Faulty};
use crate::harness::{Backend, TestServer, inc, push_body};

/// What the incremental-pull reads asked for, and how many streamed reads were asked; refuses
/// the next `refusals` reads of either kind.
#[derive(Default)]
struct ReadLog {
    refusals: AtomicUsize,
    reads: Mutex<Vec<Vec<String>>>,
    streamed: AtomicUsize,
}

const REFUSAL: &str = "the test refused this read";

impl ReadLog {
    /// The error to fail a read with, while refusals are left.
    fn take_refusal(&self) -> Option<StoreError> {
        let refuse = self
            .refusals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        refuse.then(|| StoreError::Database(REFUSAL.into()))
    }
}

/// A test double: a real database cannot be made to fail one given read on demand.
struct LoggedReads(Arc<ReadLog>);

#[async_trait]
impl Fault for LoggedReads {
    fn refuse_pull_changes(&self, groups: &[String]) -> Option<StoreError> {
        self.0.reads.lock().unwrap().push(groups.to_vec());
        self.0.take_refusal()
    }

    fn before_streamed_pull(&self) -> Result<(), StoreError> {
        self.0.streamed.fetch_add(1, Ordering::SeqCst);
        self.0.take_refusal().map_or(Ok(()), Err)
    }
}

/// The pull service the server runs, over the server's store seen through `log`, counting in
/// `metrics` of its own.
fn logged_pulls(server: &TestServer, log: &Arc<ReadLog>) -> (Pulls, Arc<Metrics>) {
    logged_pulls_with(server, log, PullLimits::default())
}

/// [`logged_pulls`] with `limits`.
fn logged_pulls_with(
    server: &TestServer,
    log: &Arc<ReadLog>,
    limits: PullLimits,
) -> (Pulls, Arc<Metrics>) {
    let store = Faulty::wrap(server.store.clone(), LoggedReads(log.clone()));
    let metrics = Arc::new(Metrics::default());
    let pulls = Pulls::new(store, metrics.clone(), limits);
    (pulls, metrics)
}

/// A pull caller that may only read.
struct ReadOnly;

/// The anonymous user, reading every key, never writing.
fn reader() -> Puller<'static> {
    static EVERY_KEY: LazyLock<CallerKeys> = LazyLock::new(CallerKeys::unruled);
    Puller {
        user: "anonymous",
        keys: &EVERY_KEY,
        writes: &ReadOnly,
    }
}

#[async_trait]
impl WriteCheck for ReadOnly {
    async fn may_write(&self) -> bool {
        false
    }
}

/// `groups` pushes to `space`, one per group: group `group(i)`, client `client(i)`, each adding
/// one to `n`. Answers the space's version after them (one per push).
async fn one_push_per_group(server: &Arc<TestServer>, space: &str, groups: usize) -> u64 {
    let statuses: Vec<(u16, Value)> = futures::stream::iter(0..groups)
        .map(|i| {
            let (server, space) = (server.clone(), space.to_owned());
            async move {
                let body = push_body(
                    &group(i),
                    &[(client(i).as_str(), 1, "increment", inc("n", 1))],
                );
                server.push(&space, &body).await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == (200, json!({}))));
    groups as u64
}

fn group(i: usize) -> String {
    format!("g{i:04}")
}

fn client(i: usize) -> String {
    format!("c{i:04}")
}

/// Pulls of `groups` (by index) from `cookie`, all started before any read runs: on this
/// test's single thread, each pull joins its batch when first polled, and the reader task runs
/// only once all have.
async fn pull_together(
    pulls: &Pulls,
    space: &str,
    groups: std::ops::Range<usize>,
    cookie: u64,
) -> Vec<Result<PullBody, PullError>> {
    let space = SpaceId::parse(space).unwrap();
    let requests: Vec<PullRequest> = groups
        .map(|i| {
            serde_json::from_value(
                json!({"pullVersion": 1, "clientGroupID": group(i), "cookie": cookie}),
            )
            .unwrap()
        })
        .collect();
    let caller = reader();
    let pulls = requests
        .iter()
        .map(|request| pulls.pull(&space, &caller, request));
    futures::future::join_all(pulls).await
}

/// A pull's answer as the HTTP edge gives it: status and JSON body.
async fn answered(result: Result<PullBody, PullError>) -> (u16, Value) {
    let body = match result {
        Ok(PullBody::Parts(parts)) => parts.concat(),
        Ok(PullBody::Streamed(_)) => panic!("a small delta is answered from the shared read"),
        Err(error) => {
            let response = ApiError::from(error).into_response();
            let status = response.status().as_u16();
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            return (status, serde_json::from_slice(&body).unwrap());
        }
    };
    (200, serde_json::from_slice(&body).unwrap())
}

/// The answer a group's incremental pull from cookie 0 gets: its own client, and `n`.
fn delta_of(i: usize, version: u64) -> (u16, Value) {
    let lmids = json!({ client(i): 1 });
    let patch = json!([{"op": "put", "key": "n", "value": version}]);
    (
        200,
        json!({"cookie": version, "lastMutationIDChanges": lmids, "patch": patch}),
    )
}

/// Identical pulls waiting on one read that fails all get its error, alike (500, the store's
/// failure, not an abandoned read's 503); the next read is made afresh and answers each pull.
async fn a_failed_shared_read_answers_every_waiter_alike(backend: Backend) {
    const GROUPS: usize = 8;
    let server = Arc::new(TestServer::start(backend).await);
    let version = one_push_per_group(&server, "s", GROUPS).await;
    let log = Arc::new(ReadLog::default());
    log.refusals.store(1, Ordering::SeqCst);
    let (pulls, metrics) = logged_pulls(&server, &log);

    let failed = pull_together(&pulls, "s", 0..GROUPS, 0).await;
    let failure = (
        500,
        json!({"error": "Internal", "message": "internal error; the request changed nothing, retry later"}),
    );
    for (i, result) in failed.into_iter().enumerate() {
        match &result {
            Err(PullError::Store(StoreError::Database(cause))) => assert_eq!(cause, REFUSAL),
            other => panic!("pull {i} got {other:?}"),
        }
        assert_eq!(answered(result).await, failure, "pull {i}");
    }
    let all: Vec<String> = (0..GROUPS).map(group).collect();
    assert_eq!(
        *log.reads.lock().unwrap(),
        vec![all.clone()],
        "one read for all"
    );
    assert_eq!(metrics.pull_reads.get(), 1);

    let retried = pull_together(&pulls, "s", 0..GROUPS, 0).await;
    for (i, result) in retried.into_iter().enumerate() {
        assert_eq!(answered(result).await, delta_of(i, version), "pull {i}");
    }
    assert_eq!(*log.reads.lock().unwrap(), vec![all.clone(), all]);
    assert_eq!(metrics.pull_reads.get(), 2);
}

/// More identical pulls than one read answers (1,000 client groups, the bound on the query's
/// array): the first 1,000 share one read, the rest the next, and each gets its own group's
/// clients.
async fn pulls_past_a_thousand_groups_take_two_reads(backend: Backend) {
    const GROUPS: usize = 1001;
    let server = Arc::new(TestServer::start(backend).await);
    let version = one_push_per_group(&server, "s", GROUPS).await;
    let log = Arc::new(ReadLog::default());
    let (pulls, metrics) = logged_pulls(&server, &log);

    let answers = pull_together(&pulls, "s", 0..GROUPS, 0).await;
    for (i, result) in answers.into_iter().enumerate() {
        assert_eq!(answered(result).await, delta_of(i, version), "pull {i}");
    }
    let reads = log.reads.lock().unwrap().clone();
    let sizes: Vec<usize> = reads.iter().map(Vec::len).collect();
    assert_eq!(sizes, [1000, 1], "client groups per read");
    let first: Vec<String> = (0..1000).map(group).collect();
    assert_eq!(reads, [first, vec![group(1000)]]);
    assert_eq!(metrics.pull_reads.get(), 2);
}

/// First pulls whose streamed read fails are answered with the store's error (500), each
/// giving back its turn: with one streamed pull allowed at a time, the pull after three
/// failures still gets its turn (not 503 Overloaded) and the whole space.
async fn failed_first_pulls_give_back_their_turn(backend: Backend) {
    let server = Arc::new(TestServer::start(backend).await);
    let version = one_push_per_group(&server, "s", 2).await;
    let log = Arc::new(ReadLog::default());
    log.refusals.store(3, Ordering::SeqCst);
    let limits = PullLimits {
        max_first_pulls: 1,
        queue_wait: Duration::from_millis(500),
        ..PullLimits::default()
    };
    let (pulls, metrics) = logged_pulls_with(&server, &log, limits);
    let space = SpaceId::parse("s").unwrap();
    let request: PullRequest = serde_json::from_value(
        json!({"pullVersion": 1, "clientGroupID": group(0), "cookie": null}),
    )
    .unwrap();
    for attempt in 0..3 {
        let failed = pulls.pull(&space, &reader(), &request).await;
        assert_eq!(
            answered(failed).await,
            (
                500,
                json!({"error": "Internal", "message": "internal error; the request changed nothing, retry later"})
            ),
            "attempt {attempt}"
        );
    }
    let Ok(PullBody::Streamed(chunks)) = pulls.pull(&space, &reader(), &request).await else {
        panic!("the fourth first pull was not streamed");
    };
    let body: Vec<bytes::Bytes> = chunks.map(|chunk| chunk.unwrap()).collect().await;
    let body: Value = serde_json::from_slice(&body.concat()).unwrap();
    assert_eq!(
        body,
        json!({"cookie": version, "lastMutationIDChanges": {client(0): 1},
               "patch": [{"op": "clear"}, {"op": "put", "key": "n", "value": version}]})
    );
    assert_eq!(log.streamed.load(Ordering::SeqCst), 4);
    assert_eq!(metrics.first_pulls_refused.get(), 0);
}

/// On one thread, so that every pull has joined its batch before the reader runs.
mod one_thread {
    use crate::harness::Backend;

    #[tokio::test]
    async fn postgres_a_failed_shared_read_answers_every_waiter_alike() {
        super::a_failed_shared_read_answers_every_waiter_alike(Backend::Postgres).await
    }

    #[tokio::test]
    async fn sqlite_a_failed_shared_read_answers_every_waiter_alike() {
        super::a_failed_shared_read_answers_every_waiter_alike(Backend::Sqlite).await
    }

    #[tokio::test]
    async fn postgres_pulls_past_a_thousand_groups_take_two_reads() {
        super::pulls_past_a_thousand_groups_take_two_reads(Backend::Postgres).await
    }

    #[tokio::test]
    async fn sqlite_pulls_past_a_thousand_groups_take_two_reads() {
        super::pulls_past_a_thousand_groups_take_two_reads(Backend::Sqlite).await
    }
}

/// A server whose streamed pulls are cut after `stall` unread or `deadline` in all, with
/// `megabytes` values of 1 MB in space `big`.
async fn server_with_big_space(
    backend: Backend,
    stall: Duration,
    deadline: Duration,
    megabytes: u64,
) -> TestServer {
    let options = App::builder().pulls(PullLimits {
        stream: StreamLimits { stall, deadline },
        ..PullLimits::default()
    });
    let server = TestServer::start_with(backend, options).await;
    let megabyte = "x".repeat(1024 * 1024);
    for id in 1..=megabytes {
        let set = json!({"key": format!("k{id:02}"), "value": megabyte});
        let body = push_body("writer", &[("w", id, "set", set)]);
        assert_eq!(server.push("big", &body).await, (200, json!({})));
    }
    server
}

/// A first pull of `big`, its headers read.
async fn first_pull_of_big(server: &TestServer) -> reqwest::Response {
    let body = json!({"pullVersion": 1, "clientGroupID": "reader", "cookie": null});
    let response = server
        .http
        .post(server.url("/spaces/big/pull"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response
}

/// Reads the rest of `response` as fast as it comes: how many bytes, and how the body ended
/// (`Ok` only for a clean end).
async fn drain(
    mut response: reqwest::Response,
    mut read: Vec<u8>,
) -> (Vec<u8>, reqwest::Result<()>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "the body neither ended nor failed"
        );
        match response.chunk().await {
            Ok(Some(chunk)) => read.extend_from_slice(&chunk),
            Ok(None) => return (read, Ok(())),
            Err(error) => return (read, Err(error)),
        }
    }
}

/// A streamed pull cut off ends in a transport error at the client: never a clean end of the
/// truncated JSON.
fn assert_cut_off(read: &[u8], ended: reqwest::Result<()>, megabytes: usize) {
    let error = ended.expect_err("the body of a cut-off pull ended cleanly");
    assert!(error.is_body() || error.is_decode(), "{error:?}");
    assert!(
        read.len() < megabytes * 1024 * 1024,
        "{} bytes read",
        read.len()
    );
    assert!(serde_json::from_slice::<Value>(read).is_err());
}

/// A reader that keeps taking the body, a chunk every 100 ms, so that the stall cut (5 s)
/// never fires, is still cut off at the whole-response deadline (2 s), long before it has all.
async fn a_slow_reader_is_cut_at_the_deadline(backend: Backend) {
    const MEGABYTES: u64 = 16;
    let (stall, deadline) = (Duration::from_secs(5), Duration::from_secs(2));
    let server = server_with_big_space(backend, stall, deadline, MEGABYTES).await;
    let started = Instant::now();
    let mut response = first_pull_of_big(&server).await;
    let mut read = Vec::new();
    while server.metrics.pull_streams_cut.get() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a slow reader was never cut off"
        );
        match response.chunk().await {
            Ok(Some(chunk)) => read.extend_from_slice(&chunk),
            other => panic!("the body ended before it was cut off: {other:?}"),
        }
        // The slow reading is the behaviour under test: well within the stall limit each time.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut_after = started.elapsed();
    assert!(
        cut_after >= deadline && cut_after < stall,
        "cut after {cut_after:?}"
    );
    let (read, ended) = drain(response, read).await;
    assert_cut_off(&read, ended, MEGABYTES as usize);
    assert_eq!(server.metrics.pull_streams_cut.get(), 1);
}

/// A reader that stops reading is cut off at the stall limit; what it then reads of the body
/// ends in a transport error.
async fn a_stalled_reader_sees_a_transport_error(backend: Backend) {
    const MEGABYTES: u64 = 16;
    let (stall, deadline) = (Duration::from_secs(1), Duration::from_secs(60));
    let server = server_with_big_space(backend, stall, deadline, MEGABYTES).await;
    let mut response = first_pull_of_big(&server).await;
    let first = response.chunk().await.unwrap().expect("a first chunk");
    let waited = Instant::now();
    while server.metrics.pull_streams_cut.get() == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "a stalled reader was never cut off"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (read, ended) = drain(response, first.to_vec()).await;
    assert_cut_off(&read, ended, MEGABYTES as usize);
    assert_eq!(server.metrics.pull_streams_cut.get(), 1);
}

crate::on_both_stores!(
    failed_first_pulls_give_back_their_turn,
    a_slow_reader_is_cut_at_the_deadline,
    a_stalled_reader_sees_a_transport_error,
);
