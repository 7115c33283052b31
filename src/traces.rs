//! Traces over OTLP/HTTP: with OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT set, replisync's spans go to
//! that collector through the OpenTelemetry SDK, continuing a client's W3C `traceparent`.

use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Level, Metadata, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;

/// The service name when OTEL_SERVICE_NAME is unset.
const DEFAULT_SERVICE_NAME: &str = "replisync";

/// The longest `traceparent` read (version 00 is 55 characters); a longer one is ignored.
const MAX_TRACEPARENT_BYTES: usize = 128;

/// Whether spans are exported: read per request, so that with OTLP unset no header is parsed.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The exporter, once started: flushed by [`Traces::shutdown`].
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
    /// Where the spans go, `host:port` only (the URL's path or query may hold a token).
    pub destination: String,
    pub protocol: &'static str,
    pub service_name: String,
}

impl Traces {
    /// The exporter the OTEL_* variables ask for; `None` when no endpoint is set, an error
    /// naming the variable when one cannot be used.
    pub fn from_env() -> Result<Option<Traces>, String> {
        let Some((variable, endpoint)) = endpoint() else {
            return Ok(None);
        };
        let protocol = protocol()?;
        let destination = host_and_port(&endpoint).ok_or_else(|| {
            format!("{variable}={endpoint:?} is not a URL: write e.g. http://collector:4318")
        })?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .build()
            .map_err(|error| format!("cannot export traces to {destination}: {error}"))?;
        let service_name = env_value("OTEL_SERVICE_NAME")
            .map_or_else(|| DEFAULT_SERVICE_NAME.to_owned(), |(_, name)| name);
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name.clone())
                    .build(),
            )
            .build();
        EXPORTING.store(true, Ordering::Relaxed);
        Ok(Some(Traces {
            provider,
            destination,
            protocol: protocol_name(protocol),
            service_name,
        }))
    }

    /// The layer that hands replisync's spans (at `debug` and above, whatever RUST_LOG says)
    /// and their `info` events to the exporter.
    pub fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("replisync"))
            .with_location(false)
            .with_threads(false)
            .with_filter(filter_fn(exported))
    }

    /// Sends the spans not sent yet and stops the exporter (blocking, within its timeout).
    pub fn shutdown(self) {
        EXPORTING.store(false, Ordering::Relaxed);
        if let Err(error) = self.provider.shutdown() {
            eprintln!("replisync: traces not all exported at shutdown: {error}");
        }
    }
}

/// replisync's spans at `debug` and above, and its events at `info` and above (not the access
/// log: the request span says it all).
fn exported(metadata: &Metadata<'_>) -> bool {
    let target = metadata.target();
    let ours = target == "replisync" || target.starts_with("replisync::");
    let level = *metadata.level();
    ours && if metadata.is_span() {
        level <= Level::DEBUG
    } else {
        level <= Level::INFO && target != "replisync::access"
    }
}

/// Makes `span` (a request's, not entered yet) continue the trace of the request's W3C
/// `traceparent` header. A missing, malformed or oversized one is ignored: a fresh trace starts.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if !EXPORTING.load(Ordering::Relaxed) {
        return;
    }
    let Some(traceparent) = headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .filter(|value| value.len() <= MAX_TRACEPARENT_BYTES)
    else {
        return;
    };
    let context = TraceContextPropagator::new().extract(&TraceParent(traceparent));
    if opentelemetry::trace::TraceContextExt::has_active_span(&context) {
        let _ = span.set_parent(context);
    }
}

/// A carrier holding the `traceparent` alone (no `tracestate`: a client's list is not carried).
struct TraceParent<'a>(&'a str);

impl Extractor for TraceParent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The endpoint variable that is set (the traces one first) and its value.
fn endpoint() -> Option<(&'static str, String)> {
    env_value("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env_value("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL: `http/protobuf` (the default) or `http/json`.
fn protocol() -> Result<Protocol, String> {
    let Some((variable, value)) = env_value("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env_value("OTEL_EXPORTER_OTLP_PROTOCOL"))
    else {
        return Ok(Protocol::HttpBinary);
    };
    match value.as_str() {
        "http/protobuf" => Ok(Protocol::HttpBinary),
        "http/json" => Ok(Protocol::HttpJson),
        "grpc" => Err(format!(
            "{variable}=grpc is not supported: replisync exports traces over HTTP; set {variable}=http/protobuf (or http/json) and point the endpoint at the collector's HTTP port (4318)"
        )),
        other => Err(format!(
            "{variable}={other:?} is not a protocol replisync exports with: write http/protobuf (the default) or http/json"
        )),
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::HttpJson => "http/json",
        _ => "http/protobuf",
    }
}

/// `name`'s value when it is set and not blank.
fn env_value(name: &'static str) -> Option<(&'static str, String)> {
    let value = std::env::var(name).ok()?;
    let value = value.trim();
    (!value.is_empty()).then(|| (name, value.to_owned()))
}

/// `host:port` of a URL (the scheme's default port when it names none).
fn host_and_port(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    let host = url.host_str()?;
    let port = url.port_or_known_default()?;
    Some(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::host_and_port;

    #[test]
    fn the_destination_logged_is_host_and_port_alone() {
        assert_eq!(
            host_and_port("https://user:secret@collector.example/v1/traces?token=x").as_deref(),
            Some("collector.example:443")
        );
        assert_eq!(
            host_and_port("http://127.0.0.1:4318").as_deref(),
            Some("127.0.0.1:4318")
        );
        assert_eq!(host_and_port("collector:4318"), None);
    }
}
