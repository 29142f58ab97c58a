//! What a dedup stage that admits whole batches (the SQL inbox) needs from the batch
//! machinery. Public only through [`crate::__private`]: not part of the API.

use std::sync::Arc;

use super::{BatchConfig, BatchInput, Collector};
use crate::error::HandlerError;
use crate::handler::BoxFuture;
use crate::message::{Extensions, Message};

/// What a dedup stage wraps around each message's work in a batch (the SQL inbox:
/// a savepoint). Called by [`Batch::each`](super::Batch::each): `enter` before a message's closure,
/// `leave(keep)` after it (`keep` false: undo the message's writes).
pub trait ItemScope: Send + Sync + 'static {
    /// Before one message's work.
    fn enter(&self) -> BoxFuture<Result<(), HandlerError>>;
    /// After it: keep its writes, or undo them.
    fn leave(&self, keep: bool) -> BoxFuture<Result<(), HandlerError>>;
}

/// Copies of a failure that hit a whole batch (a commit that failed), one per
/// message: each retries its message (a store failure stays one).
pub fn whole_batch_failure(err: &HandlerError, n: usize) -> Vec<HandlerError> {
    (0..n).map(|_| err.batch_copy()).collect()
}

/// The per-message service of a dedup stage that admits whole batches: collects the
/// messages into batches (as [`BatchConfig`] says) and runs each closed batch with
/// `run`, which answers one result per message, in order. For
/// [`Deduplicate::wrap_batch`](crate::consumer::Deduplicate::wrap_batch).
pub fn collected<F>(config: BatchConfig, run: F) -> crate::consumer::DedupedService
where
    F: Fn(Vec<Message>) -> BoxFuture<Vec<Result<crate::Processed, HandlerError>>>
        + Send
        + Sync
        + 'static,
{
    let collector = Collector::new(config, Arc::new(run));
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |msg: Message| {
        let collector = collector.clone();
        async move { collector.submit(msg).await }
    }))
}

/// `input` with `scope` wrapped around each message's work by [`Batch::each`](super::Batch::each).
pub fn with_scope(input: BatchInput, scope: Arc<dyn ItemScope>) -> BatchInput {
    input.with_scope(scope)
}

/// The batch-wide values of `input`, to set (the SQL inbox puts its transaction there).
pub fn extensions_mut(input: &mut BatchInput) -> &mut Extensions {
    input.extensions_mut()
}
