//! W3C trace context on the in-memory broker (feature `otel`, enabled for this
//! crate's tests by its dev-dependency on itself): a publish, every attempt, and the
//! dead-letter copy belong to one trace, with the parent links and span links that
//! `idem_core::otel` documents. Spans go to OpenTelemetry's in-memory exporter.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::memory::MemoryBroker;
use idem_core::{otel, Consumer, HandlerError, MemoryStore, Message};
use opentelemetry::trace::SpanId;
use opentelemetry::Value;
use opentelemetry_sdk::trace::SpanData;

use idem_testkit::spans::{attr, capture as tracing_to_memory, links};

/// A consumer whose handler fails (transient) `failures` times, then succeeds.
fn flaky(failures: u32, max_attempts: u32) -> Consumer {
    let calls = Arc::new(AtomicU32::new(0));
    Consumer::builder("otel-memory")
        .store(MemoryStore::new())
        .backoff(idem_testkit::backoff(Duration::from_secs(1), max_attempts))
        .handler(move || {
            let calls = calls.clone();
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) < failures {
                    Err(HandlerError::transient(std::io::Error::other("db down")))
                } else {
                    Ok(())
                }
            }
        })
        .unwrap()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn every_attempt_is_a_child_of_the_publish_linked_to_the_attempt_before() {
    let (exporter, _guard) = tracing_to_memory();
    let broker = MemoryBroker::new();
    {
        let publish = tracing::info_span!("publish");
        let _entered = publish.enter();
        broker.publish("otel-q", Message::new("{}").with_message_id("k-1"));
    }
    let stats = broker.worker("otel-q", flaky(2, 5)).run_until_idle().await;
    assert_eq!((stats.retries, stats.processed), (2, 1));

    let spans = exporter.get_finished_spans().unwrap();
    let publish = spans.iter().find(|s| s.name == "publish").unwrap();
    let deliveries: Vec<&SpanData> = spans.iter().filter(|s| s.name == "idem.delivery").collect();
    assert_eq!(deliveries.len(), 3, "{spans:?}");
    let trace = publish.span_context.trace_id();
    let mut previous: Option<SpanId> = None;
    for (n, d) in deliveries.iter().enumerate() {
        assert_eq!(
            d.span_context.trace_id(),
            trace,
            "attempt {} in another trace",
            n + 1
        );
        assert_eq!(
            d.parent_span_id,
            publish.span_context.span_id(),
            "attempt {}",
            n + 1
        );
        assert!(d.parent_span_is_remote, "the parent came from headers");
        assert_eq!(
            links(d),
            previous.into_iter().collect::<Vec<_>>(),
            "attempt {}",
            n + 1
        );
        assert_eq!(attr(d, "attempt"), Some(Value::I64(n as i64 + 1)));
        assert_eq!(attr(d, "queue"), Some(Value::from("otel-q")));
        assert_eq!(attr(d, "key"), Some(Value::from("k-1")));
        let outcome = if n < 2 { "retry" } else { "ack" };
        assert_eq!(attr(d, "outcome"), Some(Value::from(outcome)));
        previous = Some(d.span_context.span_id());
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_untraced_message_gets_one_trace_from_its_first_attempt() {
    let (exporter, _guard) = tracing_to_memory();
    let broker = MemoryBroker::new();
    // Published outside any span: no traceparent.
    broker.publish("otel-dlq", Message::new("{}").with_message_id("k-2"));
    assert!(!broker.peek_all("otel-dlq")[0]
        .headers
        .contains_key(otel::TRACEPARENT));
    // Always fails: two attempts, then the dead-letter copy.
    let stats = broker
        .worker("otel-dlq", flaky(u32::MAX, 2))
        .run_until_idle()
        .await;
    assert_eq!((stats.retries, stats.dead_lettered), (1, 1));

    let spans = exporter.get_finished_spans().unwrap();
    let deliveries: Vec<&SpanData> = spans.iter().filter(|s| s.name == "idem.delivery").collect();
    assert_eq!(deliveries.len(), 2, "{spans:?}");
    let (first, second) = (deliveries[0], deliveries[1]);
    assert_eq!(first.parent_span_id, SpanId::INVALID, "a new trace starts");
    assert_eq!(
        second.span_context.trace_id(),
        first.span_context.trace_id()
    );
    assert_eq!(second.parent_span_id, first.span_context.span_id());
    assert_eq!(links(second), [first.span_context.span_id()]);

    // The dead-letter copy: in the same trace, naming the last attempt.
    let dead = broker.peek_all("otel-dlq.dlq");
    assert_eq!(dead.len(), 1);
    let trace = first.span_context.trace_id().to_string();
    assert_eq!(otel::trace_id(&dead[0].headers), Some(trace.clone()));
    let previous = dead[0].headers[otel::PREVIOUS_ATTEMPT].as_str().unwrap();
    assert_eq!(
        previous,
        format!("00-{trace}-{}-01", second.span_context.span_id())
    );
}
