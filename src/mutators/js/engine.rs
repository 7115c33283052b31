//! One JavaScript engine: a QuickJS runtime on its own thread, under a memory limit and a
//! per-mutation deadline, running one push's mutations at a time in a context of their own.
//!
//! Each space gets a context of its own (a realm: its own globals), in which the app's module is
//! evaluated, so nothing a mutator leaves behind reaches another space. The engine keeps the
//! context of the space it served last for that space's next push (loading one costs more than
//! the push); a stopped mutation (time or memory) always gets a fresh one. `tx` reads block this
//! thread on the push, which answers from its open transaction.
//!
//! The code it runs is untrusted: a mutation that ran out of memory fails even if it caught the
//! error, and leaves a new runtime behind; a runtime that still holds much after a push is
//! collected, or replaced; a failure is described within the mutation's time limit; a `tx` only
//! works while its own mutation runs. When no context can be made for a push, the push fails as
//! the server's fault (nothing written) rather than failing its mutations.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rquickjs::promise::PromiseState;
use rquickjs::{
    CatchResultExt, CaughtError, Context, Ctx, Function, Module, Object, Persistent, Promise,
    Runtime, Value,
};

use super::allocator::{LimitedAllocator, MemoryGauge};
use super::messages::{Call, EngineEnd, FromEngine, HostReply, HostRequest, RunError, ToEngine};
use crate::mutators::{ScriptError, ScriptFailure};

const SHIM: &str = include_str!("shim.js");

/// Native stack QuickJS may use (deep recursion throws a RangeError past it); engine threads get
/// a larger stack of their own.
const MAX_JS_STACK_BYTES: usize = 1024 * 1024;
pub(super) const ENGINE_THREAD_STACK_BYTES: usize = 8 * 1024 * 1024;

/// Most bytes of a failure's description (what was thrown can be megabytes long).
const MAX_DESCRIPTION_BYTES: usize = 1000;

/// The runtime's garbage collection runs when it holds this much more than after the last one
/// (QuickJS's own rule), but at least at this size.
const MIN_GC_THRESHOLD_BYTES: usize = 256 * 1024;

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
    /// What `runtime` holds, and whether it was refused memory.
    gauge: Rc<MemoryGauge>,
    module: Arc<ModuleSource>,
    limits: EngineLimits,
    /// When the running mutation must stop; `None` between mutations.
    deadline: Rc<Cell<Option<Instant>>>,
    /// Set when the deadline stopped the code.
    interrupted: Rc<Cell<bool>>,
    /// The token of the last mutation started: each gets a new one, which its `tx` carries.
    last_tx_token: Cell<u64>,
    /// Set when a mutation ran out of memory: the runtime is replaced before the next one.
    ran_out_of_memory: Cell<bool>,
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
        let (runtime, gauge) = new_runtime(&limits, &deadline, &interrupted)?;
        Ok(Engine {
            warm: None,
            runtime,
            gauge,
            module,
            limits,
            deadline,
            interrupted,
            last_tx_token: Cell::new(0),
            ran_out_of_memory: Cell::new(false),
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
            let space = match self.context_for(&call.space_id) {
                Ok(space) => space,
                Err(fault) => {
                    tracing::error!(%fault, "a JavaScript engine cannot serve a push");
                    fail_every_call(&session, Some(call), &fault);
                    return;
                }
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
            self.tidy_up();
        }
    }

    /// The context for `space`: the warm one if it is this space's, else a new one. When none
    /// can be made, the runtime is collected, then replaced, before giving up.
    fn context_for(&mut self, space: &str) -> Result<SpaceContext, String> {
        match self.warm.take() {
            Some(warm) if warm.space == space => return Ok(warm),
            other => drop(other), // before making another: the memory may be needed
        }
        let first_error = match self.space_context(space) {
            Ok(fresh) => return Ok(fresh),
            Err(error) => error,
        };
        self.runtime.run_gc();
        if let Ok(fresh) = self.space_context(space) {
            return Ok(fresh);
        }
        self.renew_runtime();
        self.space_context(space).map_err(|error| {
            format!(
                "no JavaScript context could be made for the push ({first_error}; in a new runtime: {error}); nothing was written and the client will retry; if this lasts, raise REPLISYNC_MUTATOR_MEMORY_MB"
            )
        })
    }

    /// After a push's context served: a runtime that ran out of memory, or holds jobs no one
    /// owns, is replaced; one that still holds more than half its limit is collected (its warm
    /// context dropped if need be), else replaced. Collection is set to run before the limit.
    fn tidy_up(&mut self) {
        if self.ran_out_of_memory.replace(false) || self.runtime.is_job_pending() {
            self.renew_runtime();
            return;
        }
        let high = self.limits.memory_bytes / 2;
        if self.gauge.held() > high {
            self.runtime.run_gc();
        }
        if self.gauge.held() > high && self.warm.take().is_some() {
            self.runtime.run_gc();
        }
        if self.gauge.held() > high {
            self.renew_runtime();
            return;
        }
        self.runtime
            .set_gc_threshold(gc_threshold(self.gauge.held()));
    }

    /// A new runtime in place of this one (its contexts dropped first).
    fn renew_runtime(&mut self) {
        self.warm = None;
        match new_runtime(&self.limits, &self.deadline, &self.interrupted) {
            Ok((runtime, gauge)) => {
                self.runtime = runtime;
                self.gauge = gauge;
            }
            Err(error) => tracing::error!(%error, "cannot renew a JavaScript runtime"),
        }
    }

    /// A new context for `space`, with the module loaded in it. Fails when the context cannot
    /// be made, or the module cannot be loaded for want of memory (the runtime's fault, not the
    /// module's: it loaded at start-up).
    fn space_context(&self, space: &str) -> Result<SpaceContext, String> {
        self.gauge.take_refused();
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
        if let Err(error) = &loaded
            && error.reason == ScriptFailure::Memory
        {
            return Err(format!(
                "cannot load the mutators module: {}",
                error.message
            ));
        }
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
                Ok(loaded) => self.run(ctx, loaded, &space.link, call),
                Err(error) => Err(error.clone()),
            };
            let stopped = matches!(&result, Err(e) if e.reason != ScriptFailure::Threw);
            space
                .link
                .send(FromEngine::Done(result.map_err(RunError::Script)));
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
        let outcome = self.outcome(ctx, result);
        self.deadline.set(None);
        outcome
    }

    /// Runs one mutation: its promise settled, and every job it started finished. Its `tx`
    /// works until it ends, no longer.
    fn run<'js>(
        &self,
        ctx: &Ctx<'js>,
        loaded: &Loaded<'js>,
        link: &Link,
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
        let token = self.last_tx_token.get() + 1;
        self.last_tx_token.set(token);
        link.live_tx.set(token);
        self.start_clock();
        let result = (|| {
            let mutator: Value = loaded.mutators.get(name.as_str())?;
            let Some(mutator) = mutator.into_function() else {
                return Err(rquickjs::Exception::throw_type(
                    ctx,
                    &format!("the module has no mutator named {name:?}"),
                ));
            };
            let tx: Value = loaded.make_tx.call((
                token as f64,
                client_id,
                mutation_id as f64,
                user_id,
                space_id,
            ))?;
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
        let outcome = self.outcome(ctx, result);
        link.live_tx.set(0);
        self.deadline.set(None);
        if matches!(&outcome, Err(e) if e.reason == ScriptFailure::Memory) {
            self.ran_out_of_memory.set(true);
        }
        outcome
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
        self.gauge.take_refused();
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

    fn memory_error(&self) -> ScriptError {
        ScriptError {
            reason: ScriptFailure::Memory,
            message: format!(
                "allocated more than {} MB (REPLISYNC_MUTATOR_MEMORY_MB)",
                self.limits.memory_bytes / (1024 * 1024)
            ),
        }
    }

    /// How the code ended, called while its deadline still runs (describing what it threw may
    /// run its getters): past the memory limit (even if the code caught the error), past the
    /// deadline, or with what it threw.
    fn outcome<'js, T>(
        &self,
        ctx: &Ctx<'js>,
        result: Result<T, CaughtError<'js>>,
    ) -> Result<T, ScriptError> {
        if self.gauge.take_refused() {
            return Err(self.memory_error());
        }
        if self.interrupted.get() {
            return Err(self.timeout_error());
        }
        let caught = match result {
            Ok(value) => return Ok(value),
            Err(caught) => caught,
        };
        let description = describe(&caught);
        let _ = ctx.catch(); // what a getter threw while being described
        if self.gauge.take_refused() || description.contains("out of memory") {
            return Err(self.memory_error());
        }
        if self.interrupted.get() {
            return Err(self.timeout_error());
        }
        Err(ScriptError {
            reason: ScriptFailure::Threw,
            message: description,
        })
    }
}

/// A runtime under `limits`, whose interrupt handler stops code past `deadline`, and the gauge
/// of what it holds.
fn new_runtime(
    limits: &EngineLimits,
    deadline: &Rc<Cell<Option<Instant>>>,
    interrupted: &Rc<Cell<bool>>,
) -> Result<(Runtime, Rc<MemoryGauge>), String> {
    let gauge = Rc::new(MemoryGauge::default());
    let allocator = LimitedAllocator::new(limits.memory_bytes, gauge.clone());
    let runtime = Runtime::new_with_alloc(allocator)
        .map_err(|e| format!("cannot start a JavaScript runtime: {e}"))?;
    runtime.set_max_stack_size(MAX_JS_STACK_BYTES);
    runtime.set_gc_threshold(gc_threshold(gauge.held()));
    let (deadline, interrupted) = (deadline.clone(), interrupted.clone());
    runtime.set_interrupt_handler(Some(Box::new(move || match deadline.get() {
        Some(at) if Instant::now() >= at => {
            interrupted.set(true);
            true
        }
        _ => false,
    })));
    Ok((runtime, gauge))
}

/// When the runtime's next garbage collection runs, for a runtime holding `held` bytes. QuickJS
/// sets it to half as much again as what a collection left; after one near the memory limit
/// that is past the limit, and no collection would run again.
fn gc_threshold(held: usize) -> usize {
    (held + held / 2).max(MIN_GC_THRESHOLD_BYTES)
}

/// What was thrown, for a log line: `TypeError: message (at file:line:column)`, at most
/// [`MAX_DESCRIPTION_BYTES`]. Reading it may run the code's getters: call it before the deadline
/// is cleared.
fn describe(caught: &CaughtError<'_>) -> String {
    let text = match caught {
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
    };
    bounded(text)
}

/// `text` cut to [`MAX_DESCRIPTION_BYTES`] (at a character boundary, marked with `…`).
fn bounded(mut text: String) -> String {
    if text.len() > MAX_DESCRIPTION_BYTES {
        let mut end = MAX_DESCRIPTION_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
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
    /// The token of the `tx` of the mutation running in this context (0: none runs). A `tx`
    /// with another token belongs to a mutation that has ended.
    live_tx: Cell<u64>,
}

impl Link {
    /// A link to no push (a context between pushes, or loading the module at start-up).
    fn detached() -> Link {
        let (to_push, _) = tokio::sync::mpsc::unbounded_channel();
        let (_, from_push) = tokio::sync::mpsc::unbounded_channel();
        Link {
            to_push: RefCell::new(to_push),
            from_push: RefCell::new(from_push),
            live_tx: Cell::new(0),
        }
    }

    /// A link to the push at the other `end`.
    fn attached(end: EngineEnd) -> Link {
        Link {
            to_push: RefCell::new(end.to_push),
            from_push: RefCell::new(end.from_push),
            live_tx: Cell::new(0),
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

    /// Asks the push for a read or write on behalf of the `tx` holding `token`, and waits for
    /// its answer. A `tx` kept past its mutation is refused.
    fn ask(&self, token: f64, request: HostRequest) -> HostReply {
        if token != self.live_tx.get() as f64 || token == 0.0 {
            return Err(
                "this tx belongs to a mutation that has ended: use the tx passed to the running mutator, and do not keep it"
                    .into(),
            );
        }
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

/// Answers `first` and every later call of a session with the engine's `fault`, until the push
/// drops it.
fn fail_every_call(session: &Link, first: Option<Call>, fault: &str) {
    let mut next = first;
    while next.is_some() {
        session.send(FromEngine::Done(Err(RunError::Engine(fault.to_owned()))));
        next = session.next_call();
    }
}

/// The host functions the shim builds `tx` on: `get`, `has`, `scan`, `put` and `del`, each a
/// synchronous request to the push, made with the token of the `tx` that asks.
fn host_object<'js>(ctx: &Ctx<'js>, link: &Rc<Link>) -> rquickjs::Result<Object<'js>> {
    let host = Object::new(ctx.clone())?;
    let l = link.clone();
    host.set(
        "get",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, token: f64, key: String| {
                answer(&ctx, l.ask(token, HostRequest::Get(key)))
            },
        )?,
    )?;
    let l = link.clone();
    host.set(
        "has",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, token: f64, key: String| {
                answer(&ctx, l.ask(token, HostRequest::Has(key)))
                    .map(|text| text.as_deref() == Some("true"))
            },
        )?,
    )?;
    let l = link.clone();
    host.set(
        "scan",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>,
                  token: f64,
                  prefix: String,
                  start: String,
                  exclusive: bool,
                  limit: f64| {
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
                answer(&ctx, l.ask(token, request)).map(|text| text.unwrap_or_else(|| "[]".into()))
            },
        )?,
    )?;
    let l = link.clone();
    host.set(
        "put",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, token: f64, key: String, value: String| {
                answer(&ctx, l.ask(token, HostRequest::Put(key, value))).map(drop)
            },
        )?,
    )?;
    let l = link.clone();
    host.set(
        "del",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, token: f64, key: String| {
                answer(&ctx, l.ask(token, HostRequest::Del(key)))
                    .map(|text| text.as_deref() == Some("true"))
            },
        )?,
    )?;
    Ok(host)
}

/// A reply as the host function's result, or an `Error` thrown in JavaScript.
fn answer(ctx: &Ctx<'_>, reply: HostReply) -> rquickjs::Result<Option<String>> {
    reply.map_err(|message| rquickjs::Exception::throw_message(ctx, &message))
}
