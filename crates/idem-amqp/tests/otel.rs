//! W3C trace context across RabbitMQ hops (feature `otel`, enabled for this crate's
//! tests by its dev-dependency on itself): the publisher injects the caller's span,
//! the worker's `idem.delivery` spans continue it, a retry copy through a delay queue
//! and the dead-letter copy keep it. Spans go to OpenTelemetry's in-memory exporter.
//!
//! Needs RabbitMQ (`AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`); see
//! the README section "Set-up: two commands".

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_amqp::convert::headers_from_table;
use idem_amqp::{DelayTiers, Publisher, Topology, Worker};
use idem_core::{otel, Consumer, HandlerError, MemoryStore, Message};
use idem_testkit::Service;
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry::Value;
use opentelemetry_sdk::trace::SpanData;

use idem_testkit::spans::{attr, links};

mod common;
use common::settled_dead_letter;

/// Handler: body `flaky` fails (transient) on its first attempt only, `doomed` always,
/// anything else succeeds.
fn consumer() -> Consumer {
    let calls: Arc<Mutex<HashMap<Vec<u8>, u32>>> = Arc::default();
    Consumer::builder("otel-amqp")
        .store(MemoryStore::new())
        .backoff(idem_testkit::backoff(Duration::from_secs(1), 2))
        .handler(move |msg: Message| {
            let n = {
                let mut calls = calls.lock().unwrap();
                let n = calls.entry(msg.body.to_vec()).or_default();
                *n += 1;
                *n
            };
            async move {
                match (&msg.body[..], n) {
                    (b"flaky", 1) | (b"doomed", _) => {
                        Err(HandlerError::transient(std::io::Error::other("db down")))
                    }
                    _ => Ok(()),
                }
            }
        })
        .unwrap()
}

#[tokio::test]
async fn publish_retry_and_dead_letter_copies_share_the_publishers_trace() {
    // Current-thread runtime: the worker's tasks run on this thread, under this subscriber.
    let (exporter, _guard) = idem_testkit::spans::capture();

    let url = idem_amqp::amqp_url_from_env();
    let conn = Service::RabbitMq
        .expect_connected(&url, idem_amqp::connect(&url, "idem-test-otel-admin").await);
    let ch = conn.create_channel().await.unwrap();
    let queue = idem_testkit::unique("otel");
    let topo =
        Topology::new(queue.clone()).tiers(DelayTiers::new([Duration::from_secs(1)]).unwrap());
    topo.declare_on(&ch).await.unwrap();
    let consumer = consumer();
    let running = Worker::builder(url.as_str(), topo.clone(), consumer.clone())
        .prefetch(4)
        .build()
        .unwrap()
        .spawn();

    let publisher = Publisher::connect(&url).await.unwrap();
    let publish_span = |name: &'static str| tracing::info_span!("publish", message = name);
    for body in ["flaky", "doomed"] {
        let span = publish_span(body);
        let _entered = span.enter();
        let mut msg = Message::new(body).with_message_id(format!("{queue}-{body}"));
        publisher.publish("", &queue, &mut msg).await.unwrap();
        assert!(msg.headers.contains_key(otel::TRACEPARENT), "injected");
    }
    // A context set by the caller is kept, not replaced by the current span's.
    let own_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    {
        let span = publish_span("own");
        let _entered = span.enter();
        let mut msg = Message::new("own")
            .with_message_id(format!("{queue}-own"))
            .with_header(
                otel::TRACEPARENT,
                format!("00-{own_trace}-00f067aa0ba902b7-01"),
            );
        publisher.publish("", &queue, &mut msg).await.unwrap();
    }

    let dead = settled_dead_letter(&ch, &topo, &consumer, 2, Duration::from_secs(30)).await;
    let stats = running.shutdown_and_join().await.unwrap();
    assert_eq!(
        (stats.processed, stats.retries, stats.dead_lettered),
        (2, 2, 1)
    );
    topo.delete_on(&ch).await.unwrap();
    publisher.close().await;
    let _ = conn.close(200, "bye".into()).await;

    let spans = exporter.get_finished_spans().unwrap();
    let publish_of = |name: &str| {
        spans
            .iter()
            .find(|s| {
                s.name == "publish" && attr(s, "message") == Some(Value::from(name.to_owned()))
            })
            .unwrap_or_else(|| panic!("no publish span for {name}"))
    };
    let deliveries_of = |key: String| -> Vec<&SpanData> {
        let mut d: Vec<&SpanData> = spans
            .iter()
            .filter(|s| {
                s.name == "idem.delivery" && attr(s, "key") == Some(Value::from(key.clone()))
            })
            .collect();
        d.sort_by_key(|s| s.start_time);
        d
    };

    // flaky: attempt 1 fails, its copy goes through the 1 s delay queue, attempt 2 acks.
    let publish = publish_of("flaky");
    let flaky = deliveries_of(format!("{queue}-flaky"));
    assert_eq!(flaky.len(), 2, "{spans:#?}");
    for (n, d) in flaky.iter().enumerate() {
        assert_eq!(d.span_context.trace_id(), publish.span_context.trace_id());
        assert_eq!(
            d.parent_span_id,
            publish.span_context.span_id(),
            "attempt {}",
            n + 1
        );
        assert_eq!(attr(d, "queue"), Some(Value::from(queue.clone())));
        assert_eq!(attr(d, "attempt"), Some(Value::I64(n as i64 + 1)));
        assert_eq!(attr(d, "consumer"), Some(Value::from("otel-amqp")));
    }
    assert_eq!(attr(flaky[0], "outcome"), Some(Value::from("retry")));
    assert_eq!(attr(flaky[1], "outcome"), Some(Value::from("ack")));
    assert!(links(flaky[0]).is_empty());
    assert_eq!(links(flaky[1]), [flaky[0].span_context.span_id()]);

    // doomed: two attempts in the publisher's trace, then the dead-letter copy.
    let publish = publish_of("doomed");
    let doomed = deliveries_of(format!("{queue}-doomed"));
    assert_eq!(doomed.len(), 2, "{spans:#?}");
    assert!(doomed
        .iter()
        .all(|d| d.parent_span_id == publish.span_context.span_id()));
    assert_eq!(attr(doomed[1], "outcome"), Some(Value::from("dead_letter")));
    let dead_headers = headers_from_table(dead.delivery.properties.headers().as_ref().unwrap());
    let trace = publish.span_context.trace_id().to_string();
    assert_eq!(
        dead_headers[otel::TRACEPARENT].as_str().unwrap(),
        format!("00-{trace}-{}-01", publish.span_context.span_id()),
        "the dead-letter copy keeps the original's traceparent"
    );
    assert_eq!(
        dead_headers[otel::PREVIOUS_ATTEMPT].as_str().unwrap(),
        format!("00-{trace}-{}-01", doomed[1].span_context.span_id()),
    );

    // own: the caller's traceparent was published as set.
    let own = deliveries_of(format!("{queue}-own"));
    assert_eq!(own.len(), 1);
    assert_eq!(
        own[0].span_context.trace_id(),
        TraceId::from_hex(own_trace).unwrap()
    );
    assert_eq!(
        own[0].parent_span_id,
        SpanId::from_hex("00f067aa0ba902b7").unwrap()
    );
}
