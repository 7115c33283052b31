//! Test support: a private `redis-server` on a free loopback port (stopped, restarted on the same
//! port, killed on drop), and a subscriber that listens as a socket.io adapter does.

use std::net::TcpListener as StdTcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;

/// How long a test waits for something that should happen at once.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

/// A `redis-server` of the test's own, keeping nothing on disk.
pub(crate) struct PrivateRedis {
    port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one with these extra arguments (e.g. `--requirepass x`) and waits until it answers.
    pub(crate) async fn start(extra: &[&str]) -> PrivateRedis {
        let port = StdTcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let mut redis = PrivateRedis {
            port,
            extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
            child: None,
        };
        redis.run().await;
        redis
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Kills it (as a crash would) and waits until the port refuses connections.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and waits until it answers.
    pub(crate) async fn restart(&mut self) {
        self.stop();
        self.run().await;
    }

    async fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/setup installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        let address = format!("127.0.0.1:{}", self.port);
        while tokio::net::TcpStream::connect(&address).await.is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Subscribes to every channel of `key` (`{key}#*`), as a socket.io process's adapter does, and
/// keeps the channels of what it receives, in order. Stops with `stop` or the test's runtime.
pub(crate) struct Listener {
    received: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    pub(crate) async fn start(redis_url: &str, key: &str) -> Listener {
        let client = redis::Client::open(redis_url).expect("a Redis URL");
        let mut pubsub = client.get_async_pubsub().await.expect("Redis answers");
        pubsub
            .psubscribe(format!("{key}#*"))
            .await
            .expect("psubscribe");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        let task = tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                sink.lock()
                    .unwrap()
                    .push(message.get_channel_name().to_owned());
            }
        });
        Listener { received, task }
    }

    /// Closes its connection, as a socket.io process that exits does, and waits a moment for
    /// Redis to drop its subscription.
    pub(crate) async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    pub(crate) fn channels(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `count` messages arrived; panics after [`PATIENCE`].
    pub(crate) async fn wait_for(&self, count: usize) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let channels = self.channels();
            if channels.len() >= count {
                return channels;
            }
            assert!(
                Instant::now() < deadline,
                "{count} pokes expected, got {channels:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
