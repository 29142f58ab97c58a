//! Bad input in idem's own headers and in the key header, through the whole stack on
//! the in-memory broker (issue 11, section 4). The RabbitMQ versions of these checks
//! are in `crates/idem-amqp/tests/amqp.rs`.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::memory::MemoryBroker;
use idem_core::outcome::headers as h;
use idem_core::{
    Backoff, Consumer, HandlerError, HeaderValue, IdempotencyKey, MemoryStore, Message, State,
};

fn fast_backoff(attempts: u32) -> Backoff {
    idem_testkit::backoff(Duration::from_millis(5), attempts)
}

use idem_testkit::logs::LogCapture as Captured;

type Runs = Arc<Mutex<HashMap<String, Vec<u32>>>>;

/// A consumer whose handler records (key, attempt) and always fails transiently.
fn always_down(budget: u32) -> (Consumer, Runs) {
    let runs = Runs::default();
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .backoff(fast_backoff(budget))
        .handler_with_state(
            |key: IdempotencyKey, meta: Message, State(runs): State<Runs>| async move {
                runs.lock()
                    .unwrap()
                    .entry(key.to_string())
                    .or_default()
                    .push(meta.delivery.attempt);
                Err::<(), _>(HandlerError::transient("down"))
            },
            runs.clone(),
        )
        .unwrap();
    (consumer, runs)
}

#[tokio::test]
async fn attempts_header_is_read_by_one_monotonic_rule() {
    // (message id, x-idem-attempts value, handler runs, attempts recorded in the DLQ)
    let max = u32::MAX;
    let cases: Vec<(&str, HeaderValue, Vec<u32>, u32)> = vec![
        // Valid counts are trusted: past the budget of 3, the first failure is the last.
        ("two", HeaderValue::Int(2), vec![3], 3),
        (
            "int-1e9",
            HeaderValue::Int(1_000_000_000),
            vec![1_000_000_001],
            1_000_000_001,
        ),
        (
            "text-1e9",
            "1000000000".into(),
            vec![1_000_000_001],
            1_000_000_001,
        ),
        // Beyond u32: saturates, so 2^40 is "more" than 1e9 (it used to read as 0).
        ("int-2^40", HeaderValue::Int(1 << 40), vec![max], max),
        ("text-2^40", (1u64 << 40).to_string().into(), vec![max], max),
        // Malformed: ignored as absent, the full budget of 3 runs.
        ("neg", HeaderValue::Int(-1), vec![1, 2, 3], 3),
        ("text-neg", "-1".into(), vec![1, 2, 3], 3),
        ("abc", "abc".into(), vec![1, 2, 3], 3),
        ("float-text", "3.0".into(), vec![1, 2, 3], 3),
        ("bool", HeaderValue::Bool(true), vec![1, 2, 3], 3),
        ("bytes", HeaderValue::Bytes(vec![0xff]), vec![1, 2, 3], 3),
    ];
    let logs = Captured::default();
    let _guard = logs.install();
    let broker = MemoryBroker::new();
    for (id, value, _, _) in &cases {
        broker.publish(
            "q",
            Message::new("{}")
                .with_message_id(*id)
                .with_header(h::ATTEMPTS, value.clone()),
        );
    }
    let (consumer, runs) = always_down(3);
    let stats = broker.worker("q", consumer).run_until_idle().await;
    assert_eq!(stats.dead_lettered, cases.len() as u64);
    let dlq: HashMap<String, Message> = broker
        .peek_all("q.dlq")
        .into_iter()
        .map(|m| (m.properties.message_id.clone().unwrap(), m))
        .collect();
    let runs = runs.lock().unwrap().clone();
    let warns = logs.lines();
    for (id, value, want_runs, want_attempts) in &cases {
        assert_eq!(runs[*id], *want_runs, "{id}: attempts seen by the handler");
        assert_eq!(
            dlq[*id].headers[h::ATTEMPTS],
            HeaderValue::Int(i64::from(*want_attempts)),
            "{id}: x-idem-attempts in the DLQ"
        );
        let shown = idem_core::read::describe(value);
        let about_it: Vec<&String> = warns
            .iter()
            .filter(|l| l.contains("header x-idem-attempts has value") && l.contains(&shown))
            .collect();
        let malformed = want_runs.len() == 3;
        assert_eq!(
            about_it.len(),
            usize::from(malformed),
            "{id}: one warn for a malformed value, none for a valid one: {about_it:?}"
        );
    }
}

#[tokio::test]
async fn malformed_first_failed_at_is_ignored_and_a_future_one_counts_as_now() {
    let logs = Captured::default();
    let _guard = logs.install();
    let broker = MemoryBroker::new();
    broker.publish(
        "q",
        Message::new("{}")
            .with_message_id("bad-time")
            .with_header(h::FIRST_FAILED_AT, "yesterday"),
    );
    broker.publish(
        "q",
        Message::new("{}")
            .with_message_id("future")
            .with_header(h::FIRST_FAILED_AT, "9999-01-01T00:00:00.000Z"),
    );
    let (consumer, _runs) = always_down(1);
    let before = std::time::SystemTime::now();
    broker.worker("q", consumer).run_until_idle().await;
    let after = std::time::SystemTime::now();
    for m in broker.peek_all("q.dlq") {
        let first = m.header_str(h::FIRST_FAILED_AT).unwrap();
        let first = idem_core::__private::parse_rfc3339(first).unwrap();
        // rfc3339 keeps milliseconds: allow the rounding below `before`.
        assert!(
            first + Duration::from_millis(1) >= before && first <= after,
            "{:?}: first failure {first:?} is this failure",
            m.properties.message_id
        );
    }
    let warns = logs.lines_with("header x-idem-first-failed-at has value \"yesterday\"");
    assert_eq!(warns.len(), 1, "{:?}", logs.lines());
}

#[tokio::test]
async fn replay_header_of_the_wrong_type_is_no_replay() {
    // A poison message is dead-lettered; a copy with x-idem-replay = 1 (integer) is not
    // a replay (the CLI writes a string), so it is dead-lettered again, with a warn.
    let logs = Captured::default();
    let _guard = logs.install();
    let broker = MemoryBroker::new();
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .handler(|| async { Err::<(), _>(HandlerError::permanent("bad")) })
        .unwrap();
    broker.publish("q", Message::new("{}").with_message_id("p"));
    broker.worker("q", consumer.clone()).run_until_idle().await;
    broker.publish(
        "q",
        Message::new("{}")
            .with_message_id("p")
            .with_header(idem_core::dedup::REPLAY_HEADER, 1i64),
    );
    broker.worker("q", consumer).run_until_idle().await;
    let dlq = broker.peek_all("q.dlq");
    assert_eq!(dlq.len(), 2);
    assert!(dlq[1]
        .header_str(h::ERROR)
        .unwrap()
        .contains("dead-lettered as poison before"));
    let warns = logs.lines_with("header x-idem-replay has value 1 (integer), expected a string");
    assert!(!warns.is_empty(), "{:?}", logs.lines());
}

#[tokio::test]
async fn handler_timeout_is_named_with_its_value_in_the_dlq_and_the_log() {
    let logs = Captured::default();
    let _guard = logs.install();
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("{}").with_message_id("slow"));
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .backoff(fast_backoff(1))
        .handler_timeout(Duration::from_millis(50))
        .handler(|| async { tokio::time::sleep(Duration::from_secs(30)).await })
        .unwrap();
    let stats = broker.worker("q", consumer).run_until_idle().await;
    assert_eq!(stats.dead_lettered, 1);
    let dlq = broker.peek_all("q.dlq");
    assert_eq!(
        dlq[0].header_str(h::ERROR),
        Some("handler timed out after 50ms (handler_timeout)")
    );
    assert_eq!(dlq[0].header_str(h::ERROR_KIND), Some("transient"));
    let warns = logs.lines_with("handler timed out after 50ms (handler_timeout)");
    assert!(
        warns.iter().any(|l| l.contains("dead-lettered")),
        "{:?}",
        logs.lines()
    );
}

#[tokio::test]
async fn integer_key_header_is_a_key_and_a_boolean_one_is_named() {
    let broker = MemoryBroker::new();
    // No message_id: the key header decides. 42 and "42" are the same key.
    broker.publish(
        "q",
        Message::new("{}").with_header(idem_core::message::IDEMPOTENCY_KEY_HEADER, 42i64),
    );
    broker.publish(
        "q",
        Message::new("{}").with_header(idem_core::message::IDEMPOTENCY_KEY_HEADER, "42"),
    );
    broker.publish(
        "q",
        Message::new("{}").with_header(idem_core::message::IDEMPOTENCY_KEY_HEADER, true),
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let consumer = Consumer::builder("c")
        .store(MemoryStore::new())
        .handler_with_state(
            |key: IdempotencyKey, State(seen): State<Arc<Mutex<Vec<String>>>>| async move {
                seen.lock().unwrap().push(key.to_string());
            },
            seen.clone(),
        )
        .unwrap();
    let stats = broker.worker("q", consumer).run_until_idle().await;
    assert_eq!(
        (stats.processed, stats.duplicates, stats.dead_lettered),
        (1, 1, 1)
    );
    assert_eq!(*seen.lock().unwrap(), vec!["42".to_owned()]);
    let dlq = broker.peek_all("q.dlq");
    assert_eq!(
        dlq[0].header_str(h::ERROR),
        Some("idempotency-key header x-idempotency-key holds a boolean (true); a key must be a non-empty string or an integer")
    );
    assert_eq!(dlq[0].header_str(h::ERROR_KIND), Some("permanent"));
}
