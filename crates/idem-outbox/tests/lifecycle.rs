//! A relay whose task is aborted in the middle of a batch leaves nothing behind:
//! against the real local PostgreSQL (`DATABASE_URL`) and RabbitMQ (`AMQP_URL`),
//! with `rabbitmqctl` to see the relay's connection.
//!
//! The aborted relay's leased rows are free again at once (its transaction is gone,
//! so no row stays locked), its broker connection is closed, and a second relay then
//! publishes every row, each ordering key's rows in the order they were enqueued.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use idem_outbox::{Outbox, OutboxMessage, Relay};
use idem_testkit::broker::{connection_closes, wait_until};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeleteOptions};
use sqlx::PgPool;

const KEYS: usize = 10;
const PER_KEY: usize = 60;

mod common;
use common::amqp_url;

/// Rows not yet published, and how many of them another transaction could lease now.
async fn pending_and_free(pool: &PgPool, table: &str) -> (i64, i64) {
    let mut tx = pool.begin().await.unwrap();
    let pending: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE published_at IS NULL"
    ))
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let free: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM (SELECT id FROM {table} WHERE published_at IS NULL
         FOR UPDATE SKIP LOCKED) s"
    ))
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    (pending, free)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_a_relay_aborted_mid_batch_leaves_no_lease_and_no_connection() {
    let pool = common::pg().await;
    let table = idem_testkit::unique("lifecycle_outbox");
    let outbox = Outbox::new(&table).unwrap();
    outbox.ensure_schema(&pool).await.unwrap();
    let (conn, ch, queue) =
        common::named_queue("idem-test-relay-lifecycle", "relay_lifecycle").await;
    let amqp = amqp_url();

    // Rows interleaved across keys, so every batch holds several keys' runs.
    let mut tx = pool.begin().await.unwrap();
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            let msg = OutboxMessage::new("", queue.as_str(), format!("{key}:{seq}"))
                .ordering_key(format!("k{key}"));
            outbox.enqueue(&mut tx, msg).await.unwrap();
        }
    }
    tx.commit().await.unwrap();
    let total = KEYS * PER_KEY;

    // The first relay is aborted once it has published some rows and not all.
    let name = idem_testkit::unique("relay");
    let relay = Relay::builder(pool.clone(), outbox.clone(), amqp.as_str())
        .connection_name(&name)
        .batch_size(50)
        .build();
    let task = tokio::spawn(async move { relay.run(std::future::pending()).await });
    let started = wait_until(Duration::from_secs(30), async || {
        idem_testkit::broker::ready_count(&ch, &queue).await > 0
    })
    .await;
    assert!(started, "the first relay published nothing in 30 s");
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let (pending, _) = pending_and_free(&pool, &table).await;
    assert!(
        pending > 0,
        "the relay finished before the abort; nothing to check"
    );

    // No row stays leased: every pending row can be taken by another relay.
    let freed = wait_until(Duration::from_secs(2), async || {
        let (pending, free) = pending_and_free(&pool, &table).await;
        pending == free
    })
    .await;
    assert!(
        freed,
        "rows still leased 2 s after the abort: (pending, free) = {:?}",
        pending_and_free(&pool, &table).await
    );
    let closed = connection_closes(&name, Duration::from_secs(10)).await;
    assert!(
        closed,
        "the aborted relay's connection {name} is still open"
    );

    // A second relay publishes everything left.
    let second = Relay::builder(pool.clone(), outbox.clone(), amqp.as_str())
        .batch_size(50)
        .build();
    second.drain().await.unwrap();
    assert_eq!(pending_and_free(&pool, &table).await, (0, 0));

    // Every row arrived; per key, first arrivals in enqueue order (a row published by
    // the aborted relay and not marked is published again: a duplicate, later).
    let mut seen: HashSet<String> = HashSet::new();
    let mut next: HashMap<usize, usize> = HashMap::new();
    loop {
        let got = ch
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap();
        let Some(m) = got else { break };
        m.ack(BasicAckOptions::default()).await.unwrap();
        let body = String::from_utf8(m.delivery.data.clone()).unwrap();
        if !seen.insert(body.clone()) {
            continue;
        }
        let (key, seq) = body.split_once(':').unwrap();
        let (key, seq): (usize, usize) = (key.parse().unwrap(), seq.parse().unwrap());
        let expected = next.entry(key).or_default();
        assert_eq!(seq, *expected, "key k{key} out of order");
        *expected += 1;
    }
    assert_eq!(seen.len(), total, "rows missing from the queue");

    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
}
