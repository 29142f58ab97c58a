//! Span capture (feature `otel`): an OpenTelemetry in-memory exporter behind a
//! `tracing` subscriber, and readers for the exported spans' attributes and links.

use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;

/// Exports the spans of this thread to the returned in-memory exporter while the
/// guard lives (on a current-thread runtime, its tasks included).
pub fn capture() -> (InMemorySpanExporter, tracing::subscriber::DefaultGuard) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("idem-test"));
    let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    (exporter, guard)
}

/// The value of attribute `name` on `span`.
pub fn attr(span: &SpanData, name: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == name)
        .map(|kv| kv.value.clone())
}

/// The span ids `span` links to.
pub fn links(span: &SpanData) -> Vec<SpanId> {
    span.links
        .iter()
        .map(|l| l.span_context.span_id())
        .collect()
}
