//! The consumer pipeline: handler, classification, timeout, dedup, retry policy.
//!
//! A [`Consumer`] is what a transport runs for every delivery: it turns a [`Message`]
//! into a [`Disposition`] (ack, retry after a delay, dead-letter), records a tracing
//! span and metrics, and counts outcomes. Transports differ only in how they carry a
//! disposition out, so the in-memory broker and RabbitMQ behave the same.
//!
//! ```
//! use idem_core::{Consumer, Disposition, Json, Message, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::ConfigError> {
//! async fn handle(Json(n): Json<u32>) -> Result<(), std::io::Error> {
//!     println!("got {n}");
//!     Ok(())
//! }
//!
//! let consumer = Consumer::builder("counter").store(MemoryStore::new()).handler(handle)?;
//! let msg = || Message::new("7").with_message_id("m-1");
//! assert_eq!(consumer.process(msg()).await, Disposition::Ack { duplicate: false });
//! assert_eq!(consumer.process(msg()).await, Disposition::Ack { duplicate: true });
//! # Ok(()) }
//! ```
//!
//! # Tower layers under the handler
//!
//! The handler can be wrapped in tower middleware, added with
//! [`ConsumerBuilder::layer`] or built into the service given to
//! [`ConsumerBuilder::service`]. Such a service need not be `Clone` or `Sync`
//! (tower's `RateLimit` is neither): the consumer keeps one instance and its
//! deliveries take turns, in arrival order, to wait until it is ready and call it;
//! their handlers then run concurrently. What that means for tower's own layers:
//!
//! - `ConcurrencyLimitLayer::new(n)`: at most `n` handlers run at once; the other
//!   deliveries wait for a slot.
//! - `RateLimitLayer::new(n, per)`: at most `n` handler starts in each `per`; the
//!   others wait for the next window.
//! - `LoadShedLayer` over a limit: a delivery arriving while the limit is reached is
//!   refused with tower's `Overloaded` error instead of waiting. That error is a
//!   **transient** failure under the default classifier: the message is retried after
//!   its backoff delay (it spends an attempt, like any transient failure, so a
//!   consumer overloaded for longer than its retry budget dead-letters what it sheds).
//!   Nothing is dropped.
//!
//! These layers sit inside the handler timeout and the dedup stage: time spent
//! waiting for a slot or a rate-limit window counts toward `handler_timeout` (a
//! delivery that waits longer fails as a transient timeout and is retried), and the
//! dedup claim is already held while it waits. Put the transport's prefetch (the
//! deliveries in flight) above the limit, or the limit never binds.
//!
//! # Immediate retries
//!
//! With [`ConsumerBuilder::immediate_retries`] a transient handler failure is tried
//! again at once, in this process, before it becomes a retry copy in the broker. Each
//! try runs the whole stack (breaker, dedup stage, timeout, classifier, handler):
//!
//! - the dedup stage settles the failed try (a lease store releases the claim, the SQL
//!   inbox rolls back its transaction) and claims the key again for the next one, in a
//!   new transaction; a try's start is settled with it, so tries never count as crashes;
//! - the handler timeout applies to each try; the delivery stays unacked through all
//!   of them, which [`Consumer::check_broker_timeout`] checks against the broker;
//! - only failures that may pass are retried: transient, spending an attempt, not a
//!   store failure (the circuit breaker handles those), not a release, not a busy key,
//!   no `retry_after` delay asked for. Permanent errors and discards never are;
//! - tries spend no attempt (`x-idem-attempts` and [`Attempt`](crate::Attempt) count
//!   deliveries); they are counted in [`Stats::immediate_retries`], the metric
//!   `idem_immediate_retries_total`, the `idem.delivery` span field
//!   `immediate_retries`, and the `x-idem-immediate-retries` header of the copy made
//!   after the last one.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::util::BoxCloneSyncService;
use tower::Layer;

use crate::backoff::Backoff;
use crate::batch::BatchRunner;
use crate::breaker::{CircuitBreaker, HealthCheck};
use crate::crash::CrashGuard;
use crate::dedup::{DedupLayer, DedupSettings, Processed};
use crate::error::HandlerError;
use crate::message::Message;
use crate::outcome::{DeadLetterHook, DeadLettered, Disposition, Settled};

mod builder;
mod delivery;
pub(crate) mod policy;
mod stats;

pub use builder::{ConsumerBuilder, HandlerStack, DEFAULT_IMMEDIATE_RETRY_DELAY};
pub use stats::Stats;

use builder::ImmediateRetries;
use stats::{Counters, Meters};

/// The handler stack a [`Deduplicate`] stage wraps: the consumer's handler with its
/// middleware, timeout and error classification. It takes a message and answers `()`
/// when the handler succeeded, or the classified [`HandlerError`]. Cheap to clone.
pub type ClassifiedService = BoxCloneSyncService<Message, (), HandlerError>;

/// What a [`Deduplicate`] stage makes of a [`ClassifiedService`]: the same stack
/// behind the stage, answering [`Processed`] (whether the handler ran, or the
/// message was a duplicate and was skipped). Build one with
/// `tower::util::BoxCloneSyncService::new` from any `tower::Service` that is
/// `Clone + Send + Sync`.
pub type DedupedService = BoxCloneSyncService<Message, Processed, HandlerError>;

/// A dedup stage: wraps the classified handler stack. Implemented by
/// [`DedupLayer`] (lease stores) and by the SQL transactional inbox; both admit
/// messages through one shared admission and share their [`DedupSettings`].
pub trait Deduplicate: Send + Sync + 'static {
    /// Wraps the stack of consumer `consumer`. The consumer's name scopes the keys
    /// (the same name the consumer writes in `x-idem-consumer`), so a stage never
    /// takes a name of its own.
    fn wrap(&self, consumer: Arc<str>, inner: ClassifiedService) -> DedupedService;
    /// The stage's settings (retention, key, store timeout...).
    fn dedup_settings(&self) -> &DedupSettings;
    /// The claim lease, if this stage uses leases.
    fn lease_duration(&self) -> Option<Duration>;
    /// A cheap probe of the stage's store, for the circuit breaker (default: none;
    /// the breaker then closes after its probe delay and lets traffic find out).
    fn health_check(&self) -> Option<HealthCheck> {
        None
    }
    /// Wraps a [batch handler](crate::batch) for a stage that admits a whole batch at
    /// once (the SQL inbox on PostgreSQL: one admission statement, one transaction;
    /// [`DedupLayer`]: one claim call and one completion call per batch).
    /// `None` (the default): the consumer collects batches under the stage's
    /// per-message [`wrap`](Self::wrap) instead, each message admitted on its own.
    fn wrap_batch(&self, consumer: Arc<str>, runner: BatchRunner) -> Option<DedupedService> {
        let _ = (consumer, runner);
        None
    }
}

impl Deduplicate for DedupLayer {
    fn wrap(&self, consumer: Arc<str>, inner: ClassifiedService) -> DedupedService {
        BoxCloneSyncService::new(self.for_consumer(consumer).layer(inner))
    }
    fn dedup_settings(&self) -> &DedupSettings {
        DedupLayer::dedup_settings(self)
    }
    fn lease_duration(&self) -> Option<Duration> {
        Some(DedupLayer::lease_duration(self))
    }
    fn health_check(&self) -> Option<HealthCheck> {
        Some(DedupLayer::health_check(self))
    }
    fn wrap_batch(&self, consumer: Arc<str>, runner: BatchRunner) -> Option<DedupedService> {
        Some(self.for_consumer(consumer).batch_service(runner))
    }
}

/// When a consumer acks, relative to its handler (SEMANTICS section 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Ack on receipt, before the handler. No duplicates; a crash or failure loses it.
    AtMostOnce,
    /// Ack after the handler succeeds. Nothing lost; duplicates possible.
    AtLeastOnce,
    /// At-least-once plus a dedup store: each effect applied once. The default when a
    /// store is configured.
    EffectivelyOnce,
}

/// A configuration the framework refuses at start-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// Dedup records would expire before the last retry could arrive.
    #[error("dedup retention {retention:?} is shorter than the retry horizon {horizon:?}: a late retry could run twice; raise the retention or shorten the backoff")]
    RetentionTooShort {
        /// Configured retention.
        retention: Duration,
        /// Longest retry horizon of the backoff policy.
        horizon: Duration,
    },
    /// A timeout does not fit inside the broker's consumer timeout.
    #[error("{what} ({value:?}) must be shorter than the broker's consumer_timeout ({broker:?}), or the broker redelivers messages that are still being handled")]
    TimeoutTooLong {
        /// Which timeout.
        what: &'static str,
        /// Its value.
        value: Duration,
        /// The broker's consumer timeout.
        broker: Duration,
    },
    /// Effectively-once needs a dedup store.
    #[error(
        "delivery mode effectively-once needs a dedup store (call .store(...) or .dedup(...))"
    )]
    MissingStore,
    /// A store was configured for a mode that does not use it.
    #[error("a dedup store is configured but the delivery mode is {0:?}; use effectively-once or remove the store")]
    UnusedStore(DeliveryMode),
    /// A consumer name is required and must be short and printable.
    #[error("invalid consumer name {0:?}: 1 to 200 printable characters")]
    InvalidName(String),
}

struct Inner {
    name: Arc<str>,
    mode: DeliveryMode,
    service: DedupedService,
    backoff: Backoff,
    handler_timeout: Duration,
    lease: Option<Duration>,
    retention: Option<Duration>,
    crash_guard: CrashGuard,
    breaker: Option<CircuitBreaker>,
    immediate: ImmediateRetries,
    backtraces: bool,
    on_dead_letter: Option<DeadLetterHook>,
    counters: Counters,
    // Resolved on the first delivery, not at build time, so a metrics recorder
    // installed after the consumer was built (e.g. by the worker's Prometheus
    // endpoint) still receives them.
    meters: std::sync::OnceLock<Meters>,
}

/// A configured consumer: turns messages into dispositions. Cheap to clone.
#[derive(Clone)]
pub struct Consumer {
    inner: Arc<Inner>,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.inner.name)
            .field("mode", &self.inner.mode)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// The consumer name (dedup scope, `x-idem-consumer` header).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The delivery mode.
    pub fn mode(&self) -> DeliveryMode {
        self.inner.mode
    }

    /// How many times a message may crash or hang the worker before it is
    /// dead-lettered instead of run again (see [`crate::crash`]).
    pub fn crash_limit(&self) -> u32 {
        self.inner.crash_guard.limit()
    }

    /// The dedup stage's claim lease, if it uses leases (`None` for the SQL inbox and
    /// for consumers without a stage). Read by the test harness.
    #[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
    pub(crate) fn lease(&self) -> Option<Duration> {
        self.inner.lease
    }

    /// The retry policy.
    pub fn backoff(&self) -> &Backoff {
        &self.inner.backoff
    }

    /// The circuit breaker, if the consumer has one (see [`crate::breaker`]).
    /// Workers wait while it is open.
    pub fn breaker(&self) -> Option<&CircuitBreaker> {
        self.inner.breaker.as_ref()
    }

    /// Outcome counts so far.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// Immediate retries allowed per delivery (0 by default); see
    /// [`ConsumerBuilder::immediate_retries`].
    pub fn immediate_retries(&self) -> u32 {
        self.inner.immediate.limit
    }

    /// Tells the consumer's dead-letter hook (if any) that the delivery `settled`
    /// describes was dead-lettered to `dead_letter_queue`; does nothing for any other
    /// disposition. Transports call it next to their settle hook, once the
    /// dead-letter copy is safely stored (RabbitMQ: confirmed), and never when it is
    /// not (the original then goes back to the queue, and the hook is told when a
    /// later delivery's copy is stored).
    pub fn notify_dead_lettered(&self, settled: &Settled<'_>, dead_letter_queue: &str) {
        if let (Some(hook), Disposition::DeadLetter { failure, headers }) =
            (&self.inner.on_dead_letter, settled.disposition)
        {
            hook(DeadLettered {
                message_id: settled.message_id,
                queue: settled.queue,
                dead_letter_queue,
                consumer: &self.inner.name,
                failure,
                headers,
            });
        }
    }

    /// Checks that the handler timeout and dedup lease fit inside the broker's
    /// `consumer_timeout`. Transports call this at start-up.
    /// With immediate retries, a delivery stays unacked through every try: the
    /// handler timeout times the tries, plus the pauses between them, must fit too.
    pub fn check_broker_timeout(&self, broker: Duration) -> Result<(), ConfigError> {
        let im = self.inner.immediate;
        let mut checks = vec![("handler timeout", self.inner.handler_timeout)];
        if im.limit > 0 {
            let all_tries = self
                .inner
                .handler_timeout
                .saturating_mul(im.limit.saturating_add(1))
                .saturating_add(im.delay.saturating_mul(im.limit));
            checks.push((
                "handler timeout x (immediate retries + 1) + immediate retry delays",
                all_tries,
            ));
        }
        if let Some(lease) = self.inner.lease {
            checks.push(("dedup lease", lease));
        }
        for (what, value) in checks {
            if value >= broker {
                return Err(ConfigError::TimeoutTooLong {
                    what,
                    value,
                    broker,
                });
            }
        }
        Ok(())
    }

    /// How long the dedup stage keeps `done` records (`None` without a dedup stage).
    /// Transports that lengthen retry delays (RabbitMQ's delay tiers) check it against
    /// their own retry horizon at start-up.
    pub fn retention(&self) -> Option<Duration> {
        self.inner.retention
    }
}
