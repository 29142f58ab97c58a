//! The outbox publishes to an exchange by name with a routing key (issue 24): one row
//! reaches every queue bound to it with a matching key, once each, with the row's
//! idempotency key; a row no queue is bound for is refused by the broker and stays
//! pending. Needs the local PostgreSQL and RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use idem_amqp::{Exchange, Topology};
use idem_outbox::{OutboxMessage, Relay};
use lapin::options::{BasicAckOptions, BasicGetOptions};

mod common;
use common::{amqp_url, message_id, Fixture};

/// Every ready message of `queue`, acked, in order.
async fn drain(ch: &lapin::Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        m.ack(BasicAckOptions::default()).await.unwrap();
        out.push(m.delivery);
    }
    out
}

#[tokio::test]
async fn a_row_for_an_exchange_reaches_each_bound_queue_once() {
    let f = Fixture::new("fx").await;
    let run = idem_testkit::unique("outbox");
    let orders = Exchange::topic(format!("{run}_orders"));
    let billing = Topology::new(format!("{run}_billing"))
        .exchange(orders.clone())
        .bind(orders.name(), "order.*");
    let audit = Topology::new(format!("{run}_audit"))
        .exchange(orders.clone())
        .bind(orders.name(), "order.#");
    for t in [&billing, &audit] {
        t.declare_on(&f.ch).await.unwrap();
    }

    let to_orders =
        |key: &str, body: &[u8]| f.enqueue(OutboxMessage::new(orders.name(), key, body.to_vec()));
    let created = to_orders("order.created", b"created").await;
    let unbound = to_orders("payment.failed", b"nobody listens").await;
    let relay = Relay::builder(f.pool.clone(), f.outbox.clone(), amqp_url()).build();
    let stats = relay.drain().await.unwrap();
    assert_eq!((stats.published, stats.refused), (1, 1), "{stats:?}");

    // A confirmed publish is in every bound queue already.
    for t in [&billing, &audit] {
        let got = drain(&f.ch, t.queue()).await;
        let ids: Vec<String> = got.iter().map(message_id).collect();
        assert_eq!(ids, [created.to_string()], "{}", t.queue());
        assert_eq!(got[0].data, b"created");
        assert_eq!(got[0].exchange.as_str(), orders.name());
        assert_eq!(got[0].routing_key.as_str(), "order.created");
    }
    // The unroutable row is kept for a later round, not dropped.
    let status = f.outbox.status(&f.pool).await.unwrap();
    assert_eq!((status.pending, status.published), (1, 1));
    let pending: String = sqlx::query_scalar(&format!(
        "SELECT message_id FROM {} WHERE published_at IS NULL",
        f.outbox.table_name()
    ))
    .fetch_one(&f.pool)
    .await
    .unwrap();
    assert_eq!(pending, unbound.to_string());

    for t in [&billing, &audit] {
        t.delete_on(&f.ch).await.unwrap();
    }
    orders.delete_on(&f.ch).await.unwrap();
    f.cleanup(&[]).await;
}
