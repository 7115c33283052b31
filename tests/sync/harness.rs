//! Test harness: a real replisync router on 127.0.0.1:0 over a fresh store (a new Postgres
//! schema, or a new SQLite file), and a small HTTP client that speaks the protocol.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use replisync::poke::PokeSink;
use replisync::poke::sse::settings::SseSettings;
use replisync::protocol::SpaceId;
use replisync::startup::{App, AppBuilder, serve};
use replisync::store::pg_session::SessionLimits;
use replisync::store::postgres::{DEFAULT_KNOWN_STATE_BYTES, PgStore};
use replisync::store::sqlite::SqliteStore;
use replisync::store::{BatchLimits, Store};
use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;
use std::str::FromStr;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Postgres,
    Sqlite,
}

/// The server under test and a client for it. Dropping it stops the server, waits for `serve`
/// to return (failing the test if it failed, panicked or hung), then removes the database.
pub(crate) struct TestServer {
    pub base: String,
    pub http: reqwest::Client,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<replisync::metrics::Metrics>,
    running: Running,
    /// Dropped after the server stopped (fields drop in order).
    pub db: TestDb,
}

/// The server's task and the signal that stops it.
struct Running {
    stop: CancellationToken,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Longest wait for the server to stop: its shutdown deadline (10 s by default) and then some.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Drop for TestServer {
    fn drop(&mut self) {
        self.running.stop.cancel();
        let Some(served) = self.running.served.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return; // cannot block this runtime's only thread to wait
        }
        let stopped = tokio::task::block_in_place(|| {
            runtime.block_on(tokio::time::timeout(STOP_WAIT, served))
        });
        if std::thread::panicking() {
            return;
        }
        match stopped {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => panic!("serve() failed at shutdown: {error:#}"),
            Ok(Err(task)) => panic!("the server's task failed: {task}"),
            Err(_) => panic!("the server did not stop within {STOP_WAIT:?}"),
        }
    }
}

/// How a test's store is opened; the app itself is configured with `App::builder()`, as the
/// binary configures it.
pub(crate) struct StoreOptions {
    /// Wraps the test's store in a fault (see [`StoreOptions::wrapped`]).
    pub wrap_store: Option<StoreWrapper>,
    /// Postgres: the bounds of the store's sessions.
    pub pg_limits: SessionLimits,
    /// Postgres: changes the store's connect options (before the bounds are added).
    pub pg_options: fn(PgConnectOptions) -> PgConnectOptions,
    /// How the store batches the commits of pushes to several spaces.
    pub batch: BatchLimits,
    /// Postgres: bytes kept of what pushes read and committed (0: every push reads).
    pub known_state_bytes: u64,
}

/// A wrapper of the test's store that captures what the test keeps (a gate, a switch).
pub(crate) type StoreWrapper = Box<dyn FnOnce(Arc<dyn Store>) -> Arc<dyn Store> + Send>;

impl StoreOptions {
    /// The test's store wrapped by `wrap`, which may capture what the test keeps to steer it.
    pub(crate) fn wrapped(
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store> + Send + 'static,
    ) -> StoreOptions {
        StoreOptions {
            wrap_store: Some(Box::new(wrap)),
            ..StoreOptions::default()
        }
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            wrap_store: None,
            pg_limits: SessionLimits::default(),
            pg_options: |options| options,
            batch: BatchLimits::default(),
            known_state_bytes: DEFAULT_KNOWN_STATE_BYTES,
        }
    }
}

/// The built-in SSE poke stream with a keep-alive comment every `keep_alive`, default caps.
pub(crate) fn sse_every(keep_alive: std::time::Duration) -> SseSettings {
    SseSettings {
        keep_alive,
        ..SseSettings::default()
    }
}

impl TestServer {
    pub(crate) async fn start(backend: Backend) -> TestServer {
        TestServer::start_with(backend, App::builder()).await
    }

    /// Builds `app` as the binary does (once, whole) and serves it through the binary's own
    /// `serve`, on 127.0.0.1:0.
    pub(crate) async fn start_with(backend: Backend, app: AppBuilder) -> TestServer {
        TestServer::start_on(backend, StoreOptions::default(), app).await
    }

    /// [`TestServer::start_with`], over a store opened with `store`.
    pub(crate) async fn start_on(
        backend: Backend,
        store: StoreOptions,
        app: AppBuilder,
    ) -> TestServer {
        let db = TestDb::create(backend).await;
        let mut opened = db.open_store_with(&store).await;
        if let Some(wrap) = store.wrap_store {
            opened = wrap(opened);
        }
        let app = app.build(opened);
        let (store, metrics) = (app.store().clone(), app.metrics().clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let served = tokio::spawn(serve(listener, app, stop.clone().cancelled_owned()));
        TestServer {
            base,
            http: reqwest::Client::new(),
            store,
            metrics,
            running: Running {
                stop,
                served: Some(served),
            },
            db,
        }
    }
}

impl TestServer {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// GETs `path` (health, metrics, the SSE stream).
    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    /// POSTs raw bytes; returns the status and the body as JSON (Null when not JSON).
    pub(crate) async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        auth: &str,
    ) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .header("authorization", auth)
            .header("x-replicache-requestid", "test-request")
            .body(body)
            .send()
            .await
            .expect("request reaches the server");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub(crate) async fn push(&self, space: &str, body: &Value) -> (u16, Value) {
        self.push_as(space, body, "").await
    }

    /// Pushes `body` to `space` and asserts it was applied: `200 {}`.
    pub(crate) async fn push_ok(&self, space: &str, body: &Value) {
        let answer = self.push(space, body).await;
        assert_eq!(answer, (200, json!({})), "push to {space}: {body}");
    }

    /// Pulls and asserts the pull was answered 200; returns the response body.
    pub(crate) async fn pull_ok(&self, space: &str, group: &str, cookie: Value) -> Value {
        self.pull_ok_as(space, group, cookie, "").await
    }

    /// [`TestServer::pull_ok`] with this `Authorization` header.
    pub(crate) async fn pull_ok_as(
        &self,
        space: &str,
        group: &str,
        cookie: Value,
        auth: &str,
    ) -> Value {
        let (status, body) = self.pull_as(space, group, cookie, auth).await;
        assert_eq!(status, 200, "pull of {space} by {group}: {body}");
        body
    }

    pub(crate) async fn push_as(&self, space: &str, body: &Value, auth: &str) -> (u16, Value) {
        self.post_raw(&format!("/spaces/{space}/push"), body.to_string(), auth)
            .await
    }

    pub(crate) async fn pull(&self, space: &str, group: &str, cookie: Value) -> (u16, Value) {
        self.pull_as(space, group, cookie, "").await
    }

    pub(crate) async fn pull_as(
        &self,
        space: &str,
        group: &str,
        cookie: Value,
        auth: &str,
    ) -> (u16, Value) {
        let body = json!({"pullVersion": 1, "schemaVersion": "", "profileID": "p",
                          "clientGroupID": group, "cookie": cookie});
        self.post_raw(&format!("/spaces/{space}/pull"), body.to_string(), auth)
            .await
    }

    /// Pulls from scratch and returns (cookie, lastMutationIDChanges, entries).
    pub(crate) async fn state(&self, space: &str, group: &str) -> PullView {
        self.state_as(space, group, "").await
    }

    /// `state`, with this `Authorization` header.
    pub(crate) async fn state_as(&self, space: &str, group: &str, auth: &str) -> PullView {
        let (status, body) = self.pull_as(space, group, Value::Null, auth).await;
        assert_eq!(status, 200, "pull failed: {body}");
        PullView::from_response(&body)
    }
}

/// A pull response taken apart.
#[derive(Debug, Default)]
pub(crate) struct PullView {
    pub cookie: u64,
    pub last_mutation_ids: serde_json::Map<String, Value>,
    pub entries: serde_json::Map<String, Value>,
}

impl PullView {
    pub(crate) fn from_response(body: &Value) -> PullView {
        let mut view = PullView::default();
        view.apply(body);
        view
    }

    /// Applies a pull response as a client would: clear, put, del; cookie and lmids replaced.
    pub(crate) fn apply(&mut self, body: &Value) {
        let cookie = body["cookie"]
            .as_u64()
            .unwrap_or_else(|| panic!("no cookie in {body}"));
        assert!(
            cookie >= self.cookie,
            "cookie went backwards: {} -> {cookie}",
            self.cookie
        );
        self.cookie = cookie;
        for (client, lmid) in body["lastMutationIDChanges"].as_object().expect("lmids") {
            self.last_mutation_ids.insert(client.clone(), lmid.clone());
        }
        for op in body["patch"].as_array().expect("patch") {
            match op["op"].as_str() {
                Some("clear") => self.entries.clear(),
                Some("put") => {
                    self.entries
                        .insert(op["key"].as_str().unwrap().to_owned(), op["value"].clone());
                }
                Some("del") => {
                    self.entries.remove(op["key"].as_str().unwrap());
                }
                other => panic!("unknown patch op {other:?}"),
            }
        }
    }

    pub(crate) fn lmid(&self, client: &str) -> u64 {
        self.last_mutation_ids
            .get(client)
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }
}

/// A push body of `mutations`, each `(client, id, name, args)`.
pub(crate) fn push_body(group: &str, mutations: &[(&str, u64, &str, Value)]) -> Value {
    let mutations: Vec<Value> = mutations
        .iter()
        .map(|(client, id, name, args)| {
            json!({"id": id, "name": name, "args": args, "timestamp": 12.5, "clientID": client})
        })
        .collect();
    json!({"pushVersion": 1, "schemaVersion": "", "profileID": "p",
           "clientGroupID": group, "mutations": mutations})
}

pub(crate) fn inc(key: &str, delta: i64) -> Value {
    json!({"key": key, "delta": delta})
}

/// A fresh database for one test: a new schema in Postgres, or a new SQLite file.
pub(crate) enum TestDb {
    Postgres {
        admin_url: String,
        schema: String,
    },
    Sqlite {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    },
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The Postgres the tests use; a new schema is made in it per test.
pub(crate) fn postgres_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

impl TestDb {
    pub(crate) async fn create(backend: Backend) -> TestDb {
        match backend {
            Backend::Postgres => {
                let admin_url = postgres_url();
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos();
                let schema = format!(
                    "replisync_test_{}_{}_{}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::Relaxed),
                    nanos % 1_000_000_000
                );
                let mut conn = sqlx::PgConnection::connect_with(&admin_options(&admin_url))
                    .await
                    .expect("Postgres for tests (TEST_DATABASE_URL) is reachable");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                TestDb::Postgres { admin_url, schema }
            }
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("replisync.db");
                TestDb::Sqlite { _dir: dir, path }
            }
        }
    }

    /// A store on this database, with the Postgres session options of `options`.
    pub(crate) async fn open_store_with(&self, options: &StoreOptions) -> Arc<dyn Store> {
        match self {
            TestDb::Postgres { admin_url, schema } => {
                // Named after the schema, so that a test can find its server's connections.
                let connect = admin_options(admin_url)
                    .options([("search_path", schema.as_str())])
                    .application_name(schema);
                let connect = (options.pg_options)(connect);
                let store = PgStore::connect_with_limits(connect, 16, options.pg_limits)
                    .await
                    .unwrap()
                    .with_batch_limits(options.batch)
                    .with_known_state_bytes(options.known_state_bytes);
                store.migrate().await.unwrap();
                Arc::new(store)
            }
            TestDb::Sqlite { path, .. } => {
                let store = SqliteStore::open(path, 8)
                    .await
                    .unwrap()
                    .with_batch_limits(options.batch);
                store.migrate().await.unwrap();
                Arc::new(store)
            }
        }
    }

    /// Ends every Postgres session of the server under test, as a database restart or failover
    /// would; answers how many it ended.
    pub(crate) async fn end_server_sessions(&self) -> i64 {
        let TestDb::Postgres { admin_url, schema } = self else {
            panic!("only a Postgres server has sessions to end");
        };
        let mut conn = sqlx::PgConnection::connect_with(&admin_options(admin_url))
            .await
            .unwrap();
        sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = $1",
        )
        .bind(schema)
        .fetch_one(&mut conn)
        .await
        .unwrap()
    }

    /// Runs `sql` (statements both databases accept) on a connection of its own.
    pub(crate) async fn execute(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            TestDb::Postgres { .. } => {
                sqlx::raw_sql(sql)
                    .execute(&mut self.pg().await)
                    .await
                    .unwrap();
            }
            TestDb::Sqlite { .. } => {
                sqlx::raw_sql(sql)
                    .execute(&mut self.sqlite().await)
                    .await
                    .unwrap();
            }
        }
    }

    /// The integer `sql` answers (no row or NULL: `None`).
    pub(crate) async fn scalar(&self, sql: &str) -> Option<i64> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            TestDb::Postgres { .. } => sqlx::query_scalar(sql)
                .fetch_optional(&mut self.pg().await)
                .await
                .unwrap()
                .flatten(),
            TestDb::Sqlite { .. } => sqlx::query_scalar(sql)
                .fetch_optional(&mut self.sqlite().await)
                .await
                .unwrap()
                .flatten(),
        }
    }

    /// A connection to the test's Postgres schema.
    pub(crate) async fn pg(&self) -> sqlx::PgConnection {
        let TestDb::Postgres { admin_url, schema } = self else {
            panic!("not a Postgres test database");
        };
        let options = admin_options(admin_url).options([("search_path", schema.as_str())]);
        sqlx::PgConnection::connect_with(&options).await.unwrap()
    }

    pub(crate) async fn sqlite(&self) -> sqlx::SqliteConnection {
        let TestDb::Sqlite { path, .. } = self else {
            panic!("not a SQLite test database");
        };
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true) // a test may write before any store opens the file
            .busy_timeout(std::time::Duration::from_secs(10));
        sqlx::SqliteConnection::connect_with(&options)
            .await
            .unwrap()
    }

    /// The ids of every stored client group, sorted: shows a refused push created none (a
    /// first pull by a group that was never created looks just like one by a group that was).
    pub(crate) async fn client_group_ids(&self) -> Vec<String> {
        let fingerprint = self.fingerprint().await;
        let groups = fingerprint.split("\n--\n").nth(1).unwrap_or_default();
        groups
            .lines()
            .filter_map(|row| row.split('@').next())
            .map(str::to_owned)
            .collect()
    }

    /// Every row of every replisync table, as text: equal fingerprints mean nothing changed.
    pub(crate) async fn fingerprint(&self) -> String {
        const TABLES: [&str; 4] = [
            "SELECT id || '=' || version || '/' || compacted_version FROM replisync_spaces ORDER BY 1",
            "SELECT id || '@' || space_id || '/' || user_id FROM replisync_client_groups ORDER BY 1",
            "SELECT id || '@' || client_group_id || ':' || last_mutation_id || '/' || last_modified_version FROM replisync_clients ORDER BY 1",
            "SELECT space_id || '/' || key || '=' || coalesce(value, '-') || '/' || version FROM replisync_entries ORDER BY 1",
        ];
        let mut rows = Vec::new();
        match self {
            TestDb::Postgres { admin_url, schema } => {
                let options = admin_options(admin_url).options([("search_path", schema.as_str())]);
                let mut conn = sqlx::PgConnection::connect_with(&options).await.unwrap();
                for sql in TABLES {
                    let table: Vec<String> =
                        sqlx::query_scalar(sql).fetch_all(&mut conn).await.unwrap();
                    rows.push(table.join("\n"));
                }
            }
            TestDb::Sqlite { path, .. } => {
                let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
                let mut conn = sqlx::SqliteConnection::connect_with(&options)
                    .await
                    .unwrap();
                for sql in TABLES {
                    let table: Vec<String> =
                        sqlx::query_scalar(sql).fetch_all(&mut conn).await.unwrap();
                    rows.push(table.join("\n"));
                }
            }
        }
        rows.join("\n--\n")
    }
}

use sqlx::Connection;

fn admin_options(url: &str) -> PgConnectOptions {
    PgConnectOptions::from_str(url).expect("TEST_DATABASE_URL is a Postgres URL")
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { admin_url, schema } = self {
            let (url, schema) = (admin_url.clone(), schema.clone());
            // Drop runs outside async; a short-lived runtime on its own thread cleans up.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(runtime) = runtime {
                    runtime.block_on(async move {
                        if let Ok(mut conn) =
                            sqlx::PgConnection::connect_with(&admin_options(&url)).await
                        {
                            let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                                .execute(&mut conn)
                                .await;
                        }
                    });
                }
            })
            .join();
        }
    }
}

/// Runs each named async test function once per store: `postgres::name` and `sqlite::name`.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::harness::Backend::Postgres).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::harness::Backend::Sqlite).await
                }
            )*
        }
    };
}

/// Records the spaces the server pokes, in order: an observer of its pokes, as a watcher sees
/// them before any coalescing.
#[derive(Default)]
pub(crate) struct PokeRecorder {
    poked: std::sync::Mutex<Vec<String>>,
}

impl PokeSink for PokeRecorder {
    fn space_changed(&self, space: &SpaceId, _committed_at: std::time::Instant) {
        self.poked.lock().unwrap().push(space.as_str().to_owned());
    }
}

impl PokeRecorder {
    /// How many times `space` was poked.
    pub(crate) fn count(&self, space: &str) -> usize {
        self.poked
            .lock()
            .unwrap()
            .iter()
            .filter(|s| *s == space)
            .count()
    }

    /// Whether `space` has been poked `times` times within `wait`.
    pub(crate) async fn wait_for(
        &self,
        space: &str,
        times: usize,
        wait: std::time::Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while self.count(space) < times {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }
}

/// Waits until `done()` holds, checking every 2 ms for at most 20 s; panics naming `what` and
/// the last `state()` if it never does.
pub(crate) async fn wait_until<S: std::fmt::Debug>(
    what: &str,
    mut state: impl FnMut() -> S,
    mut done: impl FnMut(&S) -> bool,
) -> S {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = state();
        if done(&now) {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited 20 s for {what}; last seen {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}
