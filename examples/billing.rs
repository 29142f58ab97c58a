//! Billing, effectively-once: a card is charged once however often the message comes.
//!
//! ```text
//! cargo run --example billing [-- --listen 127.0.0.1:9090]
//! ```
//!
//! Each message asks to charge a card and carries a unique charge id as its
//! idempotency key. The worker writes the charge into PostgreSQL through the
//! **transactional inbox**: the dedup row and the charge row commit in one
//! transaction, and `charges.charge_id` is unique as a second safeguard.
//! Three ways a charge can arrive twice, and each is billed once:
//! - the producer publishes `charge-2` twice (a publisher retry after a lost confirm);
//! - a worker bills `charge-6`, commits, and crashes before its ack (simulated: it closes
//!   its channel without acking), so the broker redelivers it to the next worker;
//! - ... which then finds the inbox row and acks the copy without billing again.
//!
//! The worker runs in a host (`idem::amqp::Service`), as a billing process with
//! several consumers would; `--listen ADDR` serves its `/metrics`, `/live` and
//! `/ready` while it runs. Ends with
//! `summary: deliveries=8 billed=6 duplicates=2 double_billed=0`. Uses
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`); recreates
//! the tables `billing_charges` and `billing_inbox` and the queue `billing` at start
//! and removes them at the end.

use std::time::Duration;

use idem::amqp::{Publisher, Service, Topology};
use idem::sql::{PgInbox, Tx};
use idem::{Consumer, HandlerError, IdempotencyKey, Json, Message};
use idem_examples::{describe, Finished};
use lapin::options::{BasicGetOptions, BasicQosOptions};
use sqlx::Postgres;

#[derive(serde::Serialize, serde::Deserialize)]
struct Charge {
    card: String,
    cents: i64,
}

async fn charge(
    key: IdempotencyKey,
    tx: Tx<Postgres>,
    Json(c): Json<Charge>,
) -> Result<(), HandlerError> {
    let mut conn = tx.conn().await?;
    sqlx::query("INSERT INTO billing_charges (charge_id, card, cents) VALUES ($1, $2, $3)")
        .bind(key.as_str())
        .bind(&c.card)
        .bind(c.cents)
        .execute(&mut *conn)
        .await?;
    println!("bill     {key}: {} cents on card {}", c.cents, c.card);
    Ok(()) // the inbox commits the charge and its dedup row together
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let db_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect(&db_url)
        .await
        .map_err(|e| {
            format!(
                "PostgreSQL is not reachable at {} ({e}); see \"Running the tests\" in the README",
                idem::redact::redact_url(&db_url)
            )
        })?;
    for sql in [
        "DROP TABLE IF EXISTS billing_charges",
        "DROP TABLE IF EXISTS billing_inbox",
        "DROP TABLE IF EXISTS billing_inbox_starts",
        "CREATE TABLE billing_charges (charge_id TEXT PRIMARY KEY, card TEXT NOT NULL, cents BIGINT NOT NULL)",
    ] {
        sqlx::query(sql).execute(&pool).await?;
    }
    let inbox = PgInbox::new(pool.clone()).try_table("billing_inbox")?;
    inbox.ensure_schema().await?;
    let consumer = Consumer::builder("billing").dedup(inbox).handler(charge)?;

    let url = idem_examples::amqp_url();
    let admin = idem_examples::rabbit().await?;
    let ch = admin.create_channel().await?;
    let topology = Topology::new("billing");
    topology.delete_on(&ch).await?;
    topology.declare_on(&ch).await?;
    let publisher = Publisher::connect(&url).await?;
    let publish = |id: &str, card: &str, cents: i64| {
        let body = serde_json::to_vec(&Charge {
            card: card.into(),
            cents,
        })
        .unwrap_or_default();
        Message::new(body)
            .with_message_id(id)
            .with_content_type("application/json")
    };

    // A worker bills charge-6, commits, and dies before acking it.
    publisher
        .publish("", "billing", &mut publish("charge-6", "4000-0006", 600))
        .await?;
    let doomed = admin.create_channel().await?;
    doomed.basic_qos(1, BasicQosOptions::default()).await?;
    let got = doomed
        .basic_get("billing".into(), BasicGetOptions::default())
        .await?
        .ok_or("charge-6 not in the queue")?;
    let msg = idem::amqp::convert::message_from_delivery(&got.delivery, "billing");
    let outcome = consumer.process(msg).await;
    println!(
        "crash    worker-1 settled charge-6 as {} in the database, then crashed before its ack",
        outcome.name()
    );
    doomed.close(320, "simulated crash".into()).await?; // unacked: the broker redelivers it

    for (id, card, cents) in [
        ("charge-1", "4000-0001", 100),
        ("charge-2", "4000-0002", 200),
        ("charge-3", "4000-0003", 300),
        ("charge-2", "4000-0002", 200), // published twice
        ("charge-4", "4000-0004", 400),
        ("charge-5", "4000-0005", 500),
    ] {
        publisher
            .publish("", "billing", &mut publish(id, card, cents))
            .await?;
    }
    println!("publish  charge-1..charge-5, charge-2 twice");

    let finished = Finished::new(7);
    let f = finished.clone();
    // The billing process: a host for its consumers (one here; each further consumer,
    // or an outbox relay, is one more line), with one graceful stop for all of them.
    let mut service = Service::builder(&url)
        .consumer(topology.clone(), consumer, |w| {
            w.prefetch(4).on_settle(move |s| {
                if matches!(s.disposition, idem::Disposition::Ack { duplicate: true })
                    || !matches!(s.disposition, idem::Disposition::Ack { .. })
                {
                    println!("settle   {}", describe(&s));
                }
                f.record(&s);
            })
        })
        .shutdown_timeout(Duration::from_secs(10));
    if let Some(addr) = idem_examples::arg("--listen") {
        // /metrics, /live and /ready for every consumer of the process.
        service = service.listen(addr.parse()?);
    }
    let stats = idem_examples::run_until_finished(
        service.build()?.spawn(),
        &finished,
        Duration::from_secs(60),
    )
    .await?;
    let (_, stats) = stats
        .into_iter()
        .next()
        .ok_or("the service ran no consumer")?;

    let billed: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_charges")
        .fetch_one(&pool)
        .await?;
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT charge_id) FROM billing_charges")
        .fetch_one(&pool)
        .await?;
    topology.delete_on(&ch).await?;
    sqlx::query("DROP TABLE IF EXISTS billing_charges, billing_inbox, billing_inbox_starts")
        .execute(&pool)
        .await?;
    let _ = admin.close(200, "bye".into()).await;
    println!(
        "summary: deliveries={} billed={billed} duplicates={} double_billed={}",
        stats.processed + stats.duplicates,
        stats.duplicates,
        billed - distinct
    );
    Ok(())
}
