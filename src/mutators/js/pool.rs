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
    let mut engine = None;
    loop {
        let next = match waiting.lock() {
            Ok(waiting) => waiting.recv(),
            Err(_) => return,
        };
        let Ok(end) = next else { return };
        if engine.is_none() {
            match Engine::new(module.clone(), limits) {
                Ok(new) => engine = Some(new),
                Err(error) => {
                    tracing::error!(%error, "cannot start a JavaScript engine");
                    continue; // dropping the session tells its push
                }
            }
        }
        let served = catch_unwind(AssertUnwindSafe(|| {
            engine.as_mut().expect("created above").serve(end)
        }));
        if served.is_err() {
            tracing::error!("a JavaScript engine panicked; it starts afresh");
            engine = None;
        }
    }
}
