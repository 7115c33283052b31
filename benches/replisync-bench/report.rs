//! The results: one typed struct per workload (each figure a field, serialized as the JSON
//! file), medians and percentiles, and the tables printed at the end.

use serde::Serialize;

use crate::load::PushFigures;

/// Everything one run measured; written as is to the JSON file.
#[derive(Serialize, Default)]
pub(crate) struct Report {
    pub idle_rss_mb: f64,
    pub idle_rss_after_mb: f64,
    pub pushes: Vec<PushRow>,
    pub poke_storm: Option<StormFigures>,
    pub first_pulls: Vec<FirstPullFigures>,
    /// Pokes through sockudo (Pusher's API).
    pub poke_latency: Option<PokeFigures>,
    /// Pokes through socket.io (PUBLISHes to its Redis adapter).
    pub socketio_pokes: Option<SocketIoPokeFigures>,
    /// With --jwt-secret: what verifying one HS256 token costs, in process.
    pub token_check_us: Option<f64>,
    /// The built-in `increment` beside the same mutator in JavaScript.
    pub js_mutators: Vec<JsComparison>,
    /// A space of many deletions pulled before and after tombstone compaction (workload gc).
    pub compaction: Option<CompactionFigures>,
    /// Pushes with garbage collection off, and on with a backlog to collect (workload gc).
    pub pushes_beside_gc: Vec<GcPushComparison>,
    /// The soak (`--only soak`).
    pub soak: Option<crate::soak::SoakFigures>,
    /// Visibility rules against none (`--only rules`).
    pub rules: Option<crate::rules_report::RulesFigures>,
    /// Server API mutation calls beside the same pushes (`--only server-api`).
    pub server_api: Vec<ServerApiComparison>,
    /// `replisync export` and `replisync import` of big spaces (`--only transfer`).
    pub transfers: Vec<TransferRow>,
}

/// One-mutation server API calls (`POST /api/spaces/{space}/mutations`, a fresh idempotency
/// key each) and one-mutation pushes by as many concurrent callers over as many spaces, each
/// path on a server and database of its own, rounds alternating.
#[derive(Serialize)]
pub(crate) struct ServerApiComparison {
    pub workload: String,
    /// Each push and each call applies one `increment`: mutations/s is calls/s.
    pub push: PushRow,
    pub api: PushRow,
    /// Median of the rounds' ratios of the calls' throughput to the pushes'.
    pub ratio: f64,
    pub ratio_rounds: Vec<f64>,
}

impl ServerApiComparison {
    pub(crate) fn from_rounds(
        workload: String,
        pushes: &[PushRound],
        calls: &[PushRound],
    ) -> ServerApiComparison {
        let mut ratios: Vec<f64> = pushes
            .iter()
            .zip(calls)
            .map(|(p, c)| c.served.mutations_per_second() / p.served.mutations_per_second())
            .collect();
        ServerApiComparison {
            push: PushRow::from_rounds(format!("{workload}, pushes"), pushes),
            api: PushRow::from_rounds(format!("{workload}, server API calls"), calls),
            ratio: median(&mut ratios),
            ratio_rounds: ratios,
            workload,
        }
    }
}

/// One `replisync export` or `replisync import` of a space of `entries` entries, over its
/// rounds: the process from start to exit (connecting and opening the store included).
#[derive(Serialize)]
pub(crate) struct TransferRow {
    /// "Postgres" or "SQLite".
    pub store: &'static str,
    /// "export" or "import".
    pub command: &'static str,
    pub entries: usize,
    /// The export file's size (the same file is imported).
    pub file_mb: f64,
    pub rounds: usize,
    /// Median wall time, and each round's in ascending order.
    pub wall_s: f64,
    pub wall_s_rounds: Vec<f64>,
    /// `entries` over the median wall time.
    pub entries_per_second: f64,
    /// The replisync process's peak resident size (GNU time's maximum resident set size),
    /// median and each round's; absent without /usr/bin/time.
    pub peak_rss_mb: Option<f64>,
    pub peak_rss_mb_rounds: Vec<f64>,
    /// The replisync process's CPU time (user + system), median; absent without /usr/bin/time.
    pub cpu_s: Option<f64>,
}

/// One space loaded with `entries` keys, `deleted` of them then deleted, pulled before and
/// after one `replisync gc` pass removed its tombstones.
#[derive(Serialize)]
pub(crate) struct CompactionFigures {
    pub entries: usize,
    pub deleted: usize,
    /// Repetitions of each pull (medians are reported).
    pub pulls: usize,
    pub before: SpacePulls,
    pub after: SpacePulls,
    /// The `replisync gc` process, start to exit (connecting included).
    pub compaction_ms: f64,
    /// What it printed.
    pub compaction_output: String,
}

/// The space's rows and its pulls at one moment; latencies are medians.
#[derive(Serialize)]
pub(crate) struct SpacePulls {
    /// Rows of the space in replisync_entries, and how many of them are tombstones.
    pub entry_rows: i64,
    pub tombstone_rows: i64,
    /// Null cookie.
    pub first_pull_ms: f64,
    pub first_pull_mb: f64,
    pub first_pull_ops: usize,
    /// From the cookie before one small push made after the deletions.
    pub recent_cookie_pull_ms: f64,
    pub recent_cookie_pull_ops: usize,
    /// From the cookie before the deletions.
    pub old_cookie_pull_ms: f64,
    pub old_cookie_pull_mb: f64,
    pub old_cookie_pull_ops: usize,
    /// Whether that pull was a reset (`clear` then the whole space).
    pub old_cookie_pull_reset: bool,
}

/// One push workload on a server with garbage collection off, and on one with it running every
/// second over a backlog seeded before each round; rounds alternating.
#[derive(Serialize)]
pub(crate) struct GcPushComparison {
    pub workload: String,
    pub gc_off: PushRow,
    pub gc_on: PushRow,
    /// Median of the rounds' ratios of GC on's throughput to GC off's.
    pub ratio: f64,
    pub ratio_rounds: Vec<f64>,
    /// Seeded before every round (both modes): idle client groups (a client each), old tombstones.
    pub backlog_client_groups: i64,
    pub backlog_tombstones: i64,
    /// Per GC-on round, from its server's /metrics when the pushes were done (a pass counts
    /// client groups when it has collected them all, then tombstones when it has compacted all).
    pub client_groups_removed_rounds: Vec<u64>,
    pub tombstones_removed_rounds: Vec<u64>,
    /// Per GC-on round: the backlog left in the database when the pushes were done.
    pub client_groups_left_rounds: Vec<i64>,
    pub tombstones_left_rounds: Vec<i64>,
    /// Per GC-on round: seconds from the pushes' start (about when the first pass started) to
    /// the end of the first pass that removed anything, as the server logged it; None when it
    /// had not ended by the pushes' end.
    pub first_pass_ended_s_rounds: Vec<Option<f64>>,
    /// Per GC-on round: how long its pushes ran, in seconds.
    pub gc_on_run_s_rounds: Vec<f64>,
}

/// One push workload run through the built-in `increment` and through `jsIncrement` (the same
/// work in JavaScript) on the same server.
#[derive(Serialize)]
pub(crate) struct JsComparison {
    pub workload: String,
    pub builtin: PushRow,
    pub javascript: PushRow,
    /// Median of the rounds' ratios of JavaScript's throughput to the built-in's.
    pub ratio: f64,
}

/// One push workload, over all its rounds.
#[derive(Serialize)]
pub(crate) struct PushRow {
    pub workload: String,
    pub rounds: usize,
    /// Median over the rounds.
    pub mutations_per_second: f64,
    /// Each round's, in ascending order.
    pub mutations_per_second_rounds: Vec<f64>,
    /// Over every push of every round.
    pub push_p50_ms: f64,
    pub push_p99_ms: f64,
    pub pushes: usize,
    /// Absent for workloads without a floor.
    #[serde(flatten)]
    pub floor: Option<FloorComparison>,
    /// Absent for workloads without a floor.
    #[serde(flatten)]
    pub commit_floor: Option<CommitFloorComparison>,
}

/// A push workload against its floor (see floor.rs).
#[derive(Serialize)]
pub(crate) struct FloorComparison {
    /// Median over the rounds.
    pub floor_mutations_per_second: f64,
    /// Over every floor push of every round.
    pub floor_p50_ms: f64,
    /// Median of the rounds' ratios of replisync's throughput to the floor's.
    pub ratio_to_floor: f64,
    /// Each round's, in ascending order.
    pub ratio_to_floor_rounds: Vec<f64>,
}

/// A push workload against its one-commit floor (see commit_floor.rs): the same figures as
/// [`FloorComparison`]'s.
#[derive(Serialize)]
pub(crate) struct CommitFloorComparison {
    pub commit_floor_mutations_per_second: f64,
    pub commit_floor_p50_ms: f64,
    pub ratio_to_commit_floor: f64,
    pub ratio_to_commit_floor_rounds: Vec<f64>,
}

/// One round of a push workload: replisync's figures, and each floor's when it has them.
pub(crate) struct PushRound {
    pub served: PushFigures,
    pub floor: Option<PushFigures>,
    pub commit_floor: Option<PushFigures>,
}

impl PushRound {
    /// A round with no floor.
    pub(crate) fn alone(served: PushFigures) -> PushRound {
        PushRound {
            served,
            floor: None,
            commit_floor: None,
        }
    }
}

/// The poke storm: many watchers pulling the same new version at once.
#[derive(Serialize)]
pub(crate) struct StormFigures {
    pub watchers: usize,
    pub all_answered_ms: f64,
    pub pulls_per_second: f64,
    pub pull_latency_p50_ms: f64,
    pub pull_latency_p99_ms: f64,
    pub snapshot_reads: u64,
    pub database_transactions_per_pull: f64,
}

/// One first pull of a big space.
#[derive(Serialize)]
pub(crate) struct FirstPullFigures {
    pub entries: usize,
    pub latency_ms: f64,
    pub response_mb: f64,
    pub server_rss_before_mb: f64,
    /// None where the peak cannot be reset (not Linux).
    pub server_peak_rss_mb: Option<f64>,
}

/// Latency from a push's commit to sockudo accepting its poke, and the Pusher calls of loads.
#[derive(Serialize)]
pub(crate) struct PokeFigures {
    pub pokes: usize,
    pub commit_to_accepted_p50_ms: f64,
    pub commit_to_accepted_p99_ms: f64,
    /// Pusher calls made during the poke storm (one push, then 1000 pulls at once).
    pub storm_calls: u64,
    /// One-mutation pushes by 64 clients to one space, with pokes on, medians of the rounds:
    /// how many, the Pusher calls they cost (in all, and per second of the load), and their
    /// throughput.
    pub push_c64_pushes: usize,
    pub push_c64_calls: u64,
    pub push_c64_calls_per_s: f64,
    pub push_c64_mutations_per_s: f64,
    pub push_c64_rounds: Vec<PokeLoadRound>,
}

/// Latency from a push's commit to Redis accepting its socket.io poke (PUBLISH), and the
/// PUBLISHes of loads.
#[derive(Serialize)]
pub(crate) struct SocketIoPokeFigures {
    /// The adapter key the pokes went under (unique to the run).
    pub redis_key: String,
    pub pokes: usize,
    pub commit_to_accepted_p50_ms: f64,
    pub commit_to_accepted_p99_ms: f64,
    /// One-mutation pushes by 64 clients to one space, with pokes on, medians of the rounds:
    /// how many; the PUBLISHes Redis accepted (`replisync_socketio_spaces_poked_total`), the
    /// messages the benchmark's subscriber received, and the pipelines that carried them
    /// (`replisync_socketio_calls_ok_total`); PUBLISHes per second of the load; throughput.
    pub push_c64_pushes: usize,
    pub push_c64_publishes: u64,
    pub push_c64_publishes_received: u64,
    pub push_c64_pipelines: u64,
    pub push_c64_publishes_per_s: f64,
    pub push_c64_mutations_per_s: f64,
    pub push_c64_rounds: Vec<PokeLoadRound>,
}

/// One round of 64 clients pushing to one space with pokes on, and what it cost the service.
#[derive(Serialize)]
pub(crate) struct PokeLoadRound {
    pub pushes: usize,
    /// How long the pushes ran, in seconds.
    pub load_s: f64,
    pub mutations_per_s: f64,
    /// Calls the service accepted: Pusher requests, or socket.io pipelines.
    pub calls: u64,
    /// socket.io only: PUBLISHes Redis accepted, and messages the subscriber received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publishes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publishes_received: Option<u64>,
}

impl PokeFigures {
    pub(crate) fn new(
        latencies: &mut [f64],
        storm_calls: u64,
        rounds: Vec<PokeLoadRound>,
    ) -> PokeFigures {
        PokeFigures {
            pokes: latencies.len(),
            commit_to_accepted_p50_ms: percentile(latencies, 50.0),
            commit_to_accepted_p99_ms: percentile(latencies, 99.0),
            storm_calls,
            push_c64_pushes: median_of(&rounds, |r| r.pushes),
            push_c64_calls: median_of(&rounds, |r| r.calls),
            push_c64_calls_per_s: median_rate(&rounds, |r| r.calls),
            push_c64_mutations_per_s: median(&mut rates(&rounds, |r| r.mutations_per_s)),
            push_c64_rounds: rounds,
        }
    }
}

impl SocketIoPokeFigures {
    pub(crate) fn new(
        redis_key: &str,
        latencies: &mut [f64],
        rounds: Vec<PokeLoadRound>,
    ) -> SocketIoPokeFigures {
        let publishes = |r: &PokeLoadRound| r.publishes.unwrap_or(0);
        SocketIoPokeFigures {
            redis_key: redis_key.to_owned(),
            pokes: latencies.len(),
            commit_to_accepted_p50_ms: percentile(latencies, 50.0),
            commit_to_accepted_p99_ms: percentile(latencies, 99.0),
            push_c64_pushes: median_of(&rounds, |r| r.pushes),
            push_c64_publishes: median_of(&rounds, publishes),
            push_c64_publishes_received: median_of(&rounds, |r| r.publishes_received.unwrap_or(0)),
            push_c64_pipelines: median_of(&rounds, |r| r.calls),
            push_c64_publishes_per_s: median_rate(&rounds, publishes),
            push_c64_mutations_per_s: median(&mut rates(&rounds, |r| r.mutations_per_s)),
            push_c64_rounds: rounds,
        }
    }
}

/// The median (nearest rank) of `count` over the rounds; 0 without rounds.
fn median_of<T: Ord + Copy + Default>(
    rounds: &[PokeLoadRound],
    count: impl Fn(&PokeLoadRound) -> T,
) -> T {
    let mut counts: Vec<T> = rounds.iter().map(count).collect();
    counts.sort_unstable();
    counts.get(counts.len() / 2).copied().unwrap_or_default()
}

fn rates(rounds: &[PokeLoadRound], rate: impl Fn(&PokeLoadRound) -> f64) -> Vec<f64> {
    rounds.iter().map(rate).collect()
}

/// The median over the rounds of `count` per second of the round's load.
fn median_rate(rounds: &[PokeLoadRound], count: impl Fn(&PokeLoadRound) -> u64) -> f64 {
    median(&mut rates(rounds, |r| count(r) as f64 / r.load_s))
}

/// The `pct` percentile (nearest rank) of `values`, which it sorts; NaN when empty.
pub(crate) fn percentile(values: &mut [f64], pct: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((pct / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank]
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    percentile(values, 50.0)
}

fn all_latencies<'a>(figures: impl Iterator<Item = &'a PushFigures>) -> Vec<f64> {
    figures
        .flat_map(|f| f.latencies_ms.iter().copied())
        .collect()
}

impl PushRow {
    /// One table row from several rounds: median throughputs, the median of the rounds'
    /// ratios, and latency percentiles over every push of every round.
    pub(crate) fn from_rounds(workload: String, rounds: &[PushRound]) -> PushRow {
        let mut throughputs: Vec<f64> = rounds
            .iter()
            .map(|r| r.served.mutations_per_second())
            .collect();
        let mut latencies = all_latencies(rounds.iter().map(|r| &r.served));
        let floor = against_floor(rounds, |r| r.floor.as_ref());
        let commit_floor = against_floor(rounds, |r| r.commit_floor.as_ref());
        PushRow {
            workload,
            rounds: rounds.len(),
            mutations_per_second: median(&mut throughputs),
            mutations_per_second_rounds: throughputs,
            push_p50_ms: percentile(&mut latencies, 50.0),
            push_p99_ms: percentile(&mut latencies, 99.0),
            pushes: latencies.len(),
            floor: floor.map(|f| FloorComparison {
                floor_mutations_per_second: f.mutations_per_second,
                floor_p50_ms: f.p50_ms,
                ratio_to_floor: f.ratio,
                ratio_to_floor_rounds: f.ratio_rounds,
            }),
            commit_floor: commit_floor.map(|f| CommitFloorComparison {
                commit_floor_mutations_per_second: f.mutations_per_second,
                commit_floor_p50_ms: f.p50_ms,
                ratio_to_commit_floor: f.ratio,
                ratio_to_commit_floor_rounds: f.ratio_rounds,
            }),
        }
    }
}

/// A push workload against one of its floors, over the rounds that ran it.
struct AgainstFloor {
    /// The floor's median throughput, and its p50 over every push of every round.
    mutations_per_second: f64,
    p50_ms: f64,
    /// The median of the rounds' ratios of replisync's throughput to the floor's, and each
    /// round's in ascending order.
    ratio: f64,
    ratio_rounds: Vec<f64>,
}

/// The rounds compared with the floor `floor_of` picks; None when no round ran it.
fn against_floor(
    rounds: &[PushRound],
    floor_of: impl Fn(&PushRound) -> Option<&PushFigures>,
) -> Option<AgainstFloor> {
    let pairs: Vec<(&PushFigures, &PushFigures)> = rounds
        .iter()
        .filter_map(|r| floor_of(r).map(|floor| (&r.served, floor)))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let mut throughputs: Vec<f64> = pairs
        .iter()
        .map(|(_, floor)| floor.mutations_per_second())
        .collect();
    let mut ratios: Vec<f64> = pairs
        .iter()
        .map(|(served, floor)| served.mutations_per_second() / floor.mutations_per_second())
        .collect();
    let mut latencies = all_latencies(pairs.iter().map(|(_, floor)| *floor));
    Some(AgainstFloor {
        mutations_per_second: median(&mut throughputs),
        p50_ms: percentile(&mut latencies, 50.0),
        ratio: median(&mut ratios),
        ratio_rounds: ratios,
    })
}

/// `x` with `places` decimals, or "-" when there is no figure (NaN, infinite).
pub(crate) fn decimals(x: f64, places: usize) -> String {
    if x.is_finite() {
        format!("{x:.places$}")
    } else {
        "-".to_owned()
    }
}

pub(crate) fn one_decimal(x: f64) -> String {
    decimals(x, 1)
}

impl Report {
    /// Adds a push workload's row, and shows it on stderr straight away.
    pub(crate) fn add_push_row(&mut self, workload: String, rounds: &[PushRound]) {
        let row = PushRow::from_rounds(workload, rounds);
        eprintln!(
            "  {}",
            serde_json::to_string(&row).unwrap_or_else(|e| e.to_string())
        );
        self.pushes.push(row);
    }

    /// Adds a comparison of the built-in and the JavaScript rounds (alternated, same count).
    pub(crate) fn add_js_row(
        &mut self,
        workload: String,
        builtin: &[PushRound],
        javascript: &[PushRound],
    ) {
        let mut ratios: Vec<f64> = builtin
            .iter()
            .zip(javascript)
            .map(|(b, j)| j.served.mutations_per_second() / b.served.mutations_per_second())
            .collect();
        let row = JsComparison {
            builtin: PushRow::from_rounds(format!("{workload}, built-in increment"), builtin),
            javascript: PushRow::from_rounds(
                format!("{workload}, JavaScript increment"),
                javascript,
            ),
            ratio: median(&mut ratios),
            workload,
        };
        eprintln!(
            "  {}",
            serde_json::to_string(&row).unwrap_or_else(|e| e.to_string())
        );
        self.js_mutators.push(row);
    }

    fn print_js(&self) {
        if self.js_mutators.is_empty() {
            return;
        }
        println!(
            "\n| workload | built-in mutations/s | JavaScript mutations/s | ratio | built-in p50 ms | JavaScript p50 ms |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for row in &self.js_mutators {
            println!(
                "| {} | {} | {} | {:.2} | {} | {} |",
                row.workload,
                one_decimal(row.builtin.mutations_per_second),
                one_decimal(row.javascript.mutations_per_second),
                row.ratio,
                one_decimal(row.builtin.push_p50_ms),
                one_decimal(row.javascript.push_p50_ms),
            );
        }
    }

    pub(crate) fn print(&self) {
        if let Some(soak) = &self.soak {
            soak.print();
        }
        self.print_pushes();
        self.print_js();
        self.print_server_api();
        self.print_transfers();
        if let Some(storm) = &self.poke_storm {
            storm.print();
        }
        self.print_first_pulls();
        if let Some(rules) = &self.rules {
            rules.print();
        }
        if let Some(compaction) = &self.compaction {
            compaction.print();
        }
        self.print_pushes_beside_gc();
        if let Some(poke) = &self.poke_latency {
            poke.print();
        }
        if let Some(pokes) = &self.socketio_pokes {
            pokes.print();
        }
        if let Some(micros) = self.token_check_us {
            println!("\ntoken check (HS256, claims, grants): {micros:.2} µs per request");
        }
        println!(
            "\nserver resident memory: {:.1} MB idle at start, {:.1} MB at the end",
            self.idle_rss_mb, self.idle_rss_after_mb
        );
    }

    fn print_pushes(&self) {
        if self.pushes.is_empty() {
            return;
        }
        println!(
            "\n| workload | mutations/s | push p50 ms | push p99 ms | floor mutations/s | ratio to floor | one-commit floor mutations/s | ratio to one-commit floor |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for row in &self.pushes {
            let (floor, commit) = (row.floor.as_ref(), row.commit_floor.as_ref());
            let or_dash = |figure: Option<String>| figure.unwrap_or_else(|| "-".to_owned());
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                row.workload,
                one_decimal(row.mutations_per_second),
                one_decimal(row.push_p50_ms),
                one_decimal(row.push_p99_ms),
                or_dash(floor.map(|f| one_decimal(f.floor_mutations_per_second))),
                or_dash(floor.map(|f| decimals(f.ratio_to_floor, 2))),
                or_dash(commit.map(|f| one_decimal(f.commit_floor_mutations_per_second))),
                or_dash(commit.map(|f| decimals(f.ratio_to_commit_floor, 2))),
            );
        }
    }

    /// Adds a GC off / GC on comparison (rounds alternated, same count), shown on stderr too.
    pub(crate) fn add_gc_push_row(&mut self, row: GcPushComparison) {
        eprintln!(
            "  {}",
            serde_json::to_string(&row).unwrap_or_else(|e| e.to_string())
        );
        self.pushes_beside_gc.push(row);
    }

    fn print_pushes_beside_gc(&self) {
        let Some(first) = self.pushes_beside_gc.first() else {
            return;
        };
        println!(
            "\npushes beside garbage collection (every 1 s, over {} idle client groups and {} old tombstones seeded before each round):",
            first.backlog_client_groups, first.backlog_tombstones
        );
        println!(
            "\n| workload | GC off mutations/s | GC on mutations/s | ratio | GC off p50 ms | GC on p50 ms | GC on p99 ms | groups removed during run (/metrics; database) | tombstones removed during run (/metrics; database) | first pass ended s / run s |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in &self.pushes_beside_gc {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {}; {} | {}; {} | {} |",
                row.workload,
                one_decimal(row.gc_off.mutations_per_second),
                one_decimal(row.gc_on.mutations_per_second),
                decimals(row.ratio, 2),
                one_decimal(row.gc_off.push_p50_ms),
                one_decimal(row.gc_on.push_p50_ms),
                one_decimal(row.gc_on.push_p99_ms),
                spread(&row.client_groups_removed_rounds),
                spread(&removed(
                    row.backlog_client_groups,
                    &row.client_groups_left_rounds
                )),
                spread(&row.tombstones_removed_rounds),
                spread(&removed(
                    row.backlog_tombstones,
                    &row.tombstones_left_rounds
                )),
                pass_timing(&row.first_pass_ended_s_rounds, &row.gc_on_run_s_rounds),
            );
        }
    }

    /// Adds a server API comparison, and shows it on stderr straight away.
    pub(crate) fn add_server_api_row(&mut self, row: ServerApiComparison) {
        eprintln!(
            "  {}",
            serde_json::to_string(&row).unwrap_or_else(|e| e.to_string())
        );
        self.server_api.push(row);
    }

    fn print_server_api(&self) {
        if self.server_api.is_empty() {
            return;
        }
        println!(
            "\n| one-mutation increments | push calls/s | push p50 ms | push p99 ms | server API calls/s | server API p50 ms | server API p99 ms | ratio API/push |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for row in &self.server_api {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                row.workload,
                one_decimal(row.push.mutations_per_second),
                one_decimal(row.push.push_p50_ms),
                one_decimal(row.push.push_p99_ms),
                one_decimal(row.api.mutations_per_second),
                one_decimal(row.api.push_p50_ms),
                one_decimal(row.api.push_p99_ms),
                decimals(row.ratio, 2),
            );
        }
    }

    /// Adds an export or import row, and shows it on stderr straight away.
    pub(crate) fn add_transfer_row(&mut self, row: TransferRow) {
        eprintln!(
            "  {}",
            serde_json::to_string(&row).unwrap_or_else(|e| e.to_string())
        );
        self.transfers.push(row);
    }

    fn print_transfers(&self) {
        if self.transfers.is_empty() {
            return;
        }
        println!(
            "\n| transfer | entries | file MB | wall s | entries/s | replisync peak RSS MB | replisync CPU s |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for row in &self.transfers {
            println!(
                "| {}, replisync {} | {} | {} | {} | {} | {} | {} |",
                row.store,
                row.command,
                row.entries,
                one_decimal(row.file_mb),
                decimals(row.wall_s, 2),
                decimals(row.entries_per_second, 0),
                row.peak_rss_mb.map_or("-".to_owned(), one_decimal),
                row.cpu_s.map_or("-".to_owned(), |s| decimals(s, 2)),
            );
        }
    }

    fn print_first_pulls(&self) {
        if self.first_pulls.is_empty() {
            return;
        }
        println!(
            "\n| first pull | latency ms | response MB | server RSS before MB | server peak RSS MB |"
        );
        println!("|---|---:|---:|---:|---:|");
        for pull in &self.first_pulls {
            println!(
                "| {} entries | {} | {} | {} | {} |",
                pull.entries,
                one_decimal(pull.latency_ms),
                one_decimal(pull.response_mb),
                one_decimal(pull.server_rss_before_mb),
                pull.server_peak_rss_mb.map_or("-".to_owned(), one_decimal),
            );
        }
    }
}

/// Each round's "pass end / run length" in seconds ("-" for a pass not ended), comma-separated.
fn pass_timing(ended: &[Option<f64>], runs: &[f64]) -> String {
    ended
        .iter()
        .zip(runs)
        .map(|(ended, run)| {
            let ended = ended.map_or("-".to_owned(), one_decimal);
            format!("{ended}/{}", one_decimal(*run))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What each round's `left` took from `seeded`.
fn removed(seeded: i64, left: &[i64]) -> Vec<u64> {
    left.iter()
        .map(|left| u64::try_from(seeded - left).unwrap_or(0))
        .collect()
}

/// "a" when every round gave a, else "min-max".
fn spread(values: &[u64]) -> String {
    match (values.iter().min(), values.iter().max()) {
        (Some(min), Some(max)) if min == max => min.to_string(),
        (Some(min), Some(max)) => format!("{min}-{max}"),
        _ => "-".to_owned(),
    }
}

impl GcPushComparison {
    /// From alternated rounds with GC off and on, and what each GC-on round removed (groups,
    /// tombstones; from /metrics) and left (groups, tombstones; in the database).
    pub(crate) fn from_rounds(
        workload: String,
        off: &[PushRound],
        on: &[PushRound],
        backlog: (i64, i64),
        removed: &[(u64, u64)],
        left: &[(i64, i64)],
    ) -> GcPushComparison {
        let mut ratios: Vec<f64> = off
            .iter()
            .zip(on)
            .map(|(off, on)| on.served.mutations_per_second() / off.served.mutations_per_second())
            .collect();
        GcPushComparison {
            gc_off: PushRow::from_rounds(format!("{workload}, GC off"), off),
            gc_on: PushRow::from_rounds(format!("{workload}, GC on"), on),
            ratio: median(&mut ratios),
            ratio_rounds: ratios,
            backlog_client_groups: backlog.0,
            backlog_tombstones: backlog.1,
            client_groups_removed_rounds: removed.iter().map(|r| r.0).collect(),
            tombstones_removed_rounds: removed.iter().map(|r| r.1).collect(),
            client_groups_left_rounds: left.iter().map(|l| l.0).collect(),
            tombstones_left_rounds: left.iter().map(|l| l.1).collect(),
            first_pass_ended_s_rounds: Vec::new(),
            gc_on_run_s_rounds: on.iter().map(|r| r.served.elapsed.as_secs_f64()).collect(),
            workload,
        }
    }
}

impl CompactionFigures {
    fn print(&self) {
        println!(
            "\ncompaction: one space of {} keys, {} of them deleted; medians of {} pulls each",
            self.entries, self.deleted, self.pulls
        );
        println!(
            "\n| when | entry rows (tombstones) | first pull ms (MB) | pull from recent cookie ms (ops) | pull from cookie before the deletions ms (MB, ops) |"
        );
        println!("|---|---:|---:|---:|---:|");
        for (when, pulls) in [
            ("before compaction", &self.before),
            ("after compaction", &self.after),
        ] {
            println!(
                "| {when} | {} ({}) | {} ({}) | {} ({}) | {} ({}, {}{}) |",
                pulls.entry_rows,
                pulls.tombstone_rows,
                one_decimal(pulls.first_pull_ms),
                decimals(pulls.first_pull_mb, 2),
                one_decimal(pulls.recent_cookie_pull_ms),
                pulls.recent_cookie_pull_ops,
                one_decimal(pulls.old_cookie_pull_ms),
                decimals(pulls.old_cookie_pull_mb, 2),
                pulls.old_cookie_pull_ops,
                if pulls.old_cookie_pull_reset {
                    ", reset"
                } else {
                    ""
                },
            );
        }
        println!(
            "\ncompaction pass (`replisync gc`, process start to exit): {} ms; it said: {}",
            one_decimal(self.compaction_ms),
            self.compaction_output
        );
    }
}

impl StormFigures {
    fn print(&self) {
        println!(
            "\npoke storm: {} watchers pulled at once; all answered in {} ms ({} pulls/s; pull p50 {} ms, p99 {} ms); \
             {} snapshot reads, {:.3} database transactions per pull",
            self.watchers,
            one_decimal(self.all_answered_ms),
            one_decimal(self.pulls_per_second),
            one_decimal(self.pull_latency_p50_ms),
            one_decimal(self.pull_latency_p99_ms),
            self.snapshot_reads,
            self.database_transactions_per_pull,
        );
    }
}

impl PokeFigures {
    fn print(&self) {
        println!(
            "\npoke latency (commit to accepted by sockudo, {} pokes): p50 {} ms, p99 {} ms",
            self.pokes,
            one_decimal(self.commit_to_accepted_p50_ms),
            one_decimal(self.commit_to_accepted_p99_ms)
        );
        println!(
            "Pusher calls: {} during the poke storm; {} for {} pushes to one space at C=64 \
             ({} calls/s; {} mutations/s with pokes on; medians of {} rounds)",
            self.storm_calls,
            self.push_c64_calls,
            self.push_c64_pushes,
            one_decimal(self.push_c64_calls_per_s),
            one_decimal(self.push_c64_mutations_per_s),
            self.push_c64_rounds.len(),
        );
    }
}

impl SocketIoPokeFigures {
    fn print(&self) {
        println!(
            "\npoke latency (commit to PUBLISH accepted by Redis for socket.io, {} pokes): \
             p50 {} ms, p99 {} ms",
            self.pokes,
            one_decimal(self.commit_to_accepted_p50_ms),
            one_decimal(self.commit_to_accepted_p99_ms)
        );
        println!(
            "socket.io PUBLISHes: {} accepted by Redis, {} received by the benchmark's \
             subscriber, in {} pipelines, for {} pushes to one space at C=64 ({} PUBLISHes/s; \
             {} mutations/s with pokes on; medians of {} rounds)",
            self.push_c64_publishes,
            self.push_c64_publishes_received,
            self.push_c64_pipelines,
            self.push_c64_pushes,
            one_decimal(self.push_c64_publishes_per_s),
            one_decimal(self.push_c64_mutations_per_s),
            self.push_c64_rounds.len(),
        );
    }
}
