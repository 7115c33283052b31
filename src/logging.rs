//! Log output: the RUST_LOG filter, checked before anything is logged (one that cannot be parsed,
//! or that names no level and no crate of this binary, would hide every line), text or JSON, and
//! the OTLP trace exporter beside them when OTEL_EXPORTER_OTLP_ENDPOINT asks for it.

use std::io::IsTerminal;

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

mod json;

use self::json::JsonLines;
use crate::config::LogFormat;
use crate::traces::Traces;

/// The filter when RUST_LOG is unset or blank.
const DEFAULT_FILTER: &str = "info";

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Every crate compiled into replisync (from its lock file), `-` written `_` as in log targets.
const LOCK_FILE: &str = include_str!("../Cargo.lock");

/// What logging keeps until the process ends: the writer thread's guard (its drop writes the
/// lines still buffered) and the trace exporter, when there is one.
#[derive(Debug)]
pub struct Logging {
    pub traces: Option<Traces>,
    _lines: WorkerGuard,
}

/// Starts logging with `RUST_LOG` (`raw`, when set) in `format`, and exporting traces when the
/// OTEL_* variables ask for it (the caller flushes them at exit with [`Traces::shutdown`]). An
/// unusable filter or OTLP setting is an error naming the variable and what to write instead.
/// Lines go to stdout (stderr for `to_stderr`: a command whose stdout is its output) through a
/// thread of their own: a request that logs never waits for a slow reader of stdout (a full
/// pipe, a stalled log shipper).
/// `buffer_lines` (REPLISYNC_LOG_BUFFER_LINES) may wait for that thread; past them a line is
/// dropped, and counted in `replisync_log_lines_dropped_total`.
pub fn init(
    raw: Option<&str>,
    format: LogFormat,
    buffer_lines: u64,
    to_stderr: bool,
) -> Result<Logging, String> {
    let filter = filter_from(raw)?;
    let traces = Traces::from_env()?;
    let builder = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(usize::try_from(buffer_lines).unwrap_or(usize::MAX))
        .thread_name("replisync-log");
    let destination: Box<dyn std::io::Write + Send> = if to_stderr {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let (stdout, guard) = builder.finish(destination);
    let dropped = stdout.error_counter();
    crate::metrics::set_dropped_log_lines(Box::new(move || dropped.dropped_lines() as u64));
    let colour = if to_stderr {
        std::io::stderr().is_terminal()
    } else {
        std::io::stdout().is_terminal()
    };
    let layers = layers(filter, format, traces.as_ref(), stdout, colour);
    tracing_subscriber::registry().with(layers).init();
    if let Some(traces) = &traces {
        tracing::info!(
            destination = traces.destination.as_str(),
            protocol = traces.protocol,
            service = traces.service_name.as_str(),
            "traces are exported over OTLP"
        );
    }
    Ok(Logging {
        traces,
        _lines: guard,
    })
}

/// The log lines, each filtered by RUST_LOG alone, and the exporter's layer when there is one
/// (with OTLP unset, spans below the RUST_LOG level stay disabled where they are created).
fn layers(
    filter: EnvFilter,
    format: LogFormat,
    traces: Option<&Traces>,
    stdout: NonBlocking,
    terminal: bool,
) -> Vec<Box<dyn Layer<Registry> + Send + Sync>> {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(stdout)
        .with_ansi(terminal && std::env::var_os("NO_COLOR").is_none());
    let mut layers = vec![match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .fmt_fields(JsonLines)
            .event_format(JsonLines)
            .with_filter(filter)
            .boxed(),
    }];
    if let Some(traces) = traces {
        layers.push(traces.layer().boxed());
    }
    layers
}

/// The filter RUST_LOG asks for, or why it cannot be used.
pub fn filter_from(raw: Option<&str>) -> Result<EnvFilter, String> {
    let text = raw.map(str::trim).filter(|text| !text.is_empty());
    let text = text.unwrap_or(DEFAULT_FILTER);
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        check_target(directive)?;
    }
    EnvFilter::builder().parse(text).map_err(|error| {
        format!(
            "RUST_LOG={text:?} cannot be parsed ({error}): write a level ({}) or directives such as `info,replisync=debug`",
            LEVELS.join(", ")
        )
    })
}

/// A directive's target must be a crate of this binary: any other name matches no log line, and
/// a bare word that is not a level (`RUST_LOG=verbose`) would silence every line.
fn check_target(directive: &str) -> Result<(), String> {
    let target = directive.split('=').next().unwrap_or_default().trim();
    if target.starts_with('[') || LEVELS.contains(&target.to_ascii_lowercase().as_str()) {
        return Ok(());
    }
    let krate = target.split(['[', ':']).next().unwrap_or_default();
    if krate.is_empty() || compiled_crates().any(|name| name == krate) {
        return Ok(());
    }
    Err(format!(
        "RUST_LOG names {target:?}, which is neither a level ({}) nor a crate of replisync, so no log line would match it{}: write e.g. `RUST_LOG=debug` or `RUST_LOG=info,replisync=debug`",
        LEVELS.join(", "),
        if directive.contains('=') {
            ""
        } else {
            " and every line would be hidden"
        }
    ))
}

/// The crate names of the lock file, as log targets spell them.
fn compiled_crates() -> impl Iterator<Item = String> {
    LOCK_FILE.lines().filter_map(|line| {
        let name = line.strip_prefix("name = \"")?.strip_suffix('"')?;
        Some(name.replace('-', "_"))
    })
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::{filter_from, layers};
    use crate::config::LogFormat;

    /// Whether a `debug` span of replisync is created under RUST_LOG=`rust_log`, OTLP unset.
    fn debug_span_enabled(rust_log: &str, format: LogFormat) -> bool {
        let filter = filter_from(Some(rust_log)).unwrap();
        let (sink, _guard) = tracing_appender::non_blocking(std::io::sink());
        let subscriber =
            tracing_subscriber::registry().with(layers(filter, format, None, sink, false));
        tracing::subscriber::with_default(subscriber, || {
            !tracing::debug_span!("push.commit").is_disabled()
        })
    }

    #[test]
    fn without_otlp_debug_spans_cost_nothing_at_info() {
        for format in [LogFormat::Text, LogFormat::Json] {
            assert!(!debug_span_enabled("info", format));
            assert!(debug_span_enabled("info,replisync=debug", format));
        }
    }

    #[test]
    fn levels_targets_of_this_binary_and_the_default_are_accepted() {
        for ok in [
            None,
            Some(""),
            Some("debug"),
            Some("WARN"),
            Some("info,replisync=debug"),
            Some("replisync::push=trace,sqlx=warn"),
            Some("tower_http=debug"),
            Some("replisync"),
        ] {
            assert!(
                filter_from(ok).is_ok(),
                "{ok:?}: {:?}",
                filter_from(ok).err()
            );
        }
    }

    #[test]
    fn a_word_that_is_no_level_and_no_crate_is_refused_with_what_to_write() {
        let error = filter_from(Some("verbose")).unwrap_err();
        assert!(error.contains("RUST_LOG names \"verbose\""), "{error}");
        assert!(error.contains("every line would be hidden"), "{error}");
        assert!(error.contains("RUST_LOG=debug"), "{error}");
        let error = filter_from(Some("info,replisinc=debug")).unwrap_err();
        assert!(error.contains("\"replisinc\""), "{error}");
    }

    #[test]
    fn a_filter_that_cannot_be_parsed_is_refused() {
        let error = filter_from(Some("replisync=loud")).unwrap_err();
        assert!(error.contains("cannot be parsed"), "{error}");
    }
}
