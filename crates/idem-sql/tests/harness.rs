//! `idem_core::testing` against the PostgreSQL inbox (DATABASE_URL, default
//! postgres://postgres@127.0.0.1:5432/postgres): the control group of the harness.
//! A handler whose effect goes through the inbox's `Tx` passes under the default
//! trouble profile; the same handler writing with the plain pool is caught. The
//! passing test is the example of the README section "Testing your consumer".
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "postgres")]

use std::time::Instant;

use idem_core::testing::{CrashPoint, Harness, Profile, Report};
use idem_core::{Consumer, Handler, HandlerError, IdempotencyKey, Message, State};
use idem_sql::Tx;
use sqlx::{PgPool, Postgres};

mod common;
use common::pg::{self, Tables};

/// This test's inbox and charges table (`order_id`). Deliveries in flight hold an
/// inbox transaction each while the plain-pool handler takes a second connection:
/// room for both.
async fn tables() -> Tables {
    Tables::new(
        pg::pool("harness", 32).await,
        "inbox",
        "id BIGSERIAL PRIMARY KEY, order_id TEXT NOT NULL",
    )
    .await
}

impl Tables {
    /// The handlers' state: the pool and the insert into this test's charges table.
    fn state(&self) -> Charges {
        Charges {
            pool: self.pool.clone(),
            insert: format!("INSERT INTO {} (order_id) VALUES ($1)", self.effects),
        }
    }

    /// A harness for the consumer `name` on this test's inbox, running `handler` on
    /// `n` orders.
    fn harness<H, T>(&self, name: &'static str, handler: H, n: usize) -> Harness
    where
        H: Handler<T, Charges>,
        T: 'static,
    {
        let (inbox, charges) = (self.inbox.clone(), self.state());
        Harness::new(move |trouble| {
            Consumer::builder(name)
                .dedup(inbox)
                .layer(trouble)
                .handler_with_state(handler, charges)
        })
        .messages(orders(n))
    }

    /// Runs `harness`, counting each order's charges (the harness's effect probe).
    async fn run(&self, harness: Harness) -> Report {
        let probe = |key| pg::rows_for(&self.pool, &self.effects, "order_id", key);
        harness.run(probe).await.unwrap()
    }
}

/// What the handlers need: the pool and the table their effect goes to.
#[derive(Clone)]
struct Charges {
    pool: PgPool,
    insert: String,
}

/// Right: the effect is written in the inbox transaction, so it commits (or rolls
/// back) together with the dedup record.
async fn charge_in_tx(
    State(c): State<Charges>,
    key: IdempotencyKey,
    tx: Tx<Postgres>,
) -> Result<(), HandlerError> {
    let mut conn = tx.conn().await?;
    pg::insert_effect(&mut conn, &c.insert, key.as_str(), None).await?;
    Ok(())
}

/// Wrong: the effect is written with the plain pool, outside the inbox transaction.
async fn charge_outside_tx(
    State(c): State<Charges>,
    key: IdempotencyKey,
) -> Result<(), HandlerError> {
    sqlx::query(&c.insert)
        .bind(key.as_str())
        .execute(&c.pool)
        .await?;
    Ok(())
}

fn orders(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!(r#"{{"order":{i}}}"#)).with_message_id(format!("order-{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_writing_through_tx_passes_the_default_profile() {
    let t = tables().await;
    // 300 keeps `cargo test` short; IDEM_HARNESS_MESSAGES=1000 measures the README's figure.
    let n = std::env::var("IDEM_HARNESS_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let started = Instant::now();
    let report = t.run(t.harness("harness-tx", charge_in_tx, n)).await;
    let took = started.elapsed();
    println!("{n} messages, default profile, PostgreSQL inbox: {took:?}\n{report}");
    // The inbox has no lease-store window: every crash point must leave one effect.
    report.assert_ok();
    assert!(report.totals().crashes.iter().all(|&c| c > 0), "{report}");
    t.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_writing_outside_tx_is_caught() {
    let t = tables().await;
    let harness = t
        .harness("harness-pool", charge_outside_tx, 20)
        .profile(Profile::crash_at(CrashPoint::AfterEffect))
        .seed(16);
    let report = t.run(harness).await;
    t.drop_all().await;
    // Every message crashed after its effect: the inbox rolled back its record, not
    // the effect, so the redelivery charged again. Violations, not windows.
    assert_eq!(report.violations().len(), 20, "{report}");
    assert!(report.windows().is_empty(), "{report}");
    let v = &report.violations()[0];
    assert_eq!(v.observed, 2, "{report}");
    let text = report.to_string();
    for needle in [
        "20 VIOLATION(S)",
        "seed 16",
        "expected exactly 1 effect(s), observed 2",
        "the effect happened 2 times",
        "crashed after the handler's effect",
        "(redelivered): ack",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert!(std::panic::catch_unwind(|| report.assert_ok()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_writing_outside_tx_is_caught_by_the_default_profile() {
    let t = tables().await;
    let report = t
        .run(t.harness("harness-pool-default", charge_outside_tx, 200))
        .await;
    t.drop_all().await;
    // Whatever the seed, the default profile crashes some of 200 messages after
    // their effect, and each of those is charged twice.
    assert!(!report.is_ok(), "not caught:\n{report}");
    assert_eq!(
        report.violations().len() as u64,
        report.totals().crashes[CrashPoint::AfterEffect as usize],
        "{report}"
    );
}
