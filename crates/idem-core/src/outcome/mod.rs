//! What a transport does with a delivery once the stack has run: the [`Disposition`].
//!
//! Every handler result maps to exactly one disposition (SEMANTICS section 3):
//! `Ok` -> [`Disposition::Ack`]; transient error -> [`Disposition::Retry`] until the
//! attempt budget is spent, then [`Disposition::DeadLetter`]; permanent error ->
//! [`Disposition::DeadLetter`] at once. Transports carry a retry or a dead-letter out as
//! "publish the copy with a publisher confirm, then ack the original"; the disposition
//! names every header the copy gets, so transports only merge and publish. A message
//! the handler dropped on purpose ([`HandlerError::discard`](crate::HandlerError::discard))
//! is [`Disposition::Discard`]: acked, no copy. After settling, a transport tells its
//! settle hook ([`Settled`]), and after a dead-letter copy is safely stored, the
//! consumer's dead-letter hook ([`DeadLettered`]).
//!
//! Besides the failure history, every copy names who failed it and how: the error's
//! type ([`headers::ERROR_TYPE`]), the host and process id ([`headers::HOST`],
//! [`headers::PID`]), the immediate retries spent ([`headers::IMMEDIATE_RETRIES`]) and,
//! opt-in, a backtrace ([`headers::BACKTRACE`]); strings are bounded like the others.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::message::{Headers, Message};

mod failure;

pub(crate) use failure::Origin;
pub use failure::{host, Failure};

/// Longest `x-idem-error` header value, in bytes.
pub const MAX_ERROR_LEN: usize = 2048;
/// Longest value of any other `x-idem-*` string header, in bytes.
pub const MAX_HEADER_LEN: usize = 512;
/// Longest `x-idem-backtrace` header value, in bytes (the innermost frames are kept).
pub const MAX_BACKTRACE_LEN: usize = 8192;

/// The header names of the copies; the crate-level [`crate::headers`]
/// module, re-exported at its older path.
pub use crate::headers;

/// The headers of a retry or dead-letter copy: the original's `headers`, without its
/// [failure record](headers::FAILURE_RECORD), then `copy` (the headers the
/// [`Disposition`] carries) on top.
pub fn copy_onto(headers: &mut Headers, copy: &Headers) {
    headers.retain(|name, _| !headers::FAILURE_RECORD.contains(&name.as_str()));
    headers.extend(copy.iter().map(|(k, v)| (k.clone(), v.clone())));
}

/// How a transport that can only approximate delays (RabbitMQ's delay tiers) may
/// round a retry delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelayKind {
    /// Computed by the [`Backoff`](crate::Backoff) policy: any delay close to it will
    /// do, so a transport may round it either way (RabbitMQ: the nearest tier).
    Backoff,
    /// Asked for by the handler (`HandlerError::retry_after`): a floor. A transport
    /// never shortens it (RabbitMQ: the smallest tier at least that long, or the
    /// longest tier if none is).
    AtLeast,
}

impl DelayKind {
    /// `backoff` or `at_least`.
    pub fn as_str(self) -> &'static str {
        match self {
            DelayKind::Backoff => "backoff",
            DelayKind::AtLeast => "at_least",
        }
    }
}

impl fmt::Display for DelayKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the transport must do with a delivery.
///
/// A retry or a dead-letter carries the complete set of `x-idem-*` headers the copy
/// must have (see [`headers`] and SEMANTICS section 5): the transport adds them to the
/// original's headers (replacing values of the same name) and publishes. Both
/// transports therefore write the same headers.
///
/// `Display` writes one line for logs and examples:
///
/// ```
/// use idem_core::Disposition;
///
/// assert_eq!(Disposition::Ack { duplicate: false }.to_string(), "processed, acked");
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Disposition {
    /// Ack it. `duplicate` is true when the handler did not run because the key was done.
    Ack {
        /// The key was already processed.
        duplicate: bool,
    },
    /// Publish a copy for redelivery after `delay` (with confirm), then ack the original.
    Retry {
        /// Requested delay.
        delay: Duration,
        /// How a transport may round `delay`.
        delay_kind: DelayKind,
        /// The failure.
        failure: Failure,
        /// The `x-idem-*` headers of the copy (failure history, original exchange and
        /// routing key, the crash-loop delivery count).
        headers: Headers,
    },
    /// Publish a copy to the dead-letter queue (with confirm), then ack the original.
    DeadLetter {
        /// The failure.
        failure: Failure,
        /// The `x-idem-*` headers of the copy (failure history, original exchange,
        /// routing key and queue, consumer, key).
        headers: Headers,
    },
    /// Hand the delivery back to the broker untouched (RabbitMQ: `basic.nack` with
    /// `requeue=true`): no attempt spent, no copy published. Returned while the
    /// consumer's circuit breaker is open (its store is down), so an outage never
    /// spends a message's retry budget.
    Release {
        /// Why (the store error or the breaker's cause), for logs.
        reason: String,
    },
    /// Ack it: the handler dropped the message on purpose
    /// ([`HandlerError::discard`](crate::HandlerError::discard)). No copy is published;
    /// the dedup record says `done`, as for a success.
    Discard {
        /// What the handler gave as the reason.
        reason: String,
    },
}

impl Disposition {
    /// A short name: `ack`, `duplicate`, `retry`, `dead_letter`, `release` or
    /// `discard`.
    pub fn name(&self) -> &'static str {
        match self {
            Disposition::Ack { duplicate: false } => "ack",
            Disposition::Ack { duplicate: true } => "duplicate",
            Disposition::Retry { .. } => "retry",
            Disposition::DeadLetter { .. } => "dead_letter",
            Disposition::Release { .. } => "release",
            Disposition::Discard { .. } => "discard",
        }
    }

    /// Whether the transport settles it with a plain ack (no copy, no requeue):
    /// [`Ack`](Self::Ack) and [`Discard`](Self::Discard).
    pub fn is_ack(&self) -> bool {
        matches!(self, Disposition::Ack { .. } | Disposition::Discard { .. })
    }

    /// Dead-letters `msg` with `failure` on behalf of consumer `consumer`, with the
    /// same headers [`Consumer::process`](crate::Consumer::process) would write. For a
    /// transport that refuses a delivery without running it (RabbitMQ: a delivery
    /// limit exceeded across copies). `msg` is the delivery as received.
    pub fn dead_letter(msg: &Message, consumer: &str, failure: Failure) -> Disposition {
        let headers = failure.dead_letter_headers(msg, consumer);
        Disposition::DeadLetter { failure, headers }
    }
}

impl fmt::Display for Disposition {
    /// One line: `processed, acked`; `duplicate: key already done, handler not run,
    /// acked`; `transient failure, retry in 100 ms: <error>` (`retry in at least` for a
    /// delay the handler asked for); `permanent failure, dead-lettered: <error>`;
    /// `handed back, no attempt spent: <reason>`; `discarded on purpose, acked:
    /// <reason>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disposition::Ack { duplicate: false } => f.write_str("processed, acked"),
            Disposition::Ack { duplicate: true } => {
                f.write_str("duplicate: key already done, handler not run, acked")
            }
            Disposition::Retry {
                delay,
                delay_kind,
                failure,
                ..
            } => {
                let floor = match delay_kind {
                    DelayKind::Backoff => "",
                    DelayKind::AtLeast => "at least ",
                };
                write!(
                    f,
                    "{} failure, retry in {floor}{}: {}",
                    failure.kind,
                    ShortDelay(*delay),
                    failure.error
                )
            }
            Disposition::DeadLetter { failure, .. } => write!(
                f,
                "{} failure, dead-lettered: {}",
                failure.kind, failure.error
            ),
            Disposition::Release { reason } => {
                write!(f, "handed back, no attempt spent: {reason}")
            }
            Disposition::Discard { reason } => write!(f, "discarded on purpose, acked: {reason}"),
        }
    }
}

/// A delay for people: `250 ms`, `5 s`, `1.5 s`.
struct ShortDelay(Duration);

impl fmt::Display for ShortDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms < 1000 {
            write!(f, "{ms} ms")
        } else if ms.is_multiple_of(1000) {
            write!(f, "{} s", ms / 1000)
        } else {
            write!(f, "{} s", self.0.as_secs_f64())
        }
    }
}

/// What a settle hook is told about a delivery once it is settled (acked, released,
/// or its copy published and the original acked). The same for every transport: see
/// `MemoryWorker::on_settle` and the RabbitMQ `WorkerBuilder::on_settle`.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Settled<'a> {
    /// The delivery's `message_id`, if any.
    pub message_id: Option<&'a str>,
    /// Which attempt this delivery was: 1 for a first delivery, else the failed
    /// attempts its `x-idem-attempts` header recorded plus one.
    pub attempt: u32,
    /// The queue it was consumed from.
    pub queue: &'a str,
    /// What was done with it.
    pub disposition: &'a Disposition,
}

impl<'a> Settled<'a> {
    /// A settled delivery (for transports). `failed_before` is the failed attempts
    /// the delivery's `x-idem-attempts` header recorded.
    pub fn new(
        message_id: Option<&'a str>,
        failed_before: u32,
        queue: &'a str,
        disposition: &'a Disposition,
    ) -> Self {
        Settled {
            message_id,
            attempt: failed_before.saturating_add(1),
            queue,
            disposition,
        }
    }
}

/// A settle hook, as transports store it: called after each delivery is settled
/// (tests, custom metrics, progress output).
pub type SettleHook = Arc<dyn Fn(Settled<'_>) + Send + Sync>;

/// What a dead-letter hook is told: a message was dead-lettered, and its copy is
/// safely in the dead-letter queue (RabbitMQ: the publish was confirmed; memory: the
/// copy was stored). See
/// [`ConsumerBuilder::on_dead_letter`](crate::ConsumerBuilder::on_dead_letter).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct DeadLettered<'a> {
    /// The delivery's `message_id`, if any.
    pub message_id: Option<&'a str>,
    /// The queue it was consumed from.
    pub queue: &'a str,
    /// The dead-letter queue its copy was published to.
    pub dead_letter_queue: &'a str,
    /// The consumer that dead-lettered it.
    pub consumer: &'a str,
    /// The failure record (kind, error chain, attempts, times, key, error type,
    /// immediate retries, backtrace if enabled).
    pub failure: &'a Failure,
    /// The `x-idem-*` headers written on the copy (host and process id included).
    pub headers: &'a Headers,
}

/// A dead-letter hook, as a consumer stores it (alerting, custom metrics, audit).
/// It runs on the delivery's task before the next delivery can take its slot:
/// keep it short, and hand slow work (an HTTP call to a pager) to a channel or a
/// spawned task.
pub type DeadLetterHook = Arc<dyn Fn(DeadLettered<'_>) + Send + Sync>;

#[cfg(test)]
mod tests;
