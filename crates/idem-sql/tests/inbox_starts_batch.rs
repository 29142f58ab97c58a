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
use idem_sql::{PgInbox, Tx};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor as _, PgPool, Postgres};

async fn pool(max: u32) -> PgPool {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    match PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
    {
        Ok(p) => p,
        Err(e) => panic!(
            "PostgreSQL not reachable (set DATABASE_URL): start it with `service postgresql start`: {e}"
        ),
    }
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
    sqlx::query(&format!("INSERT INTO {fx} (k) VALUES ($1)"))
        .bind(key.as_str())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

struct Tables {
    pool: PgPool,
    fx: String,
    inbox: String,
}

impl Tables {
    async fn new(pool: PgPool) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (fx, inbox) = (format!("idem_sb_fx_{id}"), format!("idem_sb_inbox_{id}"));
        pool.execute(&*format!("CREATE TABLE {fx} (k TEXT PRIMARY KEY)"))
            .await
            .unwrap();
        Tables { pool, fx, inbox }
    }

    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn drop_all(&self) {
        for t in [
            self.fx.clone(),
            self.inbox.clone(),
            format!("{}_starts", self.inbox),
        ] {
            let _ = self
                .pool
                .execute(&*format!("DROP TABLE IF EXISTS {t}"))
                .await;
        }
    }
}

/// `n` distinct messages at once on a pool of `max` connections: each is applied
/// once and acked, and no start counter stays behind.
async fn concurrent_distinct_messages(max: u32, n: usize) {
    let t = Tables::new(pool(max).await).await;
    let inbox = PgInbox::new(t.pool.clone()).try_table(&t.inbox).unwrap();
    inbox.ensure_schema().await.unwrap();
    let fx: Arc<str> = t.fx.as_str().into();
    let consumer = Consumer::builder("sb")
        .dedup(inbox)
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
        t.count(&t.fx).await,
        t.count(&t.inbox).await,
        t.count(&format!("{}_starts", t.inbox)).await,
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
    let t = Tables::new(pool(8).await).await;
    let inbox = PgInbox::new(t.pool.clone()).try_table(&t.inbox).unwrap();
    inbox.ensure_schema().await.unwrap();
    // One earlier crash of "dup", as a killed worker leaves it.
    t.pool
        .execute(&*format!(
            "INSERT INTO {}_starts (consumer, idem_key, starts, expires_at) \
             VALUES ('sb', 'dup', 1, 9000000000000000)",
            t.inbox
        ))
        .await
        .unwrap();
    let fx: Arc<str> = t.fx.as_str().into();
    let consumer = Consumer::builder("sb")
        .dedup(inbox)
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
        t.count(&t.fx).await,
        t.count(&format!("{}_starts", t.inbox)).await,
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
