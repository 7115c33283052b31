//! socket.io pokes from the binary: over TLS (`rediss://`) to a Redis whose certificate the
//! system trusts (SSL_CERT_FILE here), refused by one it does not; and bad settings refused.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::harness::{push_increment, refused_start_up, start_with};

/// A `redis-server` of the test's own serving plain TCP on `port` and TLS on `tls_port` with a
/// certificate for `localhost` signed by the test CA `dir/ca.pem`.
struct TlsRedis {
    port: u16,
    tls_port: u16,
    child: Child,
}

impl TlsRedis {
    fn start(dir: &Path) -> TlsRedis {
        make_certificates(dir);
        let (port, tls_port) = (free_port(), free_port());
        let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--tls-port", &tls_port.to_string()])
            .args(["--tls-cert-file", &file("server.pem")])
            .args(["--tls-key-file", &file("server.key")])
            .args(["--tls-ca-cert-file", &file("ca.pem")])
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/setup installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsRedis {
            port,
            tls_port,
            child,
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A test CA (`ca.pem`) and a certificate for localhost and 127.0.0.1 it signed
/// (`server.pem`, `server.key`), made with the openssl command.
fn make_certificates(dir: &Path) {
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=replisync test CA",
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    ];
    for args in steps {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl on PATH");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Listens on the plain port as a socket.io adapter would, for every channel of `key`.
async fn listen(redis: &TlsRedis, key: &str) -> redis::aio::PubSub {
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.psubscribe(format!("{key}#*")).await.unwrap();
    pubsub
}

fn socketio_env<'a>(url: &'a str, ca: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("REPLISYNC_SOCKETIO_REDIS_URL", url),
        ("REPLISYNC_SOCKETIO_KEY", "tls-key"),
        ("REPLISYNC_SOCKETIO_MAX_ATTEMPTS", "2"),
        ("RUST_LOG", "replisync=debug"),
    ];
    if let Some(ca) = ca {
        env.push(("SSL_CERT_FILE", ca));
    }
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pokes_reach_a_tls_redis_whose_certificate_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let redis = TlsRedis::start(dir.path());
    let mut pubsub = listen(&redis, "tls-key").await;
    let url = format!("rediss://localhost:{}", redis.tls_port);
    let ca = dir.path().join("ca.pem").to_string_lossy().into_owned();
    let server = start_with(dir.path(), &socketio_env(&url, Some(&ca)));

    push_increment(&server.base, "tls", 1).await;

    let message = tokio::time::timeout(Duration::from_secs(20), pubsub.on_message().next()).await;
    // The start-up check's line may come just after the poke: waited for, within a bound.
    let checked = server
        .wait_for_log("socket.io: Redis answers", Duration::from_secs(10))
        .await;
    let log = server.log_lines().join("\n");
    server.stop();
    let message = message.expect("the poke arrives").expect("subscribed");
    assert_eq!(message.get_channel_name(), "tls-key#/#space-demo#");
    assert!(checked.is_some(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_whose_certificate_is_not_trusted_gets_no_poke() {
    let dir = tempfile::tempdir().unwrap();
    let redis = TlsRedis::start(dir.path());
    let mut pubsub = listen(&redis, "tls-key").await;
    let url = format!("rediss://localhost:{}", redis.tls_port);
    let server = start_with(dir.path(), &socketio_env(&url, None));

    push_increment(&server.base, "untrusted", 1).await;

    let message = tokio::time::timeout(Duration::from_secs(3), pubsub.on_message().next()).await;
    let given_up = server
        .wait_for_log("gave up poking", Duration::from_secs(20))
        .await;
    let checked = server
        .wait_for_log(
            "socket.io: Redis cannot be reached at start",
            Duration::from_secs(10),
        )
        .await;
    let log = server.log_lines().join("\n");
    server.stop();
    assert!(message.is_err(), "no poke over an untrusted connection");
    assert!(checked.is_some(), "{log}");
    let given_up = given_up.expect("the poke is given up after its attempts");
    assert!(given_up.contains("socket.io"), "{given_up}");
}

#[test]
fn a_socketio_redis_url_that_is_not_redis_stops_start_up_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = refused_start_up(
        dir.path(),
        "127.0.0.1:0",
        &[(
            "REPLISYNC_SOCKETIO_REDIS_URL",
            "https://:pw-secret@redis.example",
        )],
    );
    assert!(stderr.contains("REPLISYNC_SOCKETIO_REDIS_URL"), "{stderr}");
    assert!(stderr.contains("redis://"), "{stderr}");
    assert!(!stderr.contains("pw-secret"), "{stderr}");
}
