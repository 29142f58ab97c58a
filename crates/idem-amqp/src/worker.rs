//! The consumer worker: consumes a work queue, runs each delivery through an
//! [`idem_core::Consumer`] and carries its [`Disposition`] out on the wire.
//!
//! - **Bounded**: `basic_qos(prefetch)` caps unacked deliveries; at most `concurrency`
//!   (default = prefetch) handlers run at once. Memory is bounded by the prefetch,
//!   whatever the queue length. Several workers on one queue share it as competing
//!   consumers.
//! - **Outcomes**: ack -> `basic.ack`. Retry -> a copy (body, original properties,
//!   `x-idem-*` failure headers, the original exchange and routing key) is published to
//!   `Q.retry.<tier>` and confirmed, *then* the original is acked. Dead-letter -> the
//!   same to `Q.dlq` with the dead-letter headers, then the consumer's dead-letter
//!   hook is told (only once the copy is confirmed). Discard (the handler dropped it on
//!   purpose) -> `basic.ack`, no copy. Release (circuit breaker open) ->
//!   `basic.nack` with `requeue=true`: no copy, no attempt spent.
//! - **Copy not confirmed**: the delivery stays unacked while the publish is retried
//!   (1, 2, 4, 8, 16 s) as long as the channel is open; then it is nacked with
//!   `requeue=true` once, so the broker redelivers it. Never `requeue=true` in a hot
//!   loop, never a loss. If the publishing channel died, the original is handed back
//!   (`requeue=true`) on the consuming channel; if that one died too, nothing can be
//!   sent and the broker redelivers every unacked delivery of the dead channel. The
//!   dedup store absorbs the repeats.
//! - **Crash loops** (see [`idem_core::crash`]): a redelivered delivery runs alone in
//!   its consumer. A retry copy answered "busy" carries the unsettled deliveries so far
//!   in `x-idem-delivery-count`; with a quorum queue's delivery limit, a delivery whose
//!   carried count exceeds it is dead-lettered without running.
//! - **Reconnect**: a lost connection or channel (broker restart, forced close) ends the
//!   session; the worker reconnects with backoff (200 ms doubling to 30 s), re-declares
//!   the topology and resumes. Handlers still running on the old channel finish; their
//!   acks are dropped (the delivery is redelivered and deduplicated).
//! - **Circuit breaker** (on by default with a dedup store, see
//!   [`idem_core::breaker`]): when the consumer's breaker opens (its store failed
//!   several times in a row, or does not answer when the worker starts), the worker
//!   stops taking deliveries, lets the handlers in flight settle (up to the shutdown
//!   timeout; those that hit the store are nacked with `requeue=true`, no attempt spent),
//!   then closes its connection, which hands every prefetched delivery back to the
//!   queue. It holds no connection while paused, so other consumers of the queue (with a
//!   healthy store) can take the messages. When the breaker closes (a store probe
//!   answered) it reconnects and resumes. A worker started during a store outage
//!   connects (so a wrong URL still fails at once), then waits paused.
//! - **Shutdown**: when the shutdown future completes, the worker cancels its consumer
//!   (`basic.cancel`), lets in-flight handlers finish and settles them, up to the
//!   shutdown timeout (default 30 s), sends the pending coalesced ack, then closes.
//!   Prefetched deliveries that never reached a handler go back to the queue when the
//!   channel closes.
//!
//! # Acks
//!
//! Acks are **coalesced** by default ([`WorkerBuilder::coalesce_acks`]): each consuming
//! channel has a coalescer that records the delivery tags in the order the channel
//! delivered them, and a flusher sends one `basic.ack multiple=true` up to the highest
//! tag `T` such that every tag up to `T` is settled. Settled means: the ack is due
//! (handled, or a duplicate), or the retry / dead-letter copy was confirmed (the tag
//! joins the run only after the confirm), or the delivery was handed back with its own
//! `basic.nack requeue=true, multiple=false`, sent at once (the ack of a run names its
//! highest *acked* tag, never a handed-back one, which the broker would refuse as an
//! unknown tag). A delivery still running holds back the ack of every later one.
//!
//! - **When**: as soon as [`ack_flush_batch`](WorkerBuilder::ack_flush_batch) tags in a
//!   row are settled (default: a quarter of the prefetch, so the broker keeps sending
//!   while acks are pending), or [`ack_flush_interval`](WorkerBuilder::ack_flush_interval)
//!   after the first of them (default 1 ms), and on shutdown and breaker pause, after
//!   the handlers are drained and before the channel closes.
//! - **Reconnect**: delivery tags restart with each channel, so each session has its
//!   own coalescer; acks pending when a channel dies are dropped (the broker redelivers
//!   those messages, the dedup store absorbs them).
//! - **Crash**: settled deliveries whose ack was not sent are redelivered. With a dedup
//!   store they are duplicates, acked without running. Without one (at-least-once
//!   mode) they run again: up to one batch (or one interval's worth) more repeats than
//!   per-delivery acks would give.
//! - **At-most-once** consumers still ack each delivery on receipt, before the handler.
//! - **The settle hook** ([`WorkerBuilder::on_settle`]) runs once per delivery after
//!   the ack covering it was sent (from the flusher task), or right after the requeue
//!   nack; so when the hook has seen a delivery, the broker has been told.
//! - **Off** (`coalesce_acks(false)`): one `basic.ack` per delivery, sent when it is
//!   settled, and the hook right after it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{Fuse, FutureExt};
use futures_util::StreamExt;
use idem_core::{
    Consumer, DeliveryMode, Disposition, Headers, SettleHook, Settled, Stats, WorkerHandle,
};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Connection, Event};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::acks::{AckCoalescer, AckSettler, Settle};
use crate::convert::{merge_headers, to_message};
use crate::crash;
use crate::endpoints::Endpoints;
use crate::error::Error;
use crate::publisher::publish_confirmed;
use crate::topology::{short, Topology};

/// Delays between tries of an unconfirmed retry or dead-letter copy.
const COPY_RETRY_DELAYS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
];
const RECONNECT_MIN: Duration = Duration::from_millis(200);
/// Default longest wait before a settled delivery's ack is sent.
const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(1);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

struct Shared {
    endpoints: Endpoints,
    tls: idem_core::TlsConfig,
    topology: Topology,
    consumer: Consumer,
    prefetch: u16,
    concurrency: u32,
    connection_name: String,
    shutdown_timeout: Duration,
    on_settle: Option<SettleHook>,
    acks: AckConfig,
    queue: ShortString,
    dlq: String,
    retry_queues: Vec<(Duration, String)>,
    #[cfg(feature = "prometheus")]
    prometheus: Option<std::net::SocketAddr>,
}

/// Configures a [`Worker`]. See [`Worker::builder`].
pub struct WorkerBuilder {
    endpoints: Endpoints,
    tls: idem_core::TlsConfig,
    topology: Topology,
    consumer: Consumer,
    prefetch: u16,
    concurrency: Option<usize>,
    connection_name: Option<String>,
    broker_timeout: Duration,
    shutdown_timeout: Duration,
    on_settle: Option<SettleHook>,
    coalesce_acks: bool,
    ack_flush_interval: Duration,
    ack_flush_batch: Option<usize>,
    #[cfg(feature = "prometheus")]
    prometheus: Option<std::net::SocketAddr>,
}

/// How the worker acks: coalesced (`flush` set) or one `basic.ack` per delivery.
#[derive(Clone, Copy, Debug)]
struct AckConfig {
    /// `(batch, interval)` when acks are coalesced.
    flush: Option<(usize, Duration)>,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("endpoints", &self.endpoints)
            .field("topology", &self.topology)
            .field("consumer", &self.consumer)
            .field("prefetch", &self.prefetch)
            .field("coalesce_acks", &self.coalesce_acks)
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    /// Most unacked deliveries (`basic.qos`), default 50, at least 1.
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Most handlers running at once; default and maximum: the prefetch.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = Some(concurrency.max(1));
        self
    }

    /// Connection name shown by the broker (default `idem:<consumer name>`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// The broker's `consumer_timeout` (default 30 min). The handler timeout and the
    /// dedup lease must be shorter; checked by [`build`](Self::build).
    pub fn broker_consumer_timeout(mut self, timeout: Duration) -> Self {
        self.broker_timeout = timeout;
        self
    }

    /// How long shutdown waits for in-flight handlers (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// TLS settings for an `amqps://` URL (CA file, client certificate): see
    /// [`crate::tls`]. Default: verified against the system roots.
    pub fn tls(mut self, tls: idem_core::TlsConfig) -> Self {
        self.tls = tls;
        self
    }

    /// Coalesced acks (default on): the worker acks runs of settled deliveries with
    /// one `basic.ack multiple=true`, see [Acks](self#acks) in the module docs. Off: one `basic.ack` per
    /// delivery, sent as soon as it is settled.
    pub fn coalesce_acks(mut self, on: bool) -> Self {
        self.coalesce_acks = on;
        self
    }

    /// With coalesced acks, the longest a settled delivery waits for its ack to be
    /// sent (default 1 ms; tokio's timer has a 1 ms resolution, so a wait can end up
    /// to one tick late). Zero: send the ack of whatever run is settled each time the
    /// flusher wakes up.
    pub fn ack_flush_interval(mut self, interval: Duration) -> Self {
        self.ack_flush_interval = interval;
        self
    }

    /// With coalesced acks, send the ack as soon as this many deliveries in a row are
    /// settled, without waiting for the interval. Default: a quarter of the prefetch
    /// (at least 1), so the broker keeps three quarters of its window in flight while
    /// acks are pending. Clamped to `1..=prefetch`.
    pub fn ack_flush_batch(mut self, batch: usize) -> Self {
        self.ack_flush_batch = Some(batch);
        self
    }

    /// Called once per delivery after it is settled on the wire: its ack (or the ack
    /// covering it, with coalesced acks) was sent, or it was handed back, or its copy
    /// was confirmed and the original acked. When the channel died first, the hook
    /// still runs once and the broker redelivers the message. Runs on the worker's
    /// tasks: keep it short (tests, custom metrics, benchmarks). The same hook type as
    /// the in-memory broker's ([`Settled`]).
    pub fn on_settle(mut self, hook: impl Fn(Settled<'_>) + Send + Sync + 'static) -> Self {
        self.on_settle = Some(Arc::new(hook));
        self
    }

    /// Serves the `metrics` of this process in the Prometheus text format at
    /// `http://<addr>/metrics` while the worker runs. Installs the global recorder.
    #[cfg(feature = "prometheus")]
    pub fn prometheus(mut self, addr: std::net::SocketAddr) -> Self {
        self.prometheus = Some(addr);
        self
    }

    /// Checks the configuration and builds the worker.
    ///
    /// Refuses a dedup retention shorter than the retry horizon *in broker time*
    /// ([`Error::RetentionTooShortForTiers`]): each backoff delay waits in the delay
    /// tier it is rounded to, which can be longer than the delay (base = cap = 20 min
    /// waits in the 30 min tier of the default tiers), see [`DelayTiers::horizon`](crate::DelayTiers::horizon).
    pub fn build(self) -> Result<Worker, Error> {
        self.consumer.check_broker_timeout(self.broker_timeout)?;
        if let Some(retention) = self.consumer.retention() {
            let horizon = self.topology.get_tiers().horizon(self.consumer.backoff());
            if retention < horizon {
                return Err(Error::RetentionTooShortForTiers { retention, horizon });
            }
        }
        self.topology.check_names()?;
        if let Some(limit) = self.topology.effective_delivery_limit() {
            if limit <= self.consumer.crash_limit() {
                tracing::warn!(
                    delivery_limit = limit,
                    crash_limit = self.consumer.crash_limit(),
                    "x-delivery-limit is not above the consumer's crash limit: the broker also counts deliveries a crashed worker only held prefetched, so it may dead-letter healthy neighbours of a crashing message; raise the delivery limit"
                );
            }
        }
        let concurrency = self
            .concurrency
            .unwrap_or(usize::from(self.prefetch))
            .min(usize::from(self.prefetch));
        let prefetch = usize::from(self.prefetch);
        let acks = AckConfig {
            flush: self.coalesce_acks.then(|| {
                let batch = self
                    .ack_flush_batch
                    .unwrap_or(prefetch / 4)
                    .clamp(1, prefetch);
                (batch, self.ack_flush_interval)
            }),
        };
        let retry_queues = self
            .topology
            .get_tiers()
            .as_slice()
            .iter()
            .map(|t| (*t, self.topology.retry_queue(*t)))
            .collect();
        let shared = Shared {
            queue: short(self.topology.queue())?,
            dlq: self.topology.dlq(),
            retry_queues,
            connection_name: self
                .connection_name
                .unwrap_or_else(|| format!("idem:{}", self.consumer.name())),
            endpoints: self.endpoints,
            tls: self.tls,
            topology: self.topology,
            consumer: self.consumer,
            prefetch: self.prefetch,
            concurrency: u32::try_from(concurrency).unwrap_or(u32::MAX),
            shutdown_timeout: self.shutdown_timeout,
            on_settle: self.on_settle,
            acks,
            #[cfg(feature = "prometheus")]
            prometheus: self.prometheus,
        };
        Ok(Worker {
            shared: Arc::new(shared),
        })
    }
}

/// Consumes one RabbitMQ queue with an idem [`Consumer`]. See the [module docs](self).
pub struct Worker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("endpoints", &self.shared.endpoints)
            .field("queue", &self.shared.topology.queue())
            .field("consumer", &self.shared.consumer)
            .finish_non_exhaustive()
    }
}

enum End {
    Shutdown,
    Lost,
    /// The consumer's circuit breaker opened.
    Paused,
}

/// Resolves when the consumer's circuit breaker opens (never without one).
async fn breaker_opens(shared: &Shared) {
    match shared.consumer.breaker() {
        Some(b) => b.wait_open().await,
        None => std::future::pending().await,
    }
}

impl Worker {
    /// A worker consuming `topology`'s queue (a queue name converts) with `consumer`,
    /// at `endpoints`: one URL, a comma-separated list or an [`Endpoints`] value
    /// (connects to the first that answers, and after a loss from the next one; see
    /// [`crate::endpoints`]).
    pub fn builder(
        endpoints: impl Into<Endpoints>,
        topology: impl Into<Topology>,
        consumer: Consumer,
    ) -> WorkerBuilder {
        WorkerBuilder {
            endpoints: endpoints.into(),
            tls: idem_core::TlsConfig::default(),
            topology: topology.into(),
            consumer,
            prefetch: 50,
            concurrency: None,
            connection_name: None,
            broker_timeout: Duration::from_secs(30 * 60), // RabbitMQ's default consumer_timeout
            shutdown_timeout: Duration::from_secs(30),
            on_settle: None,
            coalesce_acks: true,
            ack_flush_interval: ACK_FLUSH_INTERVAL,
            ack_flush_batch: None,
            #[cfg(feature = "prometheus")]
            prometheus: None,
        }
    }

    /// The consumer.
    pub fn consumer(&self) -> &Consumer {
        &self.shared.consumer
    }

    /// Runs the worker on its own tokio task until the handle asks it to stop (or is
    /// dropped): [`run`](Self::run) in the background. Joining the handle returns what
    /// `run` returns: the stats, or the error that stopped the first connection.
    ///
    /// ```no_run
    /// # async fn f(worker: idem_amqp::Worker) -> Result<(), idem_amqp::Error> {
    /// let handle = worker.spawn();
    /// // ... publish, serve, wait ...
    /// let stats = handle.shutdown_and_join().await?;
    /// println!("{stats}");
    /// # Ok(()) }
    /// ```
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn(self) -> WorkerHandle<Result<Stats, Error>> {
        WorkerHandle::spawn(|shutdown| self.run(shutdown.wait()))
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn run_until_signal(self) -> Result<Stats, Error> {
        self.run(crate::shutdown::signal()).await
    }

    /// Runs until `shutdown` completes, then shuts down gracefully.
    ///
    /// Fails only if the first connection or topology declaration fails (a wrong URL,
    /// credentials or queue arguments should stop a deployment); after that, lost
    /// connections are re-established until shutdown.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<Stats, Error> {
        let shared = self.shared;
        #[cfg(feature = "prometheus")]
        let _endpoint = match shared.prometheus {
            Some(addr) => Some(crate::prometheus::spawn_endpoint(addr).await?),
            None => None,
        };
        let shutdown = shutdown.fuse();
        let mut shutdown = std::pin::pin!(shutdown);
        let permits = Arc::new(Semaphore::new(shared.concurrency as usize));
        let mut connected_once = false;
        let mut backoff = RECONNECT_MIN;
        if let Some(breaker) = shared.consumer.breaker() {
            breaker.publish_gauge();
            // A store that is down at start opens the breaker: the worker then waits.
            tokio::select! {
                biased;
                _ = &mut shutdown => return Ok(shared.consumer.stats()),
                _ = breaker.check() => {}
            }
        }
        loop {
            if let (true, Some(breaker)) = (connected_once, shared.consumer.breaker()) {
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break,
                    _ = breaker.wait_closed() => {}
                }
            }
            let opened = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                s = Session::open(&shared) => s,
            };
            let session = match opened {
                Ok(s) => s,
                Err(e) if !connected_once => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "reconnect failed");
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                    continue;
                }
            };
            connected_once = true;
            backoff = RECONNECT_MIN;
            match session.consume(&shared, &permits, shutdown.as_mut()).await {
                End::Shutdown => break,
                End::Lost => tracing::warn!(
                    queue = %shared.topology.queue(),
                    "consumer lost its channel or connection; reconnecting"
                ),
                // The breaker logged why; the loop waits for it to close.
                End::Paused => {}
            }
        }
        drain(&permits, &shared).await;
        tracing::info!(queue = %shared.topology.queue(), stats = %shared.consumer.stats(), "worker stopped");
        Ok(shared.consumer.stats())
    }
}

/// Waits until no handler runs, at most the shutdown timeout.
async fn drain(permits: &Semaphore, shared: &Shared) {
    let all = permits.acquire_many(shared.concurrency);
    match tokio::time::timeout(shared.shutdown_timeout, all).await {
        Ok(_) => {}
        Err(_) => tracing::warn!(
            in_flight = shared.concurrency as usize - permits.available_permits(),
            "shutdown timeout passed with handlers still running; closing: the broker redelivers their messages"
        ),
    }
}

struct Session {
    conn: Connection,
    // Shared by the delivery tasks: one Arc clone per delivery instead of a Channel clone.
    publish: Arc<Channel>,
    consume: Channel,
    stream: lapin::Consumer,
    events: JoinHandle<()>,
    /// This channel's ack coalescer (tags restart with each channel); `None` when acks
    /// are sent one per delivery.
    acks: Option<AckCoalescer<Record>>,
}

/// What the settle hook needs, kept until the delivery's ack is sent (`None` without
/// a hook: nothing to keep).
type Record = Option<Done>;

/// A settled delivery, for the settle hook.
struct Done {
    message_id: Option<ShortString>,
    failed_before: u32,
    disposition: Disposition,
    /// Its dead-letter copy was confirmed: the consumer's dead-letter hook is told.
    dead_lettered: bool,
}

/// Runs the settle hook for `done` (the one call site of `on_settle`).
/// Also tells the consumer's dead-letter hook about a confirmed dead-letter copy.
fn report(shared: &Shared, done: Record) {
    let Some(done) = done else { return };
    let settled = Settled::new(
        done.message_id.as_ref().map(ShortString::as_str),
        done.failed_before,
        shared.topology.queue(),
        &done.disposition,
    );
    if let Some(hook) = &shared.on_settle {
        hook(settled);
    }
    if done.dead_lettered {
        shared.consumer.notify_dead_lettered(&settled, &shared.dlq);
    }
}

impl Session {
    async fn open(shared: &Arc<Shared>) -> Result<Session, Error> {
        let (conn, url) = shared
            .endpoints
            .connect_indexed(&shared.connection_name, &shared.tls)
            .await?;
        match Self::channels(shared, &conn).await {
            Ok((publish, consume, stream)) => {
                let events = tokio::spawn(log_events(conn.events_listener(), url));
                tracing::info!(queue = %shared.topology.queue(), prefetch = shared.prefetch, "consuming");
                let acks = shared.acks.flush.map(|(batch, interval)| {
                    let hooked = shared.clone();
                    AckCoalescer::spawn(consume.clone(), batch, interval, move |done| {
                        report(&hooked, done)
                    })
                });
                Ok(Session {
                    conn,
                    publish: Arc::new(publish),
                    consume,
                    stream,
                    events,
                    acks,
                })
            }
            Err(e) => {
                let _ = conn.close(200, "setup failed".into()).await;
                Err(e)
            }
        }
    }

    async fn channels(
        shared: &Shared,
        conn: &Connection,
    ) -> Result<(Channel, Channel, lapin::Consumer), Error> {
        let publish = conn
            .create_channel()
            .await
            .map_err(Error::amqp("channel.open"))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(Error::amqp("confirm.select"))?;
        if shared.topology.get_declare() {
            shared.topology.declare_on(&publish).await?;
        }
        let consume = conn
            .create_channel()
            .await
            .map_err(Error::amqp("channel.open"))?;
        consume
            .basic_qos(shared.prefetch, BasicQosOptions::default())
            .await
            .map_err(Error::amqp("basic.qos"))?;
        let stream = consume
            .basic_consume(
                shared.queue.clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::amqp("basic.consume"))?;
        Ok((publish, consume, stream))
    }

    async fn consume<F: Future<Output = ()>>(
        mut self,
        shared: &Arc<Shared>,
        permits: &Arc<Semaphore>,
        mut shutdown: Pin<&mut Fuse<F>>,
    ) -> End {
        let end = loop {
            let permit = tokio::select! {
                biased;
                _ = &mut shutdown => break End::Shutdown,
                _ = breaker_opens(shared) => break End::Paused,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break End::Shutdown,
                },
            };
            let next = tokio::select! {
                biased;
                _ = &mut shutdown => break End::Shutdown,
                _ = breaker_opens(shared) => break End::Paused,
                d = self.stream.next() => d,
            };
            match next {
                Some(Ok(delivery)) => {
                    // At-most-once acks each delivery before its handler: not coalesced.
                    let settler = match &self.acks {
                        Some(acks)
                            if shared.consumer.mode() != DeliveryMode::AtMostOnce
                                && acks.register(delivery.delivery_tag) =>
                        {
                            Some(acks.settler())
                        }
                        _ => None,
                    };
                    tokio::spawn(handle(
                        shared.clone(),
                        self.publish.clone(),
                        delivery,
                        settler,
                        permit,
                    ));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, queue = %shared.topology.queue(), "consumer error");
                    break End::Lost;
                }
                None => {
                    tracing::warn!(queue = %shared.topology.queue(), "consumer ended (cancelled by the broker or channel closed)");
                    break End::Lost;
                }
            }
        };
        if let End::Shutdown = end {
            tracing::info!(queue = %shared.topology.queue(), "shutting down: cancelling the consumer and finishing in-flight handlers");
            let tag = self.stream.tag();
            if let Err(e) = self
                .consume
                .basic_cancel(tag, BasicCancelOptions::default())
                .await
            {
                tracing::warn!(error = %e, "basic.cancel failed");
            }
            drain(permits, shared).await;
        }
        if let End::Paused = end {
            // Handlers in flight settle on this channel (a store failure is nacked
            // back, uncharged); closing then returns the prefetched deliveries.
            drain(permits, shared).await;
        }
        if let Some(acks) = self.acks.take() {
            match end {
                // The settled deliveries' acks go out before the channel closes.
                End::Shutdown | End::Paused => acks.close(shared.shutdown_timeout).await,
                // Nothing can be sent on a lost channel: the broker redelivers.
                End::Lost => acks.abandon(),
            }
        }
        self.close().await;
        end
    }

    async fn close(self) {
        self.events.abort();
        if self.conn.status().connected() {
            let _ = self.consume.close(200, "bye".into()).await;
            let _ = self.publish.close(200, "bye".into()).await;
            let _ = self.conn.close(200, "bye".into()).await;
        }
    }
}

async fn log_events(events: impl futures_util::Stream<Item = Event>, url: String) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Event::Error(e) => tracing::warn!(url = %url, error = %e, "RabbitMQ connection error"),
            Event::ConnectionBlocked(reason) => {
                tracing::warn!(url = %url, %reason, "RabbitMQ blocked the connection (resource alarm); publishes wait")
            }
            Event::ConnectionUnblocked => {
                tracing::info!(url = %url, "RabbitMQ unblocked the connection")
            }
            _ => {}
        }
    }
}

/// What the wire needs once a delivery's outcome is carried out.
enum Wire {
    /// Its ack is due (handled, duplicate, or its copy confirmed).
    Ack,
    /// Hand it back at once (`basic.nack requeue=true`).
    Requeue,
}

/// Runs one delivery and settles it. Holds its permit until settled.
async fn handle(
    shared: Arc<Shared>,
    publish: Arc<Channel>,
    delivery: Delivery,
    settler: Option<AckSettler<Record>>,
    _permit: OwnedSemaphorePermit,
) {
    let Delivery {
        delivery_tag,
        exchange,
        routing_key,
        redelivered,
        properties,
        data,
        acker,
        ..
    } = delivery;
    let body = Bytes::from(data);
    let queue = shared.topology.queue();
    let msg = to_message(
        &exchange,
        &routing_key,
        redelivered,
        &properties,
        body.clone(),
        queue,
    );
    let consumer = &shared.consumer;
    let at_most_once = consumer.mode() == DeliveryMode::AtMostOnce;
    if at_most_once {
        ack(&acker).await;
    }
    // Already read (and a malformed value logged) when the delivery was converted.
    let failed_before =
        idem_core::read::read_quiet::<u32>(&msg, idem_core::outcome::headers::ATTEMPTS)
            .unwrap_or(0);
    let over = crash::over_limit(
        &msg,
        consumer.name(),
        shared.topology.effective_delivery_limit(),
    );
    let disposition = match over {
        Some(over) if !at_most_once => over,
        _ => consumer.process(msg).await,
    };
    let wire = if at_most_once {
        None
    } else {
        Some(match &disposition {
            Disposition::Release { .. } => Wire::Requeue,
            // Dropped on purpose by the handler: acked, no copy.
            Disposition::Discard { .. } => Wire::Ack,
            Disposition::Ack { .. } => {
                #[cfg(feature = "failpoints")]
                if matches!(disposition, Disposition::Ack { duplicate: false }) {
                    crate::failpoints::hit(crate::failpoints::AFTER_COMMIT_BEFORE_ACK);
                }
                Wire::Ack
            }
            Disposition::Retry {
                delay,
                delay_kind,
                headers,
                ..
            } => {
                let tier = shared.topology.get_tiers().tier_for(*delay, *delay_kind);
                let target = shared
                    .retry_queues
                    .iter()
                    .find(|(t, _)| *t == tier)
                    .map_or(shared.dlq.as_str(), |(_, q)| q.as_str());
                forward(&publish, target, &body, &properties, headers, "retry").await
            }
            Disposition::DeadLetter { headers, .. } => {
                let dlq = shared.dlq.as_str();
                forward(&publish, dlq, &body, &properties, headers, "dead-letter").await
            }
        })
    };
    // The dead-letter hook is told only once the dead-letter copy is confirmed.
    let dead_lettered =
        matches!(wire, Some(Wire::Ack)) && matches!(disposition, Disposition::DeadLetter { .. });
    let done = (shared.on_settle.is_some() || dead_lettered).then(|| Done {
        message_id: properties.message_id().clone(),
        failed_before,
        disposition,
        dead_lettered,
    });
    match wire {
        None => report(&shared, done),
        Some(Wire::Ack) => match settler {
            // Reported by the flusher once the ack covering it is sent.
            Some(settler) => {
                if let Err(done) = settler.settle(delivery_tag, Settle::Ack(done)) {
                    // The session ended: the ack is dropped, the broker redelivers.
                    report(&shared, done.flatten());
                }
            }
            None => {
                ack(&acker).await;
                report(&shared, done);
            }
        },
        Some(Wire::Requeue) => {
            // Sent before the tag is settled: a later coalesced ack never covers it
            // while it is still outstanding.
            requeue(&acker).await;
            if let Some(settler) = settler {
                let _ = settler.settle(delivery_tag, Settle::Requeued);
            }
            report(&shared, done);
        }
    }
}

async fn ack(acker: &Acker) {
    match acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            "ack not sent: the channel is gone; the broker redelivers the message and dedup absorbs it"
        ),
        Err(e) => tracing::warn!(error = %e, "ack failed; the broker redelivers the message"),
    }
}

/// Publishes the copy with confirm; `Wire::Ack` once confirmed, see the module docs
/// for failures.
async fn forward(
    channel: &Channel,
    target: &str,
    body: &Bytes,
    properties: &BasicProperties,
    extra: &Headers,
    what: &'static str,
) -> Wire {
    let headers = match merge_headers(properties.headers().as_ref(), extra) {
        Ok(h) => h,
        Err(e) => {
            // Only idem's own header names are added, all short: cannot happen.
            tracing::error!(error = %e, "cannot build the {what} copy");
            return Wire::Requeue;
        }
    };
    let props = properties.clone().with_headers(headers);
    let mut delays = COPY_RETRY_DELAYS.iter();
    loop {
        match publish_confirmed(channel, "", target, body, props.clone()).await {
            Ok(()) => {
                #[cfg(feature = "failpoints")]
                crate::failpoints::hit(crate::failpoints::AFTER_RETRY_PUBLISH_BEFORE_ACK);
                return Wire::Ack;
            }
            Err(e) => {
                if !channel.status().connected() {
                    // If the consuming channel died too, the nack is not sent and the
                    // broker redelivers anyway; if it lives, the nack hands the
                    // original back instead of holding it (and, with coalesced acks,
                    // every later ack) until the channel closes.
                    tracing::warn!(error = %e, queue = target, "{what} copy not published and the publishing channel is gone; handing the original back");
                    return Wire::Requeue;
                }
                match delays.next() {
                    Some(delay) => {
                        tracing::warn!(error = %e, queue = target, retry_in = ?delay, "{what} copy not confirmed; retrying");
                        tokio::time::sleep(*delay).await;
                    }
                    None => {
                        tracing::error!(error = %e, queue = target, "{what} copy still not confirmed; requeueing the original");
                        return Wire::Requeue;
                    }
                }
            }
        }
    }
}

async fn requeue(acker: &Acker) {
    let options = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    match acker.nack(options).await {
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "nack failed; the broker redelivers the message when the channel closes")
        }
    }
}
