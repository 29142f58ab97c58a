//! [`Collector`]: gathers concurrent deliveries into batches, closed at the batch size
//! or the batch wait, and hands each delivery its own answer.
//!
//! Every delivery's task submits its message and waits for its answer; the batch runs
//! on a task of its own, so a delivery whose task is dropped only loses its answer
//! (the batch still settles the others). The pending batch holds at most one entry per
//! delivery in flight: memory stays bounded by the transport's prefetch.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use super::BatchConfig;
use crate::error::HandlerError;
use crate::handler::BoxFuture;
use crate::message::Message;

/// Runs one closed batch; answers one result per message, in order.
pub(crate) type RunBatch<O> =
    Arc<dyn Fn(Vec<Message>) -> BoxFuture<Vec<Result<O, HandlerError>>> + Send + Sync>;

type Reply<O> = oneshot::Sender<Result<O, HandlerError>>;

/// The batch ended without an answer for this message (its task was cancelled: the
/// runtime is shutting down). Transient: the message is retried.
#[derive(Debug, thiserror::Error)]
#[error("the batch this message was in ended without an outcome for it")]
pub struct BatchLost;

struct Pending<O> {
    items: Vec<(Message, Reply<O>)>,
    /// Bumped each time a batch closes: a timer armed for an earlier batch does nothing.
    generation: u64,
}

impl<O> Pending<O> {
    /// Closes the batch being collected: its items, and a new generation.
    fn close(&mut self) -> Vec<(Message, Reply<O>)> {
        self.generation = self.generation.wrapping_add(1);
        std::mem::take(&mut self.items)
    }
}

struct Shared<O> {
    run: RunBatch<O>,
    config: BatchConfig,
    pending: Mutex<Pending<O>>,
}

impl<O> Shared<O> {
    /// The pending batch (a panic while it was held left it consistent: take it over).
    fn pending(&self) -> MutexGuard<'_, Pending<O>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Collects messages into batches. Cheap to clone (clones share the pending batch).
pub(crate) struct Collector<O> {
    shared: Arc<Shared<O>>,
}

impl<O> Clone for Collector<O> {
    fn clone(&self) -> Self {
        Collector {
            shared: self.shared.clone(),
        }
    }
}

impl<O: Send + 'static> Collector<O> {
    pub(crate) fn new(config: BatchConfig, run: RunBatch<O>) -> Self {
        Collector {
            shared: Arc::new(Shared {
                run,
                config: BatchConfig {
                    size: config.size.max(1),
                    wait: config.wait,
                },
                pending: Mutex::new(Pending {
                    items: Vec::new(),
                    generation: 0,
                }),
            }),
        }
    }

    /// Adds `msg` to the batch being collected and waits for its own result. A crash
    /// suspect (see [`crate::crash::is_suspect`]) is a batch of its own, run at once.
    pub(crate) async fn submit(&self, msg: Message) -> Result<O, HandlerError> {
        let (reply, answer) = oneshot::channel();
        if crate::crash::is_suspect(&msg) {
            self.spawn_run(vec![(msg, reply)]);
        } else {
            let closed = {
                let mut p = self.shared.pending();
                p.items.push((msg, reply));
                if p.items.len() >= self.shared.config.size {
                    Some(p.close())
                } else {
                    if p.items.len() == 1 {
                        self.arm_timer(p.generation);
                    }
                    None
                }
            };
            if let Some(items) = closed {
                self.spawn_run(items);
            }
        }
        answer
            .await
            .unwrap_or_else(|_| Err(HandlerError::transient(BatchLost)))
    }

    /// Closes batch `generation` after the batch wait, unless it closed full before.
    fn arm_timer(&self, generation: u64) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.shared.config.wait).await;
            let items = {
                let mut p = this.shared.pending();
                if p.generation != generation || p.items.is_empty() {
                    return;
                }
                p.close()
            };
            this.spawn_run(items);
        });
    }

    fn spawn_run(&self, items: Vec<(Message, Reply<O>)>) {
        let run = self.shared.run.clone();
        tokio::spawn(async move {
            let (messages, replies): (Vec<_>, Vec<_>) = items.into_iter().unzip();
            let mut results = run(messages).await.into_iter();
            for reply in replies {
                let result = results
                    .next()
                    .unwrap_or_else(|| Err(HandlerError::transient(BatchLost)));
                // A caller that gave up only loses its answer.
                let _ = reply.send(result);
            }
        });
    }
}
