//! The `idem.delivery` span: one per delivery attempt, carrying the fields operators
//! filter logs and traces by (consumer, queue, message id, key, attempt, outcome).
//! Checked with a `tracing` layer that records the span's fields, on the in-memory
//! broker: a retried message, a poison message and a duplicate.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::memory::MemoryBroker;
use idem_core::{Consumer, HandlerError, MemoryStore, Message};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

type Fields = BTreeMap<String, String>;

/// Records the fields of every `idem.delivery` span, in creation order.
#[derive(Clone, Default)]
struct DeliverySpans {
    spans: Arc<Mutex<Vec<(Id, Fields)>>>,
}

struct FieldVisitor<'a>(&'a mut Fields);

impl Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> Layer<S> for DeliverySpans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() == "idem.delivery" {
            let mut fields = Fields::new();
            attrs.record(&mut FieldVisitor(&mut fields));
            self.spans.lock().unwrap().push((id.clone(), fields));
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut spans = self.spans.lock().unwrap();
        // Span ids are reused after a span closes: the newest span with this id.
        if let Some((_, fields)) = spans.iter_mut().rev().find(|(i, _)| i == id) {
            values.record(&mut FieldVisitor(fields));
        }
    }
}

impl DeliverySpans {
    fn taken(&self) -> Vec<Fields> {
        std::mem::take(&mut *self.spans.lock().unwrap())
            .into_iter()
            .map(|(_, f)| f)
            .collect()
    }
}

fn field<'a>(span: &'a Fields, name: &str) -> &'a str {
    span.get(name)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("field {name} missing in {span:?}"))
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn delivery_span_names_queue_key_attempt_and_outcome() {
    let spans = DeliverySpans::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));

    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let consumer = Consumer::builder("span-fields")
        .store(MemoryStore::new())
        .backoff(idem_testkit::backoff(Duration::from_secs(1), 3))
        .handler(move |msg: Message| {
            let seen = seen.clone();
            async move {
                match &msg.body[..] {
                    b"poison" => Err(HandlerError::permanent(std::io::Error::other("bad"))),
                    // The first attempt fails (transient), the second succeeds.
                    _ if seen.fetch_add(1, Ordering::SeqCst) == 0 => {
                        Err(HandlerError::transient(std::io::Error::other("db down")))
                    }
                    _ => Ok(()),
                }
            }
        })
        .unwrap();
    let broker = MemoryBroker::new();
    broker.publish("span-q", Message::new("ok").with_message_id("key-1"));
    let stats = broker
        .worker("span-q", consumer.clone())
        .run_until_idle()
        .await;
    assert_eq!((stats.processed, stats.retries), (1, 1));

    let retried = spans.taken();
    assert_eq!(retried.len(), 2, "{retried:?}");
    for (span, (attempt, outcome)) in retried.iter().zip([("1", "retry"), ("2", "ack")]) {
        assert_eq!(field(span, "consumer"), "span-fields");
        assert_eq!(field(span, "queue"), "span-q");
        assert_eq!(field(span, "message_id"), "key-1");
        assert_eq!(field(span, "key"), "key-1");
        assert_eq!(field(span, "attempt"), attempt);
        assert_eq!(field(span, "outcome"), outcome);
        assert!(span.contains_key("latency_ms"), "{span:?}");
    }

    // A poison message: one attempt, dead-lettered; then a duplicate of key-1.
    broker.publish("span-q", Message::new("poison").with_message_id("key-2"));
    broker.publish("span-q", Message::new("ok").with_message_id("key-1"));
    broker
        .worker("span-q", consumer)
        .prefetch(1)
        .run_until_idle()
        .await;
    let later = spans.taken();
    let outcomes: Vec<(&str, &str, &str)> = later
        .iter()
        .map(|s| (field(s, "key"), field(s, "attempt"), field(s, "outcome")))
        .collect();
    assert_eq!(
        outcomes,
        [("key-2", "1", "dead_letter"), ("key-1", "1", "duplicate")]
    );
}
