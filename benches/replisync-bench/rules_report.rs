//! The rules workload's figures (`--only rules`): a ruled space against an unruled one, per
//! round and as medians, serialized into the JSON file and printed as tables.

use std::time::Duration;

use serde::Serialize;

use crate::report::{FirstPullFigures, decimals, median, one_decimal, percentile};
use crate::rules_data::Layout;

/// Everything `--only rules` measured.
#[derive(Serialize)]
pub(crate) struct RulesFigures {
    pub users: usize,
    pub teams: usize,
    /// Rounds of each workload, ruled and unruled alternating (which goes first too); the
    /// storm makes `storms_per_round` storms per space in each, each a round of its row.
    pub rounds: usize,
    pub storms_per_round: usize,
    /// The spaces of the storm and the incremental pulls.
    pub small_layout: Layout,
    pub small_entries: usize,
    pub storm: PullComparison,
    pub incremental: PullComparison,
    pub first_pull: FirstPullComparison,
}

/// One pull workload in the ruled space and in the unruled one.
#[derive(Serialize)]
pub(crate) struct PullComparison {
    pub workload: String,
    pub unruled: PullRow,
    pub ruled: PullRow,
    /// The median of the rounds' unruled pulls/s ÷ ruled pulls/s: what the rules cost (aim:
    /// 1.5 at most).
    pub slowdown: f64,
    /// Each round's, in ascending order.
    pub slowdown_rounds: Vec<f64>,
}

/// One space's rounds of a pull workload (of the storm: each storm).
#[derive(Serialize)]
pub(crate) struct PullRow {
    pub space: String,
    /// Pulls answered, over every round.
    pub pulls: usize,
    /// Median over the rounds, and each round's in ascending order.
    pub pulls_per_second: f64,
    pub pulls_per_second_rounds: Vec<f64>,
    /// Median over the rounds: from the first pull sent to the last answered.
    pub elapsed_ms: f64,
    /// Over every pull of every round.
    pub pull_p50_ms: f64,
    pub pull_p99_ms: f64,
    /// Patch operations received per pull, over every round.
    pub ops_per_pull: f64,
    /// Median over the rounds: the server's database reads for pulls
    /// (`replisync_pull_reads_total`).
    pub snapshot_reads: u64,
    /// Incremental pulls: median over the rounds of the writer's pushes meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writer_pushes: Option<u64>,
}

/// One round of a pull workload in one space.
pub(crate) struct PullRound {
    pub elapsed: Duration,
    pub latencies_ms: Vec<f64>,
    pub ops: usize,
    pub snapshot_reads: u64,
    pub writer_pushes: Option<u64>,
}

impl PullRound {
    fn pulls_per_second(&self) -> f64 {
        self.latencies_ms.len() as f64 / self.elapsed.as_secs_f64()
    }
}

impl PullRow {
    fn from_rounds(space: &str, rounds: &[PullRound]) -> PullRow {
        let mut rates: Vec<f64> = rounds.iter().map(PullRound::pulls_per_second).collect();
        let mut elapsed: Vec<f64> = rounds
            .iter()
            .map(|r| r.elapsed.as_secs_f64() * 1000.0)
            .collect();
        let mut latencies: Vec<f64> = rounds
            .iter()
            .flat_map(|r| r.latencies_ms.iter().copied())
            .collect();
        let ops: usize = rounds.iter().map(|r| r.ops).sum();
        let median_count = |count: &dyn Fn(&PullRound) -> Option<u64>| {
            let mut counts: Vec<u64> = rounds.iter().filter_map(count).collect();
            counts.sort_unstable();
            counts.get(counts.len() / 2).copied()
        };
        PullRow {
            space: space.to_owned(),
            pulls: latencies.len(),
            pulls_per_second: median(&mut rates),
            pulls_per_second_rounds: rates,
            elapsed_ms: median(&mut elapsed),
            pull_p50_ms: percentile(&mut latencies, 50.0),
            pull_p99_ms: percentile(&mut latencies, 99.0),
            ops_per_pull: ops as f64 / latencies.len().max(1) as f64,
            snapshot_reads: median_count(&|r| Some(r.snapshot_reads)).unwrap_or(0),
            writer_pushes: median_count(&|r| r.writer_pushes),
        }
    }
}

impl PullComparison {
    /// From rounds alternated between the spaces (same count).
    pub(crate) fn from_rounds(
        workload: &str,
        (unruled_space, unruled): (&str, &[PullRound]),
        (ruled_space, ruled): (&str, &[PullRound]),
    ) -> PullComparison {
        let mut slowdowns: Vec<f64> = unruled
            .iter()
            .zip(ruled)
            .map(|(u, r)| u.pulls_per_second() / r.pulls_per_second())
            .collect();
        let row = PullComparison {
            workload: workload.to_owned(),
            unruled: PullRow::from_rounds(unruled_space, unruled),
            ruled: PullRow::from_rounds(ruled_space, ruled),
            slowdown: median(&mut slowdowns),
            slowdown_rounds: slowdowns,
        };
        eprintln!(
            "  {}",
            serde_json::to_string(&row).unwrap_or_else(|e| e.to_string())
        );
        row
    }
}

/// The first pull of one big space, with rules and without, each from a fresh server.
#[derive(Serialize)]
pub(crate) struct FirstPullComparison {
    /// Entries in each space.
    pub entries: usize,
    pub layout: Layout,
    pub unruled: FirstPullRow,
    pub ruled: FirstPullRow,
    /// The median of the rounds' ruled latency ÷ unruled latency.
    pub latency_ratio: f64,
    pub latency_ratio_rounds: Vec<f64>,
}

/// One space's first pulls: medians over the rounds.
#[derive(Serialize)]
pub(crate) struct FirstPullRow {
    pub space: String,
    /// Entries the pull returned (what its reader may read).
    pub entries_returned: usize,
    pub latency_ms: f64,
    pub latency_ms_rounds: Vec<f64>,
    pub response_mb: f64,
    pub server_rss_before_mb: f64,
    /// None where the peak cannot be reset (not Linux).
    pub server_peak_rss_mb: Option<f64>,
}

impl FirstPullRow {
    fn from_rounds(space: &str, entries_returned: usize, rounds: &[FirstPullFigures]) -> Self {
        let of = |figure: fn(&FirstPullFigures) -> f64| {
            median(&mut rounds.iter().map(figure).collect::<Vec<_>>())
        };
        let peaks: Option<Vec<f64>> = rounds.iter().map(|r| r.server_peak_rss_mb).collect();
        let mut latencies: Vec<f64> = rounds.iter().map(|r| r.latency_ms).collect();
        FirstPullRow {
            space: space.to_owned(),
            entries_returned,
            latency_ms: of(|r| r.latency_ms),
            response_mb: of(|r| r.response_mb),
            server_rss_before_mb: of(|r| r.server_rss_before_mb),
            server_peak_rss_mb: peaks.map(|mut peaks| median(&mut peaks)),
            latency_ms_rounds: {
                latencies.sort_by(f64::total_cmp);
                latencies
            },
        }
    }
}

impl FirstPullComparison {
    /// From rounds alternated between the spaces (same count); `returned` is what each
    /// space's pull returned (unruled, ruled).
    pub(crate) fn from_rounds(
        layout: Layout,
        (unruled_space, unruled): (&str, &[FirstPullFigures]),
        (ruled_space, ruled): (&str, &[FirstPullFigures]),
        returned: (usize, usize),
    ) -> FirstPullComparison {
        let mut ratios: Vec<f64> = unruled
            .iter()
            .zip(ruled)
            .map(|(u, r)| r.latency_ms / u.latency_ms)
            .collect();
        let row = FirstPullComparison {
            entries: layout.entries(),
            layout,
            unruled: FirstPullRow::from_rounds(unruled_space, returned.0, unruled),
            ruled: FirstPullRow::from_rounds(ruled_space, returned.1, ruled),
            latency_ratio: median(&mut ratios),
            latency_ratio_rounds: ratios,
        };
        eprintln!(
            "  {}",
            serde_json::to_string(&row).unwrap_or_else(|e| e.to_string())
        );
        row
    }
}

impl RulesFigures {
    pub(crate) fn print(&self) {
        println!(
            "\nvisibility rules: one replisync with REPLISYNC_RULES (`team-*` ruled: shared, own and \
             team keys; `plain-*` not), {} users in {} teams, a token each; spaces filled alike; \
             medians of {} rounds ({} storms per space in each), ruled and unruled alternating",
            self.users, self.teams, self.rounds, self.storms_per_round
        );
        println!(
            "\n| rules workload | space | pulls/s | pull p50 ms | pull p99 ms | all answered ms | ops per pull | snapshot reads | writer pushes | unruled ÷ ruled pulls/s (aim ≤ 1.5) |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for comparison in [&self.storm, &self.incremental] {
            for (row, slowdown) in [
                (&comparison.unruled, None),
                (&comparison.ruled, Some(comparison.slowdown)),
            ] {
                println!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    comparison.workload,
                    row.space,
                    one_decimal(row.pulls_per_second),
                    one_decimal(row.pull_p50_ms),
                    one_decimal(row.pull_p99_ms),
                    one_decimal(row.elapsed_ms),
                    decimals(row.ops_per_pull, 2),
                    row.snapshot_reads,
                    row.writer_pushes.map_or("-".to_owned(), |n| n.to_string()),
                    slowdown.map_or("-".to_owned(), |s| decimals(s, 2)),
                );
            }
        }
        let first = &self.first_pull;
        println!(
            "\n| first pull of {} entries | entries returned | latency ms | response MB | server RSS before MB | server peak RSS MB |",
            first.entries
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for (label, row) in [
            ("without rules", &first.unruled),
            ("with rules", &first.ruled),
        ] {
            println!(
                "| {label} ({}) | {} | {} | {} | {} | {} |",
                row.space,
                row.entries_returned,
                one_decimal(row.latency_ms),
                decimals(row.response_mb, 2),
                one_decimal(row.server_rss_before_mb),
                row.server_peak_rss_mb.map_or("-".to_owned(), one_decimal),
            );
        }
        println!(
            "\nfirst pull with rules ÷ without, latency: {} (rounds: {})",
            decimals(first.latency_ratio, 2),
            first
                .latency_ratio_rounds
                .iter()
                .map(|r| decimals(*r, 2))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
