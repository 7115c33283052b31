//! The engines: a fixed number of threads, each owning one JavaScript runtime. A push opens a
//! session, which the next free engine takes up and serves until the push lets it go.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use super::engine::{ENGINE_THREAD_STACK_BYTES, Engine, EngineLimits, ModuleSource};
use super::messages::{EngineEnd, PushEnd, session};

pub(super) struct EnginePool {
    /// Sessions waiting for an engine. Dropping the pool lets every engine thread end.
    sessions: Sender<EngineEnd>,
}

impl EnginePool {
    /// Starts `engines` threads, each with a runtime ready for `module`.
    pub(super) fn start(
        module: Arc<ModuleSource>,
        limits: EngineLimits,
        engines: usize,
    ) -> std::io::Result<EnginePool> {
        let (sessions, waiting) = channel::<EngineEnd>();
        let waiting = Arc::new(Mutex::new(waiting));
        for number in 0..engines.max(1) {
            let (module, waiting) = (module.clone(), waiting.clone());
            std::thread::Builder::new()
                .name(format!("replisync-js-{number}"))
                .stack_size(ENGINE_THREAD_STACK_BYTES)
                .spawn(move || engine_thread(module, limits, waiting))?;
        }
        Ok(EnginePool { sessions })
    }

    /// A new session, queued for the next free engine; `None` once the engines are gone.
    pub(super) fn open_session(&self) -> Option<PushEnd> {
        let (push_end, engine_end) = session();
        self.sessions.send(engine_end).ok()?;
        Some(push_end)
    }
}

/// Serves sessions one after another until the pool is dropped. A panic (a bug) costs the
/// session it happened in, not the engine.
fn engine_thread(
    module: Arc<ModuleSource>,
    limits: EngineLimits,
    waiting: Arc<Mutex<Receiver<EngineEnd>>>,
) {
    serve_sessions(
        &waiting,
        || Engine::new(module.clone(), limits),
        |engine, end| engine.serve(end),
    );
}

/// Takes the sessions `waiting` holds, one at a time, serving each with `serve` on an engine
/// `start` made (once, then again after a panic or a failed start, for the next session) until
/// the pool is dropped. A session whose engine panicked or could not start is dropped, which
/// tells its push.
fn serve_sessions<E>(
    waiting: &Mutex<Receiver<EngineEnd>>,
    mut start: impl FnMut() -> Result<E, String>,
    mut serve: impl FnMut(&mut E, EngineEnd),
) {
    let mut engine = None;
    loop {
        let next = match waiting.lock() {
            Ok(waiting) => waiting.recv(),
            Err(_) => return,
        };
        let Ok(end) = next else { return };
        if engine.is_none() {
            match start() {
                Ok(new) => engine = Some(new),
                Err(error) => {
                    tracing::error!(%error, "cannot start a JavaScript engine");
                    continue; // dropping the session tells its push
                }
            }
        }
        let served = catch_unwind(AssertUnwindSafe(|| {
            serve(engine.as_mut().expect("started above"), end);
        }));
        if served.is_err() {
            tracing::error!("a JavaScript engine panicked; it starts afresh");
            engine = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::messages::{FromEngine, PushEnd, RunError, session};
    use super::*;

    /// Queues `count` sessions and closes the queue; returns the pushes' ends.
    fn queued(count: usize) -> (Mutex<Receiver<EngineEnd>>, Vec<PushEnd>) {
        let (sessions, waiting) = channel();
        let pushes = (0..count)
            .map(|_| {
                let (push_end, engine_end) = session();
                sessions.send(engine_end).unwrap();
                push_end
            })
            .collect();
        (Mutex::new(waiting), pushes)
    }

    /// Serves a session by answering its push with the engine's generation.
    fn answer(generation: &mut u32, end: EngineEnd) {
        let message = format!("generation {generation}");
        let _ = end
            .to_push
            .send(FromEngine::Done(Err(RunError::Engine(message))));
    }

    fn answered(push: &mut PushEnd) -> Option<String> {
        match push.from_engine.try_recv() {
            Ok(FromEngine::Done(Err(RunError::Engine(message)))) => Some(message),
            _ => None,
        }
    }

    #[test]
    fn an_engine_that_panics_loses_its_session_and_the_next_gets_a_new_engine() {
        let (waiting, mut pushes) = queued(3);
        let mut started = 0;
        serve_sessions(
            &waiting,
            || {
                started += 1;
                Ok(started)
            },
            |generation, end| {
                assert!(
                    *generation != 1,
                    "engine 1 panics on its first session, as the test asks"
                );
                answer(generation, end);
            },
        );
        assert_eq!(started, 2, "one engine, then one more after the panic");
        assert_eq!(
            answered(&mut pushes[0]),
            None,
            "the panicked session is dropped"
        );
        assert!(
            pushes[0].to_engine.is_closed(),
            "its push sees the session end"
        );
        assert_eq!(answered(&mut pushes[1]).as_deref(), Some("generation 2"));
        assert_eq!(answered(&mut pushes[2]).as_deref(), Some("generation 2"));
    }

    #[test]
    fn an_engine_that_cannot_start_drops_the_session_and_is_tried_again() {
        let (waiting, mut pushes) = queued(2);
        let mut attempts = 0;
        serve_sessions(
            &waiting,
            || {
                attempts += 1;
                if attempts == 1 {
                    Err("no memory for a runtime".to_owned())
                } else {
                    Ok(attempts)
                }
            },
            answer,
        );
        assert_eq!(answered(&mut pushes[0]), None);
        assert!(pushes[0].to_engine.is_closed());
        assert_eq!(answered(&mut pushes[1]).as_deref(), Some("generation 2"));
    }
}
