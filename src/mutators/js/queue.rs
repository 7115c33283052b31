//! The sessions waiting for an engine. Each space has an engine of its own choice (by a hash of
//! its id), which keeps its context warm: a free engine takes the sessions of its own spaces
//! first, then those whose engine has been busy for longer than loading a context takes, so no
//! session waits long while an engine is free. Only an engine that has a session to take is woken.

use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::messages::EngineEnd;

/// Sessions waiting, and which engines are busy. Shared by the pool and its engine threads.
pub(super) struct SessionQueue {
    state: Mutex<QueueState>,
    /// Per engine: rung when there is a session for it to take.
    wake: Vec<Condvar>,
}

/// How long a session waits for its own engine, busy, before a free engine takes it. Its own
/// engine has its space's context; another loads one (about 0.4 ms), while a session usually
/// frees its engine within a fraction of that.
const WAIT_FOR_OWN_ENGINE: Duration = Duration::from_millis(1);

struct Waiting {
    /// The engine its space prefers.
    engine: usize,
    since: Instant,
    end: EngineEnd,
}

struct QueueState {
    /// Oldest first.
    waiting: VecDeque<Waiting>,
    /// Per engine: serving a session (or gone), so that its spaces' sessions go to another.
    busy: Vec<bool>,
    /// Per engine: gone (its thread ended), so that its spaces' sessions go to another at once.
    gone: Vec<bool>,
    /// No more sessions come: the engines take what waits, in any order, then stop.
    closed: bool,
}

impl SessionQueue {
    pub(super) fn new(engines: usize) -> SessionQueue {
        SessionQueue {
            state: Mutex::new(QueueState {
                waiting: VecDeque::new(),
                busy: vec![false; engines.max(1)],
                gone: vec![false; engines.max(1)],
                closed: false,
            }),
            wake: (0..engines.max(1)).map(|_| Condvar::new()).collect(),
        }
    }

    /// Queues a session for `space`; gives it back once the queue is closed.
    pub(super) fn push(&self, space: &str, end: EngineEnd) -> Result<(), EngineEnd> {
        let mut state = self.lock();
        if state.closed {
            return Err(end);
        }
        let engine = engine_for(space, state.busy.len());
        let since = Instant::now();
        state.waiting.push_back(Waiting { engine, since, end });
        self.wake_free_engines(&state);
        Ok(())
    }

    /// The next session for `engine`, which is free (waits for one); `None` once the queue is
    /// closed and empty. The engine counts as busy until it asks again.
    pub(super) fn take(&self, engine: usize) -> Option<EngineEnd> {
        let mut state = self.lock();
        state.busy[engine] = false;
        loop {
            let now = Instant::now();
            if let Some(at) = state.pick(engine, now) {
                let Waiting { end, .. } = state.waiting.remove(at).expect("picked from the queue");
                state.busy[engine] = true;
                self.wake_free_engines(&state); // this engine's spaces may now go to another
                return Some(end);
            }
            if state.closed && state.waiting.is_empty() {
                return None;
            }
            let wake = &self.wake[engine];
            state = match state.next_to_take_over(now) {
                Some(at) => {
                    let timeout = at.saturating_duration_since(now);
                    match wake.wait_timeout(state, timeout) {
                        Ok((state, _)) => state,
                        Err(poisoned) => poisoned.into_inner().0,
                    }
                }
                None => wake
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            };
        }
    }

    /// `engine` serves no more (its thread is ending): its spaces' sessions go to others.
    pub(super) fn leave(&self, engine: usize) {
        let mut state = self.lock();
        state.busy[engine] = true;
        state.gone[engine] = true;
        self.wake_free_engines(&state);
    }

    /// No more sessions: the engines serve those waiting, then stop.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.wake.iter().for_each(Condvar::notify_all);
    }

    /// Wakes each free engine that has a session to take, now or once it has waited for its
    /// busy engine long enough (called with the state locked, so that an engine cannot miss it
    /// between looking and waiting).
    fn wake_free_engines(&self, state: &QueueState) {
        for (engine, wake) in self.wake.iter().enumerate() {
            let concerned = state
                .waiting
                .iter()
                .any(|w| w.engine == engine || state.busy[w.engine]);
            if !state.busy[engine] && concerned {
                wake.notify_one();
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // The state is consistent at every unlock: a panic elsewhere does not spoil it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl QueueState {
    /// Where the session `engine` should take waits: the oldest of its own spaces, else the
    /// oldest whose engine is gone, or busy for [`WAIT_FOR_OWN_ENGINE`] of its wait (any, once
    /// closed).
    fn pick(&self, engine: usize, now: Instant) -> Option<usize> {
        let own = self.waiting.iter().position(|w| w.engine == engine);
        own.or_else(|| {
            self.waiting.iter().position(|w| {
                self.closed
                    || self.gone[w.engine]
                    || (self.busy[w.engine] && now >= w.since + WAIT_FOR_OWN_ENGINE)
            })
        })
    }

    /// When the first session whose engine is busy may be taken over by another.
    fn next_to_take_over(&self, now: Instant) -> Option<Instant> {
        let first = self.waiting.iter().find(|w| self.busy[w.engine])?;
        Some((first.since + WAIT_FOR_OWN_ENGINE).max(now))
    }
}

/// The engine `space` prefers, of `engines`.
fn engine_for(space: &str, engines: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    space.hash(&mut hasher);
    (hasher.finish() % engines as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::super::messages::{FromEngine, PushEnd, session};
    use super::*;

    /// A space that prefers `engine` of `engines`.
    fn space_of(engine: usize, engines: usize) -> String {
        (0..)
            .map(|n| format!("space-{n}"))
            .find(|space| engine_for(space, engines) == engine)
            .unwrap()
    }

    /// Queues a session for `space`; answers its push's end, by which a test tells sessions apart.
    fn queue_for(queue: &SessionQueue, space: &str) -> PushEnd {
        let (push_end, engine_end) = session();
        assert!(queue.push(space, engine_end).is_ok());
        push_end
    }

    /// Whether `taken` is the session of `push`: what its engine end sends, `push` receives.
    fn is_session_of(taken: &EngineEnd, push: &mut PushEnd) -> bool {
        let _ = taken.to_push.send(FromEngine::Done(Ok(()), None));
        matches!(push.from_engine.try_recv(), Ok(FromEngine::Done(Ok(()), _)))
    }

    #[test]
    fn a_free_engine_takes_its_own_spaces_first_then_those_of_a_busy_engine() {
        let queue = SessionQueue::new(2);
        let (of_0, of_1) = (space_of(0, 2), space_of(1, 2));
        let mut first_of_1 = queue_for(&queue, &of_1);
        let taken = queue
            .take(1)
            .expect("engine 1 takes its own space's session");
        assert!(is_session_of(&taken, &mut first_of_1));

        // Engine 1 is busy: engine 0 takes its own space's session before the older one of 1.
        let mut second_of_1 = queue_for(&queue, &of_1);
        let queued = Instant::now();
        let mut of_0_push = queue_for(&queue, &of_0);
        let taken = queue.take(0).unwrap();
        assert!(is_session_of(&taken, &mut of_0_push), "its own first");
        let taken = queue.take(0).unwrap();
        assert!(
            is_session_of(&taken, &mut second_of_1),
            "then one whose engine is busy"
        );
        assert!(
            queued.elapsed() >= WAIT_FOR_OWN_ENGINE,
            "once it waited for its own engine for a while"
        );
    }

    #[test]
    fn the_sessions_of_a_busy_engine_wait_for_it_a_moment_before_another_takes_them() {
        let queue = SessionQueue::new(2);
        let of_1 = space_of(1, 2);
        let _first = queue_for(&queue, &of_1);
        queue.take(1).expect("engine 1 is busy from now on");
        let now = Instant::now();
        let mut second = queue_for(&queue, &of_1);
        let state = queue.lock();
        assert_eq!(state.pick(0, now), None, "not at once");
        let later = now + WAIT_FOR_OWN_ENGINE + Duration::from_millis(1);
        assert_eq!(state.pick(0, later), Some(0), "after a while");
        drop(state);
        let taken = queue
            .take(1)
            .expect("its own engine, once free, takes it at once");
        assert!(is_session_of(&taken, &mut second));
    }

    #[test]
    fn a_closed_queue_hands_out_what_waits_then_ends() {
        let queue = SessionQueue::new(2);
        let mut push = queue_for(&queue, &space_of(1, 2));
        queue.close();
        let (_, late) = session();
        assert!(queue.push("late", late).is_err(), "closed to new sessions");
        let taken = queue.take(0).expect("what waits, whatever its engine");
        assert!(is_session_of(&taken, &mut push));
        assert!(queue.take(0).is_none());
    }

    #[test]
    fn the_sessions_of_an_engine_that_left_go_to_another() {
        let queue = SessionQueue::new(2);
        queue.leave(1);
        let mut push = queue_for(&queue, &space_of(1, 2));
        let taken = queue.take(0).unwrap();
        assert!(is_session_of(&taken, &mut push));
    }
}
