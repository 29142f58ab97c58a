//! The chaos worker process: one idem [`Worker`] on the run's queue, with the
//! PostgreSQL inbox or the Redis lease store, and a handler that logs every invocation
//! before it works and writes its effect under a unique constraint.
//!
//! It stops gracefully when its stdin closes (the controller's way to end it) or on
//! SIGINT/SIGTERM; the controller's faults kill it with SIGKILL instead.

use std::sync::Arc;
use std::time::Duration;

use idem_amqp::ordered::Ordering;
use idem_amqp::Worker;
use idem_core::batch::Batch;
use idem_core::dedup::HeaderKey;
use idem_core::{Body, Consumer, DedupLayer, HandlerError, IdempotencyKey, ResultExt, State};
use idem_outbox::{Outbox, OutboxMessage};
use idem_redis::RedisStore;
use idem_sql::{PgInbox, Tx};
use sqlx::{PgPool, Postgres};
use tokio::io::AsyncReadExt;

use crate::common::{self, BoxError, Names, Store};

/// The consumer name (dedup scope).
pub(crate) const CONSUMER: &str = "chaos";
/// Redis lease: short, so a killed worker's claims free up within the run.
const LEASE: Duration = Duration::from_secs(4);

#[derive(clap::Args, Debug)]
pub(crate) struct WorkerArgs {
    /// The run id.
    #[arg(long)]
    pub(crate) run: String,
    /// This worker's name: its AMQP connection name, PostgreSQL application_name and
    /// Redis client name.
    #[arg(long)]
    pub(crate) name: String,
    /// The dedup store.
    #[arg(long, value_enum)]
    pub(crate) store: Store,
    /// On the cluster (`AMQP_CLUSTER_URL`, this worker's preferred node first).
    #[arg(long)]
    pub(crate) cluster: bool,
    /// How to consume: the controller's flags, passed on.
    #[command(flatten)]
    pub(crate) consume: crate::args::ConsumeArgs,
}

/// The crash point inside a batch: after one message's savepoint (its effect written
/// in the batch's open transaction), before the next message's.
pub(crate) const BETWEEN_SAVEPOINTS: &str = "batch-between-savepoints";

#[derive(Clone)]
struct Ctx {
    /// The pool effects are written with (redis store: autocommit).
    pool: PgPool,
    /// A separate autocommit pool for the invocation log and duplicate records.
    log: PgPool,
    worker: Arc<str>,
    q: Arc<Queries>,
    /// Share of calls failing transiently, in percent.
    transient_percent: f64,
    /// The consumer outbox of follow-ups (`--follow-ups`).
    follow_ups: Option<Outbox>,
}

struct Queries {
    invocation: String,
    effect: String,
    dupe: String,
}

/// The payload could not be read: a content error (poison).
#[derive(Debug)]
struct BadPayload(String);

impl std::fmt::Display for BadPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid chaos payload: {}", self.0)
    }
}

impl std::error::Error for BadPayload {}

impl Ctx {
    /// Runs the log statement `sql` for `key` and this worker on the log pool's own
    /// autocommit connection.
    async fn log_row(&self, sql: &str, key: &IdempotencyKey) -> Result<(), HandlerError> {
        sqlx::query(sql)
            .bind(key.as_str())
            .bind(&*self.worker)
            .execute(&self.log)
            .await
            .transient()?;
        Ok(())
    }

    /// Logs the invocation on its own autocommit connection, before any work.
    async fn invoked(&self, key: &IdempotencyKey) -> Result<(), HandlerError> {
        self.log_row(&self.q.invocation, key).await
    }

    /// Fails transiently in `transient_percent` of the calls.
    fn maybe_fail(&self) -> Result<(), HandlerError> {
        if fastrand::f64() * 100.0 < self.transient_percent {
            return Err(HandlerError::transient(std::io::Error::other(
                "injected transient failure (--transient-percent)",
            )));
        }
        Ok(())
    }

    /// The effect was already there: record the attempt (it is what "applied twice"
    /// would have been without the unique constraint).
    async fn duplicate(&self, key: &IdempotencyKey) -> Result<(), HandlerError> {
        self.log_row(&self.q.dupe, key).await
    }
}

/// A valid body is `{"id": "<message id>", ...}`, or `{"outbox": true, ...}` for a
/// message sent through the outbox (whose id the outbox chose); poison bodies are not
/// JSON.
fn check_payload(body: &[u8], key: &IdempotencyKey) -> Result<(), HandlerError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| HandlerError::permanent(BadPayload(e.to_string())))?;
    match value.get("id").and_then(|v| v.as_str()) {
        Some(id) if id == key.as_str() => Ok(()),
        None if value.get("outbox") == Some(&serde_json::Value::Bool(true)) => Ok(()),
        other => Err(HandlerError::permanent(BadPayload(format!(
            "id {other:?} does not match the key {key}"
        )))),
    }
}

async fn inbox_handler(
    State(ctx): State<Ctx>,
    key: IdempotencyKey,
    tx: Tx<Postgres>,
    Body(body): Body,
) -> Result<(), HandlerError> {
    ctx.invoked(&key).await?;
    check_payload(&body, &key)?;
    ctx.maybe_fail()?;
    let mut conn = tx.conn().await?;
    let applied = sqlx::query(&ctx.q.effect)
        .bind(key.as_str())
        .bind(&*ctx.worker)
        .execute(&mut *conn)
        .await
        .transient()?
        .rows_affected();
    if applied == 0 {
        drop(conn);
        ctx.duplicate(&key).await?;
    } else if let Some(outbox) = &ctx.follow_ups {
        // Nowhere routed: the verifier reads the outbox table, no relay runs.
        let follow_up = OutboxMessage::new("", "chaos-follow-ups", key.as_str().as_bytes());
        outbox
            .enqueue_follow_up(&mut conn, follow_up)
            .await
            .transient()?;
    }
    Ok(()) // the inbox commits the effect, its follow-up and its dedup row together
}

/// The inbox handler, per message of a batch, each in its savepoint of the batch's
/// transaction.
async fn inbox_batch_handler(
    State(ctx): State<Ctx>,
    batch: Batch<Body>,
) -> Result<(), HandlerError> {
    let mut first = true;
    batch
        .each(|item| {
            if !std::mem::take(&mut first) {
                idem_amqp::failpoints::hit(BETWEEN_SAVEPOINTS);
            }
            let ctx = ctx.clone();
            async move {
                let key: IdempotencyKey = item.extract()?;
                let tx: Tx<Postgres> = item.extract()?;
                inbox_handler(State(ctx), key, tx, item.into_inner()).await
            }
        })
        .await
}

/// The lease-store handler, per message of a batch.
async fn lease_batch_handler(
    State(ctx): State<Ctx>,
    batch: Batch<Body>,
) -> Result<(), HandlerError> {
    batch
        .each(|item| {
            let ctx = ctx.clone();
            async move {
                let key: IdempotencyKey = item.extract()?;
                lease_handler(State(ctx), key, item.into_inner()).await
            }
        })
        .await
}

async fn lease_handler(
    State(ctx): State<Ctx>,
    key: IdempotencyKey,
    Body(body): Body,
) -> Result<(), HandlerError> {
    ctx.invoked(&key).await?;
    check_payload(&body, &key)?;
    ctx.maybe_fail()?;
    let applied = sqlx::query(&ctx.q.effect)
        .bind(key.as_str())
        .bind(&*ctx.worker)
        .execute(&ctx.pool)
        .await
        .transient()?
        .rows_affected();
    if applied == 0 {
        ctx.duplicate(&key).await?;
    }
    Ok(())
}

/// Completes when stdin reaches EOF (the controller dropped its end) or on a signal.
async fn stop_requested() {
    let eof = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0_u8; 64];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        _ = eof => {}
        _ = idem_amqp::shutdown::signal() => {}
    }
}

/// Keeps the Redis connection named `name` (a reconnect loses the name), so the
/// controller's `CLIENT KILL` finds it.
fn keep_client_name(store: &RedisStore, name: String) -> tokio::task::JoinHandle<()> {
    let mut conn = store.connection();
    tokio::spawn(async move {
        loop {
            let named: redis::RedisResult<()> = redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(&name)
                .query_async(&mut conn)
                .await;
            if let Err(e) = named {
                tracing::debug!(error = %e, "CLIENT SETNAME failed");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

pub(crate) async fn run(args: WorkerArgs) -> Result<(), BoxError> {
    if args.cluster {
        common::use_cluster()?;
    }
    let names = Names::new(&args.run);
    let db = common::database_url();
    let concurrency = u32::from(args.consume.prefetch);
    // Each in-flight message holds an inbox connection; duplicates waiting hold one too.
    // A batch holds one for all its messages: a few batches run at once (more wait for
    // a connection, within the inbox's store timeout).
    let connections = match args.consume.batch {
        Some(_) => 12,
        None => concurrency + 2,
    };
    let pool = common::pg_pool(&db, &args.name, connections).await?;
    let log = common::pg_pool(&db, &args.name, 2).await?;
    let ctx = Ctx {
        pool: pool.clone(),
        log,
        worker: args.name.as_str().into(),
        q: Arc::new(Queries {
            invocation: format!(
                "INSERT INTO {} (msg_id, worker) VALUES ($1, $2)",
                names.table("invocations")
            ),
            effect: format!(
                "INSERT INTO {} (msg_id, worker) VALUES ($1, $2) ON CONFLICT (msg_id) DO NOTHING",
                names.table("effects")
            ),
            dupe: format!(
                "INSERT INTO {} (msg_id, worker) VALUES ($1, $2)",
                names.table("dupes")
            ),
        }),
        follow_ups: None,
        transient_percent: args.consume.transient_percent,
    };
    let mut ctx = ctx;
    if args.consume.follow_ups {
        if args.store != Store::Postgres {
            return Err("--follow-ups needs --store postgres (the consumer outbox writes through the inbox transaction)".into());
        }
        let outbox = Outbox::new(&names.table("followups"))?;
        outbox.ensure_schema(&ctx.pool).await?;
        ctx.follow_ups = Some(outbox);
    }
    let builder = Consumer::builder(CONSUMER).backoff(common::backoff());
    let mut _namer = None;
    let consumer = match args.store {
        Store::Postgres => {
            let inbox = PgInbox::new(pool)
                .try_table(&names.table("inbox"))?
                .retention(Duration::from_secs(3600));
            inbox.ensure_schema().await?;
            let builder = builder
                .dedup(inbox)
                .handler_timeout(Duration::from_secs(30));
            match args.consume.batch {
                Some(n) => builder
                    .batch_size(n)
                    .batch_handler_with_state(inbox_batch_handler, ctx)?,
                None => builder.handler_with_state(inbox_handler, ctx)?,
            }
        }
        Store::Redis => {
            let redis = RedisStore::builder(&common::redis_url()).prefix(names.redis_prefix());
            let store = if args.cluster {
                // A worker started during a failover connects on first use.
                redis.cluster(true).connect_lazy()?
            } else {
                redis.connect().await?
            };
            // CLIENT KILL (redis-kill) aims at single-node Redis only.
            if !store.is_cluster() {
                _namer = Some(keep_client_name(&store, args.name.clone()));
            }
            let layer = DedupLayer::new(store)
                .lease(LEASE)
                .retention(Duration::from_secs(3600));
            let builder = builder.dedup(layer);
            match args.consume.batch {
                // A batch's timeout covers all its messages: a batch cut off by it has
                // applied some effects that a lease store cannot take back, and every
                // message of it runs again. Each message's lease is extended while its
                // batch runs, so the timeout need not fit in the lease.
                Some(n) => builder
                    .handler_timeout(Duration::from_secs(30))
                    .batch_size(n)
                    .batch_handler_with_state(lease_batch_handler, ctx)?,
                None => builder
                    .handler_timeout(LEASE / 2)
                    .handler_with_state(lease_handler, ctx)?,
            }
        }
        Store::None => builder
            .handler_timeout(Duration::from_secs(30))
            .handler_with_state(lease_handler, ctx)?,
    };
    let mut worker = Worker::builder(
        common::amqp_url(),
        common::topology_for(&names.queue(), args.consume.ordered),
        consumer,
    )
    .prefetch(args.consume.prefetch)
    .connection_name(&args.name)
    .shutdown_timeout(Duration::from_secs(10));
    if args.consume.ordered {
        worker = worker.ordered(Ordering::by(HeaderKey::new(crate::produce::KEY_HEADER)));
    }
    let worker = worker.build()?;
    let stats = worker.run(stop_requested()).await?;
    eprintln!("worker {} stopped: {stats}", args.name);
    Ok(())
}
