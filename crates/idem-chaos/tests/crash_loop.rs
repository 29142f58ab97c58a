//! Crash loops end in the DLQ, and healthy messages do not pay for them.
//!
//! A real worker process whose handler calls `std::process::abort()` on one message
//! out of 51, restarted by the test each time it dies (this test binary re-executed
//! with the ignored `crash_loop_worker_process` test, like the chaos controller
//! re-executes its own binary). On a classic and a quorum queue, with the Redis lease
//! store and with the PostgreSQL inbox, the poison message must reach `Q.dlq` with
//! `crashed or hung the worker 3 times` after exactly 3 crashes, every healthy
//! message must be applied (exactly once with the inbox) and none dead-lettered.
//!
//! Needs RabbitMQ, Redis and PostgreSQL on loopback (see the README, `.ci/services`).

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idem_amqp::topology::QueueType;
use idem_amqp::{DelayTiers, Publisher, Topology, Worker};
use idem_core::{
    Body, Consumer, DedupLayer, HandlerError, IdempotencyKey, Message, ResultExt, State,
};
use idem_redis::RedisStore;
use idem_sql::{PgInbox, Tx};
use idem_testkit::Service;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};

const CONSUMER: &str = "crash-loop";
const HEALTHY: usize = 50;
const POISON_ID: &str = "m-25";
const CRASH_LIMIT: u32 = 3;
const PREFETCH: u16 = 20;
/// The Redis lease: short, so a dead worker's claims free up quickly.
const LEASE: Duration = Duration::from_secs(2);
/// Each test must end well within 90 s.
const DEADLINE: Duration = Duration::from_secs(80);

const RUN_ENV: &str = "IDEM_CRASH_LOOP_RUN";
const STORE_ENV: &str = "IDEM_CRASH_LOOP_STORE";
const QUORUM_ENV: &str = "IDEM_CRASH_LOOP_QUORUM";
/// Which worker process this is: 0 for the first, n after n crashes.
const GEN_ENV: &str = "IDEM_CRASH_LOOP_GEN";

struct Names {
    run: String,
}

impl Names {
    fn queue(&self) -> String {
        format!("crash-loop-{}", self.run)
    }
    fn applied(&self) -> String {
        format!("crash_loop_applied_{}", self.run)
    }
    fn inbox(&self) -> String {
        format!("crash_loop_inbox_{}", self.run)
    }
    fn prefix(&self) -> String {
        format!("crash-loop-{}", self.run)
    }
    fn topology(&self, quorum: bool) -> Topology {
        let tiers =
            DelayTiers::new([Duration::from_secs(1), Duration::from_secs(2)]).expect("valid tiers");
        let t = Topology::new(self.queue()).tiers(tiers);
        if quorum {
            // Above the crash limit, as the docs ask: idem's crash limit is the guard
            // that fires here, the broker's is the last resort.
            t.queue_type(QueueType::Quorum).delivery_limit(10)
        } else {
            t
        }
    }
}

async fn pg_pool(max: u32) -> PgPool {
    idem_testkit::postgres(PgPoolOptions::new().max_connections(max), "crash-loop").await
}

/// How many distinct messages the workers of the run `names` applied so far.
async fn count_applied_distinct(pool: &PgPool, names: &Names) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(DISTINCT msg_id) FROM {}",
        names.applied()
    ))
    .fetch_one(pool)
    .await
    .expect("count")
}

#[derive(Clone)]
struct Ctx {
    /// Autocommit pool: the Redis-store handler's effect.
    pool: PgPool,
    applied: std::sync::Arc<str>,
    generation: i32,
}

/// The handler's work: the poison message aborts the process, any other takes 20 ms.
async fn work(body: &[u8]) {
    if body == b"abort" {
        std::process::abort();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

impl Ctx {
    /// The effect: one row for `key` in the applied table, with this worker's generation.
    async fn apply<'c>(
        &self,
        key: &IdempotencyKey,
        conn: impl sqlx::PgExecutor<'c>,
    ) -> Result<(), HandlerError> {
        sqlx::query(&format!(
            "INSERT INTO {} (msg_id, gen) VALUES ($1, $2)",
            self.applied
        ))
        .bind(key.as_str())
        .bind(self.generation)
        .execute(conn)
        .await
        .transient()?;
        Ok(())
    }
}

async fn lease_handler(
    State(ctx): State<Ctx>,
    key: IdempotencyKey,
    Body(body): Body,
) -> Result<(), HandlerError> {
    work(&body).await;
    ctx.apply(&key, &ctx.pool).await
}

async fn inbox_handler(
    State(ctx): State<Ctx>,
    key: IdempotencyKey,
    tx: Tx<Postgres>,
    Body(body): Body,
) -> Result<(), HandlerError> {
    work(&body).await;
    let mut conn = tx.conn().await?;
    ctx.apply(&key, &mut *conn).await
}

/// Not a test by itself: the worker process the crash-loop tests start (and restart
/// after each crash). It runs until it is killed or aborts.
#[test]
#[ignore = "the worker process started by the crash-loop tests"]
fn crash_loop_worker_process() {
    let run = std::env::var(RUN_ENV).expect("started by the crash-loop tests");
    let store = std::env::var(STORE_ENV).expect("store");
    let quorum = std::env::var(QUORUM_ENV).is_ok_and(|v| v == "1");
    let names = Names { run };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let pool = pg_pool(u32::from(PREFETCH) + 4).await;
        let ctx = Ctx {
            pool: pool.clone(),
            applied: names.applied().into(),
            generation: std::env::var(GEN_ENV)
                .ok()
                .and_then(|g| g.parse().ok())
                .unwrap_or(0),
        };
        let builder = Consumer::builder(CONSUMER).crash_limit(CRASH_LIMIT);
        let consumer = if store == "redis" {
            let store = RedisStore::builder(&Service::Redis.url())
                .prefix(names.prefix())
                .connect()
                .await
                .expect("Redis");
            let layer = DedupLayer::new(store)
                .lease(LEASE)
                .retention(Duration::from_secs(3600));
            builder
                .dedup(layer)
                .handler_timeout(LEASE / 2)
                .handler_with_state(lease_handler, ctx)
        } else {
            let inbox = PgInbox::new(pool)
                .try_table(&names.inbox())
                .expect("table name")
                .retention(Duration::from_secs(3600));
            builder
                .dedup(inbox)
                .handler_timeout(Duration::from_secs(10))
                .handler_with_state(inbox_handler, ctx)
        }
        .expect("consumer");
        let worker = Worker::builder(
            idem_amqp::amqp_url_from_env(),
            names.topology(quorum),
            consumer,
        )
        .prefetch(PREFETCH)
        .build()
        .expect("worker");
        let _ = worker.run(std::future::pending::<()>()).await;
    });
}

/// A worker process, killed when dropped (also when the test panics).
struct WorkerProcess(Child);

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_worker(run: &str, store: &str, quorum: bool, generation: u32) -> WorkerProcess {
    let exe = std::env::current_exe().expect("test binary path");
    Command::new(exe)
        .args([
            "--exact",
            "crash_loop_worker_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(RUN_ENV, run)
        .env(STORE_ENV, store)
        .env(QUORUM_ENV, if quorum { "1" } else { "0" })
        .env(GEN_ENV, generation.to_string())
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(WorkerProcess)
        .expect("start the worker process")
}

struct Figures {
    crashes: u32,
    to_dlq: Duration,
    applied_distinct: i64,
    applications: i64,
    /// Healthy messages applied more than once, and whether all of them were cut by
    /// the first crash only (applied twice, first by the first worker).
    rerun: i64,
    rerun_only_at_first_crash: bool,
}

async fn ready_count(ch: &lapin::Channel, queue: &str) -> Result<u32, String> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map(|q| q.message_count())
    .map_err(|e| {
        format!("RabbitMQ: passive declare of {queue} failed ({e}); was the broker restarted? see /tmp/idem-restarts.log")
    })
}

fn header_text(v: Option<&AMQPValue>) -> String {
    match v {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// One crash loop at a time: each runs real worker processes on a shared machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn crash_loop(store: &str, quorum: bool) -> Figures {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let names = Names { run: run.clone() };
    let url = idem_amqp::amqp_url_from_env();
    let conn = Service::RabbitMq.expect_connected(
        &url,
        idem_amqp::publisher::connect(&url, "crash-loop-test").await,
    );
    let ch = conn.create_channel().await.expect("channel");
    let topology = names.topology(quorum);
    topology.declare_on(&ch).await.expect("declare topology");
    let pool = pg_pool(4).await;
    sqlx::query(&format!(
        "CREATE TABLE {} (msg_id TEXT NOT NULL, gen INT NOT NULL)",
        names.applied()
    ))
    .execute(&pool)
    .await
    .expect("applied table");
    if store == "postgres" {
        PgInbox::new(pool.clone())
            .try_table(&names.inbox())
            .expect("table name")
            .ensure_schema()
            .await
            .expect("inbox schema");
    }
    let redis_before = if store == "redis" {
        Some(redis_run_id().await)
    } else {
        None
    };

    let publisher = Publisher::connect(&url).await.expect("publisher");
    let mut msgs: Vec<Message> = (0..=HEALTHY)
        .map(|i| {
            let id = format!("m-{i:02}");
            let body = if id == POISON_ID {
                "abort".to_owned()
            } else {
                format!("{{\"n\":{i}}}")
            };
            Message::new(body).with_message_id(id)
        })
        .collect();
    publisher
        .publish_batch("", &names.queue(), &mut msgs)
        .await
        .expect("publish");
    publisher.close().await;

    let started = Instant::now();
    let mut crashes = 0_u32;
    let mut worker = start_worker(&run, store, quorum, 0);
    let mut to_dlq = None;
    let outcome = loop {
        if started.elapsed() > DEADLINE {
            break Err(format!("not settled within {DEADLINE:?}"));
        }
        if let Some(status) = worker.0.try_wait().expect("worker status") {
            crashes += 1;
            eprintln!(
                "[{store} quorum={quorum}] worker died ({status}) after {:?}: crash {crashes}",
                started.elapsed()
            );
            if crashes > 20 {
                break Err(format!("{crashes} crashes: the crash loop did not end"));
            }
            worker = start_worker(&run, store, quorum, crashes);
        }
        let counts = async {
            let dlq = ready_count(&ch, &topology.dlq()).await?;
            let mut drained = ready_count(&ch, &names.queue()).await? == 0;
            for tier in topology.get_tiers().as_slice() {
                drained &= ready_count(&ch, &topology.retry_queue(*tier)).await? == 0;
            }
            Ok::<_, String>((dlq, drained))
        };
        let (dlq, drained) = match counts.await {
            Ok(c) => c,
            Err(e) => break Err(e),
        };
        if dlq > 0 && to_dlq.is_none() {
            to_dlq = Some(started.elapsed());
        }
        let applied = count_applied_distinct(&pool, &names).await;
        if dlq > 0 && applied == HEALTHY as i64 && drained {
            break Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Let anything still in flight settle before the books are closed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(worker);

    let mut dead = Vec::new();
    while let Ok(Some(m)) = ch
        .basic_get(
            topology.dlq().as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
    {
        let props = &m.delivery.properties;
        let id = props
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        let error = props
            .headers()
            .as_ref()
            .map(|h| header_text(h.inner().get("x-idem-error")))
            .unwrap_or_default();
        dead.push((id, error));
    }
    let applications: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", names.applied()))
            .fetch_one(&pool)
            .await
            .expect("count");
    let applied_distinct = count_applied_distinct(&pool, &names).await;
    let (rerun, bad_rerun): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(*) FILTER (WHERE n <> 2 OR first_gen <> 0) FROM \
         (SELECT msg_id, count(*) AS n, min(gen) AS first_gen FROM {} GROUP BY msg_id HAVING count(*) > 1) r",
        names.applied()
    ))
    .fetch_one(&pool)
    .await
    .expect("reruns");
    let poison_applied: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE msg_id = $1",
        names.applied()
    ))
    .bind(POISON_ID)
    .fetch_one(&pool)
    .await
    .expect("count");

    // Clean up what the test created (on a fresh channel: the first may have died).
    if let Ok(ch) = conn.create_channel().await {
        let _ = topology.delete_on(&ch).await;
    } else if let Ok(c) = idem_amqp::publisher::connect(&url, "crash-loop-cleanup").await {
        if let Ok(ch) = c.create_channel().await {
            let _ = topology.delete_on(&ch).await;
        }
        let _ = c.close(200, "bye".into()).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    for t in [
        names.applied(),
        names.inbox(),
        format!("{}_starts", names.inbox()),
    ] {
        let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {t}"))
            .execute(&pool)
            .await;
    }
    if store == "redis" {
        delete_redis_keys(&format!("{}:*", names.prefix())).await;
    }

    let figures = Figures {
        crashes,
        to_dlq: to_dlq.unwrap_or(started.elapsed()),
        applied_distinct,
        applications,
        rerun,
        rerun_only_at_first_crash: bad_rerun == 0,
    };
    eprintln!(
        "crash loop [{store}, {}]: crashes={} time_to_dlq={:.1}s healthy_applied={}/{} applications={} rerun={} dead_lettered={:?}",
        if quorum { "quorum" } else { "classic" },
        figures.crashes,
        figures.to_dlq.as_secs_f64(),
        figures.applied_distinct,
        HEALTHY,
        figures.applications,
        figures.rerun,
        dead
    );
    if let Some(before) = redis_before {
        let after = redis_run_id().await;
        assert_eq!(
            before, after,
            "Redis restarted during the test: without persistence it forgot the dedup records and \
             start counters (README, Durability caveats), so these figures say nothing; see /tmp/idem-restarts.log"
        );
    }
    if let Err(e) = outcome {
        panic!("{e}: crashes={crashes} applied={applied_distinct}/{HEALTHY} dead={dead:?}");
    }
    assert_eq!(
        dead.len(),
        1,
        "exactly the poison message is dead-lettered, nothing healthy: {dead:?}"
    );
    assert_eq!(dead[0].0, POISON_ID, "{dead:?}");
    assert!(
        dead[0].1.contains("crashed or hung the worker 3 times"),
        "dead-letter reason: {:?}",
        dead[0].1
    );
    assert_eq!(
        crashes, CRASH_LIMIT,
        "the poison message is dead-lettered after exactly the configured number of crashes"
    );
    assert_eq!(poison_applied, 0);
    assert_eq!(
        applied_distinct, HEALTHY as i64,
        "every healthy message applied"
    );
    assert!(
        figures.rerun_only_at_first_crash,
        "a healthy message was re-run after a crash other than the first (suspects must run alone)"
    );
    figures
}

/// The Redis server's `run_id`: it changes when Redis restarts.
async fn redis_run_id() -> String {
    let client = redis::Client::open(Service::Redis.url()).expect("Redis URL");
    let mut conn = match client.get_multiplexed_async_connection().await {
        Ok(c) => c,
        Err(e) => {
            panic!("Redis not reachable ({e}); start it with `bash .ci/services` (see README)")
        }
    };
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .expect("INFO server");
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

async fn delete_redis_keys(pattern: &str) {
    let Ok(client) = redis::Client::open(Service::Redis.url()) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let _ = idem_testkit::tools::unlink_matching(&mut conn, pattern).await;
}

fn report(name: &str, f: &Figures) {
    let mut err = std::io::stderr();
    let _ = writeln!(
        err,
        "{name}: crashes={} time_to_dlq={:.1}s healthy_applied={} applications={} rerun={}",
        f.crashes,
        f.to_dlq.as_secs_f64(),
        f.applied_distinct,
        f.applications,
        f.rerun
    );
}

/// The crash loop on the PostgreSQL inbox (a `quorum` queue or a classic one): on top
/// of [`crash_loop`]'s checks, each healthy message was applied exactly once (no
/// re-run survives in the inbox); reported as `name`.
async fn inbox_crash_loop(quorum: bool, name: &str) {
    let f = crash_loop("postgres", quorum).await;
    assert_eq!(
        f.applications, HEALTHY as i64,
        "inbox: each healthy message applied exactly once"
    );
    report(name, &f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_redis_classic_ends_in_dlq_without_harming_neighbours() {
    let f = crash_loop("redis", false).await;
    report("redis classic", &f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_redis_quorum_ends_in_dlq_without_harming_neighbours() {
    let f = crash_loop("redis", true).await;
    report("redis quorum", &f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_inbox_classic_ends_in_dlq_and_applies_each_healthy_message_once() {
    inbox_crash_loop(false, "inbox classic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_inbox_quorum_ends_in_dlq_and_applies_each_healthy_message_once() {
    inbox_crash_loop(true, "inbox quorum").await;
}
