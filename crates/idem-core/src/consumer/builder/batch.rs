//! The builder's batch settings and its batch-handler finishers (see [`crate::batch`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tower::util::{BoxCloneSyncService, BoxService};
use tower::{Layer, ServiceExt};

use super::{ConsumerBuilder, HandlerStack};
use crate::batch::{BatchHandler, BatchInput, BatchRunner, Collector};
use crate::consumer::{ClassifiedService, ConfigError, Consumer, DedupedService};
use crate::dedup::Processed;
use crate::error::BoxError;
use crate::handler::{HandlerState, SharedService};
use crate::message::Message;

impl ConsumerBuilder {
    /// Most messages in one batch of a [batch handler](crate::batch) (default
    /// [`DEFAULT_BATCH_SIZE`](crate::batch::DEFAULT_BATCH_SIZE), 50; at least 1).
    /// Keep the transport's prefetch at least this high, or batches close on the
    /// [wait](Self::batch_wait) short of it.
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch.size = size.max(1);
        self
    }

    /// Longest wait, from a batch's first message, before the batch closes short of
    /// its size (default [`DEFAULT_BATCH_WAIT`](crate::batch::DEFAULT_BATCH_WAIT),
    /// 20 ms). It is the most a message waits for company when traffic is light.
    pub fn batch_wait(mut self, wait: Duration) -> Self {
        self.batch.wait = wait;
        self
    }

    /// Finishes with a [batch handler](crate::batch) that uses no shared state.
    /// The handler timeout applies to each batch as a whole.
    pub fn batch_handler<H, T>(self, handler: H) -> Result<Consumer, ConfigError>
    where
        H: BatchHandler<T, ()>,
        T: 'static,
    {
        self.batch_handler_with_state(handler, ())
    }

    /// Finishes with a [batch handler](crate::batch) and the state its
    /// [`State`](crate::State) argument reads.
    ///
    /// Tower layers given to [`layer`](Self::layer) wrap each message on its way
    /// into its batch (a rate limit counts messages, a load shedder refuses single
    /// messages): with a stage that admits whole batches (a lease store's
    /// [`DedupLayer`](crate::DedupLayer), the SQL inbox on PostgreSQL), before the
    /// batch's admission; under a per-message stage (the SQL inbox on SQLite and
    /// MySQL), after the message's own admission.
    pub fn batch_handler_with_state<H, T, S>(
        mut self,
        handler: H,
        state: S,
    ) -> Result<Consumer, ConfigError>
    where
        H: BatchHandler<T, S>,
        T: 'static,
        S: HandlerState,
    {
        let (name, mode) = self.check()?;
        let runner = BatchRunner::new(
            handler,
            state,
            self.classifier.policy(),
            self.handler_timeout,
            self.batch,
        );
        let whole = self
            .dedup
            .as_ref()
            .and_then(|stage| stage.wrap_batch(name.as_str().into(), runner.clone()));
        let service = match whole {
            Some(service) if self.layers.is_empty() => service,
            Some(service) => self.layered_stage(service),
            None => {
                let classified = self.entry_stack(runner);
                match &self.dedup {
                    Some(stage) => stage.wrap(name.as_str().into(), classified),
                    None => {
                        BoxCloneSyncService::new(classified.map_response(|()| Processed::Handled))
                    }
                }
            }
        };
        self.assemble(name, mode, service)
    }

    /// Each message's way into the batch under a per-message dedup stage: submitted
    /// to the collector, through the builder's tower layers if any (outermost first).
    fn entry_stack(&mut self, runner: BatchRunner) -> ClassifiedService {
        let collector = Collector::new(
            self.batch,
            Arc::new(move |messages: Vec<Message>| {
                let runner = runner.clone();
                Box::pin(async move { runner.run(BatchInput::new(messages)).await })
            }),
        );
        let submit = tower::service_fn(move |msg: Message| {
            let collector = collector.clone();
            async move { collector.submit(msg).await.map_err(BoxError::from) }
        });
        let layers = std::mem::take(&mut self.layers);
        let stack = if layers.is_empty() {
            BoxCloneSyncService::new(submit)
        } else {
            let base: HandlerStack = BoxService::new(submit);
            BoxCloneSyncService::new(SharedService::lazy(move || {
                layers
                    .into_iter()
                    .rev()
                    .fold(base, |inner, wrap| wrap(inner))
            }))
        };
        BoxCloneSyncService::new(self.classifier.layer(stack))
    }

    /// A whole-batch stage under the builder's tower layers: each message passes the
    /// layers on its way into the stage's collector, and the stage's answer
    /// (handled or duplicate) is carried back around them.
    fn layered_stage(&mut self, stage: DedupedService) -> DedupedService {
        let into_stage = tower::service_fn(move |mut msg: Message| {
            let stage = stage.clone();
            async move {
                let answer = msg.extensions.remove::<Answer>();
                let processed = stage.oneshot(msg).await.map_err(BoxError::from)?;
                if let Some(Answer(slot)) = answer {
                    *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(processed);
                }
                Ok::<(), BoxError>(())
            }
        });
        let layers = std::mem::take(&mut self.layers);
        let base: HandlerStack = BoxService::new(into_stage);
        let stack = SharedService::lazy(move || {
            layers
                .into_iter()
                .rev()
                .fold(base, |inner, wrap| wrap(inner))
        });
        let classified: ClassifiedService =
            BoxCloneSyncService::new(self.classifier.layer(BoxCloneSyncService::new(stack)));
        BoxCloneSyncService::new(tower::service_fn(move |mut msg: Message| {
            let classified = classified.clone();
            async move {
                let slot = Arc::new(Mutex::new(None));
                msg.extensions.insert(Answer(slot.clone()));
                classified.oneshot(msg).await?;
                let answer = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                Ok(answer.unwrap_or(Processed::Handled))
            }
        }))
    }
}

/// Where the whole-batch stage leaves a message's answer for the service around the
/// layers.
#[derive(Clone)]
struct Answer(Arc<Mutex<Option<Processed>>>);
