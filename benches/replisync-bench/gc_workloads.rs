//! Workload gc: a space of many deletions pulled before and after tombstone compaction, and
//! pushes with garbage collection off beside pushes with it collecting a backlog. Bounded in
//! requests and in time like the others.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::api::{Api, delete, increment, pull_body, push_body, set};
use crate::database::{entry_rows, gc_backlog_left, seed_gc_backlog};
use crate::load::group_name;
use crate::report::{CompactionFigures, GcPushComparison, PushRound, Report, SpacePulls};
use crate::server::{Server, run_gc_once};
use crate::workloads::{Bench, push_workload_on};

/// Keys of the compacted space (divided by --quick's scale); all but one in a hundred deleted.
const COMPACTED_ENTRIES: usize = 100_000;
/// Sets or deletes per push while the compacted space is loaded.
const LOAD_BATCH: usize = 500;
/// Loading and deleting the compacted space may take this long at most.
const LOAD_DEADLINE: Duration = Duration::from_secs(600);
/// Each pull of the compaction figures is repeated this many times (medians).
const PULL_REPEAT: usize = 5;
/// REPLISYNC_TOMBSTONE_TTL of the compaction pass: the deletions just made are past it after
/// the wait below.
const SHORT_TOMBSTONE_TTL: &str = "1s";
const PAST_SHORT_TTL: Duration = Duration::from_millis(2500);

/// The backlog seeded before every round of pushes beside GC: idle client groups (a client
/// each) and old tombstones in spaces of their own.
const BACKLOG_GROUPS: i64 = 50_000;
const BACKLOG_TOMBSTONES: i64 = 100_000;
/// The background interval with GC on; the pushes start one interval after the server, when
/// its first pass starts.
const GC_INTERVAL: &str = "1s";
const GC_INTERVAL_DURATION: Duration = Duration::from_secs(1);

impl Bench {
    /// The space `gc-compacted`: COMPACTED_ENTRIES keys set, 99 in 100 deleted, one more push;
    /// its pulls and rows before and after one `replisync gc` pass removes the tombstones.
    pub(crate) async fn compaction(&self) -> anyhow::Result<CompactionFigures> {
        let space = "gc-compacted";
        let entries = COMPACTED_ENTRIES / self.scale;
        let kept = entries / 100;
        let started = Instant::now();
        let text = "x".repeat(180);
        let sets = (0..entries).map(|i| set(&item(i), json!({"i": i, "text": text})));
        self.push_in_batches(space, "gc-loader", sets, started)
            .await?;
        let old_cookie = self.cookie(space).await?;
        let deletes = (kept..entries).map(|i| delete(&item(i)));
        self.push_in_batches(space, "gc-deleter", deletes, started)
            .await?;
        let recent_cookie = self.cookie(space).await?;
        let note = push_body(&group_name("gc-note"), "gc-note", 1, [increment("note", 1)]);
        self.api.push(space, &note).await?;

        let before = self.space_pulls(space, &old_cookie, &recent_cookie).await?;
        anyhow::ensure!(
            before.tombstone_rows as usize == entries - kept && !before.old_cookie_pull_reset,
            "unexpected space before compaction: {} tombstones, reset {}",
            before.tombstone_rows,
            before.old_cookie_pull_reset
        );
        tokio::time::sleep(PAST_SHORT_TTL).await;
        let (took, said) = run_gc_once(
            &self.server_binary,
            &self.database_url,
            &[("REPLISYNC_TOMBSTONE_TTL", SHORT_TOMBSTONE_TTL)],
        )
        .await?;
        let after = self.space_pulls(space, &old_cookie, &recent_cookie).await?;
        anyhow::ensure!(
            after.tombstone_rows == 0 && after.old_cookie_pull_reset,
            "unexpected space after compaction: {} tombstones, reset {}",
            after.tombstone_rows,
            after.old_cookie_pull_reset
        );
        Ok(CompactionFigures {
            entries,
            deleted: entries - kept,
            pulls: PULL_REPEAT,
            before,
            after,
            compaction_ms: took.as_secs_f64() * 1000.0,
            compaction_output: said,
        })
    }

    /// Pushes `mutations` to `space` as `client` (in a group of its own), LOAD_BATCH per push.
    async fn push_in_batches(
        &self,
        space: &str,
        client: &str,
        mutations: impl Iterator<Item = crate::api::Mutation>,
        started: Instant,
    ) -> anyhow::Result<()> {
        let mut mutations = mutations.peekable();
        let mut next_id = 1;
        while mutations.peek().is_some() {
            let batch: Vec<_> = mutations.by_ref().take(LOAD_BATCH).collect();
            let count = batch.len() as u64;
            let body = push_body(&group_name(client), client, next_id, batch);
            self.api.push(space, &body).await?;
            next_id += count;
            anyhow::ensure!(
                started.elapsed() < LOAD_DEADLINE,
                "loading the compacted space took too long"
            );
        }
        Ok(())
    }

    /// The current cookie of `space`, from a pull of a reader of its own.
    async fn cookie(&self, space: &str) -> anyhow::Result<Value> {
        let pulled = self
            .api
            .pull(space, &pull_body("gc-cookie-reader", Value::Null))
            .await?;
        Ok(pulled["cookie"].clone())
    }

    /// The rows of `space` and its three pulls (null cookie, `recent` and `old`), each
    /// checked once and timed PULL_REPEAT times.
    async fn space_pulls(
        &self,
        space: &str,
        old: &Value,
        recent: &Value,
    ) -> anyhow::Result<SpacePulls> {
        let (entry_rows, tombstone_rows) = entry_rows(&self.database_url, space).await?;
        let first = self.timed_pulls(space, &Value::Null).await?;
        let recent = self.timed_pulls(space, recent).await?;
        let old = self.timed_pulls(space, old).await?;
        Ok(SpacePulls {
            entry_rows,
            tombstone_rows,
            first_pull_ms: first.ms,
            first_pull_mb: first.mb,
            first_pull_ops: first.ops,
            recent_cookie_pull_ms: recent.ms,
            recent_cookie_pull_ops: recent.ops,
            old_cookie_pull_ms: old.ms,
            old_cookie_pull_mb: old.mb,
            old_cookie_pull_ops: old.ops,
            old_cookie_pull_reset: old.reset,
        })
    }

    /// One pull of `space` from `cookie`, parsed (its operations, whether it starts with
    /// `clear`), then PULL_REPEAT more timed without parsing; the median latency.
    async fn timed_pulls(&self, space: &str, cookie: &Value) -> anyhow::Result<TimedPull> {
        let body = pull_body("gc-reader", cookie.clone());
        let parsed = self.api.pull(space, &body).await?;
        let patch = parsed["patch"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let reset = patch.first().is_some_and(|op| op["op"] == "clear");
        let mut latencies = Vec::new();
        let mut bytes = 0;
        for _ in 0..PULL_REPEAT {
            let sent = Instant::now();
            bytes = self.api.pull_response_bytes(space, &body).await?;
            latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(TimedPull {
            ms: crate::report::percentile(&mut latencies, 50.0),
            mb: bytes as f64 / 1_048_576.0,
            ops: patch.len(),
            reset,
        })
    }

    /// One-mutation pushes (one space and 100 spaces, C=8) on a fresh server with GC off and on
    /// one with GC every second, rounds alternating; before every round (both modes) the
    /// backlog is seeded afresh, and GC on has it to collect while the pushes run.
    pub(crate) async fn pushes_beside_gc(&self, report: &mut Report) -> anyhow::Result<()> {
        for (clients, spaces) in [(8, 1), (8, 100)] {
            // As many pushes as the push workloads: on this machine a round lasts about as long
            // as the first pass over the backlog (the table shows both).
            let total = self.total_pushes(clients);
            let shape = (clients, spaces, 1, total);
            let (mut off, mut on) = (Vec::new(), Vec::new());
            let (mut removed, mut left, mut pass_ended_s) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..self.repeat {
                let name = format!("gcp-{spaces}-r{round}");
                let gc_off = self
                    .push_round(&format!("{name}-off"), false, shape)
                    .await?;
                off.push(PushRound::alone(gc_off.served));
                let gc_on = self.push_round(&format!("{name}-on"), true, shape).await?;
                pass_ended_s.push(gc_on.pass_ended_s);
                on.push(PushRound::alone(gc_on.served));
                removed.push(gc_on.removed);
                left.push(gc_on.left);
            }
            let label = format!("one-mutation pushes, {spaces} space(s), C={clients}");
            let backlog = (BACKLOG_GROUPS, BACKLOG_TOMBSTONES);
            let mut row = GcPushComparison::from_rounds(label, &off, &on, backlog, &removed, &left);
            row.first_pass_ended_s_rounds = pass_ended_s;
            report.add_gc_push_row(row);
        }
        Ok(())
    }

    /// Seeds the backlog, starts a server (GC every second when `gc`, else off; the same TTLs,
    /// an hour, either way), waits one interval and runs the pushes. Answers their figures,
    /// what the server's GC removed by then (groups, tombstones; /metrics) and the backlog left.
    async fn push_round(
        &self,
        name: &str,
        gc: bool,
        shape: (usize, usize, usize, usize),
    ) -> anyhow::Result<RoundOutcome> {
        seed_gc_backlog(&self.database_url, BACKLOG_GROUPS, BACKLOG_TOMBSTONES).await?;
        let server = Server::start_with_env(
            &self.server_binary,
            &self.database_url,
            None,
            self.jwt_secret.as_deref(),
            &[
                ("REPLISYNC_GC_INTERVAL", if gc { GC_INTERVAL } else { "0" }),
                ("REPLISYNC_CLIENT_TTL", "1h"),
                ("REPLISYNC_TOMBSTONE_TTL", "1h"),
            ],
        )
        .await?;
        tokio::time::sleep(GC_INTERVAL_DURATION).await;
        let api = self.api.at(&server.base);
        let started = Instant::now();
        let served = push_workload_on(&api, increment, name, shape).await?;
        let removed = gc_removed(&api).await?;
        let left = gc_backlog_left(&self.database_url).await?;
        let pass_ended_s = server
            .first_gc_removal_logged_at()
            .map(|at| at.saturating_duration_since(started).as_secs_f64());
        drop(server);
        Ok(RoundOutcome {
            served,
            removed,
            left,
            pass_ended_s,
        })
    }
}

/// Client groups and tombstones the server's garbage collection has removed so far.
async fn gc_removed(api: &Api) -> anyhow::Result<(u64, u64)> {
    Ok((
        api.metric("replisync_gc_client_groups_removed_total")
            .await?,
        api.metric("replisync_gc_tombstones_removed_total").await?,
    ))
}

/// One round of pushes beside GC: their figures, what GC removed by their end (groups,
/// tombstones; /metrics), the backlog left then (database), and when (seconds after the pushes
/// started) the first pass that removed anything ended, if it did before they did.
struct RoundOutcome {
    served: crate::load::PushFigures,
    removed: (u64, u64),
    left: (i64, i64),
    pass_ended_s: Option<f64>,
}

struct TimedPull {
    ms: f64,
    mb: f64,
    ops: usize,
    reset: bool,
}

fn item(i: usize) -> String {
    format!("item/{i:08}")
}
