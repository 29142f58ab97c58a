//! A batch handler over the PostgreSQL lease store: one batch of 20 messages with
//! every per-message outcome costs one claim call, one completion call and one
//! release call (`idem_testkit::lease_batch`), and the claim call is one statement
//! that decides every key (sqlx's statement log, filtered by this test's table).
//! DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "postgres")]

use std::sync::Arc;

use idem_testkit::{drop_pg_table, lease_batch, unique};

mod common;
use common::pg;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_claim_call_and_one_completion_call_per_batch() {
    let (log, pool, store) = pg::logged_store("lease_batch", 4).await;
    let table = store.table_name().to_string();
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
    drop_pg_table(&pool, &table).await;
}
