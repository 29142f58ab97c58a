//! A worker whose future is dropped (an aborted task, a `select!` branch that lost,
//! a dropped `WorkerHandle`) strands nothing: against the real local RabbitMQ
//! (`AMQP_URL`), Redis (`REDIS_URL`) and PostgreSQL (`DATABASE_URL`), with
//! `rabbitmqctl` to read what the broker holds.
//!
//! Each test fills a worker's whole prefetch (20) with handlers that would run for a
//! minute, drops the worker, and checks that within 2 s every delivery is ready
//! again and the queue has no consumer, that the broker lists no unacked delivery and
//! no connection under the worker's name, that every handler future was dropped
//! without applying its effect, and that a second worker then applies every message
//! exactly once. The three tests use the three kinds of dedup stage: the in-memory
//! store and Redis (a cut-off handler's claim stays until its 2 s lease runs out, as
//! after a crash: the second worker is answered "busy" and retries after it) and the
//! PostgreSQL inbox (the open transaction rolls back).

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_amqp::{Publisher, Topology, Worker, WorkerBuilder};
use idem_core::{Consumer, DedupLayer, HandlerError, IdempotencyKey, MemoryStore, Message, State};
use idem_testkit::broker::{
    connection_closes, connection_open, queue_counts, wait_until, QueueCounts,
};
use idem_testkit::Service;
use lapin::Channel;

const PREFETCH: u16 = 20;
/// A short lease: the dropped worker's claims on a lease store hold their keys this long.
const LEASE: Duration = Duration::from_secs(2);

fn url() -> String {
    idem_amqp::amqp_url_from_env()
}

/// What the handlers saw: how many started, how many were dropped unfinished, and
/// the effects applied per message id.
#[derive(Default)]
struct Probe {
    started: AtomicUsize,
    dropped: AtomicUsize,
    effects: Mutex<HashMap<String, usize>>,
}

/// Counts a handler future dropped before it finished.
struct DropCount(Arc<Probe>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

impl Probe {
    /// The handler of the worker that is dropped: starts, then runs "for a minute".
    async fn stuck(self: Arc<Self>, key: &str) {
        let _count = DropCount(self.clone());
        self.started.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(60)).await;
        self.apply(key);
        std::mem::forget(_count); // finished: not a dropped future
    }

    fn apply(&self, key: &str) {
        *self
            .effects
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_default() += 1;
    }

    fn effects(&self) -> HashMap<String, usize> {
        self.effects.lock().unwrap().clone()
    }
}

/// The state both workers' handlers get: the probe, and whether this worker is the
/// one to be dropped.
#[derive(Clone)]
struct Side {
    probe: Arc<Probe>,
    stuck: bool,
}

async fn handler(State(side): State<Side>, key: IdempotencyKey) -> Result<(), HandlerError> {
    if side.stuck {
        side.probe.clone().stuck(key.as_str()).await;
    } else {
        side.probe.apply(key.as_str());
    }
    Ok(())
}

async fn inbox_handler(
    State(side): State<Side>,
    key: IdempotencyKey,
    tx: idem_sql::Tx<idem_sql::sqlx::Postgres>,
) -> Result<(), HandlerError> {
    // Holds the transaction open while it "runs".
    let _conn = tx.conn().await?;
    handler(State(side), key).await
}

/// How the stuck worker is dropped.
enum DropBy {
    /// `JoinHandle::abort` on the task running `run`.
    Abort,
    /// `run` loses a `tokio::select!` to a timer.
    Select,
    /// The `WorkerHandle` of `Worker::spawn` goes out of scope.
    Handle,
}

/// Which dedup stage both workers use.
enum Stage {
    Memory(MemoryStore),
    Redis(String),
    Inbox(idem_sql::sqlx::PgPool, String),
}

impl Stage {
    /// A worker (prefetch [`PREFETCH`]) on the declared `topology` of this stage's
    /// consumer, its handlers `stuck` or not, reporting to `probe`.
    async fn worker(
        &self,
        url: &str,
        topology: &Topology,
        probe: &Arc<Probe>,
        stuck: bool,
    ) -> WorkerBuilder {
        let side = Side {
            probe: probe.clone(),
            stuck,
        };
        Worker::builder(
            url,
            topology.clone().declare(false),
            self.consumer(side).await,
        )
        .prefetch(PREFETCH)
    }

    async fn consumer(&self, side: Side) -> Consumer {
        let builder = Consumer::builder("lifecycle");
        match self {
            Stage::Memory(store) => builder
                .dedup(DedupLayer::new(store.clone()).lease(LEASE))
                .handler_with_state(handler, side)
                .unwrap(),
            Stage::Redis(prefix) => {
                let store = idem_redis::RedisStore::builder(&Service::Redis.url())
                    .prefix(prefix.as_str())
                    .connect()
                    .await;
                let store = Service::Redis.expect_connected(&Service::Redis.url(), store);
                builder
                    .dedup(DedupLayer::new(store).lease(LEASE))
                    .handler_with_state(handler, side)
                    .unwrap()
            }
            Stage::Inbox(pool, table) => builder
                .dedup(
                    idem_sql::PgInbox::new(pool.clone())
                        .try_table(table)
                        .unwrap(),
                )
                .handler_with_state(inbox_handler, side)
                .unwrap(),
        }
    }
}

async fn ready_and_consumers(ch: &Channel, queue: &str) -> (u32, u32) {
    let q = idem_testkit::broker::inspect_queue(ch, queue)
        .await
        .unwrap();
    (q.message_count(), q.consumer_count())
}

async fn scenario(stage: Stage, how: DropBy) {
    let url = url();
    let admin = Service::RabbitMq
        .expect_connected(&url, idem_amqp::connect(&url, "idem-test-lifecycle").await);
    let ch = admin.create_channel().await.unwrap();
    let topology = Topology::new(idem_testkit::unique("lifecycle"));
    topology.declare_on(&ch).await.unwrap();
    let queue = topology.queue().to_owned();
    let publisher = Publisher::connect(&url).await.unwrap();
    let mut msgs: Vec<Message> = (0..PREFETCH)
        .map(|i| Message::new("{}").with_message_id(format!("m-{i:02}")))
        .collect();
    publisher
        .publish_batch("", &queue, &mut msgs)
        .await
        .unwrap();

    let probe = Arc::new(Probe::default());
    let stuck_name = idem_testkit::unique("stuck_worker");
    let stuck = stage
        .worker(&url, &topology, &probe, true)
        .await
        .connection_name(&stuck_name)
        .build()
        .unwrap();

    let all_started = {
        let probe = probe.clone();
        async move {
            let limit = Duration::from_secs(30);
            let started = wait_until(limit, async || {
                probe.started.load(Ordering::SeqCst) == usize::from(PREFETCH)
            })
            .await;
            assert!(
                started,
                "the stuck worker did not start {PREFETCH} handlers in {limit:?}"
            );
        }
    };
    match how {
        DropBy::Abort => {
            let task = tokio::spawn(stuck.run(std::future::pending()));
            all_started.await;
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled());
        }
        DropBy::Select => {
            let run: Pin<Box<dyn Future<Output = _> + Send>> =
                Box::pin(stuck.run(std::future::pending()));
            tokio::select! {
                _ = run => panic!("the worker ended by itself"),
                _ = async {
                    all_started.await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                } => {}
            }
        }
        DropBy::Handle => {
            let handle = stuck.spawn();
            all_started.await;
            drop(handle);
        }
    }
    let dropped_at = Instant::now();

    // Within 2 s: every delivery is ready again and nobody consumes the queue.
    let limit = Duration::from_secs(2);
    let handed_back = wait_until(limit, async || {
        ready_and_consumers(&ch, &queue).await == (u32::from(PREFETCH), 0)
    })
    .await;
    assert!(
        handed_back,
        "{limit:?} after the drop the queue still shows (ready, consumers) = {:?}, not ({PREFETCH}, 0)",
        ready_and_consumers(&ch, &queue).await
    );
    let handed_back_in = dropped_at.elapsed();
    // Every handler future was dropped, none applied its effect.
    let all_dropped = wait_until(limit, async || {
        probe.dropped.load(Ordering::SeqCst) == usize::from(PREFETCH)
    })
    .await;
    assert!(
        all_dropped,
        "only {} of {PREFETCH} handler futures were dropped",
        probe.dropped.load(Ordering::SeqCst)
    );
    // The broker's own view (rabbitmqctl is slower than the protocol: its own
    // deadline): nothing unacked, and no connection left under the worker's name.
    assert_eq!(
        queue_counts(&queue).await,
        QueueCounts {
            ready: u64::from(PREFETCH),
            unacked: 0,
            consumers: 0
        }
    );
    let closed = connection_closes(&stuck_name, Duration::from_secs(10)).await;
    assert!(
        closed,
        "the dropped worker's connection {stuck_name} is still open"
    );
    assert!(
        probe.effects().is_empty(),
        "a dropped handler applied its effect"
    );

    // A second worker applies each message exactly once.
    let second = stage
        .worker(&url, &topology, &probe, false)
        .await
        .build()
        .unwrap()
        .spawn();
    let limit = Duration::from_secs(30);
    let applied = wait_until(limit, async || {
        probe.effects().len() == usize::from(PREFETCH)
            && ready_and_consumers(&ch, &queue).await.0 == 0
    })
    .await;
    let stats = second.shutdown_and_join().await.unwrap();
    assert!(
        applied,
        "the second worker applied {} of {PREFETCH} messages in {limit:?} ({stats})",
        probe.effects().len()
    );
    let effects = probe.effects();
    for i in 0..PREFETCH {
        assert_eq!(
            effects.get(&format!("m-{i:02}")),
            Some(&1),
            "effects: {effects:?}"
        );
    }
    assert_eq!(queue_counts(&queue).await.unacked, 0);
    eprintln!("handed back {handed_back_in:?} after the drop");

    topology.delete_on(&ch).await.unwrap();
    match stage {
        Stage::Inbox(pool, table) => {
            // The inbox also made its start counters' table, `<inbox>_starts`.
            for t in [table.clone(), format!("{table}_starts")] {
                idem_sql::sqlx::query(&format!("DROP TABLE IF EXISTS {t}"))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        }
        Stage::Redis(prefix) => {
            let mut redis = idem_testkit::redis().await;
            idem_testkit::delete_redis_keys(&mut redis, &format!("{prefix}*")).await;
        }
        Stage::Memory(_) => {}
    }
    publisher.close().await;
    let _ = admin.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_an_aborted_worker_task_hands_back_every_delivery() {
    scenario(Stage::Memory(MemoryStore::new()), DropBy::Abort).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_a_worker_losing_a_select_to_a_timer_hands_back_every_delivery() {
    scenario(
        Stage::Redis(idem_testkit::unique("lifecycle")),
        DropBy::Select,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_a_dropped_worker_handle_hands_back_every_delivery() {
    let pool = idem_testkit::postgres(
        idem_sql::sqlx::postgres::PgPoolOptions::new().max_connections(30),
        "idem-test-lifecycle",
    )
    .await;
    let table = idem_testkit::unique("lifecycle_inbox");
    idem_sql::PgInbox::new(pool.clone())
        .try_table(&table)
        .unwrap()
        .ensure_schema()
        .await
        .unwrap();
    scenario(Stage::Inbox(pool, table), DropBy::Handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_a_dropped_publisher_closes_its_connection() {
    let name = idem_testkit::unique("publisher");
    let publisher = Publisher::builder(url())
        .connection_name(&name)
        .connect()
        .await;
    let publisher = Service::RabbitMq.expect_connected(&url(), publisher);
    let queue = idem_testkit::unique("publisher_drop");
    let mut msg = Message::new("x");
    // Unroutable publishes are refused, but they prove the link is up.
    let _ = publisher.publish("", &queue, &mut msg).await;
    let listed = wait_until(Duration::from_secs(10), async || {
        connection_open(&name).await
    })
    .await;
    assert!(listed, "the publisher's connection {name} never showed up");
    drop(publisher);
    let closed = connection_closes(&name, Duration::from_secs(10)).await;
    assert!(
        closed,
        "a dropped publisher left its connection {name} open"
    );
}
