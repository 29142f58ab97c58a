//! The pre-commit check of the SQL inbox on PostgreSQL, against a real server
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`): a handler
//! that misuses its transaction is never acked, and the pool's connection comes back
//! clean.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "postgres")]

use std::sync::Arc;

use idem_core::{Consumer, Disposition, ErrorKind, HandlerError, IdempotencyKey, Message, State};
use idem_sql::Tx;
use sqlx::{Executor as _, Postgres};

mod common;
use common::pg::{self, Tables};

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
    let _ = pg::insert_effect(&mut conn, &insert, key.as_str(), None).await;
    Ok(())
}

async fn run(misuse: Misuse) -> (Vec<Disposition>, i64, i64) {
    // One connection: every message reuses the connection the last one committed on.
    let t = Tables::new(pg::pool("cc", 1).await, "cc_inbox", "k TEXT PRIMARY KEY").await;
    let table = t.inbox.table_name().to_string();
    let ctx = Ctx {
        fx: t.effects.as_str().into(),
        inbox: table.as_str().into(),
        misuse,
    };
    let consumer = Consumer::builder("cc")
        .dedup(t.inbox.clone())
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
    let mut conn = t.pool.acquire().await.unwrap();
    let err = conn.execute("SAVEPOINT probe").await.unwrap_err();
    assert_eq!(
        err.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("25P01"),
        "connection left inside a transaction"
    );
    drop(conn);
    let (effects, rows) = (t.count(&t.effects).await, t.count(&table).await);
    // Every outcome here settles the message: no start counter may stay behind (a
    // leftover would charge the next delivery of "m-1" with a crash it never had).
    let starts = t.count(&t.inbox.starts_table_name().to_string()).await;
    assert_eq!(starts, 0, "start counter left behind");
    t.drop_all().await;
    (out, effects, rows)
}

/// Runs `misuse`: the first delivery commits its effect and its inbox row, the second
/// is a duplicate.
async fn assert_commits_once(misuse: Misuse) {
    let (out, effects, rows) = run(misuse).await;
    assert_eq!(out[0], Disposition::Ack { duplicate: false });
    assert_eq!(out[1], Disposition::Ack { duplicate: true });
    assert_eq!((effects, rows), (1, 1));
}

/// Runs `misuse`: no delivery is acked (each is a transient retry) and no inbox row is
/// written; the number of effects written.
async fn assert_not_acked(misuse: Misuse) -> i64 {
    let (out, effects, rows) = run(misuse).await;
    assert!(out.iter().all(is_transient_retry), "{out:?}");
    assert_eq!(rows, 0);
    effects
}

fn is_transient_retry(d: &Disposition) -> bool {
    matches!(d, Disposition::Retry { failure, .. } if failure.kind == ErrorKind::Transient)
}

#[tokio::test]
async fn commits_effect_and_row_then_duplicate() {
    assert_commits_once(Misuse::None).await;
}

#[tokio::test]
async fn swallowed_statement_error_is_not_acked_and_writes_nothing() {
    assert_eq!(assert_not_acked(Misuse::SwallowedError).await, 0);
}

#[tokio::test]
async fn handler_savepoints_still_work() {
    assert_commits_once(Misuse::SavepointRecovered).await;
}

#[tokio::test]
async fn deleted_inbox_row_is_not_acked() {
    assert_eq!(assert_not_acked(Misuse::DeletesInboxRow).await, 0);
}

#[tokio::test]
async fn handler_ending_the_transaction_is_not_acked() {
    assert_not_acked(Misuse::RawRollback).await;
}
