use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tower::{Layer, Service};
use tracing::{debug, warn};

use super::admission::{admit, Admission, Claimed, DedupSettings};
use super::bounded::Bounded;
use super::key::{KeyExtractor, MissingKey};
use super::store::{
    Claim, ClaimRequest, CompleteRequest, Completion, DedupStore, HeldClaim, OwnerToken, ScopedKey,
    StoreError, Terms,
};
use crate::__private::BoxFuture;
use crate::error::HandlerError;
use crate::message::Message;

pub use crate::headers::REPLAY as REPLAY_HEADER;

/// Header an operator's edit sets: see [`headers::EDITED`](crate::headers::EDITED).
pub use crate::headers::EDITED as EDITED_HEADER;
/// Header an operator's edit sets: see
/// [`headers::ORIGINAL_FINGERPRINT`](crate::headers::ORIGINAL_FINGERPRINT).
pub use crate::headers::ORIGINAL_FINGERPRINT as ORIGINAL_FINGERPRINT_HEADER;

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
#[error("idempotency key {0:?} was dead-lettered as poison before; dead-lettering this copy too (replay with header x-idem-replay to run it)")]
pub struct PreviouslyPoisonedError(pub String);

/// The key was done with a different payload fingerprint. Permanent.
#[derive(Debug, thiserror::Error)]
#[error("idempotency key {0:?} was already processed with a different payload")]
pub struct PayloadMismatchError(pub String);

#[derive(Clone)]
pub(super) struct Config {
    /// The key scope: the consumer's name once a consumer wraps the layer.
    pub(super) scope: Arc<str>,
    /// Whether [`DedupLayer::scope`] was called.
    scope_set: bool,
    /// `raw` behind [`Bounded`] (the store timeout).
    pub(super) store: Arc<dyn DedupStore>,
    raw: Arc<dyn DedupStore>,
    pub(super) settings: DedupSettings,
    /// The lease, and the retention of `settings`: what every store call applies.
    pub(super) terms: Terms,
}

/// Default scope of a layer used on its own (outside a consumer) without
/// [`DedupLayer::scope`].
const DEFAULT_SCOPE: &str = "default";

/// Layer applying idempotency-key dedup through a lease [`DedupStore`]. See the
/// [module docs](super).
///
/// Built like every idem store and inbox: `new` with what is required, then chained
/// setters named after the setting (`.lease(..)`, `.retention(..)`), each returning
/// the layer; current values are read back through [`settings`](Self::settings) and
/// [`lease_duration`](Self::lease_duration). The settings shared with the SQL inbox
/// live in one [`DedupSettings`].
#[derive(Clone)]
pub struct DedupLayer {
    pub(super) config: Arc<Config>,
}

impl std::fmt::Debug for DedupLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupLayer")
            .field("scope", &self.config.scope)
            .field("settings", &self.config.settings)
            .field("lease", &self.config.terms.lease)
            .finish_non_exhaustive()
    }
}

impl DedupLayer {
    /// Dedup over `store`, with the [`DedupSettings`] defaults (key from
    /// [`DefaultKey`](super::DefaultKey), missing key is poison, retention 7 days,
    /// payload fingerprints checked) and a lease of 30 s (extended every 10 s while
    /// the handler runs). Keys are scoped by the name of the consumer the layer is
    /// given to (`Consumer::builder(name).dedup(layer)`).
    pub fn new(store: impl DedupStore) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// Like [`new`](Self::new) with a shared store.
    pub fn from_arc(store: Arc<dyn DedupStore>) -> Self {
        let settings = DedupSettings::default();
        DedupLayer {
            config: Arc::new(Config {
                scope: DEFAULT_SCOPE.into(),
                scope_set: false,
                store: Arc::new(Bounded::new(
                    store.clone(),
                    settings.effective_store_timeout(),
                )),
                raw: store,
                terms: Terms::new(Duration::from_secs(30), settings.retention),
                settings,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    fn edit_settings(self, f: impl FnOnce(&mut DedupSettings)) -> Self {
        self.edit(|c| {
            f(&mut c.settings);
            c.terms = Terms::new(c.terms.lease, c.settings.retention);
            c.store = Arc::new(Bounded::new(
                c.raw.clone(),
                c.settings.effective_store_timeout(),
            ));
        })
    }

    /// The key scope when the layer is used on its own as a tower layer (default
    /// `"default"`). A consumer replaces it with its own name, so that keys are always
    /// scoped by the name in `x-idem-consumer`; a different name set here is logged
    /// (`warn`) and ignored then.
    pub fn scope(self, name: impl Into<Arc<str>>) -> Self {
        let name = name.into();
        self.edit(|c| {
            c.scope = name;
            c.scope_set = true;
        })
    }

    /// Where the key comes from ([`DedupSettings::key`]).
    pub fn key(self, extractor: impl KeyExtractor) -> Self {
        let extractor: Arc<dyn KeyExtractor> = Arc::new(extractor);
        self.edit_settings(|s| s.key = extractor)
    }

    /// Policy for messages without a key ([`DedupSettings::missing_key`]).
    pub fn missing_key(self, policy: MissingKey) -> Self {
        self.edit_settings(|s| s.missing_key = policy)
    }

    /// How long `done` records are kept ([`DedupSettings::retention`]). Must cover the
    /// longest retry horizon.
    pub fn retention(self, retention: Duration) -> Self {
        self.edit_settings(|s| s.retention = retention)
    }

    /// Whether to record a SHA-256 fingerprint of the payload and poison a message
    /// whose key is done with a different payload ([`DedupSettings::fingerprint`],
    /// default on).
    pub fn fingerprint(self, on: bool) -> Self {
        self.edit_settings(|s| s.fingerprint = on)
    }

    /// Shortest delay before retrying a message that is busy elsewhere
    /// ([`DedupSettings::min_busy_delay`], default 1 s).
    pub fn min_busy_delay(self, delay: Duration) -> Self {
        self.edit_settings(|s| s.min_busy_delay = delay)
    }

    /// Longest time one store call may take, connection or pool wait included
    /// ([`DedupSettings::store_timeout`], default 5 s). A call that runs out of time
    /// is a store failure: transient, and counted by the consumer's circuit breaker.
    pub fn store_timeout(self, timeout: Duration) -> Self {
        self.edit_settings(|s| s.store_timeout = timeout)
    }

    /// Replaces every shared setting at once (e.g. the same settings as an inbox).
    pub fn settings(self, settings: DedupSettings) -> Self {
        self.edit_settings(|s| *s = settings)
    }

    /// Claim lease (default 30 s, at least 30 ms); extended every third of it while
    /// the handler runs. A crashed worker's claim is free again once it expires.
    pub fn lease(self, lease: Duration) -> Self {
        let lease = lease.max(Duration::from_millis(30));
        self.edit(|c| c.terms = Terms::new(lease, c.settings.retention))
    }

    /// The shared settings in force.
    pub fn dedup_settings(&self) -> &DedupSettings {
        &self.config.settings
    }

    /// The configured lease.
    pub fn lease_duration(&self) -> Duration {
        self.config.terms.lease
    }

    /// The store's health probe, bounded by the store timeout (for the circuit breaker).
    pub fn health_check(&self) -> super::store::HealthCheck {
        let store = self.config.store.clone();
        Arc::new(move || {
            let store = store.clone();
            Box::pin(async move { store.health().await })
        })
    }

    /// This layer with its keys scoped by consumer `consumer` (what a consumer does
    /// when it wraps its handler stack).
    pub(crate) fn for_consumer(&self, consumer: Arc<str>) -> DedupLayer {
        if self.config.scope_set && *self.config.scope != *consumer {
            warn!(
                scope = %self.config.scope,
                consumer = %consumer,
                "DedupLayer::scope differs from the consumer name; keys are scoped by the consumer name"
            );
        }
        self.clone().edit(|c| c.scope = consumer)
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

impl<S> std::fmt::Debug for DedupService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupService")
            .field("scope", &self.config.scope)
            .finish_non_exhaustive()
    }
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
        let config = self.config.clone();
        Box::pin(async move {
            let open = |key: &str, fingerprint: Option<&str>| {
                Ok(LeaseSession {
                    config: config.clone(),
                    request: ClaimRequest::new(
                        ScopedKey::new(config.scope.clone(), key),
                        OwnerToken::generate(),
                        fingerprint.map(str::to_owned),
                    ),
                })
            };
            admit(&config.settings, open, inner, msg).await
        })
    }
}

pub(super) fn store_failure(err: StoreError) -> HandlerError {
    HandlerError::store_unavailable(err)
}

pub(super) fn timed<T>(start: Instant, op: &'static str, r: T) -> T {
    metrics::histogram!("idem_store_duration_seconds", "op" => op)
        .record(start.elapsed().as_secs_f64());
    r
}

/// One message's admission through a lease store: its claim request, built once and
/// borrowed by every store call of the message.
pub(super) struct LeaseSession {
    pub(super) config: Arc<Config>,
    pub(super) request: ClaimRequest,
}

impl LeaseSession {
    /// The key and owner of this message's claim.
    pub(super) fn held(&self) -> &HeldClaim {
        &self.request.held
    }

    /// The message's key.
    pub(super) fn key(&self) -> &ScopedKey {
        &self.request.held.key
    }
}

/// What the layer makes of a store's claim answer: a busy key's wait is at most the
/// lease.
pub(super) fn claimed(claim: Claim, lease: Duration) -> Claimed {
    match claim {
        Claim::Acquired => Claimed::Acquired,
        Claim::Done {
            completion,
            fingerprint,
        } => Claimed::Done {
            completion,
            fingerprint,
        },
        Claim::Busy { retry_in } => Claimed::Busy {
            retry_in: Some(retry_in.min(lease)),
        },
    }
}

impl Admission for LeaseSession {
    async fn claim(&mut self) -> Result<(Claimed, u32), HandlerError> {
        let c = &self.config;
        let t = Instant::now();
        let (claim, starts) = timed(
            t,
            "claim",
            c.store.claim_counting(&self.request, c.terms).await,
        )
        .map_err(store_failure)?;
        Ok((claimed(claim, c.terms.lease), starts.unwrap_or(0)))
    }

    async fn reopen(&mut self) -> Result<bool, HandlerError> {
        let t = Instant::now();
        timed(
            t,
            "reopen",
            self.config
                .store
                .reopen_poisoned(self.held(), self.config.terms)
                .await,
        )
        .map_err(store_failure)
    }

    async fn declined(&mut self) {}

    fn guard<F>(&mut self, handler: F) -> impl Future<Output = F::Output> + Send
    where
        F: Future + Send,
        F::Output: Send,
    {
        with_lease(&self.config, std::slice::from_ref(self), handler)
    }

    async fn succeeded(&mut self) -> Result<(), HandlerError> {
        finish(&self.config, &[(&*self, Completion::Succeeded)]).await;
        Ok(())
    }

    async fn poisoned(&mut self) {
        finish(&self.config, &[(&*self, Completion::Poisoned)]).await;
    }

    async fn released(&mut self) {
        release(&self.config, &[&*self]).await;
    }
}

/// Gives the claims of `sessions` back: one `release` call for one, one
/// `release_many` call for several. Failures are logged: a claim that was not
/// released frees itself when its lease expires.
pub(super) async fn release(config: &Config, sessions: &[&LeaseSession]) {
    let t = Instant::now();
    let answers = match sessions {
        [] => return,
        [one] => vec![config.store.release(one.held()).await],
        many => {
            let claims: Vec<HeldClaim> = many.iter().map(|s| s.held().clone()).collect();
            config.store.release_many(&claims).await
        }
    };
    let answers = timed(t, "release", answers);
    for (session, released) in sessions.iter().zip(padded(answers, sessions.len())) {
        match released {
            Ok(true) => {}
            Ok(false) => warn!(key = %session.key(), "lease was lost before release"),
            Err(err) => {
                warn!(key = %session.key(), error = %err, "release failed; the lease will expire")
            }
        }
    }
}

/// `answers` of a store call for `n` keys, exactly `n` of them: a missing answer is
/// a store error.
pub(super) fn padded<T>(
    mut answers: Vec<Result<T, StoreError>>,
    n: usize,
) -> Vec<Result<T, StoreError>> {
    answers.truncate(n);
    while answers.len() < n {
        answers.push(Err(StoreError::new(
            "the store answered fewer keys than it was asked",
        )));
    }
    answers
}

/// Runs the handler future, pushing the leases of `held` (one message's, or a batch's)
/// forward every third of the lease, all at once. The timer is only armed if the
/// handler does not finish on its first poll.
///
/// If this future is dropped before the handler finishes (its worker was dropped, or a
/// process crashed), the claim is left as it is: it frees itself when the lease runs
/// out, and the crash-loop guard counts that start as one that never settled.
pub(super) async fn with_lease<F>(config: &Config, held: &[LeaseSession], fut: F) -> F::Output
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
    let period = config.terms.lease / 3;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = ticker.tick() => {
                let extended = held
                    .iter()
                    .map(|s| async move { (s.key(), config.store.extend(s.held(), config.terms).await) });
                for (key, answer) in futures_util::future::join_all(extended).await {
                    match answer {
                        Ok(true) => {}
                        Ok(false) => warn!(key = %key, "lease lost while the handler runs; another worker may take over"),
                        Err(err) => warn!(key = %key, error = %err, "lease extension failed"),
                    }
                }
            }
        }
    }
}

/// Writes the `done` records of `done` (one message's, or a batch's): one `complete`
/// call for one, one `complete_many` call for several. The handlers' effects have
/// happened, so a store failure here does not turn into a retry (which would run the
/// effects again); the keys that failed are retried briefly, together, then logged,
/// and their claims stay `processing` until their leases expire.
pub(super) async fn finish(config: &Config, done: &[(&LeaseSession, Completion)]) {
    let mut pending: Vec<(&LeaseSession, Completion)> = done.to_vec();
    let mut backoff = Duration::from_millis(50);
    for attempt in 1..=3 {
        let t = Instant::now();
        let answers = match pending.as_slice() {
            [] => return,
            [(one, completion)] => vec![
                config
                    .store
                    .complete(one.held(), *completion, config.terms)
                    .await,
            ],
            many => {
                let requests: Vec<CompleteRequest> = many
                    .iter()
                    .map(|(s, c)| {
                        CompleteRequest::new(s.key().clone(), s.request.held.owner.clone(), *c)
                    })
                    .collect();
                config.store.complete_many(&requests, config.terms).await
            }
        };
        let answers = padded(timed(t, "complete", answers), pending.len());
        let mut failed = Vec::new();
        for ((session, completion), answer) in pending.into_iter().zip(answers) {
            match answer {
                Ok(true) => {}
                Ok(false) => complete_after_expiry(session, completion).await,
                Err(err) if attempt == 3 => {
                    warn!(key = %session.key(), error = %err, "could not record completion; a redelivery before the lease expires is retried, after it runs again");
                    metrics::counter!("idem_dedup_complete_failed_total").increment(1);
                }
                Err(_) => failed.push((session, completion)),
            }
        }
        if failed.is_empty() {
            return;
        }
        pending = failed;
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
}

/// The lease ran out before the `done` record was written (a store or process too
/// slow to extend it in time). The effect has happened: unless another owner took the
/// key meanwhile, claim it again under a fresh token and write the record at once, so
/// a later copy is a duplicate instead of a second run.
pub(super) async fn complete_after_expiry(session: &LeaseSession, completion: Completion) {
    let LeaseSession { config, request } = session;
    let key = &request.held.key;
    // A rare path (the lease ran out): the fresh claim may copy the request.
    let fresh = ClaimRequest::new(
        key.clone(),
        OwnerToken::generate(),
        request.fingerprint.clone(),
    );
    let store = &config.store;
    let reclaimed = store.claim(&fresh, config.terms).await;
    let recorded = match reclaimed {
        Ok(Claim::Acquired) => store
            .complete(&fresh.held, completion, config.terms)
            .await
            .unwrap_or(false),
        // Another owner recorded it meanwhile: a later copy is a duplicate.
        Ok(Claim::Done { .. }) => true,
        Ok(Claim::Busy { .. }) | Err(_) => false,
    };
    if recorded {
        debug!(key = %key, "lease expired before completion; no one had taken the key, completion recorded");
        metrics::counter!("idem_dedup_lease_recovered_total").increment(1);
    } else {
        warn!(key = %key, "lease expired before completion and another worker holds the key; it may run this message again");
        metrics::counter!("idem_dedup_lease_lost_total").increment(1);
    }
}
