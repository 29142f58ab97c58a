//! The consumer's circuit breaker: a dependency outage pauses the consumer instead of
//! spending the retry budget of every message that arrives during it.
//!
//! Without it, a dedup store that is down turns every delivery into a transient
//! failure: each one spends an attempt, and an outage longer than the retry budget
//! dead-letters everything that arrived during it. With it:
//!
//! | event | the breaker |
//! |---|---|
//! | `failure_threshold` store failures in a row (default 5) | opens: one `warn` line with the cause, gauge `idem_consumer_paused{consumer}` = 1 |
//! | open | deliveries are handed back untouched ([`Disposition::Release`](crate::Disposition::Release): no attempt spent, no retry copy, never the DLQ); workers stop taking deliveries |
//! | open, store failure | never charged to the message (the same release) |
//! | open | probes the store ([`DedupStore::health`](crate::DedupStore::health)) with backoff, 100 ms doubling to 1 s by default |
//! | probe answers | closes: one `info` line with the outage duration, gauge = 0, workers resume |
//! | a call reaches the store (success, duplicate, handler error) | resets the count of store failures in a row |
//!
//! Store failures that happen while the breaker is still closed (the first
//! `failure_threshold - 1` of an outage) are ordinary transient failures and spend an
//! attempt each, like before: an isolated store error for one message is retried with
//! backoff, not handed back in a hot loop. A timeout of a store call (see
//! [`DedupLayer::store_timeout`](crate::DedupLayer::store_timeout)) counts as a store
//! failure.
//!
//! Opt-in, [`BreakerConfig::handler_failure_rate`] also opens the breaker when the
//! share of the handler's transient failures over a sliding window reaches a ratio
//! (a dependency of the handler is down). Those failures are the handler's own and
//! keep spending attempts; the breaker limits how many messages pay, then pauses for
//! a cool-down (default 10 s) and lets deliveries through again (opening again at
//! once if the rate is still high).
//!
//! The breaker is on by default for every consumer with a dedup stage, with the
//! defaults above ([`ConsumerBuilder::circuit_breaker`](crate::ConsumerBuilder::circuit_breaker)
//! changes them, [`without_circuit_breaker`](crate::ConsumerBuilder::without_circuit_breaker)
//! turns it off). Workers of both transports probe the store once when they start, so a
//! worker started during an outage waits in the open state instead of exiting.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tower::{Layer, Service};

use crate::__private::BoxFuture;
use crate::error::{ErrorKind, HandlerError};
use crate::message::Message;

pub use crate::dedup::store::HealthCheck;

/// Most recent calls the failure-rate window keeps, whatever its duration.
const MAX_WINDOW_CALLS: usize = 10_000;

/// Settings of a [`CircuitBreaker`]. See the [module docs](self) for the defaults.
#[derive(Clone, Debug)]
pub struct BreakerConfig {
    failure_threshold: u32,
    probe_min: Duration,
    probe_max: Duration,
    rate: Option<FailureRate>,
}

#[derive(Clone, Copy, Debug)]
struct FailureRate {
    ratio: f64,
    window: Duration,
    min_calls: u32,
    cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            probe_min: Duration::from_millis(100),
            probe_max: Duration::from_secs(1),
            rate: None,
        }
    }
}

impl BreakerConfig {
    /// The defaults: open after 5 store failures in a row, probe every 100 ms doubling
    /// to 1 s, no failure-rate trigger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Store failures in a row that open the breaker (default 5, at least 1).
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n.max(1);
        self
    }

    /// Delay before the first store probe once open, doubling up to `max` between
    /// probes (defaults 100 ms and 1 s). `max` bounds how long after the store
    /// comes back the consumer resumes.
    pub fn probe_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.probe_min = min.max(Duration::from_millis(1));
        self.probe_max = max.max(self.probe_min);
        self
    }

    /// Opt-in: also open when at least `ratio` (0 to 1) of the handler's results over
    /// the last `window` are transient failures, once the window holds `min_calls`
    /// results. The breaker then pauses for the cool-down (default 10 s, see
    /// [`rate_cool_down`](Self::rate_cool_down)) and resumes.
    pub fn handler_failure_rate(mut self, ratio: f64, window: Duration, min_calls: u32) -> Self {
        let cool_down = self.rate.map_or(Duration::from_secs(10), |r| r.cool_down);
        self.rate = Some(FailureRate {
            ratio: if ratio.is_nan() {
                1.0
            } else {
                ratio.clamp(0.0, 1.0)
            },
            window,
            min_calls: min_calls.max(1),
            cool_down,
        });
        self
    }

    /// How long a breaker opened by the failure rate stays open (default 10 s).
    /// Only meaningful with [`handler_failure_rate`](Self::handler_failure_rate).
    pub fn rate_cool_down(mut self, cool_down: Duration) -> Self {
        if let Some(r) = &mut self.rate {
            r.cool_down = cool_down;
        }
        self
    }
}

/// What opened the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    Store,
    HandlerRate,
}

struct Open {
    since: Instant,
    cause: String,
}

#[derive(Default)]
struct State {
    open: Option<Open>,
    calls: VecDeque<(Instant, bool)>,
}

struct Inner {
    consumer: Arc<str>,
    config: BreakerConfig,
    health: Option<HealthCheck>,
    state: Mutex<State>,
    /// Store failures in a row; outside the lock so a success costs one atomic op.
    consecutive: AtomicU32,
    /// When the latest store failure was recorded, in nanoseconds since `created`
    /// (0: never). Only a call that started after it proves the store answers.
    last_failure: AtomicU64,
    created: Instant,
    open_tx: watch::Sender<bool>,
}

/// A consumer's circuit breaker (see the [module docs](self)). Cheap to clone; clones
/// share the state. Workers read it through
/// [`Consumer::breaker`](crate::Consumer::breaker).
#[derive(Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("consumer", &self.inner.consumer)
            .field("open", &self.is_open())
            .field("config", &self.inner.config)
            .finish()
    }
}

/// The error a delivery gets while the breaker is open: it is handed back untouched.
#[derive(Debug, thiserror::Error)]
#[error("consumer paused by its circuit breaker: {0}")]
pub struct BreakerOpen(pub String);

impl CircuitBreaker {
    /// A closed breaker for consumer `consumer`, probing with `health` when open (with
    /// no probe, a store-opened breaker closes after the probe delay and lets traffic
    /// find out).
    pub fn new(
        consumer: impl Into<Arc<str>>,
        config: BreakerConfig,
        health: Option<HealthCheck>,
    ) -> Self {
        let (open_tx, _) = watch::channel(false);
        CircuitBreaker {
            inner: Arc::new(Inner {
                consumer: consumer.into(),
                config,
                health,
                state: Mutex::new(State::default()),
                consecutive: AtomicU32::new(0),
                last_failure: AtomicU64::new(0),
                created: Instant::now(),
                open_tx,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner)
    }

    /// Whether the breaker is open (the consumer is paused).
    pub fn is_open(&self) -> bool {
        *self.inner.open_tx.borrow()
    }

    /// Why the breaker is open, if it is.
    pub fn cause(&self) -> Option<String> {
        self.state().open.as_ref().map(|o| o.cause.clone())
    }

    /// Resolves when the breaker is closed (at once if it is).
    pub async fn wait_closed(&self) {
        let mut rx = self.inner.open_tx.subscribe();
        // The sender lives in `self`: the channel cannot close while we wait.
        let _ = rx.wait_for(|open| !*open).await;
    }

    /// Resolves when the breaker is open (at once if it is).
    pub async fn wait_open(&self) {
        let mut rx = self.inner.open_tx.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }

    /// Publishes the gauge `idem_consumer_paused{consumer}` with the current state.
    /// Workers call it when they start, so the gauge exists before any outage.
    pub fn publish_gauge(&self) {
        gauge(&self.inner.consumer, self.is_open());
    }

    /// Probes the store once (if closed and a probe is configured) and opens the
    /// breaker if it does not answer. Workers call it when they start, so a worker
    /// started during an outage waits in the open state.
    pub async fn check(&self) {
        if self.is_open() {
            return;
        }
        let Some(health) = &self.inner.health else {
            return;
        };
        if let Err(e) = health().await {
            let mut st = self.state();
            if st.open.is_none() {
                trip(
                    &self.inner,
                    &mut st,
                    Cause::Store,
                    format!("the store does not answer at start: {e}"),
                );
            }
        }
    }

    /// Records a store failure; returns whether the breaker is open now (the failure
    /// is then not charged to the message).
    pub fn record_store_failure(&self, error: &dyn fmt::Display) -> bool {
        let mut st = self.state();
        if st.open.is_some() {
            return true;
        }
        let at = self.inner.since_created(Instant::now());
        self.inner.last_failure.fetch_max(at, Ordering::SeqCst);
        let n = self.inner.consecutive.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.inner.config.failure_threshold {
            let cause = format!("{n} store failures in a row, last: {error}");
            trip(&self.inner, &mut st, Cause::Store, cause);
            return true;
        }
        false
    }

    /// Records a call, started at `started`, that did not fail on the store;
    /// `transient_failure` if the handler failed transiently (for the opt-in failure
    /// rate). It resets the count of store failures in a row only if it started after
    /// the latest one: a handler that claimed before an outage and finishes during it
    /// (its completion failing quietly) proves nothing about the store.
    pub fn record_call(&self, started: Instant, transient_failure: bool) {
        let inner = &self.inner;
        if inner.since_created(started) > inner.last_failure.load(Ordering::SeqCst) {
            inner.consecutive.store(0, Ordering::SeqCst);
        }
        let Some(rate) = self.inner.config.rate else {
            return;
        };
        let mut st = self.state();
        if st.open.is_some() {
            return;
        }
        let now = Instant::now();
        st.calls.push_back((now, transient_failure));
        while st.calls.len() > MAX_WINDOW_CALLS
            || st
                .calls
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > rate.window)
        {
            st.calls.pop_front();
        }
        let total = st.calls.len();
        if total < rate.min_calls as usize {
            return;
        }
        let failed = st.calls.iter().filter(|(_, f)| *f).count();
        #[allow(clippy::cast_precision_loss)] // window sizes are far below 2^52
        let share = failed as f64 / total as f64;
        if share >= rate.ratio {
            let cause = format!(
                "{failed} of the handler's last {total} results were transient failures (threshold {:.0}%)",
                rate.ratio * 100.0
            );
            st.calls.clear();
            trip(&self.inner, &mut st, Cause::HandlerRate, cause);
        }
    }

    /// Settles the breaker's view of one result of the stack below it; returns the
    /// result to pass on (a store failure becomes a release when the breaker is open).
    fn observe<R>(
        &self,
        started: Instant,
        result: Result<R, HandlerError>,
    ) -> Result<R, HandlerError> {
        match result {
            Ok(r) => {
                self.record_call(started, false);
                Ok(r)
            }
            Err(e) if e.is_release() => Err(e),
            Err(e) if e.is_store_failure() => {
                if self.record_store_failure(&e) {
                    Err(e.into_release())
                } else {
                    Err(e)
                }
            }
            Err(e) => {
                self.record_call(started, e.kind() != Some(ErrorKind::Permanent));
                Err(e)
            }
        }
    }
}

impl Inner {
    /// `at` in nanoseconds since the breaker was created, at least 1.
    fn since_created(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.created).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX).max(1)
    }
}

fn lock(inner: &Inner) -> MutexGuard<'_, State> {
    // Every critical section leaves the state consistent: a poisoned lock is usable.
    inner.state.lock().unwrap_or_else(|p| p.into_inner())
}

fn gauge(consumer: &Arc<str>, open: bool) {
    metrics::gauge!("idem_consumer_paused", "consumer" => consumer.to_string()).set(if open {
        1.0
    } else {
        0.0
    });
}

fn trip(inner: &Arc<Inner>, st: &mut State, cause: Cause, text: String) {
    tracing::warn!(
        consumer = %inner.consumer,
        cause = %text,
        "circuit breaker open: consumer paused; deliveries are handed back without spending attempts until it closes"
    );
    st.open = Some(Open {
        since: Instant::now(),
        cause: text,
    });
    gauge(&inner.consumer, true);
    inner.open_tx.send_replace(true);
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(probe(Arc::downgrade(inner), cause));
        }
        // Only reachable when used outside a runtime: close at once rather than stay
        // open with no one to probe.
        Err(_) => close(inner, st),
    }
}

fn close(inner: &Inner, st: &mut State) {
    let Some(open) = st.open.take() else {
        return;
    };
    inner.consecutive.store(0, Ordering::SeqCst);
    st.calls.clear();
    tracing::info!(
        consumer = %inner.consumer,
        outage = ?open.since.elapsed(),
        cause = %open.cause,
        "circuit breaker closed: consumer resumed"
    );
    gauge(&inner.consumer, false);
    inner.open_tx.send_replace(false);
}

async fn probe(weak: Weak<Inner>, cause: Cause) {
    let mut delay = weak
        .upgrade()
        .map_or(Duration::from_millis(100), |i| i.config.probe_min);
    loop {
        let (wait, health, max) = {
            let Some(inner) = weak.upgrade() else { return };
            let wait = match (cause, inner.config.rate) {
                (Cause::HandlerRate, Some(r)) => r.cool_down,
                _ => delay,
            };
            let health = match cause {
                Cause::Store => inner.health.clone(),
                Cause::HandlerRate => None,
            };
            (wait, health, inner.config.probe_max)
        };
        tokio::time::sleep(wait).await;
        let answered = match health {
            Some(h) => match h().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "store probe failed; the breaker stays open");
                    false
                }
            },
            None => true,
        };
        let Some(inner) = weak.upgrade() else { return };
        if answered {
            close(&inner, &mut lock(&inner));
            return;
        }
        delay = (delay * 2).min(max);
    }
}

/// Tower layer putting a [`CircuitBreaker`] in front of a stack whose store failures
/// are marked (made with [`HandlerError::store_unavailable`]): while the breaker is open, calls
/// return a [release](crate::Disposition::Release) without reaching the stack.
#[derive(Clone, Debug)]
pub struct BreakerLayer {
    breaker: CircuitBreaker,
}

impl BreakerLayer {
    /// A layer feeding `breaker`.
    pub fn new(breaker: CircuitBreaker) -> Self {
        BreakerLayer { breaker }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

/// Service produced by [`BreakerLayer`].
#[derive(Clone, Debug)]
pub struct BreakerService<S> {
    inner: S,
    breaker: CircuitBreaker,
}

impl<S, R> Service<Message> for BreakerService<S>
where
    S: Service<Message, Response = R, Error = HandlerError>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = R;
    type Error = HandlerError;
    type Future = BoxFuture<Result<R, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        if self.breaker.is_open() {
            let cause = self.breaker.cause().unwrap_or_default();
            return Box::pin(std::future::ready(Err(HandlerError::release(BreakerOpen(
                cause,
            )))));
        }
        let started = Instant::now();
        let fut = self.inner.call(msg);
        let breaker = self.breaker.clone();
        Box::pin(async move { breaker.observe(started, fut.await) })
    }
}

#[cfg(test)]
mod tests;
