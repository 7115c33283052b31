//! Visibility rules' cost (`--only rules`): one replisync with a rules file and tokens, a ruled
//! space and an unruled one filled alike; a pull storm, incremental pulls and big first pulls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::{StreamExt, TryStreamExt};
use serde_json::{Value, json};

use crate::api::{Api, pull_body, push_body, set};
use crate::rules_data::{
    self, Callers, Layout, TEAMS, USERS, check_readable, checked_first_pull, patch_keys, spaces,
    team_of,
};
use crate::rules_report::{FirstPullComparison, PullComparison, PullRound, RulesFigures};
use crate::server::Server;
use crate::workloads::{Bench, FreshServer};

/// Watchers of the pull storm: users u0... u999, one each, so 1000 distinct read sets.
const WATCHERS: usize = USERS;
/// Storms per space in each round (one storm is over in about 100 ms: medians of several).
const STORMS_PER_ROUND: usize = 5;
/// Clients of the incremental pulls: users u1... u8 (teams t1... t8), one each.
const PULLERS: usize = 8;
/// Incremental pulls per round, over all clients (divided by --quick's scale).
const INCREMENTAL_PULLS: usize = 8000;
/// The writer beside the incremental pulls makes this many pushes a round at most.
const MAX_WRITER_PUSHES: u64 = 20_000;
/// No storm and no incremental round runs longer than this.
const ROUND_DEADLINE: Duration = Duration::from_secs(60);
/// First pulls in flight at once while the clients get their cookies (the server streams a
/// few at a time and queues the rest).
const SETUP_CONCURRENCY: usize = 8;
/// Who makes the first pulls of the big spaces.
const READER: usize = 1;

/// One space of the storm and the incremental pulls, and what its clients hold between
/// rounds (as Replicache clients would: each pull from the cookie of the one before).
struct RulesSpace {
    ruled: bool,
    name: String,
    /// Each watcher's cookie, and the storm's pushes so far.
    storm_cookies: Vec<Value>,
    storm_pushes: u64,
    /// Each incremental client's cookie, and the writer's pushes so far.
    puller_cookies: Vec<Value>,
    writer_pushes: u64,
}

impl RulesSpace {
    /// Fills the space, then gives every client its cookie through a first pull, checked: a
    /// ruled one returns exactly what its user may read. Unruled, the storm's watchers share
    /// one first pull's cookie (a number, the same for everyone).
    async fn set_up(callers: &Callers, (ruled, name): (bool, String)) -> anyhow::Result<Self> {
        let took = rules_data::fill(callers, &name, Layout::SMALL).await?;
        eprintln!(
            "  rules: filled {name} ({} entries) in {:.1} s",
            Layout::SMALL.entries(),
            took.as_secs_f64()
        );
        let watchers = if ruled { WATCHERS } else { 1 };
        let mut storm_cookies = first_cookies(callers, (ruled, &name), 0..watchers, storm_group)
            .await
            .context("the storm's first pulls")?;
        storm_cookies.resize(WATCHERS, storm_cookies[0].clone());
        let puller_cookies = first_cookies(callers, (ruled, &name), 1..=PULLERS, puller_group)
            .await
            .context("the incremental clients' first pulls")?;
        Ok(RulesSpace {
            ruled,
            name,
            storm_cookies,
            storm_pushes: 0,
            puller_cookies,
            writer_pushes: 0,
        })
    }
}

fn storm_group(space: &str, user: usize) -> String {
    format!("{space}-storm-u{user}")
}

fn puller_group(space: &str, user: usize) -> String {
    format!("{space}-inc-u{user}")
}

/// Checked first pulls of `space` by `users`, each in its group (`group(space, user)`),
/// SETUP_CONCURRENCY at once; answers their cookies, in the users' order.
async fn first_cookies(
    callers: &Callers,
    (ruled, space): (bool, &str),
    users: impl Iterator<Item = usize>,
    group: fn(&str, usize) -> String,
) -> anyhow::Result<Vec<Value>> {
    futures::stream::iter(users)
        .map(|user| {
            let api = &callers.users[user];
            let group = group(space, user);
            async move {
                let target = (ruled, space);
                let (cookie, _) =
                    checked_first_pull(api, target, user, &group, Layout::SMALL).await?;
                anyhow::Ok(cookie)
            }
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await
}

/// Which of the two spaces goes first in `round`: the ruled one in even rounds.
fn order(round: usize) -> [usize; 2] {
    if round.is_multiple_of(2) {
        [0, 1]
    } else {
        [1, 0]
    }
}

impl Bench {
    /// The rules workloads, on a replisync of their own started with REPLISYNC_RULES (in a
    /// temporary directory) and REPLISYNC_JWT_SECRET (--jwt-secret, or DEFAULT_SECRET).
    pub(crate) async fn rules_workloads(&self) -> anyhow::Result<RulesFigures> {
        let dir = tempfile::tempdir()?;
        let rules_file = dir.path().join("rules.json");
        std::fs::write(&rules_file, rules_data::RULES)?;
        let rules_path = rules_file
            .to_str()
            .context("the temporary directory's path")?;
        let secret = self
            .jwt_secret
            .as_deref()
            .unwrap_or(rules_data::DEFAULT_SECRET);
        // The storm's 1000 connections and the benchmark's others would be over the default
        // cap of 1024 (REPLISYNC_MAX_CONNECTIONS), at times.
        let env = [
            ("REPLISYNC_RULES", rules_path),
            ("REPLISYNC_MAX_CONNECTIONS", "2048"),
        ];
        let fresh = FreshServer {
            jwt_secret: Some(secret),
            env: &env,
        };
        let server = self.start_rules_server(&fresh).await?;
        let callers = Callers::new(&self.api.at(&server.base), secret)?;
        let mut small = Vec::new();
        for space in spaces("bench") {
            small.push(RulesSpace::set_up(&callers, space).await?);
        }
        // The storm's connections (one per watcher) on a client of their own, closed after it:
        // the server holds no 1000 idle connections through the other workloads.
        let storm_api = Api::new(crate::http_client(None)?, &server.base);
        let storm_callers = Callers::new(&storm_api, secret)?;
        let storm = self.storm_rounds(&storm_callers, &mut small).await?;
        drop((storm_api, storm_callers));
        tokio::time::sleep(Duration::from_secs(1)).await; // for the server to see them close
        let incremental = self.incremental_rounds(&callers, &mut small).await?;
        let first_pull = self.rules_first_pulls(&callers, &fresh).await?;
        Ok(RulesFigures {
            users: USERS,
            teams: TEAMS,
            rounds: self.repeat,
            storms_per_round: STORMS_PER_ROUND,
            small_layout: Layout::SMALL,
            small_entries: Layout::SMALL.entries(),
            storm,
            incremental,
            first_pull,
        })
    }

    async fn start_rules_server(&self, fresh: &FreshServer<'_>) -> anyhow::Result<Server> {
        let binary = &self.server_binary;
        let (secret, env) = (fresh.jwt_secret, fresh.env);
        Server::start_with_env(binary, &self.database_url, None, secret, env).await
    }

    /// Pull storms, ruled and unruled alternating: one each unmeasured (it opens the
    /// watchers' connections), then STORMS_PER_ROUND each per round.
    async fn storm_rounds(
        &self,
        callers: &Callers,
        spaces: &mut [RulesSpace],
    ) -> anyhow::Result<PullComparison> {
        for space in spaces.iter_mut() {
            storm_round(callers, space).await?;
        }
        let mut rounds = [Vec::new(), Vec::new()];
        for storm in 0..self.repeat * STORMS_PER_ROUND {
            for i in order(storm) {
                rounds[i].push(storm_round(callers, &mut spaces[i]).await?);
            }
        }
        let label = format!("pull storm, {WATCHERS} watchers ({WATCHERS} users)");
        Ok(PullComparison::from_rounds(
            &label,
            (&spaces[1].name, &rounds[1]),
            (&spaces[0].name, &rounds[0]),
        ))
    }

    /// Incremental pull rounds, ruled and unruled alternating.
    async fn incremental_rounds(
        &self,
        callers: &Callers,
        spaces: &mut [RulesSpace],
    ) -> anyhow::Result<PullComparison> {
        let per_puller = INCREMENTAL_PULLS / self.scale / PULLERS;
        let mut rounds = [Vec::new(), Vec::new()];
        for round in 0..self.repeat {
            for i in order(round) {
                rounds[i].push(incremental_round(callers, &mut spaces[i], per_puller).await?);
            }
        }
        let label = format!("incremental pulls, C={PULLERS}, one writer");
        Ok(PullComparison::from_rounds(
            &label,
            (&spaces[1].name, &rounds[1]),
            (&spaces[0].name, &rounds[0]),
        ))
    }

    /// Two spaces of Layout::BIG, each first pulled (checked) through the rules server, then
    /// measured from fresh servers, rounds alternating.
    async fn rules_first_pulls(
        &self,
        callers: &Callers,
        fresh: &FreshServer<'_>,
    ) -> anyhow::Result<FirstPullComparison> {
        let big = spaces("big");
        let mut returned = [0; 2];
        for (i, (ruled, name)) in big.iter().enumerate() {
            let took = rules_data::fill(callers, name, Layout::BIG).await?;
            eprintln!(
                "  rules: filled {name} ({} entries) in {:.1} s",
                Layout::BIG.entries(),
                took.as_secs_f64()
            );
            let api = &callers.users[READER];
            let target = (*ruled, name.as_str());
            (_, returned[i]) =
                checked_first_pull(api, target, READER, "big-check", Layout::BIG).await?;
        }
        let mut rounds = [Vec::new(), Vec::new()];
        for round in 0..self.repeat {
            for i in order(round) {
                let api = &callers.users[READER];
                let entries = Layout::BIG.entries();
                let pull = self.first_pull_on_fresh_server(fresh, api, &big[i].1, entries);
                rounds[i].push(pull.await?);
            }
        }
        Ok(FirstPullComparison::from_rounds(
            Layout::BIG,
            (&big[1].1, &rounds[1]),
            (&big[0].1, &rounds[0]),
            (returned[1], returned[0]),
        ))
    }
}

/// One push by u0 setting a shared key, a key of team t0 and one of its own; then every
/// watcher pulls from its cookie at once. Each must get exactly the keys it may read: all 3
/// unruled; ruled, the shared one, t0's for team t0, u0's for u0.
async fn storm_round(callers: &Callers, space: &mut RulesSpace) -> anyhow::Result<PullRound> {
    space.storm_pushes += 1;
    let push = space.storm_pushes;
    let keys = ["shared/storm", "team/t0/storm", "user/u0/storm"];
    let sets = keys.map(|key| set(key, json!(push)));
    let client = format!("{}-storm-writer", space.name);
    let first_id = (push - 1) * keys.len() as u64 + 1;
    let body = push_body(&format!("{client}-group"), &client, first_id, sets);
    let writer = &callers.users[0];
    writer.push(&space.name, &body).await?;
    let reads_before = writer.metric("replisync_pull_reads_total").await?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + ROUND_DEADLINE;
    let pulls: Vec<_> = (0..WATCHERS)
        .map(|w| {
            let (api, ruled, name) = (callers.users[w].clone(), space.ruled, space.name.clone());
            let body = pull_body(&storm_group(&name, w), space.storm_cookies[w].clone());
            tokio::spawn(async move {
                let sent = Instant::now();
                let answer = api.pull(&name, &body).await?;
                let latency_ms = sent.elapsed().as_secs_f64() * 1000.0;
                let keys = patch_keys(&answer, false)?;
                check_readable(ruled, w, &keys)?;
                let expected = if ruled {
                    1 + usize::from(team_of(w) == 0) + usize::from(w == 0)
                } else {
                    3
                };
                ensure!(
                    keys.len() == expected,
                    "storm pull of {name} by u{w}: {keys:?}, not {expected} keys"
                );
                anyhow::Ok((latency_ms, answer["cookie"].clone(), keys.len()))
            })
        })
        .collect();
    let (mut latencies_ms, mut ops) = (Vec::with_capacity(WATCHERS), 0);
    for (w, pull) in pulls.into_iter().enumerate() {
        let answered = tokio::time::timeout_at(deadline, pull).await;
        let (latency_ms, cookie, keys) =
            answered.context("the storm ran past its deadline")???;
        latencies_ms.push(latency_ms);
        space.storm_cookies[w] = cookie;
        ops += keys;
    }
    let elapsed = started.elapsed();
    let snapshot_reads = writer.metric("replisync_pull_reads_total").await? - reads_before;
    Ok(PullRound {
        elapsed,
        latencies_ms,
        ops,
        snapshot_reads,
        writer_pushes: None,
    })
}

/// PULLERS clients each pull `per_puller` times from their own cookie, forward, while a
/// writer pushes one key at a time (shared, some team's, its own in turn) until they are done.
/// Every key a ruled client receives must be one it may read.
async fn incremental_round(
    callers: &Callers,
    space: &mut RulesSpace,
    per_puller: usize,
) -> anyhow::Result<PullRound> {
    let observer = &callers.users[0];
    let reads_before = observer.metric("replisync_pull_reads_total").await?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let writer = tokio::spawn(write_until(
        callers.writer.clone(),
        space.name.clone(),
        space.writer_pushes,
        stop.clone(),
    ));
    let pullers: Vec<_> = (0..PULLERS)
        .map(|k| {
            let user = k + 1;
            let (api, ruled, name) = (callers.users[user].clone(), space.ruled, space.name.clone());
            let group = puller_group(&name, user);
            let mut cookie = space.puller_cookies[k].clone();
            tokio::spawn(async move {
                let (mut latencies_ms, mut ops) = (Vec::with_capacity(per_puller), 0);
                for _ in 0..per_puller {
                    if started.elapsed() > ROUND_DEADLINE {
                        break;
                    }
                    let sent = Instant::now();
                    let answer = api.pull(&name, &pull_body(&group, cookie)).await?;
                    latencies_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
                    let keys = patch_keys(&answer, false)?;
                    check_readable(ruled, user, &keys)?;
                    ops += keys.len();
                    cookie = answer["cookie"].clone();
                    ensure!(
                        cookie.is_object() == ruled,
                        "{name} answered cookie {cookie}"
                    );
                }
                anyhow::Ok((latencies_ms, ops, cookie))
            })
        })
        .collect();
    let answered = futures::future::join_all(pullers).await;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let writer_pushes = writer.await??;
    space.writer_pushes += writer_pushes;
    let (mut latencies_ms, mut ops) = (Vec::new(), 0);
    for (k, puller) in answered.into_iter().enumerate() {
        let (latencies, keys, cookie) = puller??;
        latencies_ms.extend(latencies);
        ops += keys;
        space.puller_cookies[k] = cookie;
    }
    let snapshot_reads = observer.metric("replisync_pull_reads_total").await? - reads_before;
    Ok(PullRound {
        elapsed,
        latencies_ms,
        ops,
        snapshot_reads,
        writer_pushes: Some(writer_pushes),
    })
}

/// Pushes one set a push to `space` as `api` (the writer, of every team), the keys in turn
/// shared, of team t0... t9, its own, until `stop` (or MAX_WRITER_PUSHES, ROUND_DEADLINE);
/// answers how many. `done_before`: its pushes in earlier rounds.
async fn write_until(
    api: Api,
    space: String,
    done_before: u64,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<u64> {
    let client = format!("{space}-inc-writer");
    let group = format!("{client}-group");
    let started = Instant::now();
    let mut pushes = 0;
    while !stop.load(Ordering::Relaxed)
        && pushes < MAX_WRITER_PUSHES
        && started.elapsed() < ROUND_DEADLINE
    {
        let k = done_before + pushes;
        let key = match k % 3 {
            0 => format!("shared/inc/{:03}", k % 100),
            1 => format!("team/t{}/inc/{:03}", k % TEAMS as u64, k % 100),
            _ => format!("user/writer/inc/{:03}", k % 100),
        };
        let body = push_body(&group, &client, k + 1, [set(&key, json!(k))]);
        api.push(&space, &body).await?;
        pushes += 1;
    }
    Ok(pushes)
}
