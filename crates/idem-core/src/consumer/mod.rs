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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tower::util::{BoxCloneSyncService, BoxService};
use tower::{Layer, Service, ServiceExt};
use tracing::{field, Instrument};

use crate::backoff::Backoff;
use crate::breaker::{BreakerConfig, BreakerLayer, CircuitBreaker, HealthCheck};
use crate::classify::{Classify, ClassifyLayer};
use crate::crash::{CrashGuard, DEFAULT_CRASH_LIMIT};
use crate::dedup::{DedupLayer, DedupSettings, DedupStore, Processed};
use crate::error::{capturing_backtraces, BoxError, ErrorKind, HandlerError, HandlerTimeoutError};

pub(crate) mod policy;

use crate::handler::{Handler, HandlerService, HandlerState, SharedService};
use crate::message::Message;
use crate::outcome::{
    headers, truncate, DeadLetterHook, DeadLettered, Disposition, Failure, Origin, Settled,
    MAX_BACKTRACE_LEN, MAX_ERROR_LEN, MAX_HEADER_LEN,
};
use policy::{Decision, History, Policy};

use crate::__private::{ClassifiedService, DedupedService};

/// The service a layer given to [`ConsumerBuilder::layer`] wraps: the handler (and the
/// layers added after this one), boxed, with its errors as [`BoxError`]s that keep
/// their classification.
pub type HandlerStack = BoxService<Message, (), BoxError>;

type LayerFn = Box<dyn FnOnce(HandlerStack) -> HandlerStack + Send + Sync>;

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

/// Counts of outcomes since the consumer was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages whose handler succeeded.
    pub processed: u64,
    /// Messages acked as duplicates without running the handler.
    pub duplicates: u64,
    /// Retry copies scheduled.
    pub retries: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// At-most-once failures (acked before the handler, not retried).
    pub dropped: u64,
    /// Immediate (in-process) retries run; not counted in `retries`, which counts
    /// retry copies (see [`ConsumerBuilder::immediate_retries`]).
    pub immediate_retries: u64,
    /// Messages the handler dropped on purpose ([`HandlerError::discard`]).
    pub discarded: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "processed={} duplicates={} retries={} dead_lettered={}",
            self.processed, self.duplicates, self.retries, self.dead_lettered
        )?;
        if self.dropped > 0 {
            write!(f, " dropped={}", self.dropped)?;
        }
        if self.immediate_retries > 0 {
            write!(f, " immediate_retries={}", self.immediate_retries)?;
        }
        if self.discarded > 0 {
            write!(f, " discarded={}", self.discarded)?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Counters {
    processed: AtomicU64,
    duplicates: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    dropped: AtomicU64,
    immediate_retries: AtomicU64,
    discarded: AtomicU64,
}

struct Meters {
    processed: metrics::Counter,
    duplicates: metrics::Counter,
    retries: metrics::Counter,
    dead_lettered: metrics::Counter,
    immediate_retries: metrics::Counter,
    discarded: metrics::Counter,
    latency: metrics::Histogram,
}

impl Meters {
    fn new(name: &str) -> Self {
        let c = name.to_owned();
        Meters {
            processed: metrics::counter!("idem_processed_total", "consumer" => c.clone()),
            duplicates: metrics::counter!("idem_duplicates_total", "consumer" => c.clone()),
            retries: metrics::counter!("idem_retries_total", "consumer" => c.clone()),
            dead_lettered: metrics::counter!("idem_dead_lettered_total", "consumer" => c.clone()),
            immediate_retries: metrics::counter!("idem_immediate_retries_total", "consumer" => c.clone()),
            discarded: metrics::counter!("idem_discarded_total", "consumer" => c.clone()),
            latency: metrics::histogram!("idem_handler_duration_seconds", "consumer" => c),
        }
    }
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
}

/// Immediate (in-process) retries: how many, and the pause before each.
#[derive(Clone, Copy, Debug)]
struct ImmediateRetries {
    limit: u32,
    delay: Duration,
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
        }
    }

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
        let c = &self.inner.counters;
        Stats {
            processed: c.processed.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            immediate_retries: c.immediate_retries.load(Ordering::Relaxed),
            discarded: c.discarded.load(Ordering::Relaxed),
        }
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

    /// Runs the stack on one delivery and decides what the transport must do.
    ///
    /// In at-most-once mode the transport has acked already; a failure then yields
    /// [`Disposition::Ack`] after being logged and counted as dropped.
    pub async fn process(&self, mut msg: Message) -> Disposition {
        let inner = &self.inner;
        let meters = inner.meters.get_or_init(|| Meters::new(&inner.name));
        let failed_before = msg.failed_attempts();
        msg.delivery.attempt = failed_before.saturating_add(1);
        let span = tracing::info_span!(
            "idem.delivery",
            consumer = %inner.name,
            queue = %msg.delivery.queue,
            message_id = msg.properties.message_id.as_deref().unwrap_or(""),
            key = field::Empty,
            // i64: OpenTelemetry exports it as an integer (a u64 field becomes text).
            attempt = i64::from(msg.delivery.attempt),
            immediate_retries = field::Empty,
            outcome = field::Empty,
            latency_ms = field::Empty,
        );
        // W3C trace context: parent from the message, link to the previous attempt.
        #[cfg(feature = "otel")]
        let had_parent = crate::otel::adopt(&span, &msg);
        let fallback_key = msg.properties.message_id.clone();
        // What the retry and dead-letter copies say about the original.
        let origin = Origin::of(&msg);
        let first_failed_at = crate::read::read_in::<SystemTime>(&msg, headers::FIRST_FAILED_AT);
        msg.extensions.insert(inner.crash_guard.clone());
        let started = Instant::now();
        let (result, spent) = self.run_tries(msg, &span, meters).await;
        span.record("immediate_retries", spent);
        let elapsed = started.elapsed();
        meters.latency.record(elapsed.as_secs_f64());

        let history = History {
            failed_before,
            first_failed_at,
            now: SystemTime::now(),
        };
        let policy = Policy {
            mode: inner.mode,
            backoff: &inner.backoff,
        };
        let decision = policy::decide(
            result.as_ref().map(|p| *p).map_err(HandlerError::verdict),
            &history,
            &policy,
        );
        let disposition = match result {
            Ok(_) => self.disposition(decision, None),
            Err(err) => {
                let failure = self.failure(&err, &history, fallback_key, spent);
                self.disposition(decision, Some((failure, &origin)))
            }
        };
        #[cfg(feature = "otel")]
        let disposition = crate::otel::mark_copy(&span, had_parent, disposition);
        self.count(decision, meters);
        span.record("outcome", disposition.name());
        span.record("latency_ms", elapsed.as_secs_f64() * 1000.0);
        let _enter = span.enter();
        match &disposition {
            Disposition::Ack { .. } => tracing::debug!(outcome = disposition.name(), "settled"),
            Disposition::Retry { delay, failure, .. } => tracing::info!(
                ?delay, attempts = failure.attempts, error = %failure.error, "retry scheduled"
            ),
            Disposition::DeadLetter { failure, .. } => tracing::warn!(
                kind = %failure.kind, attempts = failure.attempts, error = %failure.error, "dead-lettered"
            ),
            // The breaker logs once when it opens; not one line per delivery.
            Disposition::Release { reason } => tracing::debug!(%reason, "handed back"),
            Disposition::Discard { reason } => tracing::info!(%reason, "discarded on purpose"),
        }
        disposition
    }

    /// Runs the stack on `msg`, again at once after each failure the policy lets
    /// pass ([`policy::retry_at_once`]); returns the last result and how many
    /// immediate retries ran.
    async fn run_tries(
        &self,
        mut msg: Message,
        span: &tracing::Span,
        meters: &Meters,
    ) -> (Result<Processed, HandlerError>, u32) {
        let inner = &self.inner;
        let immediate = inner.immediate;
        let mut spent = 0u32;
        loop {
            // Each try runs the whole stack: the dedup stage claims the key again
            // (a failed try released it; the SQL inbox rolled its transaction back and
            // begins a new one), the handler timeout starts afresh, and the circuit
            // breaker sees every store call.
            let this_try = if spent < immediate.limit {
                msg.clone()
            } else {
                std::mem::take(&mut msg)
            };
            let call = inner.service.clone().oneshot(this_try);
            let result = capturing_backtraces(inner.backtraces, call)
                .instrument(span.clone())
                .await;
            match result {
                Err(err) if policy::retry_at_once(err.verdict(), spent, immediate.limit) => {
                    spent += 1;
                    inner
                        .counters
                        .immediate_retries
                        .fetch_add(1, Ordering::Relaxed);
                    meters.immediate_retries.increment(1);
                    span.in_scope(|| {
                        tracing::info!(
                            immediate_retry = spent,
                            of = immediate.limit,
                            error = %err,
                            "transient failure; retrying at once"
                        )
                    });
                    if !immediate.delay.is_zero() {
                        tokio::time::sleep(immediate.delay).await;
                    }
                }
                result => return (result, spent),
            }
        }
    }

    /// The failure record of `err`, as retry and dead-letter copies carry it. Its
    /// attempt count is the one before this delivery; [`disposition`](Self::disposition)
    /// sets the one the decision charged.
    fn failure(
        &self,
        err: &HandlerError,
        history: &History,
        fallback_key: Option<String>,
        immediate_retries: u32,
    ) -> Failure {
        Failure {
            kind: err.kind().unwrap_or(ErrorKind::Transient),
            error: truncate(&err.chain(), MAX_ERROR_LEN),
            attempts: history.failed_before,
            first_failed_at: history.first_failed_at(),
            last_failed_at: history.now,
            key: err.key().map(str::to_owned).or(fallback_key),
            error_type: err.type_name().map(|t| truncate(t, MAX_HEADER_LEN)),
            immediate_retries,
            backtrace: err
                .backtrace()
                .filter(|_| self.inner.backtraces)
                .map(|b| truncate(&b.to_string(), MAX_BACKTRACE_LEN)),
        }
    }

    /// Turns the policy's decision into what the transport carries out: for a failed
    /// delivery, its failure record and the copy headers derived from `origin`.
    fn disposition(&self, decision: Decision, failed: Option<(Failure, &Origin)>) -> Disposition {
        let inner = &self.inner;
        let Some((failure, origin)) = failed else {
            return match decision {
                Decision::Ack { duplicate } => Disposition::Ack { duplicate },
                // Without a failure the policy only acks; anything else would be a bug
                // of the policy, and an ack is the settlement that loses nothing here.
                _ => Disposition::Ack { duplicate: false },
            };
        };
        match decision {
            Decision::Ack { duplicate } => Disposition::Ack { duplicate },
            Decision::Discard => Disposition::Discard {
                reason: failure.error,
            },
            Decision::Dropped => {
                tracing::warn!(error = %failure.error, "at-most-once handler failed; message was acked on receipt and is not retried");
                Disposition::Ack { duplicate: false }
            }
            Decision::Release => Disposition::Release {
                reason: failure.error,
            },
            Decision::Retry {
                delay,
                delay_kind,
                attempts,
            } => {
                let failure = Failure {
                    attempts,
                    ..failure
                };
                Disposition::Retry {
                    headers: failure.retry_headers_from(origin),
                    delay,
                    delay_kind,
                    failure,
                }
            }
            Decision::DeadLetter { attempts } => {
                let failure = Failure {
                    attempts,
                    ..failure
                };
                Disposition::DeadLetter {
                    headers: failure.dead_letter_headers_from(origin, &inner.name),
                    failure,
                }
            }
        }
    }

    /// Counts the outcome in [`Stats`] and the metrics.
    fn count(&self, decision: Decision, meters: &Meters) {
        let c = &self.inner.counters;
        let (counter, meter) = match decision {
            Decision::Ack { duplicate: false } => (&c.processed, Some(&meters.processed)),
            Decision::Ack { duplicate: true } => (&c.duplicates, Some(&meters.duplicates)),
            Decision::Retry { .. } => (&c.retries, Some(&meters.retries)),
            Decision::DeadLetter { .. } => (&c.dead_lettered, Some(&meters.dead_lettered)),
            Decision::Discard => (&c.discarded, Some(&meters.discarded)),
            Decision::Dropped => (&c.dropped, None),
            Decision::Release => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(meter) = meter {
            meter.increment(1);
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
    /// [module docs](self#immediate-retries) for how they meet dedup, the handler
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
    /// [`MAX_BACKTRACE_LEN`]). Off by default: capturing costs time on every
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
    /// in turn (see the [module docs](self#tower-layers-under-the-handler)). Layers
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
        let name = self.name.trim().to_owned();
        if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return Err(ConfigError::InvalidName(self.name));
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
        let timeout = self.handler_timeout;
        let timed = tower::timeout::Timeout::new(service, timeout)
            .map_err(move |e: BoxError| HandlerTimeoutError::name_elapsed(e, timeout));
        let classified: ClassifiedService = BoxCloneSyncService::new(self.classifier.layer(timed));
        let service = match &self.dedup {
            Some(stage) => stage.wrap(name.as_str().into(), classified),
            None => BoxCloneSyncService::new(classified.map_response(|()| Processed::Handled)),
        };
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
