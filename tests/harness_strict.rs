//! The test harness answers "is my handler safe?" with "no" whenever an effect
//! happens twice, whatever the cause. Written the way the README's "Testing your
//! consumer" tells a user to: a consumer with the Redis lease store (`REDIS_URL`)
//! whose handler inserts a row into PostgreSQL (`DATABASE_URL`) with autocommit.
//!
//! - A plain `INSERT`: the harness crashes some deliveries after the insert and before
//!   the dedup record completes, the redelivery inserts again, and the default
//!   `assert_ok()` fails, explaining why and how to fix it.
//! - The same handler with `INSERT ... ON CONFLICT DO NOTHING` on the idempotency key
//!   (the fix the report names): the repeats do nothing and `assert_ok()` passes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use idem_core::testing::{Harness, Report};
use idem_core::{Consumer, DedupLayer, HandlerError, IdempotencyKey, Message, ResultExt, State};
use idem_redis::RedisStore;
use idem_testkit::Service;
use sqlx::PgPool;

const MESSAGES: usize = 200;
const SEED: u64 = 22;

#[derive(Clone)]
struct Charges {
    pool: PgPool,
    insert: Arc<str>,
}

async fn charge(State(c): State<Charges>, key: IdempotencyKey) -> Result<(), HandlerError> {
    sqlx::query(&c.insert)
        .bind(key.as_str())
        .execute(&c.pool)
        .await
        .transient()?;
    Ok(())
}

async fn run(pool: &PgPool, table: &str, insert: String) -> Report {
    let url = Service::Redis.url();
    let prefix = idem_testkit::unique("strict");
    let store = Service::Redis.expect_connected(
        &url,
        RedisStore::builder(&url).prefix(&prefix).connect().await,
    );
    let charges = Charges {
        pool: pool.clone(),
        insert: insert.into(),
    };
    let layer_store = store.clone();
    let counted = pool.clone();
    let count = format!("SELECT count(*) FROM {table} WHERE k = $1");
    let report = Harness::new(move |trouble| {
        // A short lease: a crashed delivery's claim expires in real time.
        let dedup = DedupLayer::new(layer_store).lease(Duration::from_secs(2));
        Consumer::builder("strict-harness")
            .dedup(dedup)
            .layer(trouble)
            .handler_with_state(charge, charges)
    })
    .messages((0..MESSAGES).map(|i| Message::new("{}").with_message_id(format!("c-{i}"))))
    .seed(SEED)
    .run(move |key| {
        let (pool, count) = (counted.clone(), count.clone());
        async move {
            sqlx::query_scalar::<_, i64>(&count)
                .bind(key)
                .fetch_one(&pool)
                .await
                .map(|n| n as u64)
        }
    })
    .await
    .unwrap();
    let mut conn = store.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    report
}

async fn table(pool: &PgPool, unique_key: bool) -> String {
    let table = idem_testkit::unique("charges");
    let constraint = if unique_key { " UNIQUE" } else { "" };
    sqlx::query(&format!(
        "CREATE TABLE {table} (k TEXT NOT NULL{constraint})"
    ))
    .execute(pool)
    .await
    .unwrap();
    table
}

async fn drop_table(pool: &PgPool, table: &str) {
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(pool)
        .await
        .unwrap();
}

async fn pool() -> PgPool {
    idem_testkit::postgres(
        sqlx::postgres::PgPoolOptions::new().max_connections(10),
        "idem-test-harness-strict",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_fails_a_handler_whose_effect_repeats_on_a_lease_store() {
    let pool = pool().await;
    let table = table(&pool, false).await;
    let report = run(
        &pool,
        &table,
        format!("INSERT INTO {table} (k) VALUES ($1)"),
    )
    .await;
    drop_table(&pool, &table).await;
    assert!(
        !report.windows().is_empty(),
        "seed {SEED} crashed no delivery after its effect:\n{report}"
    );
    assert!(!report.is_ok());
    let panic = std::panic::catch_unwind(|| report.assert_ok())
        .expect_err("assert_ok passed a handler that charged twice");
    let text = panic.downcast_ref::<String>().unwrap();
    for needle in [
        "re-ran in the lease-store window",
        "not safe",
        "ON CONFLICT DO NOTHING",
        "SQL inbox",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    // The opt-in says what it accepts, and accepts exactly that.
    report.assert_ok_allowing_lease_window();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_passes_the_same_handler_made_idempotent() {
    let pool = pool().await;
    let table = table(&pool, true).await;
    let insert = format!("INSERT INTO {table} (k) VALUES ($1) ON CONFLICT DO NOTHING");
    let report = run(&pool, &table, insert).await;
    drop_table(&pool, &table).await;
    // The same seed crashes after the effect as above; the repeats now do nothing.
    assert!(report.totals().crashes[1] > 0, "{report}");
    report.assert_ok();
}
