//! Dependency outages under load: a TCP fault proxy cuts the dedup store (Redis, or the
//! PostgreSQL inbox) for 10 s, five times the whole retry budget (3 attempts about
//! 1 s apart), while 500 messages flow through the real RabbitMQ. The consumer's circuit
//! breaker must pause it, so nothing is dead-lettered and nothing lost, and consumption
//! must resume by itself once the store is back.
//!
//! Needs RabbitMQ (AMQP_URL), Redis on 127.0.0.1:6379 and PostgreSQL on
//! 127.0.0.1:5432 (see README, `bash .ci/services`). Its own test binary: it installs
//! the process-global metrics recorder to read the `idem_consumer_paused` gauge.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use idem_amqp::{DelayTiers, Publisher, Topology, Worker};
use idem_core::{Backoff, Consumer, HandlerError, IdempotencyKey, Message, State};
use idem_redis::RedisStore;
use idem_sql::sqlx::postgres::PgPoolOptions;
use idem_sql::sqlx::{Executor as _, PgPool, Postgres};
use idem_sql::{PgInbox, Tx};
use idem_testkit::fault_proxy::{FaultProxy, Mode};
use idem_testkit::Service;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::Channel;
use metrics_exporter_prometheus::PrometheusHandle;

const MESSAGES: usize = 500;
/// The proxy cuts the store once this many messages are processed (about 1 s in).
const CUT_AFTER: usize = 50;
const OUTAGE: Duration = Duration::from_secs(10);
/// Gap between publishes: the 500 messages arrive over about 9 s, most of them
/// during the outage.
const PUBLISH_GAP: Duration = Duration::from_millis(16);

fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| idem_amqp::prometheus::install_recorder().unwrap())
}

fn paused_gauge(consumer: &str) -> Option<f64> {
    let text = metrics().render();
    let prefix = format!("idem_consumer_paused{{consumer=\"{consumer}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

fn unique(prefix: &str) -> String {
    format!("idem-test-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn broker() -> (lapin::Connection, Channel) {
    let url = idem_amqp::amqp_url_from_env();
    let start = Instant::now();
    loop {
        let opened = async {
            let conn = idem_amqp::connect(&url, "idem-test-outage-admin").await?;
            let ch = conn
                .create_channel()
                .await
                .map_err(|source| idem_amqp::Error::Amqp {
                    op: "channel.open",
                    source,
                })?;
            Ok::<_, idem_amqp::Error>((conn, ch))
        };
        match step("connect to RabbitMQ", opened).await {
            Ok(c) => return c,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                eprintln!("RabbitMQ not reachable ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("{}", Service::RabbitMq.unreachable_message(&url, e)),
        }
    }
}

/// Another helper restarts RabbitMQ now and then while the tests run (see
/// /tmp/idem-restarts.log); the test's own admin and publishing steps ride it out by
/// retrying on a fresh connection for up to 30 s, like any client would.
async fn with_broker<T, E, F>(what: &str, mut op: impl FnMut(Channel) -> F) -> T
where
    F: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let start = Instant::now();
    loop {
        let (conn, ch) = broker().await;
        let r = step(what, op(ch)).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "bye".into())).await;
        match r {
            Ok(v) => return v,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                eprintln!("{what} failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("{what} failed: {e}"),
        }
    }
}

/// Awaits one step of the test, failing with its name instead of hanging.
async fn step<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(60), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within 60 s"),
    }
}

async fn count(queue: &str) -> u32 {
    with_broker("queue count", |ch| async move {
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
    })
    .await
}

/// A topology of its own (a unique queue named after `tag`, one 1 s delay tier),
/// declared, and its queue's name.
async fn declared(tag: &str) -> (String, Topology) {
    let name = unique(tag);
    let topo =
        Topology::new(name.clone()).tiers(DelayTiers::new([Duration::from_secs(1)]).unwrap());
    with_broker("declare", |ch| {
        let topo = topo.clone();
        async move { topo.declare_on(&ch).await }
    })
    .await;
    (name, topo)
}

/// Deletes the queues of `topo`.
async fn delete(topo: &Topology) {
    with_broker("delete", |ch| {
        let topo = topo.clone();
        async move { topo.delete_on(&ch).await }
    })
    .await;
}

/// The retry budget of the test: 3 attempts, about 2 s from first to last.
fn budget() -> Backoff {
    idem_testkit::backoff(Duration::from_secs(1), 3)
}

/// Handler runs that returned `Ok`: key and when.
type Log = Arc<Mutex<Vec<(String, Instant)>>>;

async fn redis_handler(State(log): State<Log>, key: IdempotencyKey) {
    tokio::time::sleep(Duration::from_millis(20)).await;
    log.lock()
        .unwrap()
        .push((key.as_str().to_owned(), Instant::now()));
}

#[derive(Clone)]
struct PgCtx {
    log: Log,
    effects: Arc<str>,
}

async fn pg_handler(
    State(ctx): State<PgCtx>,
    key: IdempotencyKey,
    tx: Tx<Postgres>,
) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut conn = tx.conn().await?;
    idem_sql::sqlx::query(&format!("INSERT INTO {} (k) VALUES ($1)", ctx.effects))
        .bind(key.as_str())
        .execute(&mut *conn)
        .await?;
    ctx.log
        .lock()
        .unwrap()
        .push((key.as_str().to_owned(), Instant::now()));
    Ok(())
}

enum Store {
    Redis {
        store: RedisStore,
    },
    Pg {
        admin: PgPool,
        effects: String,
        inbox: String,
    },
}

impl Store {
    async fn count_effects(&self, log: &Log) -> usize {
        match self {
            Store::Redis { .. } => {
                let log = log.lock().unwrap();
                log.iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<std::collections::HashSet<_>>()
                    .len()
            }
            Store::Pg { admin, effects, .. } => {
                let n: i64 =
                    idem_sql::sqlx::query_scalar(&format!("SELECT count(*) FROM {effects}"))
                        .fetch_one(admin)
                        .await
                        .unwrap();
                usize::try_from(n).unwrap()
            }
        }
    }

    async fn cleanup(&self) {
        match self {
            Store::Redis { store } => {
                let pattern = format!("{}:*", store.prefix());
                idem_testkit::delete_redis_keys(&mut store.connection(), &pattern).await;
            }
            Store::Pg {
                admin,
                effects,
                inbox,
            } => {
                // The inbox also made its start counters' table, `<inbox>_starts`.
                for t in [effects.clone(), inbox.clone(), format!("{inbox}_starts")] {
                    admin
                        .execute(&*format!("DROP TABLE IF EXISTS {t}"))
                        .await
                        .unwrap();
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Redis,
    PgInbox,
}

async fn outage(kind: Kind, mode: Mode) {
    metrics();
    let (name, topo) = declared("outage").await;
    let log: Log = Arc::default();

    let (proxy, store, consumer) = match kind {
        Kind::Redis => {
            let proxy = FaultProxy::start("127.0.0.1:6379").await;
            let url = format!("redis://127.0.0.1:{}", proxy.port());
            let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            let store = Service::Redis.expect_connected(
                "redis://127.0.0.1:6379",
                RedisStore::builder(&url).prefix(prefix).connect().await,
            );
            let consumer = Consumer::builder(name.clone())
                .store(store.clone())
                .backoff(budget())
                .handler_with_state(redis_handler, log.clone())
                .unwrap();
            (proxy, Store::Redis { store }, consumer)
        }
        Kind::PgInbox => {
            let pg_url = "postgres://postgres@127.0.0.1:5432/postgres";
            let admin = Service::PostgreSql.expect_connected(
                pg_url,
                PgPoolOptions::new()
                    .max_connections(2)
                    .connect(pg_url)
                    .await,
            );
            let id = uuid::Uuid::new_v4().simple().to_string();
            let (effects, inbox_table) =
                (format!("idem_out_fx_{id}"), format!("idem_out_inbox_{id}"));
            admin
                .execute(&*format!("CREATE TABLE {effects} (k TEXT PRIMARY KEY)"))
                .await
                .unwrap();
            let proxy = FaultProxy::start("127.0.0.1:5432").await;
            // sqlx's own pool wait stays at its 30 s default: the inbox's store
            // timeout (5 s by default) is what bounds it.
            let pool = PgPoolOptions::new()
                .max_connections(25)
                .connect(&format!(
                    "postgres://postgres@127.0.0.1:{}/postgres",
                    proxy.port()
                ))
                .await
                .unwrap();
            let inbox = PgInbox::new(pool).try_table(&inbox_table).unwrap();
            inbox.ensure_schema().await.unwrap();
            let ctx = PgCtx {
                log: log.clone(),
                effects: effects.as_str().into(),
            };
            let consumer = Consumer::builder(name.clone())
                .dedup(inbox)
                .backoff(budget())
                .handler_with_state(pg_handler, ctx)
                .unwrap();
            let store = Store::Pg {
                admin,
                effects,
                inbox: inbox_table,
            };
            (proxy, store, consumer)
        }
    };
    // When each attempt was charged (a retry copy settled).
    let charged: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let charged_log = charged.clone();
    let breaker = consumer
        .breaker()
        .expect("on by default with a store")
        .clone();

    let worker = Worker::builder(
        idem_amqp::amqp_url_from_env(),
        topo.clone(),
        consumer.clone(),
    )
    .prefetch(20)
    .on_settle(move |settled| {
        if matches!(settled.disposition, idem_core::Disposition::Retry { .. }) {
            charged_log.lock().unwrap().push(Instant::now());
        }
    })
    .build()
    .unwrap();
    let running = worker.spawn();

    let publisher = Publisher::connect(&idem_amqp::amqp_url_from_env())
        .await
        .unwrap();
    let queue = name.clone();
    let publishing = tokio::spawn(async move {
        for i in 0..MESSAGES {
            let mut msg = Message::new(format!("{{\"n\":{i}}}")).with_message_id(format!("m-{i}"));
            let first = Instant::now();
            // Confirmed or retried (the publisher reconnects): never lost.
            while let Err(e) = step("publish", publisher.publish("", &queue, &mut msg)).await {
                assert!(
                    first.elapsed() < Duration::from_secs(30),
                    "publish failed: {e}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            tokio::time::sleep(PUBLISH_GAP).await;
        }
        step("publisher close", publisher.close()).await;
    });

    let started = Instant::now();
    // Cut while messages flow: the rest of them arrive during the outage.
    while log.lock().unwrap().len() < CUT_AFTER {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "fewer than {CUT_AFTER} messages processed in 30 s before the cut"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cut_after = started.elapsed();
    proxy.set(mode);
    let cut = Instant::now();
    let opened = loop {
        if breaker.is_open() {
            break cut.elapsed();
        }
        assert!(
            cut.elapsed() < OUTAGE,
            "the breaker did not open during a {OUTAGE:?} outage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        paused_gauge(&name),
        Some(1.0),
        "gauge idem_consumer_paused while open"
    );
    tokio::time::sleep(OUTAGE.saturating_sub(cut.elapsed())).await;
    let during = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, t)| *t > cut + opened)
        .count();
    assert!(
        breaker.is_open(),
        "the store is still down: the breaker must be open"
    );
    proxy.set(Mode::Up);
    let restored = Instant::now();

    // Liveness: everything is processed, by the consumer resuming on its own.
    loop {
        let done = store.count_effects(&log).await;
        if done >= MESSAGES {
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(40),
            "only {done} of {MESSAGES} processed 40 s after the store came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    step("publishing task", publishing).await.unwrap();
    let resumed = log
        .lock()
        .unwrap()
        .iter()
        .map(|(_, t)| *t)
        .filter(|t| *t >= restored)
        .min()
        .map(|t| t - restored)
        .unwrap();
    // Let the last acks land, then look at every queue.
    let settled = Instant::now();
    while count(topo.queue()).await > 0 && settled.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dlq = count(&topo.dlq()).await;
    let left = count(topo.queue()).await;
    let stats = step("worker shutdown", running.shutdown_and_join())
        .await
        .unwrap();
    let runs = log.lock().unwrap().len();
    // Charged while the store was cut off: the store failures before the breaker
    // opened (4) and the handler errors of the transactions cut mid-way (at most the
    // 20 held), nothing for the messages that arrived during the outage. (Failures
    // after the store is back, e.g. timeouts on a starved machine, are ordinary ones.)
    let charged_in_outage = charged
        .lock()
        .unwrap()
        .iter()
        .filter(|t| **t >= cut && **t <= restored)
        .count();
    let effects = store.count_effects(&log).await;
    eprintln!(
        "[{kind:?}/{mode:?}] breaker opened {opened:?} after the cut; handler successes while open: {during}; \
         first message processed {resumed:?} after the store came back; attempts charged during the outage: {charged_in_outage}; {runs} handler successes for {MESSAGES} messages; \
         stats: {stats}; cut {cut_after:?} after the first publish; test took {:?}",
        started.elapsed()
    );

    assert_eq!(dlq, 0, "the outage dead-lettered {dlq} messages ({stats})");
    assert_eq!(stats.dead_lettered, 0, "{stats}");
    assert!(
        charged_in_outage < 25,
        "the outage spent {charged_in_outage} attempts ({stats})"
    );
    assert_eq!(left, 0, "messages left in the queue");
    assert_eq!(during, 0, "the handler ran while the store was down");
    let ids: HashMap<String, usize> =
        log.lock()
            .unwrap()
            .iter()
            .fold(HashMap::new(), |mut m, (k, _)| {
                *m.entry(k.clone()).or_default() += 1;
                m
            });
    for i in 0..MESSAGES {
        assert!(ids.contains_key(&format!("m-{i}")), "m-{i} was lost");
    }
    if let Kind::PgInbox = kind {
        assert_eq!(
            effects, MESSAGES,
            "the inbox applies each message exactly once"
        );
    }
    assert!(
        resumed < Duration::from_secs(10),
        "consumption resumed only {resumed:?} after the store came back"
    );
    assert!(!breaker.is_open());
    assert_eq!(
        paused_gauge(&name),
        Some(0.0),
        "gauge back to 0 once resumed"
    );

    step("store cleanup", store.cleanup()).await;
    delete(&topo).await;
}

/// One test per store and kind of cut (`test: Kind, Mode;`), each running [`outage`].
macro_rules! outage_tests {
    ($($test:ident: $kind:ident, $mode:ident;)+) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            outage(Kind::$kind, Mode::$mode).await;
        }
    )+};
}

outage_tests! {
    redis_refused_for_longer_than_the_retry_budget_dead_letters_nothing: Redis, Refuse;
    redis_reset_for_longer_than_the_retry_budget_dead_letters_nothing: Redis, Reset;
    pg_inbox_refused_for_longer_than_the_retry_budget_dead_letters_nothing: PgInbox, Refuse;
    pg_inbox_reset_for_longer_than_the_retry_budget_dead_letters_nothing: PgInbox, Reset;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_started_while_redis_is_down_waits_paused_then_processes() {
    metrics();
    let (name, topo) = declared("outage-start").await;
    let proxy = FaultProxy::start("127.0.0.1:6379").await;
    proxy.set(Mode::Refuse);
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    // `connect_lazy`: building the store does not need Redis, so the worker can start.
    let store = RedisStore::builder(&format!("redis://127.0.0.1:{}", proxy.port()))
        .prefix(prefix)
        .connect_lazy()
        .unwrap();
    let log: Log = Arc::default();
    let consumer = Consumer::builder(name.clone())
        .store(store.clone())
        .backoff(budget())
        .handler_with_state(redis_handler, log.clone())
        .unwrap();
    let breaker = consumer.breaker().unwrap().clone();
    let publisher = Publisher::connect(&idem_amqp::amqp_url_from_env())
        .await
        .unwrap();
    for i in 0..20 {
        let mut msg = Message::new("{}").with_message_id(format!("m-{i}"));
        publisher.publish("", &name, &mut msg).await.unwrap();
    }
    publisher.close().await;

    let worker = Worker::builder(
        idem_amqp::amqp_url_from_env(),
        topo.clone(),
        consumer.clone(),
    )
    .prefetch(10)
    .build()
    .unwrap();
    let running = worker.spawn();
    tokio::time::timeout(Duration::from_secs(15), breaker.wait_open())
        .await
        .expect("the breaker opens when the store does not answer at start");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!running.is_finished(), "the worker must wait, not exit");
    assert!(breaker.is_open());
    assert_eq!(paused_gauge(&name), Some(1.0));
    assert!(log.lock().unwrap().is_empty());
    assert_eq!(
        count(topo.queue()).await,
        20,
        "paused: every message waits in the queue"
    );

    proxy.set(Mode::Up);
    let restored = Instant::now();
    while log.lock().unwrap().len() < 20 {
        assert!(
            restored.elapsed() < Duration::from_secs(30),
            "not resumed 30 s after the store came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "[start-while-down] all 20 processed {:?} after the store came back",
        restored.elapsed()
    );
    let stats = step("worker shutdown", running.shutdown_and_join())
        .await
        .unwrap();
    assert_eq!(
        (stats.processed, stats.retries, stats.dead_lettered),
        (20, 0, 0),
        "{stats}"
    );
    assert_eq!(count(&topo.dlq()).await, 0);
    step("store cleanup", Store::Redis { store }.cleanup()).await;
    delete(&topo).await;
}
