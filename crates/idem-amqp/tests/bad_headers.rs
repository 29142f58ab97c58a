//! Bad input in headers, published with a raw lapin client to the real local RabbitMQ
//! (`AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`), as a producer that
//! does not use idem would (issue 11, section 4). Every test uses its own queues and
//! deletes them.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_amqp::{DelayTiers, Topology, Worker};
use idem_core::{Consumer, HandlerError, IdempotencyKey, MemoryStore, Message};
use lapin::options::BasicGetOptions;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

mod common;
use common::{header, header_str, stop_when, unique, url};

async fn broker() -> (Connection, Channel) {
    common::broker("idem-test-bad-headers").await
}

/// Deletes a test's queues when dropped, also when the test fails.
struct Cleanup(Option<Topology>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(topo) = self.0.take() else { return };
        // Drop cannot await: delete on a runtime of its own, on another thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(conn) = idem_amqp::connect(&url(), "idem-test-cleanup").await {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = topo.delete_on(&ch).await;
                    }
                }
            });
        })
        .join();
    }
}

/// Publishes `body` to the default exchange, routing key `queue`, with these headers
/// and no message_id unless `id` is given, and waits for the broker's confirm.
async fn publish_raw(ch: &Channel, queue: &str, id: Option<&str>, headers: FieldTable) {
    let mut props = BasicProperties::default().with_headers(headers);
    if let Some(id) = id {
        props = props.with_message_id(id.into());
    }
    ch.basic_publish("".into(), queue.into(), Default::default(), b"{}", props)
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Drains `queue`: (properties of) every message in it.
async fn drain(ch: &Channel, queue: &str) -> Vec<BasicProperties> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(m.delivery.properties.clone());
    }
    out
}

use idem_testkit::logs::LogCapture as Captured;

/// How a published `x-idem-attempts` value must be read.
enum Read {
    /// As this many failed attempts.
    Count(u32),
    /// As absent, with a warn showing the value like this.
    Malformed(&'static str),
}

#[tokio::test]
async fn raw_attempts_headers_follow_one_monotonic_rule() {
    let logs = Captured::default();
    let _guard = logs.install();
    let (_conn, ch) = broker().await;
    let topo =
        Topology::new(unique("attempts")).tiers(DelayTiers::new([Duration::from_secs(1)]).unwrap());
    topo.declare_on(&ch).await.unwrap();
    let _cleanup = Cleanup(Some(topo.clone()));
    let runs: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let r = runs.clone();
    // Budget: 2 attempts. The handler is always down.
    let consumer = Consumer::builder("bad-attempts")
        .store(MemoryStore::new())
        .backoff(idem_testkit::backoff(Duration::from_secs(1), 2))
        .handler(move |key: IdempotencyKey, msg: Message| {
            r.lock()
                .unwrap()
                .entry(key.to_string())
                .or_default()
                .push(msg.delivery.attempt);
            async { Err::<(), _>(HandlerError::transient("down")) }
        })
        .unwrap();
    let worker = Worker::builder(url(), topo.clone(), consumer.clone())
        .build()
        .unwrap();
    let running = worker.spawn();

    use Read::{Count, Malformed};
    let billion = 1_000_000_000;
    let cases: Vec<(&str, AMQPValue, Read)> = vec![
        // Valid: trusted. Every count here is >= 1, so the next failure spends the
        // budget of 2 (a count past it: dead-lettered at the first failure).
        ("one", AMQPValue::LongLongInt(1), Count(1)),
        (
            "longlong-1e9",
            AMQPValue::LongLongInt(billion.into()),
            Count(billion),
        ),
        (
            "long-1e9",
            AMQPValue::LongInt(1_000_000_000),
            Count(billion),
        ),
        (
            "text-1e9",
            AMQPValue::LongString("1000000000".into()),
            Count(billion),
        ),
        // Beyond u32: saturates (2^40 used to read as 0, i.e. fewer than 1e9).
        (
            "longlong-2^40",
            AMQPValue::LongLongInt(1 << 40),
            Count(u32::MAX),
        ),
        (
            "text-2^40",
            AMQPValue::LongString((1u64 << 40).to_string().into()),
            Count(u32::MAX),
        ),
        ("ulong-max", AMQPValue::LongUInt(u32::MAX), Count(u32::MAX)),
        // Malformed: ignored as absent (full budget), one warn naming header and value.
        (
            "longlong-neg",
            AMQPValue::LongLongInt(-1),
            Malformed("-1 (integer)"),
        ),
        (
            "byte-neg",
            AMQPValue::ShortShortInt(-3),
            Malformed("-3 (integer)"),
        ),
        (
            "text-neg",
            AMQPValue::LongString("-1".into()),
            Malformed("\"-1\" (string)"),
        ),
        (
            "abc",
            AMQPValue::LongString("abc".into()),
            Malformed("\"abc\" (string)"),
        ),
        (
            "bool",
            AMQPValue::Boolean(true),
            Malformed("true (boolean)"),
        ),
        (
            "double",
            AMQPValue::Double(3.0),
            Malformed("\"3.0\" (a float)"),
        ),
        (
            "binary",
            AMQPValue::LongString(vec![0xff, 0xfe].into()),
            Malformed("2 bytes (binary, not UTF-8 text)"),
        ),
        // AMQP types that look like a number once flattened are still the wrong type.
        (
            "timestamp",
            AMQPValue::Timestamp(5),
            Malformed("5 (a timestamp)"),
        ),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue { scale: 0, value: 5 }),
            Malformed("\"5\" (a decimal)"),
        ),
        (
            "table",
            AMQPValue::FieldTable(FieldTable::default()),
            Malformed("a field table"),
        ),
    ];
    for (id, value, ..) in &cases {
        let mut h = FieldTable::default();
        h.insert("x-idem-attempts".into(), value.clone());
        publish_raw(&ch, topo.queue(), Some(id), h).await;
    }
    let n = cases.len() as u64;
    let stats = stop_when(running, &consumer, "all dead-lettered", 30, |s| {
        s.dead_lettered == n
    })
    .await;
    // Retries only for the malformed ones (one each, budget 2).
    let malformed = cases.iter().filter(|c| matches!(c.2, Malformed(_))).count() as u64;
    assert_eq!((stats.dead_lettered, stats.retries), (n, malformed));

    let dlq: HashMap<String, BasicProperties> = drain(&ch, &topo.dlq())
        .await
        .into_iter()
        .map(|p| (p.message_id().as_ref().unwrap().to_string(), p))
        .collect();
    let runs = runs.lock().unwrap().clone();
    let warns = logs.lines();
    for (id, _, read) in &cases {
        let (want_runs, want_attempts) = match read {
            Count(c) => (vec![c.saturating_add(1)], c.saturating_add(1)),
            Malformed(_) => (vec![1, 2], 2),
        };
        assert_eq!(runs[*id], want_runs, "{id}: attempts seen by the handler");
        assert_eq!(
            header(&dlq[*id], "x-idem-attempts").and_then(|v| v.as_long_long_int()),
            Some(i64::from(want_attempts)),
            "{id}: x-idem-attempts in the DLQ"
        );
        if let Malformed(shown) = read {
            let line = format!("header x-idem-attempts has value {shown}, expected a non-negative integer; ignored as if absent");
            let hits = warns.iter().filter(|l| l.contains(&line)).count();
            assert_eq!(hits, 1, "{id}: one warn `{line}` in {warns:#?}");
        }
    }
    assert_eq!(
        warns
            .iter()
            .filter(|l| l.contains("header x-idem-attempts has value"))
            .count(),
        malformed as usize,
        "no warn for valid counts: {warns:#?}"
    );
}

#[tokio::test]
async fn integer_key_headers_are_keys_and_wrong_types_are_named() {
    let (_conn, ch) = broker().await;
    let topo =
        Topology::new(unique("keys")).tiers(DelayTiers::new([Duration::from_secs(1)]).unwrap());
    topo.declare_on(&ch).await.unwrap();
    let _cleanup = Cleanup(Some(topo.clone()));
    let keys: Arc<Mutex<Vec<String>>> = Arc::default();
    let k = keys.clone();
    let consumer = Consumer::builder("bad-keys")
        .store(MemoryStore::new())
        .handler(move |key: IdempotencyKey| {
            k.lock().unwrap().push(key.to_string());
            async {}
        })
        .unwrap();
    // One at a time, so the duplicate finds its twin done rather than in progress.
    let worker = Worker::builder(url(), topo.clone(), consumer.clone())
        .prefetch(1)
        .build()
        .unwrap();
    let running = worker.spawn();

    // Every AMQP integer type, signed and unsigned: the key is the decimal text.
    let good: Vec<(AMQPValue, &str)> = vec![
        (AMQPValue::ShortShortInt(-5), "-5"),
        (AMQPValue::ShortShortUInt(200), "200"),
        (AMQPValue::ShortInt(-300), "-300"),
        (AMQPValue::ShortUInt(60_000), "60000"),
        (AMQPValue::LongInt(-70_000), "-70000"),
        (AMQPValue::LongUInt(u32::MAX), "4294967295"),
        (AMQPValue::LongLongInt(i64::MAX), "9223372036854775807"),
    ];
    for (value, _) in &good {
        let mut h = FieldTable::default();
        h.insert("x-idempotency-key".into(), value.clone());
        publish_raw(&ch, topo.queue(), None, h).await;
    }
    // The same key as text: a duplicate of the unsigned 32-bit one.
    let mut h = FieldTable::default();
    h.insert(
        "x-idempotency-key".into(),
        AMQPValue::LongString("4294967295".into()),
    );
    publish_raw(&ch, topo.queue(), None, h).await;

    // Wrong types: dead-lettered at once, the error naming the header and the type.
    let tail = "; a key must be a non-empty string or an integer";
    let bad: Vec<(&str, AMQPValue, String)> = vec![
        ("bool", AMQPValue::Boolean(true), "a boolean (true)".into()),
        ("double", AMQPValue::Double(1.5), "a float".into()),
        (
            "table",
            AMQPValue::FieldTable(FieldTable::default()),
            "a field table".into(),
        ),
        (
            "timestamp",
            AMQPValue::Timestamp(1_700_000_000),
            "a timestamp".into(),
        ),
        (
            "bytes",
            AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2, 3])),
            "3 bytes of binary data, not UTF-8 text".into(),
        ),
        (
            "latin1",
            AMQPValue::LongString(vec![0xe9].into()),
            "1 bytes of binary data, not UTF-8 text".into(),
        ),
    ];
    for (case, value, _) in &bad {
        let mut h = FieldTable::default();
        h.insert("x-idempotency-key".into(), value.clone());
        h.insert("x-case".into(), AMQPValue::LongString((*case).into()));
        publish_raw(&ch, topo.queue(), None, h).await;
    }

    let total = (good.len() + 1 + bad.len()) as u64;
    let stats = stop_when(running, &consumer, "every message settled", 30, |s| {
        s.processed + s.duplicates + s.dead_lettered == total
    })
    .await;
    assert_eq!(
        (stats.processed, stats.duplicates, stats.dead_lettered),
        (good.len() as u64, 1, bad.len() as u64)
    );
    let mut seen = keys.lock().unwrap().clone();
    seen.sort();
    let mut want: Vec<String> = good.iter().map(|(_, k)| (*k).to_owned()).collect();
    want.sort();
    assert_eq!(seen, want);

    let dlq: HashMap<String, BasicProperties> = drain(&ch, &topo.dlq())
        .await
        .into_iter()
        .map(|p| (header_str(&p, "x-case").unwrap(), p))
        .collect();
    assert_eq!(dlq.len(), bad.len());
    for (case, _, found) in &bad {
        let p = &dlq[*case];
        assert_eq!(
            header_str(p, "x-idem-error"),
            Some(format!(
                "idempotency-key header x-idempotency-key holds {found}{tail}"
            )),
            "{case}"
        );
        assert_eq!(
            header_str(p, "x-idem-error-kind").as_deref(),
            Some("permanent")
        );
    }
}
