//! [`BatchHandler`]: async functions over a batch, and [`BatchRunner`], which calls
//! one and turns its result into one outcome per message.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use super::{BatchConfig, ItemScope, Outcomes};
use crate::classify::{resolve, Classify, PanicError};
use crate::error::{HandlerError, HandlerTimeoutError, IntoHandlerResult};
use crate::handler::{BoxFuture, State};
use crate::message::{Extensions, Message};

/// The messages of one batch as the handler's extractors see them, with what the
/// dedup stage adds for the whole batch (the SQL inbox's transaction).
pub struct BatchInput {
    pub(super) messages: Vec<Message>,
    pub(super) extensions: Extensions,
    pub(super) outcomes: Arc<Outcomes>,
    pub(super) scope: Option<Arc<dyn ItemScope>>,
}

impl std::fmt::Debug for BatchInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchInput")
            .field("messages", &self.messages.len())
            .finish_non_exhaustive()
    }
}

impl BatchInput {
    /// A batch of `messages`, with no batch-wide extensions and no per-message scope.
    pub fn new(messages: Vec<Message>) -> Self {
        let outcomes = Arc::new(Outcomes::new(messages.len()));
        BatchInput {
            messages,
            extensions: Extensions::default(),
            outcomes,
            scope: None,
        }
    }

    /// The messages, in arrival order.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Batch-wide values set by the dedup stage (the SQL inbox's transaction).
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// Mutable batch-wide values, for dedup stages.
    pub(crate) fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }

    /// What [`Batch::each`](super::Batch::each) wraps around each message's work.
    pub(crate) fn with_scope(mut self, scope: Arc<dyn ItemScope>) -> Self {
        self.scope = Some(scope);
        self
    }
}

/// An argument of a batch handler, read from the whole batch. Implemented by
/// [`Batch<T>`](super::Batch), [`State`], and the SQL inbox's `Tx`.
pub trait FromBatch<S>: Sized {
    /// Extracts the value. An error fails the whole batch (every message retried).
    fn from_batch(input: &BatchInput, state: &S) -> Result<Self, HandlerError>;
}

impl<S: Clone> FromBatch<S> for State<S> {
    fn from_batch(_input: &BatchInput, state: &S) -> Result<Self, HandlerError> {
        Ok(State(state.clone()))
    }
}

/// An async function usable as a batch handler: up to four [`FromBatch`] arguments,
/// returning `()` or `Result<(), E>` with `E: Into<HandlerError>` (an `Err` fails
/// the whole batch; per-message outcomes are recorded through
/// [`Batch`](super::Batch)).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a valid idem batch handler",
    label = "not an idem batch handler",
    note = "a batch handler is an `async fn` (Clone + Send + Sync, with a Send future) of up to 4 arguments, each implementing `FromBatch` (`Batch<T>`, `State<S>`, the inbox's `Tx`), returning `()` or `Result<(), E>` with `E: Into<HandlerError>`"
)]
pub trait BatchHandler<T, S>: Clone + Send + Sync + Sized + 'static {
    /// Runs the handler on a batch.
    fn call(self, input: BatchInput, state: S) -> BoxFuture<Result<(), HandlerError>>;
}

macro_rules! impl_batch_handler {
    ($($ty:ident),*) => {
        crate::handler::impl_fn_handler!(BatchHandler, BatchInput, FromBatch::from_batch; $($ty),*);
    };
}

impl_batch_handler!(T1);
impl_batch_handler!(T1, T2);
impl_batch_handler!(T1, T2, T3);
impl_batch_handler!(T1, T2, T3, T4);

type CallFn = dyn Fn(BatchInput) -> BoxFuture<Result<(), HandlerError>> + Send + Sync;

/// A consumer's batch handler with its state, classifier and timeout: runs one batch
/// and answers one result per message. Dedup stages that admit a whole batch at once
/// (the SQL inbox) call it through
/// [`Deduplicate::wrap_batch`](crate::consumer::Deduplicate::wrap_batch). Cheap to
/// clone.
#[derive(Clone)]
pub struct BatchRunner {
    call: Arc<CallFn>,
    classify: Arc<dyn Classify>,
    timeout: Duration,
    config: BatchConfig,
}

impl std::fmt::Debug for BatchRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchRunner")
            .field("timeout", &self.timeout)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl BatchRunner {
    pub(crate) fn new<H, T, S>(
        handler: H,
        state: S,
        classify: Arc<dyn Classify>,
        timeout: Duration,
        config: BatchConfig,
    ) -> Self
    where
        H: BatchHandler<T, S>,
        S: Clone + Send + Sync + 'static,
    {
        BatchRunner {
            call: Arc::new(move |input| handler.clone().call(input, state.clone())),
            classify,
            timeout,
            config,
        }
    }

    /// When batches close.
    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// Runs the handler on `input` within the handler timeout; answers one result
    /// per message, in order, classified. A handler error, panic or timeout fails
    /// every message with a copy of it that retries the message.
    pub async fn run(&self, input: BatchInput) -> Vec<Result<(), HandlerError>> {
        let n = input.messages.len();
        let outcomes = input.outcomes.clone();
        let call = self.call.clone();
        let fut = std::panic::catch_unwind(AssertUnwindSafe(|| call(input)));
        let ran = async {
            match fut {
                Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
                Err(panic) => Err(panic),
            }
        };
        let whole = match tokio::time::timeout(self.timeout, ran).await {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(e),
            Ok(Err(panic)) => Some(HandlerError::transient(PanicError(
                crate::classify::panic_message(&*panic),
            ))),
            Err(_) => Some(HandlerError::transient(HandlerTimeoutError {
                timeout: self.timeout,
            })),
        };
        if let Some(e) = whole {
            let e = self.classified(e);
            tracing::info!(messages = n, error = %e, "batch handler failed as a whole; retrying each message");
            return (0..n).map(|_| Err(e.batch_copy())).collect();
        }
        let mut recorded = outcomes.take();
        recorded.resize_with(n, || None);
        recorded
            .into_iter()
            .map(|o| match o {
                None => Ok(()),
                Some(e) => Err(self.classified(e)),
            })
            .collect()
    }

    fn classified(&self, e: HandlerError) -> HandlerError {
        e.classify_with(|err| resolve(self.classify.as_ref(), err))
    }
}
