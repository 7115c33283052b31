//! Start-up refusals and checks: a configuration that cannot work stops the binary naming
//! what to fix, and `/readyz` waits for what start-up could not fetch yet.

use std::process::Command;
use std::time::Duration;

use crate::harness::{refused_start_up, start_with};

#[test]
fn half_a_pusher_configuration_stops_start_up_naming_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = refused_start_up(dir.path(), "127.0.0.1:0", &[("PUSHER_KEY", "app-key-abc")]);
    for missing in ["PUSHER_APP_ID", "PUSHER_SECRET"] {
        assert!(stderr.contains(missing), "{missing} not named in: {stderr}");
    }
}

#[test]
fn no_authentication_on_a_public_address_stops_start_up_naming_both_ways_out() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = refused_start_up(dir.path(), "0.0.0.0:0", &[]);
    for named in [
        "REPLISYNC_JWT_SECRET",
        "REPLISYNC_JWT_JWKS_URL",
        "REPLISYNC_ALLOW_ANONYMOUS",
    ] {
        assert!(stderr.contains(named), "{named} not named in: {stderr}");
    }
    assert!(
        !dir.path().join("replisync-data").exists(),
        "it opened a database before refusing"
    );
}

#[test]
fn help_lists_the_secret_variables_without_their_values() {
    let help = Command::new(env!("CARGO_BIN_EXE_replisync"))
        .arg("--help")
        .env_clear()
        .env("REPLISYNC_JWT_SECRET", "top-secret-value")
        .env("PUSHER_SECRET", "pusher-secret-value")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for variable in ["REPLISYNC_JWT_SECRET", "PUSHER_SECRET", "PUSHER_APP_ID"] {
        assert!(help.contains(variable), "--help does not list {variable}");
    }
    assert!(!help.contains("top-secret-value") && !help.contains("pusher-secret-value"));
}

#[test]
fn a_broken_mutators_module_stops_start_up_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.js"),
        "export const mutators = {\n  async ok(tx) {},\n  async bad(tx) { let = ; },\n};\n",
    )
    .unwrap();
    let stderr = refused_start_up(
        dir.path(),
        "127.0.0.1:0",
        &[("REPLISYNC_MUTATORS", "broken.js")],
    );
    assert!(stderr.contains("broken.js:3"), "file and line in: {stderr}");
    assert!(stderr.contains("SyntaxError"), "{stderr}");
}

#[test]
fn a_mutators_module_that_imports_stops_start_up_saying_to_bundle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mutators.js"),
        "import { checkTitle } from './rules.js';\nexport const mutators = { async m(tx) {} };\n",
    )
    .unwrap();
    let stderr = refused_start_up(
        dir.path(),
        "127.0.0.1:0",
        &[("REPLISYNC_MUTATORS", "mutators.js")],
    );
    assert!(
        stderr.contains("mutators.js imports \"./rules.js\""),
        "file and import in: {stderr}"
    );
    for words in [
        "a single self-contained ES module",
        "npx esbuild src/mutators.ts --bundle --format=esm --outfile=mutators.js",
        "docs/javascript-mutators.md",
    ] {
        assert!(stderr.contains(words), "says {words:?}: {stderr}");
    }
}

#[test]
fn a_bad_rules_file_stops_start_up_naming_the_entry_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let rules = r#"{"spaces": [{"space": "team-*", "read": ["user/{user}*"]}]}"#;
    std::fs::write(dir.path().join("rules.json"), rules).unwrap();
    let stderr = refused_start_up(
        dir.path(),
        "127.0.0.1:0",
        &[("REPLISYNC_RULES", "rules.json")],
    );
    for words in [
        "REPLISYNC_RULES",
        "rules.json",
        "spaces[0]: read",
        "separator",
    ] {
        assert!(stderr.contains(words), "says {words:?}: {stderr}");
    }
    let stderr = refused_start_up(
        dir.path(),
        "127.0.0.1:0",
        &[("REPLISYNC_RULES", "missing.json")],
    );
    assert!(stderr.contains("cannot read missing.json"), "{stderr}");
    assert!(
        !dir.path().join("replisync-data").exists(),
        "it opened a database before refusing"
    );
}

/// The authorization webhook is sent callers' tokens: over http, only to this machine.
#[test]
fn a_webhook_url_in_the_clear_to_another_host_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = refused_start_up(
        dir.path(),
        "127.0.0.1:0",
        &[
            (
                "REPLISYNC_JWT_SECRET",
                "a-secret-long-enough-for-hs256-tokens",
            ),
            ("REPLISYNC_AUTHZ_URL", "http://authz.example.com/check"),
        ],
    );
    assert!(stderr.contains("REPLISYNC_AUTHZ_URL"), "{stderr}");
    assert!(stderr.contains("https"), "{stderr}");
    assert!(
        !dir.path().join("replisync-data").exists(),
        "it opened a database before refusing"
    );
}

/// Serves `body` with `status` at `/jwks.json` on `listener`, in the background.
pub(crate) fn serve_jwks(listener: tokio::net::TcpListener, status: u16, body: &'static str) {
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || async move {
            (axum::http::StatusCode::from_u16(status).unwrap(), body)
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
}

/// An Ed25519 public key, as an identity provider publishes it.
pub(crate) const JWKS: &str = r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "key-1", "alg": "EdDSA",
    "use": "sig", "x": "9M4Die81kgeJIb8OIpnT00l979ONNSwhfppI-YV3Wlc"}]}"#;

/// A JWKS URL that cannot work stops start-up, naming the variable or the URL: one that does
/// not parse or is in the clear to another host, and one whose answer is not a JWKS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_that_cannot_work_stops_start_up() {
    let mut cases = vec![
        (
            "not a URL",
            "jwks.example.com/keys".to_owned(),
            "REPLISYNC_JWT_JWKS_URL",
        ),
        (
            "http to another host",
            "http://idp.example.com/.well-known/jwks.json".to_owned(),
            "REPLISYNC_JWT_JWKS_URL",
        ),
    ];
    for (case, status, body) in [
        ("404", 404, "not found"),
        ("not JSON", 200, "<html>sign in</html>"),
        (
            "no usable key",
            200,
            r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#,
        ),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        serve_jwks(listener, status, body);
        cases.push((case, url.clone(), "REPLISYNC_JWT_JWKS_URL"));
    }
    for (case, url, variable) in cases {
        let dir = tempfile::tempdir().unwrap();
        let env_url = url.clone();
        let stderr = tokio::task::spawn_blocking(move || {
            refused_start_up(
                dir.path(),
                "127.0.0.1:0",
                &[("REPLISYNC_JWT_JWKS_URL", &env_url)],
            )
        })
        .await
        .unwrap();
        assert!(stderr.contains(variable), "{case}: {stderr}");
        if url.starts_with("http://127.0.0.1") {
            assert!(
                stderr.contains(&url),
                "{case}: the URL is not named: {stderr}"
            );
        }
    }
}

/// An identity provider that is down at start-up: replisync starts, `/readyz` answers 503
/// saying the JWKS is not fetched yet, then 200 once the provider is up and the keys fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_a_jwks_that_is_down_at_start() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/jwks.json");
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), &[("REPLISYNC_JWT_JWKS_URL", url.as_str())]);
    let client = reqwest::Client::new();
    let readyz = || {
        let (client, url) = (client.clone(), format!("{}/readyz", server.base));
        async move {
            let response = client.get(url).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "/readyz before the JWKS is fetched: {body}");
    assert!(body.contains("JWKS") && body.contains(&url), "{body}");
    // A background fetch has failed again (it retries every 0.5 s and more): still 503.
    let retried = "the JWKS is not fetched yet: tokens get 503";
    let retried = server.wait_for_log(retried, Duration::from_secs(10)).await;
    assert!(
        retried.is_some(),
        "no failed retry logged: {:?}",
        server.log_lines()
    );
    assert_eq!(readyz().await.0, 503, "still down after a failed retry");

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    serve_jwks(listener, 200, JWKS);
    let mut ready = (0, String::new());
    for _ in 0..200 {
        ready = readyz().await;
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready.0, 200, "/readyz once the JWKS is up: {}", ready.1);
    let log = server.log.lock().unwrap().clone();
    let about_jwks: Vec<&String> = log.iter().filter(|l| l.contains("JWKS")).collect();
    assert!(about_jwks.len() >= 2, "{log:?}");
    for line in about_jwks {
        assert!(
            line.contains(&url),
            "a log line about the JWKS without its URL: {line}"
        );
    }
    server.stop();
}
