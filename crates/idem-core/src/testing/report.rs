//! What a harness run found.

use std::fmt;
use std::time::Duration;

use crate::consumer::DeliveryMode;

use super::schedule::Plan;

/// The effect count the consumer's delivery mode promises for each key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Effectively-once: exactly one effect.
    ExactlyOne,
    /// At-least-once: one effect or more.
    AtLeastOne,
    /// At-most-once: none or one.
    AtMostOne,
}

impl Expected {
    pub(crate) fn of(mode: DeliveryMode) -> Self {
        match mode {
            DeliveryMode::EffectivelyOnce => Expected::ExactlyOne,
            DeliveryMode::AtLeastOnce => Expected::AtLeastOne,
            DeliveryMode::AtMostOnce => Expected::AtMostOne,
        }
    }

    pub(crate) fn holds(self, observed: u64) -> bool {
        match self {
            Expected::ExactlyOne => observed == 1,
            Expected::AtLeastOne => observed >= 1,
            Expected::AtMostOne => observed <= 1,
        }
    }
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expected::ExactlyOne => "exactly 1",
            Expected::AtLeastOne => "at least 1",
            Expected::AtMostOne => "at most 1",
        })
    }
}

/// One key whose effect count the report calls out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The idempotency key.
    pub key: String,
    /// What the delivery mode promises.
    pub expected: Expected,
    /// What the probe counted.
    pub observed: u64,
    /// The trouble planned for the message.
    pub plan: Plan,
    /// What happened to each delivery of the message, in order.
    pub events: Vec<String>,
    /// Why the key is reported (the effect count, or a dead letter).
    pub reason: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  key {:?}: expected {} effect(s), observed {} ({})",
            self.key, self.expected, self.observed, self.reason
        )?;
        writeln!(f, "    schedule: {}", self.plan)?;
        for e in &self.events {
            writeln!(f, "    - {e}")?;
        }
        Ok(())
    }
}

/// Counts of what the harness did during a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Messages given.
    pub messages: usize,
    /// Calls of `Consumer::process` (every copy, retry and redelivery).
    pub deliveries: u64,
    /// Copies published beyond the first of each message.
    pub extra_copies: u64,
    /// Crashes that fired, by point: before the handler, after the effect, after commit.
    pub crashes: [u64; 3],
    /// Transient failures injected.
    pub transient_failures: u64,
    /// Retries the consumer asked for (injected failures, the handler's own, and busy
    /// keys).
    pub retries: u64,
    /// Deliveries taken out of order.
    pub reordered: u64,
}

/// The outcome of [`Harness::run`](super::Harness::run).
///
/// [`violations`](Self::violations) break the delivery mode's promise;
/// [`windows`](Self::windows) are extra effects of a key whose delivery crashed after
/// the effect on a lease store: the window lease stores leave open (the effect and
/// the dedup record are not written together). Both mean an effect happened a number
/// of times your users would notice, so [`assert_ok`](Self::assert_ok) fails on
/// either. [`assert_ok_allowing_lease_window`](Self::assert_ok_allowing_lease_window)
/// accepts the window, for a handler whose repeats are known to be harmless.
#[derive(Clone, Debug)]
pub struct Report {
    pub(crate) seed: u64,
    pub(crate) consumer: String,
    pub(crate) mode: DeliveryMode,
    pub(crate) lease_stage: bool,
    pub(crate) totals: Totals,
    pub(crate) elapsed: Duration,
    pub(crate) violations: Vec<Finding>,
    pub(crate) windows: Vec<Finding>,
}

impl Report {
    /// The seed of the run: `Harness::seed(seed)` (or `IDEM_HARNESS_SEED=seed`)
    /// replays the same plan.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Keys whose effect count breaks the promise of the delivery mode, and keys that
    /// were dead-lettered.
    pub fn violations(&self) -> &[Finding] {
        &self.violations
    }

    /// Keys with extra effects explained by the lease-store window (a crash after the
    /// effect, before the dedup record completed).
    pub fn windows(&self) -> &[Finding] {
        &self.windows
    }

    /// What the harness did.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Wall-clock time of the run, probes included.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Every key's effect count kept the promise: no violation and no repeat in the
    /// lease-store window.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty() && self.windows.is_empty()
    }

    /// Panics with the whole report unless [`is_ok`](Self::is_ok): a violation, or an
    /// effect repeated in the lease-store window. The report says why such a repeat
    /// happened and how to make the handler safe.
    #[track_caller]
    pub fn assert_ok(&self) {
        if !self.is_ok() {
            panic!("{self}");
        }
    }

    /// Like [`assert_ok`](Self::assert_ok), but accepts effects repeated in the
    /// lease-store window ([`windows`](Self::windows)): only for a handler whose
    /// repeated effect is harmless by design. Violations still fail.
    #[track_caller]
    pub fn assert_ok_allowing_lease_window(&self) {
        if !self.violations.is_empty() {
            panic!("{self}");
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        writeln!(
            f,
            "idem harness: consumer {:?} ({:?}{}), seed {} (replay with IDEM_HARNESS_SEED={})",
            self.consumer,
            self.mode,
            if self.lease_stage {
                ", lease store"
            } else {
                ""
            },
            self.seed,
            self.seed
        )?;
        writeln!(
            f,
            "  {} messages, {} deliveries, {} extra copies, crashes before/after effect/after commit {}/{}/{}, {} transient failures injected, {} retries, {} out of order, {:.2?}",
            t.messages, t.deliveries, t.extra_copies, t.crashes[0], t.crashes[1], t.crashes[2],
            t.transient_failures, t.retries, t.reordered, self.elapsed
        )?;
        if self.violations.is_empty() {
            writeln!(f, "  no violations")?;
        } else {
            writeln!(f, "{} VIOLATION(S):", self.violations.len())?;
            for v in &self.violations {
                write!(f, "{v}")?;
            }
        }
        if !self.windows.is_empty() {
            writeln!(
                f,
                "{} key(s) re-ran in the lease-store window: the handler's effect happened \
                 again after a crash between the effect and the dedup record (a lease \
                 store writes the two separately). Your handler is not safe against this: \
                 make the effect idempotent (e.g. `INSERT ... ON CONFLICT DO NOTHING` on \
                 the idempotency key) or write it in the SQL inbox's transaction (`Tx`), \
                 which commits it with the dedup record:",
                self.windows.len()
            )?;
            for w in &self.windows {
                write!(f, "{w}")?;
            }
        }
        Ok(())
    }
}
