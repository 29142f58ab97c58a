//! The core consumer holds a handler to its own `handler_timeout` only: broker limits
//! (RabbitMQ's `consumer_timeout`) are checked by the transport that has them
//! (idem-amqp `tests/broker_timeout.rs`). The in-memory broker has none.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::time::Duration;

use idem_core::memory::MemoryBroker;
use idem_core::{Consumer, MemoryStore, Message};

#[tokio::test(start_paused = true)]
async fn a_memory_broker_consumer_can_have_a_40_minute_handler_timeout() {
    let forty_minutes = Duration::from_secs(40 * 60);
    let consumer = Consumer::builder("long-handler")
        .store(MemoryStore::new())
        .handler_timeout(forty_minutes)
        // A handler that needs 35 min: longer than RabbitMQ's default 30 min limit,
        // inside its own 40 min timeout.
        .handler(|| async { tokio::time::sleep(Duration::from_secs(35 * 60)).await })
        .unwrap();
    let broker = MemoryBroker::new();
    broker.publish("long-handler", Message::new("{}").with_message_id("m-1"));
    let stats = broker
        .worker("long-handler", consumer)
        .run_until_idle()
        .await;
    assert_eq!(
        (stats.processed, stats.retries, stats.dead_lettered),
        (1, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn the_handler_timeout_still_applies() {
    let consumer = Consumer::builder("too-long-handler")
        .handler_timeout(Duration::from_secs(40 * 60))
        .handler(|| async { tokio::time::sleep(Duration::from_secs(41 * 60)).await })
        .unwrap();
    let d = consumer
        .process(Message::new("{}").with_message_id("m-1"))
        .await;
    let text = format!("{d:?}");
    assert!(text.starts_with("Retry"), "{text}");
    assert!(text.contains("handler timed out after 2400s"), "{text}");
}
