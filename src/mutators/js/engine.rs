//! One JavaScript engine: a QuickJS runtime on its own thread, under a memory limit and a
//! per-mutation deadline, running one push's mutations at a time in a context of their own.
//!
//! Each space gets a context of its own (a realm: its own globals), in which the app's module is
//! evaluated, so nothing a mutator leaves behind reaches another space. The engine keeps the
//! contexts of the spaces it served lately for their next pushes (loading one costs more than
//! the push), within REPLISYNC_MUTATOR_CONTEXTS_MB of what the runtime holds, the least recently
//! used dropped first; not one the module failed to load in; a stopped mutation (time or memory)
//! always gets a fresh one; a new runtime starts with none. `tx` reads block this thread on the
//! push, which answers from its open transaction.
//!
//! The code it runs is untrusted: a mutation that ran out of memory fails even if it caught the
//! error, and leaves a new runtime behind; a runtime that still holds much after a push is
//! collected, or replaced; a failure is described within the mutation's time limit; a `tx` only
//! works while its own mutation runs. When no context can be made for a push, the push fails as
//! the server's fault (nothing written) rather than failing its mutations.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rquickjs::promise::PromiseState;
use rquickjs::{
    CatchResultExt, CaughtError, Context, Ctx, Function, Module, Object, Persistent, Promise,
    Runtime, Value, WriteOptions,
};

use super::allocator::{LimitedAllocator, MemoryGauge};
use super::contexts::{KeptContexts, SpaceContext};
use super::describe::describe;
use super::host::{Link, fail_every_call, host_object};
use super::imports::RefuseImports;
use super::messages::{Call, EngineEnd, FromEngine, RunError};
use crate::metrics::Gauge;
use crate::mutators::{MutationWrites, ScriptError, ScriptFailure};

/// The shim, as a module whose default export is the function that builds the `tx` API.
const SHIM_MODULE: &str = concat!("export default ", include_str!("shim.js"), ";\n");
const SHIM_MODULE_NAME: &str = "replisync:tx-shim";

/// Native stack QuickJS may use (deep recursion throws a RangeError past it); engine threads get
/// a larger stack of their own.
const MAX_JS_STACK_BYTES: usize = 1024 * 1024;
pub(super) const ENGINE_THREAD_STACK_BYTES: usize = 8 * 1024 * 1024;

/// The runtime's garbage collection runs when it holds this much more than after the last one
/// (QuickJS's own rule), but at least at this size.
const MIN_GC_THRESHOLD_BYTES: usize = 256 * 1024;

/// The app's module: its name in error messages (the file's path) and its source; and the
/// shim, compiled once (parsing it again for each context cost more than the rest of a context).
pub(super) struct ModuleSource {
    pub name: String,
    pub source: String,
    shim_bytecode: Vec<u8>,
}

impl ModuleSource {
    pub(super) fn new(name: String, source: String) -> Result<ModuleSource, String> {
        Ok(ModuleSource {
            name,
            source,
            shim_bytecode: compile_shim()
                .map_err(|e| format!("cannot compile the tx shim: {e}"))?,
        })
    }
}

/// The shim's bytecode, compiled in a runtime of its own.
fn compile_shim() -> rquickjs::Result<Vec<u8>> {
    let runtime = Runtime::new()?;
    let context = Context::full(&runtime)?;
    context.with(|ctx| {
        Module::declare(ctx, SHIM_MODULE_NAME, SHIM_MODULE)?.write(WriteOptions::default())
    })
}

/// The shim's function, from its bytecode, in `ctx`.
#[allow(unsafe_code)]
fn shim_function<'js>(ctx: &Ctx<'js>, bytecode: &[u8]) -> rquickjs::Result<Function<'js>> {
    // SAFETY: `bytecode` is what `compile_shim` wrote with this same QuickJS, never anything
    // from outside; it is read with QuickJS's ROM flag (its buffers used in place), and it lives
    // in the engine's `ModuleSource`, which the engine drops after its runtime.
    let declared = unsafe { Module::load(ctx.clone(), bytecode)? };
    let (module, evaluated) = declared.eval()?;
    evaluated.finish::<()>()?;
    module.namespace()?.get("default")
}

/// What bounds one mutation's run.
#[derive(Clone, Copy, Debug)]
pub(super) struct EngineLimits {
    pub timeout: Duration,
    pub memory_bytes: usize,
    /// What the runtime may hold between pushes, its kept contexts included (at most half of
    /// `memory_bytes` counts).
    pub contexts_bytes: usize,
}

/// A QuickJS runtime with its limits. Not `Send`: it lives and dies on one thread.
pub(super) struct Engine {
    /// The contexts of the spaces served lately. Declared before `runtime`: they must be
    /// dropped first (a context or value outliving its runtime aborts the process).
    kept: KeptContexts,
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
    /// What the last context made took of the runtime (the module loaded in it).
    context_bytes: usize,
    /// Contexts kept, summed over engines, and this engine's share of it.
    kept_gauge: Gauge,
    kept_reported: usize,
}

/// The module's mutators and the shim's `makeTx`, in one context.
struct Loaded<'js> {
    make_tx: Function<'js>,
    mutators: Object<'js>,
}

/// How serving a push's calls in a context ended.
enum Served {
    /// The push let the session go: the context may serve the space's next push.
    SessionEnded,
    /// A mutation was stopped (time or memory): its context is dropped, and the push's next
    /// call is `pending`, for a fresh context.
    Stopped { pending: Option<Box<Call>> },
}

impl Engine {
    /// An engine for `module`; `kept_gauge` counts the contexts it keeps.
    pub(super) fn new(
        module: Arc<ModuleSource>,
        limits: EngineLimits,
        kept_gauge: Gauge,
    ) -> Result<Engine, String> {
        let deadline = Rc::new(Cell::new(None::<Instant>));
        let interrupted = Rc::new(Cell::new(false));
        let (runtime, gauge) = new_runtime(&limits, &deadline, &interrupted)?;
        Ok(Engine {
            kept: KeptContexts::default(),
            runtime,
            gauge,
            module,
            limits,
            deadline,
            interrupted,
            last_tx_token: Cell::new(0),
            ran_out_of_memory: Cell::new(false),
            context_bytes: 0,
            kept_gauge,
            kept_reported: 0,
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
        self.serve_session(end);
        self.report_kept();
    }

    fn serve_session(&mut self, end: EngineEnd) {
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
                Served::SessionEnded if space.loaded.is_ok() => self.kept.keep(space),
                // A module that failed to load (its top-level code threw) is loaded afresh.
                Served::SessionEnded => drop(space),
                Served::Stopped { pending } => {
                    drop(space);
                    next = pending.map(|call| *call);
                }
            }
            self.tidy_up();
        }
    }

    /// The context for `space`: the kept one, else a new one. When none can be made, the kept
    /// contexts are dropped and the runtime collected, then replaced, before giving up.
    fn context_for(&mut self, space: &str) -> Result<SpaceContext, String> {
        if let Some(kept) = self.kept.take(space) {
            return Ok(kept);
        }
        let first_error = match self.space_context(space) {
            Ok(fresh) => return Ok(fresh),
            Err(error) => error,
        };
        self.kept.clear(); // the memory may be needed
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
    /// owns, is replaced; one past its bound for kept contexts drops the least recently used;
    /// one that still holds more than half its limit is replaced. Collection is set to run
    /// before the limit.
    fn tidy_up(&mut self) {
        if self.ran_out_of_memory.replace(false) || self.runtime.is_job_pending() {
            self.renew_runtime();
            return;
        }
        let high = self.limits.memory_bytes / 2;
        self.keep_within(self.limits.contexts_bytes.min(high));
        if self.gauge.held() > high {
            self.renew_runtime();
            return;
        }
        self.runtime
            .set_gc_threshold(gc_threshold(self.gauge.held()));
    }

    /// When the runtime holds more than `bound`, collects, then drops the least recently used
    /// contexts until it holds three quarters of `bound` (so that the next pushes' garbage does
    /// not call for a collection each), as many at a time as should do it.
    fn keep_within(&mut self, bound: usize) {
        if self.gauge.held() <= bound {
            return;
        }
        self.runtime.run_gc();
        let target = bound / 4 * 3;
        while self.gauge.held() > target && !self.kept.is_empty() {
            let excess = self.gauge.held() - target;
            let count = excess.div_ceil(self.context_bytes.max(1)).max(1);
            self.kept.drop_oldest(count);
            self.runtime.run_gc();
        }
    }

    /// Tells the gauge of kept contexts how many this engine keeps now.
    fn report_kept(&mut self) {
        let now = self.kept.len();
        if now > self.kept_reported {
            self.kept_gauge.add((now - self.kept_reported) as u64);
        } else {
            self.kept_gauge.sub((self.kept_reported - now) as u64);
        }
        self.kept_reported = now;
    }

    /// A new runtime in place of this one (its contexts dropped first).
    fn renew_runtime(&mut self) {
        self.kept.clear();
        match new_runtime(&self.limits, &self.deadline, &self.interrupted) {
            Ok((runtime, gauge)) => {
                self.runtime = runtime;
                self.gauge = gauge;
            }
            Err(error) => tracing::error!(%error, "cannot renew a JavaScript runtime"),
        }
    }

    /// A new context for `space`, with the module loaded in it. Fails when the context cannot
    /// be made, or the module cannot be loaded for want of memory or time (the runtime's or the
    /// machine's fault, not the module's: it loaded at start-up); the push then fails whole and
    /// is sent again, where a failed mutation would count as processed.
    fn space_context(&mut self, space: &str) -> Result<SpaceContext, String> {
        self.gauge.take_refused();
        let held_before = self.gauge.held();
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
            && matches!(error.reason, ScriptFailure::Memory | ScriptFailure::Timeout)
        {
            return Err(format!(
                "cannot load the mutators module: {}",
                error.message
            ));
        }
        self.context_bytes = self.gauge.held().saturating_sub(held_before);
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
                    pending: Some(Box::new(call)),
                };
            }
            let last = call.last;
            let (result, writes) = match &loaded {
                Ok(loaded) => self.run(ctx, loaded, &space.link, call),
                Err(error) => (Err(error.clone()), Some(call.writes)),
            };
            let stopped = matches!(&result, Err(e) if e.reason != ScriptFailure::Threw);
            let result = result.map_err(RunError::Script);
            space.link.send(FromEngine::Done(result, writes));
            let next = if last { None } else { space.link.next_call() };
            match next {
                None if stopped => return Served::Stopped { pending: None },
                None => return Served::SessionEnded,
                Some(next) if stopped => {
                    return Served::Stopped {
                        pending: Some(Box::new(next)),
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
            let shim = shim_function(ctx, &self.module.shim_bytecode)?;
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
    /// works until it ends, no longer. Returns how it ended, and its writes.
    fn run<'js>(
        &self,
        ctx: &Ctx<'js>,
        loaded: &Loaded<'js>,
        link: &Link,
        call: Call,
    ) -> (Result<(), ScriptError>, Option<MutationWrites>) {
        let Call {
            name,
            args,
            client_id,
            mutation_id,
            user_id,
            space_id,
            known,
            writes,
            writable,
            last: _,
        } = call;
        let token = self.last_tx_token.get() + 1;
        self.last_tx_token.set(token);
        link.start_tx(token, known, writes, writable);
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
        let writes = link.end_tx();
        self.deadline.set(None);
        if matches!(&outcome, Err(e) if e.reason == ScriptFailure::Memory) {
            self.ran_out_of_memory.set(true);
        }
        (outcome, writes)
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

impl Drop for Engine {
    fn drop(&mut self) {
        self.kept.clear();
        self.report_kept();
    }
}

/// A runtime under `limits`, whose interrupt handler stops code past `deadline` and which refuses
/// every import, and the gauge of what it holds.
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
    runtime.set_loader(RefuseImports, RefuseImports);
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
