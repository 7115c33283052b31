//! Counters an operator (and the benchmark) reads at `GET /metrics`, in Prometheus text format:
//! requests served and the database reads they cost.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn increment(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Metrics {
    /// Push requests answered 200.
    pub pushes: Counter,
    /// Pushes that committed a change (and poked).
    pub push_commits: Counter,
    /// Pull requests answered with a patch.
    pub pulls: Counter,
    /// Database snapshots read for pulls (coalesced pulls share one).
    pub pull_reads: Counter,
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, counter) in [
            (
                "replisync_pushes_total",
                "Push requests answered 200.",
                &self.pushes,
            ),
            (
                "replisync_push_commits_total",
                "Pushes that committed a change.",
                &self.push_commits,
            ),
            (
                "replisync_pulls_total",
                "Pull requests answered with a patch.",
                &self.pulls,
            ),
            (
                "replisync_pull_reads_total",
                "Database snapshots read for pulls.",
                &self.pull_reads,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.get()
            );
        }
        out
    }
}
