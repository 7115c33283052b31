//! One JavaScript engine: a QuickJS runtime on its own thread, under a memory limit and a
//! per-mutation deadline, running one push's mutations at a time in a context of their own.
//!
//! Each space gets a context of its own (a realm: its own globals), in which the app's module is
//! evaluated, so nothing a mutator leaves behind reaches another space. The engine keeps the
//! context of the space it served last for that space's next push (loading one costs more than
//! the push); a stopped mutation (time or memory) always gets a fresh one. `tx` reads block this
//! thread on the push, which answers from its open transaction.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rquickjs::promise::PromiseState;
use rquickjs::{
    CatchResultExt, CaughtError, Context, Ctx, Function, Module, Object, Persistent, Promise,
    Runtime, Value,
};

use super::messages::{Call, EngineEnd, FromEngine, HostReply, HostRequest, ToEngine};
use crate::mutators::{ScriptError, ScriptFailure};

const SHIM: &str = include_str!("shim.js");

/// Native stack QuickJS may use (deep recursion throws a RangeError past it); engine threads get
/// a larger stack of their own.
const MAX_JS_STACK_BYTES: usize = 1024 * 1024;
pub(super) const ENGINE_THREAD_STACK_BYTES: usize = 8 * 1024 * 1024;

/// The app's module: its name in error messages (the file's path) and its source.
pub(super) struct ModuleSource {
    pub name: String,
    pub source: String,
}

/// What bounds one mutation's run.
#[derive(Clone, Copy, Debug)]
pub(super) struct EngineLimits {
    pub timeout: Duration,
    pub memory_bytes: usize,
}

/// A QuickJS runtime with its limits. Not `Send`: it lives and dies on one thread.
pub(super) struct Engine {
    /// The context of the space served last. Declared before `runtime`: it must be dropped
    /// first (a context or value outliving its runtime aborts the process).
    warm: Option<SpaceContext>,
    runtime: Runtime,
    module: Arc<ModuleSource>,
    limits: EngineLimits,
    /// When the running mutation must stop; `None` between mutations.
    deadline: Rc<Cell<Option<Instant>>>,
    /// Set when the deadline stopped the code.
    interrupted: Rc<Cell<bool>>,
}

/// The module's mutators and the shim's `makeTx`, in one context.
struct Loaded<'js> {
    make_tx: Function<'js>,
    mutators: Object<'js>,
}

/// One space's context, with the module loaded (or the error loading it gave), and the link its
/// host functions ask through (attached to each push's session in turn).
struct SpaceContext {
    space: String,
    link: Rc<Link>,
    loaded: Result<(Persistent<Function<'static>>, Persistent<Object<'static>>), ScriptError>,
    context: Context,
}

/// How serving a push's calls in a context ended.
enum Served {
    /// The push let the session go: the context may serve the space's next push.
    SessionEnded,
    /// A mutation was stopped (time or memory): its context is dropped, and the push's next
    /// call is `pending`, for a fresh context.
    Stopped { pending: Option<Call> },
}

impl Engine {
    pub(super) fn new(module: Arc<ModuleSource>, limits: EngineLimits) -> Result<Engine, String> {
        let deadline = Rc::new(Cell::new(None::<Instant>));
        let interrupted = Rc::new(Cell::new(false));
        let runtime = new_runtime(&limits, &deadline, &interrupted)?;
        Ok(Engine {
            warm: None,
            runtime,
            module,
            limits,
            deadline,
            interrupted,
        })
    }

    /// The names of the module's mutators, loading it in a fresh context: a syntax error, a
    /// failing import or top-level code that throws is an error naming the file and line.
    pub(super) fn exported_names(&self) -> Result<Vec<String>, String> {
        let context = Context::full(&self.runtime).map_err(|e| e.to_string())?;
        let names = context.with(|ctx| {
            let loaded = self
                .load(&ctx, &Rc::new(Link::detached()))
                .map_err(|e| e.message)?;
            let names: Vec<String> = loaded
                .mutators
                .keys::<String>()
                .collect::<rquickjs::Result<_>>()
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(names)
        });
        drop(context);
        self.runtime.run_gc();
        names
    }

    /// Serves one push's session until the push drops its end.
    pub(super) fn serve(&mut self, end: EngineEnd) {
        let session = Link::attached(end);
        let mut next = session.next_call();
        while let Some(call) = next.take() {
            let space = match self.warm.take() {
                Some(warm) if warm.space == call.space_id => warm,
                _ => match self.space_context(&call.space_id) {
                    Ok(fresh) => fresh,
                    Err(error) => {
                        fail_every_call(&session, Some(call), &error);
                        return;
                    }
                },
            };
            space.link.attach_from(&session);
            let served = space
                .context
                .with(|ctx| self.serve_calls(&ctx, &space, call));
            space.link.detach_into(&session);
            self.deadline.set(None);
            match served {
                Served::SessionEnded => self.warm = Some(space),
                Served::Stopped { pending } => {
                    drop(space);
                    next = pending;
                }
            }
            if self.runtime.is_job_pending() {
                // Jobs left by a mutation that was stopped belong to no one: start afresh.
                self.warm = None;
                match new_runtime(&self.limits, &self.deadline, &self.interrupted) {
                    Ok(runtime) => self.runtime = runtime,
                    Err(error) => tracing::error!(%error, "cannot renew a JavaScript runtime"),
                }
            }
        }
    }

    /// A new context for `space`, with the module loaded in it.
    fn space_context(&self, space: &str) -> Result<SpaceContext, String> {
        let context = Context::full(&self.runtime)
            .map_err(|error| format!("cannot create a JavaScript context: {error}"))?;
        let link = Rc::new(Link::detached());
        let loaded = context.with(|ctx| {
            self.load(&ctx, &link).map(|loaded| {
                (
                    Persistent::save(&ctx, loaded.make_tx),
                    Persistent::save(&ctx, loaded.mutators),
                )
            })
        });
        Ok(SpaceContext {
            space: space.to_owned(),
            link,
            loaded,
            context,
        })
    }

    /// Runs `first` and the session's next calls in `space`'s context, until the session ends or
    /// a mutation is stopped (time or memory).
    fn serve_calls<'js>(&self, ctx: &Ctx<'js>, space: &SpaceContext, first: Call) -> Served {
        let loaded = match &space.loaded {
            Ok((make_tx, mutators)) => {
                match (make_tx.clone().restore(ctx), mutators.clone().restore(ctx)) {
                    (Ok(make_tx), Ok(mutators)) => Ok(Loaded { make_tx, mutators }),
                    (Err(error), _) | (_, Err(error)) => Err(ScriptError {
                        reason: ScriptFailure::Threw,
                        message: format!("the mutators module is gone from its context: {error}"),
                    }),
                }
            }
            Err(error) => Err(error.clone()),
        };
        let mut call = first;
        loop {
            if call.space_id != space.space {
                return Served::Stopped {
                    pending: Some(call),
                };
            }
            let result = match &loaded {
                Ok(loaded) => self.run(ctx, loaded, call),
                Err(error) => Err(error.clone()),
            };
            let stopped = matches!(&result, Err(e) if e.reason != ScriptFailure::Threw);
            space.link.send(FromEngine::Done(result));
            match space.link.next_call() {
                None => return Served::SessionEnded,
                Some(next) if stopped => {
                    return Served::Stopped {
                        pending: Some(next),
                    };
                }
                Some(next) => call = next,
            }
        }
    }

    /// Evaluates the shim and the app's module in `ctx`, within the time limit.
    fn load<'js>(&self, ctx: &Ctx<'js>, link: &Rc<Link>) -> Result<Loaded<'js>, ScriptError> {
        self.start_clock();
        let result = (|| {
            let shim: Function = ctx.eval(SHIM)?;
            let api: Object = shim.call((host_object(ctx, link)?,))?;
            let (module, evaluated) = Module::declare(
                ctx.clone(),
                self.module.name.as_str(),
                self.module.source.as_str(),
            )?
            .eval()?;
            self.settle(ctx, &evaluated)?;
            let pick: Function = api.get("pickMutators")?;
            let mutators: Object = pick.call((module.namespace()?,))?;
            Ok(Loaded {
                make_tx: api.get("makeTx")?,
                mutators,
            })
        })()
        .catch(ctx);
        self.deadline.set(None);
        result.map_err(|caught| self.failure(caught))
    }

    /// Runs one mutation: its promise settled, and every job it started finished.
    fn run<'js>(
        &self,
        ctx: &Ctx<'js>,
        loaded: &Loaded<'js>,
        call: Call,
    ) -> Result<(), ScriptError> {
        let Call {
            name,
            args,
            client_id,
            mutation_id,
            user_id,
            space_id,
        } = call;
        self.start_clock();
        let result = (|| {
            let mutator: Value = loaded.mutators.get(name.as_str())?;
            let Some(mutator) = mutator.into_function() else {
                return Err(rquickjs::Exception::throw_type(
                    ctx,
                    &format!("the module has no mutator named {name:?}"),
                ));
            };
            let tx: Value =
                loaded
                    .make_tx
                    .call((client_id, mutation_id as f64, user_id, space_id))?;
            let args = ctx.json_parse(args)?;
            let returned: Value = mutator.call((tx, args))?;
            if let Some(promise) = returned.into_promise() {
                self.settle(ctx, &promise)?;
            }
            // Writes a mutator started without awaiting them still belong to it.
            while ctx.execute_pending_job() {
                if self.interrupted.get() {
                    break;
                }
            }
            Ok(())
        })()
        .catch(ctx);
        let interrupted = self.interrupted.get();
        self.deadline.set(None);
        match result {
            Ok(()) if !interrupted => Ok(()),
            Ok(()) => Err(self.timeout_error()),
            Err(caught) => Err(self.failure(caught)),
        }
    }

    /// Runs jobs until `promise` settles; a rejection is thrown into `ctx`.
    fn settle<'js>(&self, ctx: &Ctx<'js>, promise: &Promise<'js>) -> rquickjs::Result<()> {
        loop {
            match promise.state() {
                PromiseState::Resolved => return Ok(()),
                PromiseState::Rejected => {
                    return promise
                        .result::<Value>()
                        .unwrap_or(Ok(Value::new_undefined(ctx.clone())))
                        .map(drop);
                }
                PromiseState::Pending => {
                    if !ctx.execute_pending_job() || self.interrupted.get() {
                        if self.interrupted.get() {
                            return Err(rquickjs::Exception::throw_internal(ctx, "interrupted"));
                        }
                        return Err(rquickjs::Exception::throw_message(
                            ctx,
                            "its promise never settled (it awaited something that never happens)",
                        ));
                    }
                }
            }
        }
    }

    fn start_clock(&self) {
        self.interrupted.set(false);
        self.deadline
            .set(Some(Instant::now() + self.limits.timeout));
    }

    fn timeout_error(&self) -> ScriptError {
        ScriptError {
            reason: ScriptFailure::Timeout,
            message: format!(
                "ran longer than {} ms (REPLISYNC_MUTATOR_TIMEOUT_MS)",
                self.limits.timeout.as_millis()
            ),
        }
    }

    /// Why the code failed: the deadline, the memory limit, or what it threw.
    fn failure(&self, caught: CaughtError<'_>) -> ScriptError {
        if self.interrupted.get() {
            return self.timeout_error();
        }
        let description = describe(&caught);
        if description.contains("out of memory")
            || matches!(caught, CaughtError::Error(rquickjs::Error::Allocation))
        {
            return ScriptError {
                reason: ScriptFailure::Memory,
                message: format!(
                    "allocated more than {} MB (REPLISYNC_MUTATOR_MEMORY_MB)",
                    self.limits.memory_bytes / (1024 * 1024)
                ),
            };
        }
        ScriptError {
            reason: ScriptFailure::Threw,
            message: description,
        }
    }
}

/// A runtime under `limits`, whose interrupt handler stops code past `deadline`.
fn new_runtime(
    limits: &EngineLimits,
    deadline: &Rc<Cell<Option<Instant>>>,
    interrupted: &Rc<Cell<bool>>,
) -> Result<Runtime, String> {
    let runtime = Runtime::new().map_err(|e| format!("cannot start a JavaScript runtime: {e}"))?;
    runtime.set_memory_limit(limits.memory_bytes);
    runtime.set_max_stack_size(MAX_JS_STACK_BYTES);
    let (deadline, interrupted) = (deadline.clone(), interrupted.clone());
    runtime.set_interrupt_handler(Some(Box::new(move || match deadline.get() {
        Some(at) if Instant::now() >= at => {
            interrupted.set(true);
            true
        }
        _ => false,
    })));
    Ok(runtime)
}

/// What was thrown, for a log line: `TypeError: message (at file:line:column)`.
fn describe(caught: &CaughtError<'_>) -> String {
    match caught {
        CaughtError::Exception(exception) => {
            let name: Option<String> = exception.get("name").ok();
            let message = exception.message().unwrap_or_default();
            let mut text = match name {
                Some(name) if !name.is_empty() => format!("{name}: {message}"),
                _ => message,
            };
            if let Some(place) = exception.stack().as_deref().and_then(first_frame) {
                text.push_str(&format!(" ({place})"));
            }
            text
        }
        CaughtError::Value(value) => {
            let ctx = value.ctx();
            match ctx.json_stringify(value.clone()) {
                Ok(Some(text)) => format!(
                    "threw {}",
                    text.to_string().unwrap_or_else(|_| "a value".into())
                ),
                _ => format!("threw {}", value.type_name()),
            }
        }
        CaughtError::Error(error) => error.to_string(),
    }
}

/// `at name (file:line:column)` → `at file:line:column`, from the first frame of a stack.
fn first_frame(stack: &str) -> Option<String> {
    let line = stack
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("at "))?;
    let place = match (line.find('('), line.rfind(')')) {
        (Some(open), Some(close)) if open < close => &line[open + 1..close],
        _ => line.trim_start_matches("at ").trim(),
    };
    Some(format!("at {place}"))
}

/// The engine's link to the push it serves: the channels of the push's session, attached to a
/// space's context for as long as it serves the push.
struct Link {
    to_push: RefCell<tokio::sync::mpsc::UnboundedSender<FromEngine>>,
    from_push: RefCell<tokio::sync::mpsc::UnboundedReceiver<ToEngine>>,
}

impl Link {
    /// A link to no push (a context between pushes, or loading the module at start-up).
    fn detached() -> Link {
        let (to_push, _) = tokio::sync::mpsc::unbounded_channel();
        let (_, from_push) = tokio::sync::mpsc::unbounded_channel();
        Link {
            to_push: RefCell::new(to_push),
            from_push: RefCell::new(from_push),
        }
    }

    /// A link to the push at the other `end`.
    fn attached(end: EngineEnd) -> Link {
        Link {
            to_push: RefCell::new(end.to_push),
            from_push: RefCell::new(end.from_push),
        }
    }

    /// Takes `session`'s channels (leaving it detached).
    fn attach_from(&self, session: &Link) {
        self.to_push.swap(&session.to_push);
        self.from_push.swap(&session.from_push);
    }

    /// Gives the channels back to `session` (leaving this link detached).
    fn detach_into(&self, session: &Link) {
        self.to_push.swap(&session.to_push);
        self.from_push.swap(&session.from_push);
    }

    fn send(&self, message: FromEngine) {
        let _ = self.to_push.borrow().send(message);
    }

    /// The push's next mutation; `None` when the push let the session go.
    fn next_call(&self) -> Option<Call> {
        loop {
            match self.from_push.borrow_mut().blocking_recv()? {
                ToEngine::Run(call) => return Some(call),
                ToEngine::Reply(_) => continue, // an answer nobody waits for
            }
        }
    }

    /// Asks the push for a read or write and waits for its answer.
    fn ask(&self, request: HostRequest) -> HostReply {
        if self
            .to_push
            .borrow()
            .send(FromEngine::Host(request))
            .is_err()
        {
            return Err("the push has ended".into());
        }
        match self.from_push.borrow_mut().blocking_recv() {
            Some(ToEngine::Reply(reply)) => reply,
            Some(ToEngine::Run(_)) => Err("the push sent a mutation while one was running".into()),
            None => Err("the push has ended".into()),
        }
    }
}

/// Answers `first` and every later call of a session with `message`, until the push drops it.
fn fail_every_call(session: &Link, first: Option<Call>, message: &str) {
    let mut next = first;
    while next.is_some() {
        session.send(FromEngine::Done(Err(ScriptError {
            reason: ScriptFailure::Memory,
            message: message.to_owned(),
        })));
        next = session.next_call();
    }
}

/// The host functions the shim builds `tx` on: `get`, `has`, `scan`, `put` and `del`, each a
/// synchronous request to the push.
fn host_object<'js>(ctx: &Ctx<'js>, link: &Rc<Link>) -> rquickjs::Result<Object<'js>> {
    let host = Object::new(ctx.clone())?;
    let l = link.clone();
    host.set(
        "get",
        Function::new(ctx.clone(), move |ctx: Ctx<'js>, key: String| {
            answer(&ctx, l.ask(HostRequest::Get(key)))
        })?,
    )?;
    let l = link.clone();
    host.set(
        "has",
        Function::new(ctx.clone(), move |ctx: Ctx<'js>, key: String| {
            answer(&ctx, l.ask(HostRequest::Has(key))).map(|text| text.as_deref() == Some("true"))
        })?,
    )?;
    let l = link.clone();
    host.set(
        "scan",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, prefix: String, start: String, exclusive: bool, limit: f64| {
                let limit = if limit.is_finite() && limit > 0.0 {
                    limit as usize
                } else {
                    0
                };
                let request = HostRequest::Scan {
                    prefix,
                    start,
                    exclusive,
                    limit,
                };
                answer(&ctx, l.ask(request)).map(|text| text.unwrap_or_else(|| "[]".into()))
            },
        )?,
    )?;
    let l = link.clone();
    host.set(
        "put",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, key: String, value: String| {
                answer(&ctx, l.ask(HostRequest::Put(key, value))).map(drop)
            },
        )?,
    )?;
    let l = link.clone();
    host.set(
        "del",
        Function::new(ctx.clone(), move |ctx: Ctx<'js>, key: String| {
            answer(&ctx, l.ask(HostRequest::Del(key))).map(|text| text.as_deref() == Some("true"))
        })?,
    )?;
    Ok(host)
}

/// A reply as the host function's result, or an `Error` thrown in JavaScript.
fn answer(ctx: &Ctx<'_>, reply: HostReply) -> rquickjs::Result<Option<String>> {
    reply.map_err(|message| rquickjs::Exception::throw_message(ctx, &message))
}
