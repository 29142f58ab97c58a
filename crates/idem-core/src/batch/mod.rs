//! Batch handlers: one handler call for many messages, each message keeping its own
//! outcome.
//!
//! A batch handler is an `async fn` whose arguments implement [`FromBatch`]: a
//! [`Batch<T>`] of any per-message extractor (`Batch<Json<Order>>`,
//! `Batch<Message>`), [`State`](crate::State), and the SQL inbox's `Tx` (the batch's
//! one transaction). Register it on the usual builder with
//! [`ConsumerBuilder::batch_handler`](crate::ConsumerBuilder::batch_handler).
//!
//! ```
//! use idem_core::batch::Batch;
//! use idem_core::{Consumer, Disposition, HandlerError, Json, Message, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::ConfigError> {
//! async fn handle(batch: Batch<Json<i64>>) -> Result<(), HandlerError> {
//!     batch
//!         .each(|item| async move {
//!             let Json(n) = item.into_inner();
//!             if n < 0 {
//!                 return Err(HandlerError::permanent("negative")); // this message only
//!             }
//!             Ok(())
//!         })
//!         .await
//! }
//!
//! let consumer = Consumer::builder("sums")
//!     .store(MemoryStore::new())
//!     .batch_size(10)
//!     .batch_handler(handle)?;
//! let (good, bad) = tokio::join!(
//!     consumer.process(Message::new("7").with_message_id("a")),
//!     consumer.process(Message::new("-1").with_message_id("b")),
//! );
//! assert_eq!(good, Disposition::Ack { duplicate: false });
//! assert!(matches!(bad, Disposition::DeadLetter { .. }));
//! # Ok(()) }
//! ```
//!
//! # How a batch forms
//!
//! Each delivery still enters the consumer on its own (the transport hands them over
//! concurrently, up to its prefetch). The consumer collects them and closes a batch
//! at [`BatchConfig::size`] messages (default [`DEFAULT_BATCH_SIZE`]) or
//! [`BatchConfig::wait`] after its first message (default [`DEFAULT_BATCH_WAIT`]),
//! whichever comes first. A batch never grows past the transport's prefetch, so set
//! the prefetch to at least the batch size (twice it keeps the next batch filling
//! while one runs). A redelivered message (a crash suspect, see [`crate::crash`]) is
//! a batch of its own and runs alone.
//!
//! # Outcomes
//!
//! Every message keeps its own outcome, which the consumer turns into its own
//! disposition exactly as for a per-message handler: an `Err` recorded for one
//! message ([`Batch::each`]'s closure, or [`Batch::fail`]) retries it alone with its
//! own backoff (transient), dead-letters it alone (permanent) or drops it (discard);
//! the others are acked. A duplicate is acked without reaching the handler. A message
//! whose extractor fails (a body that is not JSON) gets the extractor's error and is
//! left out of the batch the handler sees. If the handler returns an `Err` itself (or
//! panics, or runs past the handler timeout), the whole batch failed: every message
//! is retried, each charged one attempt, whatever the error's kind.
//!
//! # Per-message work and bulk work
//!
//! [`Batch::each`] runs a closure per message, in order. Under the SQL transactional
//! inbox each run is wrapped in a savepoint of the batch's one transaction: a message
//! that fails has its writes rolled back to the savepoint, the others' are kept and
//! commit together. A handler that instead writes the whole batch in one statement
//! (a multi-row `INSERT`, a `COPY`) has no savepoint between messages: it must leave
//! out of that statement the messages it fails (check them first, and mark them with
//! [`Batch::fail`]), and if the statement itself fails it must return an error for
//! the whole batch (the transaction is rolled back and every message retried).

mod collector;
mod handler;
pub(crate) mod plumbing;
#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::error::{HandlerError, IntoHandlerResult};
use crate::handler::FromMessage;
use crate::message::Message;

pub use collector::BatchLost;
pub(crate) use collector::Collector;
pub use handler::{BatchHandler, BatchInput, BatchRunner, FromBatch};
pub(crate) use plumbing::ItemScope;

/// Default most messages in one batch.
pub const DEFAULT_BATCH_SIZE: usize = 50;

/// Default longest wait, from a batch's first message, before it closes short.
pub const DEFAULT_BATCH_WAIT: Duration = Duration::from_millis(20);

/// When a batch closes: at `size` messages or `wait` after its first, whichever comes
/// first. Set through [`ConsumerBuilder::batch_size`](crate::ConsumerBuilder::batch_size)
/// and [`ConsumerBuilder::batch_wait`](crate::ConsumerBuilder::batch_wait).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchConfig {
    /// Most messages in one batch (at least 1).
    pub size: usize,
    /// Longest wait from a batch's first message.
    pub wait: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            size: DEFAULT_BATCH_SIZE,
            wait: DEFAULT_BATCH_WAIT,
        }
    }
}

/// The outcomes recorded for a batch's messages (`None`: no failure recorded).
#[derive(Default)]
pub(crate) struct Outcomes(Mutex<Vec<Option<HandlerError>>>);

impl Outcomes {
    fn new(n: usize) -> Self {
        Outcomes(Mutex::new((0..n).map(|_| None).collect()))
    }

    pub(crate) fn set(&self, index: usize, err: HandlerError) {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = all.get_mut(index) {
            *slot = Some(err);
        }
    }

    fn failed(&self, index: usize) -> bool {
        let all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        all.get(index).is_some_and(Option::is_some)
    }

    fn take(&self) -> Vec<Option<HandlerError>> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// One message of a [`Batch`]: the value its extractor gave, and the message.
pub struct BatchItem<T> {
    value: T,
    msg: Message,
    index: usize,
}

impl<T> fmt::Debug for BatchItem<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchItem")
            .field("index", &self.index)
            .field("message_id", &self.msg.properties.message_id)
            .finish_non_exhaustive()
    }
}

impl<T> BatchItem<T> {
    /// The extracted value.
    pub fn into_inner(self) -> T {
        self.value
    }

    /// The message (headers, properties, its extensions: the dedup stage's
    /// [`IdempotencyKey`](crate::IdempotencyKey), the inbox's per-message `Tx`).
    pub fn message(&self) -> &Message {
        &self.msg
    }

    /// Another extractor on this message, e.g. its `IdempotencyKey` or the SQL
    /// inbox's `Tx` (the batch's transaction, scoped to this message's key).
    pub fn extract<E: FromMessage<()>>(&self) -> Result<E, HandlerError> {
        E::from_message(&self.msg, &())
    }

    /// The message's position in the batch the consumer collected.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl<T> Deref for BatchItem<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// The messages of a batch, each extracted with `T` (any [`FromMessage`] extractor).
/// See the [module docs](self).
pub struct Batch<T> {
    items: Vec<BatchItem<T>>,
    outcomes: Arc<Outcomes>,
    scope: Option<Arc<dyn ItemScope>>,
}

impl<T> fmt::Debug for Batch<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("len", &self.items.len())
            .finish_non_exhaustive()
    }
}

impl<T> Batch<T> {
    /// How many messages the handler sees (those whose extractor failed are left out).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the handler sees no message.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The messages, in arrival order.
    pub fn items(&self) -> &[BatchItem<T>] {
        &self.items
    }

    /// Iterates over the messages.
    pub fn iter(&self) -> std::slice::Iter<'_, BatchItem<T>> {
        self.items.iter()
    }

    /// Records a failure for one message, for handlers that do bulk work (see the
    /// [module docs](self#per-message-work-and-bulk-work)): that message alone is
    /// retried, dead-lettered or dropped, as `err` says. Under the SQL inbox nothing
    /// is rolled back for it: do not write its effects.
    pub fn fail(&self, item: &BatchItem<T>, err: impl Into<HandlerError>) {
        self.outcomes.set(item.index, err.into());
    }

    /// Whether a failure was recorded for `item`.
    pub fn is_failed(&self, item: &BatchItem<T>) -> bool {
        self.outcomes.failed(item.index)
    }

    /// Runs `work` on each message in turn, recording its own outcome: `Ok` (or a
    /// discard) keeps the message's writes, any other error undoes them (under the SQL
    /// inbox, a savepoint per message) and retries or dead-letters that message alone.
    /// Messages already failed with [`fail`](Self::fail) are skipped. Returns an error
    /// only when the per-message scope itself fails (the inbox's database): the
    /// handler should return it, which fails the whole batch.
    pub async fn each<F, Fut>(self, mut work: F) -> Result<(), HandlerError>
    where
        F: FnMut(BatchItem<T>) -> Fut,
        Fut: Future,
        Fut::Output: IntoHandlerResult,
    {
        let Batch {
            items,
            outcomes,
            scope,
        } = self;
        for item in items {
            let index = item.index;
            if outcomes.failed(index) {
                continue;
            }
            if let Some(scope) = &scope {
                scope.enter().await?;
            }
            let result = work(item).await.into_handler_result();
            let keep = match &result {
                Ok(()) => true,
                Err(e) => e.is_discard(),
            };
            if let Some(scope) = &scope {
                scope.leave(keep).await?;
            }
            if let Err(e) = result {
                outcomes.set(index, e);
            }
        }
        Ok(())
    }
}

impl<T> IntoIterator for Batch<T> {
    type Item = BatchItem<T>;
    type IntoIter = std::vec::IntoIter<BatchItem<T>>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

impl<T: FromMessage<S> + Send, S> FromBatch<S> for Batch<T> {
    fn from_batch(input: &BatchInput, state: &S) -> Result<Self, HandlerError> {
        let mut items = Vec::with_capacity(input.messages.len());
        for (index, msg) in input.messages.iter().enumerate() {
            if input.outcomes.failed(index) {
                continue;
            }
            match T::from_message(msg, state) {
                Ok(value) => items.push(BatchItem {
                    value,
                    msg: msg.clone(),
                    index,
                }),
                Err(e) => input.outcomes.set(index, e),
            }
        }
        Ok(Batch {
            items,
            outcomes: input.outcomes.clone(),
            scope: input.scope.clone(),
        })
    }
}
