//! The PostgreSQL inbox's batched start counters, against a real server
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`): messages
//! handled at the same time share the start counter's upsert, each still gets its own
//! count, and a pool smaller than the concurrency (one connection) still works.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use idem_core::{Consumer, Disposition, HandlerError, IdempotencyKey, Message, State};
use idem_sql::Tx;
use sqlx::{Executor as _, Postgres};

mod common;
use common::pg::{self, Tables};

/// An inbox and an effect table (`k`) on a pool of `max` connections.
async fn tables(max: u32) -> Tables {
    Tables::new(pg::pool("sb", max).await, "sb_inbox", "k TEXT PRIMARY KEY").await
}

/// Inserts the key into the effects table, after a short pause so that deliveries
/// overlap.
async fn handler(
    State(fx): State<Arc<str>>,
    key: IdempotencyKey,
    tx: Tx<Postgres>,
) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut conn = tx.conn().await?;
    let insert = format!("INSERT INTO {fx} (k) VALUES ($1)");
    pg::insert_effect(&mut conn, &insert, key.as_str(), None).await?;
    Ok(())
}

/// `n` distinct messages at once on a pool of `max` connections: each is applied
/// once and acked, and no start counter stays behind.
async fn concurrent_distinct_messages(max: u32, n: usize) {
    let t = tables(max).await;
    let fx: Arc<str> = t.effects.as_str().into();
    let consumer = Consumer::builder("sb")
        .dedup(t.inbox.clone())
        .handler_with_state(handler, fx)
        .unwrap();
    let runs = (0..n).map(|i| {
        let consumer = &consumer;
        async move {
            let msg = Message::new("{}").with_message_id(format!("m-{i}"));
            consumer.process(msg).await
        }
    });
    let out = join_all(runs).await;
    let (effects, rows, starts) = (
        t.count(&t.effects).await,
        t.count(&t.inbox.table_name().to_string()).await,
        t.count(&t.inbox.starts_table_name().to_string()).await,
    );
    t.drop_all().await;
    for d in &out {
        assert_eq!(*d, Disposition::Ack { duplicate: false });
    }
    assert_eq!((effects, rows, starts), (n as i64, n as i64, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_messages_share_a_pool_of_one_connection() {
    concurrent_distinct_messages(1, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_messages_on_a_small_pool_each_apply_once() {
    concurrent_distinct_messages(4, 60).await;
}

/// Two deliveries of one key that already has a crashed start, at once and among
/// other messages: each start is counted (the same key twice in one batch goes in two
/// statements), the message runs once, and the crash limit is not reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_twice_at_once_counts_each_start_and_runs_once() {
    let t = tables(8).await;
    // One earlier crash of "dup", as a killed worker leaves it.
    t.pool
        .execute(&*format!(
            "INSERT INTO {} (consumer, idem_key, starts, expires_at) \
             VALUES ('sb', 'dup', 1, 9000000000000000)",
            t.inbox.starts_table_name()
        ))
        .await
        .unwrap();
    let fx: Arc<str> = t.effects.as_str().into();
    let consumer = Consumer::builder("sb")
        .dedup(t.inbox.clone())
        .crash_limit(3)
        .handler_with_state(handler, fx)
        .unwrap();
    let ids: Vec<String> = ["dup", "dup"]
        .into_iter()
        .map(str::to_owned)
        .chain((0..20).map(|i| format!("other-{i}")))
        .collect();
    let runs = ids.iter().map(|id| {
        let consumer = &consumer;
        async move {
            let msg = Message::new("{}").with_message_id(id.clone());
            consumer.process(msg).await
        }
    });
    let out = join_all(runs).await;
    let (effects, starts) = (
        t.count(&t.effects).await,
        t.count(&t.inbox.starts_table_name().to_string()).await,
    );
    t.drop_all().await;
    let dup: Vec<&Disposition> = out.iter().take(2).collect();
    assert!(
        dup.contains(&&Disposition::Ack { duplicate: false })
            && dup.contains(&&Disposition::Ack { duplicate: true }),
        "{dup:?}"
    );
    for d in out.iter().skip(2) {
        assert_eq!(*d, Disposition::Ack { duplicate: false });
    }
    assert_eq!((effects, starts), (21, 0));
}
