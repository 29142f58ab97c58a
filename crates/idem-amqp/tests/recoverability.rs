//! Recoverability options on RabbitMQ: immediate retries, discard, the richer failure
//! record, the dead-letter hook (after the confirm) and delayed publish through the
//! delay tiers. Against the real broker (`AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`); unique queue names, deleted at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_amqp::convert::headers_from_table;
use idem_amqp::{DelayTiers, Error, Publisher, Topology, Worker, WorkerBuilder};
use idem_core::outcome::headers as h;
use idem_core::{
    Backoff, Consumer, Disposition, ErrorKind, HandlerError, HeaderValue, Headers, MemoryStore,
    Message, Settled, Stats, WorkerHandle,
};
use idem_testkit::{unique, Service};
use lapin::options::BasicGetOptions;
use lapin::{Channel, Connection};
use tokio::sync::mpsc;

const SETTLE_LIMIT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
#[error("ledger locked")]
struct LedgerLocked;

struct Broker {
    url: String,
    conn: Connection,
    ch: Channel,
    publisher: Publisher,
}

async fn broker(name: &str) -> Broker {
    let url = Service::RabbitMq.url();
    let conn = Service::RabbitMq.expect_connected(&url, idem_amqp::connect(&url, name).await);
    let ch = conn.create_channel().await.unwrap();
    let publisher = Service::RabbitMq.expect_connected(&url, Publisher::connect(&url).await);
    Broker {
        url,
        conn,
        ch,
        publisher,
    }
}

impl Broker {
    async fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        self.ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
    }

    async fn count(&self, queue: &str) -> u32 {
        idem_testkit::broker::ready_count(&self.ch, queue).await
    }

    /// A worker of `consumer` on `topo`, one delivery at a time, `configure`d, started.
    fn start(
        &self,
        topo: &Topology,
        consumer: Consumer,
        configure: impl FnOnce(WorkerBuilder) -> WorkerBuilder,
    ) -> WorkerHandle<Result<Stats, Error>> {
        configure(Worker::builder(self.url.as_str(), topo.clone(), consumer).prefetch(1))
            .build()
            .unwrap()
            .spawn()
    }

    /// A worker of `consumer` on `topo`, as [`Broker::start`] starts it, that sends
    /// what `report` makes of each settled delivery to the receiver it returns.
    fn start_reporting<T: Send + 'static>(
        &self,
        topo: &Topology,
        consumer: Consumer,
        report: impl Fn(&Settled<'_>) -> T + Send + Sync + 'static,
    ) -> (
        WorkerHandle<Result<Stats, Error>>,
        mpsc::UnboundedReceiver<T>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let running = self.start(topo, consumer, |w| {
            w.on_settle(move |s| {
                let _ = tx.send(report(&s));
            })
        });
        (running, rx)
    }

    /// Publishes a message with body `{}` and message id `id` to the work queue.
    async fn publish(&self, topo: &Topology, id: &str) {
        let mut msg = Message::new("{}").with_message_id(id);
        self.publisher
            .publish("", topo.queue(), &mut msg)
            .await
            .unwrap();
    }

    async fn finish(self, topo: &Topology) {
        topo.delete_on(&self.ch).await.unwrap();
        self.publisher.close().await;
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

/// A broker connection named `idem-test-<tag>` and a topology of its own (a unique
/// queue named after `tag`, one 1 s delay tier), declared.
async fn declared(tag: &str) -> (Broker, Topology) {
    let b = broker(&format!("idem-test-{tag}")).await;
    let topo = Topology::new(unique(tag)).tiers(DelayTiers::new([Duration::from_secs(1)]).unwrap());
    topo.declare_on(&b.ch).await.unwrap();
    (b, topo)
}

fn one_retry() -> Backoff {
    idem_testkit::backoff(Duration::from_secs(1), 2)
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(SETTLE_LIMIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {SETTLE_LIMIT:?}"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_retries_absorb_a_blip_without_a_retry_copy() {
    let (b, topo) = declared("immediate").await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let consumer = Consumer::builder("immediate")
        .store(MemoryStore::new())
        .backoff(one_retry())
        .immediate_retries(2)
        .immediate_retry_delay(Duration::from_millis(20))
        .service(tower::service_fn(move |_m: Message| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(HandlerError::transient(LedgerLocked))
                } else {
                    Ok(())
                }
            }
        }))
        .unwrap();
    let (running, mut settled) =
        b.start_reporting(&topo, consumer, |s| (s.attempt, s.disposition.clone()));
    b.publish(&topo, "blip-1").await;
    assert_eq!(
        next(&mut settled, "settle").await,
        (1, Disposition::Ack { duplicate: false })
    );
    let stats = running.shutdown_and_join().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        (stats.processed, stats.retries, stats.immediate_retries),
        (1, 0, 2)
    );
    let retry_queue = topo.retry_queue(Duration::from_secs(1));
    assert_eq!(b.count(&retry_queue).await, 0, "no retry copy");
    assert_eq!(b.count(topo.queue()).await, 0, "acked");
    b.finish(&topo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_the_full_record_and_the_hook_fires_after_the_confirm() {
    let (b, topo) = declared("dlhook").await;
    let seen: Arc<Mutex<Vec<Headers>>> = Arc::default();
    let s = seen.clone();
    let (hook_tx, mut hooked) = mpsc::unbounded_channel();
    let consumer = Consumer::builder("dlhook")
        .store(MemoryStore::new())
        .backoff(one_retry())
        .immediate_retries(1)
        .immediate_retry_delay(Duration::ZERO)
        .on_dead_letter(move |d| {
            let _ = hook_tx.send((
                d.message_id.map(str::to_owned),
                d.queue.to_owned(),
                d.dead_letter_queue.to_owned(),
                d.failure.clone(),
            ));
        })
        .service(tower::service_fn(move |m: Message| {
            s.lock().unwrap().push(m.headers.clone());
            async { Err::<(), _>(LedgerLocked) }
        }))
        .unwrap();
    let running = b.start(&topo, consumer, |w| w);
    b.publish(&topo, "dl-1").await;

    let (id, queue, dlq, failure) = next(&mut hooked, "dead-letter hook").await;
    // The hook runs once the copy is confirmed: it is in the DLQ now, no waiting.
    let dead = b
        .get(&topo.dlq())
        .await
        .expect("the copy is in the DLQ when the hook runs");
    assert_eq!(id.as_deref(), Some("dl-1"));
    assert_eq!(
        (queue.as_str(), dlq.as_str()),
        (topo.queue(), topo.dlq().as_str())
    );
    assert_eq!(failure.kind, ErrorKind::Transient);
    assert_eq!((failure.attempts, failure.immediate_retries), (2, 1));
    let type_name = std::any::type_name::<LedgerLocked>();
    assert_eq!(failure.error_type.as_deref(), Some(type_name));

    let stats = running.shutdown_and_join().await.unwrap();
    assert_eq!(
        (stats.retries, stats.dead_lettered, stats.immediate_retries),
        (1, 1, 2)
    );
    assert!(hooked.try_recv().is_err(), "one report for one dead letter");
    // Two deliveries (original, retry copy), two tries each.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[2][h::IMMEDIATE_RETRIES], HeaderValue::from(1u32));
    assert_eq!(seen[2][h::ERROR_TYPE], HeaderValue::from(type_name));
    let hd = dead
        .delivery
        .properties
        .headers()
        .as_ref()
        .map(headers_from_table)
        .unwrap();
    assert_eq!(hd[h::ERROR_TYPE], HeaderValue::from(type_name));
    assert_eq!(hd[h::HOST], HeaderValue::from(idem_core::outcome::host()));
    assert_eq!(hd[h::PID], HeaderValue::from(std::process::id()));
    assert_eq!(hd[h::IMMEDIATE_RETRIES], HeaderValue::from(1u32));
    assert_eq!(hd[h::ATTEMPTS], HeaderValue::from(2u32));
    assert!(!hd.contains_key(h::BACKTRACE), "backtraces are opt-in");
    b.finish(&topo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_acks_without_a_copy_and_a_redelivery_is_a_duplicate() {
    let (b, topo) = declared("discard").await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let consumer = Consumer::builder("discard")
        .store(MemoryStore::new())
        .service(tower::service_fn(move |_m: Message| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(HandlerError::discard("stale event")) }
        }))
        .unwrap();
    let (running, mut settled) = b.start_reporting(&topo, consumer, |s| s.disposition.clone());
    for _ in 0..2 {
        b.publish(&topo, "stale-1").await;
    }
    assert_eq!(
        next(&mut settled, "first delivery").await,
        Disposition::Discard {
            reason: "stale event".into()
        }
    );
    assert_eq!(
        next(&mut settled, "second delivery").await,
        Disposition::Ack { duplicate: true }
    );
    let stats = running.shutdown_and_join().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        (
            stats.discarded,
            stats.duplicates,
            stats.dead_lettered,
            stats.retries
        ),
        (1, 1, 0, 0)
    );
    // Acked: nothing went back to the queue, nothing to the DLQ.
    assert_eq!(b.count(topo.queue()).await, 0);
    assert_eq!(b.count(&topo.dlq()).await, 0);
    b.finish(&topo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_delayed_arrives_not_before_the_delay_and_within_its_tier() {
    let b = broker("idem-test-publish-delayed").await;
    let s = Duration::from_secs;
    let topo = Topology::new(unique("delayed")).tiers(DelayTiers::new([s(1), s(3)]).unwrap());

    // Not declared yet: the delay queue does not exist, the publish says so.
    let mut early = Message::new("early");
    let err = b
        .publisher
        .publish_delayed(&topo, &mut early, s(2))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Returned { .. }), "{err}");

    topo.declare_on(&b.ch).await.unwrap();
    let delay = s(2);
    let mut msg = Message::new("later").with_message_id("delayed-1");
    let started = Instant::now();
    let waits = b
        .publisher
        .publish_delayed(&topo, &mut msg, delay)
        .await
        .unwrap();
    assert_eq!(waits, s(3), "rounded up to the 3 s tier");
    // Poll the work queue: the last empty look must come after the delay (the message
    // was not there before it), the arrival within the tier plus slack.
    let slack = s(2);
    let mut last_empty = Duration::ZERO;
    let got = loop {
        let looked = started.elapsed();
        if let Some(got) = b.get(topo.queue()).await {
            break got;
        }
        last_empty = looked;
        assert!(
            looked < waits + slack,
            "not delivered within its tier + {slack:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let arrived = started.elapsed();
    assert!(
        last_empty >= delay,
        "seen missing at {last_empty:?} only: cannot tell it arrived after {delay:?}"
    );
    assert!(arrived <= waits + slack, "arrived after {arrived:?}");
    assert_eq!(&got.delivery.data[..], b"later");
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str()),
        Some("delayed-1")
    );

    // Zero: straight to the queue. Longer than the longest tier: refused, nothing sent.
    let mut now = Message::new("now");
    assert_eq!(
        b.publisher
            .publish_delayed(&topo, &mut now, Duration::ZERO)
            .await
            .unwrap(),
        Duration::ZERO
    );
    assert!(b.get(topo.queue()).await.is_some());
    let mut too_late = Message::new("too late");
    let err = b
        .publisher
        .publish_delayed(&topo, &mut too_late, s(4))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::DelayTooLong { longest, .. } if longest == s(3)),
        "{err}"
    );
    for q in topo.queue_names() {
        assert_eq!(b.count(&q).await, 0, "{q} is empty");
    }
    b.finish(&topo).await;
}
