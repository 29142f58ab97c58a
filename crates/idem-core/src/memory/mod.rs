//! An in-memory broker with the consumer semantics of the RabbitMQ transport:
//! prefetch-bounded concurrent delivery, ack after the handler, delayed retry copies
//! and a dead-letter queue `<queue>.dlq`, both carrying the headers the
//! [`Disposition`] names (the same ones the RabbitMQ worker writes), the same settle
//! hook type ([`Settled`]) and the same way to run in the background
//! ([`MemoryWorker::spawn`]). The embedded default: the quickstart and the
//! middleware's tests run on it with no services.
//!
//! It keeps messages in process memory: nothing survives a restart. Delays are exact
//! (no tiers) since there is no broker to spare timers for.
//!
//! ```
//! use idem_core::memory::MemoryBroker;
//! use idem_core::{Consumer, Message, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::ConfigError> {
//! async fn handle() {}
//! let broker = MemoryBroker::new();
//! broker.publish("orders", Message::new("{}").with_message_id("o-1"));
//! broker.publish("orders", Message::new("{}").with_message_id("o-1"));
//! let consumer = Consumer::builder("orders").store(MemoryStore::new()).handler(handle)?;
//! let stats = broker.worker("orders", consumer).run_until_idle().await;
//! assert_eq!((stats.processed, stats.duplicates), (1, 1));
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, Semaphore};

use crate::consumer::{Consumer, DeliveryMode, Stats};
use crate::message::Message;
use crate::outcome::{Disposition, SettleHook, Settled};
use crate::run::WorkerHandle;

/// Suffix of a queue's dead-letter queue.
pub const DLQ_SUFFIX: &str = ".dlq";

#[derive(Default)]
struct Queue {
    ready: VecDeque<Message>,
    delayed: usize,
}

#[derive(Default)]
struct Shared {
    queues: Mutex<HashMap<String, Queue>>,
    changed: Notify,
}

/// An in-memory broker. Cloning shares the queues.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Queue names with the number of ready messages in each.
        let queues = self.queues();
        let mut names: Vec<_> = queues
            .iter()
            .map(|(n, q)| (n.clone(), q.ready.len()))
            .collect();
        drop(queues);
        names.sort();
        f.debug_struct("MemoryBroker")
            .field("queues", &names)
            .finish()
    }
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    fn queues(&self) -> MutexGuard<'_, HashMap<String, Queue>> {
        // Every critical section is a single push/pop: a poisoned lock holds no torn state.
        self.shared.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a message to `queue` (created on first use), as if published to the
    /// default exchange with routing key `queue`.
    pub fn publish(&self, queue: &str, mut msg: Message) {
        // The current span's trace context, unless the message has one (feature `otel`).
        #[cfg(feature = "otel")]
        crate::otel::inject_current(&mut msg.headers);
        msg.delivery.exchange.clear();
        msg.delivery.routing_key = queue.to_owned();
        self.push(queue, msg);
    }

    fn push(&self, queue: &str, mut msg: Message) {
        msg.delivery.queue = queue.to_owned();
        self.enqueue(queue, msg, false);
    }

    /// Adds `msg` to `queue` (at its head with `front`), without its extensions, and
    /// wakes the waiting consumers.
    fn enqueue(&self, queue: &str, mut msg: Message, front: bool) {
        msg.extensions = Default::default();
        let mut queues = self.queues();
        let ready = &mut queues.entry(queue.to_owned()).or_default().ready;
        if front {
            ready.push_front(msg);
        } else {
            ready.push_back(msg);
        }
        drop(queues);
        self.shared.changed.notify_waiters();
    }

    /// Number of ready messages in `queue`.
    pub fn len(&self, queue: &str) -> usize {
        self.queues().get(queue).map_or(0, |q| q.ready.len())
    }

    /// Whether `queue` has no ready message.
    pub fn is_empty(&self, queue: &str) -> bool {
        self.len(queue) == 0
    }

    /// A copy of the ready messages of `queue`, in order; the queue is unchanged.
    pub fn peek_all(&self, queue: &str) -> Vec<Message> {
        self.queues()
            .get(queue)
            .map(|q| q.ready.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Puts a handed-back delivery at the head of its queue, as RabbitMQ does with a
    /// requeued one.
    fn requeue(&self, queue: &str, mut msg: Message) {
        msg.delivery.redelivered = true;
        self.enqueue(queue, msg, true);
    }

    fn pop(&self, queue: &str) -> Option<Message> {
        self.queues().get_mut(queue)?.ready.pop_front()
    }

    fn idle(&self, queue: &str) -> bool {
        self.queues()
            .get(queue)
            .is_none_or(|q| q.ready.is_empty() && q.delayed == 0)
    }

    fn schedule(&self, queue: &str, msg: Message, delay: std::time::Duration) {
        self.queues().entry(queue.to_owned()).or_default().delayed += 1;
        let broker = self.clone();
        let queue = queue.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(q) = broker.queues().get_mut(&queue) {
                q.delayed -= 1;
            }
            broker.push(&queue, msg);
        });
    }

    /// A worker consuming `queue` with `consumer`.
    pub fn worker(&self, queue: &str, consumer: Consumer) -> MemoryWorker {
        MemoryWorker {
            broker: self.clone(),
            queue: queue.to_owned(),
            consumer,
            prefetch: 10,
            on_settle: None,
        }
    }
}

/// Consumes one queue of a [`MemoryBroker`]. See the [module docs](self).
pub struct MemoryWorker {
    broker: MemoryBroker,
    queue: String,
    consumer: Consumer,
    prefetch: usize,
    on_settle: Option<SettleHook>,
}

impl std::fmt::Debug for MemoryWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryWorker")
            .field("queue", &self.queue)
            .field("consumer", &self.consumer)
            .field("prefetch", &self.prefetch)
            .field("on_settle", &self.on_settle.is_some())
            .finish_non_exhaustive()
    }
}

impl MemoryWorker {
    /// Most deliveries in flight (unacked) at once; also the concurrency. Default 10.
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Called after each delivery is settled, with its message id, queue and
    /// disposition: the same hook type as the RabbitMQ worker's.
    pub fn on_settle(mut self, hook: impl Fn(Settled<'_>) + Send + Sync + 'static) -> Self {
        self.on_settle = Some(Arc::new(hook));
        self
    }

    /// Consumes until the queue is empty, nothing is in flight and no retry is
    /// pending; returns the consumer's stats.
    pub async fn run_until_idle(self) -> Stats {
        self.run_inner(None::<std::future::Pending<()>>).await
    }

    /// Consumes until `shutdown` completes, then lets in-flight deliveries finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Stats {
        self.run_inner(Some(shutdown)).await
    }

    /// Runs the worker on its own tokio task until the handle asks it to stop (or is
    /// dropped): [`run`](Self::run) in the background. Joining the handle returns the
    /// consumer's stats.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn(self) -> WorkerHandle<Stats> {
        WorkerHandle::spawn(|shutdown| self.run(shutdown.wait()))
    }

    async fn run_inner<F: Future<Output = ()>>(self, shutdown: Option<F>) -> Stats {
        let until_idle = shutdown.is_none();
        let mut shutdown = std::pin::pin!(async move {
            match shutdown {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        });
        let permits = Arc::new(Semaphore::new(self.prefetch));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let shared = self.broker.shared.clone();
        let breaker = self.consumer.breaker().cloned();
        if let Some(b) = &breaker {
            b.publish_gauge();
            tokio::select! {
                _ = b.check() => {}
                _ = &mut shutdown => return self.consumer.stats(),
            }
        }
        'outer: loop {
            // Paused: take nothing while the circuit breaker is open.
            if let Some(b) = &breaker {
                tokio::select! {
                    _ = b.wait_closed() => {}
                    _ = &mut shutdown => break,
                }
            }
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = &mut shutdown => break,
            };
            let msg = loop {
                let changed = shared.changed.notified();
                let mut changed = std::pin::pin!(changed);
                changed.as_mut().enable();
                if let Some(m) = self.broker.pop(&self.queue) {
                    break m;
                }
                if until_idle
                    && in_flight.load(Ordering::SeqCst) == 0
                    && self.broker.idle(&self.queue)
                {
                    break 'outer;
                }
                tokio::select! {
                    _ = changed => {}
                    _ = &mut shutdown => break 'outer,
                }
            };
            in_flight.fetch_add(1, Ordering::SeqCst);
            let task = Delivery {
                broker: self.broker.clone(),
                queue: self.queue.clone(),
                consumer: self.consumer.clone(),
                on_settle: self.on_settle.clone(),
            };
            let in_flight = in_flight.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                task.handle(msg).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
                shared.changed.notify_waiters();
            });
        }
        // Graceful: wait for in-flight deliveries to settle.
        let _all = permits.acquire_many(self.prefetch as u32).await;
        self.consumer.stats()
    }
}

struct Delivery {
    broker: MemoryBroker,
    queue: String,
    consumer: Consumer,
    on_settle: Option<SettleHook>,
}

impl Delivery {
    /// Reads the delivery's context (its one reading of the attempt headers, as the
    /// RabbitMQ transport does when it converts a delivery), runs it, then merges the
    /// disposition's copy headers onto the original's and publishes the copy, as the
    /// RabbitMQ worker does.
    async fn handle(self, mut msg: Message) {
        msg.context = crate::consumer::DeliveryContext::read(&msg);
        let original = msg.clone();
        let disposition = self.consumer.process(msg).await;
        let dlq = format!("{}{DLQ_SUFFIX}", self.queue);
        if self.consumer.mode() != DeliveryMode::AtMostOnce {
            match &disposition {
                Disposition::Ack { .. } | Disposition::Discard { .. } => {}
                Disposition::Retry { delay, headers, .. } => {
                    let mut copy = original.clone();
                    crate::outcome::copy_onto(&mut copy.headers, headers);
                    copy.delivery.redelivered = false;
                    self.broker.schedule(&self.queue, copy, *delay);
                }
                Disposition::Release { .. } => {
                    self.broker.requeue(&self.queue, original.clone());
                }
                Disposition::DeadLetter { headers, .. } => {
                    let mut copy = original.clone();
                    crate::outcome::copy_onto(&mut copy.headers, headers);
                    self.broker.push(&dlq, copy);
                }
            }
        }
        let settled = Settled::new(
            original.properties.message_id.as_deref(),
            original.context.failed_before(),
            &self.queue,
            &disposition,
        );
        if let Some(hook) = &self.on_settle {
            hook(settled);
        }
        // The copy is in the dead-letter queue (pushed above).
        self.consumer.notify_dead_lettered(&settled, &dlq);
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod recover_tests;
