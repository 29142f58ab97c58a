//! Both transports write the same headers on retry and dead-letter copies: the
//! consumer computes them ([`Disposition`](idem_core::Disposition) carries them), the
//! in-memory broker and the RabbitMQ worker only merge them onto the original's
//! headers. Runs one always-failing message through each (same queue name, same
//! consumer name, same key) and compares the `x-idem-*` headers of the retry copy (as
//! the handler sees it on attempt 2) and of the dead-lettered copy. A field the later
//! failure does not have (its error type) is not carried over from the earlier one.
//!
//! Needs RabbitMQ (`AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`); see
//! the README section "Set-up: two commands".

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_amqp::convert::headers_from_table;
use idem_amqp::{DelayTiers, Publisher, Topology, Worker};
use idem_core::memory::MemoryBroker;
use idem_core::outcome::headers as h;
use idem_core::{Consumer, HandlerError, HeaderValue, Headers, MemoryStore, Message};

mod common;
use common::settled_dead_letter;

const CONSUMER: &str = "copy-headers";
const KEY: &str = "copy-headers-key";

/// The `x-idem-*` headers of a copy, without the two failure times (they differ
/// between runs by nature).
fn idem_headers(headers: &Headers) -> BTreeMap<String, HeaderValue> {
    headers
        .iter()
        .filter(|(name, _)| name.starts_with("x-idem-"))
        .filter(|(name, _)| ![h::FIRST_FAILED_AT, h::LAST_FAILED_AT].contains(&name.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn names(headers: &Headers) -> Vec<&str> {
    headers
        .keys()
        .map(String::as_str)
        .filter(|n| n.starts_with("x-idem-"))
        .collect()
}

/// A consumer whose handler always fails (transient), recording the headers of each
/// delivery it sees. Two attempts: one retry copy, then the dead-letter copy. The
/// first failure is a typed error (`std::io::Error`), the second plain text, which
/// has no type to report.
fn failing_consumer(seen: Arc<Mutex<Vec<Headers>>>) -> Consumer {
    let service = tower::service_fn(move |msg: Message| {
        let mut seen = seen.lock().unwrap();
        seen.push(msg.headers.clone());
        let err = if seen.len() == 1 {
            HandlerError::transient(std::io::Error::other("always fails"))
        } else {
            HandlerError::transient("always fails, in plain text")
        };
        async { Err::<(), _>(err) }
    });
    Consumer::builder(CONSUMER)
        .store(MemoryStore::new())
        .backoff(idem_testkit::backoff(Duration::from_secs(1), 2))
        .service(service)
        .unwrap()
}

fn message() -> Message {
    Message::new("{}")
        .with_message_id(KEY)
        .with_header("x-app", "kept")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_broker_and_rabbitmq_write_the_same_copy_headers() {
    let queue = format!("idem-test-copy-headers-{}", uuid::Uuid::new_v4().simple());

    // In memory.
    let broker = MemoryBroker::new();
    broker.publish(&queue, message());
    let mem_seen = Arc::new(Mutex::new(Vec::new()));
    let stats = broker
        .worker(&queue, failing_consumer(mem_seen.clone()))
        .run_until_idle()
        .await;
    assert_eq!((stats.retries, stats.dead_lettered), (1, 1));
    let mem_seen = mem_seen.lock().unwrap().clone();
    assert_eq!(mem_seen.len(), 2, "first delivery and one retry copy");
    let mem_dlq = broker.peek_all(&format!("{queue}.dlq"));
    assert_eq!(mem_dlq.len(), 1);
    let mem_dead = mem_dlq[0].headers.clone();

    // On RabbitMQ.
    let url = idem_amqp::amqp_url_from_env();
    let publisher = Publisher::connect(&url).await.unwrap_or_else(|e| {
        panic!("RabbitMQ not reachable ({e}): this test needs it; see the README section \"Set-up: two commands\" or set AMQP_URL")
    });
    let topo =
        Topology::new(queue.clone()).tiers(DelayTiers::new([Duration::from_secs(1)]).unwrap());
    let conn = idem_amqp::connect(&url, "idem-test-copy-headers")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    // Declared before the worker starts, so the publish below has a queue to go to.
    topo.declare_on(&ch).await.unwrap();
    let amqp_seen = Arc::new(Mutex::new(Vec::new()));
    let consumer = failing_consumer(amqp_seen.clone());
    let running = Worker::builder(url.as_str(), topo.clone(), consumer.clone())
        .prefetch(1)
        .build()
        .unwrap()
        .spawn();
    let mut msg = message();
    publisher.publish("", &queue, &mut msg).await.unwrap();
    let dead = settled_dead_letter(&ch, &topo, &consumer, 0, Duration::from_secs(20)).await;
    let stats = running.shutdown_and_join().await.unwrap();
    assert_eq!((stats.retries, stats.dead_lettered), (1, 1));
    let amqp_seen = amqp_seen.lock().unwrap().clone();
    assert_eq!(amqp_seen.len(), 2, "first delivery and one retry copy");
    let amqp_dead = dead
        .delivery
        .properties
        .headers()
        .as_ref()
        .map(headers_from_table)
        .unwrap_or_default();
    topo.delete_on(&ch).await.unwrap();
    publisher.close().await;
    let _ = conn.close(200, "bye".into()).await;

    // The retry copy: same x-idem-* names and values (times aside) on both.
    let (mem_retry, amqp_retry) = (&mem_seen[1], &amqp_seen[1]);
    assert_eq!(
        names(mem_retry),
        names(amqp_retry),
        "retry copy header names"
    );
    assert_eq!(idem_headers(mem_retry), idem_headers(amqp_retry));
    for name in [
        h::ATTEMPTS,
        h::ERROR,
        h::ERROR_KIND,
        h::FIRST_FAILED_AT,
        h::LAST_FAILED_AT,
        h::ORIGINAL_EXCHANGE,
        h::ORIGINAL_ROUTING_KEY,
    ] {
        assert!(mem_retry.contains_key(name), "retry copy lacks {name}");
    }
    assert_eq!(
        mem_retry[h::ORIGINAL_ROUTING_KEY],
        HeaderValue::from(queue.as_str())
    );

    // The dead-lettered copy: same names and values (times aside), original headers kept.
    assert_eq!(
        names(&mem_dead),
        names(&amqp_dead),
        "dead-letter header names"
    );
    assert_eq!(idem_headers(&mem_dead), idem_headers(&amqp_dead));
    for name in [h::ORIGINAL_QUEUE, h::CONSUMER, h::KEY, h::ORIGINAL_EXCHANGE] {
        assert!(mem_dead.contains_key(name), "dead-letter copy lacks {name}");
    }
    assert_eq!(mem_dead[h::CONSUMER], HeaderValue::from(CONSUMER));
    assert_eq!(mem_dead[h::KEY], HeaderValue::from(KEY));
    assert_eq!(
        mem_dead[h::ORIGINAL_QUEUE],
        HeaderValue::from(queue.as_str())
    );
    for dead in [&mem_dead, &amqp_dead] {
        assert_eq!(dead["x-app"], HeaderValue::from("kept"));
    }

    // The retry copy names the first failure's error type; the second failure has
    // none, so the dead-letter copy must not keep the first one's.
    for retry in [mem_retry, amqp_retry] {
        assert_eq!(
            retry.get(h::ERROR_TYPE),
            Some(&HeaderValue::from("std::io::error::Error"))
        );
    }
    for dead in [&mem_dead, &amqp_dead] {
        assert_eq!(
            dead.get(h::ERROR_TYPE),
            None,
            "a stale error type from attempt 1 on the dead-letter copy"
        );
        assert_eq!(
            dead.get(h::ERROR),
            Some(&HeaderValue::from("always fails, in plain text"))
        );
    }
}
