//! The metric types parts record into (`Counter`, `Gauge`) and the functions that create a
//! metric and register it under its name, unit and HELP text.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge as PromGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::timing::{Sizes, Timing, duration_buckets};

/// A count that only goes up. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct Counter(pub(super) PromCounter);

impl Counter {
    pub fn increment(&self) {
        self.0.inc();
    }

    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }

    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// A value that goes up and down (open connections).
#[derive(Clone, Debug, Default)]
pub struct Gauge(pub(super) PromGauge);

impl Gauge {
    pub fn add(&self, n: u64) {
        self.0.inc_by(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn sub(&self, n: u64) {
        self.0.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set(&self, n: u64) {
        self.0.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn get(&self) -> u64 {
        u64::try_from(self.0.get()).unwrap_or(0)
    }
}

/// A gauge in seconds, with a fraction.
pub type SecondsGauge = PromGauge<f64, AtomicU64>;

pub(super) fn duration_histogram() -> Histogram {
    Histogram::new(duration_buckets())
}

/// `help` without its final period: the registry ends every HELP line with one.
pub(super) fn unpunctuated(help: &str) -> &str {
    help.strip_suffix('.').unwrap_or(help)
}

/// Registers a new counter (named without `_total`, which the text adds) and returns it.
pub(super) fn counter(registry: &mut Registry, name: &str, help: &str) -> Counter {
    let counter = Counter::default();
    registry.register(name, unpunctuated(help), counter.0.clone());
    counter
}

pub(super) fn gauge(registry: &mut Registry, name: &str, help: &str) -> Gauge {
    let gauge = Gauge::default();
    registry.register(name, unpunctuated(help), gauge.0.clone());
    gauge
}

/// Registers a duration histogram (`name` without the `_seconds` the text adds).
pub(super) fn timing(registry: &mut Registry, name: &str, help: &str) -> Timing {
    let timing = Timing::default();
    registry.register_with_unit(
        name,
        unpunctuated(help),
        Unit::Seconds,
        timing.histogram().clone(),
    );
    timing
}

pub(super) fn sizes(registry: &mut Registry, name: &str, help: &str) -> Sizes {
    let sizes = Sizes::default();
    registry.register(name, unpunctuated(help), sizes.histogram().clone());
    sizes
}

pub(super) fn timing_family<L>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<L, Histogram, fn() -> Histogram>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let constructor: fn() -> Histogram = duration_histogram;
    let family = Family::new_with_constructor(constructor);
    registry.register_with_unit(name, unpunctuated(help), Unit::Seconds, family.clone());
    family
}
