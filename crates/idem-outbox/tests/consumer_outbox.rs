//! The consumer outbox (follow-ups enqueued through a PostgreSQL inbox handler's
//! transaction) and delayed rows, against the real PostgreSQL and RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use idem_core::{Consumer, Disposition, HandlerError, IdempotencyKey, Message, State};
use idem_outbox::{follow_up_id, follow_up_id_at, Outbox, OutboxMessage, Relay};
use idem_sql::{PgInbox, Tx};
use sqlx::Postgres;

mod common;
use common::{amqp_url, message_id, Fixture};

impl Fixture {
    fn relay(&self) -> Relay {
        Relay::builder(self.pool.clone(), self.outbox.clone(), amqp_url()).build()
    }

    async fn rows(&self) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {}",
            self.outbox.table_name()
        ))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }
}

/// What the deposit handler of these tests shares across runs.
#[derive(Clone)]
struct Ctx {
    outbox: Outbox,
    queue: String,
    effects: String,
    /// Runs that still fail after enqueueing (rolled back).
    fail_runs: Arc<Mutex<u32>>,
    /// The follow-up ids each run got back from the outbox.
    ids: Arc<Mutex<Vec<Vec<uuid::Uuid>>>>,
}

/// Applies the effect, then announces it twice (a positional and a named follow-up),
/// all on the one locked connection it holds from start to end (enqueueing takes that
/// guard: a handler cannot wait on its own lock).
async fn deposit(
    key: IdempotencyKey,
    tx: Tx<Postgres>,
    State(ctx): State<Ctx>,
) -> Result<(), HandlerError> {
    let mut conn = tx.conn().await?;
    sqlx::query(&format!("INSERT INTO {} (k) VALUES ($1)", ctx.effects))
        .bind(key.as_str())
        .execute(&mut *conn)
        .await?;
    let applied = OutboxMessage::new("", ctx.queue.clone(), b"applied".to_vec());
    let audit = OutboxMessage::new("", ctx.queue.clone(), b"audit".to_vec());
    let ids = vec![
        ctx.outbox.enqueue_follow_up(&mut conn, applied).await?,
        ctx.outbox
            .enqueue_follow_up_named(&mut conn, "audit", audit)
            .await?,
    ];
    drop(conn);
    ctx.ids.lock().unwrap().push(ids);
    let mut fail = ctx.fail_runs.lock().unwrap();
    if *fail > 0 {
        *fail -= 1;
        return Err(HandlerError::transient(std::io::Error::other(
            "failed after enqueueing",
        )));
    }
    Ok(())
}

async fn deposit_consumer(f: &Fixture, fail_runs: u32) -> (Consumer, Ctx, Vec<String>) {
    let effects = format!("idem_co_fx_{}", f.id);
    let inbox_table = format!("idem_co_inbox_{}", f.id);
    sqlx::query(&format!("CREATE TABLE {effects} (k TEXT PRIMARY KEY)"))
        .execute(&f.pool)
        .await
        .unwrap();
    let inbox = PgInbox::new(f.pool.clone())
        .try_table(&inbox_table)
        .unwrap();
    inbox.ensure_schema().await.unwrap();
    let ctx = Ctx {
        outbox: f.outbox.clone(),
        queue: f.queue.clone(),
        effects: effects.clone(),
        fail_runs: Arc::new(Mutex::new(fail_runs)),
        ids: Arc::default(),
    };
    let consumer = Consumer::builder("deposits")
        .dedup(inbox)
        .handler_with_state(deposit, ctx.clone())
        .unwrap();
    let tables = vec![effects, format!("{inbox_table}_starts"), inbox_table];
    (consumer, ctx, tables)
}

#[tokio::test]
async fn follow_ups_of_a_rolled_back_run_are_never_published() {
    let f = Fixture::new("c").await;
    let (consumer, ctx, tables) = deposit_consumer(&f, u32::MAX).await;
    let out = consumer
        .process(Message::new("{}").with_message_id("d-1"))
        .await;
    assert!(matches!(out, Disposition::Retry { .. }), "{out:?}");
    assert_eq!(
        ctx.ids.lock().unwrap().len(),
        1,
        "the handler ran and enqueued"
    );
    assert_eq!(
        f.rows().await,
        0,
        "the rollback took the follow-ups with it"
    );
    assert_eq!(f.relay().drain().await.unwrap().published, 0);
    assert!(f.take(0).await.is_empty(), "nothing reached the broker");
    f.cleanup(&tables).await;
}

#[tokio::test]
async fn rerun_after_rollback_and_redelivery_after_commit_publish_each_follow_up_once() {
    let f = Fixture::new("c").await;
    // Run 1 enqueues and fails (as a crash before commit would: rolled back);
    // run 2 commits; then the broker redelivers (as after a crash before the ack).
    let (consumer, ctx, tables) = deposit_consumer(&f, 1).await;
    let msg = || Message::new("{}").with_message_id("d-7");
    let first = consumer.process(msg()).await;
    assert!(matches!(first, Disposition::Retry { .. }), "{first:?}");
    assert_eq!(
        consumer.process(msg()).await,
        Disposition::Ack { duplicate: false }
    );
    let mut again = msg();
    again.delivery.redelivered = true;
    assert_eq!(
        consumer.process(again).await,
        Disposition::Ack { duplicate: true },
        "the redelivery is a duplicate: the handler does not run again"
    );

    let runs = ctx.ids.lock().unwrap().clone();
    assert_eq!(runs.len(), 2, "two runs enqueued: {runs:?}");
    assert_eq!(runs[0], runs[1], "the re-run derived the same ids");
    let expected = vec![
        follow_up_id_at("deposits", "d-7", 0),
        follow_up_id("deposits", "d-7", "audit"),
    ];
    assert_eq!(runs[1], expected);
    assert_ne!(expected[0], expected[1]);
    assert_eq!(f.rows().await, 2);

    // A relay that dies after publishing publishes again: same ids, so downstream
    // dedup absorbs the copies; after the marking round each id is out once more.
    let crashing = Relay::builder(f.pool.clone(), f.outbox.clone(), amqp_url())
        .fail_after_publish(1)
        .build();
    assert!(crashing.drain().await.is_err(), "the crash point fired");
    assert_eq!(f.relay().drain().await.unwrap().published, 2);
    let got = f.take(4).await;
    let mut ids: Vec<String> = got.iter().map(message_id).collect();
    ids.sort();
    let mut want: Vec<String> = expected
        .iter()
        .flat_map(|id| [id.to_string(), id.to_string()])
        .collect();
    want.sort();
    assert_eq!(ids, want, "each follow-up under its one id, no other");
    assert_eq!(f.relay().drain().await.unwrap().published, 0);
    f.cleanup(&tables).await;
}

#[tokio::test]
async fn a_follow_up_enqueued_after_the_handler_returned_is_refused() {
    let f = Fixture::new("c").await;
    let kept: Arc<Mutex<Option<Tx<Postgres>>>> = Arc::default();
    let k = kept.clone();
    let inbox_table = format!("idem_co_late_{}", f.id);
    let inbox = PgInbox::new(f.pool.clone())
        .try_table(&inbox_table)
        .unwrap();
    inbox.ensure_schema().await.unwrap();
    let consumer = Consumer::builder("late")
        .dedup(inbox)
        .handler(move |tx: Tx<Postgres>| {
            *k.lock().unwrap() = Some(tx);
            async { Ok::<(), HandlerError>(()) }
        })
        .unwrap();
    let out = consumer
        .process(Message::new("{}").with_message_id("l-1"))
        .await;
    assert_eq!(out, Disposition::Ack { duplicate: false });
    let tx = kept.lock().unwrap().take().unwrap();
    // A follow-up needs the locked transaction, which is gone once the inbox
    // committed: nothing can be enqueued late.
    let late = tx.conn().await;
    assert!(matches!(late, Err(idem_sql::TxClosed)), "{late:?}");
    assert_eq!(f.rows().await, 0);
    f.cleanup(&[format!("{inbox_table}_starts"), inbox_table])
        .await;
}

#[tokio::test]
async fn delayed_rows_wait_for_their_time() {
    let f = Fixture::new("c").await;
    let mut tx = f.pool.begin().await.unwrap();
    let msg = |body: &[u8]| OutboxMessage::new("", f.queue.clone(), body.to_vec());
    let now_id = f.outbox.enqueue(&mut tx, msg(b"now")).await.unwrap();
    let delayed = f
        .outbox
        .enqueue(&mut tx, msg(b"in 4 s").delay(Duration::from_secs(4)))
        .await
        .unwrap();
    let at = f
        .outbox
        .enqueue(
            &mut tx,
            msg(b"at +4 s").not_before(SystemTime::now() + Duration::from_secs(4)),
        )
        .await
        .unwrap();
    let past = f
        .outbox
        .enqueue(
            &mut tx,
            msg(b"in the past").not_before(SystemTime::now() - Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let started = std::time::Instant::now();

    let relay = f.relay();
    assert_eq!(relay.drain().await.unwrap().published, 2);
    let got: Vec<String> = f.take(2).await.iter().map(message_id).collect();
    assert_eq!(got, [now_id.to_string(), past.to_string()]);
    let status = f.outbox.status(&f.pool).await.unwrap();
    assert_eq!(status.pending, 2, "the delayed rows wait");
    assert_eq!(
        status.oldest_pending_age, None,
        "rows not due yet are not lag"
    );
    // Still not due a moment later (the check is only meaningful well before 4 s).
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "machine too slow for this test"
    );
    assert_eq!(
        relay.drain().await.unwrap().published,
        2,
        "nothing more went out"
    );

    tokio::time::sleep(Duration::from_millis(4200).saturating_sub(started.elapsed())).await;
    assert_eq!(
        relay.drain().await.unwrap().published,
        4,
        "both delayed rows went out"
    );
    let mut got: Vec<String> = f.take(2).await.iter().map(message_id).collect();
    got.sort();
    let mut want = vec![delayed.to_string(), at.to_string()];
    want.sort();
    assert_eq!(got, want);
    f.cleanup(&[]).await;
}
