use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::backoff::{Backoff, Jitter};
use crate::consumer::{ConfigError, Consumer, DeliveryMode};
use crate::dedup::MemoryStore;
use crate::error::HandlerError;
use crate::handler::{Attempt, Json, Metadata};
use crate::outcome::headers as h;

fn fast_backoff(attempts: u32) -> Backoff {
    Backoff::exponential(Duration::from_millis(5))
        .jitter(Jitter::None)
        .max_attempts(attempts)
}

#[tokio::test]
async fn transient_failures_retry_then_succeed_with_attempt_numbers() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("{}").with_message_id("m"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .backoff(fast_backoff(5))
        .handler_with_state(
            |Attempt(n): Attempt, crate::State(seen): crate::State<Arc<Mutex<Vec<u32>>>>| async move {
                seen.lock().unwrap().push(n);
                if n < 3 { Err(HandlerError::transient("flaky")) } else { Ok(()) }
            },
            s,
        )
        .unwrap();
    let stats = broker.worker("q", consumer).run_until_idle().await;
    assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3]);
    assert_eq!(
        (stats.processed, stats.retries, stats.dead_lettered),
        (1, 2, 0)
    );
    assert!(broker.is_empty("q.dlq"));
}

#[tokio::test]
async fn exhausted_attempts_go_to_the_dlq_with_headers() {
    let broker = MemoryBroker::new();
    broker.publish(
        "q",
        Message::new("body")
            .with_message_id("m-1")
            .with_header("app", "kept"),
    );
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .backoff(fast_backoff(3))
        .handler(|| async { Err::<(), _>(std::io::Error::other("db down")) })
        .unwrap();
    let stats = broker.worker("q", consumer).run_until_idle().await;
    assert_eq!((stats.retries, stats.dead_lettered), (2, 1));
    let dlq = broker.peek_all("q.dlq");
    assert_eq!(dlq.len(), 1);
    let m = &dlq[0];
    assert_eq!(&m.body[..], b"body", "body kept");
    assert_eq!(
        m.properties.message_id.as_deref(),
        Some("m-1"),
        "properties kept"
    );
    assert_eq!(m.header_str("app"), Some("kept"), "original headers kept");
    assert_eq!(m.failed_attempts(), 3);
    assert_eq!(m.header_str(h::ERROR), Some("db down"));
    assert_eq!(m.header_str(h::ERROR_KIND), Some("transient"));
    assert_eq!(m.header_str(h::ORIGINAL_QUEUE), Some("q"));
    assert_eq!(m.header_str(h::ORIGINAL_ROUTING_KEY), Some("q"));
    assert_eq!(m.header_str(h::CONSUMER), Some("c"));
    assert_eq!(m.header_str(h::KEY), Some("m-1"));
    let first = crate::text::parse_rfc3339(m.header_str(h::FIRST_FAILED_AT).unwrap()).unwrap();
    let last = crate::text::parse_rfc3339(m.header_str(h::LAST_FAILED_AT).unwrap()).unwrap();
    assert!(first < last, "first failure time is carried across retries");
}

#[tokio::test]
async fn poison_goes_straight_to_the_dlq_and_huge_errors_are_cut() {
    #[derive(serde::Deserialize)]
    struct Order {
        #[allow(dead_code)]
        id: u64,
    }
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("{not json").with_message_id("bad"));
    broker.publish("q", Message::new(r#"{"id":1}"#).with_message_id("huge"));
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .backoff(fast_backoff(5))
        .handler(|Json(_o): Json<Order>| async {
            Err::<(), _>(HandlerError::permanent("x".repeat(5_000_000)))
        })
        .unwrap();
    let stats = broker.worker("q", consumer).run_until_idle().await;
    assert_eq!((stats.retries, stats.dead_lettered), (0, 2));
    let dlq = broker.peek_all("q.dlq");
    let bad = dlq
        .iter()
        .find(|m| m.properties.message_id.as_deref() == Some("bad"))
        .unwrap();
    assert!(bad
        .header_str(h::ERROR)
        .unwrap()
        .starts_with("invalid JSON payload"));
    assert_eq!(bad.header_str(h::ERROR_KIND), Some("permanent"));
    assert_eq!(bad.failed_attempts(), 1);
    let huge = dlq
        .iter()
        .find(|m| m.properties.message_id.as_deref() == Some("huge"))
        .unwrap();
    assert!(huge.header_str(h::ERROR).unwrap().len() <= crate::outcome::MAX_ERROR_LEN);
    // The marker counts the bytes dropped (5 000 000 - 2 025 kept), not the length.
    assert_eq!(
        huge.header_str(h::ERROR),
        Some(format!("{}... [4997975 bytes cut]", "x".repeat(2025)).as_str())
    );
}

#[tokio::test]
async fn retries_keep_order_per_message_and_do_not_block_the_queue() {
    // m0 fails once; the others pass by while m0 waits for its retry.
    let broker = MemoryBroker::new();
    for i in 0..4 {
        broker.publish(
            "q",
            Message::new(format!("{i}")).with_message_id(format!("m{i}")),
        );
    }
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .backoff(Backoff::exponential(Duration::from_millis(50)).jitter(Jitter::None))
        .handler_with_state(
            |meta: Metadata, crate::State(order): crate::State<Arc<Mutex<Vec<String>>>>| async move {
                let id = meta.properties.message_id.unwrap_or_default();
                order.lock().unwrap().push(format!("{id}@{}", meta.delivery.attempt));
                if id == "m0" && meta.delivery.attempt == 1 { Err(HandlerError::transient("later")) } else { Ok(()) }
            },
            o,
        )
        .unwrap();
    broker
        .worker("q", consumer)
        .prefetch(1)
        .run_until_idle()
        .await;
    assert_eq!(
        *order.lock().unwrap(),
        vec!["m0@1", "m1@1", "m2@1", "m3@1", "m0@2"]
    );
}

#[tokio::test]
async fn in_flight_never_exceeds_prefetch() {
    let broker = MemoryBroker::new();
    for i in 0..200 {
        broker.publish("q", Message::new("x").with_message_id(format!("m{i}")));
    }
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let state = (now.clone(), max.clone());
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .handler_with_state(
            |crate::State((now, max)): crate::State<(Arc<AtomicUsize>, Arc<AtomicUsize>)>| async move {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                now.fetch_sub(1, Ordering::SeqCst);
            },
            state,
        )
        .unwrap();
    let stats = broker
        .worker("q", consumer)
        .prefetch(7)
        .run_until_idle()
        .await;
    assert_eq!(stats.processed, 200);
    let peak = max.load(Ordering::SeqCst);
    assert!(peak <= 7, "peak {peak} > prefetch");
    assert!(peak > 1, "deliveries ran concurrently (peak {peak})");
}

#[tokio::test]
async fn at_most_once_never_retries() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("x"));
    let consumer = Consumer::builder("c")
        .mode(DeliveryMode::AtMostOnce)
        .handler(|| async { Err::<(), _>(HandlerError::transient("lost")) })
        .unwrap();
    let stats = broker.worker("q", consumer).run_until_idle().await;
    assert_eq!(
        (stats.retries, stats.dead_lettered, stats.dropped),
        (0, 0, 1)
    );
    assert!(broker.is_empty("q") && broker.is_empty("q.dlq"));
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_work() {
    let broker = MemoryBroker::new();
    for i in 0..3 {
        broker.publish("q", Message::new("x").with_message_id(format!("m{i}")));
    }
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .handler(|| async { tokio::time::sleep(Duration::from_millis(100)).await })
        .unwrap();
    let stats = broker
        .worker("q", consumer)
        .prefetch(1)
        .run(tokio::time::sleep(Duration::from_millis(30)))
        .await;
    assert_eq!(
        stats.processed, 1,
        "the in-flight delivery finished; no new one started"
    );
    assert_eq!(broker.len("q"), 2, "the rest stay in the queue");
}

#[test]
fn start_up_refuses_bad_configurations() {
    let short =
        crate::dedup::DedupLayer::new(MemoryStore::new()).retention(Duration::from_secs(60));
    let err = Consumer::builder("c")
        .dedup(short)
        .handler(|| async {})
        .unwrap_err();
    assert!(
        matches!(err, ConfigError::RetentionTooShort { .. }),
        "{err}"
    );
    let err = Consumer::builder("c")
        .mode(DeliveryMode::EffectivelyOnce)
        .handler(|| async {})
        .unwrap_err();
    assert_eq!(err, ConfigError::MissingStore);
    // A handler timeout longer than a broker's consumer timeout is the transport's to
    // refuse (idem-amqp `tests/broker_timeout.rs`); the core has no broker limit.
    let err = Consumer::builder(" ").handler(|| async {}).unwrap_err();
    assert!(matches!(err, ConfigError::InvalidName(_)));
}
