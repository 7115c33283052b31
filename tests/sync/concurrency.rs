//! Concurrent pushes never fail and never lose an increment; every pull is internally
//! consistent while writers push. Bounded in count (and by the test runner's timeout).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use replisync::push::settings::GroupLimits;
use replisync::startup::App;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::faults::{Fault, Faulty};
use crate::group_commit::groups_of;
use crate::harness::{Backend, PullView, StoreOptions, TestServer, inc, push_body, wait_until};

const GROUPS: usize = 12;
const CLIENTS_PER_GROUP: usize = 2;
const PUSHES_PER_CLIENT: u64 = 15;
const MUTATIONS_PER_PUSH: u64 = 2;

async fn concurrent_increments_all_land_exactly_once(backend: Backend) {
    // At the default group age limit (50 ms), a loaded machine cuts pushes short (503
    // PartiallyApplied), which these writers, unlike Replicache, do not push again.
    let groups = groups_of(GroupLimits::default().max_pushes);
    let server = Arc::new(TestServer::start_with(backend, App::builder().push(groups)).await);
    let mut writers = Vec::new();
    for g in 0..GROUPS {
        for c in 0..CLIENTS_PER_GROUP {
            let server = server.clone();
            writers.push(tokio::spawn(async move {
                let (group, client) = (format!("group-{g}"), format!("client-{g}-{c}"));
                let mut next_id = 1;
                for _ in 0..PUSHES_PER_CLIENT {
                    let mutations: Vec<_> = (0..MUTATIONS_PER_PUSH)
                        .map(|i| (client.as_str(), next_id + i, "increment", inc("total", 1)))
                        .collect();
                    let (status, body) =
                        server.push("shared", &push_body(&group, &mutations)).await;
                    assert_eq!(
                        (status, &body),
                        (200, &json!({})),
                        "a concurrent push failed"
                    );
                    next_id += MUTATIONS_PER_PUSH;
                }
            }));
        }
    }
    for writer in writers {
        writer.await.expect("writer finished");
    }

    let per_client = PUSHES_PER_CLIENT * MUTATIONS_PER_PUSH;
    let mut total_seen = None;
    for g in 0..GROUPS {
        let view = server.state("shared", &format!("group-{g}")).await;
        for c in 0..CLIENTS_PER_GROUP {
            assert_eq!(view.lmid(&format!("client-{g}-{c}")), per_client);
        }
        assert_eq!(
            view.last_mutation_ids.len(),
            CLIENTS_PER_GROUP,
            "only this group's clients"
        );
        total_seen = Some(view.entries["total"].clone());
        assert_eq!(
            view.cookie,
            (GROUPS * CLIENTS_PER_GROUP) as u64 * PUSHES_PER_CLIENT
        );
    }
    let expected = (GROUPS * CLIENTS_PER_GROUP) as u64 * per_client;
    assert_eq!(total_seen, Some(json!(expected)));
}

/// Two tabs of one client group push the same pending mutations, and a client retries while
/// its first push is still running: the same push arrives many times at once. Each mutation
/// must apply exactly once, whichever copy wins the space's lock.
async fn the_same_push_sent_many_times_at_once_applies_once(backend: Backend) {
    const COPIES: usize = 8;
    const ROUNDS: u64 = 10;
    let server = Arc::new(TestServer::start(backend).await);
    for round in 0..ROUNDS {
        // Each round re-sends every earlier mutation too, as Replicache does until a pull
        // acknowledges them.
        let mutations: Vec<_> = (1..=round + 1)
            .map(|id| ("client", id, "increment", inc("n", 1)))
            .collect();
        let body = Arc::new(push_body("group", &mutations));
        let copies: Vec<_> = (0..COPIES)
            .map(|_| {
                let (server, body) = (server.clone(), body.clone());
                tokio::spawn(async move { server.push("space", &body).await })
            })
            .collect();
        for copy in copies {
            let (status, body) = copy.await.expect("push task finished");
            assert_eq!((status, &body), (200, &json!({})), "round {round}");
        }
        let view = server.state("space", "group").await;
        assert_eq!(view.entries["n"], json!(round + 1), "round {round}");
        assert_eq!(view.lmid("client"), round + 1);
        assert_eq!(
            view.cookie,
            round + 1,
            "one version per round's new mutation"
        );
    }
}

/// Each client increments its own key by one per mutation, so in any consistent pull the
/// value of `count/<client>` equals that client's lastMutationID.
async fn every_pull_is_consistent_while_writers_push(backend: Backend) {
    const WRITERS: usize = 6;
    const PUSHES: u64 = 25;
    let server = Arc::new(TestServer::start(backend).await);
    let writing = Arc::new(AtomicBool::new(true));
    let pulls_checked = Arc::new(AtomicU64::new(0));

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let server = server.clone();
        writers.push(tokio::spawn(async move {
            let (group, client) = (format!("g{w}"), format!("c{w}"));
            let key = format!("count/{client}");
            for id in 1..=PUSHES {
                let body = push_body(&group, &[(client.as_str(), id, "increment", inc(&key, 1))]);
                assert_eq!(server.push("busy", &body).await.0, 200);
            }
        }));
    }

    let mut readers = Vec::new();
    for w in 0..WRITERS {
        let (server, writing, pulls_checked) =
            (server.clone(), writing.clone(), pulls_checked.clone());
        readers.push(tokio::spawn(async move {
            let group = format!("g{w}");
            let client = format!("c{w}");
            let mut incremental = PullView::default();
            let mut cookie = Value::Null;
            // Bounded: stops when writers finish, and after at most 2000 pulls regardless.
            for _ in 0..2000 {
                let still_writing = writing.load(Ordering::Acquire);
                // A first pull from scratch must be consistent...
                let (status, body) = server.pull("busy", &group, Value::Null).await;
                assert_eq!(status, 200, "{body}");
                check_consistent(&PullView::from_response(&body), &client);
                // ...and so must the state built from incremental pulls.
                let (status, body) = server.pull("busy", &group, cookie.clone()).await;
                assert_eq!(status, 200, "{body}");
                incremental.apply(&body);
                cookie = body["cookie"].clone();
                check_consistent(&incremental, &client);
                pulls_checked.fetch_add(2, Ordering::Relaxed);
                if !still_writing {
                    break;
                }
            }
            incremental
        }));
    }

    for writer in writers {
        writer.await.expect("writer finished");
    }
    writing.store(false, Ordering::Release);
    for (w, reader) in readers.into_iter().enumerate() {
        let last = reader.await.expect("reader finished");
        assert_eq!(
            last.lmid(&format!("c{w}")),
            PUSHES,
            "the final pull saw every push"
        );
    }
    assert!(pulls_checked.load(Ordering::Relaxed) > (WRITERS * 2) as u64);
}

fn check_consistent(view: &PullView, client: &str) {
    let lmid = view.lmid(client);
    let count = view
        .entries
        .get(&format!("count/{client}"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    assert_eq!(
        count, lmid,
        "pull at cookie {} says lastMutationID {lmid} but data reflects {count} mutations",
        view.cookie
    );
}

/// Two first pushes of one new client group to two spaces at once: exactly one may own it, and
/// the other is refused having written nothing.
async fn a_new_client_group_is_claimed_by_one_space_only(backend: Backend) {
    const ROUNDS: u64 = 10;
    let server = Arc::new(TestServer::start(backend).await);
    let mut won = std::collections::HashMap::from([("left", 0u64), ("right", 0u64)]);
    for round in 0..ROUNDS {
        let group = format!("contested-{round}");
        let pushes = ["left", "right"].map(|space| {
            let (server, group) = (server.clone(), group.clone());
            tokio::spawn(async move {
                let body = push_body(
                    &group,
                    &[(&format!("{group}-{space}"), 1, "increment", inc("n", 1))],
                );
                (space, server.push(space, &body).await)
            })
        });
        let mut answers = Vec::new();
        for push in pushes {
            answers.push(push.await.unwrap());
        }
        answers.sort_by_key(|(_, (status, _))| *status);
        let [(winner, (won_status, _)), (loser, (lost_status, refusal))] = &answers[..] else {
            unreachable!("two pushes")
        };
        assert_eq!(
            (*won_status, *lost_status),
            (200, 403),
            "round {round}: {answers:?}"
        );
        assert_eq!(refusal["error"], "Forbidden", "round {round}: {refusal}");
        *won.get_mut(winner).unwrap() += 1;
        // The winner's pull sees its own client; the loser's space has no trace of the group.
        let owner = server.state(winner, &group).await;
        assert_eq!(owner.lmid(&format!("{group}-{winner}")), 1, "round {round}");
        assert_eq!(
            owner.last_mutation_ids.get(&format!("{group}-{loser}")),
            None,
            "round {round}: the loser's client was recorded"
        );
    }
    // Every increment that landed is the winner's: the losers added nothing to their space.
    for (space, wins) in won {
        let view = server.state(space, &format!("reader-{space}")).await;
        let n = view.entries.get("n").and_then(Value::as_u64).unwrap_or(0);
        assert_eq!(n, wins, "{space} won {wins} rounds but counts {n}");
    }
}

/// Holds every incremental-pull read until the test opens the gate, so that concurrent pulls
/// pile up behind the first one.
struct GatedPullReads(Arc<Semaphore>);

#[async_trait]
impl Fault for GatedPullReads {
    async fn before_pull_changes(&self) {
        self.0.acquire().await.expect("the gate opens").forget();
    }
}

/// The poke storm: every watcher pulls with the same cookie at once. They share reads, and
/// each still gets exactly its own group's lastMutationIDs.
async fn identical_concurrent_pulls_share_reads(backend: Backend) {
    const WATCHERS: usize = 40;
    let gate = Arc::new(Semaphore::new(0));
    let reads_gate = gate.clone();
    let store = StoreOptions::wrapped(|store| Faulty::wrap(store, GatedPullReads(reads_gate)));
    let server = Arc::new(TestServer::start_on(backend, store, App::builder()).await);
    for w in 0..WATCHERS {
        let body = push_body(
            &format!("g{w}"),
            &[(&format!("c{w}"), 1, "increment", inc("n", 1))],
        );
        assert_eq!(server.push("storm", &body).await.0, 200);
    }
    let cookie = WATCHERS as u64 - 1; // everyone has seen all but the last push
    let reads_before = server.metrics.pull_reads.get();
    let pull = |w: usize| {
        let server = server.clone();
        tokio::spawn(async move { server.pull("storm", &format!("g{w}"), json!(cookie)).await })
    };
    // The first pull's read waits at the gate; the others queue behind it for the next read.
    let mut pulls = vec![pull(0)];
    let metrics = server.metrics.clone();
    wait_until(
        "the first pull's read",
        || metrics.pull_reads.get(),
        |reads| *reads > reads_before,
    )
    .await;
    pulls.extend((1..WATCHERS).map(pull));
    let queued = WATCHERS as u64 - 1;
    wait_until(
        "the other pulls to queue",
        || metrics.pulls_waiting.get(),
        |n| *n == queued,
    )
    .await;
    gate.add_permits(2);
    for (w, pull) in pulls.into_iter().enumerate() {
        let (status, body) = pull.await.unwrap();
        assert_eq!(status, 200);
        let expected_lmids = if w == WATCHERS - 1 {
            json!({"c39": 1})
        } else {
            json!({})
        };
        assert_eq!(body["lastMutationIDChanges"], expected_lmids, "watcher {w}");
        assert_eq!(body["cookie"], json!(WATCHERS));
        assert_eq!(
            body["patch"],
            json!([{"op": "put", "key": "n", "value": WATCHERS}])
        );
    }
    let reads = server.metrics.pull_reads.get() - reads_before;
    assert_eq!(
        reads, 2,
        "{WATCHERS} identical pulls: the first's read, one for the rest"
    );
    assert_eq!(server.metrics.pulls_waiting.get(), 0);
}

crate::on_both_stores!(
    the_same_push_sent_many_times_at_once_applies_once,
    identical_concurrent_pulls_share_reads,
    concurrent_increments_all_land_exactly_once,
    every_pull_is_consistent_while_writers_push,
    a_new_client_group_is_claimed_by_one_space_only,
);
