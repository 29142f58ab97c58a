//! Redelivery: technical errors are retried, content errors go straight to the DLQ.
//!
//! ```text
//! cargo run --example redelivery [-- --queue redelivery]
//! ```
//!
//! An inventory service imports stock updates into its database (SQLite here). Two
//! things go wrong, and idem treats them differently:
//! - the database is down for maintenance during the first seconds (simulated: the
//!   store refuses writes while a flag is down). That is a *technical* error: retrying
//!   later can succeed, so idem publishes a retry copy into a delay queue (confirmed by
//!   the broker), acks the original, and the copy comes back with backoff; once the
//!   database is back, every update lands.
//! - some messages are malformed (not JSON, a missing field, a negative quantity). That
//!   is a *content* error: retrying never helps, so the message is "poison acked":
//!   moved to the dead-letter queue at once, where it does not block the queue and is not
//!   lost.
//!
//! Ends by printing the DLQ's contents grouped by error and leaves those messages in
//! `<queue>.dlq` for the operator CLI (`idem dlq list <queue>`). The queues are purged
//! at start.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem::amqp::{Publisher, Topology, Worker};
use idem::{Backoff, Consumer, HandlerError, Jitter, Json, MemoryStore, Message, ResultExt, State};
use idem_examples::{describe, Finished};
use lapin::options::BasicGetOptions;

#[derive(serde::Deserialize)]
struct StockUpdate {
    sku: String,
    quantity: i64,
}

#[derive(Clone)]
struct Inventory {
    db: sqlx::SqlitePool,
    up: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Unavailable;
impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("database unavailable (maintenance)")
    }
}
impl std::error::Error for Unavailable {}

#[derive(Debug)]
struct Invalid(String);
impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Invalid {}

async fn import(
    State(inv): State<Inventory>,
    Json(update): Json<StockUpdate>,
) -> Result<(), HandlerError> {
    if update.quantity < 0 {
        return Err(Invalid(format!(
            "quantity {} for {} is negative",
            update.quantity, update.sku
        )))
        .permanent();
    }
    if !inv.up.load(Ordering::SeqCst) {
        return Err(Unavailable).transient();
    }
    sqlx::query("INSERT INTO stock (sku, quantity) VALUES (?, ?) ON CONFLICT (sku) DO UPDATE SET quantity = excluded.quantity")
        .bind(&update.sku)
        .bind(update.quantity)
        .execute(&inv.db)
        .await
        .transient()?;
    println!("store    {} = {}", update.sku, update.quantity);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let queue = idem_examples::arg("--queue").unwrap_or_else(|| "redelivery".to_owned());
    let url = idem_examples::amqp_url();
    let admin = idem_examples::rabbit().await?;
    let ch = admin.create_channel().await?;
    let tiers = idem::amqp::DelayTiers::new([
        Duration::from_secs(1),
        Duration::from_secs(2),
        Duration::from_secs(5),
    ])
    .ok_or("no tiers")?;
    let topology = Topology::new(queue.clone()).tiers(tiers);
    topology.delete_on(&ch).await?;
    topology.declare_on(&ch).await?;

    let dir = std::env::temp_dir().join(format!("idem-redelivery-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(dir.join("inventory.db"))
                .create_if_missing(true),
        )
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, quantity INTEGER NOT NULL)",
    )
    .execute(&db)
    .await?;
    let inventory = Inventory {
        db: db.clone(),
        up: Arc::new(AtomicBool::new(false)),
    };
    println!("database down for maintenance for the first 2.5 s");

    let publisher = Publisher::connect(&url).await?;
    let mut bodies: Vec<(String, String)> = (1..=12)
        .map(|i| {
            (
                format!("update-{i}"),
                format!(r#"{{"sku":"sku-{i}","quantity":{}}}"#, i * 10),
            )
        })
        .collect();
    bodies.insert(3, ("update-bad-json".into(), "sku-4;quantity=7".into()));
    bodies.insert(7, ("update-no-qty".into(), r#"{"sku":"sku-77"}"#.into()));
    bodies.insert(
        11,
        (
            "update-negative".into(),
            r#"{"sku":"sku-99","quantity":-5}"#.into(),
        ),
    );
    for (id, body) in &bodies {
        let mut msg = Message::new(body.clone())
            .with_message_id(id.clone())
            .with_content_type("application/json");
        publisher.publish("", &queue, &mut msg).await?;
    }
    println!(
        "publish  {} stock updates to {queue}, 3 of them malformed",
        bodies.len()
    );

    let consumer = Consumer::builder("inventory-import")
        .store(MemoryStore::new())
        .backoff(
            Backoff::exponential(Duration::from_secs(1))
                .jitter(Jitter::None)
                .max_attempts(6),
        )
        .handler_with_state(import, inventory.clone())?;
    let finished = Finished::new(bodies.len() as u64);
    let f = finished.clone();
    let worker = Worker::builder(&url, topology.clone(), consumer)
        .prefetch(4)
        .on_settle(move |s| {
            if !matches!(s.disposition, idem::Disposition::Ack { duplicate: false }) {
                println!("settle   {}", describe(&s));
            }
            f.record(&s);
        })
        .build()?;
    let up = inventory.up.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        up.store(true, Ordering::SeqCst);
        println!("database back up");
    });
    let stats =
        idem_examples::run_until_finished(worker.spawn(), &finished, Duration::from_secs(60))
            .await?;

    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM stock")
        .fetch_one(&db)
        .await?;
    db.close().await;
    let _ = std::fs::remove_dir_all(&dir);

    // Read the DLQ without consuming it: get every message unacked, then close the
    // channel so the broker puts them back in order.
    let dlq = topology.dlq();
    let peek = admin.create_channel().await?;
    let mut errors: Vec<(String, String)> = Vec::new();
    while let Some(m) = peek
        .basic_get(dlq.as_str().into(), BasicGetOptions::default())
        .await?
    {
        let h = idem::amqp::convert::headers_from_table(
            m.delivery
                .properties
                .headers()
                .as_ref()
                .unwrap_or(&Default::default()),
        );
        let text = |k: &str| h.get(k).map(|v| v.to_string()).unwrap_or_default();
        errors.push((
            text(idem::outcome::headers::ERROR_KIND),
            text(idem::outcome::headers::ERROR),
        ));
    }
    peek.close(200, "peeked".into()).await?;
    println!("dlq      {dlq} holds {} message(s):", errors.len());
    for (kind, error) in &errors {
        println!("dlq        {kind}: {error}");
    }
    println!("dlq      left in place; inspect with `idem dlq list {queue}`, replay with `idem dlq replay {queue} --all`");
    let _ = admin.close(200, "bye".into()).await;
    println!(
        "summary: stored={stored} retries={} dead_lettered={} queue={dlq}",
        stats.retries, stats.dead_lettered
    );
    Ok(())
}
