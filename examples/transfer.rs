//! Money transfer: the transactional outbox and the transactional inbox together,
//! under crashes.
//!
//! ```text
//! cargo run --example transfer [-- --transfers 300]
//! ```
//!
//! Accounts live in PostgreSQL. A transfer withdraws from one account and, in the same
//! transaction, enqueues a "deposit" message in the outbox: both commit or neither. A
//! relay publishes the outbox to RabbitMQ; a deposit consumer credits the target
//! account through the transactional inbox and announces the applied deposit through
//! the consumer outbox (the credit, a ledger row, the announcement and the dedup row
//! commit together). The same relay publishes the announcements to the
//! `transfer-announcements` queue; each carries an id derived from the deposit's, so
//! however often a deposit is redelivered or its handler re-run, it is announced under
//! one id. The consumer and the relay run in one host (`idem::amqp::Service`, the relay
//! as a hosted task), as one process of the deposit service would. While the transfers
//! run, the example keeps crashing the host at random moments (dropping its handle,
//! which aborts the consumer and the relay mid-work with their broker and database
//! connections), stopping it gracefully (what SIGTERM does) and starting it again, and
//! kills the consumer's database connections with `pg_terminate_backend`. Then it lets
//! everything drain and checks the invariants. Its last line:
//!
//! `transfer: transfers=N deposits_applied=N money_conserved=true duplicates=0 announced=N`
//!
//! `duplicates` counts deposits *applied* more than once (a non-unique ledger of every
//! application); redeliveries absorbed by the inbox are printed on the line before.
//! `announced` counts the distinct announcement ids that reached the queue when every
//! one of them is the id derived for an applied deposit (a relay crash between
//! publish and mark may deliver an id twice: a consumer's dedup absorbs that copy; the
//! line before says how many there were).
//! Uses `DATABASE_URL` and `AMQP_URL`; recreates its tables (`transfer_*`) and queue
//! (`transfer-deposits`, `transfer-announcements`) at start and deletes them at the end.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use idem::amqp::{Service, Topology};
use idem::outbox::{follow_up_id_at, Outbox, OutboxMessage, Relay};
use idem::sql::{PgInbox, Tx, TxConn};
use idem::{Consumer, HandlerError, IdempotencyKey, Json, State, WorkerHandle};
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use sqlx::{PgPool, Postgres};

const ACCOUNTS: i64 = 10;
const OPENING_BALANCE: i64 = 100_000;
const QUEUE: &str = "transfer-deposits";
const ANNOUNCEMENTS: &str = "transfer-announcements";
/// The deposit consumer's name: the scope of its dedup keys and of its follow-up ids.
const CONSUMER: &str = "deposits";

#[derive(serde::Serialize, serde::Deserialize)]
struct Deposit {
    to: i64,
    cents: i64,
}

/// What the deposit consumer announces once a deposit is applied.
#[derive(serde::Serialize)]
struct Applied<'a> {
    transfer: &'a str,
    to: i64,
    cents: i64,
}

async fn apply_deposit(
    key: IdempotencyKey,
    tx: Tx<Postgres>,
    State(outbox): State<Outbox>,
    Json(d): Json<Deposit>,
) -> Result<(), HandlerError> {
    let mut conn = tx.conn().await?;
    apply(&key, &mut conn, &d).await?;
    // In the same transaction: announced if and only if applied. The id is derived
    // from the deposit's key, so a re-run after a crash cannot announce it twice
    // under two ids.
    let applied = Applied {
        transfer: key.as_str(),
        to: d.to,
        cents: d.cents,
    };
    let announcement = OutboxMessage::json("", ANNOUNCEMENTS, &applied)?;
    outbox.enqueue_follow_up(&mut conn, announcement).await?;
    Ok(())
}

/// The credit and its ledger row, on the handler's locked transaction.
async fn apply(
    key: &IdempotencyKey,
    conn: &mut TxConn<'_, Postgres>,
    d: &Deposit,
) -> Result<(), HandlerError> {
    sqlx::query("UPDATE transfer_accounts SET cents = cents + $1 WHERE id = $2")
        .bind(d.cents)
        .bind(d.to)
        .execute(&mut **conn)
        .await?;
    sqlx::query(
        "INSERT INTO transfer_applied (transfer_id, to_account, cents) VALUES ($1, $2, $3)",
    )
    .bind(key.as_str())
    .bind(d.to)
    .bind(d.cents)
    .execute(&mut **conn)
    .await?;
    Ok(())
}

async fn pool(url: &str, app: &str, max: u32) -> Result<PgPool, String> {
    let opts: sqlx::postgres::PgConnectOptions =
        url.parse().map_err(|e| format!("bad DATABASE_URL: {e}"))?;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts.application_name(app))
        .await
        .map_err(|e| {
            format!(
                "PostgreSQL is not reachable at {} ({e}); see \"Running the tests\" in the README",
                idem::redact::redact_url(url)
            )
        })
}

/// The deposit service as one process runs it: the deposit consumer and the outbox
/// relay in one host, stopped together (`shutdown_and_join`, what SIGTERM does).
fn start_host(
    url: &str,
    consumer: Consumer,
    pool: &PgPool,
    outbox: &Outbox,
) -> Result<Host, idem::amqp::Error> {
    let relay = Relay::builder(pool.clone(), outbox.clone(), url)
        .connection_name("idem-example-transfer-relay")
        .batch_size(50)
        .poll_interval(Duration::from_millis(200))
        .build();
    let service = Service::builder(url)
        .consumer(Topology::new(QUEUE), consumer, |w| {
            w.prefetch(20).connection_name("idem-example-transfer")
        })
        .task(relay)
        .shutdown_timeout(Duration::from_secs(10))
        .build()?;
    Ok(service.spawn())
}

type Host = WorkerHandle<Result<idem::amqp::ServiceStats, idem::amqp::Error>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let transfers: i64 = idem_examples::arg("--transfers")
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let db_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let amqp_url = idem_examples::amqp_url();
    let app = pool(&db_url, "idem-example-transfer-app", 4).await?;
    let consumer_pool = pool(&db_url, "idem-example-transfer-consumer", 25).await?;
    for sql in [
        "DROP TABLE IF EXISTS transfer_accounts, transfer_applied, transfer_inbox, transfer_inbox_starts, transfer_outbox",
        "CREATE TABLE transfer_accounts (id BIGINT PRIMARY KEY, cents BIGINT NOT NULL)",
        "CREATE TABLE transfer_applied (transfer_id TEXT NOT NULL, to_account BIGINT NOT NULL, cents BIGINT NOT NULL)",
    ] {
        sqlx::query(sql).execute(&app).await?;
    }
    sqlx::query("INSERT INTO transfer_accounts SELECT g, $1 FROM generate_series(1, $2) g")
        .bind(OPENING_BALANCE)
        .bind(ACCOUNTS)
        .execute(&app)
        .await?;
    let outbox = Outbox::new("transfer_outbox")?;
    outbox.ensure_schema(&app).await?;
    let inbox = PgInbox::new(consumer_pool.clone()).try_table("transfer_inbox")?;
    inbox.ensure_schema().await?;
    let consumer = Consumer::builder(CONSUMER)
        .dedup(inbox)
        .handler_with_state(apply_deposit, outbox.clone())?;

    let admin = idem_examples::rabbit().await?;
    let ch = admin.create_channel().await?;
    let topology = Topology::new(QUEUE);
    topology.delete_on(&ch).await?;
    topology.declare_on(&ch).await?;
    ch.queue_delete(ANNOUNCEMENTS.into(), QueueDeleteOptions::default())
        .await?;
    ch.queue_declare(
        ANNOUNCEMENTS.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    println!("setup    {ACCOUNTS} accounts x {OPENING_BALANCE} cents, queue {QUEUE}, {transfers} transfers to make");

    // The producer: each transfer is one transaction (withdrawal + outbox message).
    let producer = {
        let app = app.clone();
        let outbox = outbox.clone();
        tokio::spawn(async move {
            for i in 0..transfers {
                let from = fastrand::i64(1..=ACCOUNTS);
                let to = (from % ACCOUNTS) + 1;
                let cents = fastrand::i64(1..=500);
                let mut tx = app.begin().await?;
                sqlx::query("UPDATE transfer_accounts SET cents = cents - $1 WHERE id = $2")
                    .bind(cents)
                    .bind(from)
                    .execute(&mut *tx)
                    .await?;
                let deposit = OutboxMessage::json("", QUEUE, &Deposit { to, cents })?
                    .ordering_key(format!("account-{to}"));
                outbox.enqueue(&mut tx, deposit).await?;
                tx.commit().await?;
                if i % 50 == 49 {
                    println!("produce  {} transfers committed", i + 1);
                }
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        })
    };

    // Chaos: crash, stop and restart the host while transfers flow.
    let mut host = start_host(&amqp_url, consumer.clone(), &app, &outbox)?;
    let (mut crashes, mut restarts, mut db_kills) = (0, 0, 0);
    let chaos_until = Instant::now() + Duration::from_millis(transfers as u64 * 8 + 1500);
    while Instant::now() < chaos_until {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(150..600))).await;
        match fastrand::u8(0..3) {
            0 => {
                drop(host); // a hard stop: the consumer and the relay die mid-work
                crashes += 1;
                println!("crash    host aborted mid-work (unacked deliveries go back to the queue, the relay's round rolls back); restarting");
                host = start_host(&amqp_url, consumer.clone(), &app, &outbox)?;
            }
            1 => {
                host.shutdown_and_join().await?;
                restarts += 1;
                println!("restart  host stopped gracefully (in-flight deposits and the relay's round finished); starting again");
                host = start_host(&amqp_url, consumer.clone(), &app, &outbox)?;
            }
            _ => {
                let killed: i64 = sqlx::query_scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'idem-example-transfer-consumer'",
                )
                .fetch_one(&app)
                .await?;
                db_kills += 1;
                println!("crash    killed {killed} consumer database connection(s)");
            }
        }
    }
    producer.await?.map_err(|e| e.to_string())?;
    println!("chaos    over: {crashes} host crashes, {restarts} graceful restarts, {db_kills} database kills; draining");

    // Drain: every committed transfer must arrive exactly once.
    let deadline = Instant::now() + Duration::from_secs(90);
    let applied = loop {
        let applied: i64 =
            sqlx::query_scalar("SELECT count(DISTINCT transfer_id) FROM transfer_applied")
                .fetch_one(&app)
                .await?;
        let pending = outbox.status(&app).await?.pending;
        if (applied == transfers && pending == 0) || Instant::now() > deadline {
            break applied;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    host.shutdown_and_join().await?;
    let stats = consumer.stats();

    let total: i64 = sqlx::query_scalar("SELECT sum(cents)::BIGINT FROM transfer_accounts")
        .fetch_one(&app)
        .await?;
    let applications: i64 = sqlx::query_scalar("SELECT count(*) FROM transfer_applied")
        .fetch_one(&app)
        .await?;
    let conserved = total == ACCOUNTS * OPENING_BALANCE;
    let dup_applied = applications - applied;
    // Every applied deposit announced under its one derived id, and nothing else.
    let keys: Vec<String> = sqlx::query_scalar("SELECT DISTINCT transfer_id FROM transfer_applied")
        .fetch_all(&app)
        .await?;
    let expected: HashSet<String> = keys
        .iter()
        .map(|k| follow_up_id_at(CONSUMER, k, 0).to_string())
        .collect();
    let (mut announced, mut copies, mut unexpected) = (HashSet::new(), 0, 0);
    while let Some(m) = ch
        .basic_get(ANNOUNCEMENTS.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        if !expected.contains(&id) {
            unexpected += 1;
        } else if !announced.insert(id) {
            copies += 1;
        }
    }
    ch.queue_delete(ANNOUNCEMENTS.into(), QueueDeleteOptions::default())
        .await?;
    for sql in [
        "DROP TABLE IF EXISTS transfer_accounts, transfer_applied, transfer_inbox, transfer_inbox_starts, transfer_outbox",
    ] {
        sqlx::query(sql).execute(&app).await?;
    }
    topology.delete_on(&ch).await?;
    let _ = admin.close(200, "bye".into()).await;
    println!(
        "inbox    {} deposits applied, {} redelivered copies absorbed as duplicates, {} retries",
        stats.processed, stats.duplicates, stats.retries
    );
    println!(
        "outbox   {} deposits announced, {copies} re-published copies, {unexpected} announcements with an unexpected id",
        announced.len()
    );
    let announced = if unexpected == 0 { announced.len() } else { 0 };
    println!("transfer: transfers={transfers} deposits_applied={applied} money_conserved={conserved} duplicates={dup_applied} announced={announced}");
    if applied != transfers || !conserved || dup_applied != 0 || announced as i64 != transfers {
        return Err("invariant violated".into());
    }
    Ok(())
}
