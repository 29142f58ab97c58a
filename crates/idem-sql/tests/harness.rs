//! `idem_core::testing` against the PostgreSQL inbox (DATABASE_URL, default
//! postgres://postgres@127.0.0.1:5432/postgres): the control group of the harness.
//! A handler whose effect goes through the inbox's `Tx` passes under the default
//! trouble profile; the same handler writing with the plain pool is caught. The
//! passing test is the example of the README section "Testing your consumer".
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "postgres")]

use std::time::{Duration, Instant};

use idem_core::testing::{CrashPoint, Harness, Profile};
use idem_core::{Consumer, HandlerError, IdempotencyKey, Message, State};
use idem_sql::{PgInbox, Tx};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};

fn url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn pool() -> PgPool {
    // Deliveries in flight hold an inbox transaction each while the plain-pool handler
    // takes a second connection: room for both.
    match PgPoolOptions::new()
        .max_connections(32)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url())
        .await
    {
        Ok(p) => p,
        Err(e) => panic!(
            "PostgreSQL not reachable at {} (set DATABASE_URL; see README \"Running the tests\"): start it with `bash .ci/services`: {e}",
            url().split('@').next_back().unwrap_or("")
        ),
    }
}

fn unique(tag: &str) -> String {
    format!(
        "idem_t{}_{tag}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The tables of one test, dropped at the end.
struct Tables {
    pool: PgPool,
    charges: String,
    inbox: PgInbox,
}

impl Tables {
    async fn new() -> Self {
        let pool = pool().await;
        let charges = unique("charges");
        sqlx::query(&format!(
            "CREATE TABLE {charges} (id BIGSERIAL PRIMARY KEY, order_id TEXT NOT NULL)"
        ))
        .execute(&pool)
        .await
        .unwrap();
        let inbox = PgInbox::new(pool.clone())
            .try_table(&unique("inbox"))
            .unwrap();
        inbox.ensure_schema().await.unwrap();
        Tables {
            pool,
            charges,
            inbox,
        }
    }

    /// The handlers' state: the pool and the insert into this test's charges table.
    fn state(&self) -> Charges {
        Charges {
            pool: self.pool.clone(),
            insert: format!("INSERT INTO {} (order_id) VALUES ($1)", self.charges),
        }
    }

    /// How many charges `key` has (the harness's effect probe).
    fn charge_count(
        &self,
        key: String,
    ) -> impl std::future::Future<Output = Result<u64, sqlx::Error>> + 'static {
        let (pool, table) = (self.pool.clone(), self.charges.clone());
        async move {
            sqlx::query_scalar::<_, i64>(&format!(
                "SELECT count(*) FROM {table} WHERE order_id = $1"
            ))
            .bind(key)
            .fetch_one(&pool)
            .await
            .map(|n| n as u64)
        }
    }

    async fn drop_all(self) {
        for t in [
            self.charges,
            self.inbox.table_name().to_string(),
            self.inbox.starts_table_name().to_string(),
        ] {
            sqlx::query(&format!("DROP TABLE IF EXISTS {t}"))
                .execute(&self.pool)
                .await
                .unwrap();
        }
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
    sqlx::query(&c.insert)
        .bind(key.as_str())
        .execute(&mut *conn)
        .await?;
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
    let t = Tables::new().await;
    let charges = t.state();
    let inbox = t.inbox.clone();
    // 300 keeps `cargo test` short; IDEM_HARNESS_MESSAGES=1000 measures the README's figure.
    let n = std::env::var("IDEM_HARNESS_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let started = Instant::now();
    let report = Harness::new(move |trouble| {
        Consumer::builder("harness-tx")
            .dedup(inbox)
            .layer(trouble)
            .handler_with_state(charge_in_tx, charges)
    })
    .messages(orders(n))
    .run(|key| t.charge_count(key))
    .await
    .unwrap();
    let took = started.elapsed();
    println!("{n} messages, default profile, PostgreSQL inbox: {took:?}\n{report}");
    // The inbox has no lease-store window: every crash point must leave one effect.
    report.assert_ok();
    assert!(report.totals().crashes.iter().all(|&c| c > 0), "{report}");
    t.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_writing_outside_tx_is_caught() {
    let t = Tables::new().await;
    let charges = t.state();
    let inbox = t.inbox.clone();
    let report = Harness::new(move |trouble| {
        Consumer::builder("harness-pool")
            .dedup(inbox)
            .layer(trouble)
            .handler_with_state(charge_outside_tx, charges)
    })
    .messages(orders(20))
    .profile(Profile::crash_at(CrashPoint::AfterEffect))
    .seed(16)
    .run(|key| t.charge_count(key))
    .await
    .unwrap();
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
    let t = Tables::new().await;
    let charges = t.state();
    let inbox = t.inbox.clone();
    let report = Harness::new(move |trouble| {
        Consumer::builder("harness-pool-default")
            .dedup(inbox)
            .layer(trouble)
            .handler_with_state(charge_outside_tx, charges)
    })
    .messages(orders(200))
    .run(|key| t.charge_count(key))
    .await
    .unwrap();
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
