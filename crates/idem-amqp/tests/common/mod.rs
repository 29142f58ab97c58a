//! Set-up shared by the AMQP transport's tests.
#![allow(dead_code)] // each test binary uses its own part of it

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_amqp::{DelayTiers, Publisher, Topology, Worker, WorkerBuilder};
use idem_core::{Consumer, HandlerError, Message, State, Stats, WorkerHandle};
use idem_testkit::Service;
use lapin::message::BasicGetMessage;
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Connection};

/// `AMQP_URL`, or the local broker.
pub(crate) fn url() -> String {
    idem_amqp::amqp_url_from_env()
}

/// A connection named `name` to the test broker and a channel on it, or a panic
/// saying the broker is not reachable.
pub(crate) async fn broker(name: &str) -> (Connection, Channel) {
    let url = url();
    let conn = Service::RabbitMq.expect_connected(&url, idem_amqp::connect(&url, name).await);
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// `idem-test-<prefix>-<32 hex digits>`: a queue name no other run uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!("idem-test-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// One delay tier of 1 s.
pub(crate) fn short_tiers() -> DelayTiers {
    DelayTiers::new([Duration::from_secs(1)]).unwrap()
}

/// A handler that fails (transient) on the first call it counts in `calls` and
/// succeeds on every later one.
pub(crate) async fn fails_once(State(calls): State<Arc<AtomicUsize>>) -> Result<(), HandlerError> {
    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
        Err(HandlerError::transient(std::io::Error::other("once")))
    } else {
        Ok(())
    }
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `limit`.
pub(crate) async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (see [`wait_until`]) until the stats of `consumer` meet `done`, panicking
/// naming `what` after `secs` seconds; then stops `running` gracefully and returns
/// its stats.
pub(crate) async fn stop_when(
    running: WorkerHandle<Result<Stats, idem_amqp::Error>>,
    consumer: &Consumer,
    what: &str,
    secs: u64,
    done: impl Fn(&Stats) -> bool,
) -> Stats {
    let limit = Duration::from_secs(secs);
    wait_until(what, limit, || done(&consumer.stats())).await;
    running.shutdown_and_join().await.unwrap()
}

/// Polls every 20 ms until `consumer` has processed `n` messages; panics after
/// `limit` with `what` and the consumer's stats.
pub(crate) async fn wait_processed(what: &str, limit: Duration, consumer: &Consumer, n: u64) {
    let start = Instant::now();
    while consumer.stats().processed < n {
        assert!(start.elapsed() < limit, "{what}: {}", consumer.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the async `cond` every 50 ms until it holds; panics naming `what` after
/// `limit`.
pub(crate) async fn wait_until_async<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> F,
) {
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls every 50 ms until a message is taken (no ack) from the DLQ of `topo` and
/// `consumer` has processed `processed` messages; that message. Panics after `limit`
/// with what is missing and the consumer's stats.
pub(crate) async fn settled_dead_letter(
    ch: &Channel,
    topo: &Topology,
    consumer: &Consumer,
    processed: u64,
    limit: Duration,
) -> BasicGetMessage {
    let started = Instant::now();
    let mut dead = None;
    loop {
        if dead.is_none() {
            dead = ch
                .basic_get(topo.dlq().as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap();
        }
        let stats = consumer.stats();
        if let Some(got) = dead.take_if(|_| stats.processed == processed) {
            return got;
        }
        let taken = if dead.is_some() { "taken" } else { "none" };
        assert!(
            started.elapsed() < limit,
            "not settled in {limit:?} (dead letter: {taken}): {stats}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Header `name` of a delivery's properties, if it is there.
pub(crate) fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref().and_then(|h| h.inner().get(name))
}

/// Header `name` of a delivery's properties as text, if it is there as a long string.
pub(crate) fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    header(props, name)
        .and_then(|v| v.as_long_string())
        .map(|s| s.to_string())
}

/// Messages with body `x` and ids `<prefix><i>`, `i` in `range`.
pub(crate) fn messages(prefix: &str, range: Range<usize>) -> impl Iterator<Item = Message> + '_ {
    range.map(move |i| Message::new("x").with_message_id(format!("{prefix}{i}")))
}

/// A test's own topology (a unique queue named after `tag`, one 1 s delay tier),
/// declared, with an admin channel and a publisher.
pub(crate) struct Fixture {
    /// The tag the queue's name starts from.
    pub(crate) name: &'static str,
    _conn: Connection,
    pub(crate) ch: Channel,
    pub(crate) topo: Topology,
    pub(crate) publisher: Publisher,
}

impl Fixture {
    pub(crate) async fn new(name: &'static str) -> Fixture {
        Fixture::with(name, |t| t).await
    }

    /// A fixture whose topology `shape` changes before it is declared.
    pub(crate) async fn with(
        name: &'static str,
        shape: impl FnOnce(Topology) -> Topology,
    ) -> Fixture {
        let (_conn, ch) = broker("idem-test-admin").await;
        let topo = shape(Topology::new(unique(name)).tiers(short_tiers()));
        topo.declare_on(&ch).await.unwrap();
        let publisher = Publisher::connect(&url()).await.unwrap();
        Fixture {
            name,
            _conn,
            ch,
            topo,
            publisher,
        }
    }

    /// A worker of `consumer` on the topology, `configure`d, started.
    pub(crate) fn start(
        &self,
        consumer: &Consumer,
        configure: impl FnOnce(WorkerBuilder) -> WorkerBuilder,
    ) -> WorkerHandle<Result<Stats, idem_amqp::Error>> {
        configure(Worker::builder(url(), self.topo.clone(), consumer.clone()))
            .build()
            .unwrap()
            .spawn()
    }

    /// Publishes `msgs` to the work queue, confirmed.
    pub(crate) async fn publish(&self, msgs: impl IntoIterator<Item = Message>) {
        let mut batch: Vec<Message> = msgs.into_iter().collect();
        self.publisher
            .publish_batch("", self.topo.queue(), &mut batch)
            .await
            .unwrap();
    }

    /// Asserts that every queue of the topology is empty, then deletes it.
    pub(crate) async fn assert_empty_and_delete(&self) {
        for q in self.topo.queue_names() {
            let n = idem_testkit::broker::ready_count(&self.ch, &q).await;
            assert_eq!(n, 0, "queue {q} should be empty");
        }
        self.delete().await;
    }

    /// Deletes the topology.
    pub(crate) async fn delete(&self) {
        self.topo.delete_on(&self.ch).await.unwrap();
    }
}
