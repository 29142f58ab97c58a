//! W3C trace context across hops (feature `otel`).
//!
//! With this feature a message carries its trace in two headers, `traceparent` and
//! `tracestate` ([W3C Trace Context](https://www.w3.org/TR/trace-context/)), and every
//! hop joins that trace:
//!
//! - **Publishing** (`idem_amqp::Publisher`, [`MemoryBroker::publish`](crate::memory::MemoryBroker::publish))
//!   writes the context of the current `tracing` span into the message, through
//!   [`inject_current`]. Headers the caller already set are kept: a message that
//!   already belongs to a trace (an outbox row, a forwarded message) stays in it.
//! - **Outbox enqueue** (`idem_outbox::Outbox::enqueue`) stores the enqueuer's
//!   context in the row's headers, so the relay's publish carries the trace of the
//!   request that wrote the row, not the relay's own.
//! - **Consuming**: [`Consumer::process`](crate::Consumer::process), which both
//!   transports call, makes the `idem.delivery` span a child of the context found in
//!   the message.
//! - **Retry and dead-letter copies** keep the original's `traceparent` and
//!   `tracestate` unchanged (the transports copy the original headers), and add
//!   [`PREVIOUS_ATTEMPT`]: the `traceparent` of the delivery span that failed.
//!
//! # How attempts relate
//!
//! Every attempt of a message is a **child of the span that published it**: the
//! first delivery, each retry and the delivery that succeeds are siblings under the
//! publish span, so a trace view shows them side by side, in order. Each attempt after
//! the first also carries a **span link** to the attempt before it (read from
//! [`PREVIOUS_ATTEMPT`]), so the chain of failures can be followed attempt by attempt.
//! We chose siblings over a chain of parents because a retry is not caused by the
//! failed attempt's work but by the message; a deep chain would also make each retry
//! look nested inside a span that ended long before it started.
//!
//! A message published without any trace context (by a producer that does not trace)
//! starts a new trace at its first delivery. Its retry copies then get that first
//! delivery's context as their `traceparent`, so every later attempt and the
//! dead-letter copy still belong to one trace, as children of the first attempt.
//!
//! # What you set up
//!
//! idem only reads and writes the context of `tracing` spans. To export them, install
//! a [`tracing_opentelemetry`] layer with your tracer in your subscriber, with the
//! versions idem is built with (opentelemetry and opentelemetry_sdk 0.33,
//! tracing-opentelemetry 0.34). Without such a layer the spans have no OpenTelemetry
//! context: nothing is injected and incoming headers are carried along untouched.
//!
//! ```
//! use opentelemetry::trace::TracerProvider as _;
//! use opentelemetry_sdk::trace::SdkTracerProvider;
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! use idem_core::memory::MemoryBroker;
//! use idem_core::{otel, Consumer, Message, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Add your exporter (OTLP...) with `.with_batch_exporter(...)`.
//! let provider = SdkTracerProvider::builder().build();
//! let subscriber = tracing_subscriber::registry()
//!     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("billing")));
//! tracing::subscriber::set_global_default(subscriber)?;
//!
//! let broker = MemoryBroker::new();
//! tracing::info_span!("checkout").in_scope(|| {
//!     broker.publish("charges", Message::new("{}").with_message_id("c-1"));
//! });
//! let queued = &broker.peek_all("charges")[0];
//! assert!(otel::trace_id(&queued.headers).is_some()); // the checkout's trace
//!
//! // Its idem.delivery span is a child of the "checkout" span.
//! let consumer = Consumer::builder("billing").store(MemoryStore::new()).handler(|| async {})?;
//! broker.worker("charges", consumer).run_until_idle().await;
//! # Ok(()) }
//! ```
//!
//! The propagator is always W3C Trace Context ([`TraceContextPropagator`]), whatever
//! global propagator the application sets, because the header names are part of
//! idem's wire format. Baggage is not carried.
//!
//! Without the feature none of this is compiled: no dependency, no code on the
//! delivery path.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::{HeaderValue, Headers, Message};
use crate::outcome::Disposition;

/// The W3C header naming the trace and the parent span of a message.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendor-specific trace state along with [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";
pub use crate::headers::PREVIOUS_ATTEMPT;

struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), HeaderValue::String(value));
    }
}

struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // A value of another type (an integer, bytes) is no trace context: ignored,
        // as the propagator ignores a malformed string.
        self.0.get(key).and_then(HeaderValue::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes `cx` into `headers` as `traceparent` / `tracestate`. Nothing is written
/// when `cx` has no valid span context.
pub fn inject_context(cx: &Context, headers: &mut Headers) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// Writes the context of the current `tracing` span (or, when it has none, the
/// current OpenTelemetry context) into `headers`, unless they already have a
/// `traceparent`: a caller's own trace context wins.
///
/// ```
/// use idem_core::{otel, Headers};
///
/// let mut headers = Headers::new();
/// headers.insert(otel::TRACEPARENT.into(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
/// otel::inject_current(&mut headers); // kept as is
/// assert_eq!(otel::trace_id(&headers).as_deref(), Some("0af7651916cd43dd8448eb211c80319c"));
/// ```
pub fn inject_current(headers: &mut Headers) {
    if headers.contains_key(TRACEPARENT) {
        return;
    }
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        inject_context(&cx, headers);
    } else {
        inject_context(&Context::current(), headers);
    }
}

/// The trace context carried by `headers` (an empty context when there is none or
/// it is malformed).
pub fn extract(headers: &Headers) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The trace id (32 lowercase hex digits) of the context carried by `headers`, if
/// any: handy in logs and tests.
pub fn trace_id(headers: &Headers) -> Option<String> {
    let cx = extract(headers);
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Makes `span` (an `idem.delivery` span, not yet entered) a child of the context in
/// `msg`, and links it to the previous attempt. Returns whether `msg` had a context.
pub(crate) fn adopt(span: &tracing::Span, msg: &Message) -> bool {
    let parent = extract(&msg.headers);
    let had_parent = parent.span().span_context().is_valid();
    if had_parent {
        // Fails only without an OpenTelemetry layer: then there is nothing to parent.
        let _ = span.set_parent(parent);
    }
    if let Some(previous) = msg
        .headers
        .get(PREVIOUS_ATTEMPT)
        .and_then(HeaderValue::as_str)
    {
        let mut one = Headers::new();
        one.insert(TRACEPARENT.to_owned(), previous.into());
        let previous = extract(&one);
        span.add_link(previous.span().span_context().clone());
    }
    had_parent
}

/// Stamps a retry or dead-letter copy with the context of the attempt that failed
/// (`span`); see the [module docs](self#how-attempts-relate).
pub(crate) fn mark_copy(
    span: &tracing::Span,
    had_parent: bool,
    mut disposition: Disposition,
) -> Disposition {
    if let Disposition::Retry { headers, .. } | Disposition::DeadLetter { headers, .. } =
        &mut disposition
    {
        let mut attempt = Headers::new();
        inject_context(&span.context(), &mut attempt);
        if let Some(traceparent) = attempt.get(TRACEPARENT) {
            headers.insert(PREVIOUS_ATTEMPT.to_owned(), traceparent.clone());
            if !had_parent {
                headers.extend(attempt);
            }
        }
    }
    disposition
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn round_trips_through_headers() {
        let mut headers = Headers::new();
        headers.insert(TRACEPARENT.into(), PARENT.into());
        headers.insert(TRACESTATE.into(), "vendor=1".into());
        let cx = extract(&headers);
        let mut out = Headers::new();
        inject_context(&cx, &mut out);
        assert_eq!(out[TRACEPARENT].as_str(), Some(PARENT));
        assert_eq!(out[TRACESTATE].as_str(), Some("vendor=1"));
    }

    #[test]
    fn malformed_or_mistyped_context_is_ignored() {
        for bad in [
            HeaderValue::from("garbage"),
            HeaderValue::Int(7),
            HeaderValue::Bytes(PARENT.as_bytes().to_vec()),
        ] {
            let mut headers = Headers::new();
            headers.insert(TRACEPARENT.into(), bad);
            assert_eq!(trace_id(&headers), None);
        }
    }

    #[test]
    fn nothing_is_injected_outside_a_trace() {
        let mut headers = Headers::new();
        inject_current(&mut headers);
        assert!(headers.is_empty(), "{headers:?}");
    }
}
