//! Failed mutations by the kind of mutator and why, and the time JavaScript mutations take:
//! the app's `Mutators` own and record them, `/metrics` registers them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use super::families::Gauge;
use super::timing::Timing;

/// Mutations that failed, by the kind of mutator and why; the time JavaScript mutations take;
/// the JavaScript contexts the engines keep. The app's `Mutators` own them (they record),
/// `/metrics` registers them.
#[derive(Clone, Debug)]
pub struct MutationMetrics {
    failures: Family<FailureLabels, PromCounter>,
    js_duration: Timing,
    js_contexts: Gauge,
    keys_read_ahead: PromCounter,
}

/// The failures shown at 0 before the first (so that a rate over them starts at once): each
/// kind with the reasons its mutators can fail for.
const KNOWN_FAILURES: [(&str, &str); 14] = [
    ("builtin", "invalid_args"),
    ("builtin", "write_limit"),
    ("builtin", "forbidden_key"),
    ("javascript", "threw"),
    ("javascript", "timeout"),
    ("javascript", "memory"),
    ("javascript", "invalid_args"),
    ("javascript", "write_limit"),
    ("javascript", "forbidden_key"),
    ("rust", "invalid_args"),
    ("rust", "rejected"),
    ("rust", "write_limit"),
    ("rust", "forbidden_key"),
    ("unknown", "no_mutator"),
];

impl Default for MutationMetrics {
    fn default() -> Self {
        let metrics = MutationMetrics {
            failures: Family::default(),
            js_duration: Timing::default(),
            js_contexts: Gauge::default(),
            keys_read_ahead: PromCounter::default(),
        };
        for (kind, reason) in KNOWN_FAILURES {
            drop(
                metrics
                    .failures
                    .get_or_create(&FailureLabels { kind, reason }),
            );
        }
        metrics
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    kind: &'static str,
    reason: &'static str,
}

impl MutationMetrics {
    /// Counts a failed mutation: `kind` is `builtin`, `rust`, `javascript` or `unknown` (no
    /// mutator has its name); `reason` says why.
    pub fn failed(&self, kind: &'static str, reason: &'static str) {
        self.failures
            .get_or_create(&FailureLabels { kind, reason })
            .inc();
    }

    /// How many mutations failed for `kind` and `reason`.
    pub fn failures(&self, kind: &'static str, reason: &'static str) -> u64 {
        self.failures
            .get(&FailureLabels { kind, reason })
            .map_or(0, |counter| counter.get())
    }

    /// Counts keys a push group's first read fetched ahead for its mutations.
    pub(crate) fn read_ahead(&self, keys: usize) {
        if keys > 0 {
            self.keys_read_ahead.inc_by(keys as u64);
        }
    }

    /// Keys push groups' first reads fetched ahead for their mutations.
    pub fn keys_read_ahead(&self) -> u64 {
        self.keys_read_ahead.get()
    }

    pub fn js_duration(&self) -> &Timing {
        &self.js_duration
    }

    /// The JavaScript contexts kept (the engines count them in `kept`).
    pub(crate) fn set_js_contexts(&mut self, kept: Gauge) {
        self.js_contexts = kept;
    }

    pub fn js_contexts(&self) -> &Gauge {
        &self.js_contexts
    }

    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "replisync_mutations_failed",
            "Mutations that failed (their writes discarded; they count as processed), by kind of mutator (builtin, rust, javascript, unknown: no mutator has the name) and reason",
            self.failures.clone(),
        );
        registry.register_with_unit(
            "replisync_js_mutation_duration",
            "Time a JavaScript mutation took in its engine",
            Unit::Seconds,
            self.js_duration.histogram().clone(),
        );
        registry.register(
            "replisync_mutation_keys_read_ahead",
            "Keys a push group's first read fetched ahead for its mutations (the values of the argument fields each mutator read as keys before), so that they read them without a statement of their own",
            self.keys_read_ahead.clone(),
        );
        registry.register(
            "replisync_mutator_contexts",
            "JavaScript contexts the engines keep for the spaces they served lately (REPLISYNC_MUTATOR_CONTEXTS_MB bounds them)",
            self.js_contexts.0.clone(),
        );
    }
}
