//! Where settings come from: `./.env` under the environment, flags before or after the
//! subcommand, and errors that name the variable a bad value came from.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use crate::harness::{replisync_command, run_until_exit};

/// Starts `replisync ARGS` in `dir` with only `env`, and returns the line it logs with its
/// address (it is stopped then); panics if none comes within 30 s.
fn listening_line(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = replisync_command(dir, args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the replisync binary starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("listening") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    line.expect("replisync logs its address")
}

fn is_json(line: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line).is_ok()
}

#[test]
fn a_dot_env_file_sets_what_the_environment_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let dot_env = "# written by hand\nREPLISYNC_LISTEN=127.0.0.1:0\nREPLISYNC_LOG_FORMAT=json\n";
    std::fs::write(dir.path().join(".env"), dot_env).unwrap();
    let from_file = listening_line(dir.path(), &[], &[]);
    assert!(is_json(&from_file), "the file's log format: {from_file}");
    assert!(
        from_file.contains("127.0.0.1:"),
        "the file's address: {from_file}"
    );
    let overridden = listening_line(dir.path(), &[], &[("REPLISYNC_LOG_FORMAT", "text")]);
    assert!(!is_json(&overridden), "the environment wins: {overridden}");
    assert!(overridden.contains("address=127.0.0.1:"), "{overridden}");
}

#[test]
fn a_dot_env_that_cannot_be_parsed_stops_start_up_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "REPLISYNC_LISTEN=127.0.0.1:0\nnot a setting\n",
    )
    .unwrap();
    let output = run_until_exit(dir.path(), &[], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot read ./.env"), "{stderr}");
    assert!(stderr.contains("not a setting"), "names the line: {stderr}");
}

#[test]
fn flags_work_after_the_subcommand_and_its_help_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["serve", "--listen", "127.0.0.1:0", "--log-format", "json"];
    let line = listening_line(dir.path(), &args, &[]);
    assert!(is_json(&line), "{line}");
    let help = run_until_exit(dir.path(), &["serve", "--help"], &[]);
    assert_eq!(help.status.code(), Some(0));
    let help = String::from_utf8_lossy(&help.stdout);
    for option in ["--listen", "REPLISYNC_LISTEN", "--db-max-connections"] {
        assert!(
            help.contains(option),
            "`serve --help` lacks {option}: {help}"
        );
    }
}

#[test]
fn a_bad_value_names_the_variable_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("REPLISYNC_DB_MAX_CONNECTIONS", "many")];
    let output = run_until_exit(dir.path(), &["serve"], &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("'many'"), "{stderr}");
    assert!(stderr.contains("REPLISYNC_DB_MAX_CONNECTIONS"), "{stderr}");
    assert_eq!(
        stderr.matches("error:").count(),
        1,
        "printed once: {stderr}"
    );
}
