//! [`ConsumerBuilder`]: a consumer's settings, checked and assembled into its stack.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::util::{BoxCloneSyncService, BoxService};
use tower::{Layer, Service, ServiceExt};

use super::stats::Counters;
use super::{ConfigError, Consumer, Deduplicate, DeliveryMode, Inner};
use crate::backoff::Backoff;
use crate::batch::BatchConfig;
use crate::breaker::{BreakerConfig, BreakerLayer, CircuitBreaker};
use crate::classify::{Classify, ClassifyLayer};
use crate::crash::{CrashGuard, DEFAULT_CRASH_LIMIT};
use crate::dedup::{DedupLayer, DedupStore, Processed};
use crate::error::{BoxError, HandlerError, HandlerTimeoutError};
use crate::handler::{Handler, HandlerService, HandlerState, SharedService};
use crate::message::Message;
use crate::outcome::{DeadLetterHook, DeadLettered};

use super::{ClassifiedService, DedupedService};

mod batch;

/// The service a layer given to [`ConsumerBuilder::layer`] wraps: the handler (and the
/// layers added after this one), boxed, with its errors as [`BoxError`]s that keep
/// their classification.
pub type HandlerStack = BoxService<Message, (), BoxError>;

type LayerFn = Box<dyn FnOnce(HandlerStack) -> HandlerStack + Send + Sync>;

/// Builds a [`Consumer`]. See [`Consumer::builder`].
pub struct ConsumerBuilder {
    name: String,
    mode: Option<DeliveryMode>,
    dedup: Option<Arc<dyn Deduplicate>>,
    backoff: Backoff,
    classifier: ClassifyLayer,
    handler_timeout: Duration,
    crash_limit: u32,
    breaker: BreakerSetting,
    immediate: ImmediateRetries,
    backtraces: bool,
    on_dead_letter: Option<DeadLetterHook>,
    layers: Vec<LayerFn>,
    batch: BatchConfig,
}

/// Immediate (in-process) retries: how many, and the pause before each.
#[derive(Clone, Copy, Debug)]
pub(super) struct ImmediateRetries {
    pub(super) limit: u32,
    pub(super) delay: Duration,
}

/// Default pause before an immediate retry.
pub const DEFAULT_IMMEDIATE_RETRY_DELAY: Duration = Duration::from_millis(100);

impl fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("dedup", &self.dedup.is_some())
            .field("backoff", &self.backoff)
            .field("handler_timeout", &self.handler_timeout)
            .field("crash_limit", &self.crash_limit)
            .field("breaker", &self.breaker)
            .field("immediate_retries", &self.immediate.limit)
            .field("immediate_retry_delay", &self.immediate.delay)
            .field("backtrace_header", &self.backtraces)
            .field("on_dead_letter", &self.on_dead_letter.is_some())
            .field("layers", &self.layers.len())
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum BreakerSetting {
    /// On with the defaults when there is a dedup stage.
    Default,
    On(BreakerConfig),
    Off,
}

impl Consumer {
    /// Starts configuring consumer `name`. Defaults: at-least-once (effectively-once
    /// once a store is set), [`Backoff::default`], the default classifier, handler
    /// timeout 5 minutes.
    pub fn builder(name: impl Into<String>) -> ConsumerBuilder {
        ConsumerBuilder {
            name: name.into(),
            mode: None,
            dedup: None,
            backoff: Backoff::default(),
            classifier: ClassifyLayer::default(),
            handler_timeout: Duration::from_secs(300),
            crash_limit: DEFAULT_CRASH_LIMIT,
            breaker: BreakerSetting::Default,
            immediate: ImmediateRetries {
                limit: 0,
                delay: DEFAULT_IMMEDIATE_RETRY_DELAY,
            },
            backtraces: false,
            on_dead_letter: None,
            layers: Vec::new(),
            batch: BatchConfig::default(),
        }
    }
}

/// A service's error as a [`BoxError`] that remembers the error's type name (for the
/// `x-idem-error-type` header) while its concrete type is still known.
fn typed_box_error<E: Into<BoxError>>(err: E) -> BoxError {
    HandlerError::unclassified(err).into()
}

impl ConsumerBuilder {
    /// Sets the delivery mode explicitly.
    pub fn mode(mut self, mode: DeliveryMode) -> Self {
        self.mode = Some(mode);
        self
    }

    /// Dedups through a lease store with the default [`DedupLayer`] settings.
    pub fn store(self, store: impl DedupStore) -> Self {
        self.dedup(DedupLayer::new(store))
    }

    /// Dedups through a configured stage: a [`DedupLayer`] or a transactional inbox.
    pub fn dedup(mut self, stage: impl Deduplicate) -> Self {
        self.dedup = Some(Arc::new(stage));
        self
    }

    /// The retry policy for transient failures.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Maps errors the handler did not classify (`None` defers to the default).
    pub fn classify(mut self, policy: impl Classify) -> Self {
        self.classifier = ClassifyLayer::new(policy);
        self
    }

    /// Circuit breaker settings (see [`crate::breaker`]). On by default, with
    /// [`BreakerConfig::default`], whenever a dedup stage is configured; this turns it
    /// on without a stage too (for the opt-in handler failure rate).
    pub fn circuit_breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = BreakerSetting::On(config);
        self
    }

    /// No circuit breaker: every store failure spends an attempt, as any transient
    /// failure does, and an outage longer than the retry budget dead-letters what
    /// arrives during it.
    pub fn without_circuit_breaker(mut self) -> Self {
        self.breaker = BreakerSetting::Off;
        self
    }

    /// Handler timeout: a handler still running after it is a transient failure.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = timeout;
        self
    }

    /// Immediate retries: how many times a transient handler failure is retried at
    /// once, in process, before it becomes a broker-scheduled retry (a retry copy
    /// through the delay queues). Default 0 (off). See the
    /// [module docs](crate::consumer#immediate-retries) for how they meet dedup, the handler
    /// timeout, the circuit breaker and permanent errors.
    /// In at-most-once mode (acked on receipt) the tries happen too, before the
    /// failure is dropped.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use idem_core::{Consumer, Disposition, HandlerError, Message, MemoryStore, State};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::ConfigError> {
    /// // Fails twice (a dropped connection), then works.
    /// async fn handle(State(calls): State<Arc<AtomicU32>>) -> Result<(), HandlerError> {
    ///     if calls.fetch_add(1, Ordering::SeqCst) < 2 {
    ///         return Err(HandlerError::transient("connection reset"));
    ///     }
    ///     Ok(())
    /// }
    /// let calls = Arc::new(AtomicU32::new(0));
    /// let consumer = Consumer::builder("payments")
    ///     .store(MemoryStore::new())
    ///     .immediate_retries(3)
    ///     .immediate_retry_delay(Duration::from_millis(10))
    ///     .handler_with_state(handle, calls.clone())?;
    /// let d = consumer.process(Message::new("{}").with_message_id("p-1")).await;
    /// assert_eq!(d, Disposition::Ack { duplicate: false }); // no retry copy needed
    /// assert_eq!(calls.load(Ordering::SeqCst), 3);
    /// assert_eq!(consumer.stats().immediate_retries, 2);
    /// # Ok(()) }
    /// ```
    pub fn immediate_retries(mut self, retries: u32) -> Self {
        self.immediate.limit = retries;
        self
    }

    /// Pause before each immediate retry (default
    /// [`DEFAULT_IMMEDIATE_RETRY_DELAY`], 100 ms; zero retries at once). Keep it
    /// short: the delivery holds its prefetch slot meanwhile.
    pub fn immediate_retry_delay(mut self, delay: Duration) -> Self {
        self.immediate.delay = delay;
        self
    }

    /// Writes a backtrace of where the error was created in the
    /// `x-idem-backtrace` header of retry and dead-letter copies (truncated to
    /// [`MAX_BACKTRACE_LEN`](crate::outcome::MAX_BACKTRACE_LEN)). Off by default: capturing costs time on every
    /// failure. The backtrace is taken when the [`HandlerError`] is made (by
    /// `?`, a constructor or a `ResultExt` marker) on the delivery's task; an error
    /// made on another task (one the handler spawned) has none. Symbol names need
    /// debug info in the binary.
    pub fn backtrace_header(mut self, on: bool) -> Self {
        self.backtraces = on;
        self
    }

    /// Called when a message is dead-lettered, after its copy is safely in the
    /// dead-letter queue (RabbitMQ: the publish was confirmed; the in-memory
    /// broker: the copy was stored), with the failure record: for alerting. Both
    /// transports call it, next to their settle hook; a copy that could not be
    /// published is not reported (the original goes back to the queue and is
    /// reported when a later copy is stored). The hook runs on the delivery's task:
    /// keep it short and do not panic in it.
    ///
    /// ```
    /// use idem_core::{Consumer, HandlerError, Message, MemoryStore};
    /// use idem_core::memory::MemoryBroker;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::ConfigError> {
    /// let (tx, mut alerts) = tokio::sync::mpsc::unbounded_channel();
    /// let consumer = Consumer::builder("invoices")
    ///     .store(MemoryStore::new())
    ///     .on_dead_letter(move |d| {
    ///         let _ = tx.send(format!("{} -> {}: {}", d.queue, d.dead_letter_queue, d.failure.error));
    ///     })
    ///     .handler(|| async { Err::<(), _>(HandlerError::permanent("no such customer")) })?;
    /// let broker = MemoryBroker::new();
    /// broker.publish("invoices", Message::new("{}").with_message_id("i-1"));
    /// broker.worker("invoices", consumer).run_until_idle().await;
    /// assert_eq!(alerts.recv().await.unwrap(), "invoices -> invoices.dlq: no such customer");
    /// # Ok(()) }
    /// ```
    pub fn on_dead_letter(
        mut self,
        hook: impl Fn(DeadLettered<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.on_dead_letter = Some(Arc::new(hook));
        self
    }

    /// How many times a message may crash or hang the worker (start without ever
    /// settling) before it is dead-lettered with `crashed or hung the worker N times`
    /// instead of being run again (default [`DEFAULT_CRASH_LIMIT`], at least 1). Needs
    /// a dedup stage that counts starts (the Redis, SQL and memory lease stores, the
    /// SQL inbox); see [`crate::crash`].
    pub fn crash_limit(mut self, limit: u32) -> Self {
        self.crash_limit = limit.max(1);
        self
    }

    /// Wraps the handler in a tower layer: tower's `ConcurrencyLimitLayer`,
    /// `RateLimitLayer`, `LoadShedLayer`, a whole `ServiceBuilder`, or your own. The
    /// layer's service needs to be neither `Clone` nor `Sync`: the consumer shares one
    /// instance between its deliveries, each waiting for it to be ready and calling it
    /// in turn (see the [module docs](crate::consumer#tower-layers-under-the-handler)). Layers
    /// added first are outermost (they see a message first), as with
    /// `ServiceBuilder::layer`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::limit::{ConcurrencyLimitLayer, RateLimitLayer};
    /// use idem_core::{Consumer, Message, MemoryStore};
    ///
    /// async fn handle(msg: Message) { let _ = msg; }
    ///
    /// let consumer = Consumer::builder("orders")
    ///     .store(MemoryStore::new())
    ///     .layer(RateLimitLayer::new(100, Duration::from_secs(1))) // 100 handler starts a second
    ///     .layer(ConcurrencyLimitLayer::new(4))                    // at most 4 at once
    ///     .handler(handle)?;
    /// # Ok::<(), idem_core::ConfigError>(())
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<HandlerStack> + Send + Sync + 'static,
        L::Service: Service<Message, Response = ()> + Send + 'static,
        <L::Service as Service<Message>>::Error: Into<BoxError>,
        <L::Service as Service<Message>>::Future: Send + 'static,
    {
        self.layers.push(Box::new(move |inner| {
            BoxService::new(layer.layer(inner).map_err(typed_box_error))
        }));
        self
    }

    /// Finishes with an async fn handler that uses no shared state.
    pub fn handler<H, T>(self, handler: H) -> Result<Consumer, ConfigError>
    where
        H: Handler<T, ()>,
        T: 'static,
    {
        self.finish_cloneable(HandlerService::new(handler, ()))
    }

    /// Finishes with an async fn handler and the state its [`State`](crate::State)
    /// extractor reads (see [`HandlerState`] for what a state must be).
    pub fn handler_with_state<H, T, S>(self, handler: H, state: S) -> Result<Consumer, ConfigError>
    where
        H: Handler<T, S>,
        T: 'static,
        S: HandlerState,
    {
        self.finish_cloneable(HandlerService::new(handler, state))
    }

    /// Finishes with any `tower::Service` over messages, e.g. a handler wrapped in
    /// tower's own middleware with a `ServiceBuilder`. The service need not be `Clone`
    /// or `Sync`: the consumer shares one instance between its deliveries, as for
    /// [`layer`](Self::layer), and applies the layers given there around it.
    pub fn service<S>(self, service: S) -> Result<Consumer, ConfigError>
    where
        S: Service<Message, Response = ()> + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.finish_shared(BoxService::new(service.map_err(typed_box_error)))
    }

    /// A handler service that is `Clone + Sync` and always ready runs as is, one
    /// clone per delivery, unless layers were added.
    fn finish_cloneable<S>(self, service: S) -> Result<Consumer, ConfigError>
    where
        S: Service<Message, Response = (), Error = HandlerError> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        if self.layers.is_empty() {
            let boxed = BoxCloneSyncService::new(service.map_err(BoxError::from));
            self.build(boxed)
        } else {
            self.finish_shared(BoxService::new(service.map_err(BoxError::from)))
        }
    }

    fn finish_shared(mut self, service: HandlerStack) -> Result<Consumer, ConfigError> {
        let layers = std::mem::take(&mut self.layers);
        // Built on the first delivery, inside the runtime (tower's RateLimit needs one).
        // The first layer added is the outermost: apply the last one first.
        let stack = SharedService::lazy(move || {
            layers
                .into_iter()
                .rev()
                .fold(service, |inner, wrap| wrap(inner))
        });
        self.build(BoxCloneSyncService::new(stack))
    }

    fn build(
        self,
        service: BoxCloneSyncService<Message, (), BoxError>,
    ) -> Result<Consumer, ConfigError> {
        let (name, mode) = self.check()?;
        let timeout = self.handler_timeout;
        let timed = tower::timeout::Timeout::new(service, timeout)
            .map_err(move |e: BoxError| HandlerTimeoutError::name_elapsed(e, timeout));
        let classified: ClassifiedService = BoxCloneSyncService::new(self.classifier.layer(timed));
        let service = match &self.dedup {
            Some(stage) => stage.wrap(name.as_str().into(), classified),
            None => BoxCloneSyncService::new(classified.map_response(|()| Processed::Handled)),
        };
        self.assemble(name, mode, service)
    }

    /// Checks the settings; answers the consumer's name and delivery mode.
    fn check(&self) -> Result<(String, DeliveryMode), ConfigError> {
        let name = self.name.trim().to_owned();
        if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return Err(ConfigError::InvalidName(self.name.clone()));
        }
        let mode = self.mode.unwrap_or(if self.dedup.is_some() {
            DeliveryMode::EffectivelyOnce
        } else {
            DeliveryMode::AtLeastOnce
        });
        match (&self.dedup, mode) {
            (None, DeliveryMode::EffectivelyOnce) => return Err(ConfigError::MissingStore),
            (Some(_), DeliveryMode::AtMostOnce | DeliveryMode::AtLeastOnce) => {
                return Err(ConfigError::UnusedStore(mode))
            }
            _ => {}
        }
        if let Some(stage) = &self.dedup {
            let horizon = self.backoff.horizon();
            let retention = stage.dedup_settings().retention;
            if retention < horizon {
                return Err(ConfigError::RetentionTooShort { retention, horizon });
            }
        }
        Ok((name, mode))
    }

    /// The consumer around its dedup-stage service: breaker, counters, settings.
    fn assemble(
        self,
        name: String,
        mode: DeliveryMode,
        service: DedupedService,
    ) -> Result<Consumer, ConfigError> {
        let breaker_config = match (self.breaker, &self.dedup) {
            (BreakerSetting::On(c), _) => Some(c),
            (BreakerSetting::Default, Some(_)) => Some(BreakerConfig::default()),
            (BreakerSetting::Default, None) | (BreakerSetting::Off, _) => None,
        };
        let breaker = breaker_config.map(|c| {
            let health = self.dedup.as_ref().and_then(|s| s.health_check());
            CircuitBreaker::new(name.as_str(), c, health)
        });
        let service = match &breaker {
            Some(b) => BoxCloneSyncService::new(BreakerLayer::new(b.clone()).layer(service)),
            None => service,
        };
        let consumer = Consumer {
            inner: Arc::new(Inner {
                meters: std::sync::OnceLock::new(),
                name: name.into(),
                mode,
                service,
                backoff: self.backoff,
                handler_timeout: self.handler_timeout,
                lease: self.dedup.as_ref().and_then(|s| s.lease_duration()),
                retention: self.dedup.as_ref().map(|s| s.dedup_settings().retention),
                crash_guard: CrashGuard::new(self.crash_limit),
                breaker,
                immediate: self.immediate,
                backtraces: self.backtraces,
                on_dead_letter: self.on_dead_letter,
                counters: Counters::default(),
            }),
        };
        Ok(consumer)
    }
}
