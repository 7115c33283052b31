//! Settings that would start a server that cannot work stop start-up with one line, printed once,
//! that names the variable and says what to write instead; a Pusher that cannot be reached is logged.

use std::process::Output;
use std::time::Duration;

use crate::harness::{run_until_exit, start_with};
use crate::pusher_double::SlowPusher;

/// The one line a refused start-up printed on stderr; panics unless it exited with `code`,
/// printed exactly one line, and logged no error on stdout (printed once).
fn the_one_line(output: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(
        !stdout.contains("ERROR"),
        "printed once, on stderr: {stdout}"
    );
    stderr
}

fn refused_with(env: &[(&str, &str)], code: i32) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut env = env.to_vec();
    env.push(("REPLISYNC_LISTEN", "127.0.0.1:0"));
    the_one_line(&run_until_exit(dir.path(), &[], &env), code)
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn a_cors_origin_that_could_never_match_stops_start_up_with_the_fix() {
    let line = refused_with(&[("REPLISYNC_CORS_ORIGINS", "example.com")], 1);
    assert!(line.contains("REPLISYNC_CORS_ORIGINS"), "{line}");
    assert!(line.contains("no scheme"), "{line}");
    assert!(line.contains("https://example.com"), "{line}");
    let line = refused_with(&[("REPLISYNC_CORS_ORIGINS", "https://app.example/")], 1);
    assert!(line.contains("no path"), "{line}");
}

#[test]
fn a_short_jwt_secret_stops_start_up_saying_how_long_and_how_to_make_one() {
    let line = refused_with(&[("REPLISYNC_JWT_SECRET", "dev-secret")], 1);
    assert!(line.contains("REPLISYNC_JWT_SECRET is 10 bytes"), "{line}");
    assert!(line.contains("at least 32"), "{line}");
    assert!(line.contains("openssl rand"), "{line}");
    assert!(
        !line.contains("dev-secret"),
        "the secret is never printed: {line}"
    );
}

#[test]
fn a_rust_log_that_would_hide_every_line_stops_start_up() {
    let line = refused_with(&[("RUST_LOG", "verbose")], 2);
    assert!(line.contains("RUST_LOG names \"verbose\""), "{line}");
    assert!(line.contains("RUST_LOG=debug"), "{line}");
    let line = refused_with(&[("RUST_LOG", "replisync=loud")], 2);
    assert!(line.contains("cannot be parsed"), "{line}");
}

#[test]
fn a_postgres_that_refuses_connections_is_named_with_the_cause_but_not_the_password() {
    let port = closed_port();
    let url = format!("postgres://app:hunter2-secret@127.0.0.1:{port}/orders");
    let line = refused_with(&[("DATABASE_URL", &url)], 1);
    assert!(
        line.contains(&format!("app@127.0.0.1:{port}/orders")),
        "{line}"
    );
    assert!(line.contains("connection refused"), "{line}");
    assert!(line.contains("DATABASE_URL"), "{line}");
    assert!(
        !line.contains("hunter2"),
        "the password is never printed: {line}"
    );
}

#[test]
fn a_missing_database_is_named_with_how_to_create_it() {
    let url = "postgres://postgres@127.0.0.1:5432/replisync_no_such_database";
    let line = refused_with(&[("DATABASE_URL", url)], 1);
    assert!(
        line.contains("the database \"replisync_no_such_database\" does not exist"),
        "{line}"
    );
    assert!(
        line.contains("createdb replisync_no_such_database"),
        "{line}"
    );
    assert!(
        !line.contains(" at line "),
        "no source line of Postgres: {line}"
    );
}

#[test]
fn a_user_the_server_does_not_know_is_named() {
    let url = "postgres://replisync_no_such_role@127.0.0.1:5432/test";
    let line = refused_with(&[("DATABASE_URL", url)], 1);
    assert!(
        line.contains("the server refused user \"replisync_no_such_role\""),
        "{line}"
    );
    assert!(
        line.contains("does not exist"),
        "the server's reason: {line}"
    );
}

fn pusher_at(host_port: &str) -> Vec<(&'static str, String)> {
    let (host, port) = host_port.split_once(':').unwrap();
    vec![
        ("PUSHER_APP_ID", "1".into()),
        ("PUSHER_KEY", "key".into()),
        ("PUSHER_SECRET", "secret".into()),
        ("PUSHER_HOST", host.into()),
        ("PUSHER_PORT", port.into()),
        ("PUSHER_SCHEME", "http".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pusher_that_cannot_be_reached_is_logged_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let address = format!("127.0.0.1:{}", closed_port());
    let env = pusher_at(&address);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = start_with(dir.path(), &env);
    let line = server
        .wait_for_log(
            "pusher: the server cannot be reached",
            Duration::from_secs(10),
        )
        .await;
    server.stop();
    let line = line.expect("a warning about the unreachable Pusher server");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&format!("http://{address}")), "{line}");
    assert!(line.contains("PUSHER_HOST"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pusher_that_refuses_the_signed_check_is_logged_naming_the_credentials() {
    // The double serves only event publication: the check's `GET .../channels` gets 404,
    // as from a server that does not know this app id.
    let pusher = SlowPusher::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), &pusher.env());
    let line = server
        .wait_for_log("pusher: the server refused", Duration::from_secs(10))
        .await;
    server.stop();
    let line = line.expect("a warning about the refused check");
    assert!(line.contains("status=404"), "{line}");
    assert!(line.contains("PUSHER_SECRET"), "{line}");
}
