//! The poke workload (`poke`), once per poke service this machine has: sockudo (Pusher's API)
//! and Redis (socket.io's adapter), each with a replisync of its own wired to it. Spaced-out
//! pokes give the latency from commit to the service accepting the poke; 64 clients pushing to
//! one space give what the load costs the service, whose calls coalesce.

use std::time::Duration;

use replisync::poke::delivery::PokerOptions;

use crate::api::{Api, increment, push_body};
use crate::load::PushFigures;
use crate::report::{PokeFigures, PokeLoadRound, Report, SocketIoPokeFigures};
use crate::server::{Server, Sockudo};
use crate::socketio::PokeSubscriber;
use crate::workloads::{Bench, push_workload_on};

/// Pushes whose latency is measured, per service.
const SPACED_POKES: u64 = 60;
/// Between two of them: longer than the coalescing window (5 ms), so none coalesce.
const POKE_GAP: Duration = Duration::from_millis(30);
/// After a phase, for its last pokes to be sent and counted.
const SETTLE: Duration = Duration::from_millis(500);
/// Clients of the load, all pushing to one space.
const LOAD_CLIENTS: usize = 64;

/// A service replisync pokes through, and how the benchmark counts what it sent.
#[derive(Clone, Copy)]
enum PokeService<'a> {
    /// sockudo, through Pusher's HTTP API.
    Pusher,
    /// Redis PUBLISHes to a socket.io cluster, here the benchmark's subscriber.
    SocketIo(&'a PokeSubscriber),
}

/// What a service was sent so far, from the server's /metrics (and the subscriber).
#[derive(Clone, Copy, Default)]
struct PokesSent {
    /// Calls the service accepted: Pusher requests, or socket.io pipelines (one round trip each).
    calls: u64,
    /// socket.io: PUBLISHes Redis accepted, and messages the subscriber received.
    publishes: u64,
    received: u64,
}

impl PokeService<'_> {
    /// The `service` field of the server's "space poked" log lines.
    fn log_name(self) -> &'static str {
        match self {
            PokeService::Pusher => "Pusher",
            PokeService::SocketIo(_) => "socket.io",
        }
    }

    /// Starts each name of the service's spaces and clients: both servers share one database.
    fn prefix(self) -> &'static str {
        match self {
            PokeService::Pusher => "",
            PokeService::SocketIo(_) => "sio-",
        }
    }

    async fn sent(self, api: &Api) -> anyhow::Result<PokesSent> {
        Ok(match self {
            PokeService::Pusher => PokesSent {
                calls: api.metric("replisync_pusher_calls_ok_total").await?,
                ..PokesSent::default()
            },
            PokeService::SocketIo(subscriber) => PokesSent {
                calls: api.metric("replisync_socketio_calls_ok_total").await?,
                publishes: api.metric("replisync_socketio_spaces_poked_total").await?,
                received: subscriber.received(),
            },
        })
    }
}

impl PokesSent {
    fn since(self, before: PokesSent) -> PokesSent {
        PokesSent {
            calls: self.calls - before.calls,
            publishes: self.publishes - before.publishes,
            received: self.received - before.received,
        }
    }
}

impl Bench {
    /// The poke workload through sockudo, then through socket.io (one server at a time); each
    /// is skipped, with a note on stderr, when its service is not available.
    pub(crate) async fn poke_workloads(&self, report: &mut Report) -> anyhow::Result<()> {
        if let Some(sockudo) = Sockudo::start().await {
            let server = self.poking_server(Some(&sockudo), &[]).await?;
            report.poke_latency = Some(self.pusher_pokes(&server).await?);
        }
        if let Some(subscriber) = PokeSubscriber::start().await {
            let server = self.poking_server(None, &subscriber.server_env()).await?;
            report.socketio_pokes = Some(self.socketio_pokes(&server, &subscriber).await?);
        }
        Ok(())
    }

    async fn poking_server(
        &self,
        sockudo: Option<&Sockudo>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        let binary = &self.server_binary;
        let secret = self.jwt_secret.as_deref();
        Server::start_with_env(binary, &self.database_url, sockudo, secret, env).await
    }

    /// Latencies, the calls of a poke storm and of the load, through sockudo.
    async fn pusher_pokes(&self, server: &Server) -> anyhow::Result<PokeFigures> {
        let api = self.api.at(server.base.as_str());
        let service = PokeService::Pusher;
        let mut latencies = self.spaced_poke_latencies(server, &api, service).await?;

        // The poke storm: one push, then 1000 pulls at once.
        let poking = Bench {
            api: api.clone(),
            ..self.clone()
        };
        let before = service.sent(&api).await?;
        poking.poke_storm("poked-storm", 1000).await?;
        tokio::time::sleep(SETTLE).await;
        let storm_calls = service.sent(&api).await?.since(before).calls;

        let rounds = self.poke_load_rounds(&api, service).await?;
        Ok(PokeFigures::new(&mut latencies, storm_calls, rounds))
    }

    /// Latencies, and the PUBLISHes of the load, through socket.io's Redis.
    async fn socketio_pokes(
        &self,
        server: &Server,
        subscriber: &PokeSubscriber,
    ) -> anyhow::Result<SocketIoPokeFigures> {
        let api = self.api.at(server.base.as_str());
        let service = PokeService::SocketIo(subscriber);
        let mut latencies = self.spaced_poke_latencies(server, &api, service).await?;
        let rounds = self.poke_load_rounds(&api, service).await?;
        Ok(SocketIoPokeFigures::new(
            subscriber.key(),
            &mut latencies,
            rounds,
        ))
    }

    /// SPACED_POKES one-mutation pushes to one space, POKE_GAP apart so that they do not
    /// coalesce; the latencies from commit to accepted that the server logged for `service`.
    async fn spaced_poke_latencies(
        &self,
        server: &Server,
        api: &Api,
        service: PokeService<'_>,
    ) -> anyhow::Result<Vec<f64>> {
        let prefix = service.prefix();
        let (group, client) = (format!("{prefix}poker-group"), format!("{prefix}poker"));
        let space = format!("{prefix}poked");
        let from_line = server.log_len();
        for id in 1..=SPACED_POKES {
            let body = push_body(&group, &client, id, [increment("n", 1)]);
            api.push(&space, &body).await?;
            tokio::time::sleep(POKE_GAP).await;
        }
        tokio::time::sleep(SETTLE).await;
        Ok(server.poke_latencies_since(from_line, service.log_name()))
    }

    /// `self.repeat` rounds of LOAD_CLIENTS clients pushing to one space (as many pushes as
    /// push workload one-64), each on a fresh space and clients: what each cost the service.
    async fn poke_load_rounds(
        &self,
        api: &Api,
        service: PokeService<'_>,
    ) -> anyhow::Result<Vec<PokeLoadRound>> {
        let total = self.total_pushes(LOAD_CLIENTS);
        let mut rounds = Vec::new();
        for round in 0..self.repeat {
            let name = format!("{}poked-one-64-r{round}", service.prefix());
            let before = service.sent(api).await?;
            let pushed =
                push_workload_on(api, increment, &name, (LOAD_CLIENTS, 1, 1, total)).await?;
            tokio::time::sleep(SETTLE).await;
            let sent = service.sent(api).await?.since(before);
            rounds.push(load_round(&pushed, sent, service));
        }
        Ok(rounds)
    }
}

fn load_round(pushed: &PushFigures, sent: PokesSent, service: PokeService<'_>) -> PokeLoadRound {
    let socketio = matches!(service, PokeService::SocketIo(_));
    PokeLoadRound {
        pushes: pushed.latencies_ms.len(),
        load_s: pushed.elapsed.as_secs_f64(),
        mutations_per_s: pushed.mutations_per_second(),
        calls: sent.calls,
        publishes: socketio.then_some(sent.publishes),
        publishes_received: socketio.then_some(sent.received),
    }
}

/// What the poke figures in `report` say went wrong, one sentence each; empty when all held:
/// a service that did not log the latency of every spaced-out poke, a load round whose calls
/// (or PUBLISHes) did not coalesce, PUBLISHes Redis accepted that the subscriber did not
/// receive (or the reverse).
pub(crate) fn poke_problems(report: &Report) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(pusher) = &report.poke_latency {
        problems.extend(latency_problem("Pusher", pusher.pokes));
        for round in &pusher.push_c64_rounds {
            problems.extend(coalescing_problem("Pusher calls", round.calls, round));
        }
    }
    if let Some(socketio) = &report.socketio_pokes {
        problems.extend(latency_problem("socket.io", socketio.pokes));
        for round in &socketio.push_c64_rounds {
            let publishes = round.publishes.unwrap_or(0);
            problems.extend(coalescing_problem("socket.io PUBLISHes", publishes, round));
            if round.publishes_received != Some(publishes) {
                problems.push(format!(
                    "socket.io: Redis accepted {publishes} PUBLISHes but the subscriber received \
                     {} (a lost or an extra message)",
                    round.publishes_received.unwrap_or(0)
                ));
            }
        }
    }
    problems
}

fn latency_problem(service: &str, pokes: usize) -> Option<String> {
    (pokes as u64 != SPACED_POKES).then(|| {
        format!(
            "{service}: {pokes} of the {SPACED_POKES} spaced-out pokes logged their latency \
             (replisync logs it at debug level, target replisync::poke::delivery)"
        )
    })
}

/// A service's calls start at least one coalescing window after the last one ended, so a load
/// of `load_s` seconds allows `load_s / window + 2` of them at most (the last one after the
/// pushes ended); and some are expected, fewer than the pushes.
fn coalescing_problem(what: &str, sends: u64, round: &PokeLoadRound) -> Option<String> {
    let window = PokerOptions::default().coalesce_window;
    let most = (round.load_s / window.as_secs_f64()).floor() as u64 + 2;
    let coalesced = sends > 0 && sends <= most && (sends as usize) < round.pushes;
    (!coalesced).then(|| {
        format!(
            "{what}: {sends} for {} pushes in {:.2} s; expected from 1 to {most} (one per \
             {window:?} window at most)",
            round.pushes, round.load_s
        )
    })
}
