//! The app's own mutators, written in JavaScript (REPLISYNC_MUTATORS): the module the client
//! imports, loaded at start-up and run by a pool of embedded QuickJS engines, in the push's
//! transaction.
//!
//! Each exported mutator is registered as a [`Mutator`]. A push opens a session with a free
//! engine at its first JavaScript mutation and keeps it to its last (in its space's own
//! JavaScript context: nothing carries over from another space); while a mutator runs, the push
//! answers its `tx` reads from its open transaction and buffers its writes like any mutator's.

#[allow(unsafe_code)] // the allocator hook QuickJS calls is an unsafe trait
mod allocator;
mod contexts;
mod describe;
mod engine;
mod host;
mod imports;
mod messages;
mod pool;
mod queue;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use serde_json::Value;

use self::engine::{Engine, EngineLimits, ModuleSource};
use self::messages::{Call, FromEngine, HostReply, HostRequest, PushEnd, RunError, ToEngine};
use self::pool::EnginePool;
use crate::metrics::{Gauge, MutationMetrics};
use crate::mutators::read_hints::ReadHints;
use crate::mutators::{MutationError, MutationWrites, Mutator, Mutators, ScanRange, WriteTx};
use crate::store::StoreError;

/// The bounds on JavaScript mutators.
#[derive(Clone, Copy, Debug)]
pub struct JsLimits {
    /// How long one mutation may run, its `tx` reads included.
    pub timeout: Duration,
    /// How much memory an engine may hold while it runs a push's mutations (its module, the
    /// context and what the mutators allocate).
    pub memory_bytes: usize,
    /// Engines (threads), hence pushes running JavaScript at once.
    pub engines: usize,
    /// How much an engine's runtime may hold between pushes, the contexts it keeps for the
    /// spaces it served lately included (the least recently used dropped past it); at most half
    /// of `memory_bytes` counts.
    pub contexts_bytes: usize,
}

impl Default for JsLimits {
    fn default() -> Self {
        JsLimits {
            timeout: Duration::from_millis(1000),
            memory_bytes: 64 * 1024 * 1024,
            engines: std::thread::available_parallelism().map_or(2, |n| n.get()),
            contexts_bytes: 24 * 1024 * 1024,
        }
    }
}

/// Most entries one `tx.scan` read hands the engine (the shim reads pages of 100).
const MAX_SCAN_PAGE: usize = 1000;

/// A loaded JavaScript module and the engines that run its mutators.
pub struct JsMutators {
    names: Vec<String>,
    pool: Arc<EnginePool>,
    module_name: String,
    /// Contexts the engines keep, which `/metrics` shows once registered.
    kept_contexts: Gauge,
}

impl std::fmt::Debug for JsMutators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsMutators")
            .field("names", &self.names)
            .field("module_name", &self.module_name)
            .finish_non_exhaustive()
    }
}

impl JsMutators {
    /// Loads the module at `path`: fails, naming the file (and the line), when it does not
    /// parse, imports another module, throws while loading, or exports no mutator.
    pub fn load(path: &Path, limits: JsLimits) -> anyhow::Result<JsMutators> {
        let source = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the mutators module {}", path.display()))?;
        JsMutators::from_source(&path.display().to_string(), source, limits)
    }

    /// Loads a module from its source; `name` stands for its file in error messages.
    pub fn from_source(name: &str, source: String, limits: JsLimits) -> anyhow::Result<JsMutators> {
        let module =
            Arc::new(ModuleSource::new(name.to_owned(), source).map_err(anyhow::Error::msg)?);
        let engine_limits = EngineLimits {
            timeout: limits.timeout,
            memory_bytes: limits.memory_bytes,
            contexts_bytes: limits.contexts_bytes,
        };
        let names = Engine::new(module.clone(), engine_limits, Gauge::default())
            .and_then(|engine| engine.exported_names())
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("cannot load the mutators module {name}"))?;
        if names.is_empty() {
            anyhow::bail!(
                "the mutators module {name} exports no mutators: export an object of functions \
                 named `mutators` (as passed to new Replicache({{mutators}})), a default object of \
                 functions, or the functions themselves"
            );
        }
        let kept_contexts = Gauge::default();
        let pool = EnginePool::start(module, engine_limits, limits.engines, &kept_contexts)
            .context("cannot start the JavaScript engines")?;
        Ok(JsMutators {
            names,
            pool: Arc::new(pool),
            module_name: name.to_owned(),
            kept_contexts,
        })
    }

    /// The names of the module's mutators.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// `mutators` with every mutator of the module added, and the engines' kept contexts in its
    /// metrics. A name `mutators` already has (such as a built-in `set`, `delete` or
    /// `increment`) is taken over by the module's, with a log line saying so.
    pub fn register(&self, mut mutators: Mutators) -> Mutators {
        mutators.show_js_contexts(self.kept_contexts.clone());
        for name in &self.names {
            if mutators.contains(name) {
                tracing::info!(
                    mutator = %name,
                    module = %self.module_name,
                    "the JavaScript mutator replaces the built-in mutator of the same name"
                );
            }
            let mutator = JsMutator {
                name: name.clone(),
                pool: self.pool.clone(),
                metrics: mutators.metrics().clone(),
                read_hints: mutators.read_hints().clone(),
            };
            mutators = mutators.register(name.clone(), mutator);
        }
        tracing::info!(
            module = %self.module_name,
            mutators = ?self.names,
            "JavaScript mutators loaded"
        );
        mutators
    }
}

/// One mutator of the module, run on the push's engine session.
struct JsMutator {
    name: String,
    pool: Arc<EnginePool>,
    metrics: MutationMetrics,
    /// What its mutations are likely to read: what the push knows of it goes along.
    read_hints: Arc<ReadHints>,
}

/// A push's session with an engine, kept from its first JavaScript mutation to its last.
#[derive(Default)]
struct JsSession(Option<PushEnd>);

#[async_trait]
impl Mutator for JsMutator {
    async fn apply(&self, tx: &mut WriteTx<'_>, args: &Value) -> Result<(), MutationError> {
        let mut session = std::mem::take(tx.push_scoped::<JsSession>());
        let started = Instant::now();
        let result = self.run(&mut session, tx, args).await;
        self.metrics.js_duration().observe_since(started);
        if let Err(MutationError::Store(_)) = &result {
            // The push fails whole (the database, or no engine could run it); the engine
            // learns it when the session is dropped.
            return result;
        }
        *tx.push_scoped::<JsSession>() = session;
        result
    }

    fn kind(&self) -> &'static str {
        "javascript"
    }
}

/// The largest value sent along with a mutation to its engine (a guess may be wrong: a large
/// value goes only when the mutation asks for it).
const MAX_SENT_ALONG_BYTES: usize = 64 * 1024;

impl JsMutator {
    async fn run(
        &self,
        session: &mut JsSession,
        tx: &mut WriteTx<'_>,
        args: &Value,
    ) -> Result<(), MutationError> {
        let end = match &mut session.0 {
            Some(end) => end,
            None => session.0.insert(
                self.pool
                    .open_session(tx.space().as_str())
                    .ok_or_else(engine_gone)?,
            ),
        };
        let known = self.known_entries(tx, args);
        let last = tx.is_last_of_push();
        let (writes, writable) = tx.lend_writes();
        let call = Call {
            name: self.name.clone(),
            args: args.to_string(),
            client_id: tx.client_id().to_owned(),
            mutation_id: tx.mutation_id(),
            user_id: tx.user_id().to_owned(),
            space_id: tx.space().as_str().to_owned(),
            known,
            writes,
            writable,
            last,
        };
        if end.to_engine.send(ToEngine::Run(call)).is_err() {
            session.0 = None;
            return Err(engine_gone());
        }
        loop {
            match end.from_engine.recv().await {
                Some(FromEngine::Done(result, Some(writes))) => {
                    tx.give_back_writes(writes);
                    if last {
                        session.0 = None; // the engine has ended it
                    }
                    return result.map_err(run_error);
                }
                Some(FromEngine::Done(_, None)) => {
                    // Never sent to a push that waits; failing closed all the same.
                    session.0 = None;
                    return Err(engine_gone());
                }
                Some(FromEngine::Host(request)) => {
                    let (reply, writes) = answer(tx, request).await?;
                    let _ = end.to_engine.send(ToEngine::Reply(reply, writes));
                }
                None => {
                    session.0 = None;
                    return Err(engine_gone());
                }
            }
        }
    }

    /// The entries a mutation with `args` is likely to read that the push knows without a read
    /// (but values over [`MAX_SENT_ALONG_BYTES`], which the engine asks for if it reads them).
    fn known_entries(&self, tx: &WriteTx<'_>, args: &Value) -> Vec<(String, Option<String>)> {
        let likely = self.read_hints.keys_of(&self.name, args);
        likely
            .into_iter()
            .filter_map(|key| {
                let value = tx.known(&key)?.map(Value::to_string);
                let small = value
                    .as_ref()
                    .is_none_or(|v| v.len() <= MAX_SENT_ALONG_BYTES);
                small.then_some((key, value))
            })
            .collect()
    }
}

/// A mutation's failure fails the mutation; an engine's fails the push (nothing written, the
/// client retries), since it is not the mutation's doing.
fn run_error(error: RunError) -> MutationError {
    match error {
        RunError::Script(error) => MutationError::Script(error),
        RunError::Engine(fault) => MutationError::Store(StoreError::EngineUnavailable(fault)),
    }
}

fn engine_gone() -> MutationError {
    run_error(RunError::Engine(
        "the JavaScript engine stopped (the server is stopping, or an engine failed); retry the push"
            .into(),
    ))
}

/// Serves a running mutator's read from the push's transaction, and gives back the writes a
/// scan took along. Only a database failure is an `Err` (it fails the push); anything else is
/// thrown in JavaScript.
async fn answer(
    tx: &mut WriteTx<'_>,
    request: HostRequest,
) -> Result<(HostReply, Option<MutationWrites>), MutationError> {
    let (outcome, writes) = match request {
        HostRequest::Get(key) => {
            let value = tx.get(&key).await;
            (
                value.map(|value| value.map(|value| value.to_string())),
                None,
            )
        }
        HostRequest::Has(key) => (tx.has(&key).await.map(|has| Some(has.to_string())), None),
        HostRequest::Scan {
            prefix,
            start,
            exclusive,
            limit,
            writes,
        } => {
            let range = ScanRange {
                prefix,
                start,
                exclusive,
            };
            tx.give_back_writes(writes);
            let entries = tx.scan(&range, limit.min(MAX_SCAN_PAGE)).await;
            (
                entries.map(|entries| Some(scan_text(entries))),
                Some(tx.take_writes()),
            )
        }
    };
    match outcome {
        Ok(reply) => Ok((Ok(reply), writes)),
        Err(MutationError::Store(error)) => Err(MutationError::Store(error)),
        Err(other) => Ok((Err(other.to_string()), writes)),
    }
}

/// Scanned entries as the JSON text of `[key, value]` pairs.
fn scan_text(entries: Vec<(String, Value)>) -> String {
    Value::from_iter(
        entries
            .into_iter()
            .map(|(k, v)| Value::from(vec![Value::from(k), v])),
    )
    .to_string()
}
