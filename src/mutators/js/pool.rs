//! The engines: a fixed number of threads, each owning one JavaScript runtime. A push opens a
//! session, which an engine takes up (its space's own engine if free, see `queue`) and serves
//! until the push lets it go.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use super::engine::{ENGINE_THREAD_STACK_BYTES, Engine, EngineLimits, ModuleSource};
use super::messages::{EngineEnd, PushEnd, session};
use super::queue::SessionQueue;
use crate::metrics::Gauge;

pub(super) struct EnginePool {
    /// Sessions waiting for an engine. Dropping the pool closes it, which lets every engine
    /// thread end.
    sessions: Arc<SessionQueue>,
}

impl EnginePool {
    /// Starts `engines` threads, each with a runtime ready for `module`, counting the contexts
    /// they keep in `kept_contexts`.
    pub(super) fn start(
        module: Arc<ModuleSource>,
        limits: EngineLimits,
        engines: usize,
        kept_contexts: &Gauge,
    ) -> std::io::Result<EnginePool> {
        let engines = engines.max(1);
        let sessions = Arc::new(SessionQueue::new(engines));
        let pool = EnginePool {
            sessions: sessions.clone(),
        };
        for number in 0..engines {
            let (module, sessions) = (module.clone(), sessions.clone());
            let kept_contexts = kept_contexts.clone();
            std::thread::Builder::new()
                .name(format!("replisync-js-{number}"))
                .stack_size(ENGINE_THREAD_STACK_BYTES)
                .spawn(move || {
                    serve_sessions(
                        &sessions,
                        number,
                        || Engine::new(module.clone(), limits, kept_contexts.clone()),
                        |engine, end| engine.serve(end),
                    );
                })?;
        }
        Ok(pool)
    }

    /// A new session for a push to `space`, queued for an engine; `None` once the engines are
    /// gone.
    pub(super) fn open_session(&self, space: &str) -> Option<PushEnd> {
        let (push_end, engine_end) = session();
        self.sessions.push(space, engine_end).ok()?;
        Some(push_end)
    }
}

impl Drop for EnginePool {
    fn drop(&mut self) {
        self.sessions.close();
    }
}

/// Tells the queue when its engine thread ends, however it ends.
struct Leaving<'a> {
    sessions: &'a SessionQueue,
    engine: usize,
}

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        self.sessions.leave(self.engine);
    }
}

/// Takes the sessions for engine `number`, one at a time, serving each with `serve` on an
/// engine `start` made (once, then again after a panic or a failed start, for the next session)
/// until the queue is closed and empty. A session whose engine panicked or could not start is
/// dropped, which tells its push.
fn serve_sessions<E>(
    sessions: &SessionQueue,
    number: usize,
    mut start: impl FnMut() -> Result<E, String>,
    mut serve: impl FnMut(&mut E, EngineEnd),
) {
    let _leaving = Leaving {
        sessions,
        engine: number,
    };
    let mut engine = None;
    while let Some(end) = sessions.take(number) {
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

    /// Queues `count` sessions for one engine and closes the queue; returns the pushes' ends.
    fn queued(count: usize) -> (SessionQueue, Vec<PushEnd>) {
        let sessions = SessionQueue::new(1);
        let pushes = (0..count)
            .map(|_| {
                let (push_end, engine_end) = session();
                assert!(sessions.push("s", engine_end).is_ok());
                push_end
            })
            .collect();
        sessions.close();
        (sessions, pushes)
    }

    /// Serves a session by answering its push with the engine's generation.
    fn answer(generation: &mut u32, end: EngineEnd) {
        let message = format!("generation {generation}");
        let _ = end
            .to_push
            .send(FromEngine::Done(Err(RunError::Engine(message)), None));
    }

    fn answered(push: &mut PushEnd) -> Option<String> {
        match push.from_engine.try_recv() {
            Ok(FromEngine::Done(Err(RunError::Engine(message)), _)) => Some(message),
            _ => None,
        }
    }

    #[test]
    fn an_engine_that_panics_loses_its_session_and_the_next_gets_a_new_engine() {
        let (waiting, mut pushes) = queued(3);
        let mut started = 0;
        serve_sessions(
            &waiting,
            0,
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
            0,
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
