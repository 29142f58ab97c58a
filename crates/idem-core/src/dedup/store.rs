use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::BoxError;

/// A store's health probe: resolves `Ok` once the store answers. The circuit breaker
/// runs it while open ([`crate::breaker`]). Build one from an async block:
/// `Arc::new(move || Box::pin(async move { .. }))`.
pub type HealthCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>> + Send + Sync>;

/// An idempotency key scoped by consumer name: two consumers of one message (fan-out)
/// each have their own record.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ScopedKey {
    consumer: Arc<str>,
    key: String,
}

impl ScopedKey {
    /// A key for this consumer.
    pub fn new(consumer: impl Into<Arc<str>>, key: impl Into<String>) -> Self {
        ScopedKey {
            consumer: consumer.into(),
            key: key.into(),
        }
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The idempotency key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for ScopedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.consumer, self.key)
    }
}

/// Identifies one claim. Complete, release and extend succeed only for the token that
/// holds the claim (fencing), so a worker whose lease expired cannot overwrite the
/// state of the worker that took over.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OwnerToken(String);

impl OwnerToken {
    /// A fresh token: a random per-process part (a UUIDv4 drawn once) and a counter,
    /// so tokens are unique across processes without a system call per message.
    pub fn generate() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::OnceLock;
        static PROCESS: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let process = PROCESS.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        OwnerToken(format!("{process:016x}{n:016x}"))
    }

    /// The token as a string (32 hex characters for generated tokens).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for OwnerToken {
    fn from(s: String) -> Self {
        OwnerToken(s)
    }
}

/// How a message ended, as recorded in a `done` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The handler succeeded.
    Succeeded,
    /// The message was poison (dead-lettered at once). A replay by an operator
    /// (header `x-idem-replay`) may reopen the record.
    Poisoned,
}

/// Result of a claim attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller now holds the claim until the lease expires.
    Acquired,
    /// Already processed.
    Done {
        /// How it ended.
        completion: Completion,
        /// The payload fingerprint recorded with the claim, if any.
        fingerprint: Option<String>,
    },
    /// Another owner holds a live lease.
    Busy {
        /// Time left on that lease.
        retry_in: Duration,
    },
}

/// A dedup store failed (unreachable, timed out, ...). Always treated as transient:
/// the message is retried, never assumed to be a duplicate, and the handler never runs
/// without a claim.
///
/// [`kind`](Self::kind) says what went wrong, for code that must tell a store that
/// did not answer in time from one that refused a statement (health probes, alerts).
/// The message says it for people; the [`source`](std::error::Error::source) is the
/// driver's own error when there is one.
///
/// Cloning is cheap (the cause is shared): a batched store call that fails hands every
/// operation in the batch its own copy of the error (see [`Batcher`](super::Batcher)).
#[derive(Clone, Debug, thiserror::Error)]
#[error("dedup store unavailable: {message}")]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

/// What kind of failure a [`StoreError`] is.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreErrorKind {
    /// The store did not answer within the dedup stage's store timeout, or the
    /// driver's own timeout (the operation may still have happened).
    Timeout,
    /// The store could not be reached: connection refused or dropped, I/O or TLS
    /// failure, no connection left in the pool.
    Unavailable,
    /// The store answered with an error: a database error (a missing table, a
    /// permission, a constraint), a script error, an answer idem does not understand.
    Refused,
    /// The operation was not sent: its arguments break a limit of the store (a key or
    /// owner longer than the table allows).
    Invalid,
    /// Anything else.
    Other,
}

impl StoreError {
    /// An error of kind [`StoreErrorKind::Other`] with a message (which must not
    /// contain credentials). Set the kind with [`with_kind`](Self::with_kind).
    pub fn new(message: impl Into<String>) -> Self {
        StoreError {
            kind: StoreErrorKind::Other,
            message: message.into(),
            source: None,
        }
    }

    /// An error of kind [`StoreErrorKind::Other`] with a message and its cause.
    pub fn with_source(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError {
            kind: StoreErrorKind::Other,
            message: message.into(),
            source: Some(Arc::from(source.into())),
        }
    }

    /// This error with kind `kind`.
    #[must_use]
    pub fn with_kind(mut self, kind: StoreErrorKind) -> Self {
        self.kind = kind;
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

/// A claim of `key` by `owner`: what [`extend`](DedupStore::extend),
/// [`complete`](DedupStore::complete), [`release`](DedupStore::release) and
/// [`reopen_poisoned`](DedupStore::reopen_poisoned) act on (one key of a
/// [`DedupStore::release_many`] call), and the heart of every request.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldClaim {
    /// The key.
    pub key: ScopedKey,
    /// The token that holds (or is to hold) the claim.
    pub owner: OwnerToken,
}

impl HeldClaim {
    /// `owner`'s claim of `key`.
    pub fn new(key: ScopedKey, owner: OwnerToken) -> Self {
        HeldClaim { key, owner }
    }
}

/// A claim attempt ([`DedupStore::claim`], one key of a [`DedupStore::claim_many`]
/// call): the key, the token that is to hold the claim, and the payload fingerprint
/// to record with it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClaimRequest {
    /// The key and the token that holds the claim if it is acquired.
    pub held: HeldClaim,
    /// The payload fingerprint recorded with the claim.
    pub fingerprint: Option<String>,
}

impl ClaimRequest {
    /// A claim of `key` for `owner`, recording `fingerprint`.
    pub fn new(key: ScopedKey, owner: OwnerToken, fingerprint: Option<String>) -> Self {
        ClaimRequest {
            held: HeldClaim::new(key, owner),
            fingerprint,
        }
    }
}

/// One key of a [`DedupStore::complete_many`] call.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompleteRequest {
    /// The key and the token that holds the claim.
    pub held: HeldClaim,
    /// How the message ended.
    pub completion: Completion,
}

impl CompleteRequest {
    /// `owner`'s claim of `key`, to be recorded done with `completion`.
    pub fn new(key: ScopedKey, owner: OwnerToken, completion: Completion) -> Self {
        CompleteRequest {
            held: HeldClaim::new(key, owner),
            completion,
        }
    }
}

/// What a store call answers: the value, or the [`StoreError`] that kept it from
/// answering.
pub type StoreResult<T> = Result<T, StoreError>;

/// A counting claim's answer ([`DedupStore::claim_counting`]): the claim, and how many
/// earlier starts of the message ended unsettled (`None` when the store does not count
/// starts).
pub type CountedClaim = (Claim, Option<u32>);

/// What a call on many keys answers ([`DedupStore::claim_many`],
/// [`complete_many`](DedupStore::complete_many),
/// [`release_many`](DedupStore::release_many)): one answer per key, in the order of
/// the call.
pub type Answers<T> = Vec<StoreResult<T>>;

/// The times a store applies to what a call writes, fixed by the dedup stage's
/// settings and handed to every [`DedupStore`] call whole, so that a store reads the
/// one it needs and a new time setting changes no signature.
///
/// Built with [`Terms::new`]; the fields may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Terms {
    /// How long a claim (or an extension of it, or a reopened poisoned record) is held
    /// before another worker may take the key over.
    pub lease: Duration,
    /// How long a `done` record is kept. Counted starts of a message
    /// ([`DedupStore::claim_counting`]) are remembered as long.
    pub retention: Duration,
}

impl Terms {
    /// Claims held for `lease`; `done` records and counted starts kept for `retention`.
    pub const fn new(lease: Duration, retention: Duration) -> Self {
        Terms { lease, retention }
    }
}

/// The dedup state machine of a store:
/// `absent -> processing(owner, lease) -> done(retention)`, `processing -> absent` on
/// release. Every implementation must make each method a single atomic step. The times
/// come in the [`Terms`] of each call.
///
/// The behavioural test suite `idem_core::conformance` (feature `conformance`) runs
/// against every implementation of idem; run it against yours.
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    /// Takes the claim of `req.held.key` for `req.held.owner`, for `terms.lease`, if
    /// the key is absent or its lease has expired; records the payload fingerprint
    /// with it.
    async fn claim(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<Claim>;

    /// [`claim`](Self::claim), counting the start: an acquired claim is recorded as a
    /// start of the message, and the answer says how many earlier starts of it ended
    /// without a settled outcome (its worker crashed, was killed or hung until the
    /// lease expired). `complete` and `release` clear the count; it is kept for
    /// `terms.retention` otherwise. `None`: this store does not count starts, and
    /// crash loops are not detected (the default implementation).
    ///
    /// The count is that of the *earlier* starts: `Some(0)` for a first start.
    async fn claim_counting(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<CountedClaim> {
        Ok((self.claim(req, terms).await?, None))
    }

    /// Pushes the lease of a held claim forward, to `terms.lease` from now. `false` if
    /// its owner no longer holds it.
    async fn extend(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool>;

    /// `processing -> done`, ended `how`, kept for `terms.retention`. `false` if the
    /// owner no longer holds the claim (nothing is changed then).
    async fn complete(&self, held: &HeldClaim, how: Completion, terms: Terms) -> StoreResult<bool>;

    /// `processing -> absent`. `false` if the owner no longer holds the claim.
    async fn release(&self, held: &HeldClaim) -> StoreResult<bool>;

    /// `done(poisoned) -> processing(owner)` for `terms.lease`, for an operator's
    /// replay of a dead-lettered poison message. `false` if the record is anything else.
    async fn reopen_poisoned(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool>;

    /// [`claim_counting`](Self::claim_counting) of many keys in one call (the dedup
    /// layer's [batch handlers](crate::batch)): one answer per request, in order, each
    /// exactly what `claim_counting` would answer for it alone. `terms` apply to every
    /// key. The keys of one call are distinct.
    ///
    /// A call that fails as a whole answers each request with a copy of its error. The
    /// default claims the keys one after the other; stores with a round trip per call
    /// override it to claim them all in one.
    async fn claim_many(&self, requests: &[ClaimRequest], terms: Terms) -> Answers<CountedClaim> {
        let mut answers = Vec::with_capacity(requests.len());
        for r in requests {
            answers.push(self.claim_counting(r, terms).await);
        }
        answers
    }

    /// [`complete`](Self::complete) of many held claims in one call, each kept for
    /// `terms.retention`: one answer per request, in order, as `complete` would answer
    /// it. The default completes them one after the other.
    async fn complete_many(&self, requests: &[CompleteRequest], terms: Terms) -> Answers<bool> {
        let mut answers = Vec::with_capacity(requests.len());
        for r in requests {
            answers.push(self.complete(&r.held, r.completion, terms).await);
        }
        answers
    }

    /// [`release`](Self::release) of many held claims in one call: one answer per
    /// claim, in order. The default releases them one after the other.
    async fn release_many(&self, claims: &[HeldClaim]) -> Answers<bool> {
        let mut answers = Vec::with_capacity(claims.len());
        for held in claims {
            answers.push(self.release(held).await);
        }
        answers
    }

    /// A cheap round trip proving the store answers, used by the consumer's circuit
    /// breaker to decide when an outage is over. The default extends the lease of a
    /// key that no one holds (`idem-health/probe`): one read that changes nothing.
    /// Stores with a cheaper ping may override it.
    async fn health(&self) -> StoreResult<()> {
        let probe = HeldClaim::new(
            ScopedKey::new("idem-health", "probe"),
            OwnerToken("idem-health-probe".to_owned()),
        );
        let blink = Duration::from_millis(1);
        self.extend(&probe, Terms::new(blink, blink))
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl<T: DedupStore + ?Sized> DedupStore for Arc<T> {
    async fn claim(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<Claim> {
        (**self).claim(req, terms).await
    }
    async fn claim_counting(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<CountedClaim> {
        (**self).claim_counting(req, terms).await
    }
    async fn extend(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        (**self).extend(held, terms).await
    }
    async fn complete(&self, held: &HeldClaim, how: Completion, terms: Terms) -> StoreResult<bool> {
        (**self).complete(held, how, terms).await
    }
    async fn release(&self, held: &HeldClaim) -> StoreResult<bool> {
        (**self).release(held).await
    }
    async fn reopen_poisoned(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        (**self).reopen_poisoned(held, terms).await
    }
    async fn claim_many(&self, requests: &[ClaimRequest], terms: Terms) -> Answers<CountedClaim> {
        (**self).claim_many(requests, terms).await
    }
    async fn complete_many(&self, requests: &[CompleteRequest], terms: Terms) -> Answers<bool> {
        (**self).complete_many(requests, terms).await
    }
    async fn release_many(&self, claims: &[HeldClaim]) -> Answers<bool> {
        (**self).release_many(claims).await
    }
    async fn health(&self) -> StoreResult<()> {
        (**self).health().await
    }
}
