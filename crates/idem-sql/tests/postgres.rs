//! PostgreSQL (DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres).
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design
#![cfg(feature = "postgres")]

#[macro_use]
mod common;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use idem_testkit::postgres as connect;
use idem_testkit::recovery::assert_recovers;

async fn pool(tag: &str) -> (PgPool, ()) {
    (
        connect(
            PgPoolOptions::new().max_connections(8),
            &common::unique(tag),
        )
        .await,
        (),
    )
}

fn ph(n: usize) -> String {
    format!("${n}")
}

fn text(col: &str) -> String {
    col.to_owned()
}

sql_suite!(sqlx::Postgres, pool, ph, text);

async fn terminate(app: &str) -> usize {
    let admin = connect(PgPoolOptions::new().max_connections(1), "idem-test-admin").await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(app)
    .fetch_all(&admin)
    .await
    .unwrap();
    admin.close().await;
    killed.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_connections_killed_is_transient_never_duplicate_then_recovers() {
    let app = common::unique("pgdown");
    // No ping on acquire: the dead idle connection is handed out and fails a query,
    // as a connection killed while in use would.
    let pool = connect(
        PgPoolOptions::new()
            .max_connections(2)
            .test_before_acquire(false),
        &app,
    )
    .await;
    let store = SqlStore::<sqlx::Postgres>::new(pool.clone())
        .try_table(&common::unique("pgdown"))
        .unwrap();
    store.ensure_schema().await.unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::builder("billing")
        .store(store.clone())
        .handler_with_state(
            |State(runs): State<Arc<AtomicUsize>>| async move {
                runs.fetch_add(1, Ordering::SeqCst);
            },
            runs.clone(),
        )
        .unwrap();
    let msg = |id: &str| Message::new("{}").with_message_id(id);
    assert_eq!(
        consumer.process(msg("a")).await,
        Disposition::Ack { duplicate: false }
    );

    assert!(terminate(&app).await >= 1, "killed the store's connections");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A dead connection must be a transient retry, never a duplicate.
    common::assert_failure(
        &consumer.process(msg("a")).await,
        "retry",
        ErrorKind::Transient,
        "dedup store unavailable",
    );
    assert_recovers(&consumer, 20, &msg("b"), &msg("a"), "the pool recovered").await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    drop_table(&pool, &store.table_name().to_string()).await;
}

#[derive(Clone)]
struct KillCtx {
    app: String,
    insert: Arc<str>,
    runs: Arc<AtomicUsize>,
}

async fn killed_mid_handler(
    State(ctx): State<KillCtx>,
    key: IdempotencyKey,
    tx: Tx<sqlx::Postgres>,
) -> Result<(), HandlerError> {
    let run = ctx.runs.fetch_add(1, Ordering::SeqCst);
    let mut conn = tx.conn().await?;
    common::pg::insert_effect(&mut conn, &ctx.insert, key.as_str(), None).await?;
    if run == 0 {
        // The database "goes away" under the open transaction.
        terminate(&ctx.app).await;
    }
    common::pg::insert_effect(&mut conn, &ctx.insert, key.as_str(), None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_connection_killed_mid_handler_rolls_back_then_recovers() {
    let app = common::unique("pgkill");
    let pool = connect(PgPoolOptions::new().max_connections(4), &app).await;
    let t = common::pg::Tables::new(pool, "inbox", "k TEXT NOT NULL").await;
    let ctx = KillCtx {
        app: app.clone(),
        insert: format!("INSERT INTO {} (k) VALUES ($1)", t.effects).into(),
        runs: Arc::new(AtomicUsize::new(0)),
    };
    let consumer = Consumer::builder("billing")
        .dedup(t.inbox.clone())
        .handler_with_state(killed_mid_handler, ctx.clone())
        .unwrap();
    let msg = Message::new("{}").with_message_id("pay-k");
    // The killed transaction must be retried.
    common::assert_failure(
        &consumer.process(msg.clone()).await,
        "retry",
        ErrorKind::Transient,
        "",
    );
    assert_eq!(
        t.count(&t.effects).await,
        0,
        "nothing of the killed transaction survived"
    );
    assert_eq!(
        state_of(&t.pool, &t.inbox.table_name().to_string(), "pay-k").await,
        None
    );
    assert_eq!(
        consumer.process(msg.clone()).await,
        Disposition::Ack { duplicate: false }
    );
    assert_eq!(
        consumer.process(msg).await,
        Disposition::Ack { duplicate: true }
    );
    assert_eq!(
        t.count(&t.effects).await,
        2,
        "the successful run's two writes, once"
    );
    t.drop_all().await;
}
