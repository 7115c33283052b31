//! Workload soak (`--only soak`, not in the default set): the 100-space push rows on a fresh
//! database, then minutes of first pushes of new client groups to new spaces with every push
//! sent 16 times at once (as retries or several tabs send it), then minutes of distinct new
//! groups, then the 100-space rows again on the same server and database. Push lookups that
//! stopped using their indexes, or a server that grew, show here. Bounded in requests and time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use serde::Serialize;

use crate::api::{Api, increment, push_body};
use crate::database::{DatabaseCounters, database_counters};
use crate::report::{PushRound, PushRow};
use crate::server::Server;
use crate::workloads::{Bench, push_workload_on};

/// How long each phase of new client groups runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SoakSettings {
    pub duplicated: Duration,
    pub distinct: Duration,
}

/// Copies of each push sent at once in the duplicated phase.
const COPIES: usize = 16;
/// Client groups pushed at once: in the duplicated phase (each push in COPIES copies), and in
/// the distinct one.
const DUPLICATED_WORKERS: usize = 4;
const DISTINCT_WORKERS: usize = 16;
/// Pushes of each group in the duplicated phase (mutations 1, 2, 3, one per push).
const PUSHES_PER_GROUP: u64 = 3;
/// No phase makes more client groups than this, however long it runs.
const MAX_GROUPS: usize = 10_000_000;
/// Statistics reach pg_stat_user_tables within a second of a session going idle.
const STATISTICS_DELAY: Duration = Duration::from_secs(2);

/// What the soak measured.
#[derive(Serialize)]
pub(crate) struct SoakFigures {
    /// `SHOW autovacuum` of the database server.
    pub autovacuum: String,
    pub duplicated_groups: usize,
    pub duplicated_s: f64,
    pub distinct_groups: usize,
    pub distinct_s: f64,
    /// Rows once the phases are done.
    pub client_group_rows: i64,
    pub client_rows: i64,
    /// The 100-space rows on the fresh database, and after the phases.
    pub fresh: Vec<PushRow>,
    pub after: Vec<PushRow>,
    /// Sequential scans of replisync_client_groups and replisync_clients (summed) during the
    /// fresh rows, the phases, and the rows after them.
    pub seq_scans_fresh_rows: i64,
    pub seq_scans_phases: i64,
    pub seq_scans_after_rows: i64,
    /// Analyzes of those two tables (by autovacuum or replisync) during the whole soak.
    pub analyzes: i64,
    /// The server's peak resident size over the soak (None where it cannot be reset).
    pub server_peak_rss_mb: Option<f64>,
    pub server_rss_after_mb: f64,
}

impl Bench {
    /// The soak, on `server` (the one the benchmark started on its fresh database).
    pub(crate) async fn soak(
        &self,
        server: &Server,
        settings: SoakSettings,
    ) -> anyhow::Result<SoakFigures> {
        let peak_reset = server.reset_peak_rss();
        let start = database_counters(&self.database_url).await?;
        let fresh = self.hundred_space_rows("soak-fresh").await?;
        let after_fresh = settle(&self.database_url).await?;

        let (duplicated_groups, duplicated_s) = timed(settings.duplicated, DUPLICATED_WORKERS, {
            let api = self.api.clone();
            move |n| duplicated_group(api.clone(), n)
        })
        .await?;
        eprintln!("  soak: {duplicated_groups} groups pushed {COPIES} times over");
        let (distinct_groups, distinct_s) = timed(settings.distinct, DISTINCT_WORKERS, {
            let api = self.api.clone();
            move |n| distinct_group(api.clone(), n)
        })
        .await?;
        eprintln!("  soak: {distinct_groups} distinct groups");
        let after_phases = settle(&self.database_url).await?;

        let after = self.hundred_space_rows("soak-after").await?;
        let end = settle(&self.database_url).await?;
        Ok(SoakFigures {
            autovacuum: end.autovacuum.clone(),
            duplicated_groups,
            duplicated_s,
            distinct_groups,
            distinct_s,
            client_group_rows: end.client_group_rows,
            client_rows: end.client_rows,
            fresh,
            after,
            seq_scans_fresh_rows: after_fresh.seq_scans - start.seq_scans,
            seq_scans_phases: after_phases.seq_scans - after_fresh.seq_scans,
            seq_scans_after_rows: end.seq_scans - after_phases.seq_scans,
            analyzes: end.analyzes - start.analyzes,
            server_peak_rss_mb: peak_reset.then(|| server.peak_rss_mb()),
            server_rss_after_mb: server.rss_mb(),
        })
    }

    /// The 100-space push rows (C=8 and C=64, without their floor), `self.repeat` rounds each.
    async fn hundred_space_rows(&self, tag: &str) -> anyhow::Result<Vec<PushRow>> {
        let mut rows = Vec::new();
        for clients in [8, 64] {
            let mut rounds = Vec::new();
            for round in 0..self.repeat {
                let name = format!("{tag}-many-{clients}-r{round}");
                let shape = (clients, 100, 1, self.total_pushes(clients));
                let served = push_workload_on(&self.api, increment, &name, shape).await?;
                rounds.push(PushRound::alone(served));
            }
            let label = format!("push, 100 spaces, C={clients}");
            rows.push(PushRow::from_rounds(label, &rounds));
        }
        Ok(rows)
    }
}

/// The database's counters once the sessions have reported their statistics.
async fn settle(database_url: &str) -> anyhow::Result<DatabaseCounters> {
    tokio::time::sleep(STATISTICS_DELAY).await;
    database_counters(database_url).await
}

/// Runs `job(n)` for n = 0, 1, 2... on `workers` workers until `duration` is over (or
/// MAX_GROUPS); answers how many ran and for how long.
async fn timed<F, Fut>(duration: Duration, workers: usize, job: F) -> anyhow::Result<(usize, f64)>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let (started, next) = (Instant::now(), Arc::new(AtomicUsize::new(0)));
    let workers = (0..workers).map(|_| {
        let (job, next) = (job.clone(), next.clone());
        tokio::spawn(async move {
            while started.elapsed() < duration {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= MAX_GROUPS {
                    break;
                }
                job(n).await?;
            }
            anyhow::Ok(())
        })
    });
    for worker in try_join_all(workers).await? {
        worker?;
    }
    let ran = next.load(Ordering::Relaxed).min(MAX_GROUPS);
    Ok((ran, started.elapsed().as_secs_f64()))
}

/// A new client group's first pushes to a new space, each sent COPIES times at once.
async fn duplicated_group(api: Api, n: usize) -> anyhow::Result<()> {
    let (space, client) = (format!("soak-dup-{n}"), format!("soak-dup-c{n}"));
    let group = format!("{client}-group");
    for id in 1..=PUSHES_PER_GROUP {
        let body = push_body(&group, &client, id, [increment("n", 1)]);
        try_join_all((0..COPIES).map(|_| api.push(&space, &body))).await?;
    }
    Ok(())
}

/// A new client group's first push, to a new space.
async fn distinct_group(api: Api, n: usize) -> anyhow::Result<()> {
    let (space, client) = (format!("soak-new-{n}"), format!("soak-new-c{n}"));
    let body = push_body(&format!("{client}-group"), &client, 1, [increment("n", 1)]);
    api.push(&space, &body).await.map(drop)
}

impl SoakFigures {
    pub(crate) fn print(&self) {
        println!(
            "\nsoak (autovacuum {}): {} new groups to new spaces, each push sent {COPIES} times at once, in {:.0} s; then {} distinct new groups in {:.0} s; {} client groups and {} clients in the end",
            self.autovacuum,
            self.duplicated_groups,
            self.duplicated_s,
            self.distinct_groups,
            self.distinct_s,
            self.client_group_rows,
            self.client_rows
        );
        println!(
            "\n| workload | fresh mutations/s | after soak mutations/s | ratio | fresh p50 ms | after soak p50 ms |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for (fresh, after) in self.fresh.iter().zip(&self.after) {
            println!(
                "| {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} |",
                fresh.workload,
                fresh.mutations_per_second,
                after.mutations_per_second,
                after.mutations_per_second / fresh.mutations_per_second,
                fresh.push_p50_ms,
                after.push_p50_ms
            );
        }
        let peak = self
            .server_peak_rss_mb
            .map_or_else(|| "-".to_owned(), |mb| format!("{mb:.1}"));
        println!(
            "\nsequential scans of replisync_client_groups + replisync_clients: {} during the fresh rows, {} during the phases, {} during the rows after; {} analyzes of them; server peak RSS {peak} MB, {:.1} MB at the end",
            self.seq_scans_fresh_rows,
            self.seq_scans_phases,
            self.seq_scans_after_rows,
            self.analyzes,
            self.server_rss_after_mb
        );
    }
}
