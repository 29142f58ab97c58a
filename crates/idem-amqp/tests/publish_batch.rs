//! `Publisher::publish_batch` against the real local RabbitMQ (`AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; see the README section "Set-up"): every
//! message confirmed and delivered in order across several in-flight windows, the first
//! failure reported for an unroutable message and for a missing exchange, and the
//! publisher usable again afterwards. Unique queue names, deleted at the end.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::time::Duration;

use idem_amqp::{Error, Publisher};
use idem_core::Message;
use idem_testkit::broker::declare_queue as declare;
use idem_testkit::{unique, Service};
use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use lapin::{Channel, Connection};

/// The broker's URL, an admin connection and channel, and a fresh queue named after
/// `tag`, declared.
async fn set_up(tag: &str) -> (String, Connection, Channel, String) {
    let url = Service::RabbitMq.url();
    let admin = idem_testkit::rabbitmq("idem-test-publish-batch-admin").await;
    let ch = admin.create_channel().await.unwrap();
    let queue = unique(tag);
    declare(&ch, &queue).await;
    (url, admin, ch, queue)
}

async fn delete(ch: &Channel, queue: &str) {
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

/// Reads `queue` until `want` messages came or 5 s passed (a confirmed publish can
/// take a moment to show on another connection), then whatever else is there.
async fn drain(ch: &Channel, queue: &str, want: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => bodies.push(String::from_utf8(m.delivery.data).unwrap()),
            None if bodies.len() >= want || tokio::time::Instant::now() > deadline => {
                return bodies
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn numbered(range: std::ops::Range<usize>) -> Vec<Message> {
    range.map(|i| Message::new(format!("m{i}"))).collect()
}

/// Asserts that `queue` holds the bodies `m0` to `m<n-1>`, in order.
async fn assert_numbered(ch: &Channel, queue: &str, n: usize) {
    let bodies = drain(ch, queue, n).await;
    let expected: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected);
}

/// The first failure of `err`, once it is an `Error::Batch` of `failed` of `total`.
fn first_failure(err: &Error, failed: usize, total: usize) -> &Error {
    match err {
        Error::Batch {
            failed: f,
            total: t,
            first,
        } => {
            assert_eq!((*f, *t), (failed, total), "{err}");
            first
        }
        other => panic!("expected Error::Batch, got {other:?}"),
    }
}

#[tokio::test]
async fn publish_batch_confirms_and_delivers_every_message_in_order_across_windows() {
    let (url, _admin, ch, queue) = set_up("publish-batch").await;
    // 2 500 messages in windows of 1 000: three windows, the last one partial.
    let publisher = Service::RabbitMq.expect_connected(
        &url,
        Publisher::builder(url.as_str())
            .connection_name("idem-test-publish-batch")
            .max_in_flight(1000)
            .connect()
            .await,
    );
    let mut msgs = numbered(0..2500);
    publisher
        .publish_batch("", &queue, &mut msgs)
        .await
        .unwrap();
    // Every message got its id before the first try (a re-publish reuses it).
    assert!(msgs.iter().all(|m| m.properties.message_id.is_some()));
    assert_numbered(&ch, &queue, 2500).await;
    publisher.close().await;
    delete(&ch, &queue).await;
}

#[tokio::test]
async fn publish_batch_reports_an_unroutable_message_and_delivers_the_others() {
    let (url, _admin, ch, queue) = set_up("publish-batch-returned").await;
    let missing_queue = format!("{queue}-missing");
    let publisher = Publisher::builder(url.as_str())
        .connection_name("idem-test-publish-batch-returned")
        .max_in_flight(2)
        .build();
    // Nothing is bound to `missing_queue`: the mandatory publish comes back.
    let mut good = numbered(0..3);
    publisher
        .publish_batch("", &queue, &mut good)
        .await
        .unwrap();
    let mut unroutable = numbered(3..5);
    let err = publisher
        .publish_batch("", &missing_queue, &mut unroutable)
        .await
        .unwrap_err();
    let first = first_failure(&err, 2, 2);
    assert!(
        matches!(first, Error::Returned { code: 312, routing_key, .. } if *routing_key == missing_queue),
        "{first:?}"
    );
    // The error names the destination, so a reader knows what to bind.
    assert!(err.to_string().contains("2 of 2"), "{err}");
    // A returned message does not break the channel: the next batch goes through.
    let mut more = numbered(5..8);
    publisher
        .publish_batch("", &queue, &mut more)
        .await
        .unwrap();
    assert_eq!(
        drain(&ch, &queue, 6).await,
        ["m0", "m1", "m2", "m5", "m6", "m7"]
    );
    publisher.close().await;
    delete(&ch, &queue).await;
}

#[tokio::test]
async fn publish_batch_to_a_missing_exchange_fails_clearly_and_the_publisher_recovers() {
    let (url, _admin, ch, queue) = set_up("publish-batch-no-exchange").await;
    let exchange = unique("no-such-exchange");
    let publisher = Publisher::builder(url.as_str())
        .connection_name("idem-test-publish-batch-no-exchange")
        .max_in_flight(4)
        .build();
    // 10 messages in windows of 4: the broker closes the channel on the first window,
    // so the later windows are never sent and every message counts as failed.
    let mut msgs = numbered(0..10);
    let err = publisher
        .publish_batch(&exchange, &queue, &mut msgs)
        .await
        .unwrap_err();
    let first = first_failure(&err, 10, 10);
    assert!(matches!(first, Error::Amqp { .. }), "{first:?}");
    // The broker's reason (404 NOT_FOUND, no exchange ...) reaches the caller.
    let text = first.to_string();
    assert!(
        text.contains("NOT_FOUND") || text.contains("no exchange"),
        "{text}"
    );
    // The next call opens a new channel: the same messages (same ids) now go through.
    publisher
        .publish_batch("", &queue, &mut msgs)
        .await
        .unwrap();
    assert_numbered(&ch, &queue, 10).await;
    publisher.close().await;
    delete(&ch, &queue).await;
}
