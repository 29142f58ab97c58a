//! A batch handler over the PostgreSQL lease store: one batch of 20 messages with
//! every per-message outcome costs one claim call, one completion call and one
//! release call (`idem_testkit::lease_batch`), and the claim call is one statement
//! that decides every key (sqlx's statement log, filtered by this test's table).
//! DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "postgres")]

use std::sync::Arc;

use idem_sql::PgStore;
use idem_testkit::logs::LogCapture;
use idem_testkit::{lease_batch, unique};
use sqlx::postgres::PgPoolOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_claim_call_and_one_completion_call_per_batch() {
    let log = LogCapture::default();
    log.install_global("sqlx::query=debug");
    let pool =
        idem_testkit::postgres(PgPoolOptions::new().max_connections(4), &unique("plb")).await;
    let table = unique("lease_batch");
    let store = PgStore::new(pool.clone()).try_table(&table).unwrap();
    store.ensure_schema().await.unwrap();
    assert!(store.is_batching());
    lease_batch::check(Arc::new(store), &unique("batch")).await;
    let statements = log.lines_with(&table);
    let count = |needle: &str| statements.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(count("WITH v AS"), 1, "the batch's claims: one statement");
    // A counting claim the statement left undecided would run the single-row take-over
    // (the set-up and the checks after the batch use claims that do not count).
    assert_eq!(
        count("SET starts = CASE WHEN state"),
        0,
        "no key of the batch fell back to the single-row claim"
    );
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .unwrap();
}
