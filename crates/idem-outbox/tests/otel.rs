//! Trace context through the outbox (feature `otel`, enabled for this crate's tests
//! by its dev-dependency on itself): `enqueue` stores the enqueuer's span context in
//! the row, and the relay, running later in a span of its own, publishes that context,
//! not its own. A `traceparent` the caller set on the row is kept.
//!
//! Needs PostgreSQL (`DATABASE_URL`) and RabbitMQ (`AMQP_URL`); see the README section
//! "Set-up: two commands".

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::time::Duration;

use idem_amqp::convert::headers_from_table;
use idem_core::otel;
use idem_outbox::{Outbox, OutboxMessage, Relay};
use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use tracing::Instrument;

mod common;

#[tokio::test]
async fn the_relay_publishes_the_enqueuers_trace_context() {
    // Current-thread runtime: everything below runs on this thread, under this subscriber.
    let (exporter, _guard) = idem_testkit::spans::capture();

    let pool = common::pg().await;
    let (conn, ch, queue) = common::named_queue("idem-test-outbox-otel", "outbox_otel").await;
    let amqp_url = common::amqp_url();
    let outbox = Outbox::new(&idem_testkit::unique("outbox_otel")).unwrap();
    outbox.ensure_schema(&pool).await.unwrap();

    let own = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    async {
        let mut tx = pool.begin().await.unwrap();
        let traced = OutboxMessage::new("", queue.clone(), b"traced".to_vec());
        outbox.enqueue(&mut tx, traced).await.unwrap();
        let set =
            OutboxMessage::new("", queue.clone(), b"own".to_vec()).header(otel::TRACEPARENT, own);
        outbox.enqueue(&mut tx, set).await.unwrap();
        tx.commit().await.unwrap();
    }
    .instrument(tracing::info_span!("checkout"))
    .await;

    let relay = Relay::builder(pool.clone(), outbox.clone(), amqp_url.as_str()).build();
    let relayed = relay
        .drain()
        .instrument(tracing::info_span!("relay round"))
        .await
        .unwrap();
    assert_eq!(relayed.published, 2);

    let mut published = Vec::new();
    for _ in 0..100 {
        match ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => published.push(m.delivery),
            None if published.len() == 2 => break,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    idem_testkit::drop_pg_table(&pool, outbox.table_name()).await;
    let _ = conn.close(200, "bye".into()).await;

    assert_eq!(published.len(), 2);
    let traceparent = |body: &[u8]| {
        let d = published.iter().find(|d| d.data == body).unwrap();
        let headers = headers_from_table(d.properties.headers().as_ref().unwrap());
        headers[otel::TRACEPARENT].as_str().unwrap().to_owned()
    };
    let spans = exporter.get_finished_spans().unwrap();
    let checkout = spans.iter().find(|s| s.name == "checkout").unwrap();
    assert_eq!(
        traceparent(b"traced"),
        format!(
            "00-{}-{}-01",
            checkout.span_context.trace_id(),
            checkout.span_context.span_id()
        ),
        "the enqueuer's span, not the relay's"
    );
    assert_eq!(traceparent(b"own"), own);
}
