//! The settings and the admission steps every dedup stage shares.
//!
//! A dedup stage (the lease-store [`DedupLayer`](super::DedupLayer), the SQL
//! transactional inbox) decides for each message whether its handler runs. The
//! decision is the same everywhere; only the storage differs. [`admit`] holds the
//! decision; a stage supplies the storage steps as an [`Admission`] session.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tower::Service;
use tracing::{debug, warn};

use super::bounded::DEFAULT_STORE_TIMEOUT;
use super::key::IdempotencyKey;
use super::key::{resolve_key, sha256_hex, DefaultKey, KeyExtractor, MissingKey};
use super::layer::{
    PayloadMismatchError, PreviouslyPoisonedError, Processed, ORIGINAL_FINGERPRINT_HEADER,
    REPLAY_HEADER,
};
use super::store::Completion;
use crate::crash::CrashGuard;
use crate::error::{ErrorKind, HandlerError};
use crate::message::Message;

/// The settings every dedup stage shares: where the key comes from, how long records
/// are kept, how long a store step may take. Both the lease-store
/// [`DedupLayer`](super::DedupLayer) and the SQL inbox have one, set through setters
/// of the same names on the stage (`.key(..)`, `.missing_key(..)`, `.retention(..)`,
/// `.fingerprint(..)`, `.min_busy_delay(..)`, `.store_timeout(..)`), and read back
/// through the stage's `settings()`.
///
/// The fields are public for reading; the struct is `#[non_exhaustive]`, so start
/// from [`DedupSettings::default`] to build one by hand.
#[derive(Clone)]
#[non_exhaustive]
pub struct DedupSettings {
    /// Where the key comes from (default [`DefaultKey`]).
    pub key: Arc<dyn KeyExtractor>,
    /// Policy for messages without a key (default [`MissingKey::Poison`]).
    pub missing_key: MissingKey,
    /// How long `done` records are kept (default 7 days). Must cover the longest
    /// retry horizon; the consumer builder refuses a shorter one.
    pub retention: Duration,
    /// Whether a SHA-256 fingerprint of the payload is recorded, and a message whose
    /// key is done with a different payload is poison (default on).
    pub fingerprint: bool,
    /// Shortest delay before retrying a message whose key is being processed
    /// elsewhere (default 1 s).
    pub min_busy_delay: Duration,
    /// Longest time one of the stage's own store steps may take, connection or pool
    /// wait included (default [`DEFAULT_STORE_TIMEOUT`], 5 s, at least 1 ms). A step
    /// that runs out of time is a store failure: transient, and counted by the
    /// consumer's circuit breaker.
    pub store_timeout: Duration,
}

impl Default for DedupSettings {
    fn default() -> Self {
        DedupSettings {
            key: Arc::new(DefaultKey),
            missing_key: MissingKey::Poison,
            retention: Duration::from_secs(7 * 24 * 3600),
            fingerprint: true,
            min_busy_delay: Duration::from_secs(1),
            store_timeout: DEFAULT_STORE_TIMEOUT,
        }
    }
}

impl fmt::Debug for DedupSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupSettings")
            .field("missing_key", &self.missing_key)
            .field("retention", &self.retention)
            .field("fingerprint", &self.fingerprint)
            .field("min_busy_delay", &self.min_busy_delay)
            .field("store_timeout", &self.store_timeout)
            .finish_non_exhaustive()
    }
}

impl DedupSettings {
    /// The store timeout in force: [`store_timeout`](Self::store_timeout), at least 1 ms.
    pub fn effective_store_timeout(&self) -> Duration {
        self.store_timeout.max(Duration::from_millis(1))
    }
}

/// What a stage found when it tried to claim a message's key.
#[derive(Debug)]
pub enum Claimed {
    /// The claim is ours: the handler may run.
    Acquired,
    /// The key is done.
    Done {
        /// How it ended.
        completion: Completion,
        /// The payload fingerprint recorded with it, if any.
        fingerprint: Option<String>,
    },
    /// Someone else holds the key; it may be free after `retry_in` (the stage's
    /// guess, at most its lease), else after [`DedupSettings::min_busy_delay`].
    Busy {
        /// When it may be free.
        retry_in: Option<Duration>,
    },
}

/// The storage steps of one message's admission, supplied by a dedup stage. Each
/// session is for one key; [`admit`] calls the steps in this order: `claim`, then
/// `reopen` (operator replay of a poisoned key), then either `declined` (not admitted)
/// or `prepare`, `guard` around the handler and one of `succeeded`, `poisoned`,
/// `released`. A crash-looping message goes from `claim` straight to `poisoned`.
pub trait Admission: Send {
    /// Claims the key; returns what was found and how many earlier starts of the
    /// message never settled (0 if the stage does not count starts).
    fn claim(&mut self) -> impl Future<Output = Result<(Claimed, u32), HandlerError>> + Send;

    /// `done(poisoned) -> claimed`, for an operator's replay. `false`: someone else
    /// changed the record first.
    fn reopen(&mut self) -> impl Future<Output = Result<bool, HandlerError>> + Send;

    /// The message was not admitted (duplicate, busy, poisoned, mismatch): undo what
    /// `claim` started.
    fn declined(&mut self) -> impl Future<Output = ()> + Send;

    /// Puts what the handler needs from the stage into the message (e.g. its
    /// transaction). The [`IdempotencyKey`] is already there.
    fn prepare(&mut self, msg: &mut Message) {
        let _ = msg;
    }

    /// Runs the handler future, keeping the claim alive while it runs.
    fn guard<F>(&mut self, handler: F) -> impl Future<Output = F::Output> + Send
    where
        F: Future + Send,
        F::Output: Send,
    {
        handler
    }

    /// The handler succeeded: record `done(succeeded)`. An error means the outcome
    /// was not recorded and the effect did not happen (a transactional stage); a
    /// stage whose effect has already happened logs instead of failing.
    fn succeeded(&mut self) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// The message is poison (the handler failed permanently, or it crash-looped):
    /// record `done(poisoned)`. Failures are logged.
    fn poisoned(&mut self) -> impl Future<Output = ()> + Send;

    /// The handler failed transiently: give the key back. Failures are logged.
    fn released(&mut self) -> impl Future<Output = ()> + Send;
}

/// One message of a batch after [`Reading::batch`]: the message and its reading
/// while it is still on its way, and its answer once it is known.
#[derive(Debug)]
pub struct BatchEntry {
    /// The message (`None` once it has no further step: its key could not be read).
    pub msg: Option<Message>,
    /// Its key and fingerprint, if the key could be read.
    pub reading: Option<Reading>,
    /// Set once the message's outcome is known.
    pub answer: Option<Result<Processed, HandlerError>>,
}

/// What admission reads from a message besides its key: its payload fingerprint
/// (when fingerprints are on), whether an operator replays it, and the fingerprint of
/// the body an operator edited it from.
#[derive(Debug)]
pub struct Reading {
    /// The key.
    pub key: String,
    /// SHA-256 of the body, if the settings record fingerprints.
    pub fingerprint: Option<String>,
    replay: bool,
    edited_from: Option<String>,
}

impl Reading {
    /// Reads `msg`, whose key is `key`.
    pub fn of(settings: &DedupSettings, msg: &Message, key: &str) -> Self {
        Reading {
            key: key.to_owned(),
            fingerprint: settings.fingerprint.then(|| sha256_hex(&msg.body)),
            replay: crate::read::read_in::<String>(msg, REPLAY_HEADER)
                .is_some_and(|v| !v.is_empty()),
            edited_from: crate::read::read_in::<String>(msg, ORIGINAL_FINGERPRINT_HEADER)
                .filter(|v| !v.is_empty()),
        }
    }

    /// Resolves `msg`'s key with the settings' extractor and reads it.
    pub fn resolve(settings: &DedupSettings, msg: &Message) -> Result<Self, HandlerError> {
        let key = resolve_key(settings.key.as_ref(), settings.missing_key, msg)?;
        Ok(Reading::of(settings, msg, &key))
    }

    /// Reads every message of a batch, in order. A message whose key cannot be
    /// resolved gets the `missing_key` policy's answer; a key already seen earlier in
    /// the batch is answered busy (retried once its twin has settled). Each key found
    /// is recorded in its message's context, so the failure record names it however
    /// the batch ends.
    pub fn batch(settings: &DedupSettings, messages: Vec<Message>) -> Vec<BatchEntry> {
        let mut seen = std::collections::HashSet::new();
        let entry = |msg: Message| match Reading::resolve(settings, &msg) {
            Err(e) => BatchEntry {
                msg: None,
                reading: None,
                answer: Some(Err(e)),
            },
            Ok(r) => {
                msg.context.record_key(&r.key);
                let answer = (!seen.insert(r.key.clone()))
                    .then(|| Err(HandlerError::busy(settings.min_busy_delay)));
                BatchEntry {
                    msg: Some(msg),
                    reading: Some(r),
                    answer,
                }
            }
        };
        messages.into_iter().map(entry).collect()
    }

    /// The verdict on a key found done (`completion`, with fingerprint `recorded`):
    /// a duplicate, a permanent error (another payload, or poisoned without a
    /// replay), or [`Processed::Handled`] for a poisoned key an operator replays (the
    /// stage then reopens it and runs the handler).
    pub fn done(
        &self,
        completion: Completion,
        recorded: Option<&str>,
    ) -> Result<Processed, HandlerError> {
        match (&self.fingerprint, recorded) {
            (Some(now), Some(then)) if now != then && self.edited_from.as_deref() != Some(then) => {
                Err(HandlerError::permanent(PayloadMismatchError(
                    self.key.clone(),
                )))
            }
            _ => match (completion, self.replay) {
                (Completion::Succeeded, _) => Ok(Processed::Duplicate),
                (Completion::Poisoned, false) => Err(HandlerError::permanent(
                    PreviouslyPoisonedError(self.key.clone()),
                )),
                (Completion::Poisoned, true) => Ok(Processed::Handled),
            },
        }
    }
}

/// The one admission of every dedup stage: resolves the key, opens the stage's
/// session for it with `open(key, fingerprint)`, waits for the message's
/// [crash-guard turn](crate::crash), claims, decides, runs `inner` if admitted and
/// records the outcome:
///
/// | found | result |
/// |---|---|
/// | claim acquired | crash check, then the handler |
/// | done (succeeded) | [`Processed::Duplicate`] |
/// | done with another payload fingerprint (neither the body's nor the one the message was edited from, [`ORIGINAL_FINGERPRINT_HEADER`]) | [`PayloadMismatchError`], permanent |
/// | done (poisoned), no replay header | [`PreviouslyPoisonedError`], permanent |
/// | done (poisoned), replay header | reopened, then as "claim acquired" |
/// | busy | busy error: retried later, no attempt spent |
/// | store failure | the stage's store error: transient |
///
/// The key is recorded in the message's [context](crate::DeliveryContext::record_key)
/// as soon as it is resolved, so that the consumer's failure record names it however
/// admission ends; the crash guard comes from that context too.
pub async fn admit<A, S, O>(
    settings: &DedupSettings,
    open: O,
    inner: S,
    msg: Message,
) -> Result<Processed, HandlerError>
where
    A: Admission,
    O: FnOnce(&str, Option<&str>) -> Result<A, HandlerError>,
    S: Service<Message, Response = (), Error = HandlerError>,
    S::Future: Send,
{
    let key = resolve_key(settings.key.as_ref(), settings.missing_key, &msg)?;
    tracing::Span::current().record("key", key.as_str());
    msg.context.record_key(&key);
    admit_keyed(settings, open, inner, msg, &key).await
}

/// [`admit`] once the key is known.
async fn admit_keyed<A, S>(
    settings: &DedupSettings,
    open: impl FnOnce(&str, Option<&str>) -> Result<A, HandlerError>,
    mut inner: S,
    mut msg: Message,
    key: &str,
) -> Result<Processed, HandlerError>
where
    A: Admission,
    S: Service<Message, Response = (), Error = HandlerError>,
    S::Future: Send,
{
    let reading = Reading::of(settings, &msg, key);
    let mut session = open(key, reading.fingerprint.as_deref())?;

    // A suspect (redelivered) message waits until it can run alone; see `crate::crash`.
    // The turn lasts until the outcome is recorded.
    let guard = msg.context.crash_guard();
    let _turn = guard.turn(&msg).await;
    let (claimed, earlier) = session.claim().await?;
    match decide(settings, &reading, &mut session, claimed, earlier, &guard).await {
        Decision::Run => {}
        Decision::Declined(answer) => return answer,
        Decision::Crashed(err) => {
            session.poisoned().await;
            return Err(err);
        }
    }

    msg.extensions.insert(IdempotencyKey(key.to_owned()));
    session.prepare(&mut msg);
    let result = session.guard(inner.call(msg)).await;
    match settlement(&result) {
        Settlement::Succeeded => session.succeeded().await?,
        Settlement::Poisoned => session.poisoned().await,
        Settlement::Released => session.released().await,
    }
    result.map(|()| Processed::Handled)
}

/// What admission decided once a key's claim was answered.
#[derive(Debug)]
pub(crate) enum Decision {
    /// The claim is held (acquired, or a poisoned key reopened for a replay): run the
    /// handler.
    Run,
    /// Not admitted: the message's answer (a duplicate, a permanent error, busy). The
    /// session's `declined` has run.
    Declined(Result<Processed, HandlerError>),
    /// The claim is held but the message crash-looped: record it poisoned, answer
    /// this permanent error, never run it.
    Crashed(HandlerError),
}

/// The decision on one key from what its claim found (`earlier` unsettled starts
/// behind it): the rows of [`admit`]'s table between the claim and the handler.
/// Calls the session's `reopen` for an operator's replay and its `declined` when the
/// message is not admitted. Used by [`admit`] and by the lease-store batch path.
pub(crate) async fn decide<A: Admission>(
    settings: &DedupSettings,
    reading: &Reading,
    session: &mut A,
    claimed: Claimed,
    earlier: u32,
    guard: &CrashGuard,
) -> Decision {
    let key = &reading.key;
    match claimed {
        Claimed::Acquired => {}
        Claimed::Done {
            completion,
            fingerprint: recorded,
        } => {
            let verdict = reading.done(completion, recorded.as_deref());
            if !matches!(verdict, Ok(Processed::Handled)) {
                session.declined().await;
                return Decision::Declined(verdict);
            }
            let reopened = match session.reopen().await {
                Ok(r) => r,
                Err(e) => {
                    session.declined().await;
                    return Decision::Declined(Err(e));
                }
            };
            if !reopened {
                // Someone else reopened it first, or it changed under us: look again later.
                session.declined().await;
                return Decision::Declined(Err(HandlerError::busy(settings.min_busy_delay)));
            }
            debug!(key = %key, "operator replay reopened a poisoned record");
        }
        Claimed::Busy { retry_in } => {
            session.declined().await;
            let delay =
                retry_in.map_or(settings.min_busy_delay, |r| r.max(settings.min_busy_delay));
            return Decision::Declined(Err(HandlerError::busy(delay)));
        }
    }
    match guard.check(earlier) {
        Ok(()) => Decision::Run,
        Err(crashed) => {
            warn!(key = %key, times = crashed.times, "message crashed or hung the worker too often; dead-lettering it without running it");
            Decision::Crashed(HandlerError::permanent(crashed))
        }
    }
}

/// How the outcome of a handler that ran is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// `done(succeeded)`: the handler succeeded, or dropped the message on purpose (a
    /// discard is recorded done like a success, so a redelivery is a duplicate; the
    /// SQL inbox commits the handler's transaction).
    Succeeded,
    /// `done(poisoned)`: a permanent failure.
    Poisoned,
    /// The claim is given back: any other failure.
    Released,
}

/// How `result`, a handler's, is recorded.
pub(crate) fn settlement(result: &Result<(), HandlerError>) -> Settlement {
    match result {
        Ok(()) => Settlement::Succeeded,
        Err(e) if e.is_discard() => Settlement::Succeeded,
        Err(e) if e.kind() == Some(ErrorKind::Permanent) => Settlement::Poisoned,
        Err(_) => Settlement::Released,
    }
}
