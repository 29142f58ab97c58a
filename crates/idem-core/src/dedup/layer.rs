use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tower::{Layer, Service};
use tracing::{debug, warn};

use super::bounded::{Bounded, DEFAULT_STORE_TIMEOUT};
use super::key::{resolve_key, sha256_hex, DefaultKey, KeyExtractor, MissingKey};
use super::store::{Claim, Completion, DedupStore, OwnerToken, ScopedKey, StoreError};
use crate::crash::CrashGuard;
use crate::error::{ErrorKind, HandlerError};
use crate::handler::{BoxFuture, IdempotencyKey};
use crate::message::Message;

/// Header an operator's replay sets (value: any non-empty string). A message carrying
/// it may reopen a `done(poisoned)` record; a `done(succeeded)` one is still a duplicate.
/// Read under the [header rule](crate::read): an empty string is no replay, a value of
/// another type is ignored (no replay) with one `warn` log.
pub const REPLAY_HEADER: &str = "x-idem-replay";

/// What the dedup layer did with a message that is to be acked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Processed {
    /// The handler ran and succeeded.
    Handled,
    /// The key was already done: the handler did not run.
    Duplicate,
}

impl Processed {
    /// The handler ran.
    pub fn is_handled(self) -> bool {
        self == Processed::Handled
    }
    /// The message was a duplicate.
    pub fn is_duplicate(self) -> bool {
        self == Processed::Duplicate
    }
}

/// A redelivered copy of a message that was dead-lettered as poison. Permanent: it is
/// dead-lettered again rather than acked as a duplicate, because the first
/// dead-letter copy may never have been confirmed (a crash between recording the
/// poison and the broker's confirm would otherwise lose the message). The DLQ may
/// then hold two copies of it; a replay of either runs it once.
#[derive(Debug, thiserror::Error)]
#[error("idempotence key {0:?} was dead-lettered as poison before; dead-lettering this copy too (replay with header x-idem-replay to run it)")]
pub struct PreviouslyPoisonedError(pub String);

/// The key was done with a different payload fingerprint. Permanent.
#[derive(Debug, thiserror::Error)]
#[error("idempotence key {0:?} was already processed with a different payload")]
pub struct PayloadMismatchError(pub String);

struct Config {
    consumer: Arc<str>,
    /// `raw` behind [`Bounded`] (the store timeout).
    store: Arc<dyn DedupStore>,
    raw: Arc<dyn DedupStore>,
    store_timeout: Duration,
    extractor: Arc<dyn KeyExtractor>,
    missing: MissingKey,
    lease: Duration,
    retention: Duration,
    min_busy_delay: Duration,
    fingerprint: bool,
}

/// Layer applying idempotence-key dedup. See the [module docs](super).
#[derive(Clone)]
pub struct DedupLayer {
    config: Arc<Config>,
}

impl DedupLayer {
    /// Dedup for consumer `consumer` over `store`, with defaults: key from
    /// [`DefaultKey`], missing key is poison, lease 30 s (extended every 10 s while
    /// the handler runs), retention 7 days, payload fingerprints checked.
    pub fn new(consumer: impl Into<Arc<str>>, store: impl DedupStore) -> Self {
        Self::from_arc(consumer, Arc::new(store))
    }

    /// Like [`new`](Self::new) with a shared store.
    pub fn from_arc(consumer: impl Into<Arc<str>>, store: Arc<dyn DedupStore>) -> Self {
        DedupLayer {
            config: Arc::new(Config {
                consumer: consumer.into(),
                store: Arc::new(Bounded::new(store.clone(), DEFAULT_STORE_TIMEOUT)),
                raw: store,
                store_timeout: DEFAULT_STORE_TIMEOUT,
                extractor: Arc::new(DefaultKey),
                missing: MissingKey::Poison,
                lease: Duration::from_secs(30),
                retention: Duration::from_secs(7 * 24 * 3600),
                min_busy_delay: Duration::from_secs(1),
                fingerprint: true,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        match Arc::get_mut(&mut self.config) {
            Some(c) => f(c),
            None => {
                let c = &*self.config;
                let mut copy = Config {
                    consumer: c.consumer.clone(),
                    store: c.store.clone(),
                    raw: c.raw.clone(),
                    store_timeout: c.store_timeout,
                    extractor: c.extractor.clone(),
                    missing: c.missing,
                    lease: c.lease,
                    retention: c.retention,
                    min_busy_delay: c.min_busy_delay,
                    fingerprint: c.fingerprint,
                };
                f(&mut copy);
                self.config = Arc::new(copy);
            }
        }
        self
    }

    /// Where the key comes from.
    pub fn key(self, extractor: impl KeyExtractor) -> Self {
        let extractor: Arc<dyn KeyExtractor> = Arc::new(extractor);
        self.edit(|c| c.extractor = extractor)
    }

    /// Policy for messages without a key.
    pub fn missing_key(self, policy: MissingKey) -> Self {
        self.edit(|c| c.missing = policy)
    }

    /// Claim lease; extended every third of it while the handler runs. A crashed
    /// worker's claim is free again once it expires.
    pub fn lease(self, lease: Duration) -> Self {
        self.edit(|c| c.lease = lease.max(Duration::from_millis(30)))
    }

    /// How long `done` records are kept. Must cover the longest retry horizon.
    pub fn retention(self, retention: Duration) -> Self {
        self.edit(|c| c.retention = retention)
    }

    /// Shortest delay before retrying a message that is busy elsewhere (default 1 s).
    pub fn min_busy_delay(self, delay: Duration) -> Self {
        self.edit(|c| c.min_busy_delay = delay)
    }

    /// Whether to record a SHA-256 fingerprint of the payload and poison a message
    /// whose key is done with a different payload (default on).
    pub fn fingerprint(self, on: bool) -> Self {
        self.edit(|c| c.fingerprint = on)
    }

    /// Longest time one store call may take, connection or pool wait included
    /// (default [`DEFAULT_STORE_TIMEOUT`], 5 s). A call that runs out of time is a store
    /// failure: transient, and counted by the consumer's circuit breaker.
    pub fn store_timeout(self, timeout: Duration) -> Self {
        let timeout = timeout.max(Duration::from_millis(1));
        self.edit(|c| {
            c.store_timeout = timeout;
            c.store = Arc::new(Bounded::new(c.raw.clone(), timeout));
        })
    }

    /// The store's health probe, bounded by the store timeout (for the circuit breaker).
    pub fn health_check(&self) -> crate::breaker::HealthCheck {
        let store = self.config.store.clone();
        Arc::new(move || {
            let store = store.clone();
            Box::pin(async move { store.health().await })
        })
    }

    /// The configured lease.
    pub fn lease_duration(&self) -> Duration {
        self.config.lease
    }

    /// The configured retention.
    pub fn retention_duration(&self) -> Duration {
        self.config.retention
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = DedupService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DedupService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Service produced by [`DedupLayer`].
#[derive(Clone)]
pub struct DedupService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Service<Message> for DedupService<S>
where
    S: Service<Message, Response = (), Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Processed;
    type Error = HandlerError;
    type Future = BoxFuture<Result<Processed, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        // Take the service that was driven to readiness; leave a clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(run(self.config.clone(), inner, msg))
    }
}

fn store_failure(err: StoreError) -> HandlerError {
    HandlerError::store_unavailable(err)
}

fn timed<T>(start: Instant, op: &'static str, r: T) -> T {
    metrics::histogram!("idem_store_duration_seconds", "op" => op)
        .record(start.elapsed().as_secs_f64());
    r
}

async fn run<S>(config: Arc<Config>, inner: S, msg: Message) -> Result<Processed, HandlerError>
where
    S: Service<Message, Response = (), Error = HandlerError>,
{
    let key = resolve_key(config.extractor.as_ref(), config.missing, &msg)?;
    tracing::Span::current().record("key", key.as_str());
    let scoped = ScopedKey::new(config.consumer.clone(), key.clone());
    claimed(&config, inner, msg, &scoped, key)
        .await
        .map_err(|e| e.with_key(scoped.key()))
}

async fn claimed<S>(
    config: &Config,
    mut inner: S,
    mut msg: Message,
    scoped: &ScopedKey,
    key: String,
) -> Result<Processed, HandlerError>
where
    S: Service<Message, Response = (), Error = HandlerError>,
{
    let owner = OwnerToken::generate();
    let fingerprint = config.fingerprint.then(|| sha256_hex(&msg.body));
    let store = &config.store;

    // A suspect (redelivered) message waits until it can run alone; see `crate::crash`.
    // The turn lasts until the outcome is recorded.
    let guard = CrashGuard::of(&msg);
    let _turn = guard.turn(&msg).await;
    let t = Instant::now();
    let (claim, starts) = timed(
        t,
        "claim",
        store
            .claim_counting(
                scoped,
                &owner,
                fingerprint.as_deref(),
                config.lease,
                config.retention,
            )
            .await,
    )
    .map_err(store_failure)?;
    match claim {
        Claim::Acquired => {
            if let Err(crashed) = guard.check(starts.unwrap_or(0)) {
                warn!(key = %scoped, times = crashed.times, "message crashed or hung the worker too often; dead-lettering it without running it");
                finish(config, scoped, &owner, Completion::Poisoned).await;
                return Err(HandlerError::permanent(crashed));
            }
        }
        Claim::Done {
            completion,
            fingerprint: recorded,
        } => {
            if let (Some(now), Some(then)) = (&fingerprint, &recorded) {
                if now != then {
                    return Err(HandlerError::permanent(PayloadMismatchError(key)));
                }
            }
            let replay =
                crate::read::read_in::<String>(&msg, REPLAY_HEADER).is_some_and(|v| !v.is_empty());
            match (completion, replay) {
                (Completion::Succeeded, _) => return Ok(Processed::Duplicate),
                (Completion::Poisoned, false) => {
                    return Err(HandlerError::permanent(PreviouslyPoisonedError(key)))
                }
                (Completion::Poisoned, true) => {}
            }
            let t = Instant::now();
            let reopened = timed(
                t,
                "reopen",
                store.reopen_poisoned(scoped, &owner, config.lease).await,
            )
            .map_err(store_failure)?;
            if !reopened {
                // Someone else reopened it first, or it changed under us: look again later.
                return Err(HandlerError::busy(config.min_busy_delay));
            }
            debug!(key = %scoped, "operator replay reopened a poisoned record");
        }
        Claim::Busy { retry_in } => {
            let delay = retry_in.clamp(
                config.min_busy_delay,
                config.lease.max(config.min_busy_delay),
            );
            return Err(HandlerError::busy(delay));
        }
    }

    msg.extensions.insert(IdempotencyKey(key));
    let result = with_lease(config, scoped, &owner, inner.call(msg)).await;

    match result {
        Ok(()) => {
            finish(config, scoped, &owner, Completion::Succeeded).await;
            Ok(Processed::Handled)
        }
        Err(e) if e.kind() == Some(ErrorKind::Permanent) => {
            finish(config, scoped, &owner, Completion::Poisoned).await;
            Err(e)
        }
        Err(e) => {
            let t = Instant::now();
            match timed(t, "release", store.release(scoped, &owner).await) {
                Ok(true) => {}
                Ok(false) => warn!(key = %scoped, "lease was lost before release"),
                // The claim frees itself when the lease expires.
                Err(err) => {
                    warn!(key = %scoped, error = %err, "release failed; the lease will expire")
                }
            }
            Err(e)
        }
    }
}

/// Runs the handler future, pushing the lease forward every third of it. The timer is
/// only armed if the handler does not finish on its first poll.
async fn with_lease<F>(config: &Config, key: &ScopedKey, owner: &OwnerToken, fut: F) -> F::Output
where
    F: std::future::Future,
{
    let mut fut = std::pin::pin!(fut);
    let first = std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        std::task::Poll::Ready(out) => std::task::Poll::Ready(Some(out)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await;
    if let Some(out) = first {
        return out;
    }
    let period = config.lease / 3;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = ticker.tick() => {
                match config.store.extend(key, owner, config.lease).await {
                    Ok(true) => {}
                    Ok(false) => warn!(key = %key, "lease lost while the handler runs; another worker may take over"),
                    Err(err) => warn!(key = %key, error = %err, "lease extension failed"),
                }
            }
        }
    }
}

/// Writes the `done` record. The handler's effect has happened, so a store failure
/// here does not turn into a retry (which would run the effect again); it is retried
/// briefly, then logged, and the claim stays `processing` until its lease expires.
async fn finish(config: &Config, key: &ScopedKey, owner: &OwnerToken, completion: Completion) {
    let mut backoff = Duration::from_millis(50);
    for attempt in 1..=3 {
        let t = Instant::now();
        match timed(
            t,
            "complete",
            config
                .store
                .complete(key, owner, completion, config.retention)
                .await,
        ) {
            Ok(true) => return,
            Ok(false) => {
                warn!(key = %key, "lease expired before completion; another worker may run this message again");
                metrics::counter!("idem_dedup_lease_lost_total").increment(1);
                return;
            }
            Err(err) if attempt == 3 => {
                warn!(key = %key, error = %err, "could not record completion; a redelivery before the lease expires is retried, after it runs again");
                metrics::counter!("idem_dedup_complete_failed_total").increment(1);
            }
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
}
