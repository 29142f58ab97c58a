//! `amqp-redis` and `amqp-postgres`: consume N persistent 256-byte messages with
//! unique message ids, effectively-once.
//!
//! - `amqp-redis`: the idem worker with the [`RedisStore`](idem_redis::RedisStore)
//!   (claim script, no-op handler, complete script, ack) against a hand-written
//!   concurrent lapin consumer doing one `SET key 1 NX PX 60000` per message, then
//!   the ack.
//! - `amqp-postgres`: the idem worker with the transactional inbox
//!   ([`idem_sql::PgInbox`]); the handler inserts one row in the lent
//!   transaction. Baseline: per message, `BEGIN`, `INSERT ... ON CONFLICT DO NOTHING`
//!   into a dedup table, the same effect insert, `COMMIT`, ack.
//!
//! With `--batch N` a third side runs in each round, between the two: the same worker
//! with a batch handler of N messages doing per message what the per-message handler
//! does (Redis: nothing, through `Batch::each`, so the store's claim and completion are
//! the whole work, as on the other sides; PostgreSQL: the same effect insert, through
//! `Batch::each` or, with `--batch-bulk`, one multi-row insert per batch).
//!
//! Same shape as `amqp-noop`: fresh queues and tables per run, runs alternate idem and
//! baseline, medians and the median per-round ratio.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use idem_amqp::Topology;
use idem_core::batch::Batch;
use idem_core::{Consumer, IdempotencyKey, State};
use idem_sql::{PgInbox, Tx};
use lapin::options::BasicAckOptions;
use sqlx::{PgPool, Postgres};

use crate::amqp_noop::{fill, Clock};
use crate::report::{Report, Side};

type BoxError = Box<dyn std::error::Error>;

/// Which store.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    Redis,
    Postgres,
}

/// Arguments of `amqp-redis` and `amqp-postgres`.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) base: crate::amqp_noop::ConsumerArgs,
    // --redis-url, for amqp-redis.
    #[command(flatten)]
    redis: crate::urls::RedisUrl,
    // --database-url.
    #[command(flatten)]
    postgres: crate::urls::PostgresUrl,
    /// Also run idem with a batch handler of this many messages, interleaved with the
    /// per-message idem run and the hand-written loop.
    #[arg(long)]
    batch: Option<usize>,
    /// Longest wait before a short batch closes, in milliseconds (with --batch).
    #[arg(long, default_value_t = 20)]
    batch_wait_ms: u64,
    /// With --batch (amqp-postgres only): the handler writes the whole batch in one
    /// multi-row `INSERT` on the batch's transaction (no savepoint per message) instead
    /// of `Batch::each`.
    #[arg(long)]
    batch_bulk: bool,
}

pub(crate) async fn run(store: Store, args: Args) -> Result<Report, BoxError> {
    if store == Store::Redis && args.batch_bulk {
        // The per-message Redis handler writes nothing: there is no bulk write to mirror.
        return Err("--batch-bulk is for amqp-postgres only".into());
    }
    let tls = args.base.tls()?;
    let broker = args.base.broker().await?;
    let ch = &broker.ch;
    let pool = match store {
        Store::Postgres => Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(u32::from(args.base.prefetch).clamp(4, 90))
                .connect(&args.postgres.database_url)
                .await?,
        ),
        Store::Redis => None,
    };
    let scenario = if store == Store::Redis {
        "amqp-redis"
    } else {
        "amqp-postgres"
    };
    let mut report = Report::new(scenario, args.base.messages, args.base.prefetch);
    let batch = args.batch;
    report.batch_size = batch;
    report.batch_mode = if args.batch_bulk { "bulk" } else { "each" };
    let sides: &[Side] = if batch.is_some() {
        &[Side::Idem, Side::Batch, Side::Baseline]
    } else {
        &[Side::Idem, Side::Baseline]
    };
    for round in 0..args.base.rounds.max(1) {
        for &side in sides {
            let run_id = uuid::Uuid::new_v4().simple().to_string();
            let topo = Topology::new(format!("idem-bench-{run_id}"));
            topo.declare_on(ch).await?;
            fill(&broker.publisher, topo.queue(), args.base.messages).await?;
            let tables = format!("idem_bench_{}", &run_id[..12]);
            if let Some(pool) = &pool {
                sqlx::query(&format!(
                    "CREATE TABLE {tables}_effects (id TEXT PRIMARY KEY)"
                ))
                .execute(pool)
                .await?;
            }
            let cpu = crate::cpu::Sample::now();
            let result = match (store, side, &pool) {
                (Store::Redis, Side::Baseline, _) => {
                    run_baseline_redis(&args, topo.queue(), &run_id).await
                }
                (Store::Redis, Side::Batch, _) => {
                    let size = batch.unwrap_or(1);
                    run_batch_redis(&args, &topo, &run_id, size).await
                }
                (Store::Redis, _, _) => run_idem_redis(&args, &topo, &run_id).await,
                (Store::Postgres, Side::Baseline, Some(pool)) => {
                    run_baseline_pg(&args, topo.queue(), pool, &tables).await
                }
                (Store::Postgres, Side::Batch, Some(pool)) => {
                    let size = batch.unwrap_or(1);
                    run_batch_pg(&args, &topo, pool, &tables, size).await
                }
                (Store::Postgres, _, Some(pool)) => run_idem_pg(&args, &topo, pool, &tables).await,
                (Store::Postgres, _, None) => Err("no pool".into()),
            };
            let used = cpu.per_message(args.base.messages);
            topo.delete_on(ch).await?;
            if store == Store::Redis {
                // Both sides' keys: idem's `idem-bench-<run>:{..}` and the baseline's.
                delete_keys(
                    &args.redis.redis_url,
                    &tls,
                    &format!("idem-bench-*{run_id}*"),
                )
                .await?;
            }
            if let Some(pool) = &pool {
                for t in ["effects", "inbox", "inbox_starts", "dedup"] {
                    sqlx::query(&format!("DROP TABLE IF EXISTS {tables}_{t}"))
                        .execute(pool)
                        .await?;
                }
            }
            let elapsed = result?;
            report.record(round, side, elapsed);
            report.record_cpu(side, used);
        }
    }
    broker.close().await;
    Ok(report)
}

/// Deletes the keys matching `pattern` (SCAN + UNLINK), so a bench leaves nothing
/// behind in Redis.
pub(crate) async fn delete_keys(
    redis_url: &str,
    tls: &idem_core::TlsConfig,
    pattern: &str,
) -> Result<(), BoxError> {
    let client = redis_client(redis_url, tls)?;
    let mut conn = redis::aio::ConnectionManager::new(client).await?;
    idem_testkit::tools::unlink_matching(&mut conn, pattern).await?;
    Ok(())
}

/// A redis-rs client for `url`, with `tls` for a rediss:// URL.
fn redis_client(url: &str, tls: &idem_core::TlsConfig) -> Result<redis::Client, BoxError> {
    if !url.starts_with("rediss://") || tls.is_default() {
        return Ok(redis::Client::open(url)?);
    }
    let certificates = redis::TlsCertificates {
        client_tls: tls
            .client_identity_pem()
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.to_vec(),
                client_key: key.to_vec(),
            }),
        root_cert: tls.ca_pem().map(<[u8]>::to_vec),
    };
    Ok(redis::Client::build_with_tls(url, certificates)?)
}

async fn run_worker(
    args: &Args,
    topo: &Topology,
    consumer: Consumer,
    clock: Arc<Clock>,
) -> Result<Duration, BoxError> {
    args.base
        .run_worker(topo, consumer, clock, "idem-bench-idem", |w| w)
        .await
}

/// The Redis store of a run's idem sides, its keys under `idem-bench-<run_id>`.
async fn redis_store(args: &Args, run_id: &str) -> Result<idem_redis::RedisStore, BoxError> {
    Ok(idem_redis::RedisStore::builder(&args.redis.redis_url)
        .tls(args.base.tls()?)
        .prefix(format!("idem-bench-{run_id}"))
        .connect()
        .await?)
}

async fn run_idem_redis(args: &Args, topo: &Topology, run_id: &str) -> Result<Duration, BoxError> {
    let store = redis_store(args, run_id).await?;
    let clock = Clock::new(args.base.messages);
    let c = clock.clone();
    let consumer = Consumer::builder("idem-bench-redis")
        .store(store)
        .handler(move || {
            c.started();
            async {}
        })?;
    run_worker(args, topo, consumer, clock).await
}

/// The Redis batch side: the per-message side's store, prefix and (no-op) work, the
/// work run per message through `Batch::each`.
async fn run_batch_redis(
    args: &Args,
    topo: &Topology,
    run_id: &str,
    size: usize,
) -> Result<Duration, BoxError> {
    let store = redis_store(args, run_id).await?;
    let clock = Clock::new(args.base.messages);
    let c = clock.clone();
    let consumer = Consumer::builder("idem-bench-redis-batch")
        .store(store)
        .batch_size(size)
        .batch_wait(Duration::from_millis(args.batch_wait_ms))
        .batch_handler(move |batch: Batch<IdempotencyKey>| {
            c.started();
            batch.each(|_| async {})
        })?;
    run_worker(args, topo, consumer, clock).await
}

async fn run_baseline_redis(args: &Args, queue: &str, run_id: &str) -> Result<Duration, BoxError> {
    let client = redis_client(&args.redis.redis_url, &args.base.tls()?)?;
    let redis = redis::aio::ConnectionManager::new(client).await?;
    let prefix = Arc::new(format!("idem-bench-base-{run_id}"));
    baseline(args, queue, move |id| {
        let mut redis = redis.clone();
        let prefix = prefix.clone();
        async move {
            let _: Option<String> = redis::cmd("SET")
                .arg(format!("{prefix}:{id}"))
                .arg("1")
                .arg("NX")
                .arg("PX")
                .arg(60_000)
                .query_async(&mut redis)
                .await
                .ok()?;
            Some(())
        }
    })
    .await
}

/// The effect: the same insert as the baseline's, SQL built once like the baseline's.
async fn effect(
    key: IdempotencyKey,
    tx: Tx<Postgres>,
    State(insert): State<Arc<String>>,
) -> Result<(), idem_core::HandlerError> {
    let mut conn = tx.conn().await?;
    sqlx::query(&insert)
        .bind(key.as_str())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The inbox of a run's idem sides, table `<tables>_inbox`, its schema created.
async fn pg_inbox(pool: &PgPool, tables: &str) -> Result<PgInbox, BoxError> {
    let inbox = PgInbox::new(pool.clone()).try_table(&format!("{tables}_inbox"))?;
    inbox.ensure_schema().await?;
    Ok(inbox)
}

async fn run_idem_pg(
    args: &Args,
    topo: &Topology,
    pool: &PgPool,
    tables: &str,
) -> Result<Duration, BoxError> {
    let inbox = pg_inbox(pool, tables).await?;
    let clock = Clock::new(args.base.messages);
    let c = clock.clone();
    let consumer = Consumer::builder("idem-bench-pg")
        .dedup(inbox)
        .handler_with_state(
            move |key: IdempotencyKey, tx: Tx<Postgres>, state: State<Arc<String>>| {
                c.started();
                effect(key, tx, state)
            },
            Arc::new(format!("INSERT INTO {tables}_effects (id) VALUES ($1)")),
        )?;
    run_worker(args, topo, consumer, clock).await
}

/// The batch side: the same effect insert per message, each in its savepoint of the
/// batch's one transaction.
async fn effects_in_batch(
    batch: Batch<IdempotencyKey>,
    State(insert): State<Arc<String>>,
) -> Result<(), idem_core::HandlerError> {
    batch
        .each(|item| {
            let insert = insert.clone();
            async move {
                let tx: Tx<Postgres> = item.extract()?;
                let mut conn = tx.conn().await?;
                sqlx::query(&insert)
                    .bind(item.as_str())
                    .execute(&mut *conn)
                    .await?;
                Ok::<(), idem_core::HandlerError>(())
            }
        })
        .await
}

/// The bulk batch side: every message's effect in one statement on the batch's
/// transaction.
async fn effects_in_bulk(
    batch: Batch<IdempotencyKey>,
    tx: Tx<Postgres>,
    State(insert): State<Arc<String>>,
) -> Result<(), idem_core::HandlerError> {
    let ids: Vec<String> = batch.iter().map(|k| k.as_str().to_owned()).collect();
    let mut conn = tx.conn().await?;
    sqlx::query(&insert).bind(ids).execute(&mut *conn).await?;
    Ok(())
}

async fn run_batch_pg(
    args: &Args,
    topo: &Topology,
    pool: &PgPool,
    tables: &str,
    size: usize,
) -> Result<Duration, BoxError> {
    let inbox = pg_inbox(pool, tables).await?;
    let clock = Clock::new(args.base.messages);
    let c = clock.clone();
    let builder = Consumer::builder("idem-bench-pg-batch")
        .dedup(inbox)
        .batch_size(size)
        .batch_wait(Duration::from_millis(args.batch_wait_ms));
    if args.batch_bulk {
        let consumer = builder.batch_handler_with_state(
            move |batch: Batch<IdempotencyKey>, tx: Tx<Postgres>, state: State<Arc<String>>| {
                c.started();
                effects_in_bulk(batch, tx, state)
            },
            Arc::new(format!(
                "INSERT INTO {tables}_effects (id) SELECT * FROM unnest($1::text[])"
            )),
        )?;
        return run_worker(args, topo, consumer, clock).await;
    }
    let consumer = builder.batch_handler_with_state(
        move |batch: Batch<IdempotencyKey>, state: State<Arc<String>>| {
            c.started();
            effects_in_batch(batch, state)
        },
        Arc::new(format!("INSERT INTO {tables}_effects (id) VALUES ($1)")),
    )?;
    run_worker(args, topo, consumer, clock).await
}

async fn run_baseline_pg(
    args: &Args,
    queue: &str,
    pool: &PgPool,
    tables: &str,
) -> Result<Duration, BoxError> {
    sqlx::query(&format!("CREATE TABLE {tables}_dedup (consumer TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (consumer, id))"))
        .execute(pool)
        .await?;
    let pool = pool.clone();
    let dedup = Arc::new(format!(
        "INSERT INTO {tables}_dedup (consumer, id) VALUES ('bench', $1) ON CONFLICT DO NOTHING"
    ));
    let insert = Arc::new(format!("INSERT INTO {tables}_effects (id) VALUES ($1)"));
    baseline(args, queue, move |id| {
        let (pool, dedup, insert) = (pool.clone(), dedup.clone(), insert.clone());
        async move {
            let mut tx = pool.begin().await.ok()?;
            let fresh = sqlx::query(&dedup)
                .bind(&id)
                .execute(&mut *tx)
                .await
                .ok()?
                .rows_affected()
                == 1;
            if fresh {
                sqlx::query(&insert)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .ok()?;
            }
            tx.commit().await.ok()?;
            Some(())
        }
    })
    .await
}

/// A hand-written concurrent consumer: a task per delivery runs `work(message_id)`
/// and acks if it returned `Some`.
async fn baseline<F, Fut>(args: &Args, queue: &str, work: F) -> Result<Duration, BoxError>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<()>> + Send + 'static,
{
    let clock = Clock::new(args.base.messages);
    let (conn, _ch, mut deliveries) = args.base.consume(queue, "idem-bench-baseline").await?;
    let work = Arc::new(work);
    let mut received = 0;
    while received < args.base.messages {
        let Some(delivery) = deliveries.next().await else {
            return Err("consumer ended early".into());
        };
        let delivery = delivery?;
        received += 1;
        clock.started();
        let (c, work) = (clock.clone(), work.clone());
        tokio::spawn(async move {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            if work(id).await.is_some() {
                if let Ok(true) = delivery.acker.ack(BasicAckOptions::default()).await {
                    c.settled();
                }
            }
        });
    }
    let elapsed = clock.wait().await;
    let _ = conn.close(200, "bye".into()).await;
    elapsed
}
