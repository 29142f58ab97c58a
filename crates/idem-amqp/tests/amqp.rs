//! Integration tests against the real local RabbitMQ (`AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). Every test uses its own queues and deletes
//! them. Delays use short custom tiers so the whole file stays fast.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_amqp::{Error, Exchange, Publisher, QueueType, Topology, Worker};
use idem_core::{Backoff, Consumer, HandlerError, HeaderValue, Json, MemoryStore, Message};
use idem_testkit::broker::{close_connections_named, inspect_queue};
use lapin::options::BasicGetOptions;
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

mod common;
use common::{
    fails_once, header, header_str, messages, short_tiers, stop_when, unique, url, wait_until,
    wait_until_async, Fixture,
};

async fn broker() -> (Connection, Channel) {
    common::broker("idem-test-admin").await
}

fn fast_backoff(attempts: u32) -> Backoff {
    idem_testkit::backoff(Duration::from_secs(1), attempts)
}

async fn count(ch: &Channel, queue: &str) -> u32 {
    idem_testkit::broker::ready_count(ch, queue).await
}

async fn get_one(ch: &Channel, queue: &str) -> Option<lapin::message::BasicGetMessage> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
}

/// A direct exchange bound to the topology's queue with a routing key (both
/// declared), so the origin of a delivery differs from "" / Q: its name and the key.
async fn bind_exchange(ch: &Channel, topology: &Topology) -> (String, String) {
    let exchange = unique("ex");
    let rk = format!("rk.{}", uuid::Uuid::new_v4().simple());
    let bound = topology
        .clone()
        .exchange(Exchange::direct(&exchange))
        .bind(&exchange, &rk);
    bound.declare_on(ch).await.unwrap();
    (exchange, rk)
}

#[tokio::test]
async fn ack_outcome_maps_headers_and_leaves_no_copies() {
    let f = Fixture::new("ack").await;
    let (ch, topo) = (&f.ch, &f.topo);
    let seen = Arc::new(Mutex::new(Vec::<Message>::new()));
    let s = seen.clone();
    let consumer = Consumer::builder("ack-test")
        .store(MemoryStore::new())
        .handler(move |msg: Message| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(msg);
                Ok::<(), HandlerError>(())
            }
        })
        .unwrap();
    let running = f.start(&consumer, |w| w.prefetch(10));

    // Odd and oversized headers must not break the conversion.
    let mut headers = FieldTable::default();
    headers.insert("x-n".into(), AMQPValue::LongInt(7));
    headers.insert("x-s".into(), AMQPValue::LongString("text".into()));
    // Large, but within the broker's frame_max (128 KiB): a header frame cannot span frames.
    headers.insert(
        "x-big".into(),
        AMQPValue::LongString(vec![b'z'; 64 << 10].into()),
    );
    headers.insert(
        "x-arr".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Boolean(true)])),
    );
    headers.insert(
        "x-bin".into(),
        AMQPValue::LongString(vec![0xff, 0x00].into()),
    );
    let props = BasicProperties::default()
        .with_message_id("ack-1".into())
        .with_content_type("text/plain".into())
        .with_headers(headers);
    ch.basic_publish(
        "".into(),
        topo.queue().into(),
        Default::default(),
        b"hello",
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
    f.publish((0..3).map(|i| Message::new(format!("m{i}")).with_message_id(format!("ack-m{i}"))))
        .await;

    let stats = stop_when(running, &consumer, "4 processed", 10, |s| s.processed == 4).await;
    assert_eq!(
        (stats.processed, stats.retries, stats.dead_lettered),
        (4, 0, 0)
    );
    let seen = seen.lock().unwrap().clone();
    let first = seen
        .iter()
        .find(|m| m.properties.message_id.as_deref() == Some("ack-1"))
        .unwrap();
    assert_eq!(&first.body[..], b"hello");
    assert_eq!(first.headers["x-n"], HeaderValue::Int(7));
    assert_eq!(first.header_str("x-s"), Some("text"));
    assert_eq!(first.header_str("x-big").map(str::len), Some(64 << 10));
    assert_eq!(first.headers["x-bin"], HeaderValue::Bytes(vec![0xff, 0]));
    assert!(!first.headers.contains_key("x-arr"));
    assert_eq!(first.delivery.queue, topo.queue());
    assert_eq!(first.delivery.routing_key, topo.queue());
    assert_eq!(first.delivery.attempt, 1);
    f.assert_empty_and_delete().await;
}

#[tokio::test]
async fn retry_copy_waits_its_tier_and_keeps_the_original_route() {
    let f = Fixture::new("retry").await;
    let (ch, topo) = (&f.ch, &f.topo);
    let (exchange, rk) = bind_exchange(ch, topo).await;
    let attempts = Arc::new(Mutex::new(Vec::<(Instant, Message)>::new()));
    let a = attempts.clone();
    let consumer = Consumer::builder("retry-test")
        .store(MemoryStore::new())
        .backoff(fast_backoff(5))
        .handler(move |msg: Message| {
            let a = a.clone();
            async move {
                let attempt = msg.delivery.attempt;
                a.lock().unwrap().push((Instant::now(), msg));
                if attempt == 1 {
                    Err(HandlerError::transient(std::io::Error::other("db down")))
                } else {
                    Ok(())
                }
            }
        })
        .unwrap();
    let running = f.start(&consumer, |w| w);

    let publisher = &f.publisher;
    let mut msg = Message::new("payload")
        .with_message_id("retry-1")
        .with_content_type("text/plain")
        .with_header("x-custom", "kept");
    publisher.publish(&exchange, &rk, &mut msg).await.unwrap();

    // While the copy waits, it is a message in the delay queue with the failure headers.
    let retry_q = topo.retry_queue(Duration::from_secs(1));
    wait_until("first attempt", Duration::from_secs(5), || {
        attempts.lock().unwrap().len() == 1
    })
    .await;
    let stats = stop_when(running, &consumer, "processed", 10, |s| s.processed == 1).await;
    assert_eq!((stats.retries, stats.processed), (1, 1));

    let attempts = attempts.lock().unwrap().clone();
    let (t1, first) = &attempts[0];
    let (t2, second) = &attempts[1];
    let waited = t2.duration_since(*t1);
    assert!(
        waited >= Duration::from_millis(900),
        "retry came back after {waited:?}, before its 1 s tier"
    );
    assert!(waited < Duration::from_secs(5), "retry took {waited:?}");
    assert_eq!((first.delivery.attempt, second.delivery.attempt), (1, 2));
    // The copy came back from Q.retry.1s via the default exchange, yet names the original route.
    assert_eq!(second.delivery.exchange, exchange);
    assert_eq!(second.delivery.routing_key, rk);
    assert_eq!(second.headers["x-idem-attempts"], HeaderValue::Int(1));
    assert_eq!(second.header_str("x-idem-error"), Some("db down"));
    assert_eq!(second.header_str("x-idem-error-kind"), Some("transient"));
    assert!(second.header_str("x-idem-first-failed-at").is_some());
    assert_eq!(
        second.header_str("x-idem-original-exchange"),
        Some(exchange.as_str())
    );
    assert_eq!(
        second.header_str("x-idem-original-routing-key"),
        Some(rk.as_str())
    );
    assert_eq!(second.header_str("x-custom"), Some("kept"));
    assert_eq!(second.properties.message_id.as_deref(), Some("retry-1"));
    assert_eq!(
        second.properties.content_type.as_deref(),
        Some("text/plain")
    );
    assert_eq!(&second.body[..], b"payload");
    assert_eq!(count(ch, &retry_q).await, 0);
    assert_eq!(count(ch, &topo.dlq()).await, 0);
    topo.delete_on(ch).await.unwrap();
    Exchange::direct(exchange).delete_on(ch).await.unwrap();
}

#[tokio::test]
async fn exhausted_attempts_dead_letter_with_full_headers() {
    let f = Fixture::new("exhaust").await;
    let (ch, topo) = (&f.ch, &f.topo);
    let (exchange, rk) = bind_exchange(ch, topo).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let consumer = Consumer::builder("exhaust-test")
        .store(MemoryStore::new())
        .backoff(fast_backoff(2))
        .handler(move || {
            r.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(std::io::Error::other("still down")) }
        })
        .unwrap();
    let running = f.start(&consumer, |w| w);
    let publisher = &f.publisher;
    let mut msg = Message::new("body-x")
        .with_message_id("exhaust-1")
        .with_header("x-custom", 42i64);
    publisher.publish(&exchange, &rk, &mut msg).await.unwrap();

    let stats = stop_when(running, &consumer, "dead-lettered", 10, |s| {
        s.dead_lettered == 1
    })
    .await;
    assert_eq!(
        (stats.retries, stats.dead_lettered, stats.processed),
        (1, 1, 0)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    let dead = get_one(ch, &topo.dlq())
        .await
        .expect("a message in the DLQ");
    let p = &dead.delivery.properties;
    assert_eq!(&dead.delivery.data[..], b"body-x");
    assert_eq!(
        p.message_id().as_ref().map(|s| s.as_str()),
        Some("exhaust-1")
    );
    assert_eq!(
        header(p, "x-idem-attempts").and_then(|v| v.as_long_long_int()),
        Some(2)
    );
    assert_eq!(header_str(p, "x-idem-error").as_deref(), Some("still down"));
    assert_eq!(
        header_str(p, "x-idem-error-kind").as_deref(),
        Some("transient")
    );
    assert_eq!(
        header_str(p, "x-idem-original-exchange"),
        Some(exchange.clone())
    );
    assert_eq!(
        header_str(p, "x-idem-original-routing-key"),
        Some(rk.clone())
    );
    assert_eq!(
        header_str(p, "x-idem-original-queue").as_deref(),
        Some(topo.queue())
    );
    assert_eq!(
        header_str(p, "x-idem-consumer").as_deref(),
        Some("exhaust-test")
    );
    assert_eq!(header_str(p, "x-idem-key").as_deref(), Some("exhaust-1"));
    assert!(header_str(p, "x-idem-first-failed-at").is_some());
    assert!(header_str(p, "x-idem-last-failed-at").is_some());
    assert_eq!(
        header(p, "x-custom").and_then(|v| v.as_long_long_int()),
        Some(42)
    );
    assert_eq!(count(ch, topo.queue()).await, 0);
    topo.delete_on(ch).await.unwrap();
    Exchange::direct(exchange).delete_on(ch).await.unwrap();
}

#[derive(serde::Deserialize)]
struct Order {
    #[allow(dead_code)]
    id: u64,
}

#[tokio::test]
async fn bad_input_is_dead_lettered_at_once() {
    let f = Fixture::new("bad").await;
    let (ch, topo) = (&f.ch, &f.topo);
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let consumer = Consumer::builder("bad-test")
        .store(MemoryStore::new())
        .handler(move |Json(_o): Json<Order>, msg: Message| {
            r.fetch_add(1, Ordering::SeqCst);
            async move {
                if msg.header_str("x-huge-error").is_some() {
                    return Err(HandlerError::permanent(std::io::Error::other(
                        "E".repeat(3 << 20),
                    )));
                }
                Ok(())
            }
        })
        .unwrap();
    let running = f.start(&consumer, |w| w);
    let publisher = &f.publisher;
    let q = topo.queue();
    // Invalid JSON, unknown content type, huge error: each keyed.
    let mut bad_json = Message::new("{not json").with_message_id("bad-json");
    publisher.publish("", q, &mut bad_json).await.unwrap();
    let mut xml = Message::new("<order/>")
        .with_message_id("bad-ct")
        .with_content_type("application/xml");
    publisher.publish("", q, &mut xml).await.unwrap();
    let mut huge = Message::new(r#"{"id":1}"#)
        .with_message_id("bad-huge")
        .with_header("x-huge-error", "1");
    publisher.publish("", q, &mut huge).await.unwrap();
    // No message_id and no x-idempotency-key: the key is missing (published raw, since
    // the Publisher always sets a message_id).
    ch.basic_publish(
        "".into(),
        q.into(),
        Default::default(),
        br#"{"id":2}"#,
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let stats = stop_when(running, &consumer, "4 dead-lettered", 10, |s| {
        s.dead_lettered == 4
    })
    .await;
    assert_eq!(
        (stats.retries, stats.processed, stats.dead_lettered),
        (0, 0, 4)
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "only the well-formed message reaches the handler"
    );
    let mut by_key = HashMap::new();
    while let Some(m) = get_one(ch, &topo.dlq()).await {
        let p = m.delivery.properties.clone();
        let id = p
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        by_key.insert(id, p);
    }
    assert_eq!(by_key.len(), 4);
    for p in by_key.values() {
        assert_eq!(
            header_str(p, "x-idem-error-kind").as_deref(),
            Some("permanent")
        );
        assert_eq!(
            header(p, "x-idem-attempts").and_then(|v| v.as_long_long_int()),
            Some(1)
        );
    }
    assert!(header_str(&by_key["bad-json"], "x-idem-error")
        .unwrap()
        .to_lowercase()
        .contains("json"));
    assert!(header_str(&by_key["bad-ct"], "x-idem-error")
        .unwrap()
        .contains("application/xml"));
    let huge_err = header_str(&by_key["bad-huge"], "x-idem-error").unwrap();
    assert!(
        huge_err.len() <= idem_core::outcome::MAX_ERROR_LEN,
        "error header is {} bytes",
        huge_err.len()
    );
    // 3 MiB cut to 2 KiB: the marker counts the bytes dropped, not the original length.
    assert_eq!(
        huge_err,
        format!("{}... [3143703 bytes cut]", "E".repeat(2025))
    );
    assert!(header_str(&by_key[""], "x-idem-error")
        .unwrap()
        .to_lowercase()
        .contains("key"));
    f.delete().await;
}

#[tokio::test]
async fn handlers_in_flight_never_exceed_prefetch() {
    let f = Fixture::new("prefetch").await;
    let current = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let (c, m) = (current.clone(), max.clone());
    let consumer = Consumer::builder("prefetch-test")
        .store(MemoryStore::new())
        .handler(move || {
            let (c, m) = (c.clone(), m.clone());
            async move {
                let now = c.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                c.fetch_sub(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
        .unwrap();
    f.publish(messages("p", 0..60)).await;
    let running = f.start(&consumer, |w| w.prefetch(4));
    stop_when(running, &consumer, "60 processed", 15, |s| {
        s.processed == 60
    })
    .await;
    let max = max.load(Ordering::SeqCst);
    assert!(max <= 4, "{max} handlers ran at once with prefetch 4");
    assert!(
        max >= 2,
        "deliveries were not processed concurrently (max {max})"
    );
    f.delete().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_and_loses_nothing() {
    let f = Fixture::new("shutdown").await;
    let (ch, topo) = (&f.ch, &f.topo);
    let store = MemoryStore::new();
    let runs = Arc::new(Mutex::new(HashMap::<String, (usize, usize)>::new()));
    let make_consumer = |runs: Arc<Mutex<HashMap<String, (usize, usize)>>>| {
        Consumer::builder("shutdown-test")
            .store(store.clone())
            .handler(move |msg: Message| {
                let runs = runs.clone();
                async move {
                    let id = msg.properties.message_id.clone().unwrap();
                    runs.lock().unwrap().entry(id.clone()).or_default().0 += 1;
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    runs.lock().unwrap().entry(id).or_default().1 += 1;
                    Ok::<(), HandlerError>(())
                }
            })
            .unwrap()
    };
    f.publish(messages("s", 0..20)).await;

    let first = make_consumer(runs.clone());
    let running = f.start(&first, |w| w.prefetch(5));
    wait_until("handlers started", Duration::from_secs(5), || {
        !runs.lock().unwrap().is_empty()
    })
    .await;
    let stats = running.shutdown_and_join().await.unwrap();
    {
        let runs = runs.lock().unwrap();
        assert!(!runs.is_empty());
        for (id, (started, finished)) in runs.iter() {
            assert_eq!(
                started, finished,
                "handler for {id} was cut off by shutdown"
            );
        }
        assert_eq!(stats.processed as usize, runs.len());
    }
    let left = count(ch, topo.queue()).await;
    assert_eq!(
        left as u64 + stats.processed,
        20,
        "messages were lost or kept unacked"
    );

    let second = make_consumer(runs.clone());
    let running = f.start(&second, |w| w.prefetch(5));
    stop_when(running, &second, "rest processed", 10, |s| {
        s.processed == u64::from(left)
    })
    .await;
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 20, "every message processed");
    assert!(
        runs.values().all(|(s, f)| (*s, *f) == (1, 1)),
        "a message was processed twice: {runs:?}"
    );
    f.delete().await;
}

#[tokio::test]
async fn forced_connection_close_resumes_consuming() {
    let f = Fixture::new("forced").await;
    let (ch, topo) = (&f.ch, &f.topo);
    let effects = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let e = effects.clone();
    let consumer = Consumer::builder("forced-test")
        .store(MemoryStore::new())
        .handler(move |msg: Message| {
            let e = e.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                *e.lock()
                    .unwrap()
                    .entry(msg.properties.message_id.unwrap())
                    .or_default() += 1;
                Ok::<(), HandlerError>(())
            }
        })
        .unwrap();
    let conn_name = unique("conn");
    let running = f.start(&consumer, |w| w.prefetch(5).connection_name(&conn_name));
    f.publish(messages("f", 0..30)).await;
    wait_until("some processed", Duration::from_secs(5), || {
        consumer.stats().processed >= 3
    })
    .await;
    assert_eq!(
        close_connections_named(&conn_name, "idem-test forced close").await,
        1,
        "the worker's connection was not found"
    );
    // Published after the close: only a resumed consumer can take these.
    f.publish(messages("f", 30..40)).await;
    wait_until_async("all 40 effects", Duration::from_secs(20), || {
        let e = effects.clone();
        async move { e.lock().unwrap().len() == 40 }
    })
    .await;
    wait_until_async("queue drained", Duration::from_secs(10), || {
        let ch = ch.clone();
        let q = topo.queue().to_owned();
        async move { count(&ch, &q).await == 0 }
    })
    .await;
    running.shutdown_and_join().await.unwrap();
    let effects = effects.lock().unwrap().clone();
    assert!(
        effects.values().all(|n| *n == 1),
        "an effect ran twice: {effects:?}"
    );
    f.delete().await;
}

#[tokio::test]
async fn two_workers_compete_and_each_message_is_processed_once() {
    let f = Fixture::new("compete").await;
    let (ch, topo) = (&f.ch, &f.topo);
    let store = MemoryStore::new();
    let effects = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let make = |tag: &'static str, per_worker: Arc<AtomicUsize>| {
        let e = effects.clone();
        Consumer::builder("compete-test")
            .store(store.clone())
            .handler(move |msg: Message| {
                let (e, w) = (e.clone(), per_worker.clone());
                async move {
                    let _ = tag;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    w.fetch_add(1, Ordering::SeqCst);
                    *e.lock()
                        .unwrap()
                        .entry(msg.properties.message_id.unwrap())
                        .or_default() += 1;
                    Ok::<(), HandlerError>(())
                }
            })
            .unwrap()
    };
    let (n1, n2) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c1, c2) = (make("a", n1.clone()), make("b", n2.clone()));
    let w1 = f.start(&c1, |w| w.prefetch(10));
    let w2 = f.start(&c2, |w| w.prefetch(10));
    wait_until_async("two consumers", Duration::from_secs(5), || {
        let ch = ch.clone();
        let q = topo.queue().to_owned();
        async move {
            let q = inspect_queue(&ch, &q).await.unwrap();
            q.consumer_count() == 2
        }
    })
    .await;
    // Every message published twice (a publisher retry): 200 deliveries, 100 effects.
    let msgs = || messages("c", 0..100);
    f.publish(msgs().chain(msgs())).await;
    let settled = || {
        let (a, b) = (c1.stats(), c2.stats());
        a.processed + a.duplicates + b.processed + b.duplicates
    };
    wait_until("200 settled", Duration::from_secs(15), || settled() == 200).await;
    let (s1, s2) = (
        w1.shutdown_and_join().await.unwrap(),
        w2.shutdown_and_join().await.unwrap(),
    );
    assert_eq!(s1.processed + s2.processed, 100);
    assert_eq!(s1.duplicates + s2.duplicates, 100);
    assert!(
        n1.load(Ordering::SeqCst) > 0 && n2.load(Ordering::SeqCst) > 0,
        "both workers consumed"
    );
    let effects = effects.lock().unwrap().clone();
    assert_eq!(effects.len(), 100);
    assert!(effects.values().all(|n| *n == 1));
    f.delete().await;
}

#[tokio::test]
async fn quorum_topology_retries_through_its_delay_queue() {
    let (conn, ch) = broker().await;
    let topo = Topology::new(unique("quorum"))
        .tiers(short_tiers())
        .queue_type(QueueType::Quorum)
        .delivery_limit(20);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let consumer = Consumer::builder("quorum-test")
        .store(MemoryStore::new())
        .backoff(fast_backoff(3))
        .handler_with_state(fails_once, c)
        .unwrap();
    // The worker declares the topology itself (the default).
    let running = Worker::builder(url(), topo.clone(), consumer.clone())
        .build()
        .unwrap()
        .spawn();
    wait_until_async("queue declared", Duration::from_secs(5), || {
        let probe = conn.create_channel();
        let q = topo.queue().to_owned();
        async move {
            // A passive declare of a missing queue closes the channel: probe on a fresh one.
            inspect_queue(&probe.await.unwrap(), &q).await.is_ok()
        }
    })
    .await;
    let publisher = Publisher::connect(&url()).await.unwrap();
    let mut msg = Message::new("q").with_message_id("quorum-1");
    publisher.publish("", topo.queue(), &mut msg).await.unwrap();
    let stats = stop_when(running, &consumer, "processed after a retry", 10, |s| {
        s.processed == 1
    })
    .await;
    assert_eq!(stats.retries, 1);
    topo.delete_on(&ch).await.unwrap();
}

#[tokio::test]
async fn publisher_reports_returns_and_sets_message_ids() {
    let f = Fixture::new("pub").await;
    let (ch, topo) = (&f.ch, &f.topo);
    let publisher = Publisher::connect(&url()).await.unwrap();
    let mut msg = Message::new("no id");
    publisher.publish("", topo.queue(), &mut msg).await.unwrap();
    let id = msg
        .properties
        .message_id
        .clone()
        .expect("an id was generated");
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
    let got = get_one(ch, topo.queue()).await.unwrap();
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        Some(id)
    );
    assert_eq!(got.delivery.properties.delivery_mode(), &Some(2));

    let mut lost = Message::new("nowhere");
    let err = publisher
        .publish("", &unique("missing"), &mut lost)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Returned { code: 312, .. }), "{err}");

    let mut batch: Vec<Message> = (0..50).map(|i| Message::new(format!("b{i}"))).collect();
    publisher
        .publish_batch("", topo.queue(), &mut batch)
        .await
        .unwrap();
    assert!(batch.iter().all(|m| m.properties.message_id.is_some()));
    assert_eq!(count(ch, topo.queue()).await, 50);
    publisher.close().await;
    f.delete().await;
}

#[tokio::test]
async fn unreachable_broker_fails_fast_without_leaking_the_password() {
    let consumer = Consumer::builder("unreachable")
        .handler(|| async {})
        .unwrap();
    let worker = Worker::builder("amqp://app:s3cretpw@127.0.0.1:1/%2f", "q", consumer)
        .build()
        .unwrap();
    let err = worker.run(std::future::pending()).await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("s3cretpw"), "{text}");
    assert!(text.contains("app:***@127.0.0.1:1"), "{text}");
    assert!(text.contains("is the broker running"), "{text}");
    // A library error for production users: no pointer to the repository's test set-up.
    assert!(!text.contains("Running the tests"), "{text}");
}

#[tokio::test]
async fn at_most_once_acks_before_the_handler_and_never_retries() {
    let f = Fixture::new("at-most-once").await;
    let (ch, topo) = (&f.ch, &f.topo);
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let consumer = Consumer::builder("at-most-once-test")
        .mode(idem_core::DeliveryMode::AtMostOnce)
        .handler(move || {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(HandlerError::transient(
                    "fails, and at-most-once does not retry",
                ))
            }
        })
        .unwrap();
    f.publish(messages("amo", 0..5)).await;
    let running = f.start(&consumer, |w| w.prefetch(5));
    wait_until("5 handled", Duration::from_secs(10), || {
        consumer.stats().dropped == 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the 1 s retry tier
    let stats = running.shutdown_and_join().await.unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        5,
        "each message ran once, no retry"
    );
    assert_eq!(
        (stats.processed, stats.retries, stats.dead_lettered),
        (0, 0, 0)
    );
    assert_eq!(count(ch, topo.queue()).await, 0, "acked on receipt");
    assert_eq!(
        count(ch, &topo.dlq()).await,
        0,
        "failures are dropped, not dead-lettered"
    );
    f.delete().await;
}

#[tokio::test]
async fn at_most_once_loses_the_message_when_the_worker_dies_mid_handler() {
    // The defining property of at-most-once: the ack went out before the handler ran,
    // so a worker that dies mid-handler does not get the message back.
    let f = Fixture::new("at-most-once-crash").await;
    let (ch, topo) = (&f.ch, &f.topo);
    let started = Arc::new(tokio::sync::Notify::new());
    let s = started.clone();
    let consumer = Consumer::builder("at-most-once-crash")
        .mode(idem_core::DeliveryMode::AtMostOnce)
        .handler(move || {
            let s = s.clone();
            async move {
                s.notify_one();
                std::future::pending::<()>().await;
            }
        })
        .unwrap();
    f.publish([Message::new("x").with_message_id("amo-crash")])
        .await;
    let worker = Worker::builder(url(), topo.clone(), consumer)
        .prefetch(1)
        .connection_name(unique("amo-crash"))
        .build()
        .unwrap();
    // A crash, not a shutdown: the task is aborted, so it runs on a bare tokio task.
    let running = tokio::spawn(worker.run(std::future::pending()));
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .unwrap();
    running.abort(); // the worker dies: its connection is dropped
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(ch, topo.queue()).await,
        0,
        "at-most-once: not redelivered"
    );
    f.delete().await;
}
