//! The process's own figures: memory, CPU time and open file descriptors under their standard
//! names (`process_*`, as every Prometheus client exports them; Linux only), and log lines dropped.

use std::sync::OnceLock;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Registry;

/// Reads how many log lines were dropped because stdout could not keep up.
type DroppedLines = Box<dyn Fn() -> u64 + Send + Sync>;

static DROPPED_LOG_LINES: OnceLock<DroppedLines> = OnceLock::new();

/// Where `/metrics` reads the count of dropped log lines (`replisync_log_lines_dropped_total`):
/// set once, when logging starts.
pub fn set_dropped_log_lines(read: DroppedLines) {
    let _ = DROPPED_LOG_LINES.set(read);
}

/// Adds the process collectors (the `process_*` figures on Linux only).
pub(super) fn register(registry: &mut Registry) {
    registry.register_collector(Box::new(LogLines));
    #[cfg(target_os = "linux")]
    registry.register_collector(Box::new(linux::ProcessCollector));
}

/// `replisync_log_lines_dropped_total`, read at each scrape.
#[derive(Debug)]
struct LogLines;

impl Collector for LogLines {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let dropped = DROPPED_LOG_LINES.get().map_or(0, |read| read());
        ConstCounter::new(dropped).encode(encoder.encode_descriptor(
            "replisync_log_lines_dropped",
            "Log lines dropped because standard output could not keep up (REPLISYNC_LOG_BUFFER_LINES were waiting for it): no request waits for its log line.",
            None,
            MetricType::Counter,
        )?)
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use procfs::process::{LimitValue, Process};
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::MetricType;
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;
    use prometheus_client::registry::Unit;

    /// Reads `/proc/self` at each scrape; a figure that cannot be read is left out.
    #[derive(Debug)]
    pub(super) struct ProcessCollector;

    impl Collector for ProcessCollector {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let Ok(me) = Process::myself() else {
                return Ok(());
            };
            if let Ok(stat) = me.stat() {
                let ticks = procfs::ticks_per_second() as f64;
                let cpu_seconds = (stat.utime + stat.stime) as f64 / ticks;
                ConstCounter::new(cpu_seconds).encode(encoder.encode_descriptor(
                    "process_cpu",
                    "Total user and system CPU time spent, in seconds.",
                    Some(&Unit::Seconds),
                    MetricType::Counter,
                )?)?;
                let resident = stat.rss.saturating_mul(procfs::page_size());
                gauge_bytes(
                    &mut encoder,
                    "process_resident_memory",
                    "Resident memory size.",
                    resident,
                )?;
                gauge_bytes(
                    &mut encoder,
                    "process_virtual_memory",
                    "Virtual memory size.",
                    stat.vsize,
                )?;
                if let Ok(boot) = procfs::boot_time_secs() {
                    let start = boot as f64 + stat.starttime as f64 / ticks;
                    ConstGauge::new(start).encode(encoder.encode_descriptor(
                        "process_start_time",
                        "Start time of the process since the Unix epoch, in seconds.",
                        Some(&Unit::Seconds),
                        MetricType::Gauge,
                    )?)?;
                }
            }
            if let Ok(open) = me.fd_count() {
                ConstGauge::new(open as i64).encode(encoder.encode_descriptor(
                    "process_open_fds",
                    "Open file descriptors.",
                    None,
                    MetricType::Gauge,
                )?)?;
            }
            if let Ok(limits) = me.limits()
                && let LimitValue::Value(max) = limits.max_open_files.soft_limit
            {
                ConstGauge::new(i64::try_from(max).unwrap_or(i64::MAX)).encode(
                    encoder.encode_descriptor(
                        "process_max_fds",
                        "The most file descriptors the process may open (its soft limit).",
                        None,
                        MetricType::Gauge,
                    )?,
                )?;
            }
            Ok(())
        }
    }

    fn gauge_bytes(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        bytes: u64,
    ) -> Result<(), std::fmt::Error> {
        ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX))
            .encode(encoder.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Gauge)?)
    }
}
