//! The consumer worker: consumes a work queue, runs each delivery through an
//! [`idem_core::Consumer`] and carries its [`Disposition`](idem_core::Disposition) out on the wire.
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
//! - **Readiness**: while it runs, the worker is a source of
//!   [`Readiness::global`](crate::readiness::Readiness::global) (or the registry given to
//!   [`WorkerBuilder::readiness`]), not ready without a broker connection, with its
//!   breaker open, or once its shutdown started; the listener of
//!   [`WorkerBuilder::prometheus`] serves it at `/ready`. With the `prometheus` feature it
//!   also samples its dead-letter queue's depth and age (see [`crate::health`]).
//! - **Shutdown**: when the shutdown future completes, the worker cancels its consumer
//!   (`basic.cancel`), lets in-flight handlers finish and settles them, up to the
//!   shutdown timeout (default 30 s), sends the pending coalesced ack, then closes.
//!   Prefetched deliveries that never reached a handler go back to the queue when the
//!   channel closes.
//!
//! # Dropping a worker
//!
//! A worker stops gracefully only when its shutdown future completes (or
//! [`WorkerHandle::shutdown`] is called). Dropping its `run` future instead (the task
//! running it is aborted, a `tokio::select!` takes another branch, the
//! [`WorkerHandle`] goes out of scope, a test times out) is a **hard stop**, and it
//! strands nothing:
//!
//! - every handler task the worker spawned is aborted with it, at its next `.await`:
//!   no ack, nack or copy is sent for it afterwards; an open inbox transaction is
//!   rolled back; a lease-store claim stays until its lease runs out, as after a
//!   crash (the redelivery is answered "busy" and retried after the lease's
//!   remaining time, without spending an attempt, and the crash-loop guard counts the
//!   start);
//! - the ack flusher stops without sending the pending coalesced ack;
//! - the connection is closed right away (from a task spawned by the drop), which
//!   hands every unacked delivery back to the queue for other consumers. Deliveries
//!   whose effect was already recorded come back as duplicates and are acked without
//!   running. A connection still being opened finishes opening on its own task and is
//!   closed at once (the same for a graceful stop that comes while it connects).
//!
//! A handler cut off mid-way may have done part of its work: the same case as a
//! crash, with the same answers (the inbox rolls back; a lease store runs the message
//! again). Use the graceful stop when in-flight handlers should finish.
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
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::FutureExt;
use idem_core::{Consumer, SettleHook, Stats, WorkerHandle};
use lapin::types::ShortString;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::endpoints::Endpoints;
use crate::error::Error;
use crate::topology::Topology;

mod builder;
mod lane;
mod session;
mod settle;
mod shared_conn;

use builder::AckConfig;
pub use builder::WorkerBuilder;
use session::Session;
pub(crate) use shared_conn::SharedConnection;

const RECONNECT_MIN: Duration = Duration::from_millis(200);
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
    #[cfg(feature = "prometheus")]
    dlq_sample_interval: Duration,
    readiness: crate::readiness::Readiness,
    health: Arc<crate::health::WorkerHealth>,
    /// The connection shared with other workers of a service, if any.
    shared_connection: Option<Arc<SharedConnection>>,
    /// Per-key lanes of an ordered worker.
    ordered: Option<lane::Ordered>,
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
    /// The consumer.
    pub fn consumer(&self) -> &Consumer {
        &self.shared.consumer
    }

    /// Runs the worker on its own tokio task until the handle asks it to stop:
    /// [`run`](Self::run) in the background. Joining the handle returns what `run`
    /// returns: the stats, or the error that stopped the first connection. Dropping
    /// the handle without a shutdown stops the worker at once, as described under
    /// [Dropping a worker](self#dropping-a-worker).
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
    /// Dropping this future before it completes (an aborted task, the losing branch
    /// of a `select!`) is a hard stop: see [Dropping a worker](self#dropping-a-worker).
    ///
    /// Fails only if the first connection or topology declaration fails (a wrong URL,
    /// credentials or queue arguments should stop a deployment); after that, lost
    /// connections are re-established until shutdown.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<Stats, Error> {
        // Registered before the listener serves: never a 200 before the worker is known.
        let ready = self.register_readiness();
        self.run_registered(ready, shutdown).await
    }

    /// The worker's readiness source, registered now (a [`Service`](crate::Service)
    /// registers every worker before its listener serves and its tasks start).
    pub(crate) fn register_readiness(&self) -> crate::readiness::Registration {
        let shared = &self.shared;
        let health = shared.health.clone();
        let breaker = shared.consumer.breaker().cloned();
        shared.readiness.register(
            crate::readiness::SourceKind::Consumer,
            shared.consumer.name(),
            move || health.reasons(breaker.as_ref()),
        )
    }

    /// [`run`](Self::run), with the readiness source `_ready` registered beforehand.
    pub(crate) async fn run_registered(
        self,
        _ready: crate::readiness::Registration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Stats, Error> {
        let shared = self.shared;
        #[cfg(feature = "prometheus")]
        let _listener = match shared.prometheus {
            Some(addr) => Some(crate::prometheus::listen(addr)?),
            None => None,
        };
        // The series alert rules use exist (at 0) before anything happens.
        #[cfg(feature = "prometheus")]
        crate::health::count_crash_loop(&shared.consumer, None);
        let health = shared.health.clone();
        // Not ready from the moment the shutdown starts.
        let shutdown = async move {
            shutdown.await;
            health.stopping();
        }
        .fuse();
        let mut shutdown = std::pin::pin!(shutdown);
        let permits = Arc::new(Semaphore::new(shared.concurrency as usize));
        // The handler tasks of every session. Owned by this future: when it is dropped
        // (or returns with handlers still running past the shutdown timeout), the set
        // aborts them, so none can settle anything on a worker that no longer exists.
        let mut tasks = JoinSet::new();
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
            // On its own task: a stop (or a hard stop) while it connects leaves it to
            // finish, and the session it opens is then dropped, which closes its
            // connection. Dropped mid-handshake instead, the connection could come up
            // with no handle left to close it.
            let opening = {
                let shared = shared.clone();
                tokio::spawn(async move { Session::open(&shared).await })
            };
            let opened = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                s = opening => match s {
                    Ok(s) => s,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    // Cancelled: the runtime is shutting down.
                    Err(_) => break,
                },
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
            match session
                .consume(&shared, &permits, &mut tasks, shutdown.as_mut())
                .await
            {
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
