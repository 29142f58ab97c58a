//! `amqp-noop`: consume N persistent 256-byte messages with a no-op handler,
//! at-least-once (ack after the handler), three ways, same prefetch:
//!
//! - the idem worker;
//! - **baseline**: the loop a user writes by hand, a lapin consumer spawning a task
//!   per delivery that runs the (no-op) work and then acks that delivery;
//! - **best-case baseline**: the fastest correct hand-written loop we know, one task
//!   that runs the work in delivery order and acks with `multiple=true`: once 50
//!   deliveries are unacked, when 1 ms passed without a new delivery (so the
//!   prefetch window never starves), and at the end. It never acks a delivery whose
//!   work has not run, so it keeps the at-least-once guarantee of the others.
//!
//! Each run gets a fresh durable queue (same topology for both), pre-filled with
//! confirmed publishes; the clock runs from the first delivery to the last ack and the
//! queues are deleted afterwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use idem_amqp::{Publisher, Topology, Worker, WorkerBuilder};
use idem_core::{Consumer, DeliveryMode, Message};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Acker;
use tokio::sync::Notify;

use crate::report::{Report, Side};

type BoxError = Box<dyn std::error::Error>;

/// Arguments of `amqp-noop`, shared by the other consumer scenarios.
#[derive(clap::Args)]
pub(crate) struct ConsumerArgs {
    /// Messages per run.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) messages: u64,
    /// Prefetch (and concurrency) of both consumers.
    #[arg(long, default_value_t = 200)]
    pub(crate) prefetch: u16,
    /// Rounds; each round runs idem, then the baseline(s).
    #[arg(long, default_value_t = 5)]
    pub(crate) rounds: u32,
    #[command(flatten)]
    pub(crate) amqp: crate::urls::AmqpUrl,
    /// PEM CA to trust for amqps:// and rediss:// (env IDEM_TLS_CA).
    #[arg(long, env = idem_core::tls::ENV_TLS_CA)]
    pub(crate) tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate for mutual TLS (env IDEM_TLS_CERT).
    #[arg(long, env = idem_core::tls::ENV_TLS_CERT)]
    pub(crate) tls_cert: Option<std::path::PathBuf>,
    /// PEM key of --tls-cert (env IDEM_TLS_KEY).
    #[arg(long, env = idem_core::tls::ENV_TLS_KEY)]
    pub(crate) tls_key: Option<std::path::PathBuf>,
}

/// Arguments of `amqp-noop`: the consumer arguments, and the ordered comparison.
#[derive(clap::Args)]
pub(crate) struct NoopArgs {
    #[command(flatten)]
    pub(crate) base: ConsumerArgs,
    /// Instead of idem vs the baselines: idem unordered vs ordered by key, for each
    /// `--keys` value (see `amqp_ordered`).
    #[arg(long)]
    pub(crate) ordered: bool,
    /// With `--ordered`: the key counts to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10,1000")]
    pub(crate) keys: Vec<u64>,
}

impl ConsumerArgs {
    /// A plain lapin consumer of `queue` with this prefetch, for the hand-written
    /// baselines: the connection (close it when done), its channel and the deliveries.
    pub(crate) async fn consume(
        &self,
        queue: &str,
        name: &str,
    ) -> Result<(lapin::Connection, lapin::Channel, lapin::Consumer), BoxError> {
        let conn = idem_amqp::connect_tls(&self.amqp.url, name, &self.tls()?).await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let deliveries = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((conn, ch, deliveries))
    }

    /// The connections of a run: the publisher that fills the queues and an admin
    /// channel that declares and deletes them.
    pub(crate) async fn broker(&self) -> Result<Broker, BoxError> {
        let tls = self.tls()?;
        let publisher = Publisher::builder(&self.amqp.url)
            .connection_name("idem-bench-fill")
            .tls(tls.clone())
            .connect()
            .await?;
        let admin = idem_amqp::connect_tls(&self.amqp.url, "idem-bench-admin", &tls).await?;
        let ch = admin.create_channel().await?;
        Ok(Broker {
            publisher,
            admin,
            ch,
        })
    }

    /// Runs a worker of `consumer` on `topo` (this prefetch and TLS, connection
    /// `name`, then `configure`) until `clock` has seen every message settle; the time
    /// from the first delivery to the last settle.
    pub(crate) async fn run_worker(
        &self,
        topo: &Topology,
        consumer: Consumer,
        clock: Arc<Clock>,
        name: &str,
        configure: impl FnOnce(WorkerBuilder) -> WorkerBuilder,
    ) -> Result<Duration, BoxError> {
        let c = clock.clone();
        let worker = Worker::builder(&self.amqp.url, topo.clone(), consumer)
            .tls(self.tls()?)
            .prefetch(self.prefetch)
            .connection_name(name)
            .on_settle(move |_| c.settled());
        let running = configure(worker).build()?.spawn();
        let elapsed = clock.wait().await;
        running.shutdown_and_join().await?;
        elapsed
    }

    /// The TLS settings for amqps:// and rediss:// URLs.
    pub(crate) fn tls(&self) -> Result<idem_core::TlsConfig, idem_core::TlsConfigError> {
        idem_core::TlsConfig::from_files(
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
        )
    }
}

/// The publisher and the admin channel of a run (see [`ConsumerArgs::broker`]).
pub(crate) struct Broker {
    /// Fills the queues.
    pub(crate) publisher: Publisher,
    admin: lapin::Connection,
    /// Declares and deletes the queues (and their topology).
    pub(crate) ch: lapin::Channel,
}

impl Broker {
    /// Closes the publisher and the admin connection.
    pub(crate) async fn close(self) {
        self.publisher.close().await;
        let _ = self.admin.close(200, "bye".into()).await;
    }
}

pub(crate) async fn run(args: ConsumerArgs) -> Result<Report, BoxError> {
    let broker = args.broker().await?;
    let ch = &broker.ch;
    let mut report = Report::new("amqp-noop", args.messages, args.prefetch);
    for round in 0..args.rounds.max(1) {
        for side in [Side::Idem, Side::Baseline, Side::BestCase] {
            let topo = Topology::new(format!("idem-bench-{}", uuid::Uuid::new_v4().simple()));
            topo.declare_on(ch).await?;
            fill(&broker.publisher, topo.queue(), args.messages).await?;
            let cpu = crate::cpu::Sample::now();
            let result = match side {
                Side::Idem | Side::Batch => run_idem(&args, &topo).await,
                Side::Baseline => run_baseline(&args, topo.queue()).await,
                Side::BestCase => run_best_case(&args, topo.queue()).await,
            };
            let used = cpu.per_message(args.messages);
            topo.delete_on(ch).await?;
            let elapsed = result?;
            report.record(round, side, elapsed);
            report.record_cpu(side, used);
        }
    }
    broker.close().await;
    Ok(report)
}

/// Fills `queue` with `n` persistent 256-byte messages, confirmed; `Publisher` gives
/// each a unique UUIDv7 `message_id`.
pub(crate) async fn fill(publisher: &Publisher, queue: &str, n: u64) -> Result<(), BoxError> {
    let body = bytes::Bytes::from(vec![b'x'; 256]);
    let mut sent = 0;
    while sent < n {
        let batch = (n - sent).min(1000);
        let mut msgs: Vec<Message> = (0..batch).map(|_| Message::new(body.clone())).collect();
        publisher.publish_batch("", queue, &mut msgs).await?;
        sent += batch;
    }
    Ok(())
}

/// Shared by both consumers: first delivery time, settled count, completion signal.
pub(crate) struct Clock {
    first: OnceLock<Instant>,
    settled: AtomicU64,
    target: u64,
    done: Notify,
    last: OnceLock<Instant>,
}

impl Clock {
    pub(crate) fn new(target: u64) -> Arc<Self> {
        Arc::new(Clock {
            first: OnceLock::new(),
            settled: AtomicU64::new(0),
            target,
            done: Notify::new(),
            last: OnceLock::new(),
        })
    }

    pub(crate) fn started(&self) {
        self.first.get_or_init(Instant::now);
    }

    pub(crate) fn settled(&self) {
        self.settled_many(1);
    }

    pub(crate) fn settled_many(&self, n: u64) {
        let before = self.settled.fetch_add(n, Ordering::Relaxed);
        if before < self.target && before + n >= self.target {
            let _ = self.last.set(Instant::now());
            self.done.notify_one();
        }
    }

    pub(crate) async fn wait(&self) -> Result<Duration, BoxError> {
        let limit = Duration::from_secs(300);
        tokio::time::timeout(limit, self.done.notified()).await?;
        match (self.first.get(), self.last.get()) {
            (Some(a), Some(b)) => Ok(b.duration_since(*a)),
            _ => Err("clock not set".into()),
        }
    }
}

/// An at-least-once consumer `name` whose handler does nothing but start `clock`.
pub(crate) fn noop_consumer(name: &str, clock: &Arc<Clock>) -> Result<Consumer, BoxError> {
    let c = clock.clone();
    Ok(Consumer::builder(name)
        .mode(DeliveryMode::AtLeastOnce)
        .handler(move || {
            c.started();
            async {}
        })?)
}

async fn run_idem(args: &ConsumerArgs, topo: &Topology) -> Result<Duration, BoxError> {
    let clock = Clock::new(args.messages);
    let consumer = noop_consumer("idem-bench-noop", &clock)?;
    args.run_worker(topo, consumer, clock, "idem-bench-idem", |w| w)
        .await
}

async fn run_baseline(args: &ConsumerArgs, queue: &str) -> Result<Duration, BoxError> {
    let clock = Clock::new(args.messages);
    let (conn, _ch, mut deliveries) = args.consume(queue, "idem-bench-baseline").await?;
    let mut received = 0;
    while received < args.messages {
        let Some(delivery) = deliveries.next().await else {
            return Err("consumer ended early".into());
        };
        let delivery = delivery?;
        received += 1;
        clock.started();
        let c = clock.clone();
        tokio::spawn(async move {
            // The "work": nothing. Then ack, like the idem worker.
            if let Ok(true) = delivery.acker.ack(BasicAckOptions::default()).await {
                c.settled();
            }
        });
    }
    let elapsed = clock.wait().await;
    let _ = conn.close(200, "bye".into()).await;
    elapsed
}

/// Deliveries the best-case loop leaves unacked at most before a `multiple=true` ack.
const BEST_CASE_BATCH: u64 = 50;
/// How long the best-case loop waits for a next delivery before acking what it has.
const BEST_CASE_IDLE: Duration = Duration::from_millis(1);

/// The best case a user could write by hand: no task per delivery, the work run in
/// delivery order, one `multiple=true` ack per 50 deliveries, when 1 ms passes
/// without a delivery, and at the end.
async fn run_best_case(args: &ConsumerArgs, queue: &str) -> Result<Duration, BoxError> {
    let clock = Clock::new(args.messages);
    let (conn, _ch, mut deliveries) = args.consume(queue, "idem-bench-best-case").await?;
    // The last delivery whose work ran and is not acked yet, and how many are unacked.
    let mut unacked: Option<Acker> = None;
    let mut count = 0_u64;
    let mut received = 0;
    let multiple = BasicAckOptions { multiple: true };
    async fn flush(
        acker: &mut Option<Acker>,
        count: &mut u64,
        options: BasicAckOptions,
        clock: &Clock,
    ) -> Result<(), BoxError> {
        if let Some(acker) = acker.take() {
            if !acker.ack(options).await? {
                return Err("the channel closed before the ack".into());
            }
            clock.settled_many(std::mem::take(count));
        }
        Ok(())
    }
    while received < args.messages {
        let next = if unacked.is_some() {
            match tokio::time::timeout(BEST_CASE_IDLE, deliveries.next()).await {
                Ok(next) => next,
                Err(_idle) => {
                    flush(&mut unacked, &mut count, multiple, &clock).await?;
                    continue;
                }
            }
        } else {
            deliveries.next().await
        };
        let Some(delivery) = next else {
            return Err("consumer ended early".into());
        };
        let delivery = delivery?;
        received += 1;
        clock.started();
        // The "work": nothing, as in the other consumers; then the delivery joins the
        // run of deliveries to ack.
        unacked = Some(delivery.acker);
        count += 1;
        if count >= BEST_CASE_BATCH {
            flush(&mut unacked, &mut count, multiple, &clock).await?;
        }
    }
    flush(&mut unacked, &mut count, multiple, &clock).await?;
    let elapsed = clock.wait().await;
    let _ = conn.close(200, "bye".into()).await;
    elapsed
}
