//! Quorum topologies against the real RabbitMQ (`AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; see the README section "Running the tests"
//! or `bash .ci/services`): delay queues that dead-letter at least once, and a clear
//! error for delay queues declared with the old arguments.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_amqp::{DelayTiers, Error, Publisher, QueueType, Topology, Worker};
use idem_core::{Consumer, MemoryStore, Message};
use idem_testkit::Service;
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Connection;

mod common;
use common::{fails_once, url, wait_processed};

async fn connect() -> Connection {
    let url = url();
    Service::RabbitMq.expect_connected(&url, idem_amqp::connect(&url, "idem-test-quorum").await)
}

fn topology(prefix: &str) -> Topology {
    Topology::new(format!(
        "idem-test-{prefix}-{}",
        uuid::Uuid::new_v4().simple()
    ))
    .tiers(DelayTiers::new([Duration::from_secs(1)]).unwrap())
    .queue_type(QueueType::Quorum)
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

/// The arguments quorum delay queues had before at-least-once dead-lettering.
fn old_retry_args(t: &Topology) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum"));
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(1000));
    args.insert("x-dead-letter-exchange".into(), long(""));
    args.insert("x-dead-letter-routing-key".into(), long(t.queue()));
    args
}

/// Declares `queue` with `args` on a fresh channel (a refusal closes the channel).
async fn declare(conn: &Connection, queue: &str, args: FieldTable) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
        .await;
    if r.is_ok() {
        let _ = ch.close(200, "bye".into()).await;
    }
    r.map(|_| ())
}

/// Whether `queue` exists (a passive declare on a fresh channel).
async fn exists(conn: &Connection, queue: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    let r = idem_testkit::broker::inspect_queue(&ch, queue).await;
    if r.is_ok() {
        let _ = ch.close(200, "bye".into()).await;
    }
    r.is_ok()
}

fn precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if *p.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
}

async fn delete(conn: &Connection, t: &Topology) {
    let ch = conn.create_channel().await.unwrap();
    t.delete_on(&ch).await.unwrap();
}

#[tokio::test]
async fn quorum_delay_queue_dead_letters_at_least_once_and_a_retry_comes_back() {
    let conn = connect().await;
    let t = topology("qq-retry");
    let retry = t.retry_queue(Duration::from_secs(1));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let consumer = Consumer::builder("qq-retry")
        .store(MemoryStore::new())
        .backoff(idem_testkit::backoff(Duration::from_secs(1), 3))
        .handler_with_state(fails_once, c)
        .unwrap();
    let worker = Worker::builder(url(), t.clone(), consumer.clone())
        .build()
        .unwrap();
    let running = worker.spawn();
    // The worker declared the delay queue with the at-least-once arguments: declaring
    // it again with them is accepted, with the old ones refused (406). Wait for the
    // worker's own declaration first (passively): an active declare from here could
    // create the queue before the worker has declared its work queue.
    let start = Instant::now();
    while !exists(&conn, &retry).await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the worker never declared {retry}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    declare(&conn, &retry, t.retry_args(Duration::from_secs(1)))
        .await
        .unwrap_or_else(|e| {
            panic!("{retry} is not declared with x-dead-letter-strategy=at-least-once, x-overflow=reject-publish: {e}")
        });
    let err = declare(&conn, &retry, old_retry_args(&t))
        .await
        .unwrap_err();
    assert!(precondition_failed(&err), "{err}");
    let args = t.retry_args(Duration::from_secs(1));
    assert_eq!(
        args.inner().get("x-dead-letter-strategy"),
        Some(&long("at-least-once"))
    );
    assert_eq!(
        args.inner().get("x-overflow"),
        Some(&long("reject-publish"))
    );

    // A retry goes through the quorum delay queue and comes back to the work queue.
    let publisher = Publisher::connect(&url()).await.unwrap();
    let mut msg = Message::new("q").with_message_id("qq-1");
    publisher.publish("", t.queue(), &mut msg).await.unwrap();
    let limit = Duration::from_secs(15);
    wait_processed("not processed after its retry", limit, &consumer, 1).await;
    let stats = running.shutdown_and_join().await.unwrap();
    assert_eq!((stats.retries, stats.processed), (1, 1), "{stats:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    publisher.close().await;
    delete(&conn, &t).await;
}

#[tokio::test]
async fn quorum_delay_queue_with_the_old_arguments_is_refused_with_what_to_do() {
    let conn = connect().await;
    let t = topology("qq-old");
    let retry = t.retry_queue(Duration::from_secs(1));
    declare(&conn, &retry, old_retry_args(&t)).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let err = t.declare_on(&ch).await.unwrap_err();
    let text = err.to_string();
    match &err {
        Error::Inequivalent { queue, .. } => assert_eq!(queue, &retry),
        other => panic!("expected Error::Inequivalent, got {other:?}"),
    }
    for part in [
        "PRECONDITION_FAILED",
        "x-dead-letter-strategy=at-least-once",
        "x-overflow=reject-publish",
        "rabbitmqctl delete_queue",
        "stop the workers",
    ] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }
    // Nothing was deleted: the old queue is still there, with its arguments.
    declare(&conn, &retry, old_retry_args(&t)).await.unwrap();
    delete(&conn, &t).await;
}
