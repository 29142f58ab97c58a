//! Handler errors and how they are classified.
//!
//! A handler returns `Result<(), E>`. Any `E: std::error::Error` converts into a
//! [`HandlerError`] with `?`; its [`ErrorKind`] is then decided by the consumer's
//! [`Classify`](crate::classify::Classify) policy (transient unless the classifier says
//! otherwise). To decide at the `?` site, use [`ResultExt`]:
//!
//! ```
//! use idem_core::{HandlerError, ResultExt};
//!
//! fn parse(raw: &str) -> Result<u64, HandlerError> {
//!     // A payload that does not parse will never parse: dead-letter it at once.
//!     let amount = raw.parse::<u64>().permanent()?;
//!     Ok(amount)
//! }
//! assert!(parse("12").is_ok());
//! assert_eq!(parse("x").unwrap_err().kind(), Some(idem_core::ErrorKind::Permanent));
//! ```

use std::backtrace::Backtrace;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::time::Duration;

/// A boxed error, as tower uses.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Whether retrying can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A technical failure (database down, network cut, timeout, panic): retry with
    /// backoff, dead-letter once the attempt budget is spent.
    Transient,
    /// A content failure (invalid payload, validation, missing key): retrying never
    /// helps, dead-letter at once ("poison ack").
    Permanent,
}

impl ErrorKind {
    /// `"transient"` or `"permanent"`, as written in the `x-idem-error-kind` header.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error a handler returns.
///
/// Not a `std::error::Error` itself (like `anyhow::Error`), so that every
/// `std::error::Error` converts into it with `?`.
pub struct HandlerError {
    verdict: Verdict,
    type_name: Option<&'static str>,
    backtrace: Option<Box<Backtrace>>,
    source: BoxError,
}

/// What a failure asks of the consumer: one variant per outcome, so that no
/// contradictory combination (a permanent error with a retry delay, a release that
/// spends an attempt) can be built. Read by the retry policy
/// ([`crate::consumer::policy`]), the circuit breaker and the dedup admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A failure of the handler (or of the stack around it) that spends an attempt.
    /// `None` until the consumer's classifier decides; still `None` after it (an
    /// error raised above the classifier) counts as transient.
    Fail(Option<ErrorKind>),
    /// A transient failure whose retry waits at least this long; spends an attempt.
    RetryAfter(Duration),
    /// The key is held elsewhere under a live lease: retry after this delay without
    /// spending an attempt.
    Busy(Duration),
    /// The dedup store failed (transient, spends an attempt, counted by the circuit
    /// breaker as a store failure).
    StoreDown,
    /// Hand the delivery back untouched: no attempt, no copy, never dead-lettered.
    Release,
    /// The handler dropped the message on purpose.
    Discard,
}

impl Verdict {
    /// The kind this verdict reports through [`HandlerError::kind`].
    fn kind(self) -> Option<ErrorKind> {
        match self {
            Verdict::Fail(kind) => kind,
            Verdict::RetryAfter(_) | Verdict::Busy(_) | Verdict::StoreDown | Verdict::Release => {
                Some(ErrorKind::Transient)
            }
            // Never retried, and not a failure to the breaker's handler failure rate.
            Verdict::Discard => Some(ErrorKind::Permanent),
        }
    }
}

tokio::task_local! {
    /// Set by the consumer around its stack when it writes backtraces
    /// ([`ConsumerBuilder::backtrace_header`](crate::ConsumerBuilder::backtrace_header)).
    static CAPTURE_BACKTRACES: bool;
}

/// Runs `f` with backtrace capture on or off for the [`HandlerError`]s created while
/// it is polled (on this task).
pub(crate) async fn capturing_backtraces<F: Future>(on: bool, f: F) -> F::Output {
    CAPTURE_BACKTRACES.scope(on, f).await
}

fn capture_backtrace() -> Option<Box<Backtrace>> {
    CAPTURE_BACKTRACES
        .try_with(|on| *on)
        .unwrap_or(false)
        .then(|| Box::new(Backtrace::force_capture()))
}

/// The Rust type name of `E`, unless it says nothing about the failure (text, a
/// boxed trait object).
fn informative_type_name<E>() -> Option<&'static str> {
    let name = std::any::type_name::<E>();
    let vague = matches!(
        name,
        "&str" | "alloc::string::String" | "&alloc::string::String" | "alloc::borrow::Cow<str>"
    ) || name.starts_with("alloc::boxed::Box<dyn ")
        || name.starts_with("idem_core::error::HandlerError");
    (!vague).then_some(name)
}

impl HandlerError {
    /// A transient error: retried with backoff.
    pub fn transient<E: Into<BoxError>>(err: E) -> Self {
        Self::with_kind(
            Some(ErrorKind::Transient),
            err.into(),
            informative_type_name::<E>(),
        )
    }

    /// A permanent error: dead-lettered at once.
    pub fn permanent<E: Into<BoxError>>(err: E) -> Self {
        Self::with_kind(
            Some(ErrorKind::Permanent),
            err.into(),
            informative_type_name::<E>(),
        )
    }

    /// Drop the message on purpose (a stale event, a command for an entity that no
    /// longer exists): it is acked and not retried nor dead-lettered, and the
    /// consumer logs it (`info`, with `reason`), counts it
    /// ([`Stats::discarded`](crate::Stats::discarded), metric
    /// `idem_discarded_total`) and reports it to the settle hooks as
    /// [`Disposition::Discard`](crate::Disposition::Discard).
    ///
    /// The dedup record is marked `done` as for a success, so a redelivered copy is
    /// acked as a duplicate without running the handler again. With the SQL
    /// transactional inbox that means the handler's transaction **commits** (a discard
    /// is "handled by doing nothing"): whatever the handler wrote in it before
    /// discarding is kept. To undo writes, return an error instead.
    ///
    /// ```
    /// use idem_core::{Consumer, Disposition, HandlerError, Json, Message, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::ConfigError> {
    /// async fn on_price(Json(version): Json<u64>) -> Result<(), HandlerError> {
    ///     let current = 7; // read from your store
    ///     if version <= current {
    ///         return Err(HandlerError::discard(format!("stale price v{version}, have v{current}")));
    ///     }
    ///     Ok(())
    /// }
    /// let consumer = Consumer::builder("prices").store(MemoryStore::new()).handler(on_price)?;
    /// let msg = || Message::new("3").with_message_id("p-3");
    /// let d = consumer.process(msg()).await;
    /// assert_eq!(d, Disposition::Discard { reason: "stale price v3, have v7".into() });
    /// // Recorded as done: a redelivery is a duplicate.
    /// assert_eq!(consumer.process(msg()).await, Disposition::Ack { duplicate: true });
    /// assert_eq!(consumer.stats().discarded, 1);
    /// # Ok(()) }
    /// ```
    pub fn discard<E: Into<BoxError>>(reason: E) -> Self {
        // Permanent: never retried, and not a failure to the circuit breaker's handler
        // failure rate.
        Self::with_verdict(
            Verdict::Discard,
            reason.into(),
            informative_type_name::<E>(),
        )
    }

    /// A transient error whose retry must wait at least `delay` (rounded up to a delay
    /// tier by the transport).
    pub fn retry_after<E: Into<BoxError>>(delay: Duration, err: E) -> Self {
        Self::with_verdict(
            Verdict::RetryAfter(delay),
            err.into(),
            informative_type_name::<E>(),
        )
    }

    /// An error whose kind the consumer's classifier decides.
    pub fn unclassified<E: Into<BoxError>>(err: E) -> Self {
        Self::with_kind(None, err.into(), informative_type_name::<E>())
    }

    /// The message is being processed elsewhere under a live lease: retry after
    /// `delay` without spending an attempt. Crate-private: a handler returning it would
    /// be retried forever (dedup stages in other crates use `__private::busy`).
    pub(crate) fn busy(delay: Duration) -> Self {
        Self::with_verdict(
            Verdict::Busy(delay),
            "message is being processed by another worker".into(),
            None,
        )
    }

    /// The dedup store (or inbox database) failed: unreachable, timed out, reset.
    /// Transient, and counted by the consumer's
    /// [`CircuitBreaker`](crate::breaker::CircuitBreaker) as a store failure. Dedup
    /// stages return this for their own store calls; a handler's own errors are not
    /// store failures even when they come from the same database.
    pub fn store_unavailable<E: Into<BoxError>>(err: E) -> Self {
        Self::with_verdict(Verdict::StoreDown, err.into(), informative_type_name::<E>())
    }

    /// Hand the delivery back to the broker untouched: no attempt spent, no retry copy,
    /// never dead-lettered ([`Disposition::Release`](crate::Disposition::Release)). The
    /// circuit breaker turns store failures into this while it is open. Crate-private,
    /// like `busy`: a handler returning it would loop.
    pub(crate) fn release<E: Into<BoxError>>(err: E) -> Self {
        Self::with_verdict(Verdict::Release, err.into(), informative_type_name::<E>())
    }

    /// This error, turned into a [release](Self::release) (its message kept).
    pub(crate) fn into_release(mut self) -> Self {
        self.verdict = Verdict::Release;
        self
    }

    /// A copy of this failure for one message of a batch that failed as a whole:
    /// its text and type, and a verdict that retries the message and charges it an
    /// attempt (a store failure stays one, a requested delay is kept; anything else,
    /// a permanent error or a discard included, becomes transient).
    pub(crate) fn batch_copy(&self) -> HandlerError {
        let verdict = match self.verdict {
            v @ (Verdict::StoreDown
            | Verdict::RetryAfter(_)
            | Verdict::Busy(_)
            | Verdict::Release) => v,
            _ => Verdict::Fail(Some(ErrorKind::Transient)),
        };
        HandlerError {
            verdict,
            type_name: self.type_name,
            backtrace: None,
            source: self.chain().into(),
        }
    }

    /// What this failure asks of the consumer.
    pub(crate) fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Whether the dedup store failed (see [`store_unavailable`](Self::store_unavailable)).
    pub(crate) fn is_store_failure(&self) -> bool {
        self.verdict == Verdict::StoreDown
    }

    /// Whether the delivery is to be handed back untouched (see [`release`](Self::release)).
    pub(crate) fn is_release(&self) -> bool {
        self.verdict == Verdict::Release
    }

    /// Whether the handler dropped the message on purpose (see [`discard`](Self::discard)).
    pub fn is_discard(&self) -> bool {
        self.verdict == Verdict::Discard
    }

    /// The Rust type name of the underlying error (as `std::any::type_name` writes
    /// it, e.g. `std::io::error::Error`), when it is known: `None` for an error made
    /// from text or from a boxed trait object. Written in the `x-idem-error-type`
    /// header.
    pub fn type_name(&self) -> Option<&'static str> {
        self.type_name
    }

    /// The backtrace taken when this error was created, if the consumer asked for
    /// them ([`ConsumerBuilder::backtrace_header`](crate::ConsumerBuilder::backtrace_header)).
    pub fn backtrace(&self) -> Option<&Backtrace> {
        self.backtrace.as_deref()
    }

    /// A transient, permanent or unclassified failure. An error that crossed a tower
    /// layer as a [`BoxError`] keeps its own verdict.
    fn with_kind(
        kind: Option<ErrorKind>,
        source: BoxError,
        type_name: Option<&'static str>,
    ) -> Self {
        match source.downcast::<Classified>() {
            Ok(inner) => inner.0,
            Err(source) => Self::new(Verdict::Fail(kind), source, type_name),
        }
    }

    /// A failure with an explicit verdict. Wrapping an error that crossed a tower
    /// layer keeps its message and backtrace, and the verdict asked for here
    /// replaces its own (the outer marker wins).
    fn with_verdict(verdict: Verdict, source: BoxError, type_name: Option<&'static str>) -> Self {
        match source.downcast::<Classified>() {
            Ok(inner) => HandlerError { verdict, ..inner.0 },
            Err(source) => Self::new(verdict, source, type_name),
        }
    }

    fn new(verdict: Verdict, source: BoxError, type_name: Option<&'static str>) -> Self {
        HandlerError {
            verdict,
            type_name: type_name.or_else(|| known_type_name(source.as_ref())),
            backtrace: capture_backtrace(),
            source,
        }
    }

    /// The kind, if decided.
    pub fn kind(&self) -> Option<ErrorKind> {
        self.verdict.kind()
    }

    /// Decides the kind if it is not decided yet.
    pub(crate) fn classify_with(
        mut self,
        f: impl FnOnce(&(dyn StdError + 'static)) -> ErrorKind,
    ) -> Self {
        if self.verdict == Verdict::Fail(None) {
            self.verdict = Verdict::Fail(Some(f(self.source.as_ref())));
        }
        self
    }

    /// The requested minimum retry delay, if any.
    pub fn retry_delay(&self) -> Option<Duration> {
        match self.verdict {
            Verdict::RetryAfter(delay) | Verdict::Busy(delay) => Some(delay),
            _ => None,
        }
    }

    /// Whether this failure spends one attempt of the retry budget.
    #[cfg(test)]
    pub(crate) fn counts_attempt(&self) -> bool {
        !matches!(self.verdict, Verdict::Busy(_) | Verdict::Release)
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn StdError + Send + Sync + 'static) {
        self.source.as_ref()
    }

    /// The error and its `source()` chain joined by `": "`.
    pub fn chain(&self) -> String {
        let mut out = self.source.to_string();
        let mut cur = self.source.source();
        while let Some(e) = cur {
            let s = e.to_string();
            if !out.ends_with(&s) {
                out.push_str(": ");
                out.push_str(&s);
            }
            cur = e.source();
        }
        out
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind())
            .field("retry_after", &self.retry_delay())
            .field("error", &self.chain())
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.chain())
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for HandlerError {
    fn from(err: E) -> Self {
        HandlerError::unclassified(err)
    }
}

/// Names the errors idem itself boxes (the handler timeout, tower's own errors), which
/// reach [`HandlerError`] as trait objects.
fn known_type_name(err: &(dyn StdError + Send + Sync + 'static)) -> Option<&'static str> {
    fn name_of<T: StdError + 'static>(
        err: &(dyn StdError + Send + Sync + 'static),
    ) -> Option<&'static str> {
        err.is::<T>().then(std::any::type_name::<T>)
    }
    name_of::<HandlerTimeoutError>(err).or_else(|| name_of::<tower::timeout::error::Elapsed>(err))
}

/// Carries a [`HandlerError`] through layers that want a [`BoxError`] (tower's
/// `Timeout`, `ConcurrencyLimit`, ...) without losing its kind.
#[derive(Debug)]
struct Classified(HandlerError);

impl fmt::Display for Classified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for Classified {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(self.0.source.as_ref())
    }
}

impl From<HandlerError> for BoxError {
    fn from(err: HandlerError) -> Self {
        Box::new(Classified(err))
    }
}

/// The handler ran longer than the consumer's `handler_timeout`. Transient, like any
/// timeout. Its text names the setting and its value, e.g.
/// `handler timed out after 5s (handler_timeout)`, in logs and in `x-idem-error`.
/// (A handler service that itself fails with tower's bare `Elapsed`, from a timeout
/// layer of its own, is reported the same way: the two cannot be told apart.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("handler timed out after {timeout:?} (handler_timeout)")]
pub struct HandlerTimeoutError {
    /// The configured handler timeout.
    pub timeout: Duration,
}

impl HandlerTimeoutError {
    /// Replaces tower's bare `Elapsed` ("request timed out") from the handler-timeout
    /// layer by this error; any other error passes through.
    pub(crate) fn name_elapsed(err: BoxError, timeout: Duration) -> BoxError {
        if err.is::<tower::timeout::error::Elapsed>() {
            Box::new(HandlerTimeoutError { timeout })
        } else {
            err
        }
    }
}

/// Classify an error at the `?` site.
pub trait ResultExt<T> {
    /// Marks the error as transient (retry with backoff).
    fn transient(self) -> Result<T, HandlerError>;
    /// Marks the error as permanent (dead-letter at once).
    fn permanent(self) -> Result<T, HandlerError>;
    /// Marks the error as transient with a minimum retry delay.
    fn retry_after(self, delay: Duration) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::transient)
    }
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
    fn retry_after(self, delay: Duration) -> Result<T, HandlerError> {
        self.map_err(|e| HandlerError::retry_after(delay, e))
    }
}

/// What a handler may return: `()`, `Result<(), E>` with `E: Into<HandlerError>`.
///
/// Every `std::error::Error + Send + Sync + 'static` converts into a
/// [`HandlerError`]; a `String` or `&str` does not (wrap it:
/// `HandlerError::permanent(text)`). Any other return type is refused:
///
/// ```compile_fail,E0277
/// fn check<R: idem_core::IntoHandlerResult>(_: R) {}
/// check(Some(1));
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a handler result",
    label = "a handler returns `()` or `Result<(), E>` with `E: Into<HandlerError>`",
    note = "any `std::error::Error + Send + Sync + 'static` converts into `HandlerError`; wrap text with `HandlerError::permanent(..)` or `HandlerError::transient(..)`"
)]
pub trait IntoHandlerResult {
    /// Converts into the handler result.
    fn into_handler_result(self) -> Result<(), HandlerError>;
}

impl IntoHandlerResult for () {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        Ok(())
    }
}

impl<E: Into<HandlerError>> IntoHandlerResult for Result<(), E> {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        self.map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn kind_survives_a_trip_through_box_error() {
        let boxed: BoxError = HandlerError::permanent("bad").into();
        let back = HandlerError::unclassified(boxed);
        assert_eq!(back.kind(), Some(ErrorKind::Permanent));
    }

    #[test]
    fn chain_joins_sources() {
        let e = HandlerError::from(Outer(std::io::Error::other("disk full")));
        assert_eq!(e.chain(), "outer: disk full");
        assert_eq!(e.kind(), None);
    }

    #[test]
    fn question_mark_markers() {
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("x"));
        assert_eq!(
            r.transient().unwrap_err().kind(),
            Some(ErrorKind::Transient)
        );
        let busy = HandlerError::busy(Duration::from_secs(1));
        assert!(!busy.counts_attempt());
        assert_eq!(busy.retry_delay(), Some(Duration::from_secs(1)));
    }
}
