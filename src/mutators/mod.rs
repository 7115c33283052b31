//! Mutators: the named functions a push runs, one per mutation, against the space's data.
//! `Mutator` is the seam for your own in Rust; `set`, `delete` and `increment` come built in;
//! `js` runs the app's own mutators, written in JavaScript, in an embedded engine.

mod builtin;
mod error;
pub mod js;
pub mod read_hints;
pub mod settings;
mod tx;
mod writes;

use std::collections::HashMap;
use std::sync::Arc;

use crate::metrics::MutationMetrics;

use self::read_hints::ReadHints;

pub use self::error::{MutationError, ScriptError, ScriptFailure};
pub use self::tx::{Mutator, PushOverlay, ScanRange, WriteTx, Writer};
pub(crate) use self::writes::MutationWrites;

/// The mutators a server knows, by name.
#[derive(Clone, Default)]
pub struct Mutators {
    by_name: HashMap<String, Arc<dyn Mutator>>,
    /// Failed mutations by kind and reason, and JavaScript mutation times, for `/metrics`.
    metrics: MutationMetrics,
    /// The keys mutations read, learned, for stores to read ahead.
    read_hints: Arc<ReadHints>,
}

impl std::fmt::Debug for Mutators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Mutators").field("names", &names).finish()
    }
}

impl Mutators {
    /// No mutators at all.
    pub fn empty() -> Self {
        Self::default()
    }

    /// `set`, `delete` and `increment`.
    pub fn builtin() -> Self {
        Self::empty()
            .register("set", builtin::Set)
            .register("delete", builtin::Delete)
            .register("increment", builtin::Increment)
    }

    /// Adds (or replaces) the mutator called `name`.
    pub fn register(mut self, name: impl Into<String>, mutator: impl Mutator) -> Self {
        self.by_name.insert(name.into(), Arc::new(mutator));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Mutator>> {
        self.by_name.get(name)
    }

    /// Whether a mutator is called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The argument fields each mutator read as keys so far: the keys a push's first read
    /// fetches ahead.
    pub fn read_hints(&self) -> &Arc<ReadHints> {
        &self.read_hints
    }

    /// Failed mutations and JavaScript mutation times, which `/metrics` shows.
    pub fn metrics(&self) -> &MutationMetrics {
        &self.metrics
    }

    /// Makes `kept` the count of JavaScript contexts `/metrics` shows (the engines of the
    /// JavaScript mutators registered here keep them).
    fn show_js_contexts(&mut self, kept: crate::metrics::Gauge) {
        self.metrics.set_js_contexts(kept);
    }

    /// Counts a mutation named `name` that failed with `error`, under its mutator's kind
    /// (`unknown` when no mutator has the name).
    pub fn count_failure(&self, name: &str, error: &MutationError) {
        let kind = self.get(name).map_or("unknown", |mutator| mutator.kind());
        let reason = if kind == "unknown" {
            "no_mutator"
        } else {
            error.reason()
        };
        self.metrics.failed(kind, reason);
    }
}
