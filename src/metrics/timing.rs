//! The histograms every part records into: durations in seconds, with buckets from 50 µs that
//! double up to 26 s, so sub-millisecond work resolves; and small counts (mutations per push).

use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Duration buckets: 50 µs, 100 µs, 200 µs, ... 26.2 s (20 buckets, each twice the last).
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_05, 2.0, 20)
}

/// Count buckets (mutations per push, pushes per group): 1, 2, 4, ... 4096.
pub fn count_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(1.0, 2.0, 13)
}

/// A histogram of durations, recorded in seconds. Clones share their counts, so the part that
/// records and `/metrics`, which reads, each hold one.
#[derive(Clone, Debug)]
pub struct Timing(Histogram);

impl Default for Timing {
    fn default() -> Self {
        Timing(Histogram::new(duration_buckets()))
    }
}

impl Timing {
    pub fn observe(&self, elapsed: Duration) {
        self.0.observe(elapsed.as_secs_f64());
    }

    /// Records the time since `start`.
    pub fn observe_since(&self, start: Instant) {
        self.observe(start.elapsed());
    }

    pub fn histogram(&self) -> &Histogram {
        &self.0
    }
}

/// A histogram of small counts (mutations per push, pushes per group).
#[derive(Clone, Debug)]
pub struct Sizes(Histogram);

impl Default for Sizes {
    fn default() -> Self {
        Sizes(Histogram::new(count_buckets()))
    }
}

impl Sizes {
    pub fn observe(&self, count: usize) {
        self.0.observe(count as f64);
    }

    pub fn histogram(&self) -> &Histogram {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_resolve_sub_millisecond_work_and_reach_tens_of_seconds() {
        let buckets: Vec<f64> = duration_buckets().collect();
        assert_eq!(buckets.len(), 20);
        assert!((buckets[0] - 0.000_05).abs() < 1e-12);
        assert!(buckets.iter().filter(|b| **b < 0.001).count() >= 5);
        assert!(buckets[19] > 20.0 && buckets[19] < 30.0);
    }

    #[test]
    fn a_timing_records_seconds() {
        let timing = Timing::default();
        timing.observe(Duration::from_millis(250));
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("t", "t", timing.histogram().clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("t_sum 0.25\n"), "{text}");
        assert!(text.contains("t_count 1\n"), "{text}");
        assert!(text.contains("t_bucket{le=\"0.2048\"} 0\n"), "{text}");
        assert!(text.contains("t_bucket{le=\"0.4096\"} 1\n"), "{text}");
    }
}
