//! The failure record of a delivery through the PostgreSQL inbox names the key the
//! inbox resolved (`x-idem-key`), on the per-message path and on the batch path (a
//! message's own failure and a whole-batch failure); a message whose key could not be
//! resolved names its message id. DATABASE_URL, default
//! postgres://postgres@127.0.0.1:5432/postgres.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "postgres")]

use std::time::Duration;

use idem_core::batch::Batch;
use idem_core::dedup::HeaderKey;
use idem_core::outcome::headers as h;
use idem_core::{
    Backoff, Consumer, ConsumerBuilder, Disposition, HandlerError, HeaderValue, Jitter, Message,
};
use idem_sql::PgInbox;
use sqlx::PgPool;

mod common;
use common::{pg, unique};

/// An inbox keyed by the `order-id` header, so the key differs from the message id,
/// and the start of a consumer named after `tag` on it that tries a message three times.
async fn setup(tag: &str) -> (PgPool, PgInbox, ConsumerBuilder) {
    let pool = pg::pool(tag, 4).await;
    let inbox = pg::inbox(&pool, tag).await.key(HeaderKey::new("order-id"));
    let backoff = Backoff::exponential(Duration::from_millis(10))
        .jitter(Jitter::None)
        .max_attempts(3);
    let consumer = Consumer::builder(unique(&format!("{tag}-c")))
        .dedup(inbox.clone())
        .backoff(backoff);
    (pool, inbox, consumer)
}

/// `body` with message id `id` and, if given, the `order-id` header.
fn order(id: &str, order_id: Option<&str>, body: &'static str) -> Message {
    let msg = Message::new(body).with_message_id(id);
    match order_id {
        Some(o) => msg.with_header("order-id", o),
        None => msg,
    }
}

/// The key a disposition's failure record names, and the `x-idem-key` header of a
/// dead-letter copy (`None` for a retry copy, which does not carry it).
fn named_key(d: &Disposition) -> (Option<String>, Option<HeaderValue>) {
    match d {
        Disposition::Retry { failure, .. } => (failure.key.clone(), None),
        Disposition::DeadLetter { failure, headers } => {
            (failure.key.clone(), headers.get(h::KEY).cloned())
        }
        other => panic!("no failure record: {other:?}"),
    }
}

fn dead(key: &str) -> (Option<String>, Option<HeaderValue>) {
    (Some(key.to_owned()), Some(HeaderValue::from(key)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_message_failures_name_the_inbox_key() {
    let (pool, inbox, consumer) = setup("fkey").await;
    let consumer = consumer
        .handler(|msg: Message| async move {
            match &msg.body[..] {
                b"poison" => Err(HandlerError::permanent("no such order")),
                _ => Err(HandlerError::transient("ledger locked")),
            }
        })
        .unwrap();
    let d = consumer
        .process(order("m-1", Some("order-1"), "poison"))
        .await;
    assert_eq!(named_key(&d), dead("order-1"));
    let d = consumer
        .process(order("m-2", Some("order-2"), "down"))
        .await;
    assert!(matches!(d, Disposition::Retry { .. }), "{d:?}");
    assert_eq!(named_key(&d).0.as_deref(), Some("order-2"));
    // No `order-id`: poisoned before a key is resolved; the message id is named.
    let d = consumer.process(order("m-3", None, "poison")).await;
    assert_eq!(named_key(&d), dead("m-3"));
    pg::drop_inbox(&pool, &inbox, []).await;
}

/// Fails a message whose body is `poison` on its own; fails the whole batch when one
/// body is `boom`.
async fn judge(batch: Batch<Message>) -> Result<(), HandlerError> {
    if batch.iter().any(|item| &item.body[..] == b"boom") {
        return Err(HandlerError::transient("batch insert failed"));
    }
    batch
        .each(|item| async move {
            match &item.body[..] {
                b"poison" => Err(HandlerError::permanent("no such order")),
                _ => Ok(()),
            }
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_failures_name_the_inbox_key() {
    let (pool, inbox, consumer) = setup("fkeyb").await;
    let consumer = consumer
        .batch_size(3)
        .batch_wait(Duration::from_secs(2))
        .batch_handler(judge)
        .unwrap();
    // One batch: a success, a message that fails alone, one without a key.
    let (ok, poison, keyless) = tokio::join!(
        consumer.process(order("m-1", Some("order-1"), "fine")),
        consumer.process(order("m-2", Some("order-2"), "poison")),
        consumer.process(order("m-3", None, "fine")),
    );
    assert_eq!(ok, Disposition::Ack { duplicate: false });
    assert_eq!(named_key(&poison), dead("order-2"));
    assert_eq!(named_key(&keyless), dead("m-3"));
    // A batch that fails as a whole: each message's retry names its own key.
    let (a, b, c) = tokio::join!(
        consumer.process(order("m-4", Some("order-4"), "boom")),
        consumer.process(order("m-5", Some("order-5"), "fine")),
        consumer.process(order("m-6", Some("order-6"), "fine")),
    );
    for (d, key) in [(a, "order-4"), (b, "order-5"), (c, "order-6")] {
        assert!(matches!(d, Disposition::Retry { .. }), "{key}: {d:?}");
        assert_eq!(named_key(&d).0.as_deref(), Some(key));
    }
    pg::drop_inbox(&pool, &inbox, []).await;
}
