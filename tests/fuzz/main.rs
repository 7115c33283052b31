//! Property-based fuzzing of everything that parses client input: push and pull bodies,
//! cookies, space ids, tokens and their claims, `/pusher/auth` forms and SSE query strings.
//!
//! Two layers: the pure parsers called directly (`parsers`), and the real router in-process
//! over a fresh SQLite store (`router`), where no input may get a 5xx and every 4xx is a JSON
//! `{"error", "message"}`. Each target runs a bounded number of cases within `cargo test`;
//! `PROPTEST_CASES=N` runs every target N cases instead, and `FUZZ_STORE=postgres` runs the
//! router targets over a fresh Postgres schema (TEST_DATABASE_URL). Each target prints its
//! case count, duration and the answers it saw (`--nocapture` shows them).

mod generate;
mod parsers;
mod router;

use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseResult, TestRunner};

/// `default` cases, or PROPTEST_CASES when it is set.
fn config(default: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        // Findings become named regression tests, not files beside the sources.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Generating a case walks the strategy's nested types; unoptimized, their frames outgrow a
/// test thread's 2 MiB, so each target runs on a thread with a larger stack.
const FUZZ_STACK_BYTES: usize = 64 * 1024 * 1024;

/// Runs `test` on `default_cases` (or PROPTEST_CASES) inputs from the strategy `strategy`
/// builds; panics with the smallest failing input, and prints the case count and the time taken.
fn fuzz<S: Strategy>(
    target: &str,
    default_cases: u32,
    strategy: impl FnOnce() -> S + Send,
    test: impl Fn(S::Value) -> TestCaseResult + Sync,
) {
    let config = config(default_cases);
    let cases = config.cases;
    let started = Instant::now();
    let result = std::thread::scope(|scope| {
        let runner = std::thread::Builder::new()
            .name(target.to_owned())
            .stack_size(FUZZ_STACK_BYTES)
            .spawn_scoped(scope, || {
                let strategy = strategy();
                TestRunner::new(config)
                    .run(&strategy, &test)
                    .map_err(|failure| failure.to_string())
            })
            .expect("a thread for the target");
        runner
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    let elapsed = started.elapsed();
    if let Err(failure) = result {
        panic!("{target}: {failure}");
    }
    eprintln!("fuzz {target}: {cases} cases in {elapsed:.1?}");
}
