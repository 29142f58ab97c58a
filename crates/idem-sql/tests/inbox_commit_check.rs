//! The pre-commit check of the SQL inbox on PostgreSQL, against a real server
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`): a handler
//! that misuses its transaction is never acked, and the pool's connection comes back
//! clean.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::time::Duration;

use idem_core::{Consumer, Disposition, ErrorKind, HandlerError, IdempotencyKey, Message, State};
use idem_sql::{PgInbox, Tx};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor as _, PgPool, Postgres};

async fn pool() -> PgPool {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    // One connection: every message reuses the connection the last one committed on.
    match PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
    {
        Ok(p) => p,
        Err(e) => panic!(
            "PostgreSQL not reachable (set DATABASE_URL): start it with `service postgresql start`: {e}"
        ),
    }
}

/// What the handler does in its transaction before returning `Ok`.
#[derive(Clone, Copy)]
enum Misuse {
    None,
    /// A failing statement whose error it ignores (the transaction is aborted).
    SwallowedError,
    /// A failing statement inside a savepoint it rolls back, then the insert.
    SavepointRecovered,
    /// Deletes the inbox row.
    DeletesInboxRow,
    /// Ends the transaction itself.
    RawRollback,
}

#[derive(Clone)]
struct Ctx {
    fx: Arc<str>,
    inbox: Arc<str>,
    misuse: Misuse,
}

async fn handler(
    State(ctx): State<Ctx>,
    key: IdempotencyKey,
    tx: Tx<Postgres>,
) -> Result<(), HandlerError> {
    let mut conn = tx.conn().await?;
    let insert = format!("INSERT INTO {} (k) VALUES ($1)", ctx.fx);
    match ctx.misuse {
        Misuse::None => {}
        Misuse::SwallowedError => {
            let _ = conn.execute("SELECT 1 / 0").await;
        }
        Misuse::SavepointRecovered => {
            let mut sp = sqlx::Connection::begin(&mut *conn).await?;
            assert!(sp.execute("SELECT 1 / 0").await.is_err());
            sp.rollback().await?;
        }
        Misuse::DeletesInboxRow => {
            conn.execute(&*format!("DELETE FROM {}", ctx.inbox)).await?;
        }
        Misuse::RawRollback => {
            conn.execute("ROLLBACK").await?;
        }
    }
    let _ = sqlx::query(&insert)
        .bind(key.as_str())
        .execute(&mut *conn)
        .await;
    Ok(())
}

async fn run(misuse: Misuse) -> (Vec<Disposition>, i64, i64) {
    let pool = pool().await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (fx, table) = (format!("idem_cc_fx_{id}"), format!("idem_cc_inbox_{id}"));
    pool.execute(&*format!("CREATE TABLE {fx} (k TEXT PRIMARY KEY)"))
        .await
        .unwrap();
    let inbox = PgInbox::new(pool.clone()).try_table(&table).unwrap();
    inbox.ensure_schema().await.unwrap();
    let ctx = Ctx {
        fx: fx.as_str().into(),
        inbox: table.as_str().into(),
        misuse,
    };
    let consumer = Consumer::builder("cc")
        .dedup(inbox)
        .handler_with_state(handler, ctx)
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..2 {
        out.push(
            consumer
                .process(Message::new("{}").with_message_id("m-1"))
                .await,
        );
    }
    // The pool's only connection must be back outside any transaction.
    let mut conn = pool.acquire().await.unwrap();
    let err = conn.execute("SAVEPOINT probe").await.unwrap_err();
    assert_eq!(
        err.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("25P01"),
        "connection left inside a transaction"
    );
    drop(conn);
    let count = |t: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {t}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let (effects, rows) = (count(fx.clone()).await, count(table.clone()).await);
    // Every outcome here settles the message: no start counter may stay behind (a
    // leftover would charge the next delivery of "m-1" with a crash it never had).
    let starts = count(format!("{table}_starts")).await;
    assert_eq!(starts, 0, "start counter left behind");
    for t in [fx, table.clone(), format!("{table}_starts")] {
        pool.execute(&*format!("DROP TABLE {t}")).await.unwrap();
    }
    (out, effects, rows)
}

fn is_transient_retry(d: &Disposition) -> bool {
    matches!(d, Disposition::Retry { failure, .. } if failure.kind == ErrorKind::Transient)
}

#[tokio::test]
async fn commits_effect_and_row_then_duplicate() {
    let (out, effects, rows) = run(Misuse::None).await;
    assert_eq!(out[0], Disposition::Ack { duplicate: false });
    assert_eq!(out[1], Disposition::Ack { duplicate: true });
    assert_eq!((effects, rows), (1, 1));
}

#[tokio::test]
async fn swallowed_statement_error_is_not_acked_and_writes_nothing() {
    let (out, effects, rows) = run(Misuse::SwallowedError).await;
    assert!(out.iter().all(is_transient_retry), "{out:?}");
    assert_eq!((effects, rows), (0, 0));
}

#[tokio::test]
async fn handler_savepoints_still_work() {
    let (out, effects, rows) = run(Misuse::SavepointRecovered).await;
    assert_eq!(out[0], Disposition::Ack { duplicate: false });
    assert_eq!(out[1], Disposition::Ack { duplicate: true });
    assert_eq!((effects, rows), (1, 1));
}

#[tokio::test]
async fn deleted_inbox_row_is_not_acked() {
    let (out, effects, rows) = run(Misuse::DeletesInboxRow).await;
    assert!(out.iter().all(is_transient_retry), "{out:?}");
    assert_eq!((effects, rows), (0, 0));
}

#[tokio::test]
async fn handler_ending_the_transaction_is_not_acked() {
    let (out, _, rows) = run(Misuse::RawRollback).await;
    assert!(out.iter().all(is_transient_retry), "{out:?}");
    assert_eq!(rows, 0);
}
