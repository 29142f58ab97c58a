//! Immediate retries and discard on the PostgreSQL transactional inbox
//! (DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres): each
//! immediate retry runs in a transaction of its own (the failed try's writes are
//! rolled back), and a discard commits the inbox row as `done`.

#![allow(clippy::unwrap_used)]
#![cfg(feature = "postgres")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{Consumer, Disposition, HandlerError, IdempotencyKey, Message, State};
use idem_sql::Tx;

mod common;
use common::pg::{self, Tables};

#[derive(Clone)]
struct Ctx {
    insert: Arc<str>,
    runs: Arc<AtomicUsize>,
    /// How many runs fail after writing; `usize::MAX`: every run discards instead.
    fail_first: usize,
}

/// Writes one row in the inbox transaction, then fails (transient) on the first
/// `fail_first` runs; with `fail_first == usize::MAX`, discards after writing.
async fn write_then_maybe_fail(
    State(ctx): State<Ctx>,
    key: IdempotencyKey,
    tx: Tx<sqlx::Postgres>,
) -> Result<(), HandlerError> {
    let run = ctx.runs.fetch_add(1, Ordering::SeqCst);
    let mut conn = tx.conn().await?;
    pg::insert_effect(
        &mut conn,
        &ctx.insert,
        key.as_str(),
        Some(i64::try_from(run).unwrap()),
    )
    .await?;
    if ctx.fail_first == usize::MAX {
        return Err(HandlerError::discard("superseded"));
    }
    if run < ctx.fail_first {
        return Err(HandlerError::transient(std::io::Error::other(
            "downstream reset",
        )));
    }
    Ok(())
}

/// The inbox and the effect table (`k`, `run`) of one test.
async fn tables(tag: &str) -> Tables {
    Tables::new(
        pg::pool(tag, 4).await,
        "inbox",
        "k TEXT NOT NULL, run BIGINT NOT NULL",
    )
    .await
}

impl Tables {
    fn ctx(&self, fail_first: usize) -> Ctx {
        Ctx {
            insert: format!("INSERT INTO {} (k, run) VALUES ($1, $2)", self.effects).into(),
            runs: Arc::default(),
            fail_first,
        }
    }

    async fn runs_kept(&self) -> Vec<i64> {
        sqlx::query_scalar(&format!("SELECT run FROM {} ORDER BY run", self.effects))
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_immediate_retry_runs_in_a_new_transaction() {
    let f = tables("inbox-immediate").await;
    let ctx = f.ctx(2);
    let consumer = Consumer::builder("ledger")
        .dedup(f.inbox.clone())
        .immediate_retries(2)
        .immediate_retry_delay(Duration::from_millis(5))
        .handler_with_state(write_then_maybe_fail, ctx.clone())
        .unwrap();
    let msg = Message::new("{}").with_message_id("entry-1");
    assert_eq!(
        consumer.process(msg.clone()).await,
        Disposition::Ack { duplicate: false }
    );
    assert_eq!(ctx.runs.load(Ordering::SeqCst), 3);
    assert_eq!(
        f.runs_kept().await,
        [2],
        "the failed tries' writes were rolled back; only the third try's row is kept"
    );
    assert_eq!(consumer.stats().immediate_retries, 2);
    assert_eq!(
        consumer.process(msg).await,
        Disposition::Ack { duplicate: true }
    );
    assert_eq!(ctx.runs.load(Ordering::SeqCst), 3);
    f.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discard_commits_the_inbox_row_as_done() {
    let f = tables("inbox-discard").await;
    let ctx = f.ctx(usize::MAX);
    let consumer = Consumer::builder("ledger")
        .dedup(f.inbox.clone())
        .handler_with_state(write_then_maybe_fail, ctx.clone())
        .unwrap();
    let msg = Message::new("{}").with_message_id("entry-2");
    assert_eq!(
        consumer.process(msg.clone()).await,
        Disposition::Discard {
            reason: "superseded".into()
        }
    );
    // Documented: a discard commits the handler's transaction like a success.
    assert_eq!(f.runs_kept().await, [0]);
    assert_eq!(
        consumer.process(msg).await,
        Disposition::Ack { duplicate: true }
    );
    assert_eq!(ctx.runs.load(Ordering::SeqCst), 1);
    assert_eq!(consumer.stats().discarded, 1);
    f.drop_all().await;
}
