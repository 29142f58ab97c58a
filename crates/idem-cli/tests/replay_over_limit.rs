//! `idem dlq replay` clears every failure header idem writes (issue 22): a message
//! dead-lettered for going over a quorum queue's delivery limit comes back from a
//! replay with a fresh history, runs, and is acked. Before the fix the replayed copy
//! kept `x-idem-delivery-count` and was dead-lettered again without running.
//!
//! Needs the local RabbitMQ (see the README section "Running the tests").

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use common::{depth, replay_all, wait_for};
use idem_amqp::{Publisher, QueueType, Topology, Worker};
use idem_core::crash::{BROKER_DELIVERY_COUNT_HEADER, DELIVERY_COUNT_HEADER};
use idem_core::outcome::headers as h;
use idem_core::{Consumer, ErrorKind, Failure, MemoryStore, Message, State};

/// The handler: counts its run in `runs` and succeeds.
async fn count_run(State(runs): State<Arc<AtomicUsize>>) {
    runs.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test]
async fn replay_of_an_over_limit_dead_letter_runs_it_once_and_acks_it() {
    let conn = common::connect().await;
    let q = format!("idem-cli-test-overlimit-{}", uuid::Uuid::new_v4().simple());
    let topology = Topology::new(q.as_str())
        .queue_type(QueueType::Quorum)
        .delivery_limit(2)
        .tiers(idem_cli::topology::parse_tiers("1s").unwrap());
    idem_cli::topology::declare(&conn, &topology).await.unwrap();

    // The "busy" copy a consumer publishes after its worker crashed on the message
    // three times (see idem_core::crash): the carried delivery count is 3, over the
    // limit of 2, and it carries the failure history of an earlier typed failure
    // (error type, host, pid, immediate retries, backtrace).
    // As the transport hands it to the consumer: RabbitMQ's `x-delivery-count` of 3
    // mapped into the delivery's count.
    let mut crashed = Message::new(r#"{"cents":500}"#).with_message_id("over-1");
    crashed.delivery.delivery_count = 3;
    crashed.delivery.redelivered = true;
    crashed.delivery.queue = q.clone();
    let mut failure = Failure::new(ErrorKind::Transient, "ledger locked", 0, SystemTime::now());
    failure.key = Some("over-1".into());
    failure.error_type = Some("billing::LedgerLocked".into());
    failure.immediate_retries = 2;
    failure.backtrace = Some("0: billing::charge".into());
    let mut busy = Message::new(r#"{"cents":500}"#).with_message_id("over-1");
    busy.headers = failure.retry_headers(&crashed);
    busy.headers.remove(BROKER_DELIVERY_COUNT_HEADER);
    assert_eq!(
        busy.header_str(h::ERROR_TYPE),
        Some("billing::LedgerLocked")
    );
    let publisher = Publisher::connect(&common::url()).await.unwrap();
    publisher.publish("", &q, &mut busy).await.unwrap();

    let runs = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::builder("overlimit-test")
        .store(MemoryStore::new())
        .handler_with_state(count_run, runs.clone())
        .unwrap();
    let worker = Worker::builder(common::url(), topology.clone(), consumer.clone())
        .prefetch(5)
        .build()
        .unwrap()
        .spawn();

    // Over the limit: dead-lettered without running.
    let dlq = topology.dlq();
    wait_for("the over-limit message reaches the DLQ", async || {
        depth(&conn, &dlq).await == 1
    })
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let listed = idem_cli::dlq::list(&conn, &q, 10).await.unwrap();
    assert!(
        listed[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("x-delivery-limit")),
        "{listed:?}"
    );

    // The operator replays it with the CLI.
    let out = replay_all(&q).await;
    assert!(out.contains("1 of 1"), "{out}");

    // It runs once and is acked: nothing left in Q or its DLQ.
    wait_for("the replayed message runs", async || {
        runs.load(Ordering::SeqCst) == 1
    })
    .await;
    wait_for("Q and its DLQ are empty", async || {
        depth(&conn, &q).await == 0 && depth(&conn, &dlq).await == 0
    })
    .await;
    let stats = worker.shutdown_and_join().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // The over-limit dead-lettering happens in the worker, before the consumer: the
    // consumer saw one delivery, the replayed one, and acked it.
    assert_eq!((stats.processed, stats.dead_lettered), (1, 0), "{stats:?}");

    let ch = conn.create_channel().await.unwrap();
    topology.delete_on(&ch).await.unwrap();
    publisher.close().await;
    let _ = conn.close(200, "bye".into()).await;
}

/// Every header a replay must clear is gone from a replayed copy, whatever wrote it:
/// the test below builds a dead letter carrying all of them.
#[test]
fn every_failure_header_is_cleared_by_a_replay() {
    let mut headers = lapin::types::FieldTable::default();
    for name in idem_core::outcome::headers::FAILURE {
        headers.insert(name.into(), lapin::types::AMQPValue::LongInt(1));
    }
    headers.insert(
        DELIVERY_COUNT_HEADER.into(),
        lapin::types::AMQPValue::LongInt(3),
    );
    let props = lapin::BasicProperties::default().with_headers(headers);
    let copy = idem_cli::dlq::replay_properties(&props, "replay-1", None);
    let t = copy.headers().clone().unwrap();
    let left: Vec<&str> = t
        .inner()
        .keys()
        .map(|k| k.as_str())
        .filter(|k| *k != idem_core::dedup::REPLAY_HEADER)
        .collect();
    assert!(left.is_empty(), "left on the replayed copy: {left:?}");
}
