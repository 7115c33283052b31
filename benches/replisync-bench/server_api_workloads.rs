//! The server API's mutation calls (`--only server-api`) beside the push workloads they
//! correspond to: one-mutation `increment` calls to `POST /api/spaces/{space}/mutations`, each
//! with an idempotency key of its own, and one-mutation `increment` pushes, by the same number
//! of concurrent callers over the same number of spaces, rounds alternating; on Postgres, then
//! on SQLite.
//!
//! Each path has a replisync of its own (both started with REPLISYNC_SERVICE_TOKEN), on a
//! database of its own: every call leaves a new client group behind, and on Postgres each
//! commit's check of its groups' activity (in `replisync_commit_push_batch` and
//! `replisync_commit_push_group`) can read every group active in the last hour (its cached
//! generic plan scans `replisync_client_groups_by_last_active`), so calls made on the pushes'
//! database would slow the pushes that follow.

use anyhow::ensure;

use crate::api::{Api, increment, mutation_call_body};
use crate::database::{drop_side_database, fresh_side_database};
use crate::load::{PushFigures, drive_clients, space_name};
use crate::report::{PushRound, Report, ServerApiComparison};
use crate::server::Server;
use crate::workloads::{Bench, push_workload_on};

/// REPLISYNC_SERVICE_TOKEN of the servers this workload starts (at least 32 characters).
const SERVICE_TOKEN: &str = "replisync-bench-service-token-0123456789abcdef";

/// Concurrent callers and spaces of each comparison, as the push rows have them.
const SHAPES: [(usize, usize); 4] = [(8, 1), (64, 1), (8, 100), (64, 100)];

/// Each round makes this many times the pushes of a push row's round (at C=64 on one space,
/// those take about a third of a second: one pause of the machine's other work would halve a
/// round's figure).
const CALLS_PER_PUSH_ROUND: usize = 3;

/// The key every call and push increments (the push workloads' one-mutation pushes
/// increment `counter-0`).
const COUNTER: &str = "counter-0";

/// Suffix of the Postgres side database the calls' server uses.
const API_DATABASE: &str = "api";

impl Bench {
    /// Each shape's push workload and server API workload, `self.repeat` rounds alternating
    /// (which goes first alternates too): on Postgres (pushes in the benchmark's database,
    /// calls in a fresh side database), then on the embedded SQLite store (a fresh file each).
    pub(crate) async fn server_api_workloads(&self, report: &mut Report) -> anyhow::Result<()> {
        let env = [("REPLISYNC_SERVICE_TOKEN", SERVICE_TOKEN)];
        let jwt_secret = self.jwt_secret.as_deref();
        let api_url = fresh_side_database(&self.admin_url, API_DATABASE).await?;
        let start = |url| Server::start_with_env(&self.server_binary, url, None, jwt_secret, &env);
        let push_server = start(&self.database_url).await?;
        let api_server = start(&api_url).await?;
        self.compare_api_with_pushes("Postgres", &push_server, &api_server, report)
            .await?;
        drop((push_server, api_server));
        drop_side_database(&self.admin_url, API_DATABASE).await?;
        let dir = tempfile::tempdir()?;
        let files = [dir.path().join("pushes.db"), dir.path().join("calls.db")];
        let start =
            |file| Server::start_on_sqlite_with_env(&self.server_binary, file, jwt_secret, &env);
        let push_server = start(&files[0]).await?;
        let api_server = start(&files[1]).await?;
        self.compare_api_with_pushes("SQLite", &push_server, &api_server, report)
            .await
    }

    async fn compare_api_with_pushes(
        &self,
        store: &'static str,
        push_server: &Server,
        api_server: &Server,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        let pushes = self.api.at(&push_server.base);
        let calls = self
            .api
            .at(&api_server.base)
            .with_bearer(&format!("Bearer {SERVICE_TOKEN}"));
        let prefix = store.to_ascii_lowercase();
        // Unmeasured: each server's pool opens its connections.
        let warm_up = (64, 100, 1, 640);
        let warm_up_pushes = format!("sapi-{prefix}-warm-p");
        push_workload_on(&pushes, increment, &warm_up_pushes, warm_up).await?;
        call_workload(&calls, &format!("sapi-{prefix}-warm-a"), 64, 100, 640).await?;
        for (clients, spaces) in SHAPES {
            let total = CALLS_PER_PUSH_ROUND * self.total_pushes(clients);
            let (mut push_rounds, mut api_rounds) = (Vec::new(), Vec::new());
            for round in 0..self.repeat {
                let name = format!("sapi-{prefix}-{clients}-{spaces}-r{round}");
                let push_shape = (clients, spaces, 1, total);
                let (push_name, call_name) = (format!("{name}-p"), format!("{name}-a"));
                let push = push_workload_on(&pushes, increment, &push_name, push_shape);
                let call = call_workload(&calls, &call_name, clients, spaces, total);
                if round % 2 == 0 {
                    push_rounds.push(PushRound::alone(push.await?));
                    api_rounds.push(PushRound::alone(call.await?));
                } else {
                    api_rounds.push(PushRound::alone(call.await?));
                    push_rounds.push(PushRound::alone(push.await?));
                }
            }
            let label = match spaces {
                1 => format!("{store}, one space, C={clients}"),
                _ => format!("{store}, {spaces} spaces, C={clients}"),
            };
            report.add_server_api_row(ServerApiComparison::from_rounds(
                label,
                &push_rounds,
                &api_rounds,
            ));
        }
        Ok(())
    }
}

/// `clients` concurrent callers, each calling `increment` of COUNTER once per call, with a
/// fresh idempotency key, in turn in each of the `spaces` spaces of workload `name`, until
/// `total` calls are answered (or the load's deadline). Every call must be answered
/// `committed`. Then checks that each space's counter counts exactly the calls made to it,
/// and that a call sent again is answered `alreadyApplied` and changes nothing.
async fn call_workload(
    api: &Api,
    name: &str,
    clients: usize,
    spaces: usize,
    total: usize,
) -> anyhow::Result<PushFigures> {
    let (caller, workload) = (api.clone(), name.to_owned());
    let figures = drive_clients(clients, spaces, 1, total, move |job| {
        let api = caller.clone();
        let key = format!("{workload}-c{}-s{}-{}", job.client, job.space, job.first_id);
        let body = mutation_call_body(&key, [increment(COUNTER, 1)]);
        let space = space_name(&workload, job.space);
        async move {
            let status = api.apply_mutations(&space, &body).await?;
            ensure!(
                status == "committed",
                "a call with a new idempotency key was answered {status:?}"
            );
            Ok(())
        }
    })
    .await?;
    check_counters(api, name, spaces, figures.mutations).await?;
    Ok(figures)
}

/// The counters of workload `name`'s spaces add up to `calls`; a call sent again (the first
/// client's first key in space 0) is answered `alreadyApplied` and leaves its counter as it was.
async fn check_counters(api: &Api, name: &str, spaces: usize, calls: usize) -> anyhow::Result<()> {
    let mut counted = 0;
    for space in 0..spaces {
        counted += counter(api, &space_name(name, space)).await?;
    }
    ensure!(
        counted == calls as i64,
        "workload {name}: {calls} calls answered committed, but the counters of its spaces add up to {counted}"
    );
    let space = space_name(name, 0);
    let before = counter(api, &space).await?;
    let body = mutation_call_body(&format!("{name}-c0-s0-1"), [increment(COUNTER, 1)]);
    let status = api.apply_mutations(&space, &body).await?;
    ensure!(
        status == "alreadyApplied",
        "a call sent again with its idempotency key was answered {status:?}"
    );
    let after = counter(api, &space).await?;
    ensure!(
        before == after,
        "a call sent again moved {space}'s counter from {before} to {after}"
    );
    Ok(())
}

/// COUNTER's value in `space`, read through the server API (0 when it has none).
async fn counter(api: &Api, space: &str) -> anyhow::Result<i64> {
    let path = format!("/api/spaces/{space}/entries?prefix={COUNTER}&limit=1");
    let page = api.get_json(&path).await?;
    let entries = page["entries"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    match entries {
        [] => Ok(0),
        [entry] if entry["key"] == COUNTER => entry["value"]
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("{space}'s {COUNTER} is not an integer: {entry}")),
        _ => anyhow::bail!("{space}: unexpected page {page}"),
    }
}
