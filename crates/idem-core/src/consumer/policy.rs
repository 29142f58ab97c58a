//! The retry decision, apart from the stack that produces the result it judges.
//!
//! [`decide`] is a pure function: given what the stack returned for one delivery (a
//! success, a duplicate, or a failure's [`Verdict`]), the delivery's [`History`] and
//! the consumer's [`Policy`], it says what becomes of the delivery ([`Decision`]).
//! [`Consumer::process`](crate::Consumer::process) runs it and turns the decision into
//! a [`Disposition`](crate::Disposition) with its failure record and copy headers.
//! The table it implements is section 3 of docs/SEMANTICS.md; the tests below walk it
//! row by row without building a stack.

use std::time::{Duration, SystemTime};

use crate::backoff::Backoff;
use crate::consumer::DeliveryMode;
use crate::dedup::Processed;
use crate::error::{ErrorKind, Verdict};
use crate::outcome::DelayKind;

/// What the delivery brought with it from earlier attempts, and the time of the
/// decision (given, not read, so that the decision is reproducible).
#[derive(Clone, Copy, Debug)]
pub(crate) struct History {
    /// Attempts spent before this delivery (`x-idem-attempts`).
    pub(crate) failed_before: u32,
    /// When the first attempt failed (`x-idem-first-failed-at`), if one did.
    pub(crate) first_failed_at: Option<SystemTime>,
    /// Now.
    pub(crate) now: SystemTime,
}

impl History {
    /// When the failure history starts: the recorded first failure, or now. A first
    /// failure "in the future" (clock skew, a forged header) counts as now.
    pub(crate) fn first_failed_at(&self) -> SystemTime {
        self.first_failed_at.map_or(self.now, |t| t.min(self.now))
    }

    /// Time spent since the first failure, for the backoff's time budget.
    fn since_first_failure(&self) -> Duration {
        self.now
            .duration_since(self.first_failed_at())
            .unwrap_or_default()
    }
}

/// The consumer's settings the decision reads.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy<'a> {
    /// When the consumer acks.
    pub(crate) mode: DeliveryMode,
    /// Delays and budgets for transient failures.
    pub(crate) backoff: &'a Backoff,
}

/// What becomes of one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Ack: the handler succeeded (`duplicate: false`) or the key was already done.
    Ack { duplicate: bool },
    /// At-most-once: the message was acked on receipt; the failure is only counted.
    Dropped,
    /// The handler dropped the message on purpose.
    Discard,
    /// Hand the delivery back to the broker untouched.
    Release,
    /// A retry copy after `delay`; `attempts` is what the copy's failure record says.
    Retry {
        delay: Duration,
        delay_kind: DelayKind,
        attempts: u32,
    },
    /// A dead-letter copy; `attempts` as for a retry.
    DeadLetter { attempts: u32 },
}

/// Decides what the result of one run of the stack becomes.
pub(crate) fn decide(
    result: Result<Processed, Verdict>,
    history: &History,
    policy: &Policy<'_>,
) -> Decision {
    let verdict = match result {
        Ok(Processed::Handled) => return Decision::Ack { duplicate: false },
        Ok(Processed::Duplicate) => return Decision::Ack { duplicate: true },
        Err(verdict) => verdict,
    };
    let failed_before = history.failed_before;
    let counted = failed_before.saturating_add(1);
    match verdict {
        // Before the mode: a discard is an outcome, not a failure, in every mode.
        Verdict::Discard => Decision::Discard,
        _ if policy.mode == DeliveryMode::AtMostOnce => Decision::Dropped,
        Verdict::Release => Decision::Release,
        Verdict::Busy(delay) => Decision::Retry {
            delay,
            delay_kind: DelayKind::AtLeast,
            attempts: failed_before,
        },
        Verdict::Fail(Some(ErrorKind::Permanent)) => Decision::DeadLetter { attempts: counted },
        Verdict::Fail(_) => after_backoff(None, false, history, policy),
        Verdict::RetryAfter(asked) => after_backoff(Some(asked), false, history, policy),
        Verdict::StoreDown => after_backoff(None, true, history, policy),
    }
}

/// A transient failure that spends an attempt: retried while the backoff's attempt
/// and time budgets allow (after at least `asked`, if the failure asked for a delay),
/// dead-lettered after.
fn after_backoff(
    asked: Option<Duration>,
    store_down: bool,
    history: &History,
    policy: &Policy<'_>,
) -> Decision {
    let failed_before = history.failed_before;
    let attempts = failed_before.saturating_add(1);
    match policy
        .backoff
        .next_delay(attempts, history.since_first_failure())
    {
        // The dedup store failed, not the message: an outage never ends in the DLQ,
        // even for a message on its last attempt (one of the few store failures seen
        // before the circuit breaker opens). It is retried at its last backoff delay
        // and the failure is not charged beyond the budget.
        None if store_down => Decision::Retry {
            delay: policy.backoff.delay_after(failed_before.max(1)),
            delay_kind: DelayKind::Backoff,
            attempts: failed_before,
        },
        None => Decision::DeadLetter { attempts },
        Some(computed) => match asked {
            Some(asked) => Decision::Retry {
                delay: asked,
                delay_kind: DelayKind::AtLeast,
                attempts,
            },
            None => Decision::Retry {
                delay: computed,
                delay_kind: DelayKind::Backoff,
                attempts,
            },
        },
    }
}

/// Whether a failed try is run again at once, in process, after `spent` immediate
/// retries out of `limit`: only a transient failure of the handler that spends an
/// attempt. Never a permanent error or a discard, a store failure (the circuit
/// breaker's business), a release, a busy key, nor a failure that asked for a delay
/// (`retry_after`).
pub(crate) fn retry_at_once(verdict: Verdict, spent: u32, limit: u32) -> bool {
    spent < limit && matches!(verdict, Verdict::Fail(kind) if kind != Some(ErrorKind::Permanent))
}

#[cfg(test)]
mod tests;
