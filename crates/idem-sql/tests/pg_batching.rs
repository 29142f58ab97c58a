//! The PostgreSQL lease store's batching, counted from sqlx's own statement log
//! (tracing target `sqlx::query`, filtered by this test's table): a lone operation is
//! one statement of its own; concurrent claims share statements, within the bound,
//! each with its own answer. DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "postgres")]

use std::time::Duration;

use idem_core::dedup::{Claim, ClaimRequest, Completion, DedupStore, OwnerToken, ScopedKey};
use idem_testkit::drop_pg_table;
use idem_testkit::logs::LogCapture;

mod common;
use common::pg;

/// Batch statements on `table` in what sqlx logged so far.
fn batches(log: &LogCapture, table: &str) -> usize {
    log.lines_with(table)
        .iter()
        .filter(|l| l.contains("WITH ins AS"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_operations_go_alone_and_concurrent_claims_share_statements() {
    let (log, pool, store) = pg::logged_store("pgbatch", 8).await;
    let store = store.max_batch(16);
    let table = store.table_name().to_string();
    assert!(store.is_batching());
    assert!(!store.clone().max_batch(1).is_batching(), "1 turns it off");
    let long = idem_core::dedup::Terms::new(Duration::from_secs(60), Duration::from_secs(60));

    for i in 0..3 {
        let k = ScopedKey::new("c", format!("lone-{i}"));
        let o = ClaimRequest::new(k, OwnerToken::generate(), None);
        assert_eq!(store.claim(&o, long).await.unwrap(), Claim::Acquired);
        assert!(store
            .complete(&o.held, Completion::Succeeded, long)
            .await
            .unwrap());
    }
    assert_eq!(batches(&log, &table), 6, "one statement per lone operation");

    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let k = ScopedKey::new("c", format!("many-{i}"));
                let fp = format!("fp-{i}");
                let o = ClaimRequest::new(k.clone(), OwnerToken::generate(), Some(fp.clone()));
                let c = store.claim(&o, long).await.unwrap();
                assert_eq!(c, Claim::Acquired, "claim {i}");
                let done = store
                    .complete(&o.held, Completion::Succeeded, long)
                    .await
                    .unwrap();
                assert!(done, "complete {i}");
                let stranger = ClaimRequest::new(k, OwnerToken::generate(), None);
                let again = store.claim(&stranger, long).await.unwrap();
                assert_eq!(
                    again,
                    Claim::Done {
                        completion: Completion::Succeeded,
                        fingerprint: Some(fp)
                    },
                    "duplicate {i}"
                );
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let statements = batches(&log, &table) - 6;
    // 300 operations: 100 claims and 100 completions batched (the duplicates'
    // claims go through the batch, then the single-row statements).
    assert!(
        statements >= 300 / 16,
        "bound of 16 per statement: {statements}"
    );
    assert!(
        statements < 300,
        "concurrent operations shared statements: {statements}"
    );
    eprintln!("300 operations in {statements} batch statements");
    drop_pg_table(&pool, &table).await;
}
