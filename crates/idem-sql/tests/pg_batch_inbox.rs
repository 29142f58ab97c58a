//! Batch handlers on the PostgreSQL inbox: one transaction per batch, a savepoint per
//! message, each message its own outcome. Statements are counted from sqlx's own
//! statement log (tracing target `sqlx::query`), as in `pg_batching.rs`.
//! DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "postgres")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::batch::Batch;
use idem_core::memory::MemoryBroker;
use idem_core::testing::Harness;
use idem_core::{Backoff, Consumer, Disposition, HandlerError, Jitter, Message};
use idem_sql::{PgInbox, Tx};
use idem_testkit::logs::LogCapture;
use sqlx::{PgPool, Postgres};

mod common;
use common::{pg, unique};

/// The statement log is process-wide: the tests of this file run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone)]
struct App {
    effects: String,
}

/// Per message, in its savepoint: writes its effect, then fails if its body says so
/// (`poison`: permanent; `flaky`: transient on its first attempt), which undoes the
/// effect.
async fn record(
    idem_core::State(app): idem_core::State<App>,
    batch: Batch<Message>,
) -> Result<(), HandlerError> {
    batch
        .each(|item| {
            let effects = app.effects.clone();
            async move {
                let tx: Tx<Postgres> = item.extract()?;
                let attempt = i32::try_from(item.message().delivery.attempt).unwrap_or(0);
                let body = item.message().body.clone();
                {
                    let mut conn = tx.conn().await?;
                    sqlx::query(&format!(
                        "INSERT INTO {effects} (idem_key, attempt) VALUES ($1, $2)"
                    ))
                    .bind(tx.key())
                    .bind(attempt)
                    .execute(&mut *conn)
                    .await?;
                }
                match &body[..] {
                    b"poison" => Err(HandlerError::permanent("poison payload")),
                    b"flaky" if attempt == 1 => Err(HandlerError::transient("try again")),
                    _ => Ok(()),
                }
            }
        })
        .await
}

async fn setup(tag: &str) -> (PgPool, PgInbox, String) {
    let pool = pg::pool(tag, 8).await;
    let inbox = pg::inbox(&pool, tag).await;
    let effects = pg::effect_table(
        &pool,
        "idem_key TEXT NOT NULL, attempt INT NOT NULL, \
         tx BIGINT NOT NULL DEFAULT txid_current()",
    )
    .await;
    (pool, inbox, effects)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_of_100_with_2_poison_1_duplicate_1_transient_commits_96_in_one_transaction() {
    let _serial = SERIAL.lock().await;
    let log = LogCapture::default();
    log.install_global("sqlx::query=debug");
    let (pool, inbox, effects) = setup("pgbi").await;
    let name = unique("batchc");
    // The duplicate: its key is already done.
    sqlx::query(&format!(
        "INSERT INTO {} (consumer, idem_key, state, owner, fingerprint, expires_at) \
         VALUES ($1, 'm-dup', 'succeeded', NULL, NULL, 9000000000000)",
        inbox.table_name()
    ))
    .bind(&name)
    .execute(&pool)
    .await
    .unwrap();
    let consumer = Consumer::builder(&name)
        .dedup(inbox.clone())
        .backoff(
            Backoff::exponential(Duration::from_millis(50))
                .jitter(Jitter::None)
                .max_attempts(3),
        )
        .batch_size(100)
        .batch_wait(Duration::from_millis(300))
        .batch_handler_with_state(
            record,
            App {
                effects: effects.clone(),
            },
        )
        .unwrap();
    let broker = MemoryBroker::new();
    let queue = unique("q");
    for i in 0..100 {
        let (id, body) = match i {
            10 | 60 => (format!("m-{i}"), "poison"),
            30 => ("m-dup".to_owned(), "dup"),
            80 => (format!("m-{i}"), "flaky"),
            _ => (format!("m-{i}"), "ok"),
        };
        broker.publish(&queue, Message::new(body).with_message_id(id));
    }
    let settled = Arc::new(Mutex::new(Vec::new()));
    let seen = settled.clone();
    let stats = broker
        .worker(&queue, consumer)
        .prefetch(100)
        .on_settle(move |s| {
            seen.lock()
                .unwrap()
                .push((s.message_id.map(str::to_owned), s.disposition.clone()))
        })
        .run_until_idle()
        .await;

    let settled = settled.lock().unwrap().clone();
    let count = |f: &dyn Fn(&Disposition) -> bool| settled.iter().filter(|(_, d)| f(d)).count();
    assert_eq!(
        count(&|d| *d == Disposition::Ack { duplicate: true }),
        1,
        "one duplicate ack"
    );
    assert_eq!(
        count(&|d| matches!(d, Disposition::DeadLetter { .. })),
        2,
        "two DLQ copies"
    );
    assert_eq!(
        count(&|d| matches!(d, Disposition::Retry { .. })),
        1,
        "one retry copy"
    );
    assert_eq!(
        count(&|d| *d == Disposition::Ack { duplicate: false }),
        97,
        "96 + the retry"
    );
    assert_eq!(broker.len(&format!("{queue}.dlq")), 2);
    let retried: Vec<_> = settled
        .iter()
        .filter(|(_, d)| matches!(d, Disposition::Retry { .. }))
        .map(|(id, _)| id.clone().unwrap_or_default())
        .collect();
    assert_eq!(retried, vec!["m-80".to_owned()]);
    assert_eq!(
        (stats.processed, stats.duplicates, stats.dead_lettered),
        (97, 1, 2)
    );

    // The first batch: 96 effects, all in one top-level transaction; the poison and
    // the transient ones were rolled back to their savepoints.
    let first: Vec<(i64, i64)> = sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT tx) FROM {effects} WHERE attempt = 1"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(first, vec![(96, 1)]);
    let retry: Vec<String> =
        sqlx::query_scalar(&format!("SELECT idem_key FROM {effects} WHERE attempt = 2"))
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        retry,
        vec!["m-80".to_owned()],
        "the transient one, on its retry"
    );
    let states: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT idem_key, state FROM {} WHERE consumer = $1 AND state <> 'succeeded' ORDER BY idem_key",
        inbox.table_name()
    ))
    .bind(&name)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        states,
        vec![
            ("m-10".to_owned(), "poisoned".to_owned()),
            ("m-60".to_owned(), "poisoned".to_owned())
        ]
    );
    let starts: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}",
        inbox.starts_table_name()
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(starts, 0, "every start counter settled");

    // The statement log: the first batch is one transaction, from its admission
    // statement to its COMMIT (sqlx does not log BEGIN), holding the 99 handler
    // inserts (96 kept, 3 rolled back to their savepoints), one savepoint round trip
    // per message, and one settling statement; the retry is a second transaction.
    let lines = log.lines();
    let admissions = positions(&lines, |l| l.contains("WITH input AS"));
    let commits = positions(&lines, |l| l.contains(r#"summary="COMMIT""#));
    assert_eq!(admissions.len(), 2, "one admission statement per batch");
    let commit_after = |at: usize| commits.iter().copied().find(|&c| c > at).unwrap();
    let first = &lines[admissions[0]..commit_after(admissions[0])];
    let count = |needle: &str| first.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(count(&format!("INSERT INTO {effects}")), 99);
    let entered = count(r#"summary="SAVEPOINT"#) + count(r#"summary="RELEASE SAVEPOINT"#);
    assert_eq!(entered, 99, "one savepoint round trip per message");
    assert_eq!(count("ROLLBACK TO SAVEPOINT"), 3);
    assert_eq!(count("WITH cleared AS"), 1, "one settling statement");
    assert!(
        commit_after(admissions[0]) < admissions[1],
        "the retry's batch is a transaction of its own"
    );
    let starts = positions(&lines, |l| {
        l.contains(&format!("INSERT INTO {}", inbox.starts_table_name()))
    });
    assert_eq!(starts.len(), 2, "one start-count statement per batch");
    pg::drop_inbox(&pool, &inbox, [effects]).await;
}

fn positions(lines: &[String], f: impl Fn(&str) -> bool) -> Vec<usize> {
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| f(l))
        .map(|(i, _)| i)
        .collect()
}

/// `idem_core::testing`'s harness (duplicates, concurrent copies, crashes before the
/// handler, after the effect and after the commit, injected transient failures,
/// reordering) on a batch handler over the inbox: every key's effect exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_passes_on_a_batch_handler_over_the_inbox() {
    let _serial = SERIAL.lock().await;
    let (pool, inbox, effects) = setup("pgbh").await;
    let state = App {
        effects: effects.clone(),
    };
    let stage = inbox.clone();
    let name = unique("harness");
    let report = Harness::new(move |trouble| {
        Consumer::builder(name)
            .dedup(stage)
            .layer(trouble)
            .batch_size(8)
            .batch_wait(Duration::from_millis(5))
            .batch_handler_with_state(record, state)
    })
    .messages((0..60).map(|i| Message::new("ok").with_message_id(format!("h-{i}"))))
    .run(|key| pg::rows_for(&pool, &effects, "idem_key", key))
    .await
    .unwrap();
    eprintln!("{report}");
    report.assert_ok();
    pg::drop_inbox(&pool, &inbox, [effects]).await;
}
