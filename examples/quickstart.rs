//! Quickstart: the whole idem stack on the embedded defaults, no services: the
//! in-memory broker and a SQLite dedup store (a file in a temporary directory,
//! removed at the end).
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Publishes six messages to the queue `orders`: three orders, a second copy of
//! `order-2` (same idempotency key), `order-4` whose payment gateway times out twice
//! before it succeeds, and `order-5` whose payload is not JSON. Prints one line per
//! settled delivery and a summary line.

use std::time::Duration;

use idem::memory::MemoryBroker;
use idem::sql::SqliteStore;
use idem::{Attempt, Backoff, Consumer, HandlerError, IdempotencyKey, Jitter, Json, Message};

#[derive(serde::Deserialize)]
struct Order {
    item: String,
    cents: u64,
}

/// The handler: a plain async fn. Extractors pick what it needs from the message.
async fn place_order(
    key: IdempotencyKey,
    Attempt(attempt): Attempt,
    Json(order): Json<Order>,
) -> Result<(), HandlerError> {
    // A technical failure: retrying later can succeed.
    if key.as_str() == "order-4" && attempt <= 2 {
        return Err(HandlerError::transient("payment gateway timed out"));
    }
    let _charge = (order.item, order.cents);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = MemoryBroker::new();
    let orders = [
        ("order-1", r#"{"item":"book","cents":1200}"#),
        ("order-2", r#"{"item":"pen","cents":150}"#),
        ("order-3", r#"{"item":"lamp","cents":4500}"#),
        ("order-2", r#"{"item":"pen","cents":150}"#),
        ("order-4", r#"{"item":"desk","cents":25000}"#),
        ("order-5", r#"{"item": "chair", cents: oops"#),
    ];
    for (id, body) in orders {
        println!("publish  {id}  {body}");
        broker.publish(
            "orders",
            Message::new(body)
                .with_message_id(id)
                .with_content_type("application/json"),
        );
    }

    let dir = std::env::temp_dir().join(format!("idem-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(dir.join("dedup.db"))
                .create_if_missing(true),
        )
        .await?;
    let store = SqliteStore::new(db.clone());
    store.ensure_schema().await?;

    let consumer = Consumer::builder("order-service")
        .store(store)
        .backoff(
            Backoff::exponential(Duration::from_millis(100))
                .jitter(Jitter::None)
                .max_attempts(5),
        )
        .handler(place_order)?;

    let stats = broker
        .worker("orders", consumer)
        .prefetch(1)
        .on_settle(|settled| {
            let id = settled.message_id.unwrap_or("?");
            let (attempt, what) = (settled.attempt, settled.disposition);
            println!("settle   {id}  attempt {attempt}  {what}");
        })
        .run_until_idle()
        .await;

    println!(
        "dlq      orders.dlq holds {} message(s)",
        broker.len("orders.dlq")
    );
    db.close().await;
    std::fs::remove_dir_all(&dir)?;
    println!("summary: {stats}");
    Ok(())
}
