//! Group commit: a queue per busy space, drained by one runner task; pushes that arrive while the
//! space's transaction is busy wait and are applied together in the next one, with one commit.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{Instrument, Span};

use super::apply::{AfterCommit, AgeLimit, GroupAnswers, apply_group};
use super::locking::Locking;
use super::settings::PushLimits;
use super::{Push, PushError, PushOutcome};
use crate::metrics::Metrics;
use crate::mutators::Mutators;
use crate::poke::sinks::Pokes;
use crate::protocol::SpaceId;
use crate::store::{Store, StoreError, reconnecting};

/// How many times a group that lost a race with a concurrent writer is run again.
const CONFLICT_ATTEMPTS: u32 = 8;

/// The pushes waiting for each busy space. A space is in the map while its runner runs.
///
/// Pull coalescing (`pull::coalesce`) batches by key too, with the same panic guarantee, but
/// stays a type of its own: here the first push runs in its caller's task (no task hop on the
/// hot path), each push has its own answer, a group may hand pushes back to the queue, and the
/// waiting count is kept under the lock; a batcher generic enough for both would need a hook
/// for each.
pub struct PushGroups {
    store: Arc<dyn Store>,
    mutators: Arc<Mutators>,
    /// Told of every commit, by the group that made it (whoever waits for the answer).
    pokes: Arc<Pokes>,
    /// What one push may carry and do, and how large a group may grow.
    pub(super) limits: PushLimits,
    /// Time a push spends running mutators before it commits what it applied.
    pub(super) work_budget: Duration,
    pub(super) metrics: Arc<Metrics>,
    waiting: Mutex<HashMap<SpaceId, VecDeque<Waiting>>>,
}

impl std::fmt::Debug for PushGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushGroups")
            .field("mutators", &self.mutators)
            .field("pokes", &self.pokes)
            .field("limits", &self.limits)
            .field("work_budget", &self.work_budget)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

/// A push waiting for its group, and where its answer goes.
struct Waiting {
    push: Push,
    answer: oneshot::Sender<Result<PushOutcome, PushError>>,
    /// When it joined the queue, for `replisync_push_group_wait_seconds` (`None` once a group
    /// handed it back: its wait is counted once).
    queued_at: Option<Instant>,
    /// The pusher's span (the group's parent, or a link), and the wait's, closed as it ends.
    traced: (Span, Span),
}

impl PushGroups {
    pub fn new(
        store: Arc<dyn Store>,
        mutators: Arc<Mutators>,
        pokes: Arc<Pokes>,
        limits: PushLimits,
        work_budget: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<PushGroups> {
        Arc::new(PushGroups {
            store,
            mutators,
            pokes,
            limits,
            work_budget,
            metrics,
            waiting: Mutex::default(),
        })
    }

    /// Applies `push` to `space`. When the space is idle, the caller applies it itself, alone
    /// (no task hop); pushes that arrive meanwhile wait, and a runner task takes them when it is
    /// done (or dropped: a push whose caller went away is rolled back, the waiting ones are not
    /// lost). When the space is busy, the push waits for the runner's next group, and is applied
    /// even if the caller stops waiting.
    pub(super) async fn apply_in_group(
        self: &Arc<Self>,
        space: &SpaceId,
        push: Push,
    ) -> Result<PushOutcome, PushError> {
        let (answer, answered) = oneshot::channel();
        let traced = (Span::current(), tracing::debug_span!("push.group_wait"));
        let lead = {
            let mut queues = self.waiting();
            match queues.entry(space.clone()) {
                Entry::Occupied(mut queue) => {
                    // Counted under the lock, so the runner cannot take the push out first.
                    self.metrics.pushes_waiting.add(1);
                    queue.get_mut().push_back(Waiting {
                        push,
                        answer,
                        queued_at: Some(Instant::now()),
                        traced,
                    });
                    None
                }
                Entry::Vacant(idle) => {
                    idle.insert(VecDeque::new()); // busy from now on
                    drop(traced); // no wait
                    Some(push)
                }
            }
        };
        if let Some(push) = lead {
            self.metrics.push_group_wait.observe(Duration::ZERO);
            let _hand_off = HandOff {
                groups: Arc::clone(self),
                space: space.clone(),
            };
            let mut answers = self.apply(space, std::slice::from_ref(&push)).await;
            self.count(space, &answers);
            return answers
                .pop()
                .flatten()
                .expect("a group's first push is always answered");
        }
        answered.await.unwrap_or(Err(PushError::GroupFailed))
    }

    /// Counts a group and its commits in `/metrics`, and pokes again for pushes that were
    /// resends of applied ones (the group's own commit, if any, poked already).
    fn count(&self, space: &SpaceId, answers: &GroupAnswers) {
        let applied = answers.iter().flatten().count() as u64;
        self.metrics.push_groups.increment();
        self.metrics.push_group_pushes.observe(applied as usize);
        if applied > 1 {
            self.metrics.pushes_grouped.add(applied);
        }
        let mut replayed = false;
        for answer in answers.iter().flatten() {
            match answer {
                Ok(PushOutcome::Committed { partial, .. }) => {
                    self.metrics.push_commits.increment();
                    if partial.is_some() {
                        self.metrics.push_partial.increment();
                    }
                }
                Ok(PushOutcome::Replayed) => replayed = true,
                _ => {}
            }
        }
        if replayed {
            self.pokes.space_changed(space, std::time::Instant::now());
        }
    }

    /// Once the space's current push or group is done: the space is idle again, or a runner
    /// takes the pushes that wait.
    fn hand_off(self: &Arc<Self>, space: &SpaceId) {
        let mut queues = self.waiting();
        if queues.get(space).is_none_or(VecDeque::is_empty) {
            queues.remove(space);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // The runtime is gone (the process is stopping): the waiting pushes are answered
            // with an error as their senders drop.
            let dropped = queues.remove(space).map_or(0, |queue| queue.len());
            self.metrics.pushes_waiting.sub(dropped as u64);
            return;
        };
        drop(queues);
        let runner = Runner {
            groups: Arc::clone(self),
            space: space.clone(),
            finished: false,
        };
        runtime.spawn(runner.run());
    }

    /// Whether pushes wait for `space`'s next group.
    fn others_waiting(&self, space: &SpaceId) -> bool {
        self.waiting()
            .get(space)
            .is_some_and(|queue| !queue.is_empty())
    }

    fn waiting(&self) -> MutexGuard<'_, HashMap<SpaceId, VecDeque<Waiting>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next group of `space`, or `None` (and the space leaves the map) when none waits.
    fn next_group(&self, space: &SpaceId) -> Option<Vec<Waiting>> {
        let mut waiting = self.waiting();
        let queue = waiting.get_mut(space)?;
        if queue.is_empty() {
            waiting.remove(space);
            return None;
        }
        let size = queue.len().min(self.limits.group.max_pushes.max(1));
        self.metrics.pushes_waiting.sub(size as u64);
        let group: Vec<Waiting> = queue.drain(..size).collect();
        for queued_at in group.iter().filter_map(|waiting| waiting.queued_at) {
            self.metrics.push_group_wait.observe_since(queued_at);
        }
        Some(group)
    }

    /// Puts pushes a group left (in order) back at the head of the space's queue.
    fn requeue(&self, space: &SpaceId, left: Vec<Waiting>) {
        let mut waiting = self.waiting();
        self.metrics.pushes_waiting.add(left.len() as u64);
        let queue = waiting.entry(space.clone()).or_default();
        for waiting in left.into_iter().rev() {
            queue.push_front(waiting);
        }
    }

    /// Applies a group: optimistically first, then under the space's lock after a conflict;
    /// again at once on a dead connection. When the database fails the group for another reason,
    /// each push runs alone, so that only the push that must fail fails.
    async fn apply(&self, space: &SpaceId, pushes: &[Push]) -> GroupAnswers {
        match self.apply_with_retries(space, pushes).await {
            Ok(answers) => answers,
            Err(error) if pushes.len() > 1 && error.may_be_one_callers_fault() => {
                tracing::info!(%error, pushes = pushes.len(), "push group failed; applying its pushes one by one");
                let mut answers = Vec::with_capacity(pushes.len());
                for push in pushes {
                    let alone = self
                        .apply_with_retries(space, std::slice::from_ref(push))
                        .await;
                    answers.push(match alone {
                        Ok(mut answer) => answer.pop().flatten(),
                        Err(error) => Some(Err(error.into())),
                    });
                }
                answers
            }
            Err(error) => pushes
                .iter()
                .map(|_| Some(Err(error.clone().into())))
                .collect(),
        }
    }

    async fn apply_with_retries(
        &self,
        space: &SpaceId,
        pushes: &[Push],
    ) -> Result<GroupAnswers, StoreError> {
        let (store, mutators, pokes) = (&*self.store, &*self.mutators, &self.pokes);
        let others_waiting = || self.others_waiting(space);
        let limit = AgeLimit {
            max_age: self.limits.group.max_age,
            others_waiting: &others_waiting,
        };
        let mut attempt = 1;
        loop {
            // The first attempt takes no lock; a group that lost a race then takes it.
            let locking = if attempt == 1 {
                Locking::Optimistic
            } else {
                Locking::Pessimistic
            };
            let applied = reconnecting(|| {
                let after_commit = AfterCommit {
                    pokes,
                    commit_time: &self.metrics.push_commit,
                };
                apply_group(store, mutators, after_commit, space, pushes, locking, limit)
            })
            .await;
            match applied {
                Err(StoreError::Conflict(cause)) if attempt < CONFLICT_ATTEMPTS => {
                    self.metrics.push_conflicts.increment();
                    tracing::debug!(attempt, %cause, "push group met a concurrent writer; running it again");
                    if attempt > 1 {
                        tokio::time::sleep(conflict_backoff(attempt)).await;
                    }
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

fn conflict_backoff(attempt: u32) -> Duration {
    let base_ms = 2u64 << attempt.min(6);
    Duration::from_millis(base_ms + rand::random_range(0..base_ms))
}

/// The task that applies one space's groups until its queue is empty. If it ends any other way
/// (a panic), the space leaves the map and its waiting pushes are answered with an error.
struct Runner {
    groups: Arc<PushGroups>,
    space: SpaceId,
    finished: bool,
}

impl Runner {
    async fn run(mut self) {
        while let Some(group) = self.groups.next_group(&self.space) {
            let pushers: Vec<Span> = group.iter().map(|w| w.traced.0.clone()).collect();
            let (pushes, answers): (Vec<Push>, Vec<_>) =
                group.into_iter().map(|w| (w.push, w.answer)).unzip();
            let span = group_span(&pushers);
            let results = self
                .groups
                .apply(&self.space, &pushes)
                .instrument(span)
                .await;
            self.groups.count(&self.space, &results);
            let mut left = Vec::new();
            let answered = pushes.into_iter().zip(answers).zip(pushers);
            for (((push, answer), pusher), result) in answered.zip(results) {
                match result {
                    Some(result) => {
                        let _ = answer.send(result); // the caller may have stopped waiting
                    }
                    None => {
                        let wait = tracing::debug_span!(parent: &pusher, "push.group_wait");
                        let traced = (pusher, wait);
                        left.push(Waiting {
                            push,
                            answer,
                            queued_at: None,
                            traced,
                        });
                    }
                }
            }
            if !left.is_empty() {
                self.groups.requeue(&self.space, left);
            }
        }
        self.finished = true; // the queue left the map with its last group
    }
}

/// A runner's group: a child of its first push's span, linked to the others' (one push, one trace).
fn group_span(pushers: &[Span]) -> Span {
    let Some((first, others)) = pushers.split_first() else {
        return Span::none();
    };
    let span = tracing::debug_span!(parent: first, "push.group", pushes = pushers.len() as i64);
    for other in others {
        span.follows_from(other);
    }
    span
}

/// Hands a space on when the push its caller applied itself is done, or dropped.
struct HandOff {
    groups: Arc<PushGroups>,
    space: SpaceId,
}

impl Drop for HandOff {
    fn drop(&mut self) {
        self.groups.hand_off(&self.space);
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // A panic: dropping the queue answers its pushes with an error.
        let orphaned = self.groups.waiting().remove(&self.space);
        if let Some(orphaned) = orphaned {
            self.groups
                .metrics
                .pushes_waiting
                .sub(orphaned.len() as u64);
            tracing::error!(
                space = self.space.as_str(),
                pushes = orphaned.len(),
                "push runner failed; its waiting pushes are answered with an error"
            );
        }
    }
}
