//! Recoverability options on the in-memory transport: immediate retries, discard,
//! the richer failure record and the dead-letter hook.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::backoff::{Backoff, Jitter};
use crate::consumer::{Consumer, ConsumerBuilder};
use crate::dedup::{DedupLayer, MemoryStore};
use crate::error::HandlerError;
use crate::message::HeaderValue;
use crate::outcome::{headers as h, Failure, MAX_BACKTRACE_LEN};
use crate::State;

fn fast_backoff(attempts: u32) -> Backoff {
    Backoff::exponential(Duration::from_millis(5))
        .jitter(Jitter::None)
        .max_attempts(attempts)
}

type Calls = Arc<AtomicU32>;

/// A consumer `c` that tries a failed delivery again `retries` times at once (no
/// pause between the tries).
fn retrying_at_once(retries: u32) -> ConsumerBuilder {
    Consumer::builder("c")
        .immediate_retries(retries)
        .immediate_retry_delay(Duration::ZERO)
}

/// Runs the message `m` straight through `consumer` (no broker); its disposition.
async fn process_m(consumer: &Consumer) -> Disposition {
    consumer
        .process(Message::new("{}").with_message_id("m"))
        .await
}

/// A broker with one message `id` on `q`, and a call counter for its handler.
fn one_message(id: &str) -> (MemoryBroker, Calls) {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("{}").with_message_id(id));
    (broker, Calls::default())
}

/// Publishes `id` to `q` again and runs `consumer`: the delivery is a duplicate.
async fn redelivery_is_a_duplicate(broker: &MemoryBroker, consumer: Consumer, id: &str) {
    broker.publish("q", Message::new("{}").with_message_id(id));
    let stats = broker.worker("q", consumer).run_until_idle().await;
    assert_eq!(stats.duplicates, 1);
}

/// A handler that fails (transiently) on its first `fail` calls, then succeeds.
fn flaky(
    fail: u32,
) -> impl Fn(State<Calls>) -> std::future::Ready<Result<(), HandlerError>> + Clone {
    move |State(calls): State<Calls>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(if n < fail {
            Err(HandlerError::from(std::io::Error::other(
                "connection reset",
            )))
        } else {
            Ok(())
        })
    }
}

#[tokio::test]
async fn immediate_retries_absorb_a_blip_without_a_retry_copy() {
    let (broker, calls) = one_message("m");
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .backoff(fast_backoff(5))
        .immediate_retries(3)
        .immediate_retry_delay(Duration::from_millis(1))
        .handler_with_state(flaky(2), calls.clone())
        .unwrap();
    let settled = Arc::new(Mutex::new(Vec::new()));
    let s = settled.clone();
    let stats = broker
        .worker("q", consumer.clone())
        .on_settle(move |d| s.lock().unwrap().push((d.attempt, d.disposition.clone())))
        .run_until_idle()
        .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "two failed tries, one success"
    );
    assert_eq!(
        (stats.processed, stats.retries, stats.immediate_retries),
        (1, 0, 2)
    );
    assert_eq!(
        *settled.lock().unwrap(),
        vec![(1, Disposition::Ack { duplicate: false })],
        "one delivery, settled once, on attempt 1"
    );
    // The claim was re-taken by the successful try and completed: a redelivery is a
    // duplicate and does not run the handler.
    redelivery_is_a_duplicate(&broker, consumer, "m").await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn exhausted_immediate_retries_become_a_retry_copy_that_says_so() {
    let (broker, calls) = one_message("m");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (c, s) = (calls.clone(), seen.clone());
    let consumer = retrying_at_once(2)
        .store(MemoryStore::new())
        .backoff(fast_backoff(2))
        .service(tower::service_fn(move |m: Message| {
            c.fetch_add(1, Ordering::SeqCst);
            s.lock().unwrap().push(m.headers.clone());
            async { Err::<(), _>(std::io::Error::other("db down")) }
        }))
        .unwrap();
    let stats = broker.worker("q", consumer).run_until_idle().await;
    // Two deliveries (the original and one retry copy), three tries each.
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert_eq!(
        (stats.retries, stats.dead_lettered, stats.immediate_retries),
        (1, 1, 4)
    );
    let seen = seen.lock().unwrap();
    // Tries of one delivery see the same message: no attempt is spent in process.
    assert!(seen[..3].iter().all(|hd| !hd.contains_key(h::ATTEMPTS)));
    let copy = &seen[3];
    assert_eq!(copy[h::ATTEMPTS], HeaderValue::from(1u32));
    assert_eq!(copy[h::IMMEDIATE_RETRIES], HeaderValue::from(2u32));
    let dead = broker.peek_all("q.dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].headers[h::IMMEDIATE_RETRIES],
        HeaderValue::from(2u32)
    );
    assert_eq!(dead[0].failed_attempts(), 2);
}

#[tokio::test]
async fn permanent_errors_and_requested_delays_are_never_retried_at_once() {
    for (error, expect) in [
        (
            HandlerError::permanent as fn(&'static str) -> HandlerError,
            "dead_letter",
        ),
        (
            |e| HandlerError::retry_after(Duration::from_secs(60), e),
            "retry",
        ),
        (HandlerError::discard, "discard"),
    ] {
        let calls = Calls::default();
        let c = calls.clone();
        let consumer = retrying_at_once(5)
            .store(MemoryStore::new())
            .service(tower::service_fn(move |_m: Message| {
                c.fetch_add(1, Ordering::SeqCst);
                std::future::ready(Err::<(), _>(error("no")))
            }))
            .unwrap();
        let d = process_m(&consumer).await;
        assert_eq!(d.name(), expect);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{expect}: one try only");
        assert_eq!(consumer.stats().immediate_retries, 0);
    }
}

use crate::dedup::fakes::FakeStore;

#[tokio::test]
async fn store_failures_are_not_retried_at_once() {
    let calls = Calls::default();
    let consumer = retrying_at_once(5)
        .dedup(DedupLayer::new(FakeStore::down()))
        .without_circuit_breaker()
        .backoff(fast_backoff(5))
        .handler_with_state(flaky(0), calls.clone())
        .unwrap();
    let d = process_m(&consumer).await;
    assert_eq!(d.name(), "retry", "{d}");
    assert_eq!(consumer.stats().immediate_retries, 0);
    assert_eq!(calls.load(Ordering::SeqCst), 0, "never run without a claim");
}

#[tokio::test]
async fn each_try_gets_the_whole_handler_timeout() {
    // The first try hangs past the timeout; the second answers at once.
    let calls = Calls::default();
    let consumer = retrying_at_once(1)
        .store(MemoryStore::new())
        .handler_timeout(Duration::from_millis(100))
        .handler_with_state(
            |State(calls): State<Calls>| async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            },
            calls.clone(),
        )
        .unwrap();
    let d = process_m(&consumer).await;
    assert_eq!(d, Disposition::Ack { duplicate: false });
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(consumer.stats().immediate_retries, 1);
}

#[tokio::test]
async fn immediate_retries_are_not_counted_as_crashes() {
    // Each failed try settles (releases) its claim, so the start count the crash guard
    // reads never grows past one, even with more tries than the crash limit.
    let calls = Calls::default();
    let consumer = retrying_at_once(4)
        .store(MemoryStore::new())
        .crash_limit(1)
        .handler_with_state(flaky(4), calls.clone())
        .unwrap();
    let d = process_m(&consumer).await;
    assert_eq!(d, Disposition::Ack { duplicate: false });
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

#[test]
fn immediate_retries_must_fit_the_broker_timeout() {
    let consumer = |retries| {
        Consumer::builder("c")
            .handler_timeout(Duration::from_secs(60))
            .immediate_retries(retries)
            .immediate_retry_delay(Duration::from_secs(1))
            .handler(|| async {})
            .unwrap()
    };
    let broker = Duration::from_secs(300);
    assert!(consumer(3).check_broker_timeout(broker).is_ok()); // 4 x 60 + 3 = 243 s
    let err = consumer(4).check_broker_timeout(broker).unwrap_err(); // 5 x 60 + 4 = 304 s
    assert!(err.to_string().contains("immediate retries"), "{err}");
}

#[tokio::test]
async fn discard_acks_counts_and_records_done() {
    let (broker, calls) = one_message("old");
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .handler_with_state(
            |State(calls): State<Calls>| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(HandlerError::discard("stale: version 3 < 7"))
            },
            calls.clone(),
        )
        .unwrap();
    let settled = Arc::new(Mutex::new(Vec::new()));
    let s = settled.clone();
    let stats = broker
        .worker("q", consumer.clone())
        .on_settle(move |d| s.lock().unwrap().push(d.disposition.clone()))
        .run_until_idle()
        .await;
    assert_eq!(
        *settled.lock().unwrap(),
        vec![Disposition::Discard {
            reason: "stale: version 3 < 7".into()
        }]
    );
    assert_eq!(
        (
            stats.discarded,
            stats.processed,
            stats.retries,
            stats.dead_lettered
        ),
        (1, 0, 0, 0)
    );
    assert!(stats.to_string().contains("discarded=1"), "{stats}");
    assert!(broker.is_empty("q") && broker.is_empty("q.dlq"));
    // Recorded done: the redelivery is a duplicate, the handler does not run again.
    redelivery_is_a_duplicate(&broker, consumer, "old").await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn discard_without_a_store_is_still_an_ack_and_counted() {
    let consumer = Consumer::builder("c")
        .handler(|| async { Err::<(), _>(HandlerError::discard("not for us")) })
        .unwrap();
    let d = consumer.process(Message::new("{}")).await;
    assert_eq!(d.to_string(), "discarded on purpose, acked: not for us");
    assert!(d.is_ack());
    assert_eq!(consumer.stats().discarded, 1);
}

#[derive(Debug, thiserror::Error)]
#[error("ledger locked")]
struct LedgerLocked;

#[tokio::test]
async fn dead_letter_copies_name_the_error_type_host_and_process() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("{}").with_message_id("m"));
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .backoff(fast_backoff(1))
        .handler(|| async { Err::<(), _>(LedgerLocked) })
        .unwrap();
    broker.worker("q", consumer).run_until_idle().await;
    let dead = broker.peek_all("q.dlq");
    let hd = &dead[0].headers;
    let type_name = std::any::type_name::<LedgerLocked>();
    assert!(
        type_name.ends_with("recover_tests::LedgerLocked"),
        "{type_name}"
    );
    assert_eq!(hd[h::ERROR_TYPE], HeaderValue::from(type_name));
    assert_eq!(hd[h::HOST], HeaderValue::from(crate::outcome::host()));
    assert!(!crate::outcome::host().is_empty());
    assert_eq!(hd[h::PID], HeaderValue::from(std::process::id()));
    assert!(!hd.contains_key(h::BACKTRACE), "backtraces are opt-in");

    // Text errors have no informative type: the header is left out.
    let consumer = Consumer::builder("c")
        .handler(|| async { Err::<(), _>(HandlerError::transient("just text")) })
        .unwrap();
    let Disposition::Retry {
        failure, headers, ..
    } = consumer.process(Message::new("{}")).await
    else {
        panic!("expected a retry")
    };
    assert_eq!(failure.error_type, None);
    assert!(!headers.contains_key(h::ERROR_TYPE));
    assert_eq!(headers[h::HOST], HeaderValue::from(crate::outcome::host()));
}

#[tokio::test]
async fn the_handler_timeout_is_named_in_the_error_type() {
    let consumer = Consumer::builder("c")
        .handler_timeout(Duration::from_millis(10))
        .handler(|| async { tokio::time::sleep(Duration::from_secs(3600)).await })
        .unwrap();
    let Disposition::Retry { failure, .. } = consumer.process(Message::new("{}")).await else {
        panic!("expected a retry")
    };
    assert_eq!(
        failure.error_type.as_deref(),
        Some(std::any::type_name::<crate::HandlerTimeoutError>())
    );
}

#[inline(never)]
fn fail_deep_inside() -> Result<(), HandlerError> {
    Err(std::io::Error::other("deep failure"))?;
    Ok(())
}

#[tokio::test]
async fn the_backtrace_header_is_opt_in_and_bounded() {
    let consumer = |on| {
        Consumer::builder("c")
            .backtrace_header(on)
            .handler(|| async { fail_deep_inside() })
            .unwrap()
    };
    let Disposition::Retry {
        failure, headers, ..
    } = consumer(true).process(Message::new("{}")).await
    else {
        panic!("expected a retry")
    };
    let bt = failure.backtrace.expect("a backtrace when opted in");
    assert!(bt.len() <= MAX_BACKTRACE_LEN);
    assert!(
        bt.contains("fail_deep_inside"),
        "the backtrace shows where the error was made:\n{bt}"
    );
    assert_eq!(headers[h::BACKTRACE], HeaderValue::from(bt.as_str()));

    let Disposition::Retry {
        failure, headers, ..
    } = consumer(false).process(Message::new("{}")).await
    else {
        panic!("expected a retry")
    };
    assert_eq!(failure.backtrace, None);
    assert!(!headers.contains_key(h::BACKTRACE));
}

#[tokio::test]
async fn the_dead_letter_hook_sees_the_stored_copy_and_the_failure() {
    let broker = MemoryBroker::new();
    for id in ["bad-1", "ok-1", "bad-2"] {
        broker.publish("q", Message::new(id).with_message_id(id));
    }
    let reports: Arc<Mutex<Vec<(String, Failure, usize)>>> = Arc::default();
    let (r, b) = (reports.clone(), broker.clone());
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .on_dead_letter(move |d| {
            assert_eq!(
                (d.queue, d.dead_letter_queue, d.consumer),
                ("q", "q.dlq", "c")
            );
            assert_eq!(d.headers[h::CONSUMER], HeaderValue::from("c"));
            // Called after the copy is stored: it is in the DLQ already.
            let stored = b
                .peek_all("q.dlq")
                .iter()
                .filter(|m| m.properties.message_id.as_deref() == d.message_id)
                .count();
            r.lock().unwrap().push((
                d.message_id.unwrap_or("").to_owned(),
                d.failure.clone(),
                stored,
            ));
        })
        .handler(|msg: Message| async move {
            if msg.body.starts_with(b"bad") {
                Err(HandlerError::permanent(LedgerLocked))
            } else {
                Ok(())
            }
        })
        .unwrap();
    let stats = broker
        .worker("q", consumer)
        .prefetch(1)
        .run_until_idle()
        .await;
    assert_eq!((stats.processed, stats.dead_lettered), (1, 2));
    let reports = reports.lock().unwrap();
    let ids: Vec<&str> = reports.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        ["bad-1", "bad-2"],
        "one report per dead letter, none for the success"
    );
    for (_, failure, stored) in reports.iter() {
        assert_eq!(*stored, 1);
        assert_eq!(failure.error, "ledger locked");
        assert_eq!(failure.kind, crate::ErrorKind::Permanent);
        assert_eq!(
            failure.error_type.as_deref(),
            Some(std::any::type_name::<LedgerLocked>())
        );
    }
}
